"""The service against real PostgreSQL + Redis + an S3 HTTP endpoint + uvicorn + a Celery worker."""
from __future__ import annotations

import math
import os
import time

import boto3
import pytest
import torch

from tests.stack.flows import (
    checkpoint_bytes,
    run_compression_flow,
    run_job_ok,
    upload_model,
    wait_job,
)

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def keys(full_stack):
    return {"a": full_stack.create_key("alice-key", "alice"),
            "b": full_stack.create_key("bob-key", "bob")}


def bucket_keys(stack) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=stack.env["SLIMLINE_S3_ENDPOINT_URL"],
                      aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    out = s3.list_objects_v2(Bucket=stack.bucket)
    return {o["Key"] for o in out.get("Contents", [])}


def test_health_and_auth(full_stack, keys):
    with full_stack.client() as anon:
        assert anon.get("/healthz").status_code == 200
        ready = anon.get("/readyz")
        assert ready.status_code == 200, ready.text
        r = anon.get("/v1/jobs")
        assert r.status_code == 401 and r.json()["error"]
    with full_stack.client("sl_not-a-real-key") as bad:
        assert bad.get("/v1/jobs").status_code == 401


def test_upload_job_download_on_full_stack(full_stack, keys, tmp_path):
    with full_stack.client(keys["a"]) as client:
        ids = run_compression_flow(client, tmp_path)
    stored = bucket_keys(full_stack)
    assert any(k.endswith(".safetensors") for k in stored)
    full_stack.flow_ids = ids  # reused by the isolation test


def test_tenant_isolation(full_stack, keys, tmp_path):
    ids = getattr(full_stack, "flow_ids", None)
    if ids is None:
        with full_stack.client(keys["a"]) as client:
            ids = run_compression_flow(client, tmp_path)
    with full_stack.client(keys["b"]) as bob:
        for path in (f"/v1/models/{ids['model_id']}", f"/v1/models/{ids['model_id']}/file",
                     f"/v1/models/{ids['result_model_id']}", f"/v1/jobs/{ids['job_id']}",
                     f"/v1/jobs/{ids['job_id']}/artifacts",
                     f"/v1/jobs/{ids['job_id']}/artifacts/model.safetensors",
                     f"/v1/jobs/{ids['job_id']}/events?format=json"):
            r = bob.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.json()["error"]
        assert bob.post(f"/v1/jobs/{ids['job_id']}/cancel").status_code == 404
        assert ids["job_id"] not in {j["id"] for j in bob.get("/v1/jobs").json()["items"]}
        r = bob.post("/v1/jobs", json={"model": ids["model_id"], "dataset": "synthetic-tiny",
                                       "steps": [{"op": "evaluate"}]})
        assert r.status_code == 404, r.text


def test_cancel_running_job_and_pagination(full_stack, keys):
    with full_stack.client(keys["a"]) as client:
        spec = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
                "steps": [{"op": "train", "epochs": 100, "batch_size": 16}]}
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        job = wait_job(client, job_id, timeout=120)
        assert job["status"] == "canceled"
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 409 and r.json()["error"]

        seen, cursor = [], None
        while True:
            params = {"limit": 1} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/jobs", params=params).json()
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert job_id in seen and len(seen) == len(set(seen)) >= 2
        assert client.get("/v1/jobs", params={"status": "canceled"}).json()["items"][0]["id"] \
            == job_id


