"""Servers of the fault-injection suite, each on a free port and stopped by PID: a PostgreSQL
cluster of its own (initdb into a temp dir, run as the `postgres` OS user when we are root), a
Redis server without persistence, moto's S3 endpoint, `slimline api` and Celery workers — plus
the helpers that find a worker's pool children and SIGKILL them.

Nothing here touches the machine's own PostgreSQL (5432) or Redis (6379)."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.stack.conftest import REPO, SLIMLINE, free_port, spawn, stop, wait_ready

TERMINAL = frozenset({"succeeded", "failed", "canceled"})

# short reliability settings: a lost worker is noticed after 6 s, a lost message after 3 s
RELIABILITY_ENV = {
    "SLIMLINE_JOB_HEARTBEAT_TIMEOUT_S": "6",
    "SLIMLINE_DISPATCH_GRACE_S": "3",
    "SLIMLINE_RECONCILE_INTERVAL_S": "1",
    "SLIMLINE_SEARCH_TICK_S": "3",
    "SLIMLINE_JOB_MAX_ATTEMPTS": "3",
    "SLIMLINE_AUTH": "on",
}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned); AssertionError after
    `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---- processes ----

def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out.extend(int(p) for p in Path(path).read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return sorted(set(out))


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# ---- PostgreSQL ----

def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")
             if Path(p, "initdb").exists() and Path(p, "pg_ctl").exists()]
    if not found:
        return None
    return max(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])


def redis_bin() -> str | None:
    return shutil.which("redis-server")


class PostgresServer:
    """A throwaway cluster: `init()`, `start()`, `stop(mode)`, `start()` again on the same port and
    data directory. Trust auth on 127.0.0.1; fsync off."""

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        # a directory under /tmp (not pytest's 0700 tmp tree) so the postgres user can reach it
        self.root = Path(tempfile.mkdtemp(prefix="slimline-faults-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str, timeout: float = 120, check: bool = True
             ) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=self.root, stdin=subprocess.DEVNULL, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n"
                               f"{out.stderr}\n{self.log_tail()}")
        return out

    def init(self) -> None:
        self.sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N",
                  "-E", "UTF8", "--locale=C")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast|immediate`; SIGKILL of the postmaster if that does not work."""
        out = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop",
                        check=False)
        pid = self.pid()
        if out.returncode != 0 and pid is not None and pid_alive(pid):
            sigkill(pid)
            wait_until(lambda: not pid_alive(pid), 10, "the postmaster to die")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and pid_alive(pid)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(driver="postgresql"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# ---- Redis ----

class RedisServer:
    """`redis-server --save '' --appendonly no` on a free port: a restart loses every message."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="slimline-faults-redis-"))
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        fh = open(self.log, "ab")  # noqa: SIM115 - closed when the process ends
        self.proc = subprocess.Popen(
            [redis_bin() or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.root)],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        fh.close()
        wait_until(self.ping, 20, f"redis on port {self.port}")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port,
                                    socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL the server (everything in it is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            sigkill(self.proc.pid)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def queue_lengths(self) -> dict[str, int]:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        return {q: int(r.llen(q)) for q in ("cpu", "gpu")}

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


# ---- the whole stack ----

@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        """The Celery main process (`slimline worker` exec's celery, so the same pid)."""
        return self.proc.pid

    def pool_pids(self) -> list[int]:
        return [p for p in child_pids(self.pid) if pid_alive(p)]

    def running(self) -> tuple[str, int] | None:
        """(job id, attempt) of the run this worker's log says it started last and has not
        finished (nor lost with its pool process)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        started = list(re.finditer(r"job (\w+): attempt (\d+) started", text))
        if not started:
            return None
        job_id, attempt = started[-1].group(1), int(started[-1].group(2))
        tail = text[started[-1].end():]
        if re.search(rf"job {job_id}: (succeeded|failed|canceled)", tail) or \
                "exited with 'signal" in tail or "WorkerLostError" in tail:
            return None
        return job_id, attempt

    def running_job(self) -> str | None:
        run = self.running()
        return run[0] if run else None


@dataclass
class FaultStack:
    """Own PostgreSQL + Redis + S3 endpoint, `slimline api` and Celery workers."""

    pg: PostgresServer
    redis: RedisServer
    s3_url: str
    home: Path
    env: dict[str, str]
    url: str = ""
    api: subprocess.Popen | None = None
    workers: list[Worker] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    _moto: Any = None
    _count: int = 0

    @classmethod
    def start(cls, home: Path, workers: int = 1, extra_env: dict[str, str] | None = None
              ) -> FaultStack:
        import boto3
        from moto.server import ThreadedMotoServer

        bindir = postgres_bin()
        assert bindir is not None, "no PostgreSQL binaries under /usr/lib/postgresql/*/bin"
        pg = PostgresServer(bindir)
        rds = RedisServer()
        s3_port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
        stack = cls(pg=pg, redis=rds, s3_url=f"http://127.0.0.1:{s3_port}", home=home, env={},
                    _moto=moto)
        try:
            pg.init()
            pg.start()
            database = pg.create_database(f"slimline_faults_{uuid.uuid4().hex[:8]}")
            rds.start()
            moto.start()
            bucket = f"slimline-faults-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=stack.s3_url, aws_access_key_id="testing",
                         aws_secret_access_key="testing",
                         region_name="us-east-1").create_bucket(Bucket=bucket)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
            env.update({
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "SLIMLINE_HOME": str(home),
                "SLIMLINE_DATABASE_URL": database,
                "SLIMLINE_BROKER_URL": rds.url,
                "SLIMLINE_STORAGE_URL": f"s3://{bucket}/objects",
                "SLIMLINE_S3_ENDPOINT_URL": stack.s3_url,
                "SLIMLINE_WORKER_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                **RELIABILITY_ENV,
                **(extra_env or {}),
            })
            stack.env = env
            subprocess.run([SLIMLINE, "db", "upgrade"], cwd=REPO, env=env, check=True,
                           timeout=120, capture_output=True)
            for _ in range(workers):  # they import torch while the API starts
                stack.start_worker()
            stack.start_api()
            stack.wait_workers_ready()
        except BaseException:
            print(stack.dump_logs())
            stack.close()
            raise
        return stack

    # -- processes --

    def start_api(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = self.home / "api.log"
        self.logs.append(log)
        self.api = spawn([SLIMLINE, "api", "--host", "127.0.0.1", "--port", str(port)],
                         self.env, log)
        wait_ready(self.url, [self.api])

    def start_worker(self) -> Worker:
        self._count += 1
        name = f"worker{self._count}"
        log = self.home / f"{name}.log"
        self.logs.append(log)
        proc = spawn([SLIMLINE, "worker", "--queues", "cpu,gpu"],
                     self.env, log)
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def wait_workers_ready(self, timeout: float = 90) -> None:
        """Every live worker has a pool child and has logged that it is ready."""
        def ready() -> bool:
            for w in self.live_workers():
                text = w.log.read_text(errors="replace") if w.log.exists() else ""
                if "ready." not in text or not w.pool_pids():
                    return False
            return True

        wait_until(ready, timeout, "the workers to be ready", interval=0.5)

    def kill_worker_main(self, worker: Worker) -> list[int]:
        """SIGKILL the Celery main process; its pool children die with it (prefork sets
        PDEATHSIG); returns their pids (waited for)."""
        children = worker.pool_pids()
        sigkill(worker.pid)
        worker.proc.wait(timeout=10)
        for pid in children:
            wait_until(lambda p=pid: not pid_alive(p), 15, f"pool child {pid} to die")
        return children

    def kill_pool_child(self, worker: Worker) -> int:
        pids = worker.pool_pids()
        assert pids, f"{worker.name} has no pool child"
        sigkill(pids[0])
        wait_until(lambda: not pid_alive(pids[0]), 15, f"pool child {pids[0]} to die")
        return pids[0]

    def stop_workers(self) -> None:
        for w in self.workers:
            stop(w.proc)

    def heal(self) -> None:
        """Start PostgreSQL or Redis again if a fault left them down; the API must be alive
        and ready."""
        if not self.pg.running():
            self.pg.start()
        if not self.redis.ping():
            self.redis.start()
        assert self.api is not None and self.api.poll() is None, \
            f"the API exited ({self.api.returncode if self.api else None})"
        wait_ready(self.url, [self.api], timeout=60)

    # -- HTTP --

    def client(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def create_key(self, name: str, tenant: str) -> str:
        out = subprocess.run(
            [SLIMLINE, "keys", "create", "--name", name, "--tenant", tenant],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip().splitlines()[-1].strip()

    # -- teardown --

    def dump_logs(self, chars: int = 8000) -> str:
        parts = [f"==== {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                 for p in self.logs if p.exists()]
        parts.append(f"==== postgres.log\n{self.pg.log_tail(chars)}")
        return "\n".join(parts)

    def close(self) -> None:
        for w in self.workers:
            stop(w.proc)
        if self.api is not None:
            stop(self.api)
        with contextlib.suppress(Exception):  # moto may not have started
            self._moto.stop()
        self.redis.close()
        self.pg.close()


# ---- jobs over HTTP ----

def job_events(client: httpx.Client, job_id: str) -> list[dict]:
    r = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json"})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def epoch_pairs(events: list[dict]) -> list[tuple[int, int]]:
    return [(e["data"].get("step"), e["data"].get("epoch")) for e in events
            if e["kind"] == "epoch"]


def status_events(events: list[dict]) -> list[dict]:
    return [e["data"] for e in events if e["kind"] == "status"]


def kill_mid_job(client: httpx.Client, workers: list[Worker], kill: Callable[[Worker], Any],
                 epochs: int, exclude: frozenset[str] | set[str] = frozenset(),
                 timeout: float = 120, among: Collection[str] | None = None
                 ) -> tuple[str, Worker, int]:
    """Wait until one of `workers` runs a job (of `among` when given — the test's own, not a
    job another module left in the queue — and not in `exclude`) whose first step (a train
    step of `epochs` epochs) has 2..epochs-2 epochs done — so its checkpoint after epoch 1 is
    stored and training is not about to end — then `kill(worker)`. Returns (job id, worker,
    epochs done when killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            job_id = worker.running_job()
            if job_id is None or job_id in exclude or (among is not None
                                                       and job_id not in among):
                continue
            done = [e for s, e in epoch_pairs(job_events(client, job_id)) if s == 0]
            if len(done) >= 2 and max(done) <= epochs - 2:
                kill(worker)
                return job_id, worker, max(done)
        time.sleep(0.05)
    raise AssertionError(f"no job reached epochs 2..{epochs - 2} on "
                         f"{[w.name for w in workers]} within {timeout} s")


def wait_all(client: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll until every job is terminal (bounded); {id: job document}. Transient errors (the
    service may be recovering) are retried until the deadline."""
    docs: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in ids:
            if docs.get(job_id, {}).get("status") in TERMINAL:
                continue
            try:
                r = client.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                docs[job_id] = r.json()
        if all(docs.get(j, {}).get("status") in TERMINAL for j in ids):
            return docs
        time.sleep(0.5)
    return docs


def summary(docs: dict[str, dict], ids: list[str]) -> str:
    """A one-line-per-job account for assertion messages."""
    lines = []
    for job_id in ids:
        d = docs.get(job_id) or {}
        lines.append(json.dumps({"id": job_id, "status": d.get("status"),
                                 "attempts": d.get("attempts"), "stage": d.get("stage"),
                                 "error": d.get("error"),
                                 "resumes": (d.get("result") or {}).get("resumes")}))
    return "\n".join(lines)


class Trickle(threading.Thread):
    """A steady request trickle in a thread (bounded: at most `max_s` seconds): GET
    /v1/jobs/{id}, GET /v1/jobs, GET /healthz and POST /v1/jobs in turn, at `rate` requests/s
    (POSTs turn into GETs once `max_posted` jobs were accepted).
    Every answer is kept in `records` as {t, op, status, retry_after} (status None: no answer);
    ids of jobs a POST got accepted (202) are in `accepted`."""

    OPS = ("get_job", "list", "healthz", "get_job", "post")

    def __init__(self, url: str, key: str, job_ids: list[str], post_spec: dict,
                 rate: float = 10.0, max_s: float = 180.0, max_posted: int = 1000) -> None:
        super().__init__(name="trickle", daemon=True)
        self.url, self.key, self.job_ids, self.post_spec = url, key, job_ids, post_spec
        self.rate, self.max_s, self.max_posted = rate, max_s, max_posted
        self.records: list[dict[str, Any]] = []
        self.accepted: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def run(self) -> None:
        start = time.monotonic()
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as client:
            i = 0
            while not self._halt.is_set() and time.monotonic() - start < self.max_s:
                op = self.OPS[i % len(self.OPS)]
                if op == "post" and len(self.accepted) >= self.max_posted:
                    op = "get_job"  # enough jobs accepted: keep the rate, add no more work
                t = time.monotonic()
                try:
                    if op == "get_job":
                        r = client.get(f"/v1/jobs/{self.job_ids[i % len(self.job_ids)]}")
                    elif op == "list":
                        r = client.get("/v1/jobs", params={"limit": 20})
                    elif op == "healthz":
                        r = client.get("/healthz")
                    else:
                        r = client.post("/v1/jobs", json=self.post_spec | {"seed": 1000 + i})
                        if r.status_code == 202:
                            self.accepted.append(r.json()["id"])
                    status, retry = r.status_code, r.headers.get("retry-after")
                except httpx.HTTPError as exc:
                    status, retry = None, type(exc).__name__
                self.records.append({"t": t, "op": op, "status": status, "retry_after": retry})
                i += 1
                self._halt.wait(max(0.0, start + i / self.rate - time.monotonic()))

    def counts(self, since: float = 0.0, until: float = float("inf"),
               ops: tuple[str, ...] = ("get_job", "list", "post")) -> dict[str, int]:
        """{"op status": count} of the answers to `ops` in [since, until) (default: the
        DB-backed requests)."""
        out: dict[str, int] = {}
        for rec in self.records:
            if since <= rec["t"] < until and rec["op"] in ops:
                key = f"{rec['op']} {rec['status']}"
                out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))
