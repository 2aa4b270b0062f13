"""service.methods.channel_prune: the step's fields accepted, stored and validated again; every
refusal names its field; the core config built from a spec has the spec's values."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.registry import available_ops, dense_weight_ops
from service.spec import JobSpec
from service.submission import spec_document

TARGET = {"mac_ratio": 0.5}


def job(*steps):
    return {"model": {"arch": {"name": "mlp"}}, "dataset": "synthetic-tiny", "steps": list(steps)}


def step(**fields):
    return {"op": "channel_prune", "target": TARGET, **fields}


def test_registered_as_a_dense_weight_op():
    assert "channel_prune" in available_ops() and "channel_prune" in dense_weight_ops()


@pytest.mark.parametrize("fields", [
    {},
    {"target": {"param_ratio": 1}},
    {"criterion": "taylor", "samples": 64, "scope": "layerwise", "round_to": 16},
    {"layers": ["fc1", "stage2", "stage3.1.conv2"], "round_to": 8},
    {"layers": None},
])
def test_accepted_and_round_trips(fields):
    spec = JobSpec.model_validate(job(step(**fields)))
    assert JobSpec.model_validate(spec_document(spec)) == spec
    stored = spec_document(spec)["steps"][0]
    assert stored["criterion"] == fields.get("criterion", "l1")
    assert stored["round_to"] == fields.get("round_to", 1)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"target": {}}, "a target is exactly one of param_ratio, mac_ratio"),
    ({"target": {"param_ratio": 0.5, "mac_ratio": 0.5}}, "a target is exactly one"),
    ({"target": {"mac_ratio": 0}}, "target.mac_ratio"),
    ({"target": {"param_ratio": 1.5}}, "target.param_ratio"),
    ({"target": {"sparsity": 0.5}}, "target.sparsity"),
    ({"target": None}, "target"),
    ({"criterion": "l2"}, "criterion"),
    ({"scope": "local"}, "scope"),
    ({"round_to": 4}, "round_to"),
    ({"round_to": 8.5}, "round_to"),
    ({"criterion": "taylor", "samples": 0}, "samples"),
    ({"samples": 64}, "samples: only used with criterion 'taylor'"),
    ({"layers": []}, "layers"),
    ({"layers": "fc1"}, "layers"),
    ({"layers": ["fc1", "fc1"]}, "layers names a unit group twice"),
    ({"ratio": 0.5}, "ratio"),
])
def test_refused_with_the_field_named(fields, needle):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(job({"op": "channel_prune", "target": TARGET} | fields))
    assert needle in str(info.value)


def test_a_target_is_required():
    with pytest.raises(ValidationError, match="channel_prune.target"):
        JobSpec.model_validate(job({"op": "channel_prune"}))


def test_refused_after_dctps():
    with pytest.raises(ValidationError, match="op 'channel_prune' cannot run after"):
        JobSpec.model_validate(job({"op": "dctps"}, step()))


def test_the_core_config_takes_the_spec_as_is():
    from core.channel_prune import ChannelPruneConfig
    from worker.context import config_from_spec

    spec = JobSpec.model_validate(job(step(criterion="taylor", samples=32, layers=["fc1"],
                                           round_to=8)))
    config = config_from_spec(ChannelPruneConfig, spec.steps[0])
    assert config == ChannelPruneConfig(target={"mac_ratio": 0.5}, criterion="taylor",
                                        scope="global", layers=("fc1",), round_to=8, samples=32)
