"""worker.steps for the complete PCN: output-based transform with auto layers, target search,
the plateau trigger, effective-dimensionality tracking, curves and plots (runner end to end on
synthetic-tiny)."""
from __future__ import annotations

import json

import matplotlib.image
import pytest
import torch
from sqlalchemy import select

from api.routes.jobs import curves as curves_route
from core import models as zoo
from core.data import synthetic
from core.metrics import param_counts
from core.train import TrainConfig, evaluate
from service.db import session_scope
from service.orm import Artifact, Model
from tests.worker.conftest import TINY_MLP, get_job
from worker import runner
from worker.step_pcn import PlateauWatch
from worker.step_train import _remaining

TINY_CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [4, 4, 8, 8],
              "fc": [16, 16]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spec(arch, steps, seed=1):
    return {"model": {"arch": arch}, "dataset": "synthetic-tiny", "steps": steps, "seed": seed}


def run(settings, submit, spec_) -> dict:
    job_id = submit(spec_)
    status = runner.run_job(job_id, settings)
    job = get_job(settings, job_id)
    assert status == "succeeded", (job.error_code, job.error_message)
    return {"id": job_id, "tenant": job.tenant_id, "result": job.result}


def artifacts(settings, store, job_id) -> dict[str, tuple[str, bytes]]:
    with session_scope(settings) as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        return {a.name: (a.kind, b"".join(store.open_stream(a.storage_key))) for a in rows}


def reload_and_check(settings, store, tmp_path, result) -> torch.nn.Module:
    """The stored model rebuilds from its file alone and gives what the worker measured."""
    with session_scope(settings) as session:
        key = session.get(Model, result["model_id"]).storage_key
    path = tmp_path / "out.safetensors"
    store.get_to_file(key, path)
    model = zoo.load(path)
    assert param_counts(model) == result["after"]["params"]
    _, test = synthetic("synthetic-tiny", 1)
    measured = result["steps"][-1]  # the evaluate step: test loss and accuracy
    got = evaluate(model, test, device=torch.device("cpu"))
    assert got["accuracy"] == measured["accuracy"]
    assert got["loss"] == pytest.approx(measured["loss"], rel=1e-6)
    return model


def check_plots(files: dict[str, tuple[str, bytes]], tmp_path) -> None:
    for name in ("training.png", "effective_dim.png"):
        kind, data = files[name]
        assert kind == "plot" and data.startswith(PNG_MAGIC)
        (tmp_path / name).write_bytes(data)
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize(("arch", "pcn", "pruned", "layers"), [
    (TINY_MLP, {"select": {"dims": 4}}, "fc1", ["fc1", "fc2"]),
    # fc1 reads conv4's 8 filters x 2x2 positions = 32 dims; 2 dims is >= 10x: conv4 is pruned
    (TINY_CONV4, {"select": {"dims": 4}, "per_layer": {"fc1": {"dims": 2}}}, "conv4",
     ["conv3", "conv4", "fc1", "fc2", "fc3"]),
])
def test_tracked_output_based_pipeline(settings, store, submit, tmp_path, arch, pcn, pruned,
                                       layers):
    job = run(settings, submit, spec(arch, [
        {"op": "train", "epochs": 3, "batch_size": 32, "lr": 0.003,
         "track": ["effective_dim"], "track_thresholds": [0.1, 0.01], "track_samples": 200},
        {"op": "pcn", "output_based": True, "layers": "auto", "samples": 200, **pcn},
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "evaluate"}]))
    result = job["result"]
    step = result["steps"][1]
    assert list(step["layers"]) == layers and step["layer_selection"] == "auto"
    assert list(step["output"]) == [pruned]
    out = step["output"][pruned]
    assert 1 <= out["keep"] < out["units"] and len(out["kept"]) == out["keep"]
    reader = layers[layers.index(pruned) + 1] if pruned in layers else "fc2"
    assert step["layers"][reader]["in_dim"] == out["keep"] * (4 if pruned == "conv4" else 1)
    assert step["transform_wall_s"] == pytest.approx(step["stats_wall_s"]
                                                     + step["surgery_wall_s"])
    assert 0 < step["stats_pass_s"] + step["stats_solve_s"] <= step["stats_wall_s"]
    after = step["after_transform"]
    assert after["params"] == step["params"] and after["macs"] == step["macs"]
    assert after["accuracy"] == step["accuracy"] and step["val_accuracy"] == after["val_accuracy"]
    assert step["params"]["trainable"] < step["params"]["total"]  # U and mu are frozen buffers
    assert result["after"]["macs"] < result["before"]["macs"]
    model = reload_and_check(settings, store, tmp_path, result)
    assert [e["op"] for e in model.slimline_arch["edits"]] == (
        ["pcn_output"] + ["pcn_input"] * len(layers))

    files = artifacts(settings, store, job["id"])
    stored = json.loads(files["curves.json"][1])
    with session_scope(settings) as session:
        served = json.loads(json.dumps(curves_route(job["id"], session, job["tenant"])))
    assert served == stored  # GET /curves rebuilds what the worker stored
    assert [p["global_epoch"] for p in served["training"]] == [1, 2, 3, 4]
    tracked = served["effective_dim"]
    assert set(tracked) == set(layers)  # auto layers of the input model
    for points in tracked.values():
        assert [p["epoch"] for p in points] == [1, 2, 3]
        assert all(set(p["effective_dim"]) == {"0.1", "0.01"} for p in points)
        assert all(p["effective_dim"]["0.01"] >= p["effective_dim"]["0.1"] >= 1
                   for p in points)
        assert all(0 <= p["val_accuracy"] <= 1 for p in points)
    spectra = served["spectra"][layers[0]]
    assert [s["source"] for s in spectra] == ["effective_dim"] * 3 + ["pcn"]
    assert all(len(s["eigvals"]) <= 256 for s in spectra)
    assert served["transforms"] == [{"step": 1, "global_epoch": 3, "when": "now",
                                     "fired_at_epoch": None,
                                     "layers": {n: step["layers"][n]["dims"] for n in layers},
                                     "output": {pruned: out["keep"]}}]
    check_plots(files, tmp_path)


