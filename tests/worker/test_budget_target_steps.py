"""Absolute budget targets through the runner (synthetic-tiny): each step's `budget` reports the
value measured on the model it hands on, at or just below the goal, the stored spec runs as
submitted, and a budget out of reach fails the job with a SpecError saying what is reachable."""
from __future__ import annotations

import pytest

from core import models as zoo
from core.budget import model_cost
from tests.worker.conftest import TINY_CONV4, TINY_MLP, get_job, run_ok, spec, stored_model_path
from worker import runner


def _lands(budget: dict, kind: str, goal: int) -> None:
    assert budget["kind"] == kind and budget["goal"] == goal
    assert 0.97 * goal <= budget["value"] <= goal, budget
    assert budget["fraction"] == pytest.approx(budget["value"] / goal)


def test_channel_prune_then_lowrank_land_on_their_budgets(settings, store, submit, tmp_path):
    _, result = run_ok(settings, submit, spec(TINY_CONV4, [
        {"op": "train", "epochs": 1, "batch_size": 32},
        {"op": "channel_prune", "target": {"macs": 13_000}},
        {"op": "lowrank", "target": {"total_params": 1200}, "score": "output_variance",
         "samples": 32},
        {"op": "evaluate"}]))
    pruned, factored = result["steps"][1:3]
    _lands(pruned["budget"], "macs", 13_000)
    assert pruned["macs"] == pruned["budget"]["value"]  # the runner's own count agrees
    _lands(factored["budget"], "total_params", 1200)
    assert factored["target_met"] is True
    model = zoo.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert model_cost(model, "total_params") == factored["budget"]["value"]


def test_pruning_and_dctps_targets(settings, store, submit, tmp_path):
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "magnitude", "target": {"nonzero_params": 1000}},
        {"op": "train", "epochs": 1, "batch_size": 32}]))
    cut = result["steps"][0]
    # the 106 biases start at zero but count as trained: 894 weights are kept
    assert cut["budget"]["value"] == 1000 and cut["kept"] == 1000 - 106
    assert cut["sparsity"] == pytest.approx(1 - 894 / 6464)
    model = zoo.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert model_cost(model, "nonzero_params") <= 1000  # after training too
    _, result = run_ok(settings, submit, spec(TINY_MLP, [
        {"op": "dctps", "target": {"nonzero_params": 500}},
        {"op": "train", "epochs": 1, "batch_size": 32, "lr": 0.003}]))
    step = result["steps"][0]
    _lands(step["budget"], "nonzero_params", 500)
    assert step["density"] == step["budget"]["knob"]
    # after training S's support and the biases are non-zero: the budget counted them
    model = zoo.load(stored_model_path(settings, store, tmp_path, result["model_id"]))
    assert model_cost(model, "nonzero_params") == step["budget"]["value"]


def test_a_budget_out_of_reach_fails_with_what_is_reachable(settings, submit):
    job_id = submit(spec(TINY_MLP, [{"op": "lowrank", "target": {"trainable_params": 100},
                                     "score": "magnitude"}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError", job.error_message
    assert "out of reach" in job.error_message and "at least" in job.error_message
