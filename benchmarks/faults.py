"""The fault table: what happens to accepted jobs and to API requests when a worker is SIGKILLed
(its Celery main process, or a pool child), when Redis restarts without persistence, and when
PostgreSQL stops for a while — on a stack of its own (PostgreSQL cluster and Redis on free
ports, moto's S3 endpoint, `slimline api`, two Celery workers; the fault suite's servers in
tests/faults/servers.py) with the short reliability settings of the fault tests (heartbeat
timeout 6 s, dispatch grace 3 s, reconciler every 1 s, 3 attempts).

A request trickle (GET /v1/jobs/{id}, GET /v1/jobs, GET /healthz, POST /v1/jobs, 10/s) runs
through every fault. Per fault: jobs accepted / succeeded / failed / lost (not finished within
the bound) / resumed (ran more than once), the answers to DB-backed requests during the fault,
the first 2xx after the fault ended, when the killed job was re-queued and when it resumed
(behind the jobs queued before it), and when every job was done (from the fault's end: the kill,
Redis or PostgreSQL back). For a kill, "during" is the 10 s after it (the API is not involved).

    python -m benchmarks.faults [--jobs 20] [--outage-s 12] [--faults worker_main,...]

Prints a Markdown table; JSON in benchmarks/out/faults.json. About 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import dump_results, run_meta
from tests.faults.servers import (
    FaultStack,
    Trickle,
    job_events,
    kill_mid_job,
    status_events,
    wait_all,
    wait_until,
)

EPOCHS = 8
TRAIN = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
         "steps": [{"op": "train", "epochs": EPOCHS, "batch_size": 64, "max_batches": 15},
                   {"op": "evaluate"}]}
SMALL = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
         "steps": [{"op": "train", "epochs": 1, "batch_size": 64, "max_batches": 10},
                   {"op": "evaluate"}]}
LONG = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "train", "epochs": 16, "batch_size": 64, "max_batches": 15},
                  {"op": "evaluate"}]}
FAULTS = ("worker_main", "pool_child", "redis", "postgres")
DONE_BOUND_S = 300.0


def submit(client: httpx.Client, spec: dict, n: int, seed0: int = 0) -> list[str]:
    ids = []
    for i in range(n):
        r = client.post("/v1/jobs", json=spec | {"seed": seed0 + i})
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids


def parse_ts(value: str | None) -> float | None:
    if not value:
        return None
    ts = datetime.fromisoformat(value)
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def states(client: httpx.Client, ids: list[str]) -> dict[str, int]:
    """How many of `ids` are in each status now."""
    out: dict[str, int] = {}
    for job_id in ids:
        status = client.get(f"/v1/jobs/{job_id}").json()["status"]
        out[status] = out.get(status, 0) + 1
    return out


def outcome(client: httpx.Client, ids: list[str], trickle: Trickle, fault: str,
            t_start: float, t_end: float, wall_end: float,
            victims: dict[str, float] | None = None,
            at_fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row. `t_start`/`t_end`: the fault's monotonic start and end; `wall_end`: its
    end in wall-clock seconds (job timestamps are wall clock); `victims`: killed job id → wall
    time of the kill."""
    def answered_after() -> bool:
        return any(r["t"] >= t_end and r["op"] != "healthz" and r["status"]
                   and 200 <= r["status"] < 300 for r in list(trickle.records))

    with contextlib.suppress(AssertionError):  # reported as no first 2xx
        wait_until(answered_after, 60, "a 2xx after the fault")
    time.sleep(1.0)
    trickle.stop()
    ids = ids + trickle.accepted
    docs = wait_all(client, ids, timeout=DONE_BOUND_S)
    statuses = [docs.get(j, {}).get("status") for j in ids]
    finished = [parse_ts(d.get("finished_at")) for d in docs.values()]
    during = [r for r in trickle.records if t_start <= r["t"] < t_end and r["op"] != "healthz"]
    after_2xx = [r["t"] for r in trickle.records if r["t"] >= t_end and r["op"] != "healthz"
                 and r["status"] and 200 <= r["status"] < 300]
    requeued_after, resumed_after = [], []
    for job_id, killed_at in (victims or {}).items():
        events = job_events(client, job_id)
        for status, out in (("queued", requeued_after), ("resumed", resumed_after)):
            stamps = [parse_ts(e["created_at"]) for e in events
                      if e["kind"] == "status" and e["data"].get("status") == status
                      and parse_ts(e["created_at"]) >= killed_at]
            if stamps:
                out.append(min(stamps) - killed_at)
    resumes = {j: status_events(job_events(client, j)) for j in ids
               if (docs.get(j, {}).get("attempts") or 0) >= 2}
    return {
        "fault": fault,
        "accepted": len(ids),
        "succeeded": statuses.count("succeeded"),
        "failed": statuses.count("failed"),
        "lost": sum(1 for s in statuses if s not in ("succeeded", "failed", "canceled")),
        "resumed": len(resumes),
        "requests_during": len(during),
        "during_503": sum(1 for r in during if r["status"] == 503),
        "during_5xx_not_503": sum(1 for r in during if r["status"] and r["status"] >= 500
                                  and r["status"] != 503),
        "during_no_answer": sum(1 for r in during if r["status"] is None),
        "during_2xx": sum(1 for r in during if r["status"] and 200 <= r["status"] < 300),
        "healthz_not_200": sum(1 for r in trickle.records
                               if r["op"] == "healthz" and r["status"] != 200),
        "first_2xx_after_s": round(min(after_2xx) - t_end, 2) if after_2xx else None,
        "victim_requeued_after_s": round(max(requeued_after), 2) if requeued_after else None,
        "victim_resumed_after_s": round(max(resumed_after), 2) if resumed_after else None,
        "all_done_after_s": (round(max(f for f in finished if f) - wall_end, 1)
                             if all(finished) and finished else None),
        "at_fault": at_fault or {},
        "counts_whole_run": trickle.counts(),
        "errors": {j: docs[j].get("error") for j in ids if docs.get(j, {}).get("error")},
    }