def test_target_trainable_params_meets_the_budget(settings, store, submit, tmp_path):
    budget = 5000  # dense: 6570 trainable
    job = run(settings, submit, spec(TINY_MLP, [
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "pcn", "select": {"target": {"trainable_params": budget}}, "samples": 200},
        {"op": "evaluate"}]))
    step = job["result"]["steps"][1]
    assert 0.97 * budget <= step["params"]["trainable"] <= budget
    target = step["target"]
    assert target["kind"] == "trainable_params" and target["goal"] == budget
    assert target["value"] == step["params"]["trainable"]
    assert target["fraction"] == pytest.approx(target["value"] / budget)
    assert target["dims"] == {n: r["dims"] for n, r in step["layers"].items()}
    assert target["evaluations"] >= 2 and "5,000" in target["reason"]
    reload_and_check(settings, store, tmp_path, job["result"])


@pytest.mark.parametrize(("kind", "budget"), [("trainable_params", 30000), ("macs", 30000)])
def test_size_target_on_lenet300_lands_on_the_budget(settings, submit, kind, budget):
    """LeNet-300-100 (266,610 trainable): the old common threshold gave 10,910 for 30,000; the
    per-layer allocation lands within 3% below, on every kind `core.budget` measures."""
    job = run(settings, submit, {
        "model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs", "seed": 1,
        "steps": [{"op": "pcn", "select": {"target": {kind: budget}}, "samples": 1000}]})
    step = job["result"]["steps"][0]
    target = step["target"]
    measured = step["params"]["trainable"] if kind == "trainable_params" else step["macs"]
    assert target["value"] == measured
    assert 0.97 * budget <= measured <= budget
    assert set(target["dims"]) == {"fc1", "fc2"}


def test_target_max_accuracy_drop(settings, submit):
    job = run(settings, submit, spec(TINY_MLP, [
        {"op": "train", "epochs": 2, "batch_size": 32, "lr": 0.003},
        {"op": "pcn", "select": {"target": {"max_accuracy_drop": 0.05}}, "samples": 200}]))
    step = job["result"]["steps"][1]
    target = step["target"]
    assert target["kind"] == "max_accuracy_drop" and "baseline" in target
    assert step["val_accuracy"] == pytest.approx(target["value"])
    assert step["val_accuracy"] >= target["baseline"] - 0.05 - 1e-12


