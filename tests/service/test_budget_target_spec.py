"""Absolute budget targets in the step specs (lowrank, channel_prune, the pruning ops, dctps):
exactly one target (or sparsity / density) per step, refusals that say why, and stored specs
(defaults filled in, None left out) that validate again to the same spec; the core configs the
handlers build from them carry the budget."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.spec import JobSpec
from service.submission import spec_document

KINDS = ("total_params", "nonzero_params", "trainable_params", "macs")


def job(*steps):
    return {"model": {"arch": {"name": "mlp"}}, "dataset": "synthetic-tiny", "steps": list(steps)}


def stored(step: dict) -> dict:
    """The stored step, checked to validate again to the same spec."""
    spec = JobSpec.model_validate(job(step))
    document = spec_document(spec)
    assert JobSpec.model_validate(document) == spec
    return document["steps"][0]


def refused(step: dict) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(job(step))
    return str(info.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["lowrank", "channel_prune"])
def test_lowrank_and_channel_prune_take_every_absolute_kind(op, kind):
    assert stored({"op": op, "target": {kind: 27_000}})["target"] == {kind: 27_000}


@pytest.mark.parametrize(("op", "target", "needle"), [
    ("lowrank", {"total_params": 1000, "param_ratio": 0.5}, "exactly one of param_ratio"),
    ("lowrank", {"macs": 10, "ranks": {"fc1": 2}}, "got ['ranks', 'macs']"),
    ("lowrank", {"total_params": 0}, "target.total_params"),
    ("lowrank", {"macs": 10**13}, "target.macs"),
    ("lowrank", {"bytes": 1000}, "target.bytes"),
    ("channel_prune", {"nonzero_params": 1000, "trainable_params": 900}, "exactly one of"),
    ("channel_prune", {"trainable_params": -5}, "target.trainable_params"),
    ("channel_prune", {"latency_ms": 3}, "target.latency_ms"),
])
def test_lowrank_and_channel_prune_refuse_two_or_bad_targets(op, target, needle):
    assert needle in refused({"op": op, "target": target})


@pytest.mark.parametrize("op", ["snip", "random", "magnitude", "synflow"])
def test_pruning_takes_sparsity_or_a_nonzero_target(op):
    assert stored({"op": op, "sparsity": 0.9})["sparsity"] == 0.9
    step = stored({"op": op, "target": {"nonzero_params": 5000}})
    assert step["target"] == {"nonzero_params": 5000} and "sparsity" not in step


@pytest.mark.parametrize(("step", "needle"), [
    ({"op": "snip"}, "sparsity\n  Value error, give exactly one of sparsity"),
    ({"op": "snip", "sparsity": 0.5, "target": {"nonzero_params": 10}}, "got both"),
    ({"op": "random"}, "got neither"),
    ({"op": "magnitude", "target": {"total_params": 10}}, "total_params: not reduced by masks"),
    ({"op": "synflow", "target": {"macs": 10, "trainable_params": 3}},
     "trainable_params, macs: not reduced by masks"),
    ({"op": "snip", "target": {}}, "target.nonzero_params"),
    ({"op": "snip", "target": {"nonzero_params": 0}}, "target.nonzero_params"),
    ({"op": "snip", "target": {"nonzero_params": 10, "extra": 1}}, "target.extra"),
])
def test_pruning_refusals_say_why(step, needle):
    assert needle in refused(step)


def test_dctps_density_default_and_targets_store_and_validate_again():
    assert stored({"op": "dctps"})["density"] == 0.01  # the old default, stored as before
    assert stored({"op": "dctps", "density": 0.05})["density"] == 0.05
    for kind in ("nonzero_params", "trainable_params"):
        step = stored({"op": "dctps", "target": {kind: 3000}})
        assert step["target"] == {kind: 3000} and "density" not in step
    # an explicit null density with a target is no density
    assert "density" not in stored({"op": "dctps", "density": None,
                                    "target": {"nonzero_params": 10}})


@pytest.mark.parametrize(("step", "needle"), [
    ({"op": "dctps", "density": 0.01, "target": {"nonzero_params": 10}},
     "give density or target, not both"),
    ({"op": "dctps", "target": {}}, "exactly one of nonzero_params, trainable_params"),
    ({"op": "dctps", "target": {"nonzero_params": 5, "trainable_params": 5}}, "exactly one"),
    ({"op": "dctps", "target": {"macs": 5}}, "macs: not reduced by dctps"),
    ({"op": "dctps", "target": {"trainable_params": 0}}, "target.trainable_params"),
])
def test_dctps_refusals_say_why(step, needle):
    assert needle in refused(step)


def test_the_core_configs_carry_the_budgets():
    from core.channel_prune import ChannelPruneConfig
    from core.configs import DCTpSConfig, LowRankConfig, PruneConfig
    from worker.context import config_from_spec

    spec = JobSpec.model_validate(job(
        {"op": "lowrank", "target": {"macs": 5000}, "score": "magnitude"},
        {"op": "channel_prune", "target": {"total_params": 4000}},
        {"op": "snip", "target": {"nonzero_params": 3000}},
        {"op": "dctps", "target": {"trainable_params": 2000}},
        {"op": "dctps"}))
    steps = spec.steps
    assert config_from_spec(LowRankConfig, steps[0]).target == {"macs": 5000}
    assert config_from_spec(ChannelPruneConfig, steps[1]).target == {"total_params": 4000}
    prune = config_from_spec(PruneConfig, steps[2])
    assert prune.sparsity is None  # the handler turns the target into one
    assert PruneConfig.from_dict(steps[2].model_dump()) == prune  # `target` is the caller's
    dctps = config_from_spec(DCTpSConfig, steps[3])
    assert dctps.target == {"trainable_params": 2000} and dctps.density is None
    assert config_from_spec(DCTpSConfig, steps[4]).density == 0.01
