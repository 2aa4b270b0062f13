"""Downloads in every format on the full stack (PostgreSQL, Redis, S3, uvicorn, a Celery worker):
a job's `export` artifact is what `?format=onnx` serves; `?format=pt2`, which the job did not
export, is exported on demand by the API's subprocess and kept in the bucket; both files run
where slimline cannot be imported and compute the model's logits."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from core import models as zoo
from tests.api.standalone import run_standalone
from tests.stack.flows import checkpoint_bytes, run_job_ok, upload_model
from tests.stack.test_full_stack import bucket_keys

pytestmark = pytest.mark.service


def test_onnx_from_the_job_and_pt2_on_demand(full_stack, tmp_path):
    key_a = full_stack.create_key("downloads-a", "downloads-a")
    key_b = full_stack.create_key("downloads-b", "downloads-b")
    with full_stack.client(key_a) as client, full_stack.client(key_b) as other:
        r = upload_model(client, checkpoint_bytes({"name": "lenet300"}, tmp_path))
        assert r.status_code == 201, r.text
        job = run_job_ok(client, {
            "model": r.json()["id"], "dataset": "synthetic-blobs", "seed": 0,
            "steps": [{"op": "train", "epochs": 1},
                      {"op": "pcn", "layers": ["fc1"], "select": {"dims": 16}},
                      {"op": "export", "formats": ["onnx"]}]})
        model_id = job["result"]["model_id"]
        base = f"/v1/models/{model_id}/file"

        checkpoint = tmp_path / "model.safetensors"
        checkpoint.write_bytes(client.get(base).content)
        model = zoo.load(checkpoint).eval()
        x = np.random.default_rng(0).standard_normal((7, 1, 28, 28)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()

        onnx = client.get(f"{base}?format=onnx")
        assert onnx.status_code == 200, onnx.text
        assert onnx.content == client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
        assert onnx.headers["content-disposition"] == f'attachment; filename="{model_id}.onnx"'

        assert other.get(f"{base}?format=pt2").status_code == 404  # another tenant's model
        pt2 = client.get(f"{base}?format=pt2", timeout=300)
        assert pt2.status_code == 200, pt2.text
        assert any(k.endswith(f"/{model_id}.pt2") for k in bucket_keys(full_stack))
        start = time.monotonic()
        assert client.get(f"{base}?format=pt2").content == pt2.content  # kept: no second export
        assert time.monotonic() - start < 5

        for fmt, blob in (("onnx", onnx.content), ("pt2", pt2.content)):
            path = tmp_path / f"{model_id}.{fmt}"
            path.write_bytes(blob)
            got = run_standalone(fmt, path, x, tmp_path / f"run-{fmt}")
            np.testing.assert_allclose(got, want, rtol=1e-4,
                                       atol=1e-4 * float(np.abs(want).max()))
