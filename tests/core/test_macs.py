"""MACs per sample of every layer kind and of whole models, against counts written out by hand.

Conventions (core.metrics): a weight entry used once per output position is one MAC; biases,
BatchNorm, activations and pooling are free; a masked layer and a DCTpS layer cost the dense
layer a dense runtime executes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.dctps import dctps_layer
from core.layers import as_layer
from core.lowrank import LowRankLayer, factorize_layer, lowrank_transform
from core.metrics import count_macs
from core.models import build
from core.pcn import PCNConv2d, PCNLinear


class One(nn.Module):
    """A model that is just `layer` (count_macs needs a model)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def macs(layer: nn.Module, *input_shape: int) -> int:
    return count_macs(One(layer), list(input_shape))


def test_linear():
    assert macs(nn.Linear(784, 300), 784) == 784 * 300 == 235_200


def test_conv_with_stride_and_padding():
    # 3 -> 8 channels, 3x3, stride 2, padding 1 on 16x16: H' = W' = (16 + 2 - 3) // 2 + 1 = 8
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert macs(conv, 3, 16, 16) == 8 * 8 * 8 * 3 * 9 == 13_824


def test_grouped_conv():
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # every output reads 8/4 channels
    assert macs(conv, 8, 10, 10) == 10 * 10 * 16 * 2 * 9 == 28_800


def test_pcn_linear():
    # projection 784 -> 50, then 50 -> 300
    assert macs(PCNLinear(784, 50, 300), 784) == 784 * 50 + 50 * 300 == 54_200


def test_pcn_conv():
    # 1x1 projection 8 -> 4 at 10x10, then a 3x3 conv 4 -> 16 (padding 1: 10x10 out)
    layer = PCNConv2d(8, 4, 16, (3, 3), (1, 1), (1, 1))
    assert macs(layer, 8, 10, 10) == 10 * 10 * 8 * 4 + 10 * 10 * 16 * 4 * 9 == 60_800


def test_lowrank_linear_without_blocking():
    # 60 x 100 at rank 10: 10 * (60 + 100) = 1,600 < 6,000, so factored
    layer = LowRankLayer(nn.Linear(100, 60), "none", [10])
    assert macs(layer, 100) == 100 * 10 + 10 * 60 == 1_600


def test_lowrank_linear_with_blocking():
    # alds: 4 blocks of 60 x 25; rank 5: 5 * 85 = 425 < 1,500 (factored); rank 20: 1,700 >=
    # 1,500, stored dense (60 x 25)
    layer = LowRankLayer(nn.Linear(100, 60), "alds", [5, 20, 5, 5])
    assert macs(layer, 100) == 3 * (25 * 5 + 5 * 60) + 60 * 25 == 2_775


def test_lowrank_conv():
    # 16 x (8*3*3) at rank 4: first factor 8 -> 4 (3x3) and second 4 -> 16 (1x1), 10x10 out
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = LowRankLayer(conv, "none", [4])
    assert macs(layer, 8, 10, 10) == 100 * 4 * 8 * 9 + 100 * 16 * 4 == 35_200


def test_lowrank_conv_with_blocking_and_stride():
    # alds: 4 blocks of 2 input channels (16 x 18 each), stride 2 -> 5x5 out; rank 2 factored
    # (2 * 34 = 68 < 288)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    layer = LowRankLayer(conv, "alds", [2, 2, 2, 2])
    assert macs(layer, 8, 10, 10) == 4 * (25 * 2 * 2 * 9 + 25 * 16 * 2) == 6_800


def test_dctps_counts_the_dense_layer():
    assert macs(dctps_layer(nn.Linear(100, 60), 30), 100) == 6_000
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # 5x5 out
    assert macs(dctps_layer(conv, 50), 8, 10, 10) == 5 * 5 * 16 * 8 * 9 == 28_800


def test_masked_layers_count_dense():
    linear, conv = nn.Linear(100, 60), nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
        conv.weight[:, :4] = 0
    assert macs(linear, 100) == 6_000
    assert macs(conv, 8, 10, 10) == 10 * 10 * 16 * 8 * 9 == 115_200


def test_lenet300():
    assert count_macs(build({"name": "lenet300"}), [1, 28, 28]) == \
        784 * 300 + 300 * 100 + 100 * 10 == 266_200


def test_lenet5():
    # conv1 20@5x5 on 28x28 -> 24x24, pool -> 12x12; conv2 50@5x5 -> 8x8, pool -> 4x4
    assert count_macs(build({"name": "lenet5"}), [1, 28, 28]) == \
        24 * 24 * 20 * 1 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10 == 2_293_000


def test_lowrank_lenet300_at_mac_ratio_0_3():
    """LeNet-300-100 with fc1 at rank 46, fc2 at 70 and fc3 at full rank 10 (what a
    relative-error mac_ratio 0.3 step picks for a Glorot init): fc1 46 * (784 + 300), fc2
    70 * (300 + 100) = 28,000 < 30,000 (factored), fc3 dense 100 * 10."""
    model = build({"name": "lenet300"})
    plan = {"fc1": {"blocking": "none", "ranks": [46]}, "fc2": {"blocking": "none", "ranks": [70]},
            "fc3": {"blocking": "none", "ranks": [10]}}
    factored, _ = lowrank_transform(model, plan)
    expected = 46 * 784 + 46 * 300 + 70 * 300 + 70 * 100 + 100 * 10
    assert count_macs(factored, [1, 28, 28]) == expected == 78_864
    assert expected <= 0.3 * 266_200


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(12, 7),
    lambda: nn.Conv2d(3, 5, 3, padding=1),
    lambda: factorize_layer(nn.Linear(12, 7), "alds", [2, 3, 1, 3]),
    lambda: factorize_layer(nn.Conv2d(4, 6, 3, padding=1), "square", [1, 2, 3, 2]),
    lambda: dctps_layer(nn.Conv2d(3, 5, 3, padding=1), 20),
])
def test_dense_weight_is_what_the_layer_computes(make):
    torch.manual_seed(0)
    module = make().double()
    layer = as_layer(module)
    assert layer is not None
    if layer.kind == "conv":
        x = torch.randn(2, layer.in_dim, 6, 6, dtype=torch.float64)
        dense = nn.functional.conv2d(x, layer.dense_weight(), padding=1)
    else:
        x = torch.randn(2, layer.in_dim, dtype=torch.float64)
        dense = x @ layer.dense_weight().T
    bias = getattr(module, "bias", None)
    if bias is not None:
        dense = dense + (bias[:, None, None] if layer.kind == "conv" else bias)
    torch.testing.assert_close(module(x), dense)


def test_pcn_dense_weight_applies_to_centred_input():
    torch.manual_seed(0)
    layer = PCNLinear(6, 3, 4).double()
    for t in (layer.U, layer.mu, layer.weight, layer.bias):
        t.data.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), (x - layer.mu) @ layer.dense_weight().T + layer.bias)
