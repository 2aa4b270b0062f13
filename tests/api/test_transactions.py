"""The request's transaction: routes never commit; the session dependency commits before the
response is sent, jobs reach the broker only after that commit (and nothing is sent for a request
that fails), and no pooled connection is held while an upload streams in or is inspected."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.inspect_client import inspector_for
from service import queue
from service.auth import forget_keys
from service.db import engine_from_settings, session_scope
from service.errors import BrokerUnavailable
from service.orm import Job, Model
from tests.api.conftest import safetensors_bytes

SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "evaluate"}]}
API = Path(__file__).resolve().parents[2] / "api"


def committed_jobs(settings) -> dict[str, str]:
    """{id: status} as another connection sees it (committed rows only)."""
    with session_scope(settings) as session:
        return {job_id: status for job_id, status in session.execute(select(Job.id, Job.status))}


def test_routes_never_commit():
    """Only the session dependency (api/deps.py) ends the request's transaction."""
    offenders = [f"{path.relative_to(API.parent)}:{number}"
                 for path in API.rglob("*.py") if path.name != "deps.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\.(commit|rollback)\(", line)]
    assert offenders == []


def test_the_job_is_sent_after_its_commit_and_the_response_after_both(settings, keys,
                                                                      monkeypatch):
    sent: list[tuple[str, dict[str, str]]] = []
    monkeypatch.setattr(queue, "enqueue_job", lambda job_id, q, settings_=None:
                        sent.append((job_id, committed_jobs(settings))))
    app = create_app(settings)
    at_response_start: list[tuple[int, dict[str, str]]] = []

    async def watched(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def send_watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and scope["path"] == "/v1/jobs":
                at_response_start.append((len(sent), committed_jobs(settings)))
            await send(message)

        await app(scope, receive, send_watched)

    with TestClient(watched, headers={"Authorization": f"Bearer {keys['a']}"}) as client:
        r = client.post("/v1/jobs", json=SPEC)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    # the worker that receives the id finds the row; the client that got 202 can read it
    assert sent == [(job_id, {job_id: "queued"})]
    assert at_response_start == [(1, {job_id: "queued"})]


def test_a_failing_request_rolls_back_and_sends_nothing(client, enqueued, settings,
                                                        monkeypatch):
    def broken(job: Job) -> dict:
        raise RuntimeError("the route failed after create_job")

    monkeypatch.setattr("api.routes.jobs.job_document", broken)
    with TestClient(client.app, raise_server_exceptions=False,
                    headers=dict(client.headers)) as failing:
        assert failing.post("/v1/jobs", json=SPEC).status_code == 500
    assert enqueued == [] and committed_jobs(settings) == {}


def test_a_broker_that_is_down_leaves_the_job_to_the_reconciler(client, settings, monkeypatch):
    def down(job_id: str, q: str, settings_: Any = None) -> None:
        raise BrokerUnavailable("could not reach the broker: connection refused")

    monkeypatch.setattr(queue, "enqueue_job", down)
    r = client.post("/v1/jobs", json=SPEC)
    assert r.status_code == 202, r.text
    with session_scope(settings) as session:
        job = session.get(Job, r.json()["id"])
        assert job.status == "queued" and job.dispatched_at is None  # sent at the next pass


def test_a_canceled_job_is_revoked_after_the_commit(client, enqueued, settings, monkeypatch):
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    revoked: list[dict[str, str]] = []
    monkeypatch.setattr(queue, "revoke", lambda job, settings_=None:
                        revoked.append(committed_jobs(settings)))
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert revoked == [{job_id: "canceled"}]


def _multipart_chunks(payload: bytes, size: int) -> list[bytes]:
    body = (b"--B\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nstreamed\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.safetensors\""
            b"\r\n\r\n" + payload + b"\r\n--B--\r\n")
    return [body[i:i + size] for i in range(0, len(body), size)]


def test_no_connection_is_held_while_an_upload_streams_or_is_inspected(app, keys, settings,
                                                                       monkeypatch):
    """The quota check and the key lookup are short transactions of their own that end before
    the body is read; the route's session opens for the insert at the end."""
    forget_keys()  # the API key is looked up in the database by this very request
    pool = engine_from_settings(settings).pool
    checked_out: list[tuple[str, int]] = []
    inspector = inspector_for(app)
    inspect = inspector.checkpoint

    async def inspect_checked(*args: Any, **kwargs: Any) -> Any:
        checked_out.append(("inspect", pool.checkedout()))
        return await inspect(*args, **kwargs)

    monkeypatch.setattr(inspector, "checkpoint", inspect_checked)
    chunks = _multipart_chunks(safetensors_bytes(b"\0" * 32 * 1024), 4096)
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not chunks:
            return {"type": "http.disconnect"}
        await anyio.sleep(0.01)  # a slow client: the route waits for every chunk
        checked_out.append(("body", pool.checkedout()))
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/models",
             "raw_path": b"/v1/models", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"),
                         (b"content-type", b"multipart/form-data; boundary=B"),
                         (b"authorization", f"Bearer {keys['a']}".encode())],
             "client": ("127.0.0.1", 50000), "server": ("test", 80), "state": {}}
    anyio.run(app, scope, receive, send)
    assert messages[0]["status"] == 201, messages
    assert len(checked_out) > 8 and checked_out[-1][0] == "inspect"
    assert {count for _, count in checked_out} == {0}, checked_out
    assert pool.checkedout() == 0
    with session_scope(settings) as session:
        assert session.scalars(select(Model.name)).all() == ["streamed"]
