"""API correctness under hostile input and faults: database errors are 503 + Retry-After, inputs
that used to give 500 are 4xx on SQLite and PostgreSQL, /metrics and /readyz do not leak, SSE
streams are async and capped per tenant, quotas and arch specs are checked at submission."""
from __future__ import annotations

import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from api.app import create_app
from api.deps import SessionDep
from service.auth import create_api_key
from service.db import dispose_engines, engine_from_settings, session_scope, upgrade_db
from service.settings import Settings
from tests.api.conftest import MAX_UPLOAD
from tests.pg import temporary_database

REPO = Path(__file__).resolve().parents[2]
SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "evaluate"}]}
DB_DOWN = "the database is unreachable; retry shortly"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_settings(home: Path, **overrides) -> Settings:
    return Settings(**{"home": home, "auth": "on", "max_upload_bytes": MAX_UPLOAD,
                       "max_epochs": 50, "inspect_module": "tests.api.fake_inspect",
                       "broker_url": "filesystem://"} | overrides)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with temporary_database("slimline_hard") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, enqueued) -> Iterator[tuple[TestClient, TestClient, Settings]]:
    """(alice, bob, settings) on a migrated SQLite file or PostgreSQL database."""
    overrides = {}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("pg_url")
    s = base_settings(tmp_path / "home", **overrides)
    upgrade_db(s)
    with session_scope(s) as session:
        a = create_api_key(session, "alice-key", "alice")
        b = create_api_key(session, "bob-key", "bob")
    app = create_app(s)
    with TestClient(app, headers={"Authorization": f"Bearer {a}"}) as alice, \
            TestClient(app, headers={"Authorization": f"Bearer {b}"}) as bob:
        yield alice, bob, s
    dispose_engines()


# ---- database errors: 503 + Retry-After, never 500 -------------------------------------------

