"""service.spec: the pcn and train fields of the complete PCN (issue 3) are accepted, bounded and
refused with a message naming the field; a stored spec validates again."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.spec import JobSpec
from service.submission import spec_document

TRAIN = {"op": "train", "epochs": 2}


def job(*steps):
    return {"model": {"arch": {"name": "mlp"}}, "dataset": "synthetic-tiny", "steps": list(steps)}


@pytest.mark.parametrize("steps", [
    [{"op": "pcn", "select": {"dims": 3}, "output_based": True}],
    [{"op": "pcn", "select": {"target": {"trainable_params": 1000}}, "output_based": True}],
    [{"op": "pcn", "select": {"target": {"max_accuracy_drop": 0.0}}}],
    [{"op": "pcn", "select": {"energy": 0.9}, "layers": ["fc2", "fc3"],
      "per_layer": {"fc3": {"dims": 4}}, "top_k": 16, "solver": "subspace"}],
    [TRAIN | {"track": ["effective_dim"], "track_layers": ["fc1"],
              "track_thresholds": [0.1, 0.5], "track_samples": 500},
     {"op": "pcn", "select": {"threshold": 0.1}, "when": "plateau", "plateau_delta": 0.01,
      "plateau_min_epochs": 2}],
    [TRAIN | {"track": ["effective_dim"], "track_layers": "auto"}],
])
def test_accepted_and_round_trips(steps):
    spec = JobSpec.model_validate(job(*steps))
    assert JobSpec.model_validate(spec_document(spec)) == spec


@pytest.mark.parametrize(("steps", "needle"), [
    ([{"op": "pcn", "select": {"dims": 3, "target": {"trainable_params": 9}}}], "exactly one"),
    ([{"op": "pcn", "select": {"target": {}}}], "a target is exactly one"),
    ([{"op": "pcn", "select": {"target": {"trainable_params": 9, "max_accuracy_drop": 0.1}}}],
     "a target is exactly one"),
    ([{"op": "pcn", "select": {"target": {"trainable_params": 0}}}], "trainable_params"),
    ([{"op": "pcn", "select": {"target": {"max_accuracy_drop": 1.5}}}], "max_accuracy_drop"),
    ([{"op": "pcn", "select": {"target": {"params": 9}}}], "params"),
    ([{"op": "pcn", "select": {"target": {"trainable_params": 9}},
       "per_layer": {"fc2": {"dims": 2}}}], "per_layer cannot be combined"),
    ([{"op": "pcn", "select": {"dims": 3}, "per_layer": {"fc2": {"target": {"dims": 2}}}}],
     "per_layer.fc2.target"),
    ([{"op": "pcn", "select": {"dims": 3}, "layers": ["fc2"], "per_layer": {"fc3": {"dims": 1}}}],
     "not in layers: ['fc3']"),
    ([{"op": "pcn", "select": {"dims": 3}, "layers": ["fc2", "fc2"]}], "twice"),
    ([{"op": "pcn", "select": {"dims": 3}, "layers": []}], "layers"),
    ([{"op": "pcn", "select": {"dims": 3}, "when": "plateau"}], "put a train step before it"),
    ([{"op": "evaluate"}, {"op": "pcn", "select": {"dims": 3}, "when": "plateau"}],
     "steps[1]"),
    ([{"op": "pcn", "select": {"dims": 3}, "plateau_delta": 0.1}], 'only used with when'),
    ([TRAIN, {"op": "pcn", "select": {"dims": 3}, "when": "plateau", "plateau_delta": 0}],
     "plateau_delta"),
    ([{"op": "pcn", "select": {"dims": 3}, "solver": "magic"}], "solver"),
    ([{"op": "pcn", "select": {"dims": 3}, "top_k": 0}], "top_k"),
    ([TRAIN | {"track_thresholds": [0.1]}], "only used with track"),
    ([TRAIN | {"track": ["effective_dim"], "track_thresholds": []}], "track_thresholds"),
    ([TRAIN | {"track": ["effective_dim"], "track_thresholds": [-1]}], "track_thresholds"),
    ([TRAIN | {"track": ["effective_dim"], "track_samples": 1}], "track_samples"),
    ([TRAIN | {"track": ["rank"]}], "track"),
])
def test_refused_naming_the_problem(steps, needle):
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job(*steps))
    assert needle in str(err.value)


def test_the_registry_derives_the_ops_the_dense_weight_rule_and_the_curves_shape():
    from service import curves
    from service.registry import (
        dense_weight_ops,
        dense_weightless_edit_ops,
        dense_weights_refusal,
        edit_ops,
        step_models,
    )
    from service.spec import AVAILABLE_OPS

    # the built-ins in their historical order, then the plug-ins found in service/methods/
    assert AVAILABLE_OPS[:10] == ("train", "evaluate", "pcn", "snip", "random", "magnitude",
                                  "synflow", "lowrank", "dctps", "analyze")
    assert "channel_prune" in AVAILABLE_OPS[10:]
    assert set(edit_ops()) >= {"pcn_input", "pcn_output", "lowrank", "dctps", "channel_prune"}
    assert dense_weightless_edit_ops() == ("dctps",)
    assert [m.__name__ for m in step_models()][:7] == [
        "TrainStep", "EvaluateStep", "PCNStep", "PruneStep", "LowRankStep", "DCTpSStep",
        "AnalyzeStep"]
    assert set(dense_weight_ops()) >= {"snip", "random", "magnitude", "synflow", "lowrank",
                                       "pcn"}
    assert dense_weights_refusal("train", "steps[1]", "x") is None
    assert "cannot run after x" in str(dense_weights_refusal("lowrank", "steps[1]", "x"))
    assert list(curves.empty())[:8] == ["training", "effective_dim", "spectra", "transforms",
                                        "pruning", "lowrank", "dctps", "analysis"]


def test_dense_weight_op_after_dctps_is_refused_with_the_old_message():
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job({"op": "dctps"}, TRAIN, {"op": "snip", "sparsity": 0.5}))
    assert "steps[2]: op 'snip' cannot run after the dctps step steps[0]: DCTpS layers" \
        in str(err.value)


def test_an_unknown_op_is_refused_with_the_available_ops():
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job({"op": "frobnicate"}))
    assert "steps[0]: unknown op 'frobnicate'; available ops: train, evaluate" in str(err.value)
    assert "export" in str(err.value)  # a real op since issue 13 (was 422 "not available yet")
