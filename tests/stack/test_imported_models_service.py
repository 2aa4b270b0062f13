"""Bring your own model, through the service (the embedded default: API + inspector + worker
processes): three architectures that are not in the zoo (tests/import_models.py) are exported
by the user's side (`torch.export` and `torch.onnx.export`), uploaded, trained on a Fashion-MNIST
subset, compressed with lowrank, pcn, snip and channel_prune, exported to ONNX, and the ONNX file
run by onnxruntime equals the compressed checkpoint run by torch."""
from __future__ import annotations

import io
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core import models as zoo
from core.data import ArrayDataset, fashion_mnist
from core.train import evaluate
from tests.import_models import example_input, export_onnx, export_pt2, make
from tests.stack.flows import run_job_ok, upload_model
from worker.datasets import SYSTEM_DIR

pytestmark = pytest.mark.service

TRAIN = {"op": "train", "epochs": 1, "batch_size": 64}
FINETUNE = {"op": "train", "epochs": 1, "batch_size": 64, "max_batches": 25}
FASHION_MNIST_DIR = SYSTEM_DIR  # make test installs it (dataset-fashion-mnist)
# one setting per method; each job ends with an ONNX export of its result
COMPRESSIONS = {
    "lowrank": {"op": "lowrank", "target": {"param_ratio": 0.8}, "samples": 256},
    "pcn": {"op": "pcn", "select": {"energy": 0.99}, "samples": 256},
    "snip": {"op": "snip", "sparsity": 0.8, "batches": 2},
    "channel_prune": {"op": "channel_prune", "target": {"mac_ratio": 0.8}},
}
EXPORT = {"op": "export", "formats": ["onnx"]}


def _upload(client, tmp_path, name: str, fmt: str) -> dict:
    model = make(name)
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "pt2":
        export_pt2(model, path)
    else:
        # both exporters; the MobileNet keeps its BatchNorms (folded into freshly initialised
        # depthwise convs it does not learn in one epoch)
        export_onnx(model, path, dynamo=(name != "mobilenetv2"),
                    keep_batchnorm=(name == "mobilenetv2"))
    r = upload_model(client, path.read_bytes(), filename=path.name, name=name)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["arch"]["name"] == "graph" and doc["arch"]["input_shape"] == [1, 28, 28]
    assert doc["arch"]["num_classes"] == 10
    weights = sum(p.numel() for p in model.parameters())
    if fmt == "pt2" or name == "mobilenetv2":  # every weight, the BatchNorms' included
        assert doc["params"]["trainable"] == weights
    else:  # torch.onnx folds each BatchNorm into the conv before it: fewer, never more
        assert 0 < doc["params"]["trainable"] <= weights
    report = client.get(f"/v1/models/{doc['id']}").json()["report"]
    assert report["layers"] and report["totals"]["params"] > 0
    kinds = {layer["kind"] for layer in report["layers"]}
    assert kinds & {"conv", "linear"}
    return doc


def _onnx_matches_checkpoint(client, tmp_path, job: dict, test) -> None:
    """The job's checkpoint reloads from its one file, scores the accuracy the job reported on
    the same test images, and its ONNX file equals it in onnxruntime."""
    job_id = job["id"]
    ckpt = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
    onnx_file = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
    assert ckpt.status_code == 200 and onnx_file.status_code == 200, onnx_file.text
    (tmp_path / "m.safetensors").write_bytes(ckpt.content)
    (tmp_path / "m.onnx").write_bytes(onnx_file.content)
    model = zoo.load(tmp_path / "m.safetensors")  # one downloaded file rebuilds the graph
    accuracy = evaluate(model, test, device=torch.device("cpu"))["accuracy"]
    assert accuracy == pytest.approx(job["result"]["after"]["accuracy"], abs=0.003)
    x = example_input(batch=5)
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fmnist_subset(embedded_stack) -> tuple[str, ArrayDataset]:
    """A Fashion-MNIST subset (3000 training, 1000 test images) uploaded as a dataset: its id,
    and its test split as the worker reads it."""
    train, test = fashion_mnist(FASHION_MNIST_DIR)
    arrays = {"x_train": (train.x[:3000, 0] * 255).round().to(torch.uint8).numpy(),
              "y_train": train.y[:3000].numpy(),
              "x_test": (test.x[:1000, 0] * 255).round().to(torch.uint8).numpy(),
              "y_test": test.y[:1000].numpy()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with embedded_stack.client() as client:
        r = client.post("/v1/datasets", files={"file": ("fmnist.npz", buf.getvalue())},
                        data={"name": "fmnist-subset"})
    assert r.status_code == 201, r.text
    return r.json()["id"], test.subset(torch.arange(1000))


def _run(client, model_id: str, dataset: str, steps: list[dict], seed: int) -> dict:
    """Run a job to success; checks that its first (training) epoch learned something."""
    t0 = time.monotonic()
    job = run_job_ok(client, {"model": model_id, "dataset": dataset, "steps": steps,
                              "seed": seed})
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"format": "json"}).json()["items"]
    print(f"job {[s['op'] for s in steps]}: {time.monotonic() - t0:.1f} s")
    first_epoch = next(e["data"] for e in events if e["kind"] == "epoch")
    # 3000 images, one epoch: the imported model learns (chance is 0.1; val holds 300 images)
    assert first_epoch["val_accuracy"] > 0.2, first_epoch
    return job


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18", "vit"])
def test_imported_model_trains_compresses_and_exports(embedded_stack, fmnist_subset, tmp_path,
                                                      name, fmt):
    with embedded_stack.client() as client:
        doc = _upload(client, tmp_path, name, fmt)
        # train, then the structured methods: channel_prune narrows, lowrank factorizes
        first = _run(client, doc["id"], fmnist_subset[0],
                     [TRAIN, COMPRESSIONS["channel_prune"], COMPRESSIONS["lowrank"],
                      FINETUNE, {"op": "evaluate"}, EXPORT], seed=1)
        before, after = first["result"]["before"], first["result"]["after"]
        assert after["macs"] < before["macs"] and \
            after["params"]["total"] < before["params"]["total"], (before, after)
        _onnx_matches_checkpoint(client, tmp_path, first, fmnist_subset[1])
        # train, then PCN (input-based) and SNIP masks on top
        second = _run(client, doc["id"], fmnist_subset[0],
                      [TRAIN, COMPRESSIONS["pcn"], COMPRESSIONS["snip"], FINETUNE,
                       {"op": "evaluate"}, EXPORT], seed=2)
        before, after = second["result"]["before"], second["result"]["after"]
        # PCN's frozen bases count in `total`; the trained weights shrink, and SNIP zeroes 80 %
        assert after["params"]["trainable"] < before["params"]["trainable"], (before, after)
        ops = [s["op"] for s in second["result"]["steps"]]
        assert ops == ["train", "pcn", "snip", "train", "evaluate", "export"]
        _onnx_matches_checkpoint(client, tmp_path, second, fmnist_subset[1])
