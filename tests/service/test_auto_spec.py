"""The auto step's spec, its Pareto fold, and the search space (no torch, no servers)."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from service.curves import fold
from service.methods.auto import pareto
from service.quotas import total_epochs
from service.spec import JobSpec
from worker.auto_space import Space, cut_steps, defaults, goal, method_choices


def job(**auto) -> dict:
    return {"model": "m1", "dataset": "fashion-mnist",
            "steps": [{"op": "auto", "budget": {"total_params": 27000}} | auto]}


def test_defaults_and_the_epochs_the_search_spends():
    spec = JobSpec.model_validate(job())
    step = spec.steps[0]
    assert (step.trials, step.finetune_epochs, step.final_epochs, step.methods) == \
        (24, 1, 5, "all")
    assert step.promoted == 6 and total_epochs(spec) == 6 * 1 + 5
    assert step.budget.kind == "total_params" and step.budget.value == 27000


@pytest.mark.parametrize(("auto", "message"), [
    ({"budget": {}}, "exactly one of"),
    ({"budget": {"total_params": 1, "macs": 2}}, "exactly one of"),
    ({"budget": {"macs": 10, "batch_size": 8}}, "batch_size: only used with latency_ms"),
    ({"budget": {"latency_ms": 0}}, "greater than 0"),
    ({"finetune_trials": 30}, "cannot exceed trials"),
    ({"methods": ["pcn", "pcn"]}, "twice"),
    ({"methods": ["int8"]}, "add at least one compression method"),
    ({"methods": ["quantum"]}, "Input should be"),
    ({"trials": 1}, "greater than or equal to 2"),
    ({"surprise": 1}, "Extra inputs are not permitted"),
])
def test_bad_auto_specs_name_the_field(auto, message):
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(job(**auto))


def test_auto_must_be_the_only_step():
    spec = job()
    spec["steps"].insert(0, {"op": "train"})
    with pytest.raises(ValidationError, match="only step"):
        JobSpec.model_validate(spec)


def test_latency_budget_takes_a_batch_size():
    step = JobSpec.model_validate(job(budget={"latency_ms": 2.5, "batch_size": 64})).steps[0]
    assert step.budget.kind == "latency_ms" and step.budget.latency_batch == 64
    assert JobSpec.model_validate(job(budget={"latency_ms": 2.5})).steps[0] \
        .budget.latency_batch == 256


def test_pareto_keeps_exactly_the_undominated_points():
    points = [{"cost": 10, "val_accuracy": 0.5}, {"cost": 12, "val_accuracy": 0.7},
              {"cost": 8, "val_accuracy": 0.4}, {"cost": 11, "val_accuracy": 0.6},
              {"cost": 12, "val_accuracy": 0.65}, {"cost": 20, "val_accuracy": 0.7},
              {"cost": None, "val_accuracy": 0.9}]
    assert pareto(points) == [2, 0, 3, 1]


def test_the_curves_fold_keeps_the_frontier_current():
    events = [("auto_budget", {"budget": {"kind": "macs", "value": 100}}),
              ("auto_trial", {"trial": 0, "phase": "screen", "status": "succeeded",
                              "cost": 90, "val_accuracy": 0.3}),
              ("auto_trial", {"trial": 0, "phase": "finetune", "status": "succeeded",
                              "cost": 90, "val_accuracy": 0.8}),
              ("auto_trial", {"trial": 1, "phase": "finetune", "status": "succeeded",
                              "cost": 95, "val_accuracy": 0.7}),
              ("auto_trial", {"trial": 2, "phase": "finetune", "status": "failed"})]
    auto = fold(events)["auto"]
    assert auto["budget"]["value"] == 100 and len(auto["trials"]) == 4
    assert auto["pareto"] == [0] and auto["pareto_screen"] == [0]


def test_methods_that_cannot_reduce_the_budget_kind_are_left_out_with_a_reason():
    choices, left = method_choices("total_params", "all", None, chains=True)
    assert {"pcn", "lowrank", "channel_prune"} <= set(choices)
    assert "snip" not in choices and "masks" in left["snip"]
    assert "channel_prune+lowrank" in choices
    choices, left = method_choices("nonzero_params", ["snip", "dctps", "pcn"],
                                   {"pcn": 0, "snip": 3, "dctps": 3}, chains=True)
    assert choices == ["snip", "dctps"] and "prunability" in left["pcn"]
    choices, _ = method_choices("latency_ms", "all", None, chains=False)
    assert "+" not in "".join(choices) and "pcn" in choices  # aimed at through MACs


def test_candidates_aim_at_their_share_of_the_budget():
    space = Space(kind="total_params", value=1000, start={"total_params": 10000},
                  choices=("pcn", "pcn+lowrank"), int8=False)
    steps, targets = cut_steps(space, {"method": "pcn", "fraction": 0.9,
                                       "pcn_output_based": True})
    assert steps == [{"op": "pcn", "select": {"target": {"total_params": 900}},
                      "output_based": True}]
    steps, targets = cut_steps(space, {"method": "pcn+lowrank", "fraction": 1.0,
                                       "split": 0.5})
    assert [t["goal"] for t in targets] == [int(math.sqrt(10000 * 1000.0)), 1000]
    assert [s["op"] for s in steps] == ["pcn", "lowrank"]


def test_latency_and_bytes_budgets_aim_through_macs_and_parameters():
    latency = Space(kind="latency_ms", value=2.0, start={"latency_ms": 8.0, "macs": 4000},
                    choices=("lowrank",), int8=True)
    assert goal(latency, 1.0, False) == pytest.approx(1000)
    assert cut_steps(latency, {"method": "lowrank", "fraction": 1.0})[1][0]["kind"] == "macs"
    size = Space(kind="bytes", value=4000, start={"bytes": 40000, "total_params": 10000},
                 choices=("lowrank",), int8=True)
    assert goal(size, 1.0, False) == pytest.approx(1000)
    assert goal(size, 1.0, True) > 3 * goal(size, 1.0, False)  # int8: ~1 byte per weight
    assert any(d.get("int8") for d in defaults(size))
    assert len(defaults(size)) == len(size.choices) + 1