@pytest.mark.parametrize(("pcn", "needles"), [
    ({"select": {"target": {"trainable_params": 100}}},
     ["trainable_params budget of 100", "at least 522"]),
    ({"select": {"dims": 2}, "per_layer": {"fc3": {"dims": 2}}}, ["fc3", "fc1, fc2"]),
    ({"select": {"dims": 2}, "layers": ["fc9"]}, ["fc9", "valid layers: fc1, fc2, fc3"]),
])
def test_unmeetable_pcn_specs_fail_with_a_clear_spec_error(settings, store, submit, pcn,
                                                           needles):
    job_id = submit(spec(TINY_MLP, [{"op": "pcn", "samples": 100, **pcn}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and job.result is None
    for needle in needles:
        assert needle in job.error_message, job.error_message


def test_bad_track_layer_fails_naming_valid_layers(settings, submit):
    job_id = submit(spec(TINY_MLP, [{"op": "train", "track": ["effective_dim"],
                                     "track_layers": ["conv1"]}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError" and "fc1, fc2, fc3" in job.error_message


def test_plateau_fires_inside_the_train_step(settings, store, submit, tmp_path):
    # every gain is < 1.0: fires after epoch 1, then epochs 2..4 train the transformed model
    job = run(settings, submit, spec(TINY_MLP, [
        {"op": "train", "epochs": 4, "batch_size": 32, "track": ["effective_dim"],
         "track_samples": 100},
        {"op": "pcn", "select": {"dims": 4}, "when": "plateau", "plateau_delta": 1.0,
         "samples": 200},
        {"op": "evaluate"}]))
    train_step, pcn, _ = job["result"]["steps"]
    assert pcn["when"] == "plateau" and pcn["fired_at_epoch"] == 1
    assert pcn["applied_after_epoch"] == 1 and pcn["applied_in_step"] == 0
    assert pcn["plateau"] == {"delta": 1.0, "min_epochs": 1, "fired": True}
    assert train_step["pcn"] == {"step": 1, "fired_at_epoch": 1, "applied_after_epoch": 1}
    assert [h["epoch"] for h in train_step["history"]] == [1, 2, 3, 4]
    # the record of the train step describes the final model: transformed, then trained
    assert train_step["params"] == pcn["params"] == job["result"]["after"]["params"]
    assert pcn["after_transform"]["params"] == pcn["params"]
    assert train_step["params"]["trainable"] < job["result"]["before"]["params"]["trainable"]
    files = artifacts(settings, store, job["id"])
    curves = json.loads(files["curves.json"][1])
    assert [t["global_epoch"] for t in curves["transforms"]] == [1]
    assert curves["transforms"][0]["fired_at_epoch"] == 1
    # tracking goes on after the transform: a PCN layer's input is the same activation
    assert [p["epoch"] for p in curves["effective_dim"]["fc2"]] == [1, 2, 3, 4]
    reload_and_check(settings, store, tmp_path, job["result"])


def test_plateau_that_never_fires_applies_after_the_last_epoch(settings, submit):
    job = run(settings, submit, spec(TINY_MLP, [
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "pcn", "select": {"dims": 4}, "when": "plateau", "plateau_min_epochs": 2,
         "samples": 100}]))
    _, pcn = job["result"]["steps"]
    assert pcn["fired_at_epoch"] is None and pcn["applied_after_epoch"] == 1
    assert pcn["plateau"]["fired"] is False and "after the last epoch" in pcn["plateau"]["note"]
    assert pcn["params"] == pcn["after_transform"]["params"]


def test_plateau_watch_and_the_continued_schedule():
    watch = PlateauWatch(delta=0.01, min_epochs=2, previous=0.1)
    assert [watch.update(e, a) for e, a in [(1, 0.5), (2, 0.505), (3, 0.6)]] == [
        False, True, False]
    assert watch.fired_at == 2  # the first epoch >= min_epochs gaining < delta
    config = TrainConfig(epochs=5, lr=0.1, lr_steps=(1, 3), lr_gamma=0.5)
    rest = _remaining(config, 2)
    assert (rest.epochs, rest.lr, rest.lr_steps) == (3, 0.05, (1,))


@pytest.mark.parametrize("select", [{"threshold": 0.05}, {"energy": 0.9}])
def test_default_kept_only_solver_matches_the_full_spectrum(settings, submit, select):
    """The default computes only what the selector needs; the result is the full-eigh one."""
    results = []
    for solver in ("auto", "eigh"):
        job = run(settings, submit, spec(TINY_CONV4, [
            {"op": "train", "epochs": 1, "batch_size": 32},
            {"op": "pcn", "select": select, "layers": ["conv3", "conv4", "fc1", "fc2"],
             "samples": 20, "solver": solver}]))  # fc1: 20 samples < 32 dims -> Gram route
        results.append(job["result"]["steps"][1])
    fast, exact = results
    assert {n: r["dims"] for n, r in fast["layers"].items()} == \
        {n: r["dims"] for n, r in exact["layers"].items()}
    for name, r in fast["layers"].items():
        assert r["explained_variance"] == pytest.approx(
            exact["layers"][name]["explained_variance"], rel=1e-6)
    assert fast["accuracy"] == exact["accuracy"]
    for kind in ("total", "trainable"):  # nonzero may differ: exact zeros vs round-off
        assert fast["params"][kind] == exact["params"][kind]
