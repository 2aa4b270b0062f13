"""API tests: SQLite (migrated with Alembic), local object store, a fake checkpoint inspector,
and `service.queue.enqueue_job` replaced by a recorder."""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service import queue
from service.auth import create_api_key
from service.db import dispose_engines, session_scope, upgrade_db
from service.settings import Settings

MAX_UPLOAD = 64 * 1024


def safetensors_bytes(payload: bytes = b"\0" * 64) -> bytes:
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)],
                               "data_offsets": [0, len(payload)]}}).encode()
    return struct.pack("<Q", len(header)) + header + payload


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(home=tmp_path / "home", auth="on", max_upload_bytes=MAX_UPLOAD, max_epochs=50,
                 inspect_module="tests.api.fake_inspect", broker_url="filesystem://")
    upgrade_db(s)
    yield s
    dispose_engines()


@pytest.fixture
def enqueued(monkeypatch) -> list[tuple[str, str]]:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "enqueue_job", lambda job_id, q, settings=None:
                        sent.append((job_id, q)))
    monkeypatch.setattr(queue, "revoke", lambda job_id, settings=None: None)
    return sent


@pytest.fixture
def app(settings, enqueued):
    return create_app(settings)


@pytest.fixture
def keys(settings) -> dict[str, str]:
    with session_scope(settings) as session:
        return {"a": create_api_key(session, "alice-key", "alice"),
                "b": create_api_key(session, "bob-key", "bob")}


@pytest.fixture
def client(app, keys) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        yield c


@pytest.fixture
def bob(app, keys) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {keys['b']}"}) as c:
        yield c


def stored_objects(settings: Settings) -> list[Path]:
    root = settings.home / "objects"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
