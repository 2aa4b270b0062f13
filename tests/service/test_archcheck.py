"""service.archcheck against core: the torch-free parameter and MAC counts equal those of the built
model for many configurations of every zoo entry, and kwargs are refused where core refuses
them (and accepted where core accepts them)."""
from __future__ import annotations

import itertools
import math

import pytest

from core.errors import SpecError
from core.metrics import count_macs, param_counts
from core.models import EDIT_OPS, build, normalize_arch
from core.models.zoo import ACTIVATIONS, INITS, ZOO
from service.archcheck import ACTIVATIONS as CHECK_ACTIVATIONS
from service.archcheck import EDIT_OPS as CHECK_EDIT_OPS
from service.archcheck import INITS as CHECK_INITS
from service.archcheck import ZOO_DEFAULTS, ArchSize, arch_size, check_arch
from service.errors import InvalidSpec


def test_the_mirror_of_the_zoo_is_exact():
    assert {name: defaults for name, (defaults, _) in ZOO.items()} == ZOO_DEFAULTS
    assert CHECK_INITS == INITS
    assert set(CHECK_ACTIVATIONS) == set(ACTIVATIONS)
    assert set(CHECK_EDIT_OPS) == set(EDIT_OPS)


def configurations() -> list[dict]:
    out: list[dict] = [{"name": name} for name in ZOO]
    shapes = [[1, 28, 28], [3, 5, 7], [2, 1, 1], [3, 32, 32]]
    for shape, widths, classes, act in itertools.product(
            shapes, [[], [1], [300, 100], [7, 5, 3]], [2, 10], ["relu", "tanh", "linear"]):
        out.append({"name": "mlp", "input_shape": shape, "widths": widths,
                    "num_classes": classes, "activation": act})
    for shape, classes in itertools.product(shapes, [2, 3, 100]):
        out.append({"name": "lenet300", "input_shape": shape, "num_classes": classes,
                    "init": "torch"})
    for shape, classes in itertools.product(
            [[1, 16, 16], [3, 17, 30], [2, 28, 28], [1, 40, 19], [3, 32, 32]], [2, 10]):
        out.append({"name": "lenet5", "input_shape": shape, "num_classes": classes})
    for shape, channels, fc in itertools.product(
            [[1, 8, 8], [3, 9, 13], [2, 32, 32], [1, 28, 28]],
            [[4], [3, 5], [3, 5, 6], [4, 4, 8, 8], [2, 3, 4, 5, 6, 6]], [[], [16], [12, 9]]):
        if len(channels) // 2 <= int(math.log2(min(shape[1:]))):
            out.append({"name": "conv4", "input_shape": shape, "channels": channels, "fc": fc,
                        "num_classes": 7})
    for shape, depth, width in [([3, 8, 8], 8, 0.03), ([1, 9, 7], 8, 0.25), ([2, 1, 1], 8, 1),
                                ([3, 8, 8], 14, 0.3), ([1, 9, 7], 14, 1.5), ([3, 5, 6], 20, 2),
                                ([3, 32, 32], 8, 1), ([1, 12, 10], 20, 0.5), ([3, 7, 7], 8, 2.5),
                                ([1, 16, 16], 32, 0.25)]:
        out.append({"name": "resnet", "input_shape": shape, "depth": depth, "width": width,
                    "num_classes": 5, "init": "torch"})
    return out


@pytest.mark.parametrize("name", sorted(ZOO))
def test_params_and_macs_equal_the_built_model(name):
    checked = 0
    for arch in configurations():
        if arch["name"] != name:
            continue
        model = build(arch)
        shape = normalize_arch(arch)["input_shape"]
        expected = ArchSize(params=param_counts(model)["total"],
                            macs=count_macs(model, shape))
        assert arch_size(arch) == expected, arch
        checked += 1
    assert checked >= 6


def test_a_pcn_input_edit_is_counted_as_an_upper_bound():
    for arch in ({"name": "mlp", "input_shape": [1, 8, 8], "widths": [64, 32],
                  "edits": [{"op": "pcn_input", "layer": "fc2", "dims": 5}]},
                 {"name": "conv4", "input_shape": [1, 8, 8], "channels": [4, 4, 8, 8],
                  "fc": [16], "edits": [{"op": "pcn_input", "layer": "conv3", "dims": 4},
                                        {"op": "pcn_input", "layer": "fc1", "dims": 32}]}):
        model = build(arch)
        size = arch_size(arch)
        plain = arch_size({k: v for k, v in arch.items() if k != "edits"})
        assert size.params >= param_counts(model)["total"] and size.params > plain.params
        assert size.macs >= count_macs(model, arch["input_shape"]) and size.macs > plain.macs


