from __future__ import annotations

import io

from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from tests.api.conftest import safetensors_bytes

SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "evaluate"}]}


def test_missing_and_invalid_keys_are_401(app, keys):
    with TestClient(app) as anon:
        r = anon.get("/v1/jobs")
        assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        r = anon.get("/v1/jobs", headers={"Authorization": "Bearer sl_not-a-real-key"})
        assert r.status_code == 401 and "invalid" in r.json()["detail"]
        assert anon.get("/v1/models", headers={"Authorization": "Basic x"}).status_code == 401
        assert anon.post("/v1/models", files={"file": ("m.safetensors", b"x")}).status_code \
            == 401


def test_tenant_isolation(client, bob):
    model = client.post("/v1/models", files={"file": ("m.safetensors",
                                                      io.BytesIO(safetensors_bytes()))}).json()
    job = client.post("/v1/jobs", json=SPEC).json()
    for path in (f"/v1/models/{model['id']}", f"/v1/models/{model['id']}/file",
                 f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/artifacts",
                 f"/v1/jobs/{job['id']}/artifacts/model.safetensors",
                 f"/v1/jobs/{job['id']}/events?format=json", f"/v1/jobs/{job['id']}/curves"):
        r = bob.get(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == "NotFound"
    assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert bob.get("/v1/jobs").json()["items"] == []
    assert bob.get("/v1/models").json()["items"] == []
    assert bob.post("/v1/jobs", json=SPEC | {"model": model["id"]}).status_code == 404


def test_auth_off_uses_the_default_tenant(settings, enqueued):
    off = Settings(**settings.model_dump() | {"auth": "off"})
    with TestClient(create_app(off)) as c:
        r = c.post("/v1/jobs", json=SPEC)
        assert r.status_code == 202
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [r.json()["id"]]


def test_health_ready_metrics(app, keys):
    with TestClient(app) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}
        c.get("/v1/jobs", headers={"Authorization": f"Bearer {keys['a']}"})
        text = c.get("/metrics", headers={"Authorization": f"Bearer {keys['a']}"}).text
        assert 'slimline_jobs{status="queued"}' in text


def test_readyz_reports_a_broken_database(settings, enqueued):
    broken = Settings(**settings.model_dump() | {
        "database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    with TestClient(create_app(broken)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"] == "NotReady" and r.json()["checks"]["database"] != "ok"


def test_unknown_route_and_method_are_json(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    r = client.delete("/healthz")
    assert r.status_code == 405 and r.json()["error"] == "MethodNotAllowed"


def test_unhandled_error_is_500_without_traceback(settings, keys, enqueued, monkeypatch):
    from service import submission

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("api.routes.jobs.list_jobs", boom)
    assert submission
    with TestClient(create_app(settings), raise_server_exceptions=False,
                    headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        r = c.get("/v1/jobs")
    assert r.status_code == 500 and r.json()["error"] == "InternalError"
    assert "secret" not in r.text and "Traceback" not in r.text