class _Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_get_4xx_and_leave_nothing_behind(full_stack, keys, tmp_path):
    arch = {"name": "lenet300"}
    with full_stack.client(keys["a"]) as client:
        models_before = len(client.get("/v1/models").json()["items"])
        jobs_before = len(client.get("/v1/jobs", params={"limit": 100}).json()["items"])
        objects_before = bucket_keys(full_stack)

        good = checkpoint_bytes(arch, tmp_path)
        marker = tmp_path / "pwned"
        pickled = tmp_path / "evil.pt"
        torch.save({"fc1.weight": _Payload(marker)}, pickled)

        def wrong_shape(t):
            t["fc1.weight"] = torch.zeros(10, 784)

        def nan_weight(t):
            t["fc2.weight"][0, 0] = math.nan

        cases = {
            "truncated": (upload_model(client, good[: len(good) // 2]), 422),
            "pickle payload": (upload_model(client, pickled.read_bytes(), "evil.pt",
                                            arch='{"name": "lenet300"}'), 422),
            "wrong shapes": (upload_model(client, checkpoint_bytes(arch, tmp_path, 1, wrong_shape),
                                          arch='{"name": "lenet300"}'), 422),
            "nan weights": (upload_model(client, checkpoint_bytes(arch, tmp_path, 2, nan_weight),
                                         arch='{"name": "lenet300"}'), 422),
            "unknown arch": (upload_model(client, good, arch='{"name": "nope"}'), 422),
            "not a checkpoint": (upload_model(client, b"hello world", "model.txt"), 415),
            "oversize": (upload_model(client, b"\0" * (9 * 1024 * 1024)), 413),
            "epochs out of bounds": (client.post("/v1/jobs", json={
                "model": {"arch": arch}, "dataset": "synthetic-tiny",
                "steps": [{"op": "train", "epochs": 10**7}]}), 422),
            "negative lr": (client.post("/v1/jobs", json={
                "model": {"arch": arch}, "dataset": "synthetic-tiny",
                "steps": [{"op": "train", "epochs": 1, "lr": -1}]}), 422),
            "unknown op": (client.post("/v1/jobs", json={
                "model": {"arch": arch}, "dataset": "synthetic-tiny",
                "steps": [{"op": "frobnicate"}]}), 422),
            "unknown dataset": (client.post("/v1/jobs", json={
                "model": {"arch": arch}, "dataset": "no-such-dataset",
                "steps": [{"op": "evaluate"}]}), 404),
        }
        for name, (resp, status) in cases.items():
            assert resp.status_code == status, (name, resp.status_code, resp.text)
            body = resp.json()
            assert body["error"] and len(body["detail"]) > 10, (name, body)
            assert "Traceback" not in resp.text
        assert not marker.exists(), "the pickle payload was executed"
        assert "fc1.weight" in cases["wrong shapes"][0].json()["detail"]
        assert "frobnicate" in cases["unknown op"][0].json()["detail"]

        assert len(client.get("/v1/models").json()["items"]) == models_before
        assert len(client.get("/v1/jobs", params={"limit": 100}).json()["items"]) == jobs_before
        assert bucket_keys(full_stack) == objects_before


def test_pruning_job_stores_a_sparse_model_that_chains_and_reuploads(full_stack, keys,
                                                                     tmp_path):
    """snip through the real stack: the S3-stored checkpoint is sparse, reloads with its
    masks, a chained train job keeps them, and the file is accepted again as an upload."""
    from core import models as zoo

    spec = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs", "seed": 2,
            "steps": [{"op": "snip", "sparsity": 0.95, "init": "variance_scaling"},
                      {"op": "train", "epochs": 1}]}
    with full_stack.client(keys["a"]) as client:
        job = run_job_ok(client, spec)
        snip, after = job["result"]["steps"][0], job["result"]["after"]
        assert snip["kept"] == round(0.05 * snip["prunable"]) and snip["collapsed"] == []
        blob = client.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors").content
        assert len(blob) == after["checkpoint_bytes"]
        assert len(blob) < 0.25 * 266_610 * 4  # kept values + 1 bit per weight
        names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
        assert "pruning.png" in names
        path = tmp_path / "sparse.safetensors"
        path.write_bytes(blob)
        masks = zoo.load(path).slimline_masks
        assert sum(int(m.sum()) for m in masks.values()) == snip["kept"]

        second = run_job_ok(client, {
            "model": job["result"]["model_id"], "dataset": "synthetic-blobs",
            "steps": [{"op": "train", "epochs": 1, "optimizer": "sgd", "lr": 0.05,
                       "weight_decay": 0.01}]})
        out = tmp_path / "chained.safetensors"
        out.write_bytes(client.get(
            f"/v1/jobs/{second['id']}/artifacts/model.safetensors").content)
        model = zoo.load(out)
        for name, mask in masks.items():
            assert torch.equal(model.slimline_masks[name], mask)
            assert bool((zoo.get_layer(model, name).weight[~mask] == 0).all())

        again = upload_model(client, blob, name="sparse-lenet")
        assert again.status_code == 201, again.text
        assert again.json()["params"]["nonzero"] <= after["params"]["nonzero"]


def test_dctps_job_and_principal_angles_between_two_models(full_stack, keys, tmp_path):
    """dctps → train → evaluate through the real stack stores a small checkpoint without D that
    reloads; an analyze job compares two of the tenant's models (principal angles)."""
    from safetensors import safe_open

    from core import models as zoo

    spec = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs", "seed": 4,
            "steps": [{"op": "dctps", "density": 0.01},
                      {"op": "train", "epochs": 1, "weight_decay": 5e-4},
                      {"op": "evaluate"}]}
    with full_stack.client(keys["a"]) as client:
        job = run_job_ok(client, spec)
        cut, after = job["result"]["steps"][0], job["result"]["after"]
        assert cut["total_nnz"] == round(0.01 * 266_200) and cut["fixed_dct_params"] == 266_200
        assert after["params"]["trainable"] == cut["total_nnz"] + 3 + 410  # S, alphas, biases
        blob = client.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors").content
        assert len(blob) == after["checkpoint_bytes"] < 0.05 * 266_610 * 4  # no dense D
        path = tmp_path / "dctps.safetensors"
        path.write_bytes(blob)
        with safe_open(str(path), framework="pt") as f:
            assert not any(k.endswith((".D", ".weight")) for k in f.keys())  # noqa: SIM118
        assert zoo.load(path).fc1.nnz == cut["layers"]["fc1"]["nnz"]
        names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
        assert {"dctps.png", "training.png"} <= names
        curves = client.get(f"/v1/jobs/{job['id']}/curves").json()
        assert curves["dctps"][0]["total_nnz"] == cut["total_nnz"]

        ids = []
        for seed in (0, 1):
            up = upload_model(client, checkpoint_bytes({"name": "lenet300"}, tmp_path, seed),
                              name=f"lenet-{seed}")
            assert up.status_code == 201, up.text
            ids.append(up.json()["id"])
        job = run_job_ok(client, {
            "model": ids[0], "dataset": "synthetic-blobs",
            "steps": [{"op": "analyze", "kinds": ["angles", "spectrum"], "layers": ["fc2"],
                       "other_model": ids[1], "k": 10}]})
        analysis = job["result"]["steps"][0]
        assert analysis["angles"]["fc2"]["mean"] > 30  # independent initialisations
        assert analysis["spectrum"]["fc2"]["init_source"] == "upload"
        names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
        assert {"angles.png", "spectrum.png"} <= names
        curves = client.get(f"/v1/jobs/{job['id']}/curves").json()["analysis"]
        assert curves["angles"]["fc2"][0]["other_model"] == ids[1]
        assert len(curves["spectrum"]["fc2"][0]["eigenvalues"]) == 100