# kwargs core refuses (build raises SpecError); the path names the field
CORE_REFUSES = [
    ({"name": "vgg"}, "model.arch.name: unknown architecture 'vgg'"),
    ({"name": 3}, "model.arch.name"),
    ({"name": "mlp", "depth": 3}, "model.arch.depth: unknown kwarg"),
    ({"name": "lenet5", "widths": [3]}, "model.arch.widths: unknown kwarg"),
    ({"name": "mlp", "input_shape": [1, 28]}, "model.arch.input_shape: must be [C, H, W]"),
    ({"name": "mlp", "input_shape": [1, 28, 28, 1]}, "model.arch.input_shape"),
    ({"name": "mlp", "input_shape": [0, 28, 28]}, "model.arch.input_shape[0]"),
    ({"name": "conv4", "input_shape": [1, -2, 28]}, "model.arch.input_shape[1]"),
    ({"name": "mlp", "widths": [300, 0]}, "model.arch.widths[1]"),
    ({"name": "mlp", "widths": [-3]}, "model.arch.widths[0]"),
    ({"name": "mlp", "activation": "gelu"}, "model.arch.activation"),
    ({"name": "mlp", "init": "he"}, "model.arch.init"),
    ({"name": "conv4", "channels": []}, "model.arch.channels: must not be empty"),
    ({"name": "conv4", "fc": [16, 0]}, "model.arch.fc[1]"),
    ({"name": "conv4", "input_shape": [1, 8, 8], "channels": [4] * 8},
     "model.arch.input_shape"),
    ({"name": "conv4", "input_shape": [1, 1, 9], "channels": [4, 4]}, "model.arch.input_shape"),
    ({"name": "lenet5", "input_shape": [1, 15, 28]}, "at least 16x16"),
    ({"name": "lenet5", "input_shape": [1, 28, 4]}, "at least 16x16"),
    ({"name": "resnet", "depth": 21}, "model.arch.depth: must be 6n+2"),
    ({"name": "resnet", "depth": 2}, "model.arch.depth"),
    ({"name": "resnet", "width": 0}, "model.arch.width"),
    ({"name": "resnet", "width": -1.5}, "model.arch.width"),
    ({"name": "resnet", "width": float("inf")}, "model.arch.width"),
    ({"name": "resnet", "width": float("nan")}, "model.arch.width"),
    ({"name": "mlp", "num_classes": 0}, "model.arch.num_classes"),
    ({"name": "mlp", "num_classes": 10.0}, "model.arch.num_classes: must be an integer"),
    ({"name": "mlp", "num_classes": True}, "model.arch.num_classes"),
    ({"name": "mlp", "edits": {"op": "pcn_input"}}, "model.arch.edits: must be a list"),
    ({"name": "mlp", "edits": [{"op": "prune"}]}, "model.arch.edits[0]"),
    ({"name": "mlp", "edits": ["x"]}, "model.arch.edits[0]"),
]


@pytest.mark.parametrize(("arch", "needle"), CORE_REFUSES)
def test_kwargs_core_refuses_are_refused(arch, needle):
    with pytest.raises(SpecError):
        build(arch)
    with pytest.raises(InvalidSpec) as info:
        arch_size(arch)
    assert needle in info.value.detail, info.value.detail
    assert info.value.status == 422


# refused here although core would try to build them: sizes no worker should allocate, values
# core silently converts (int("28"), int(3.7)), and a single-class classifier
REFUSED_BEYOND_CORE = [
    ({"name": "mlp", "widths": [10**12]}, "model.arch.widths[0]: must be in [1, 1000000]"),
    ({"name": "mlp", "widths": [1e12]}, "model.arch.widths[0]: must be an integer"),
    ({"name": "mlp", "widths": [3.7]}, "model.arch.widths[0]: must be an integer"),
    ({"name": "mlp", "input_shape": ["1", "28", "28"]}, "model.arch.input_shape[0]"),
    ({"name": "mlp", "input_shape": [1, 10**9, 1]}, "model.arch.input_shape[1]"),
    ({"name": "mlp", "widths": [1] * 65}, "model.arch.widths: at most 64 layers"),
    ({"name": "mlp", "widths": "300"}, "model.arch.widths: must be a list"),
    ({"name": "conv4", "channels": [10**7]}, "model.arch.channels[0]"),
    ({"name": "resnet", "depth": 20.0}, "model.arch.depth: must be an integer"),
    ({"name": "resnet", "depth": 6 * 10**6 + 2}, "model.arch.depth"),
    ({"name": "resnet", "width": "1"}, "model.arch.width"),
    ({"name": "resnet", "width": 1e9}, "model.arch.width"),
    ({"name": "mlp", "num_classes": 1}, "model.arch.num_classes: must be in [2, "),
]


@pytest.mark.parametrize(("arch", "needle"), REFUSED_BEYOND_CORE)
def test_insane_kwargs_are_refused(arch, needle):
    with pytest.raises(InvalidSpec) as info:
        arch_size(arch)
    assert needle in info.value.detail, info.value.detail


def test_core_accepted_kwargs_are_accepted():
    for arch in configurations() + [
            {"name": "mlp", "edits": []},
            {"name": "lenet300", "edits": [{"op": "pcn_input", "layer": "fc2", "dims": 50}]},
            {"name": "resnet", "width": 1.0, "init": "torch"}]:
        build(arch)  # core accepts it
        arch_size(arch)  # and so does the check


def test_size_limits_name_the_setting_and_the_value():
    big = {"name": "mlp", "widths": [100_000, 100_000]}
    size = arch_size(big)
    assert size.params == 784 * 100_000 + 100_000 + 100_000 * 100_000 + 100_000 \
        + 100_000 * 10 + 10
    with pytest.raises(InvalidSpec) as info:
        check_arch(big, max_params=100_000_000, max_macs=10**12)
    assert info.value.detail == (
        f"model.arch: the model has {size.params:,} parameters, the limit is 100,000,000 "
        "(SLIMLINE_MAX_MODEL_PARAMS); use fewer or narrower layers")
    wide_input = {"name": "resnet", "input_shape": [3, 1024, 1024]}
    with pytest.raises(InvalidSpec) as info:
        check_arch(wide_input, max_params=10**9, max_macs=10**9)
    assert "SLIMLINE_MAX_MODEL_MACS" in info.value.detail
    assert f"{arch_size(wide_input).macs:,}" in info.value.detail
    lenet = {"name": "lenet300"}
    assert check_arch(lenet, max_params=266_610, max_macs=266_200) == arch_size(lenet)
    with pytest.raises(InvalidSpec):
        check_arch(lenet, max_params=266_609, max_macs=10**9)
