"""Redis restarted without persistence while jobs sit queued (their messages are gone with it):
the reconciler re-sends every queued job after `dispatch_grace_s`, so none is lost; a job
submitted while Redis is down is accepted (202), stays queued and runs once Redis is back."""
from __future__ import annotations

import time

import pytest

from tests.faults.servers import (
    FaultStack,
    job_events,
    status_events,
    summary,
    wait_all,
    wait_until,
)

pytestmark = pytest.mark.service

WORKERS = 1
# the worker is busy with this one while the others wait in Redis; canceled once Redis is back
BLOCKER = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
           "steps": [{"op": "train", "epochs": 200, "batch_size": 64, "max_batches": 15}]}
SMALL = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
         "steps": [{"op": "train", "epochs": 1, "batch_size": 64, "max_batches": 10},
                   {"op": "evaluate"}]}
N_QUEUED = 8


def test_redis_restart_loses_no_queued_job(fault_stack: FaultStack, api_key: str) -> None:
    stack = fault_stack
    with stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=BLOCKER)
        assert r.status_code == 202, r.text
        blocker = r.json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{blocker}").json()["status"] == "running", 60,
                   "the blocking job to run")
        ids = []
        for i in range(N_QUEUED):
            r = client.post("/v1/jobs", json=SMALL | {"seed": i})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        wait_until(lambda: sum(stack.redis.queue_lengths().values()) >= N_QUEUED, 10,
                   "the jobs' messages in Redis")
        before = {j: client.get(f"/v1/jobs/{j}").json()["status"] for j in [blocker, *ids]}
        assert before[blocker] == "running" and \
            all(before[j] == "queued" for j in ids), before

        # Redis dies with every message; a job submitted meanwhile is still accepted
        stack.redis.kill()
        t_down = time.monotonic()
        r = client.post("/v1/jobs", json=SMALL | {"seed": 100})
        assert r.status_code == 202, (
            f"POST /v1/jobs while Redis is down answered {r.status_code} (expected 202, the "
            f"job kept queued until the broker is back): {r.text}")
        during = r.json()["id"]
        ids.append(during)
        doc = client.get(f"/v1/jobs/{during}").json()
        assert doc["status"] == "queued", doc
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t_down)))
        stack.redis.start()
        assert sum(stack.redis.queue_lengths().values()) == 0  # restarted empty: messages lost
        r = client.post(f"/v1/jobs/{blocker}/cancel")
        assert r.status_code == 202, r.text

        docs = wait_all(client, [blocker, *ids], timeout=150)
        assert docs[blocker]["status"] == "canceled", summary(docs, [blocker])
        lost = [j for j in ids if docs.get(j, {}).get("status") != "succeeded"]
        assert not lost, (f"{len(lost)}/{len(ids)} jobs did not succeed after the Redis "
                          f"restart:\n{summary(docs, ids)}")
        for job_id in ids:
            statuses = [s.get("status") for s in status_events(job_events(client, job_id))]
            assert statuses[0] == "queued" and statuses[-1] == "succeeded", (job_id, statuses)
