"""PostgreSQL stopped for ~10 s under a request trickle, with jobs queued and running: the API
answers 503 + Retry-After (never 500) to every DB-backed request and 200 to /healthz, the running
job keeps computing, idle workers do not swallow queued messages, and once PostgreSQL is back
everything recovers — no process restarted, no job lost."""
from __future__ import annotations

import time

import pytest

from tests.faults.servers import FaultStack, Trickle, summary, wait_all, wait_until

pytestmark = pytest.mark.service

WORKERS = 2
OUTAGE_S = 10.0
# runs through the outage on one worker (its progress writes fail meanwhile)
LONG = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "train", "epochs": 16, "batch_size": 64, "max_batches": 15},
                  {"op": "evaluate"}]}
SMALL = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
         "steps": [{"op": "train", "epochs": 1, "batch_size": 64, "max_batches": 10},
                   {"op": "evaluate"}]}
N_SMALL = 8


def test_postgres_outage_gives_503_and_recovers(fault_stack: FaultStack, api_key: str) -> None:
    stack = fault_stack
    workers = stack.live_workers()
    pids = {"api": stack.api.pid, **{w.name: w.pid for w in workers}}
    with stack.client(api_key) as client:
        r = client.post("/v1/jobs", json=LONG)
        assert r.status_code == 202, r.text
        long_id = r.json()["id"]
        ids = [long_id]
        for i in range(N_SMALL):
            r = client.post("/v1/jobs", json=SMALL | {"seed": i})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        wait_until(lambda: client.get(f"/v1/jobs/{long_id}").json()["status"] == "running", 60,
                   "the long job to run")

        trickle = Trickle(stack.url, api_key, ids, SMALL, rate=10.0, max_s=120)
        trickle.start()
        try:
            time.sleep(2.0)
            before = {j: client.get(f"/v1/jobs/{j}").json()["status"] for j in ids}
            assert before[long_id] == "running", before
            assert "queued" in before.values(), f"no job left queued at the outage: {before}"
            t_stop = time.monotonic()
            stack.pg.stop("fast")
            time.sleep(OUTAGE_S)
            stack.pg.start()
            t_back = time.monotonic()

            def answered_2xx() -> bool:
                return any(rec["t"] >= t_back and rec["op"] != "healthz" and rec["status"]
                           and 200 <= rec["status"] < 300 for rec in trickle.records)

            wait_until(answered_2xx, 30, "a 2xx to a DB-backed request after PostgreSQL is back")
            recovered_s = min(rec["t"] for rec in trickle.records
                              if rec["t"] >= t_back and rec["op"] != "healthz"
                              and rec["status"] and 200 <= rec["status"] < 300) - t_back
            time.sleep(2.0)
        finally:
            trickle.stop()

        during = trickle.counts(t_stop, t_back)
        everything = trickle.counts()
        message = (f"answers during the outage {during}; over the whole run {everything}; "
                   f"healthz {trickle.counts(ops=('healthz',))}")
        bad = [rec for rec in trickle.records
               if rec["status"] is None or rec["status"] >= 500 and rec["status"] != 503]
        assert not bad, f"{len(bad)} answers were 5xx other than 503, or none: {bad[:5]}; " \
            + message
        no_retry = [rec for rec in trickle.records if rec["status"] == 503
                    and not rec["retry_after"]]
        assert not no_retry, f"503 without Retry-After: {no_retry[:5]}; " + message
        assert any(rec["status"] == 503 for rec in trickle.records
                   if t_stop <= rec["t"] < t_back), "no 503 during the outage; " + message
        unhealthy = [rec for rec in trickle.records if rec["op"] == "healthz"
                     and rec["status"] != 200]
        assert not unhealthy, f"/healthz answered {unhealthy[:5]}; " + message
        assert recovered_s < 15, f"first 2xx {recovered_s:.1f} s after PostgreSQL was back"

        ids += trickle.accepted
        docs = wait_all(client, ids, timeout=150)
        lost = [j for j in ids if docs.get(j, {}).get("status") != "succeeded"]
        assert not lost, f"{len(lost)}/{len(ids)} jobs did not succeed:\n{summary(docs, ids)}"
        # the job that ran through the outage kept computing: same attempt, not re-run
        assert docs[long_id].get("attempts") == 1, (
            f"the job running during the outage was not finished by its first attempt: "
            f"{summary(docs, [long_id])}")
    alive = {"api": stack.api, **{w.name: w.proc for w in workers}}
    exited = {n: p.returncode for n, p in alive.items() if p.poll() is not None}
    assert not exited, f"processes exited: {exited}"
    assert stack.api.pid == pids["api"] and stack.live_workers() == workers
    print(f"recovered {recovered_s:.2f} s after PostgreSQL restart; {message}")
