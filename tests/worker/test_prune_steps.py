"""The pruning steps end to end (runner on synthetic-tiny): masks kept through training, sparse
checkpoints that reload with their masks, chained jobs, layer collapse, diagnostics, plots."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from sqlalchemy import select

from core import models as zoo
from core.data import synthetic
from core.train import evaluate
from service.db import session_scope
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


def artifacts(settings, store, job_id) -> dict[str, bytes]:
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        return {a.name: b"".join(store.open_stream(a.storage_key)) for a in rows}


@pytest.mark.parametrize("arch", [TINY_MLP, TINY_CONV4])
def test_snip_masks_survive_training_and_the_checkpoint_is_sparse(settings, store, submit,
                                                                   tmp_path, arch):
    job_id, result = run_ok(settings, submit, spec(arch, [
        {"op": "snip", "sparsity": 0.9, "init": "variance_scaling", "batches": 2,
         "batch_size": 32},
        {"op": "train", "epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.05,
         "momentum": 0.9, "weight_decay": 1e-3},
        {"op": "evaluate"}]))
    prune = result["steps"][0]
    assert prune["kept"] == round(0.1 * prune["prunable"])  # exactly kappa
    assert sum(r["kept"] for r in prune["layers"].values()) == prune["kept"]
    assert prune["collapsed"] == [] and prune["scoring_wall_s"] > 0
    jac = prune["jacobian"]
    assert {"mean", "min", "max", "condition_number"} <= set(jac["pruned"])
    # nonzero params: the kept weights (a few may be exactly 0) plus biases and other params
    after = result["after"]
    assert after["params"]["nonzero"] <= after["params"]["total"] - prune["prunable"] \
        + prune["kept"]

    path = stored(settings, store, tmp_path, result)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith(".weight") and k.replace(".weight", "") in prune["layers"]
                   for k in keys)  # no dense copy of a pruned weight
    assert any(k.endswith(".sparse_mask") for k in keys)
    assert after["checkpoint_bytes"] == path.stat().st_size
    model = zoo.load(path)
    masks = model.slimline_masks
    assert set(masks) == set(prune["layers"])
    for name, mask in masks.items():
        weight = zoo.get_layer(model, name).weight
        assert int(mask.sum()) == prune["layers"][name]["kept"]
        assert bool((weight[~mask] == 0).all())  # zero revived through momentum/decay
    _, test = synthetic("synthetic-tiny", 1)
    assert evaluate(model, test, device=torch.device("cpu"))["accuracy"] == \
        result["steps"][-1]["accuracy"]

    files = artifacts(settings, store, job_id)
    assert files["pruning.png"].startswith(PNG_MAGIC)
    curves = json.loads(files["curves.json"])
    (record,) = curves["pruning"]
    assert record["op"] == "snip" and set(record["layers"]) == set(prune["layers"])
    assert record["jacobian"] == prune["jacobian"]
    # a dense first layer: one value per input pixel; a conv: one per kernel tap
    side = arch["input_shape"][1] if arch["name"] == "mlp" else 3
    assert len(record["heatmap"]) == side and len(record["heatmap"][0]) == side
    assert record["heatmap_of"] == ("inputs" if arch["name"] == "mlp" else "kernel taps")


def stored(settings, store, tmp_path, result):
    return stored_model_path(settings, store, tmp_path, result["model_id"])


def test_a_chained_job_keeps_the_input_models_masks(settings, store, submit, tmp_path):
    _, first = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "random", "sparsity": 0.8}]))
    _, second = run_ok(settings, submit, spec(first["model_id"], [
        {"op": "train", "epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.1,
         "momentum": 0.9, "weight_decay": 1e-2}]))
    before = zoo.load(stored(settings, store, tmp_path, first)).slimline_masks
    model = zoo.load(stored(settings, store, tmp_path, second))
    for name, mask in before.items():
        assert torch.equal(model.slimline_masks[name], mask)
        assert bool((zoo.get_layer(model, name).weight[~mask] == 0).all())


def test_pruning_a_pruned_model_only_removes_more(settings, store, submit, tmp_path):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "random", "sparsity": 0.5},
        {"op": "magnitude", "sparsity": 0.75, "scope": "layerwise"}]))
    first, second = result["steps"]
    for name, r in second["layers"].items():
        assert r["kept"] <= first["layers"][name]["kept"]
    assert second["kept"] == round(0.25 * second["prunable"])


def test_layer_collapse_fails_before_training_unless_allowed(settings, submit):
    # a magnitude prune after scaling one layer down: global top-k never reaches fc3
    steps = [{"op": "magnitude", "sparsity": 0.995}, {"op": "train", "epochs": 1}]
    job_id = submit(spec(TINY_MLP, steps))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and "layer collapse" in job.error_message
    assert "allow_collapse" in job.error_message and job.result is None
    steps[0] = steps[0] | {"allow_collapse": True}
    _, result = run_ok(settings, submit, spec(TINY_MLP, steps))
    assert result["steps"][0]["collapsed"]


def test_ldi_ai_repair_and_synflow(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "snip", "sparsity": 0.8, "init": "ldi", "repair": "ai", "labels": "uniform"},
        {"op": "synflow", "sparsity": 0.9, "rounds": 10}]))
    snip, synflow = result["steps"]
    repair = snip["repair"]
    assert repair["method"] == "ai"
    assert repair["os_after"] < repair["os_before"]
    assert synflow["kept"] == round(0.1 * synflow["prunable"]) and synflow["collapsed"] == []


@pytest.mark.parametrize(("step", "field"), [
    ({"op": "snip", "sparsity": 1.0}, "sparsity"),
    ({"op": "random", "sparsity": 0.5, "batches": 2}, "only used by op 'snip'"),
    ({"op": "snip", "sparsity": 0.5, "rounds": 3}, "only used by op 'synflow'"),
    ({"op": "snip", "sparsity": 0.5, "scope": "per-layer"}, "scope"),
])
def test_bad_prune_specs_are_rejected(step, field):
    from pydantic import ValidationError

    from service.spec import JobSpec

    with pytest.raises(ValidationError, match=field):
        JobSpec.model_validate(spec(TINY_MLP, [step]))
