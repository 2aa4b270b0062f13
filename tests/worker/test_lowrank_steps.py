"""The lowrank step end to end (runner on synthetic-tiny): the param_ratio target, explicit
ranks, the factored checkpoint reloading from data alone, curves and plot, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

from core import models as zoo
from core.data import synthetic
from core.train import evaluate
from service.db import session_scope
from service.orm import Artifact, Model
from tests.worker.conftest import PNG_MAGIC, TINY_CONV4, TINY_MLP, get_job, run_ok, spec
from worker import runner


@pytest.mark.parametrize(("arch", "blocking", "score"), [
    (TINY_MLP, "none", "output_perturbation"),
    (TINY_CONV4, "alds", "output_variance"),
    (TINY_CONV4, "square", "relative_error"),
])
def test_param_ratio_is_met_and_the_factored_model_reloads(settings, store, submit, tmp_path,
                                                           arch, blocking, score):
    job_id, result = run_ok(settings, submit, spec(arch, [
        {"op": "train", "epochs": 2, "batch_size": 32, "lr": 0.003},
        {"op": "lowrank", "target": {"param_ratio": 0.3}, "score": score,
         "blocking": blocking, "samples": 64},
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "evaluate"}]))
    cut = result["steps"][1]
    assert cut["target_met"] and cut["weight_params_after"] <= 0.3 * cut["weight_params_before"]
    assert cut["weight_ratio"] == pytest.approx(
        cut["weight_params_after"] / cut["weight_params_before"])
    assert cut["params"]["total"] < result["steps"][0]["params"]["total"]
    assert cut["macs"] < result["steps"][0]["macs"]
    assert {"accuracy", "val_accuracy", "params", "macs"} <= set(cut["after_cut"])
    for layer in cut["layers"].values():
        assert all(1 <= r <= f for r, f in zip(layer["ranks"], layer["full_ranks"], strict=True))

    with session_scope(settings) as session:
        key = session.get(Model, result["model_id"]).storage_key
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        files = {a.name: b"".join(store.open_stream(a.storage_key)) for a in rows}
    path = tmp_path / "lowrank.safetensors"
    store.get_to_file(key, path)
    model = zoo.load(path)  # rebuilt from the arch's "lowrank" edits alone
    assert [e["op"] for e in model.slimline_arch["edits"]].count("lowrank") == len(cut["layers"])
    _, test = synthetic("synthetic-tiny", 1)
    assert evaluate(model, test, device=torch.device("cpu"))["accuracy"] == \
        result["steps"][-1]["accuracy"]
    assert files["lowrank.png"].startswith(PNG_MAGIC)
    (record,) = json.loads(files["curves.json"])["lowrank"]
    assert record["layers"].keys() == cut["layers"].keys()


def test_explicit_ranks_and_their_errors(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "lowrank", "target": {"ranks": {"fc1": 3, "fc2": [2]}}, "layers": ["fc1", "fc2"],
         "score": "magnitude"}]))
    cut = result["steps"][0]
    assert cut["layers"]["fc1"]["ranks"] == [3] and cut["layers"]["fc2"]["ranks"] == [2]
    for ranks, needle in (({"fc1": [1, 2]}, "has 2 ranks"), ({"fc1": 999}, "exceeds"),
                          ({"fc3": 2}, "not factored")):
        job_id = submit(spec(TINY_MLP, [{"op": "lowrank", "target": {"ranks": ranks},
                                         "layers": ["fc1", "fc2"]}]))
        assert runner.run_job(job_id, settings) == "failed"
        job = get_job(settings, job_id)
        assert job.error_code == "SpecError" and needle in job.error_message, job.error_message


def test_lowrank_after_pruning_drops_the_masks_of_factored_layers(settings, submit):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "random", "sparsity": 0.5},
        {"op": "lowrank", "target": {"ranks": {"fc1": 4}}, "layers": ["fc1"]},
        {"op": "train", "epochs": 1, "batch_size": 32}]))
    assert result["steps"][1]["masks_dropped"] == ["fc1"]


def test_mac_ratio_target_is_met_in_real_macs(settings, submit):
    steps = [{"op": "train", "epochs": 1, "batch_size": 32},
             {"op": "lowrank", "target": {"mac_ratio": 0.5}, "score": "relative_error"}]
    _, result = run_ok(settings, submit, spec(TINY_CONV4, steps))
    dense, cut = result["steps"][0], result["steps"][1]
    assert cut["target"] == {"mac_ratio": 0.5}
    assert cut["target_met"] and cut["mac_ratio"] <= 0.5
    assert cut["mac_ratio"] == pytest.approx(cut["layer_macs_after"] / cut["layer_macs_before"])
    # every Linear/Conv2d is factored, and the measured MACs (core.metrics, counting the
    # factor pairs actually built) are within the budget the selection counted
    assert cut["layer_macs_before"] == dense["macs"]
    assert cut["macs"] <= 0.5 * dense["macs"]
    # every factor counted (the last one is functional)
    assert cut["macs"] == cut["layer_macs_after"]
