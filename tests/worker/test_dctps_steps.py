"""The dctps step end to end (runner on synthetic-tiny): the allocation report, a checkpoint
without D that reloads identically, a fixed support through training in a chained job, curves
and plot, and clear errors for ops that need dense weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from sqlalchemy import select

from core import models as zoo
from core.data import synthetic
from core.dctps import DCTpSLayer
from core.train import evaluate
from service.db import session_scope
from service.errors import InvalidSpec
from service.orm import Artifact
from tests.worker.conftest import (
    PNG_MAGIC,
    TINY_CONV4,
    TINY_MLP,
    get_job,
    run_ok,
    spec,
    stored_model_path,
)
from worker import runner

# the paper's Adam with weight decay 5e-4 (a larger lr: two epochs on 230 samples)
PAPER_TRAIN = {"op": "train", "epochs": 2, "batch_size": 32, "lr": 0.03, "weight_decay": 5e-4}


def stored(settings, store, tmp_path, result):
    return stored_model_path(settings, store, tmp_path, result["model_id"])


def artifacts(settings, store, job_id):
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        return {a.name: b"".join(store.open_stream(a.storage_key)) for a in rows}


def dctps_tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open)


@pytest.mark.parametrize(("arch", "allocation", "density"),
                         [(TINY_MLP, "epl", 0.3), (TINY_CONV4, "erk", 0.1)])
def test_dctps_then_train_in_a_chained_job(settings, store, submit, tmp_path, arch,
                                           allocation, density):
    job_id, first = run_ok(settings, submit, spec(arch, [
        {"op": "dctps", "density": density, "allocation": allocation}]))
    cut = first["steps"][0]
    layers = cut["layers"]
    assert set(layers) == {n for n, m in zoo.build(arch).named_modules()
                           if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert sum(r["nnz"] for r in layers.values()) == cut["total_nnz"] \
        == round(density * cut["total_weights"])
    for r in layers.values():
        assert r["weights"] == int(torch.tensor(r["shape"]).prod())
        assert r["density"] == pytest.approx(r["nnz"] / r["weights"])
    # D is a fixed buffer: reported apart, not in params; S starts at zero
    assert cut["fixed_dct_params"] == cut["total_weights"]
    biases = sum(r["shape"][0] for r in layers.values())
    assert cut["params"]["trainable"] == cut["total_nnz"] + len(layers) + biases
    assert cut["params"]["total"] == cut["params"]["trainable"]
    assert first["before"]["macs"] == cut["macs"]  # the dense compute of alpha * D + S
    assert 0 <= cut["accuracy"] <= 1 and 0 <= cut["val_accuracy"] <= 1
    assert cut["checkpoint_bytes"] == first["after"]["checkpoint_bytes"]
    assert cut["checkpoint_bytes"] < cut["dense_weight_bytes"]

    path = stored(settings, store, tmp_path, first)
    tensors = dctps_tensors(path)
    assert not any(k.endswith(".D") for k in tensors)  # never stored
    assert not any(k.endswith(".weight") and k[:-7] in layers for k in tensors)
    support = {n: tensors[f"{n}.indices"] for n in layers}
    model = zoo.load(path)
    _, test = synthetic("synthetic-tiny", 1)
    assert evaluate(model, test, device=torch.device("cpu"))["accuracy"] == cut["accuracy"]
    files = artifacts(settings, store, job_id)
    assert files["dctps.png"].startswith(PNG_MAGIC)
    (record,) = json.loads(files["curves.json"])["dctps"]
    assert record["allocation"] == allocation and record["layers"] == {
        n: {k: r[k] for k in ("shape", "weights", "nnz", "density")} for n, r in layers.items()}

    # chained: train only S values, alpha and biases (the paper's wd 5e-4), then evaluate
    train = PAPER_TRAIN if arch["name"] == "mlp" else PAPER_TRAIN | {"epochs": 1,
                                                                     "max_batches": 3}
    _, second = run_ok(settings, submit, spec(first["model_id"], [train, {"op": "evaluate"}]))
    trained = dctps_tensors(stored(settings, store, tmp_path, second))
    for name in layers:
        assert torch.equal(trained[f"{name}.indices"], support[name])  # support unchanged
        assert trained[f"{name}.values"].abs().sum() > 0
    assert any(float(trained[f"{n}.alpha"]) != 1.0 for n in layers)
    assert second["after"]["params"]["total"] == cut["params"]["total"]
    assert second["after"]["params"]["nonzero"] > cut["params"]["nonzero"]
    if arch["name"] == "mlp":  # learned something (the tiny conv4 needs more than 2 epochs)
        assert second["steps"][-1]["accuracy"] > cut["accuracy"] + 0.1


def test_fixed_alpha_named_layers_and_analyze_of_a_dctps_model(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "random", "sparsity": 0.5},
        {"op": "dctps", "density": 0.05, "allocation": "epf", "alpha": 1.0,
         "layers": ["fc1", "fc2"]},
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "analyze", "kinds": ["spectrum", "elbow"], "layers": ["fc1", "fc3"]}]))
    cut = result["steps"][2]
    assert set(cut["layers"]) == {"fc1", "fc2"} and cut["alpha"] == 1.0
    assert sorted(cut["masks_dropped"]) == ["fc1", "fc2"]  # fc3 keeps its pruning mask
    for name in ("fc1", "fc2"):  # epf: equal per row (within one)
        assert cut["layers"][name]["nnz"] == pytest.approx(
            0.05 * 64 * 64 if name == "fc1" else 0.05 * 64 * 32, abs=64)
    analysis = result["steps"][4]
    assert set(analysis["spectrum"]) == {"fc1", "fc3"}
    assert "dense weight alpha*D + S" in analysis["dctps_note"]


def test_ops_that_need_dense_weights_are_refused_after_dctps(settings, submit):
    _, first = run_ok(settings, submit, spec(TINY_MLP, [{"op": "dctps", "density": 0.2}]))
    for op in ({"op": "snip", "sparsity": 0.5}, {"op": "lowrank",
                                                  "target": {"param_ratio": 0.5}}):
        with pytest.raises(InvalidSpec, match="cannot run after the DCTpS transform of model"):
            submit(spec(first["model_id"], [op]))
    # an arch that arrives with a dctps edit anyway: a failed job with the same message
    arch = TINY_MLP | {"edits": [{"op": "dctps", "layers": {"fc1": {"nnz": 8}}}]}
    job_id = submit(spec(arch, [{"op": "magnitude", "sparsity": 0.5}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and "cannot run after the DCTpS" in job.error_message
    assert "run 'magnitude' before dctps" in job.error_message
    # no plain layer left
    job_id = submit(spec(arch, [{"op": "dctps", "layers": ["fc1"]}]))
    assert runner.run_job(job_id, settings) == "failed"
    assert "fc1" in get_job(settings, job_id).error_message


def test_a_dctps_layer_counts_macs_as_the_dense_layer(tmp_path):
    from core.dctps import dctps_transform
    from core.metrics import count_macs, fixed_dct_params, param_counts

    model = zoo.build(TINY_CONV4)
    dense = count_macs(model, [1, 8, 8])
    report = dctps_transform(model, 0.1)
    assert all(isinstance(zoo.get_layer(model, n), DCTpSLayer) for n in report["layers"])
    assert count_macs(model, [1, 8, 8]) == dense
    assert fixed_dct_params(model) == report["total_weights"]
    assert param_counts(model)["trainable"] < report["total_weights"]
