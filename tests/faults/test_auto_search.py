"""An auto-compress search on real servers (own PostgreSQL, Redis, an S3 endpoint, the API and
two Celery workers): its trials are child jobs any worker takes; SIGKILL the worker running a
fine-tuning trial and that trial is re-queued, resumes and the search still succeeds with every
trial recorded once; cancel a search and its trials stop and no new one starts."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.faults.servers import (
    FaultStack,
    epoch_pairs,
    job_events,
    wait_all,
    wait_until,
)

pytestmark = pytest.mark.service

WORKERS = 2
TRAIN = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
         "steps": [{"op": "train", "epochs": 1, "batch_size": 64}]}
FINETUNE_EPOCHS = 8


def auto(model_id: str, **extra) -> dict:
    step = {"op": "auto", "budget": {"total_params": 30000}, "trials": 5, "finetune_trials": 2,
            "finetune_epochs": FINETUNE_EPOCHS, "final_epochs": 1, "batch_size": 64,
            "methods": ["pcn", "lowrank", "channel_prune"]} | extra
    return {"model": model_id, "dataset": "synthetic-blobs", "steps": [step]}


@pytest.fixture(scope="module")
def trained(fault_stack: FaultStack, api_key: str) -> str:
    with fault_stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=TRAIN)
        assert r.status_code == 202, r.text
        doc = wait_all(client, [r.json()["id"]], 180)[r.json()["id"]]
        assert doc["status"] == "succeeded", doc
        return doc["result"]["model_id"]


def trials(client: httpx.Client, job_id: str) -> list[dict]:
    r = client.get(f"/v1/jobs/{job_id}/trials")
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_a_killed_trial_is_retried_and_the_search_succeeds(fault_stack: FaultStack,
                                                           api_key: str, trained: str) -> None:
    stack = fault_stack
    with stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=auto(trained))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["kind"] == "auto"

        # the worker running a fine-tuning trial that has trained >= 2 of its epochs
        def victim() -> tuple[str, object] | None:
            for worker in stack.live_workers():
                running = worker.running_job()
                if running is None:
                    continue
                trial = next((t for t in trials(client, job_id) if t["id"] == running), None)
                if trial is None or trial["phase"] != "finetune":
                    continue
                epochs = [e for _, e in epoch_pairs(job_events(client, running))]
                if 2 <= len(epochs) <= FINETUNE_EPOCHS - 2:
                    return running, worker
            return None

        killed, worker = wait_until(victim, 240, "a fine-tuning trial with 2+ epochs done",
                                    interval=0.05)
        stack.kill_worker_main(worker)  # type: ignore[arg-type]
        stack.start_worker()

        doc = wait_all(client, [job_id], 300)[job_id]
        assert doc["status"] == "succeeded", (doc.get("error"), stack.dump_logs())
        items = trials(client, job_id)
        again = next(t for t in items if t["id"] == killed)
        assert again["status"] == "succeeded" and again["attempts"] >= 2, again
        phases = [t["phase"] for t in items]
        assert phases.count("screen") == 5 and phases.count("finetune") == 2
        assert phases.count("baseline") == 1 and phases.count("final") == 1
        # each trial's epochs were trained once each: the resume did not repeat an epoch
        epochs = [e for _, e in epoch_pairs(job_events(client, killed))]
        assert sorted(epochs) == list(range(1, FINETUNE_EPOCHS + 1)), epochs

        result = doc["result"]
        assert result["auto"]["winner"]["cost"] <= 30000
        assert result["after"]["params"]["total"] <= 30000
        curves = client.get(f"/v1/jobs/{job_id}/curves").json()["auto"]
        recorded = [t["job_id"] for t in curves["trials"]]
        assert sorted(recorded) == sorted(t["id"] for t in items if t["phase"] != "baseline")
        names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        assert {"frontier.png", "model.safetensors", "report.json"} <= names
        model = client.get(f"/v1/models/{result['model_id']}")
        assert model.status_code == 200 and model.json()["params"]["total"] <= 30000
        # trials are listed under their search, not among the tenant's jobs
        listed = {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]}
        assert job_id in listed and not listed & {t["id"] for t in items}
        assert client.get(f"/v1/jobs/{killed}/trials").status_code == 409


def test_cancel_stops_the_trials(fault_stack: FaultStack, api_key: str, trained: str) -> None:
    stack = fault_stack
    with stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=auto(trained, trials=12))
        job_id = r.json()["id"]
        wait_until(lambda: any(t["phase"] == "screen" and t["status"] == "succeeded"
                               for t in trials(client, job_id)), 180, "a screened trial")
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 202, r.text
        at_cancel = {t["id"] for t in trials(client, job_id)}
        doc = wait_all(client, [job_id], 120)[job_id]
        assert doc["status"] == "canceled", doc
        time.sleep(4)  # a reconciler pass or two: nothing restarts it
        items = trials(client, job_id)
        assert {t["id"] for t in items} == at_cancel, "a trial was started after the cancel"
        assert all(t["status"] in ("succeeded", "failed", "canceled") for t in items), items
        assert any(t["status"] == "canceled" for t in items), items
        assert len([t for t in items if t["phase"] == "screen"]) < 12
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
