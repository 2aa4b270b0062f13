"""SIGKILL a worker mid-job — its Celery main process, then a pool child — with 10 jobs in
flight: every job succeeds, the killed ones resume from their last checkpoint on another process,
and no epoch is counted twice. A job whose worker dies on every attempt fails after
`job_max_attempts` runs with a clear error."""
from __future__ import annotations

from collections import Counter

import pytest

from tests.faults.servers import (
    FaultStack,
    epoch_pairs,
    job_events,
    kill_mid_job,
    status_events,
    summary,
    wait_all,
    wait_until,
)

pytestmark = pytest.mark.service

WORKERS = 2
EPOCHS = 8
# a few seconds per job on 2 cores: 8 short epochs (15 batches each), then an evaluate step
SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "train", "epochs": EPOCHS, "batch_size": 64, "max_batches": 15},
                  {"op": "evaluate"}]}
N_JOBS = 10


def assert_resumed(doc: dict, events: list[dict], killed_after: int) -> None:
    """The job ran again (attempts >= 2) and resumed inside its train step, from a checkpoint
    taken after at least one epoch (not from scratch)."""
    assert doc.get("attempts", 0) >= 2, f"attempts {doc.get('attempts')!r}, expected >= 2: {doc}"
    resumes = (doc.get("result") or {}).get("resumes")
    assert resumes, f"result.resumes missing or empty: {doc.get('result')}"
    first = resumes[0]
    assert {"attempt", "step", "epoch"} <= set(first), first
    assert first["attempt"] >= 2 and first["step"] == 0, resumes
    assert 1 <= first["epoch"] <= killed_after, (
        f"resumed at epoch {first['epoch']}, expected 1..{killed_after} (the epochs done when "
        f"the worker was killed): {resumes}")
    statuses = status_events(events)
    assert any(s.get("status") == "queued" for s in statuses[1:]), (
        f"no status event 'queued' after the job was running (the reconciler's re-queue): "
        f"{statuses}")
    resumed = [s for s in statuses if s.get("status") == "resumed"]
    assert resumed, f"no status event 'resumed': {statuses}"
    assert resumed[0].get("attempt") == first["attempt"] and resumed[0].get("step") == 0 \
        and resumed[0].get("epoch") == first["epoch"], (resumed, resumes)


def assert_counted_once(job_id: str, doc: dict, events: list[dict]) -> None:
    pairs = epoch_pairs(events)
    twice = {p: n for p, n in Counter(pairs).items() if n > 1}
    assert not twice, f"job {job_id}: epoch events counted twice {twice}"
    assert sorted(pairs) == [(0, e) for e in range(1, EPOCHS + 1)], (job_id, pairs)
    result = doc["result"]
    assert [s["op"] for s in result["steps"]] == ["train", "evaluate"], result["steps"]
    history = [h["epoch"] for h in result["steps"][0]["history"]]
    assert history == list(range(1, EPOCHS + 1)), f"job {job_id}: train history {history}"


def test_sigkill_worker_main_and_pool_child(fault_stack: FaultStack, api_key: str) -> None:
    stack = fault_stack
    with stack.client(api_key) as client:
        ids = []
        for i in range(N_JOBS):
            r = client.post("/v1/jobs", json=SPEC | {"seed": i})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

        # 1. the Celery main process of worker1 (its pool child dies with it), then a new worker
        first = stack.live_workers()[0]
        victim1, _, done1 = kill_mid_job(client, [first], stack.kill_worker_main, EPOCHS,
                                         among=ids)
        assert first.proc.poll() is not None and not first.pool_pids()
        stack.start_worker()
        stack.wait_workers_ready()

        # 2. a pool child of a live worker: its main process stays up and forks a new child
        victim2, second, done2 = kill_mid_job(client, stack.live_workers(),
                                              stack.kill_pool_child, EPOCHS, {victim1},
                                              among=ids)

        docs = wait_all(client, ids, timeout=240)
        assert all(docs.get(j, {}).get("status") == "succeeded" for j in ids), (
            f"not every job succeeded:\n{summary(docs, ids)}")
        events = {j: job_events(client, j) for j in ids}
        for job_id, done in ((victim1, done1), (victim2, done2)):
            assert_resumed(docs[job_id], events[job_id], done)
        for job_id in ids:
            assert_counted_once(job_id, docs[job_id], events[job_id])
            statuses = [s.get("status") for s in status_events(events[job_id])]
            assert statuses[0] == "queued" and "running" in statuses \
                and statuses[-1] == "succeeded", (job_id, statuses)
        print(f"killed {first.name} (main) in job {victim1} after epoch {done1}, "
              f"{second.name}'s pool child in job {victim2} after epoch {done2}:\n"
              + summary(docs, [victim1, victim2]))
        assert second.proc.poll() is None, f"{second.name} died with its pool child"
        assert second.pool_pids(), f"{second.name} did not fork a new pool child"


def test_job_fails_after_max_attempts(fault_stack: FaultStack, api_key: str) -> None:
    """Kill the pool child running the job on every attempt: after job_max_attempts (3) runs
    the job fails with a clear error instead of running forever."""
    stack = fault_stack
    max_attempts = int(stack.env["SLIMLINE_JOB_MAX_ATTEMPTS"])
    with stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=SPEC | {"seed": 99})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        for attempt in range(1, max_attempts + 1):
            worker = wait_until(
                lambda a=attempt: next((w for w in stack.live_workers()
                                        if w.running() == (job_id, a)), None),
                60, f"attempt {attempt} of job {job_id} to start")
            stack.kill_pool_child(worker)
        doc = wait_all(client, [job_id], timeout=60)[job_id]
        assert doc["status"] == "failed", doc
        assert doc["attempts"] == max_attempts, doc
        error = doc["error"] or {}
        assert error.get("code") and error.get("code") != "InternalError", error
        assert "attempt" in error.get("message", "").lower(), error
        statuses = [s.get("status") for s in status_events(job_events(client, job_id))]
        assert statuses[-1] == "failed", statuses