def fault_kill(stack: FaultStack, key: str, n_jobs: int, main: bool) -> dict[str, Any]:
    fault = (f"worker main process SIGKILL ({n_jobs} jobs)" if main
             else f"worker pool child SIGKILL ({n_jobs} jobs)")
    with stack.client(key) as client:
        ids = submit(client, TRAIN, n_jobs)
        trickle = Trickle(stack.url, key, ids, SMALL, rate=10.0, max_s=DONE_BOUND_S + 120,
                          max_posted=5)
        trickle.start()
        kill: Callable = stack.kill_worker_main if main else stack.kill_pool_child
        at: dict[str, float] = {}

        def timed(worker) -> None:
            at["t"], at["wall"] = time.monotonic(), time.time()
            kill(worker)

        victim, _, _ = kill_mid_job(client, stack.live_workers(), timed, EPOCHS)
        if main:
            stack.start_worker()
        # the API is not part of this fault: "during" is the 10 s after the kill
        return outcome(client, ids, trickle, fault, at["t"], at["t"] + 10.0, at["wall"],
                       {victim: at["wall"]})


def fault_redis(stack: FaultStack, key: str, n_jobs: int) -> dict[str, Any]:
    with stack.client(key) as client:
        # every worker busy with a job that outlasts the fault (canceled once Redis is back),
        # so the others surely wait in Redis when it dies
        blockers = submit(client, TRAIN | {"steps": [TRAIN["steps"][0] | {"epochs": 200}]},
                          len(stack.live_workers()), 500)
        wait_until(lambda: all(client.get(f"/v1/jobs/{j}").json()["status"] == "running"
                               for j in blockers), 90, "every worker busy")
        ids = submit(client, SMALL, n_jobs)
        trickle = Trickle(stack.url, key, ids, SMALL, rate=10.0, max_s=DONE_BOUND_S + 120,
                          max_posted=5)
        trickle.start()
        time.sleep(1.0)
        at_fault = {"jobs": states(client, ids), "redis": stack.redis.queue_lengths()}
        t0 = time.monotonic()
        stack.redis.kill()
        time.sleep(3.0)
        stack.redis.start()
        wall = time.time()
        t1 = time.monotonic()
        for job_id in blockers:
            client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        return outcome(client, ids, trickle,
                       f"Redis restarted, no persistence ({n_jobs} queued, 3 s down)",
                       t0, t1, wall, at_fault=at_fault)


