"""Schemathesis against the live API's OpenAPI document on the PostgreSQL stack (NUL bytes and
huge integers reach the database there): every operation, positive and negative cases, with
generated path parameters and with real ids (a job, its model and artifact, an uploaded
dataset) substituted, a fixed number of cases per operation and a fixed seed. No answer may be a
server error (schemathesis' `not_a_server_error`), and the API must answer every request."""
from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup

from tests.faults.servers import FaultStack, wait_all

pytestmark = pytest.mark.service

WORKERS = 1
MAX_EXAMPLES = 30  # per operation, generation mode and path-parameter source: ~30 s
SEED_JOB = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
            "steps": [{"op": "evaluate"}]}


def npz_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x_train=rng.random((64, 1, 8, 8), dtype=np.float32),
             y_train=rng.integers(0, 10, 64))
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_ids(fault_stack: FaultStack, api_key: str) -> dict[str, str]:
    """Ids that exist for this tenant: a finished job, the model it produced, one of its
    artifacts and an uploaded dataset."""
    with fault_stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=SEED_JOB)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        r = client.post("/v1/datasets", files={"file": ("blobs.npz", npz_bytes())},
                        data={"name": "blobs"})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        job = wait_all(client, [job_id], timeout=120)[job_id]
        assert job["status"] == "succeeded", job
    # jobs that schemathesis manages to submit stay queued: nothing needs to run them
    fault_stack.stop_workers()
    return {"job_id": job_id, "model_id": job["result"]["model_id"], "dataset_id": dataset_id,
            "name": "report.json"}


class Fuzz:
    """Runs the generated cases of one strategy and tallies the answers (never raises on a bad
    answer, so every case runs and the report lists them all)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.statuses: Counter[str] = Counter()
        self.unsent: Counter[str] = Counter()
        self.failures: list[str] = []

    def send(self, label: str, case: schemathesis.Case) -> None:
        try:
            response = case.call(base_url=self.url, headers=self.headers, timeout=30)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL,
                UnicodeError, ValueError) as exc:
            self.unsent[f"{label}: {type(exc).__name__}"] += 1  # the client refused to send it
            return
        except requests.exceptions.RequestException as exc:
            self.failures.append(f"{label}: no answer ({exc!r}) to {case!r}")
            return
        self.statuses[f"{label} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except FailureGroup as exc:
            titles = sorted({f.title for f in exc.exceptions})
            headers = {k: v for k, v in (case.headers or {}).items()
                       if k.lower() != "authorization"}
            self.failures.append(
                f"{label} -> {response.status_code} {titles}: path {case.formatted_path!r}, "
                f"query {case.query!r}, headers {headers!r}, "
                f"body {None if isinstance(case.body, NotSet) else case.body!r}; "
                f"answer {response.text[:300]!r}"[:1500])

    def run(self, label: str, strategy) -> None:
        @given(case=strategy)
        @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def each(case: schemathesis.Case) -> None:
            self.send(label, case)

        try:
            each()
        except Unsatisfiable:  # e.g. no negative case exists for an operation without inputs
            self.unsent[f"{label}: no such cases"] += 1


def test_no_server_error_on_generated_requests(fault_stack: FaultStack, api_key: str,
                                               real_ids: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{fault_stack.url}/openapi.json", timeout=30)
    fuzz = Fuzz(fault_stack.url, {"Authorization": f"Bearer {api_key}"})
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        names = [p.name for p in operation.path_parameters]
        sources = [None]
        # DELETE with the real ids would delete the seeded rows the other operations read
        if (names and all(n in real_ids for n in names)
                and operation.method.upper() != "DELETE"):
            sources.append({n: real_ids[n] for n in names})
            sources.append({n: "\x00" + real_ids[n] for n in names})  # a NUL inside an id
        # path-only operations take any string: they have no negative cases
        modes = [GenerationMode.POSITIVE]
        if any(len(list(params)) for params in (operation.query, operation.headers,
                                                operation.cookies, operation.body)):
            modes.append(GenerationMode.NEGATIVE)
        for fixed in sources:
            for mode in modes:
                fuzz.run(operation.label, operation.as_strategy(mode, path_parameters=fixed))
    # inputs that once gave 500 (issue 11), each as one fixed case
    by_label = {op.label: op for op in operations}
    job = {"job_id": real_ids["job_id"]}
    hostile = [
        ("GET /v1/jobs", {"query": {"cursor": "\x00"}}),
        ("GET /v1/jobs", {"query": {"status": "\x00"}}),
        ("GET /v1/jobs/{job_id}/events", {"path_parameters": job,
                                          "query": {"format": "json", "after": 2**63}}),
        ("GET /v1/jobs/{job_id}/events", {"path_parameters": job, "query": {"format": "json"},
                                          "headers": {"last-event-id": "\u00b2"}}),
        ("GET /v1/jobs/{job_id}/events", {"path_parameters": job, "query": {"format": "json"},
                                          "headers": {"last-event-id": str(2**63)}}),
        ("POST /v1/jobs", {"body": {"model": "\x00", "dataset": "synthetic-blobs",
                                    "steps": [{"op": "evaluate"}]}}),
        ("POST /v1/jobs", {"body": {"model": real_ids["model_id"], "dataset": "\x00",
                                    "steps": [{"op": "evaluate"}]}}),
        ("POST /v1/jobs", {"body": {"model": real_ids["model_id"], "dataset": "synthetic-blobs",
                                    "steps": [{"op": "analyze", "kinds": ["angles"],
                                               "other_model": "\x00"}]}}),
    ]
    for label, fixed in hostile:
        fuzz.run(label, by_label[label].as_strategy(GenerationMode.POSITIVE, **fixed))
    elapsed = time.monotonic() - started
    total = sum(fuzz.statuses.values())
    print(f"schemathesis: {total} requests in {elapsed:.0f} s over {len(operations)} "
          f"operations; client-refused {dict(fuzz.unsent)}; statuses {dict(fuzz.statuses)}")
    assert not fuzz.failures, (
        f"{len(fuzz.failures)} server errors / unanswered requests of {total}:\n"
        + "\n\n".join(fuzz.failures[:15]))
    assert total >= 10 * len(operations), (total, dict(fuzz.statuses))
    with fault_stack.client(api_key) as client:
        assert client.get(f"/v1/jobs/{real_ids['job_id']}").status_code == 200
        # valid specs generated from the JobSpec schema were accepted and wait in the queue:
        # cancel them, so the next module's workers do not run this module's jobs
        queued = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()
        for item in queued["items"]:
            assert client.post(f"/v1/jobs/{item['id']}/cancel").status_code in (202, 409)
