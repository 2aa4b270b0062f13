"""The torch-free submission checks held against the code they mirror: the zoo's layer and unit
group names against the built models' prunability reports, the dataset-shape rule against
`worker.inputs`, the built-in datasets against `core.data`; and the label-gap, plain-text and
checkpoint-key messages."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from core.data import ArrayDataset, synthetic
from core.errors import DatasetError
from core.models import build
from core.models.checkpoint import key_mismatch
from core.prunability import prunability_report
from service.archcheck import arch_layers
from service.datasets import BUILTIN_SHAPES, check_label_gaps
from service.errors import InvalidDataset, InvalidSpec
from service.labelcheck import label_gaps
from service.registry import step_models
from service.spec import JobSpec
from service.submitcheck import (
    KEY_FIELDS,
    LIST_FIELDS,
    LIST_SUFFIX,
    DataFacts,
    arch_facts,
    check_data_fits,
    check_layer_names,
    fit_refusal,
    image_shape,
)
from service.textcheck import plain_text
from tests.service.test_archcheck import configurations
from worker.inputs import _shape_for_model

# ---- the zoo's names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "lenet300", "lenet5", "conv4", "resnet"])
def test_zoo_layer_and_group_names_equal_the_built_models_report(name):
    checked = 0
    for arch in configurations():
        if arch["name"] != name or checked >= 12:
            continue
        report = prunability_report(build(arch))
        names = arch_layers(arch)
        assert list(names.layers) == [r["name"] for r in report["layers"]], arch
        groups = [g["name"] for g in report["groups"]]
        assert list(names.groups) == groups, arch
        checked += 1
    assert checked >= 5


def test_every_layer_naming_field_of_every_method_is_read():
    """A field whose name says it names layers is one the check reads (a new method's
    `foo_layers` or `layers` is covered without a change here)."""
    def fields(model, where):
        for name, info in model.model_fields.items():
            yield f"{where}.{name}", name
            for arg in getattr(info.annotation, "__args__", ()) or (info.annotation,):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    yield from fields(arg, f"{where}.{name}")

    for model in step_models():
        for path, name in fields(model, model.__name__):
            if "layer" in name or name == "ranks":
                assert name in LIST_FIELDS or name.endswith(LIST_SUFFIX) \
                    or name in KEY_FIELDS, path


def spec(steps, model=None):
    return JobSpec.model_validate({"model": model or {"arch": {"name": "lenet300"}},
                                   "dataset": "fashion-mnist", "steps": steps})


def test_names_below_a_layer_are_accepted_only_after_a_restructuring_step():
    facts = arch_facts({"name": "lenet300"}, source="arch 'lenet300'", stored=False)
    below = {"op": "analyze", "kinds": ["spectrum"], "layers": ["fc2.blocks.0.1"]}
    for earlier in ({"op": "lowrank", "target": {"param_ratio": 0.5}},
                    {"op": "pcn", "select": {"dims": 4}}, {"op": "dctps"},
                    {"op": "channel_prune", "target": {"param_ratio": 0.5}}):
        check_layer_names(spec([earlier, below]), facts)
    for earlier in ({"op": "train", "epochs": 1}, {"op": "snip", "sparsity": 0.5},
                    {"op": "evaluate"}):
        with pytest.raises(InvalidSpec, match=r"steps\[1\]\.layers"):
            check_layer_names(spec([earlier, below]), facts)
    # a model that already holds compressed layers (its arch has edits)
    edited = arch_facts({"name": "lenet300", "edits": [
        {"op": "lowrank", "layer": "fc1", "blocking": "none", "ranks": [4]}]},
        source="arch 'lenet300'", stored=True)
    check_layer_names(spec([below]), edited)


def test_a_model_whose_layers_are_unknown_is_not_refused():
    facts = arch_facts({"name": "graph", "graph": "0" * 64, "input_shape": [1, 28, 28],
                        "num_classes": 10}, source="arch 'graph'", stored=False)
    assert facts.layers is None
    check_layer_names(spec([{"op": "pcn", "layers": ["anything"], "select": {"dims": 4}}]),
                      facts)


def test_a_report_gives_the_names_of_a_stored_model():
    report = prunability_report(build({"name": "resnet", "depth": 8, "width": 0.25}))
    facts = arch_facts({"name": "resnet", "depth": 8, "width": 0.25}, source="model m",
                       stored=True, report=report)
    assert "stage1.0.shortcut_conv" in facts.layers and "stage3" in facts.groups
    assert not facts.transformed
    check_layer_names(spec([{"op": "channel_prune", "target": {"param_ratio": 0.5},
                             "layers": ["stage3"]}]), facts)


# ---- the dataset against the model ----------------------------------------------------------

SHAPES = [[1, 28, 28], [3, 28, 28], [1, 8, 8], [3, 8, 8], [2, 28, 28], [1, 1, 784],
          [1, 28, 1], [1, 1, 8]]
MODELS = [([1, 28, 28], "NCHW"), ([3, 28, 28], "NCHW"), ([28, 28, 3], "NHWC"),
          ([28, 28, 1], "NHWC"), ([784], "flat"), ([64], "flat"), ([1, 28, 28], "flat"),
          ([1, 8, 8], "NCHW"), ([784], "NCHW"), ([3, 1, 1], "NCHW"), ([8, 8], "NHWC"),
          ([2, 4, 8], "flat")]


@pytest.mark.parametrize("stored", [False, True])
def test_the_shape_rule_is_the_workers(stored):
    for have, (shape, layout) in itertools.product(SHAPES, MODELS):
        data = ArrayDataset(torch.zeros(2, *have), torch.zeros(2, dtype=torch.int64))
        try:
            _shape_for_model(data, "training", shape, layout, stored, [])
            worker = None
        except DatasetError as exc:
            worker = str(exc)
        ours = fit_refusal(have, shape, layout, stored)
        assert (ours is None) == (worker is None), (have, shape, layout, stored, ours, worker)


def test_uploaded_sample_shapes_load_as_the_worker_loads_them():
    assert image_shape([784]) == [1, 1, 784]
    assert image_shape([28, 28]) == [1, 28, 28]
    assert image_shape([3, 32, 32]) == [3, 32, 32]


def test_builtin_datasets_are_what_core_loads():
    for name in ("synthetic-blobs", "synthetic-tiny"):
        train, test = synthetic(name, 0)
        shape, classes = BUILTIN_SHAPES[name]
        assert train.input_shape == shape and test.input_shape == shape
        assert int(max(train.y.max(), test.y.max())) + 1 == classes
    assert BUILTIN_SHAPES["fashion-mnist"] == ([1, 28, 28], 10)


def test_flat_vectors_fit_a_flat_model():
    arch = {"name": "graph", "graph": "0" * 64, "input_shape": [20], "num_classes": 3,
            "preprocessing": {"layout": "flat"}}
    data = DataFacts("dataset d", [20], 3)
    check_data_fits(arch_facts(arch, source="model m", stored=True), data)
    with pytest.raises(InvalidSpec, match="^dataset: .*reads flat vectors of 21"):
        check_data_fits(arch_facts(arch | {"input_shape": [21]}, source="model m",
                                   stored=True), data)
    with pytest.raises(InvalidSpec, match="^dataset: .*4 classes.* 3 outputs"):
        check_data_fits(arch_facts(arch, source="model m", stored=True),
                        DataFacts("dataset d", [20], 4))


# ---- labels, plain text, checkpoint keys ----------------------------------------------------

def test_label_gaps():
    assert label_gaps([np.arange(10)]) is None
    assert label_gaps([np.array([0, 2]), np.array([1])]) is None
    assert label_gaps([np.arange(1, 11)]) == {"classes": 11, "missing": 1, "first_missing": [0],
                                              "min_label": 1}
    gaps = label_gaps([np.array([0, 5, 40])])
    assert gaps["missing"] == 38 and gaps["first_missing"] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    huge = label_gaps([np.array([0, 10**9], dtype=np.int64)])
    assert huge["missing"] == 10**9 - 1 and len(huge["first_missing"]) == 10


def test_label_gaps_refused_or_accepted_with_a_warning():
    meta = {"num_classes": 11, "label_gaps": label_gaps([np.arange(1, 11)])}
    with pytest.raises(InvalidDataset, match=r"^y_train: the labels are 1\.\.10.*subtract 1"):
        check_label_gaps(meta, None)
    with pytest.raises(InvalidDataset, match="allow_label_gaps=true"):
        check_label_gaps(meta, "false")
    accepted = check_label_gaps(meta, "true")
    assert "accepted with allow_label_gaps=true" in accepted["warnings"][0]
    assert check_label_gaps({"num_classes": 3}, None) == {"num_classes": 3}


def test_plain_text_strips_terminal_escapes():
    text = "a \x1b[1mbold\x1b[0m note\x1b]0;title\x07 \x1b[38;5;196mred\x1b[m\x1b(B.\n\tnext\x00"
    assert plain_text(text) == "a bold note red.\n\tnext"


def test_key_mismatch_lists_both_sides_and_the_prefix_to_strip():
    expected = [f"fc{i}.{p}" for i in range(1, 4) for p in ("weight", "bias")]
    text = key_mismatch("lenet300", expected, [f"module.{k}" for k in expected])
    assert "missing 6 key(s)" in text and "6 unexpected key(s)" in text
    assert "Strip the prefix 'module.'" in text and "still" not in text
    text = key_mismatch("lenet300", expected, [f"model.{k}" for k in expected[:4]])
    assert "Strip the prefix 'model.'" in text and "2 key(s) would still be missing" in text
    many = key_mismatch("mlp", expected, expected[:5] + [f"x{i}" for i in range(15)])
    assert "15 unexpected key(s)" in many and "and 5 more" in many and "prefix" not in many
    assert key_mismatch("lenet300", expected, list(expected)) is None
