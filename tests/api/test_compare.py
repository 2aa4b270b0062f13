"""GET /v1/reports/compare: jobs with known results (written through the service layer, no
worker), the Pareto set, tenant scoping, the checks on the query, and the PNG and Markdown
renderings."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from api.routes.reports import CompareReport
from service.db import session_scope
from service.orm import Job
from service.states import mark_running, mark_succeeded

SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "train", "epochs": 1}, {"op": "pcn", "select": {"dims": 8}},
                  {"op": "train", "epochs": 1}]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def params(total: int, nonzero: int | None = None) -> dict:
    return {"total": total, "trainable": total, "nonzero": total if nonzero is None else nonzero}


def succeeded_job(client, settings, total: int, accuracy: float, *, macs: int = 1000,
                  nonzero: int | None = None, steps: list[dict] | None = None,
                  spec: dict | None = None) -> str:
    """A job submitted through the API and marked succeeded with a result holding these
    numbers (as the worker stores it)."""
    job_id = client.post("/v1/jobs", json=spec or SPEC).json()["id"]
    after = {"params": params(total, nonzero), "macs": macs, "accuracy": accuracy}
    result = {"model_id": f"model-{total}", "after": after,
              "before": {"params": params(266610), "macs": 266200, "accuracy": 0.1},
              "steps": steps or [{"op": s["op"], **after} for s in (spec or SPEC)["steps"]]}
    with session_scope(settings) as s:
        job = s.get(Job, job_id)
        mark_running(job)
        mark_succeeded(job, result)
    return job_id


@pytest.fixture
def five(client, settings) -> dict[str, str]:
    """best: on the front; cheap and cheap_twin: equal points, both on it; same_cost_worse:
    dominated by best at the same cost; bigger_worse: dominated by best."""
    return {"best": succeeded_job(client, settings, 1000, 0.90, macs=9000),
            "cheap": succeeded_job(client, settings, 500, 0.85, macs=5000),
            "same_cost_worse": succeeded_job(client, settings, 1000, 0.80, macs=100),
            "cheap_twin": succeeded_job(client, settings, 500, 0.85, macs=5000),
            "bigger_worse": succeeded_job(client, settings, 2000, 0.89, macs=20000)}


def test_rows_and_pareto_set(client, five):
    queued = client.post("/v1/jobs", json=SPEC).json()["id"]
    ids = [*five.values(), queued]
    r = client.get("/v1/reports/compare", params={"jobs": ",".join(ids)})
    assert r.status_code == 200, r.text
    report = r.json()
    CompareReport.model_validate(report)  # the documented schema (extra fields refused)
    assert report["cost"] == "total_params"
    assert [row["job_id"] for row in report["rows"]] == ids
    rows = {row["job_id"]: row for row in report["rows"]}
    best = rows[five["best"]]
    assert best["status"] == "succeeded" and best["name"] == "train → pcn → train"
    assert best["model_id"] == "model-1000" and best["params"] == params(1000)
    assert (best["macs"], best["accuracy"], best["cost"]) == (9000, 0.90, 1000)
    assert best["bytes"] is None and best["latency_ms"] is None  # nothing measured a file
    assert report["pareto"] == [five["cheap"], five["cheap_twin"], five["best"]]
    assert {k for k, row in rows.items() if row["pareto"]} == set(report["pareto"])
    waiting = rows[queued]
    assert waiting["status"] == "queued" and waiting["pareto"] is False
    assert waiting["params"] == {"total": None, "trainable": None, "nonzero": None}
    assert waiting["accuracy"] is None and waiting["cost"] is None
    assert report["baseline"]["job_id"] == five["best"]
    assert report["baseline"]["params"] == params(266610) and report["baseline"]["cost"] == 266610
    # by MACs the front changes: same_cost_worse (100 MACs) is now the cheapest
    by_macs = client.get("/v1/reports/compare", params={
        "jobs": ",".join(five.values()), "cost": "macs"}).json()
    assert by_macs["cost"] == "macs"
    assert by_macs["pareto"] == [five["same_cost_worse"], five["cheap"], five["cheap_twin"],
                                 five["best"]]


def test_bytes_and_latency_from_a_measure_step(client, settings):
    spec = SPEC | {"steps": [{"op": "train", "epochs": 1},
                             {"op": "measure", "bytes": True, "latency_batch_size": 8}]}
    after = {"params": params(300), "macs": 300, "accuracy": 0.7}
    measure = {"op": "measure", **after, "cost": {"bytes": 1400, "latency_ms": 0.25},
               "latency": {"batch_size": 8}}
    job_id = succeeded_job(client, settings, 300, 0.7, macs=300, spec=spec,
                           steps=[{"op": "train", **after}, measure])
    plain = succeeded_job(client, settings, 100, 0.6)
    report = client.get("/v1/reports/compare", params={
        "jobs": f"{job_id},{plain}", "cost": "latency_ms"}).json()
    CompareReport.model_validate(report)
    row, other = report["rows"]
    assert (row["bytes"], row["latency_ms"], row["cost"]) == (1400, 0.25, 0.25)
    assert row["latency_batch_size"] == 8 and row["name"] == "train → measure"
    assert other["cost"] is None and other["pareto"] is False
    assert report["pareto"] == [job_id] and plain in report["notes"][0]


def test_another_tenants_or_an_unknown_job_is_404_naming_it(client, bob, five):
    mine = five["best"]
    r = bob.get("/v1/reports/compare", params={"jobs": mine})
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    assert mine in r.json()["detail"]
    r = client.get("/v1/reports/compare", params={"jobs": f"{mine},01nosuchjob"})
    assert r.status_code == 404 and "'01nosuchjob'" in r.json()["detail"]
    assert mine not in r.json()["detail"]


@pytest.mark.parametrize(("query", "needle"), [
    ({}, "jobs: give 1 to 50 job ids"),
    ({"jobs": ""}, "jobs: give 1 to 50 job ids"),
    ({"jobs": "a,,b"}, "jobs: entry 2 of 3 is empty"),
    ({"jobs": "a,b,a"}, "jobs: 'a' is listed more than once"),
    ({"jobs": ",".join(f"j{i}" for i in range(51))}, "jobs: at most 50 jobs"),
    ({"jobs": "a", "format": "pdf"}, "format: Input should be 'json', 'png' or 'md'"),
    ({"jobs": "a", "cost": "flops"}, "cost: Input should be 'total_params'"),
])
def test_bad_queries_are_422_with_error_and_detail(client, query, needle):
    r = client.get("/v1/reports/compare", params=query)
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and needle in body["detail"], body
    assert body["error"] in ("Unprocessable", "ValidationError")


def test_png_is_a_scatter_image(client, five):
    r = client.get("/v1/reports/compare", params={"jobs": ",".join(five.values()),
                                                  "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(PNG_MAGIC) and len(r.content) > 1000
    image = Image.open(io.BytesIO(r.content))
    image.load()
    assert image.format == "PNG" and image.size == (700, 480)
    # no job with both numbers: still an image (saying so)
    r = client.get("/v1/reports/compare", params={"jobs": five["best"], "format": "png",
                                                  "cost": "bytes"})
    assert r.status_code == 200 and r.content.startswith(PNG_MAGIC)


def test_markdown_has_one_line_per_job(client, five):
    r = client.get("/v1/reports/compare", params={"jobs": ",".join(five.values()),
                                                  "format": "md"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/markdown; charset=utf-8"
    lines = [line for line in r.text.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == list(five.values())
    best = next(line for line in lines if five["best"] in line)
    assert "| train → pcn → train | 1,000 | 1,000 | 9,000 | — | 90.00 % | — | ✓ |" in best
    assert lines[1].endswith("| ✓ |") and lines[2].endswith("|  |")  # cheap · same_cost_worse
