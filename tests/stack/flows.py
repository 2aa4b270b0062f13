"""The upload → job → poll → download flow, shared by the full-stack and embedded tests."""
from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import torch

from core import models as zoo
from core.data import synthetic
from core.metrics import param_counts
from core.train import evaluate

TERMINAL = {"succeeded", "failed", "canceled"}

PIPELINE = [
    {"op": "train", "epochs": 1, "optimizer": "adam", "lr": 0.001, "batch_size": 128},
    {"op": "pcn", "layers": ["fc1", "fc2"], "select": {"dims": 32}, "samples": 1000},
    {"op": "train", "epochs": 1},
    {"op": "evaluate"},
]


def checkpoint_bytes(arch: dict, tmp_path: Path, seed: int = 0,
                     mutate=None, with_metadata: bool = True) -> bytes:
    """A safetensors checkpoint of a freshly built model (optionally tampered with)."""
    torch.manual_seed(seed)
    model = zoo.build(arch)
    path = tmp_path / f"ckpt-{seed}.safetensors"
    if mutate is None and with_metadata:
        zoo.save(model, path)
        return path.read_bytes()
    from safetensors.torch import save_file

    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if mutate is not None:
        mutate(tensors)
    save_file(tensors, str(path))
    return path.read_bytes()


def upload_model(client: httpx.Client, data: bytes, filename: str = "model.safetensors",
                 arch: str | None = None, name: str = "lenet") -> httpx.Response:
    form = {"name": name}
    if arch is not None:
        form["arch"] = arch
    return client.post("/v1/models", files={"file": (filename, io.BytesIO(data))}, data=form)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {job}")


def run_job_ok(client: httpx.Client, spec: dict) -> dict:
    """POST a job (202), wait for it, assert it succeeded; the job's JSON."""
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def run_compression_flow(client: httpx.Client, tmp_path: Path) -> dict:
    """Upload LeNet-300-100, run train → pcn → train → evaluate, download and check the result."""
    r = upload_model(client, checkpoint_bytes({"name": "lenet300"}, tmp_path))
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["params"]["total"] == 266_610
    assert model["arch"]["name"] == "lenet300"

    spec = {"model": model["id"], "dataset": "synthetic-blobs", "steps": PIPELINE, "seed": 3}
    r = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"flow-{model['id']}"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"flow-{model['id']}"})
    assert again.status_code in (200, 202) and again.json()["id"] == job_id

    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0
    result = job["result"]
    assert [s["op"] for s in result["steps"]] == [s["op"] for s in PIPELINE]
    before, after = result["before"], result["after"]
    for side in (before, after):
        assert set(side["params"]) >= {"total", "trainable", "nonzero"}
        assert 0.0 <= side["accuracy"] <= 1.0 and side["macs"] > 0
    assert after["params"]["trainable"] < before["params"]["trainable"] / 5
    assert after["params"]["total"] < before["params"]["total"]
    assert after["accuracy"] > 0.5  # synthetic-blobs is easy: a broken pipeline gives ~0.1

    names = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert {"model.safetensors", "report.json"} <= set(names)
    blob = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
    assert blob.status_code == 200 and len(blob.content) == names["model.safetensors"]["size_bytes"]
    path = tmp_path / "result.safetensors"
    path.write_bytes(blob.content)
    out = zoo.load(path)
    counts = param_counts(out)
    assert counts == after["params"]
    _, test = synthetic("synthetic-blobs", 3)
    acc = evaluate(out, test, device=torch.device("cpu"))["accuracy"]
    assert abs(acc - after["accuracy"]) < 0.02

    # the compressed model is a Model of its own, so jobs chain
    m = client.get(f"/v1/models/{result['model_id']}")
    assert m.status_code == 200 and m.json()["params"] == after["params"]
    same = client.get(f"/v1/models/{result['model_id']}/file")
    assert same.status_code == 200 and same.content == blob.content

    events = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}).json()["items"]
    assert any(e.get("kind") == "epoch" for e in events)
    return {"job_id": job_id, "model_id": model["id"], "result_model_id": result["model_id"]}
