"""Fixtures for the service tests: real PostgreSQL, Redis, an S3 HTTP endpoint (moto's standalone
server), a uvicorn API process and a Celery worker process — plus the embedded default
(`slimline up`: SQLite, filesystem broker, local store)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SLIMLINE = str(Path(sys.executable).parent / "slimline")  # the console script of this venv
PG_ADMIN_URL = os.environ.get("SLIMLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("SLIMLINE_TEST_REDIS", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process {p.args!r} exited with {p.returncode} before ready")
        try:
            r = httpx.get(url + "/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - closed by the OS when the process group ends
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def create_key(self, name: str, tenant: str) -> str:
        out = subprocess.run(
            [SLIMLINE, "keys", "create", "--name", name, "--tenant", tenant],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip().splitlines()[-1].strip()

    def dump_logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                         for p in self.logs if p.exists())


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    import psycopg

    name = f"slimline_it_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _redis_db() -> int:
    # A database index of its own per run so parallel runs and leftovers never cross.
    import redis

    r = redis.Redis.from_url(REDIS_HOST + "/0")
    return 1 + int(r.incr("slimline-test-db-counter")) % 14


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory, pg_database, s3_endpoint) -> Iterator[Stack]:
    import boto3
    import redis

    home = tmp_path_factory.mktemp("full-stack")
    bucket = f"slimline-{uuid.uuid4().hex[:8]}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                 aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    db = _redis_db()
    broker = f"{REDIS_HOST}/{db}"
    redis.Redis.from_url(broker).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
    env.update(creds)
    env.update({
        "SLIMLINE_HOME": str(home),
        "SLIMLINE_DATABASE_URL": pg_database,
        "SLIMLINE_BROKER_URL": broker,
        "SLIMLINE_STORAGE_URL": f"s3://{bucket}/objects",
        "SLIMLINE_S3_ENDPOINT_URL": s3_endpoint,
        "SLIMLINE_AUTH": "on",
        "SLIMLINE_MAX_UPLOAD_BYTES": str(8 * 1024 * 1024),
        "PYTHONUNBUFFERED": "1",
    })
    subprocess.run([SLIMLINE, "db", "upgrade"], cwd=REPO, env=env,
                   check=True, timeout=120)
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, home=home)
    stack.logs = [home / "api.log", home / "worker.log"]
    stack.procs.append(spawn([SLIMLINE, "api", "--host", "127.0.0.1",
                              "--port", str(port)], env, stack.logs[0]))
    stack.procs.append(spawn([SLIMLINE, "worker", "--queues", "cpu,gpu"],
                             env, stack.logs[1]))
    stack.bucket = bucket  # type: ignore[attr-defined]
    try:
        wait_ready(stack.url, stack.procs)
        yield stack
    except Exception:
        print(stack.dump_logs())
        raise
    finally:
        for p in stack.procs:
            stop(p)
        redis.Redis.from_url(broker).flushdb()


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("embedded")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
    env["PYTHONUNBUFFERED"] = "1"
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, home=home)
    stack.logs = [home / "up.log"]
    stack.procs.append(spawn([SLIMLINE, "up", "--home", str(home),
                              "--host", "127.0.0.1", "--port", str(port)], env, stack.logs[0]))
    try:
        wait_ready(stack.url, stack.procs, timeout=120)
        yield stack
    except Exception:
        print(stack.dump_logs())
        raise
    finally:
        for p in stack.procs:
            stop(p)
