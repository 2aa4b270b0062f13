"""Load shedding, the JSON body limit and a bounded shutdown: the middleware on its own, the app
in process, and a real `slimline api` (uvicorn) under a burst on SQLite and on PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.limits import THREAD_HEADROOM, BodyLimit, LoadShedder
from service.auth import create_api_key
from service.db import dispose_engines, session_scope, upgrade_db
from service.errors import Unauthorized
from service.orm import ApiKey, Job
from service.settings import Settings
from tests.pg import PG_ADMIN_URL, temporary_database
from tests.stack.conftest import free_port

REPO = Path(__file__).resolve().parents[2]

# ---- the middleware on its own ----

class Gate:
    """An ASGI app whose requests block until `open` is set, then answer 200 with a streamed
    body that stays open until `finish` is set."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.finish = asyncio.Event()
        self.running = 0

    async def __call__(self, scope, receive, send) -> None:
        self.running += 1
        await self.open.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        self.running -= 1
        await self.finish.wait()
        await send({"type": "http.response.body", "body": b"done"})


async def call(app, path: str = "/v1/jobs", method: str = "GET", headers=(), body=b"",
               chunks: list[bytes] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    messages = ([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                 for i, c in enumerate(chunks)] if chunks is not None
                else [{"type": "http.request", "body": body, "more_body": False}])
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # a client that stays connected

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_shedder_admits_queues_and_sheds_at_once():
    async def main():
        gate = Gate()
        shedder = LoadShedder(gate, max_concurrency=2, max_waiting=3, max_wait_s=5)
        tasks = [asyncio.create_task(call(shedder)) for _ in range(8)]
        await asyncio.sleep(0.05)
        # 2 running, 3 waiting; the other 3 were answered at once, before any slot freed
        assert gate.running == 2 and len(shedder.waiters) == 3
        done = [t for t in tasks if t.done()]
        assert len(done) == 3
        for t in done:
            status, headers, body = t.result()
            assert status == 503 and headers[b"retry-after"] == b"1"
            doc = json.loads(body)
            assert doc["error"] == "Overloaded"
            assert "SLIMLINE_API_MAX_CONCURRENCY" in doc["detail"]
        # a slot is given back when the response starts: the waiters run while the first two
        # still stream their bodies
        gate.open.set()
        await asyncio.sleep(0.05)
        assert shedder.active == 0 and not shedder.waiters
        gate.finish.set()
        results = [await t for t in tasks]
        assert Counter(r[0] for r in results) == {200: 5, 503: 3}
        assert shedder.shed == 3

        # /healthz and uploads hold no slot
        gate2 = Gate()
        gate2.open.set()
        gate2.finish.set()
        full = LoadShedder(gate2, max_concurrency=1, max_waiting=0)
        full.active = 1
        assert (await call(full, "/healthz"))[0] == 200
        assert (await call(full, "/v1/models", "POST"))[0] == 200
        assert (await call(full, "/v1/jobs"))[0] == 503

    asyncio.run(main())


def test_a_request_that_waits_too_long_is_shed_and_cancelled_waiters_leave_the_queue():
    async def main():
        gate = Gate()
        shedder = LoadShedder(gate, max_concurrency=1, max_waiting=5, max_wait_s=0.2)
        first = asyncio.create_task(call(shedder))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        status, headers, _ = await call(shedder)
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert 0.15 < time.monotonic() - started < 1.0
        # a waiter whose client goes away gives up its place
        waiter = asyncio.create_task(call(shedder))
        await asyncio.sleep(0.01)
        assert len(shedder.waiters) == 1
        waiter.cancel()
        await asyncio.sleep(0.01)
        assert not shedder.waiters
        gate.open.set()
        gate.finish.set()
        assert (await first)[0] == 200
        assert shedder.active == 0

    asyncio.run(main())


def test_body_limit_counts_declared_and_chunked_bytes():
    async def echo(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main():
        limit = BodyLimit(echo, max_bytes=1024)
        status, _, body = await call(limit, method="POST", body=b"x" * 2000,
                                           headers=[(b"content-length", b"2000")])
        assert status == 413 and b"SLIMLINE_MAX_JSON_BYTES" in body
        assert json.loads(body)["error"] == "PayloadTooLarge"
        chunked = [(b"transfer-encoding", b"chunked")]
        status, _, body = await call(limit, method="POST", headers=chunked,
                                     chunks=[b"x" * 600, b"y" * 600])
        assert status == 413 and b"SLIMLINE_MAX_JSON_BYTES" in body
        status, _, body = await call(limit, method="POST", headers=chunked,
                                     chunks=[b"x" * 500, b"y" * 500, b""])
        assert (status, body) == (200, b"x" * 500 + b"y" * 500)
        # multipart bodies are the uploads' business
        multipart = [(b"content-type", b"multipart/form-data; boundary=x"),
                     (b"content-length", b"5000")]
        status, _, _ = await call(limit, method="POST", headers=multipart, body=b"z" * 5000)
        assert status == 200

    asyncio.run(main())


def test_app_refuses_large_json_bodies_and_sizes_its_thread_pool(settings, enqueued, keys):
    settings = settings.model_copy(update={"max_json_bytes": 2048, "api_max_concurrency": 6})
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {keys['a']}"}) as client:
        big = {"model": {"arch": {"name": "mlp"}}, "dataset": "synthetic-tiny",
               "steps": [{"op": "evaluate"}], "pad": "x" * 4000}
        r = client.post("/v1/jobs", json=big)
        assert r.status_code == 413 and "SLIMLINE_MAX_JSON_BYTES" in r.json()["detail"]

        def chunks():
            yield json.dumps(big).encode()[:1500]
            yield json.dumps(big).encode()[1500:]

        r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
        small = json.dumps({"model": {"arch": {"name": "nope"}}}).encode()
        r = client.post("/v1/jobs", content=iter([small]),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422  # read and validated as usual
        total = client.portal.call(
            lambda: anyio.to_thread.current_default_thread_limiter().total_tokens)
        assert total == 6 + THREAD_HEADROOM
        # the (pure ASGI) metrics middleware still labels requests by route and status
        registry = app.state.metrics.registry
        assert registry.get_sample_value("slimline_http_requests_total", {
            "method": "POST", "route": "/v1/jobs", "status": "422"}) == 1
        assert registry.get_sample_value("slimline_http_requests_total", {
            "method": "POST", "route": "unmatched", "status": "413"}) == 2


# ---- a real `slimline api` under a burst, then SIGTERM ----

@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'home' / 'slimline.db'}"
        return
    with temporary_database("slimline_limits") as url:
        yield url


# ---- what a request costs: no key lookup while the key is cached, no ping per checkout ----

def test_a_cached_key_costs_no_query_and_a_read_one_select(settings, enqueued, keys):
    from sqlalchemy import event

    from service.auth import forget_keys, resolve_key
    from service.db import engine_from_settings

    forget_keys()
    with session_scope(settings) as session:
        tenant = session.query(ApiKey.tenant_id).filter(ApiKey.name == "alice-key").scalar()
        job = Job(tenant_id=tenant, status="queued", spec={"steps": []}, queue="cpu",
                  cancel_requested=False, attempts=0)
        session.add(job)
        session.flush()
        job_id = job.id
    statements: list[str] = []
    event.listen(engine_from_settings(settings), "before_cursor_execute",
                 lambda _c, _cur, sql, *_: statements.append(sql))
    with TestClient(create_app(settings),
                    headers={"Authorization": f"Bearer {keys['a']}"}) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # looks the key up
        statements.clear()
        for _ in range(3):
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert len(statements) == 3 and all("FROM jobs" in sql for sql in statements), statements
        # a wrong key is looked up every time (and refused)
        statements.clear()
        for _ in range(2):
            r = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer sl_nope"})
            assert r.status_code == 401
        assert sum("api_keys" in sql for sql in statements) == 2
    # a deleted key keeps working from the cache until it expires or is forgotten
    with session_scope(settings) as session:
        session.query(ApiKey).filter(ApiKey.name == "alice-key").delete()
    with session_scope(settings) as session:
        assert resolve_key(session, keys["a"]) == tenant
        forget_keys()
        with pytest.raises(Unauthorized):
            resolve_key(session, keys["a"])


@pytest.mark.service
def test_a_pooled_connection_killed_by_the_server_is_replaced(tmp_path, monkeypatch):
    import psycopg
    from sqlalchemy import exc, text

    from service import db
    from service.db import engine_from_settings

    def kill_backends(url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))

    with temporary_database("slimline_limits") as url:
        settings = Settings(home=tmp_path, database_url=url, db_pool_size=2)
        engine = engine_from_settings(settings)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        kill_backends(url)
        # in use within PING_AFTER_IDLE_S: no ping; the dead connection fails once (a 503 in
        # the API), and the pool is replaced
        with pytest.raises(exc.OperationalError), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        # idle longer than that: the checkout pings, finds it dead and reconnects
        kill_backends(url)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


async def raw_get(port: int, path: str, headers: dict[str, str]) -> Answer:
    """One GET on its own connection (a plain socket: an HTTP client library would take
    longer to send 300 requests than the server takes to answer them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
                     .encode())
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    return Answer(int(lines[0].split()[1]), {k.strip().lower(): v.strip()
                                             for k, v in fields.items()}, body)


async def burst(port: int, path: str, headers: dict[str, str], n: int) -> list[Answer]:
    return await asyncio.gather(*(raw_get(port, path, headers) for _ in range(n)))


@pytest.mark.service
def test_a_real_api_sheds_a_burst_recovers_and_stops_on_sigterm(database_url, tmp_path):
    home = tmp_path / "home"
    settings = Settings(home=home, database_url=database_url)
    upgrade_db(settings)
    with session_scope(settings) as session:
        key = create_api_key(session, "burst", "burst")
    with session_scope(settings) as session:
        tenant = session.query(ApiKey.tenant_id).scalar()
        job = Job(tenant_id=tenant, status="queued", spec={"steps": []}, queue="cpu",
                  cancel_requested=False, attempts=0)
        session.add(job)
        session.flush()
        job_id = job.id
    dispose_engines()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")} | {
        "SLIMLINE_HOME": str(home), "SLIMLINE_DATABASE_URL": database_url,
        "SLIMLINE_API_MAX_CONCURRENCY": "4", "SLIMLINE_API_MAX_WAITING": "8",
        "SLIMLINE_DB_POOL_SIZE": "4", "SLIMLINE_DB_MAX_OVERFLOW": "2"}
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from cli.app import app; app()", "api",
                             "--port", str(port), "--no-access-log"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)

        started = time.monotonic()
        responses = asyncio.run(asyncio.wait_for(
            burst(port, f"/v1/jobs/{job_id}", headers, 300), timeout=30))
        statuses = Counter(r.status for r in responses)
        assert set(statuses) <= {200, 503}, statuses  # never a 500, never a pool timeout
        assert statuses[503] > 0 and statuses[200] >= 4, statuses
        for r in responses:
            if r.status == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"] == "Overloaded"
        # normal service again within 10 s of the burst's end
        deadline = time.monotonic() + 10
        while True:
            r = httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers, timeout=5)
            if r.status_code == 200:
                break
            assert time.monotonic() < deadline, f"not recovered: {r.status_code} {r.text}"
            time.sleep(0.2)
        assert time.monotonic() - started < 30

        # SIGTERM in the middle of another burst: a clean exit, within the graceful timeout
        async def burst_then_term() -> float:
            load = asyncio.create_task(burst(port, f"/v1/jobs/{job_id}", headers, 300))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            t = time.monotonic()
            await asyncio.gather(load, return_exceptions=True)
            return t

        term_at = asyncio.run(burst_then_term())
        code = proc.wait(timeout=max(1.0, 15 - (time.monotonic() - term_at)))
        assert code == 0, (tmp_path / "api.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_api_workers_keep_tcp_nodelay(monkeypatch):
    """`slimline api --workers N`: uvicorn binds the socket itself; without the fix accepted
    connections keep Nagle's algorithm on and each keep-alive answer waits ~40 ms."""
    import uvicorn

    from cli.processes import keep_tcp_nodelay

    monkeypatch.setattr(uvicorn.Config, "bind_socket", uvicorn.Config.bind_socket)
    keep_tcp_nodelay(uvicorn.Config)
    sock = uvicorn.Config("api.app:create_app", host="127.0.0.1", port=0).bind_socket()
    assert sock.proto == socket.IPPROTO_TCP

    async def main() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handler(_reader, writer) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handler, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 5)
            writer.close()
        return nodelay

    assert asyncio.run(main()) == 1
