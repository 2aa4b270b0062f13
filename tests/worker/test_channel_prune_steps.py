"""The channel_prune step end to end (runner on synthetic-tiny): the target met on MLP, Conv4 and
ResNet-20, the narrower checkpoint reloading from its data alone, curves.json equal to what
GET /curves serves, the plot, sparse masks cut with their layers, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

from api.routes.jobs import curves as curves_route
from core import models as zoo
from core.data import synthetic
from core.metrics import count_macs, param_counts
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

CONV4 = {**TINY_CONV4, "channels": [16, 16, 32, 32], "fc": [32, 32]}
RESNET = {"name": "resnet", "depth": 20, "width": 0.5, "input_shape": [1, 8, 8]}


def artifacts(settings, store, job_id) -> dict[str, bytes]:
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        return {a.name: b"".join(store.open_stream(a.storage_key)) for a in rows}


@pytest.mark.parametrize(("arch", "prune"), [
    (TINY_MLP, {"criterion": "l1", "target": {"param_ratio": 0.4}}),
    (CONV4, {"criterion": "taylor", "target": {"mac_ratio": 0.5}, "samples": 64,
             "round_to": 8}),
    (RESNET, {"criterion": "l1", "target": {"mac_ratio": 0.5}, "scope": "layerwise"}),
])
def test_target_is_met_and_the_narrower_model_reloads(settings, store, submit, tmp_path, arch,
                                                      prune):
    job_id, result = run_ok(settings, submit, spec(arch, [
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "channel_prune", **prune},
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "evaluate"}]))
    step = result["steps"][1]
    (kind, ratio), = prune["target"].items()
    quantity = "params" if kind == "param_ratio" else "macs"
    assert ratio - 0.05 <= step["ratio"] <= ratio
    assert step[f"{quantity}_after"] == pytest.approx(step["ratio"] * step[f"{quantity}_before"])
    assert step["params"]["total"] == step["params_after"] and step["macs"] == step["macs_after"]
    assert step["after_prune"]["macs"] == step["macs"]
    for group in step["groups"].values():
        assert 1 <= group["kept"] <= group["total"] and len(group["keep"]) == group["kept"]
        if prune.get("round_to", 1) > 1:
            assert group["kept"] == group["total"] or group["kept"] % prune["round_to"] == 0
    assert result["after"]["macs"] < result["before"]["macs"]

    model = zoo.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert model.slimline_arch["edits"][-1]["op"] == "channel_prune"
    assert param_counts(model) == result["after"]["params"]
    assert count_macs(model, arch["input_shape"]) == result["after"]["macs"]
    _, test = synthetic("synthetic-tiny", 1)
    assert evaluate(model, test, device=torch.device("cpu"))["accuracy"] == \
        result["steps"][-1]["accuracy"]
    if arch is RESNET:  # the residual streams stayed consistent
        for s in (1, 2, 3):
            width = step["groups"][f"stage{s}"]["kept"]
            assert {b.conv2.out_channels for b in getattr(model, f"stage{s}")} == {width}

    files = artifacts(settings, store, job_id)
    assert files["channel_prune.png"].startswith(PNG_MAGIC)
    stored = json.loads(files["curves.json"])
    job = get_job(settings, job_id)
    with session_scope(settings) as session:
        served = json.loads(json.dumps(curves_route(job_id, session, job.tenant_id)))
    assert served == stored
    (record,) = served["channel_pruning"]
    assert record["step"] == 1 and record["ratio"] == step["ratio"]
    assert record["groups"] == {g: {"total": r["total"], "kept": r["kept"]}
                                for g, r in step["groups"].items()}


def test_pruning_masks_are_cut_with_their_layers(settings, store, submit, tmp_path):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "magnitude", "sparsity": 0.5},
        {"op": "channel_prune", "target": {"param_ratio": 0.5}},
        {"op": "train", "epochs": 1, "batch_size": 32}]))
    assert "masks_dropped" not in result["steps"][1]
    model = zoo.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert set(model.slimline_masks) == {"fc1", "fc2", "fc3"}
    for name, mask in model.slimline_masks.items():
        weight = model.get_submodule(name).weight
        assert mask.shape == weight.shape and not weight[~mask].any()  # still pruned


@pytest.mark.parametrize(("step", "needle"), [
    ({"target": {"mac_ratio": 0.5}, "layers": ["fc9"]}, "'fc9' is no prunable unit group"),
    ({"target": {"param_ratio": 0.01}, "layers": ["fc2"]}, "out of reach"),
])
def test_errors_fail_the_job_with_a_message(settings, submit, step, needle):
    job_id = submit(spec(TINY_MLP, [{"op": "channel_prune", **step}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and needle in job.error_message, job.error_message


def test_refused_after_dctps(submit):
    with pytest.raises(ValueError, match="cannot run after"):
        submit(spec(TINY_MLP, [{"op": "dctps", "density": 0.1},
                               {"op": "channel_prune", "target": {"mac_ratio": 0.5}}]))
