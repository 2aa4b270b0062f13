"""Upload through the real `python -m worker.inspect` subprocess (torch stays out of the API)."""
from __future__ import annotations

import io

import pytest

from api.app import create_app
from service.settings import Settings


@pytest.fixture
def real_client(settings, keys, enqueued):
    pytest.importorskip("torch")
    pytest.importorskip("worker.inspect")
    from fastapi.testclient import TestClient

    real = Settings(**settings.model_dump() | {"inspect_module": "worker.inspect",
                                               "max_upload_bytes": 8 * 1024 * 1024})
    with TestClient(create_app(real), headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        yield c


def test_real_checkpoint_upload_and_rejections(real_client, tmp_path):
    import torch

    from core import models as zoo

    torch.manual_seed(0)
    model = zoo.build({"name": "lenet300"})
    path = tmp_path / "m.safetensors"
    zoo.save(model, path)
    data = path.read_bytes()
    r = real_client.post("/v1/models", files={"file": ("m.safetensors", io.BytesIO(data))},
                         data={"name": "lenet"})
    assert r.status_code == 201, r.text
    assert r.json()["params"]["total"] == 266_610 and r.json()["arch"]["name"] == "lenet300"
    blob = real_client.get(f"/v1/models/{r.json()['id']}/file").content
    out = tmp_path / "back.safetensors"
    out.write_bytes(blob)
    assert zoo.read_arch(out)["name"] == "lenet300"

    unknown = real_client.post("/v1/models", files={"file": ("m.safetensors", data)},
                               data={"arch": '{"name": "nope"}'})
    assert unknown.status_code == 422, unknown.text
