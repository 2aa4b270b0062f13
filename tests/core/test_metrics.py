import pytest
import torch

from core.data import synthetic
from core.metrics import count_macs, param_counts
from core.models import build, get_layer, input_shape
from core.pca import collect_input_stats
from core.pcn import pcn_input_transform


def test_lenet300_macs_and_params():
    model = build({"name": "lenet300"})
    assert count_macs(model, [1, 28, 28]) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    counts = param_counts(model)
    assert counts["total"] == counts["trainable"] == 266_610
    assert counts["nonzero"] == 266_610 - (300 + 100 + 10)  # biases start at zero


def test_conv4_macs_by_formula():
    model = build({"name": "conv4"})
    c = [1, 64, 64, 128, 128]
    sizes = [28, 28, 14, 14]  # "same" convs; pool after conv2
    convs = sum(s * s * c_out * c_in * 9
                for s, c_in, c_out in zip(sizes, c[:-1], c[1:], strict=True))
    fcs = 128 * 7 * 7 * 256 + 256 * 256 + 256 * 10
    assert count_macs(model, [1, 28, 28]) == convs + fcs


def test_lenet5_macs_by_formula():
    model = build({"name": "lenet5"})
    expected = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10
    assert count_macs(model, [1, 28, 28]) == expected


def test_pcn_layers_counted_with_projection():
    arch = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 5, 6, 4], "fc": [12]}
    model = build(arch).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["conv2", "fc1"], train, samples=64, batch_size=64)
    new, _ = pcn_input_transform(model, stats, {"dims": 2}, ["conv2", "fc1"])
    before = count_macs(model, [1, 8, 8])
    conv2_old = 8 * 8 * 5 * 3 * 9
    conv2_new = 8 * 8 * 3 * 2 + 8 * 8 * 5 * 2 * 9  # projection + conv on 2 channels
    fc1_old = 16 * 12
    fc1_new = 16 * 2 + 2 * 12
    assert count_macs(new, [1, 8, 8]) == before - conv2_old + conv2_new - fc1_old + fc1_new
    counts = param_counts(new)
    assert counts["total"] - counts["trainable"] == (3 * 2 + 3) + (16 * 2 + 16)
    assert new.training is False


def test_nonzero_counts_pruned_entries():
    model = build({"name": "mlp", "widths": [4], "input_shape": [1, 2, 2]})
    with torch.no_grad():
        model.fc1.weight[:2] = 0
    assert param_counts(model)["nonzero"] == 16 - 8 + 4 * 10


@pytest.mark.parametrize("arch,layers,blocking", [
    ({"name": "lenet300"}, ["fc1", "fc2"], "none"),
    ({"name": "lenet5"}, ["conv2", "fc1"], "none"),
    ({"name": "lenet5"}, ["conv2", "fc1"], "alds"),
    ({"name": "lenet5"}, ["conv2"], "square"),
])
def test_lowrank_layers_count_every_factor(arch, layers, blocking):
    """A factored layer costs positions x (r(p+q) per factored block, p*q per dense one); its
    last factor is applied functionally and was missed before (LeNet-300-100 at mac_ratio 0.3:
    57,084 reported against 79,084)."""
    from core.lowrank import block_params, block_shapes, layer_positions, lowrank_transform

    model = build(arch)
    shape = input_shape(model.slimline_arch)
    positions = layer_positions(model, layers, shape)
    plan = {}
    expected = count_macs(model, shape)
    for name in layers:
        layer = get_layer(model, name)
        shapes = block_shapes(layer, blocking)
        ranks = [max(1, min(p, q) // 5) for p, q in shapes]
        ranks[-1] = min(shapes[-1])  # one block kept at full rank: stored dense
        plan[name] = {"blocking": blocking, "ranks": ranks}
        dense = sum(p * q for p, q in shapes)
        kept = sum(block_params(p, q, r) for (p, q), r in zip(shapes, ranks, strict=True))
        expected += positions[name] * (kept - dense)
    factored, _ = lowrank_transform(model, plan)
    assert count_macs(factored, shape) == expected
