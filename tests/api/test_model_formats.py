"""GET /v1/models/{id}/file?format=onnx|pt2|safetensors: the stored export of the model's job,
else an on-demand export (api/exports.py) kept for the next download; the real exporter's files
run without slimline (tests/api/standalone.py)."""
from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from api.exports import Exporter
from service.auth import resolve_key
from service.db import session_scope
from service.model_files import export_key
from service.model_registry import register_model
from service.orm import Artifact, Job, new_id
from service.settings import Settings
from service.store import store_from_settings
from tests.api.conftest import safetensors_bytes, stored_objects

FAKE = "tests.api.fake_export"


@pytest.fixture
def fake_exporter(monkeypatch, tmp_path):
    """The fake exporter module; returns the file it logs each run to."""
    monkeypatch.setattr(Exporter, "module", FAKE)
    log = tmp_path / "exports.log"
    monkeypatch.setenv("FAKE_EXPORT_LOG", str(log))
    return log


def exports_run(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def upload(client, data: bytes | None = None) -> dict:
    r = client.post("/v1/models", files={"file": ("m.safetensors",
                                                  io.BytesIO(data or safetensors_bytes()))},
                    data={"name": "m", "arch": '{"name": "lenet300"}'})
    assert r.status_code == 201, r.text
    return r.json()


def test_default_format_is_the_checkpoint_as_before(client):
    data = safetensors_bytes()
    model = upload(client, data)
    for query in ("", "?format=safetensors"):
        r = client.get(f"/v1/models/{model['id']}/file{query}")
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-length"] == str(len(data))
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"] == \
            f'attachment; filename="{model["id"]}.safetensors"'


def test_unknown_format_is_422_listing_the_valid_ones(client):
    model = upload(client)
    r = client.get(f"/v1/models/{model['id']}/file?format=tflite")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "format" in detail and all(f in detail for f in ("safetensors", "onnx", "pt2"))


def test_on_demand_export_is_stored_and_reused(client, bob, settings, fake_exporter):
    data = safetensors_bytes()
    model = upload(client, data)
    url = f"/v1/models/{model['id']}/file?format=onnx"
    assert bob.get(url).status_code == 404  # another tenant's model
    first = client.get(url)
    assert first.status_code == 200, first.text
    assert first.content == b"FAKE-onnx" + data
    assert first.headers["content-disposition"] == f'attachment; filename="{model["id"]}.onnx"'
    assert first.headers["content-length"] == str(len(first.content))
    again = client.get(url)
    assert again.status_code == 200 and again.content == first.content
    assert exports_run(fake_exporter) == 1
    pt2 = client.get(f"/v1/models/{model['id']}/file?format=pt2")
    assert pt2.status_code == 200 and pt2.content == b"FAKE-pt2" + data
    assert pt2.headers["content-disposition"].endswith(f'filename="{model["id"]}.pt2"')
    names = {p.name for p in stored_objects(settings)}
    assert names == {f"{model['id']}.safetensors", f"{model['id']}.onnx", f"{model['id']}.pt2"}
    assert bob.get(url).status_code == 404


def test_failed_export_is_422_naming_the_layer_and_stores_nothing(client, settings,
                                                                  fake_exporter, monkeypatch):
    model = upload(client)
    monkeypatch.setenv("FAKE_EXPORT_FAIL", "1")
    r = client.get(f"/v1/models/{model['id']}/file?format=onnx")
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "ExportFailed" and "fc1" in r.json()["detail"]
    assert len(stored_objects(settings)) == 1  # the checkpoint only
    assert list((settings.home / "tmp").iterdir()) == []  # the temp dir went too
    monkeypatch.delenv("FAKE_EXPORT_FAIL")
    monkeypatch.setenv("FAKE_EXPORT_CRASH", "1")
    r = client.get(f"/v1/models/{model['id']}/file?format=onnx")
    assert r.status_code == 503 and "Traceback" not in r.json()["detail"]
    assert len(stored_objects(settings)) == 1


async def _get_both(app, headers, urls) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                 headers=headers, timeout=60) as http:
        return list(await asyncio.gather(*(http.get(u) for u in urls)))


def test_two_concurrent_first_downloads_export_once(app, client, keys, fake_exporter,
                                                    monkeypatch):
    model = upload(client)
    monkeypatch.setenv("FAKE_EXPORT_SLOW_S", "1")
    url = f"/v1/models/{model['id']}/file?format=onnx"
    first, second = asyncio.run(_get_both(app, {"Authorization": f"Bearer {keys['a']}"},
                                          [url, url]))
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.content == second.content
    assert exports_run(fake_exporter) == 1