def assert_db_down(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.json() == {"error": "DatabaseUnavailable", "detail": DB_DOWN}
    assert r.headers["Retry-After"] == "2"


@pytest.mark.parametrize("kind", ["postgresql-closed-port", "sqlite-unopenable"])
def test_unreachable_database_is_503_with_retry_after(kind, tmp_path, enqueued):
    if kind == "postgresql-closed-port":
        url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    else:
        (tmp_path / "db-is-a-directory").mkdir()
        url = f"sqlite:///{tmp_path / 'db-is-a-directory'}"
    for auth in ("on", "off"):
        s = base_settings(tmp_path / "home", database_url=url, auth=auth)
        with TestClient(create_app(s), raise_server_exceptions=False,
                        headers={"Authorization": "Bearer sl_some-key"}) as c:
            assert_db_down(c.get("/v1/jobs"))
            assert_db_down(c.get("/v1/jobs/01abc"))
            assert_db_down(c.post("/v1/jobs", json=SPEC))
            assert_db_down(c.get("/v1/models"))
            assert_db_down(c.get("/v1/jobs/01abc/events"))
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["database"] != "ok"
    dispose_engines()


def test_a_failing_commit_is_503(client, monkeypatch):
    """The session dependency's commit (after the route returned) maps to 503 too."""
    def commit(self):
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr("sqlalchemy.orm.Session.commit", commit)
    assert_db_down(client.get("/v1/jobs"))


def test_database_refusing_a_value_is_422_not_500(pg_url, tmp_path, enqueued):
    """The safety net: a NUL byte that reaches PostgreSQL (psycopg DataError) is a 422."""
    s = base_settings(tmp_path / "home", database_url=pg_url, auth="off")
    upgrade_db(s)
    app = create_app(s)

    @app.get("/test-nul")
    def nul(session: SessionDep) -> dict:
        session.execute(text("SELECT :v"), {"v": "a\x00b"})
        return {}

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/test-nul")
    assert r.status_code == 422 and r.json()["error"] == "Unprocessable", r.text
    assert "NUL" in r.json()["detail"]


# ---- inputs that gave 500: 4xx on both backends -----------------------------------------------

def test_nul_and_oversized_values_are_4xx(backend):
    alice, _, _ = backend
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    model_id = "01" + "a" * 24
    for path in ("/v1/jobs/a%00b", "/v1/jobs/%00", "/v1/jobs/a%00b/events",
                 "/v1/jobs/a%00b/events?format=json", "/v1/jobs/a%00b/curves",
                 "/v1/jobs/a%00b/artifacts", f"/v1/jobs/{job_id}/artifacts/m%00.safetensors",
                 "/v1/models/a%00b", "/v1/models/a%00b/file", "/v1/datasets/a%00b",
                 "/v1/jobs/" + "x" * 33, "/v1/models/" + "x" * 40, "/v1/datasets/" + "y" * 99,
                 f"/v1/jobs/{job_id}/artifacts/" + "n" * 201, f"/v1/models/{model_id}"):
        r = alice.get(path)
        assert r.status_code == 404 and r.json()["error"] == "NotFound", (path, r.text)
    r = alice.post("/v1/jobs/a%00b/cancel")
    assert r.status_code == 404, r.text
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 200

    for params, needle in (({"cursor": "\x00"}, "cursor"), ({"status": "queued\x00"}, "status"),
                           ({"cursor": "a" * 5000}, "cursor"), ({"limit": "\x00"}, "limit")):
        r = alice.get("/v1/jobs", params=params)
        assert r.status_code == 422 and needle in r.json()["detail"], (params, r.text)

    def cursor(created: str, last_id: str) -> str:
        return base64.urlsafe_b64encode(json.dumps([created, last_id]).encode()).decode()

    for bad in (cursor("2020-01-01T00:00:00", "a\x00b"), cursor("0001-01-01T00:00:00+14:00", "a"),
                cursor("9999-12-31T23:59:59-14:00", "a"), cursor("2020-01-01", "x" * 40)):
        r = alice.get("/v1/jobs", params={"cursor": bad})
        assert r.status_code == 422 and "cursor" in r.json()["detail"], r.text
    # a real cursor still pages
    alice.post("/v1/jobs", json=SPEC | {"seed": 1})
    page = alice.get("/v1/jobs", params={"limit": 1}).json()
    assert alice.get("/v1/jobs", params={"limit": 1, "cursor": page["next_cursor"]}) \
        .json()["items"][0]["id"] == job_id


SPEC_CONTROL_CHARACTERS = [
    ({"model": "a\x00b"}, "model: contains the control character"),
    ({"model": "01abc\x07"}, "model: contains the control character"),
    ({"dataset": "synthetic-\x00"}, "dataset: contains the control character"),
    ({"steps": [{"op": "analyze", "kinds": ["angles"], "other_model": "m\x00"}]},
     "steps[0].other_model: contains the control character"),
    ({"steps": [{"op": "pcn", "select": {"dims": 2}, "layers": ["fc1\x00"]}]},
     "steps[0].layers[0]: contains the control character"),
    ({"steps": [{"op": "pcn", "select": {"dims": 2}, "per_layer": {"fc\x001": {"dims": 1}}}]},
     "steps[0].per_layer['fc\\x001']: contains the control character"),
    ({"model": {"arch": {"name": "mlp\x00"}}}, "model.arch.name: contains the control"),
]


def test_control_characters_in_a_spec_are_422_naming_the_field(backend):
    alice, _, _ = backend
    for patch, needle in SPEC_CONTROL_CHARACTERS:
        r = alice.post("/v1/jobs", json=SPEC | patch)
        assert r.status_code == 422 and r.json()["error"] == "ValidationError", r.text
        assert needle in r.json()["detail"], r.json()["detail"]
    assert alice.get("/v1/jobs").json()["items"] == []


def test_idempotency_key_with_control_characters_is_400(client):
    r = client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k\x01"})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]


def test_event_ids_out_of_range_or_not_ascii_digits(backend):
    alice, _, s = backend
    job_id = alice.post("/v1/jobs", json=SPEC).json()["id"]
    events = f"/v1/jobs/{job_id}/events"
    for after in (2**63, 10**30):
        r = alice.get(events, params={"format": "json", "after": after})
        assert r.status_code == 422 and "after" in r.json()["detail"], r.text
    r = alice.get(events, params={"format": "json", "after": 2**63 - 1})
    assert r.status_code == 200 and r.json()["items"] == []
    count = len(alice.get(events, params={"format": "json"}).json()["items"])
    assert count >= 1
    # "²".isdigit() is true; these headers are ignored (all events from the start)
    for header in (b"\xb2", "²".encode(), b"9223372036854775808", b"99999999999999999999999",
                   b"-1", b"1e3", b" "):
        r = alice.get(events, params={"format": "json"}, headers={"Last-Event-ID": header})
        assert r.status_code == 200, (header, r.text)
        assert len(r.json()["items"]) == count, header
    # and over SSE, on a finished job so that the stream ends
    with session_scope(s) as session:
        from service.orm import Job
        from service.states import mark_running, mark_succeeded
        job = session.get(Job, job_id)
        mark_running(job)
        mark_succeeded(job, {"model_id": None})
    for header in (b"\xb2", b"9223372036854775808"):
        with alice.stream("GET", events, headers={"Last-Event-ID": header}) as r:
            assert r.status_code == 200
            body = "".join(r.iter_text())
        assert "event: status" in body and body.rstrip().endswith('{"status": "succeeded"}')


# ---- /metrics and /readyz ---------------------------------------------------------------------

def test_metrics_need_a_key_and_show_only_the_callers_jobs(settings, keys, enqueued):
    s = Settings(**settings.model_dump() | {"metrics_token": "operator-secret"})
    with TestClient(create_app(s)) as c:
        def as_(key: str | None) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"} if key else {}

        for _ in range(2):
            c.post("/v1/jobs", json=SPEC, headers=as_(keys["a"]))
        c.post("/v1/jobs", json=SPEC, headers=as_(keys["b"]))
        for headers in ({}, as_("sl_not-a-key"), {"Authorization": "Basic eA=="},
                        as_("operator-secre")):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "Unauthorized", headers
        alice = c.get("/metrics", headers=as_(keys["a"])).text
        assert 'slimline_jobs{status="queued"} 2.0' in alice
        assert "slimline_http" not in alice and "bob" not in alice
        bob = c.get("/metrics", headers=as_(keys["b"])).text
        assert 'slimline_jobs{status="queued"} 1.0' in bob
        operator = c.get("/metrics", headers=as_("operator-secret")).text
        assert 'slimline_jobs{status="queued"} 3.0' in operator
        assert "slimline_http_requests_total" in operator


def test_metrics_are_open_when_auth_is_off(settings, enqueued):
    off = Settings(**settings.model_dump() | {"auth": "off"})
    with TestClient(create_app(off)) as c:
        c.post("/v1/jobs", json=SPEC)
        text_ = c.get("/metrics").text
        assert 'slimline_jobs{status="queued"} 1.0' in text_


def test_readyz_shows_error_text_only_to_the_operator(tmp_path, enqueued):
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    s = base_settings(tmp_path / "home", database_url=url, metrics_token="operator-secret")
    with TestClient(create_app(s)) as c:
        for headers in ({}, {"Authorization": "Bearer sl_whatever"}):
            r = c.get("/readyz", headers=headers)
            assert r.status_code == 503
            body = r.json()
            assert body["checks"] == {"database": "error", "broker": "ok", "store": "ok"}
            assert body["detail"] == "not reachable: database"
            assert "127.0.0.1" not in r.text and "Operational" not in r.text
        r = c.get("/readyz", headers={"Authorization": "Bearer operator-secret"})
        assert r.status_code == 503
        assert r.json()["checks"]["database"].startswith("error: OperationalError")
    dispose_engines()


# ---- quotas and arch specs at submission -------------------------------------------------------

def test_active_jobs_quota_is_429_and_a_replay_is_not_refused(settings, keys, enqueued):
    s = Settings(**settings.model_dump() | {"max_active_jobs": 2, "max_total_epochs": 3})
    with TestClient(create_app(s), headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        first = c.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k1"})
        c.post("/v1/jobs", json=SPEC | {"seed": 1})
        r = c.post("/v1/jobs", json=SPEC | {"seed": 2})
        assert r.status_code == 429 and r.json()["error"] == "QuotaExceeded", r.text
        assert r.headers["Retry-After"] == "30"
        assert "you have 2 queued or running jobs, the limit is 2 " \
               "(SLIMLINE_MAX_ACTIVE_JOBS)" in r.json()["detail"]
        again = c.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k1"})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        c.post(f"/v1/jobs/{first.json()['id']}/cancel")
        assert c.post("/v1/jobs", json=SPEC | {"seed": 2}).status_code == 202
        r = c.post("/v1/jobs", json=SPEC | {"steps": [{"op": "train", "epochs": 2},
                                                      {"op": "train", "epochs": 2}]})
        assert r.status_code == 422 and "SLIMLINE_MAX_TOTAL_EPOCHS" in r.json()["detail"]
        assert r.json()["detail"].startswith("steps:")
        assert len(enqueued) == 3


@pytest.mark.parametrize(("arch", "needle"), [
    ({"name": "mlp", "widths": [1_000_000_000_000]}, "model.arch.widths[0]"),
    ({"name": "mlp", "widths": [1e12]}, "model.arch.widths[0]: must be an integer"),
    ({"name": "mlp", "widths": [100_000, 100_000]}, "SLIMLINE_MAX_MODEL_PARAMS"),
    ({"name": "resnet", "input_shape": [3, 4096, 4096]}, "SLIMLINE_MAX_MODEL_MACS"),
    ({"name": "transformer"}, ("unknown architecture 'transformer'; the zoo has: conv4, "
                               "lenet300, lenet5, mlp, resnet")),
    ({"name": "lenet300", "widths": [10]}, "model.arch.widths: unknown kwarg"),
    ({"name": "mlp", "input_shape": [1, 28]}, "model.arch.input_shape: must be [C, H, W]"),
    ({"name": "mlp", "num_classes": 1}, "model.arch.num_classes"),
    ({"name": "resnet", "depth": 21}, "model.arch.depth: must be 6n+2"),
    ({"name": "lenet5", "input_shape": [1, 12, 12]}, "at least 16x16"),
])
def test_bad_arch_specs_are_422_naming_the_field(client, enqueued, arch, needle):
    r = client.post("/v1/jobs", json=SPEC | {"model": {"arch": arch}})
    assert r.status_code == 422 and r.json()["error"] == "InvalidSpec", r.text
    assert needle in r.json()["detail"], r.json()["detail"]
    assert enqueued == []


def test_arch_kwargs_and_edits_accepted_today_still_are(client, enqueued):
    import io

    import numpy as np

    buf = io.BytesIO()  # 3x32x32 samples for the resnet (the data must fit a fresh arch)
    np.savez(buf, x_train=np.zeros((4, 3, 32, 32), np.uint8), y_train=np.arange(4))
    rgb = client.post("/v1/datasets", files={"file": ("rgb.npz", buf.getvalue())}).json()["id"]
    for arch, dataset in (
            ({"name": "mlp", "input_shape": [1, 8, 8], "widths": [64, 32]}, "synthetic-tiny"),
            ({"name": "resnet", "input_shape": [3, 32, 32], "depth": 8, "width": 0.5}, rgb),
            ({"name": "lenet300", "edits": [{"op": "pcn_input", "layer": "fc2", "dims": 50}]},
             "synthetic-blobs")):
        r = client.post("/v1/jobs", json=SPEC | {"model": {"arch": arch}, "dataset": dataset})
        assert r.status_code == 202, r.text
        assert r.json()["spec"]["model"] == {"arch": arch}


# ---- server-sent events: async, capped per tenant ----------------------------------------------

class Server:
    """The app under a real uvicorn server in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Stream:
    """An SSE request on a raw socket (cheap: no thread), read up to its first event."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self.sock, self.head = sock, head

    @property
    def ok(self) -> bool:
        return self.head.startswith(b"HTTP/1.1 200 ")

    def close(self) -> None:
        self.sock.close()


def open_stream(url: str, key: str) -> Stream:
    """An SSE request on a raw socket, read up to the first event; the caller closes it."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"retry: 2000" not in head and b"\r\n\r\n{" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return Stream(sock, head)


def wait_released(app, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while app.state.event_streams.open:
        assert time.monotonic() < deadline, app.state.event_streams.open
        time.sleep(0.05)


def test_event_streams_are_capped_per_tenant_and_released(settings, keys, enqueued):
    s = Settings(**settings.model_dump() | {"max_event_streams": 2})
    app = create_app(s)
    with Server(app) as url:
        c = httpx.Client(base_url=url, timeout=10)
        auth = {"Authorization": f"Bearer {keys['a']}"}
        job_id = c.post("/v1/jobs", json=SPEC, headers=auth).json()["id"]
        events = f"{url}/v1/jobs/{job_id}/events"
        streams = [open_stream(events, keys["a"]) for _ in range(2)]
        assert all(st.ok for st in streams), [st.head for st in streams]
        # idle streams hold no database connection (a poll holds one for a moment)
        pool = engine_from_settings(s).pool
        samples = []
        for _ in range(20):
            samples.append(pool.checkedout())
            time.sleep(0.05)
        assert samples.count(0) >= 15, samples
        r = c.get(events, headers=auth)
        assert r.status_code == 429 and r.json()["error"] == "QuotaExceeded", r.text
        assert "the limit is 2" in r.json()["detail"]
        assert "SLIMLINE_MAX_EVENT_STREAMS" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        # JSON polling and other routes are not streams
        assert c.get(events, params={"format": "json"}, headers=auth).status_code == 200
        # another tenant has its own count (and cannot see alice's job)
        assert c.get(events, headers={"Authorization": f"Bearer {keys['b']}"}) \
            .status_code == 404
        streams.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the disconnect within a poll
            extra = open_stream(events, keys["a"])
            if extra.ok:
                break
            extra.close()
            assert time.monotonic() < deadline, "a closed stream was never released"
            time.sleep(0.2)
        streams.append(extra)
        for st in streams:
            st.close()
        wait_released(app)
        # a stream that ends by itself (terminal job) releases its slot too
        from service.orm import Job
        from service.states import mark_running, mark_succeeded
        with session_scope(s) as session:
            job = session.get(Job, job_id)
            mark_running(job)
            mark_succeeded(job, {"model_id": None})
        for _ in range(3):
            r = c.get(events, headers=auth)
            assert r.status_code == 200 and "event: end" in r.text
        wait_released(app)
        c.close()


@pytest.mark.service
def test_open_streams_do_not_slow_the_api(tmp_path):
    """40 open SSE streams against one real uvicorn process: GET /v1/jobs stays fast (the
    sync generator of before held a thread and a DB connection each: 45-60 s)."""
    home = tmp_path / "home"
    s = Settings(home=home)
    upgrade_db(s)
    with session_scope(s) as session:
        key = create_api_key(session, "alice-key", "alice")
    dispose_engines()
    port = free_port()
    env = os.environ | {"SLIMLINE_HOME": str(home), "SLIMLINE_MAX_EVENT_STREAMS": "50",
                        "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    streams: list[Stream] = []
    try:
        c = httpx.Client(base_url=url, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 60
        while True:
            try:
                if c.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "API did not start"
            time.sleep(0.2)
        job_id = c.post("/v1/jobs", json=SPEC).json()["id"]
        for _ in range(40):
            streams.append(open_stream(f"{url}/v1/jobs/{job_id}/events", key))
        assert all(st.ok for st in streams), [st.head for st in streams]
        time.sleep(1.0)  # every stream has polled at least once
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            r = c.get("/v1/jobs")
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 200
        p50 = statistics.median(latencies)
        print(f"GET /v1/jobs with 40 open streams: p50 {p50 * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms")
        assert p50 < 0.2, f"GET /v1/jobs p50 {p50:.3f}s with 40 open streams"
        c.close()
    finally:
        for st in streams:
            st.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