def fault_postgres(stack: FaultStack, key: str, n_jobs: int, outage_s: float
                   ) -> dict[str, Any]:
    with stack.client(key) as client:
        ids = submit(client, LONG, 1, 700) + submit(client, SMALL, n_jobs)
        wait_until(lambda: client.get(f"/v1/jobs/{ids[0]}").json()["status"] == "running", 90,
                   "the long job to run")
        trickle = Trickle(stack.url, key, ids, SMALL, rate=10.0, max_s=DONE_BOUND_S + 120,
                          max_posted=5)
        trickle.start()
        time.sleep(2.0)
        at_fault = {"jobs": states(client, ids)}
        t0 = time.monotonic()
        stack.pg.stop("fast")
        time.sleep(outage_s)
        stack.pg.start()
        wall = time.time()
        t1 = time.monotonic()
        return outcome(client, ids, trickle,
                       f"PostgreSQL stopped {outage_s:.0f} s ({n_jobs + 1} jobs, 1 running)",
                       t0, t1, wall, at_fault=at_fault)


def table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else str(v)

    head = ("| fault | accepted | succeeded | failed | lost | resumed | DB-backed answers during "
            "the fault | 5xx ≠ 503 | first 2xx after (s) | killed job re-queued / resumed "
            "after (s) | all jobs done after (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        jobs = r["at_fault"].get("jobs")
        label = r["fault"] + (" — at the fault: " + ", ".join(
            f"{n} {s}" for s, n in sorted(jobs.items())) if jobs else "")
        during = (f"{r['requests_during']}: {r['during_2xx']} 2xx, {r['during_503']} 503"
                  + (f", {r['during_no_answer']} no answer" if r["during_no_answer"] else ""))
        lines.append(f"| {label} | {r['accepted']} | {r['succeeded']} | {r['failed']} | "
                     f"{r['lost']} | {r['resumed']} | {during} | {r['during_5xx_not_503']} | "
                     f"{cell(r['first_2xx_after_s'])} | {cell(r['victim_requeued_after_s'])} / "
                     f"{cell(r['victim_resumed_after_s'])} | "
                     f"{cell(r['all_done_after_s'])} |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs in flight for a kill")
    parser.add_argument("--queued", type=int, default=10, help="queued jobs for Redis/PG")
    parser.add_argument("--outage-s", type=float, default=12.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/faults.json"))
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slimline-faults-bench-") as tmp:
        stack = FaultStack.start(Path(tmp), workers=args.workers)
        try:
            for fault in faults:
                key = stack.create_key(f"bench-{fault}", f"bench-{fault}")
                if fault == "worker_main":
                    row = fault_kill(stack, key, args.jobs, main=True)
                elif fault == "pool_child":
                    row = fault_kill(stack, key, args.queued, main=False)
                elif fault == "redis":
                    row = fault_redis(stack, key, args.queued)
                else:
                    row = fault_postgres(stack, key, args.queued, args.outage_s)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                stack.heal()
                stack.wait_workers_ready()
        except BaseException:
            print(stack.dump_logs(3000))
            raise
        finally:
            stack.close()
    runtime = time.monotonic() - started
    md = table(rows)
    meta = run_meta(args, complete=len(rows) == len(faults), runtime=runtime,
                    workers=args.workers, settings={
                        k: v for k, v in stack.env.items()
                        if k.startswith("SLIMLINE_") and k.endswith(("_S", "_ATTEMPTS"))})
    dump_results(args.out, meta, {r["fault"]: {k: r[k] for k in (
        "accepted", "succeeded", "failed", "lost", "resumed")} for r in rows}, rows, md)
    print(md)
    print(f"\n{runtime:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