def test_full_export_slots_are_503_with_retry_after(settings, keys, enqueued, fake_exporter,
                                                    monkeypatch):
    from fastapi.testclient import TestClient

    from api.app import create_app

    one_slot = Settings(**settings.model_dump() | {"inspect_concurrency": 1,
                                                   "inspect_queue_s": 0})
    app = create_app(one_slot)
    with TestClient(app, headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        ids = [upload(c, safetensors_bytes(bytes([i]) * 64))["id"] for i in range(2)]
    monkeypatch.setenv("FAKE_EXPORT_SLOW_S", "2")
    answers = asyncio.run(_get_both(app, {"Authorization": f"Bearer {keys['a']}"},
                                    [f"/v1/models/{i}/file?format=pt2" for i in ids]))
    assert sorted(a.status_code for a in answers) == [200, 503]
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.json()["error"] == "Overloaded" and int(busy.headers["retry-after"]) >= 1


def _job_with_export(settings: Settings, tenant_id: str, steps: list[dict]) -> tuple[str, bytes]:
    """A succeeded job whose output model has an `export` artifact model.onnx; returns the
    model id and the artifact's bytes."""
    store = store_from_settings(settings)
    onnx_bytes = b"ONNX-FROM-THE-EXPORT-STEP"
    tmp = settings.home / "fixture"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "m.safetensors").write_bytes(safetensors_bytes())
    (tmp / "model.onnx").write_bytes(onnx_bytes)
    with session_scope(settings) as session:
        job = Job(id=new_id(), tenant_id=tenant_id, status="succeeded",
                  spec={"model": {"arch": {"name": "lenet300"}}, "steps": steps})
        session.add(job)
        session.flush()
        model = register_model(session, store, tenant_id=tenant_id, name="m",
                               arch={"name": "lenet300"}, fmt="safetensors", params={},
                               path=tmp / "m.safetensors", source_job_id=job.id)
        job.result = {"model_id": model.id}
        key = f"jobs/{tenant_id}/{job.id}/model.onnx"
        store.put_file(key, tmp / "model.onnx")
        session.add(Artifact(job_id=job.id, name="model.onnx", kind="export",
                             size_bytes=len(onnx_bytes), sha256="0" * 64, storage_key=key))
        return model.id, onnx_bytes


@pytest.mark.parametrize(("steps", "from_job"), [
    ([{"op": "pcn"}, {"op": "export"}, {"op": "evaluate"}], True),
    ([{"op": "export"}, {"op": "train"}], False),  # the export is of an earlier model
])
def test_the_jobs_export_is_served_when_it_holds_the_final_model(client, settings, keys,
                                                                 fake_exporter, steps, from_job):
    with session_scope(settings) as session:
        tenant_id = resolve_key(session, keys["a"])
    model_id, onnx_bytes = _job_with_export(settings, tenant_id, steps)
    r = client.get(f"/v1/models/{model_id}/file?format=onnx")
    assert r.status_code == 200, r.text
    assert (r.content == onnx_bytes) is from_job
    assert exports_run(fake_exporter) == (0 if from_job else 1)
    assert r.headers["content-disposition"] == f'attachment; filename="{model_id}.onnx"'
    assert (settings.home / "objects" / export_key(tenant_id, model_id, "onnx")).exists() \
        is not from_job


# ---- the real exporter (torch in a subprocess) and the files outside slimline ----

@pytest.fixture
def real_model(client, settings, keys):
    """A lenet5 with random weights, registered for tenant a; returns (model id, torch model)."""
    torch = pytest.importorskip("torch")
    from core import models as zoo

    torch.manual_seed(0)
    model = zoo.build({"name": "lenet5"}).eval()
    path = settings.home / "lenet5.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    zoo.save(model, path)
    with session_scope(settings) as session:
        tenant_id = resolve_key(session, keys["a"])
        row = register_model(session, store_from_settings(settings), tenant_id=tenant_id,
                             name="lenet5", arch=zoo.model_arch(model), fmt="safetensors",
                             params={}, path=path)
        return row.id, zoo.load(path).eval()


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_real_export_runs_without_slimline_and_matches(client, real_model, tmp_path, fmt):
    import numpy as np
    import torch

    from tests.api.standalone import run_standalone

    model_id, model = real_model
    r = client.get(f"/v1/models/{model_id}/file?format={fmt}")
    assert r.status_code == 200, r.text
    path = tmp_path / f"{model_id}.{fmt}"
    path.write_bytes(r.content)
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    got = run_standalone(fmt, path, x, tmp_path / "standalone")
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (5, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_openapi_documents_the_formats(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/models/{model_id}/file"]["get"]
    (param,) = [p for p in operation["parameters"] if p["name"] == "format"]
    assert param["schema"]["enum"] == ["safetensors", "onnx", "pt2"]
    assert param["schema"]["default"] == "safetensors"
    assert "onnxruntime" in operation["description"] and "422" in str(operation["responses"])
