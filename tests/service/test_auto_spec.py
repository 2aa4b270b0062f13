"""The auto step's spec, its Pareto fold, and the search space (no torch, no servers)."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from core.errors import BelowMinimum
from service.curves import fold
from service.methods.auto import pareto
from service.quotas import total_epochs
from service.spec import JobSpec
from worker.auto_space import (
    DEFAULT_KNOBS,
    Floors,
    Space,
    calibrate,
    cut_steps,
    defaults,
    floor_key,
    goal,
    in_budget_units,
    method_choices,
    steps_for,
    unreachable,
)


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
    assert in_budget_units(latency, 1000, False) == pytest.approx(2.0)
    assert in_budget_units(size, goal(size, 0.5, True), True) == pytest.approx(2000)


def test_default_candidates_fix_every_knob_of_their_methods():
    """An enqueued candidate that leaves a knob out gets it drawn at random: lowrank's
    default must be scored with its default score and blocking."""
    space = Space(kind="macs", value=1000, start={"macs": 10000},
                  choices=("pcn", "lowrank", "channel_prune+lowrank"), int8=False)
    found = {d["method"]: d for d in defaults(space)}
    assert found["lowrank"]["lowrank_score"] == "output_perturbation" == \
        DEFAULT_KNOBS["lowrank_score"]
    assert found["lowrank"]["lowrank_blocking"] == "none"
    assert found["pcn"]["pcn_output_based"] is False and "split" not in found["pcn"]
    assert found["channel_prune+lowrank"]["channel_prune_criterion"] == "l1"
    assert found["channel_prune+lowrank"]["split"] == 0.5


def test_floors_raise_a_chains_first_target_and_block_what_cannot_be_built():
    space = Space(kind="macs", value=1000, start={"macs": 10000},
                  choices=("pcn", "pcn+lowrank", "channel_prune+pcn"), int8=False)
    floors = Floors()
    pcn = {"method": "pcn", "fraction": 1.0, "pcn_output_based": False}
    assert unreachable(cut_steps(space, pcn, floors)[1]) is None  # nothing known yet
    floors.add(floor_key(["pcn"], pcn, 0), 10000, 4000)  # measured on the starting model
    blocked = unreachable(cut_steps(space, pcn, floors)[1])
    assert blocked == {"method": "pcn", "kind": "macs", "goal": 1000, "floor": 4000}
    # the output-based variant has a floor of its own
    assert unreachable(cut_steps(space, pcn | {"pcn_output_based": True}, floors)[1]) is None
    # a chain's first step is moved into its reach: the split places it between the start
    # and just above the floor; the second cuts the rest
    chain = {"method": "pcn+lowrank", "fraction": 1.0, "split": 0.5,
             "pcn_output_based": False}
    steps, targets = cut_steps(space, chain, floors)
    assert targets[0]["raised_from"] == int(math.sqrt(10000 * 1000.0))
    assert targets[0]["goal"] == int(math.sqrt(10000 * (4000 * 1.01 + 1)))
    assert targets[1]["goal"] == 1000
    deep = cut_steps(space, chain | {"split": 0.8}, floors)[1][0]["goal"]
    assert 4000 < deep < targets[0]["goal"]  # a larger split cuts closer to the floor
    assert unreachable(targets) is None
    assert steps == steps_for("macs", targets, chain)
    assert steps[0]["select"]["target"] == {"macs": targets[0]["goal"]}
    # a second step's floor seen after a first step that left a model of cost 3000 bounds
    # every draw whose first step leaves as much or more, not less
    later = {"method": "channel_prune+pcn", "fraction": 1.0, "pcn_output_based": False}
    key = floor_key(["channel_prune", "pcn"], later, 1)
    assert key == "channel_prune>pcn(pcn_output_based=False)"
    floors.add(key, 3000, 1500)
    assert unreachable(cut_steps(space, later | {"split": 0.5}, floors)[1])["floor"] == 1500
    assert unreachable(cut_steps(space, later | {"split": 0.8}, floors)[1]) is None  # < 3000
    # the JSON round trip the coordinator keeps
    assert Floors(floors.to_dict()).at_least(key, 3162) == 1500


def test_a_refusal_names_its_floor_in_one_parseable_format():
    error = BelowMinimum("lowrank", "macs", 900.0, 1234, "every block at rank 1",
                         "factor more layers")
    assert BelowMinimum.parse(f"job failed: {error}") == ("macs", 900, 1234)
    assert "raise the budget to at least 1234" in str(error)
    assert BelowMinimum.parse("channel_prune: out of reach") is None
    assert BelowMinimum.parse(None) is None


def test_measured_budgets_aim_through_a_line_fitted_to_the_trials():
    """Latency falls slower than MACs (a fixed cost per batch): once trials have measured a few
    models, a candidate aims at the MACs the fitted line gives for the budget."""
    start = {"latency_ms": 240.0, "macs": 74e6}
    points = [(74e6, 240.0), (20e6, 90.0), (10e6, 62.0)]  # 34 ms + 2.8 ms per MMAC
    fit = calibrate(points)
    assert fit is not None and fit[0] == pytest.approx(34, abs=2)
    assert fit[1] == pytest.approx(2.8e-6, rel=0.05)
    plain = Space(kind="latency_ms", value=120.0, start=start, choices=("lowrank",), int8=False)
    fitted = Space.from_dict(plain.to_dict() | {"calibration": list(fit)})
    assert fitted.calibration == fit
    assert goal(plain, 1.0, False) == pytest.approx(37e6)  # half the MACs for half the latency
    aimed = goal(fitted, 1.0, False)
    assert fit[0] + fit[1] * aimed == pytest.approx(120.0)
    assert aimed < goal(plain, 1.0, False)
    assert in_budget_units(fitted, aimed, False) == pytest.approx(120.0)
    # a fixed cost above the budget: still a positive goal, the smallest share
    high = Space.from_dict(plain.to_dict() | {"calibration": [130.0, 1e-6]})
    assert goal(high, 1.0, False) == pytest.approx(12.0 / 1e-6)
    # no usable line: one proxy value, or latency growing as MACs fall
    assert calibrate([(1.0, 2.0), (1.0, 3.0)]) is None
    assert calibrate([(1.0, 5.0), (2.0, 3.0)]) is None
    # bytes: headers are the fixed part; int8 weights take about 0.3 of a float's bytes
    size = Space(kind="bytes", value=40_000, start={"bytes": 400_000, "total_params": 100_000},
                 choices=("lowrank",), int8=True, calibration=(2_000.0, 4.0))
    assert goal(size, 1.0, False) == pytest.approx(38_000 / 4.0)
    assert in_budget_units(size, goal(size, 1.0, True), True) == pytest.approx(40_000)
