"""A job's fixed overhead: the wall time of a trivial job (one `evaluate` of a tiny MLP on
synthetic-tiny) minus its compute, on the embedded default (`slimline up`: SQLite, Celery's
filesystem transport, local store) and on the full stack (PostgreSQL, Redis, an S3 endpoint,
`slimline api` + `slimline worker`), split into its parts from the job's own status and
progress events:

* queue pickup — the job's `created_at` (API commit) to its `started_at` (the worker's claim);
* start-up — claim to the first progress write (settings, store, reading the job row);
* inputs — building/fetching the model and loading the dataset;
* before — measuring the input model (params, MACs, test accuracy);
* compute — the evaluate step itself;
* finish — rendering plots, saving the model, storing objects, the final transaction;
* client — what a client polling every 20 ms sees, POST to terminal status.

    python -m benchmarks.job_overhead [--jobs 10] [--stacks embedded,full]

Needs PostgreSQL on 127.0.0.1:5432 (database `test`) and Redis on 6379 for the full stack.
Prints a Markdown table; JSON in benchmarks/out/job_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

from benchmarks.common import dump_results, run_meta
from tests.stack.conftest import REPO, SLIMLINE, free_port, spawn, stop, wait_ready

SPEC = {"model": {"arch": {"name": "mlp", "input_shape": [1, 8, 8], "widths": [16]}},
        "dataset": "synthetic-tiny", "steps": [{"op": "evaluate"}]}
PARTS = ("queue_pickup", "startup", "inputs", "before", "compute", "finish")


@contextmanager
def embedded_stack():
    with TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
        port = free_port()
        proc = spawn([SLIMLINE, "up", "--home", f"{tmp}/home", "--host", "127.0.0.1",
                      "--port", str(port)], env, Path(tmp) / "up.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, [proc], timeout=120)
            yield url, {}
        finally:
            stop(proc)


@contextmanager
def full_stack():
    import subprocess

    import boto3
    import psycopg
    from moto.server import ThreadedMotoServer

    name = f"slimline_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port)
    s3.start()
    procs = []
    with TemporaryDirectory() as tmp:
        try:
            endpoint = f"http://127.0.0.1:{s3_port}"
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x",
                         aws_secret_access_key="x", region_name="us-east-1"
                         ).create_bucket(Bucket="bench")
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
            env.update({"SLIMLINE_HOME": f"{tmp}/home",
                        "SLIMLINE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                        "SLIMLINE_BROKER_URL": "redis://127.0.0.1:6379/15",
                        "SLIMLINE_STORAGE_URL": "s3://bench/objects",
                        "SLIMLINE_S3_ENDPOINT_URL": endpoint, "SLIMLINE_AUTH": "off",
                        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                        "AWS_DEFAULT_REGION": "us-east-1"})
            subprocess.run([SLIMLINE, "db", "upgrade"], env=env, cwd=REPO, check=True,
                           capture_output=True)
            port = free_port()
            procs = [spawn([SLIMLINE, "api", "--port", str(port)], env, Path(tmp) / "api.log"),
                     spawn([SLIMLINE, "worker", "--queues", "cpu,gpu"], env,
                           Path(tmp) / "worker.log")]
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, procs, timeout=120)
            yield url, {}
        finally:
            for p in procs:
                stop(p)
            s3.stop()
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test",
                                 autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["created_at"]).timestamp()


def parts_of(client: httpx.Client, job: dict) -> dict[str, float]:
    """The parts from the job's timestamps and its progress events (stage names as the runner
    writes them; works on older versions of the service too)."""
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"format": "json"}).json()["items"]
    stage: dict[str, float] = {}
    for e in events:
        if e["kind"] == "progress":
            stage.setdefault(e["data"]["stage"], ts(e))
    first = min(stage.values())
    loading = stage["loading model"]
    measuring = stage["measuring the input model"]
    step_start = stage["evaluate"]
    step_done = stage["evaluate done (1/1)"]
    created, started, finished = (datetime.fromisoformat(job[k]).timestamp()
                                  for k in ("created_at", "started_at", "finished_at"))
    return {"queue_pickup": started - created, "startup": first - started,
            "inputs": measuring - loading, "before": step_start - measuring,
            "compute": step_done - step_start, "finish": finished - step_done}


def measure(url: str, jobs: int) -> dict:
    rows = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(jobs + 1):
            started = time.perf_counter()
            job = client.post("/v1/jobs", json=SPEC).json()
            while True:
                job = client.get(f"/v1/jobs/{job['id']}").json()
                if job["status"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.02)
            client_s = time.perf_counter() - started
            assert job["status"] == "succeeded", job
            if i == 0:
                continue  # the first job warms the worker (imports, caches)
            rows.append(parts_of(client, job) | {"client": client_s})
    return {k: statistics.median(r[k] for r in rows) for k in (*PARTS, "client")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--stacks", default="embedded,full")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/job_overhead.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    results = {}
    for name in args.stacks.split(","):
        stack = embedded_stack if name == "embedded" else full_stack
        with stack() as (url, _):
            results[name] = measure(url, args.jobs)
    lines = ["| stack | " + " | ".join(PARTS) + " | overhead (client − compute) | client |",
             "|---|" + "---|" * (len(PARTS) + 2)]
    for name, r in results.items():
        cells = " | ".join(f"{1000 * r[p]:.0f} ms" for p in PARTS)
        lines.append(f"| {name} | {cells} | {1000 * (r['client'] - r['compute']):.0f} ms | "
                     f"{1000 * r['client']:.0f} ms |")
    meta = run_meta(args, complete=True, runtime=time.perf_counter() - began)
    print(dump_results(args.out, meta, results, [], "\n".join(lines)))
    print(f"\nmedian of {args.jobs} jobs after one warm-up; "
          f"{meta['processor'] or meta['platform']}, {meta['date_utc']}")


if __name__ == "__main__":
    main()
