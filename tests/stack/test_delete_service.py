"""Deletion and retention through the embedded stack (`slimline up`: the API, a real worker,
SQLite and the local object store): an analyze-only job on an uploaded model stores no copy,
a model a queued or running job uses cannot be deleted, and each DELETE empties the store of
what it owned."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack.flows import checkpoint_bytes, run_job_ok, upload_model, wait_job

pytestmark = pytest.mark.service

READ_ONLY = [{"op": "evaluate"}, {"op": "export", "formats": ["onnx"]}]


def objects(home: Path, prefix: str) -> set[str]:
    root = home / "objects"
    return {str(p.relative_to(root)) for p in (root / prefix).rglob("*")
            if p.is_file()} if (root / prefix).exists() else set()


def test_analyze_only_job_keeps_no_copy_and_deletes_clean_up(embedded_stack, tmp_path):
    home = embedded_stack.home
    with embedded_stack.client() as client:
        data = checkpoint_bytes({"name": "lenet300"}, tmp_path, seed=11)
        r = upload_model(client, data, name="keep-me")
        assert r.status_code == 201, r.text
        model = r.json()
        models_before = objects(home, "models")
        listed = len(client.get("/v1/models").json()["items"])

        job = run_job_ok(client, {"model": model["id"], "dataset": "synthetic-blobs",
                                  "steps": READ_ONLY, "seed": 1})
        result = job["result"]
        assert result["model_id"] == model["id"] and result["model_unchanged"] is True
        assert objects(home, "models") == models_before  # no copy stored
        assert len(client.get("/v1/models").json()["items"]) == listed
        artifacts = {a["name"]: a for a in
                     client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
        blob = client.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors")
        same = client.get(f"/v1/models/{model['id']}/file")
        assert blob.status_code == 200 and blob.content == same.content
        assert "model.onnx" in artifacts
        job_objects = objects(home, "jobs")
        assert any(job["id"] in k and k.endswith("model.onnx") for k in job_objects)

        # a job that uses the model: 409 while it is queued or running, naming it
        r = client.post("/v1/jobs", json={"model": model["id"], "dataset": "synthetic-blobs",
                                          "steps": [{"op": "train", "epochs": 30}]})
        assert r.status_code == 202, r.text
        busy = r.json()["id"]
        refused = client.delete(f"/v1/models/{model['id']}")
        assert refused.status_code == 409 and busy in refused.json()["detail"]
        assert client.delete(f"/v1/jobs/{busy}").status_code == 409
        assert client.post(f"/v1/jobs/{busy}/cancel").status_code == 202
        assert wait_job(client, busy)["status"] == "canceled"

        # the analyze-only job goes with its own files; the model it returned stays
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert not any(job["id"] in k for k in objects(home, "jobs"))
        assert client.get(f"/v1/models/{model['id']}/file").content == same.content
        assert client.delete(f"/v1/jobs/{busy}").status_code == 204

        assert client.delete(f"/v1/models/{model['id']}").status_code == 204
        assert client.get(f"/v1/models/{model['id']}").status_code == 404
        assert not any(model["id"] in k for k in objects(home, "models"))
