import math
from pathlib import Path

import pytest
import torch
from torch import nn

from core.data import fashion_mnist, synthetic
from core.errors import SpecError
from core.models import build
from core.prune import (
    apply_masks,
    collapsed_layers,
    layer_report,
    masks_from_scores,
    prunable,
    random_scores,
    snip_scores,
)
from core.sigprop import (
    approximate_isometry,
    init_ldi,
    init_scaled_gaussian,
    init_variance_scaling,
    jacobian_singular_values,
    orthogonality_score,
    retained_input_heatmap,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")
# Seed 004 §4.3.1 / Table 4.1: K = 7 layers of width N = 100, tanh, on 28x28 images.
TANH7 = {"name": "mlp", "input_shape": [1, 28, 28], "widths": [100] * 6, "activation": "tanh"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_ldi_gives_orthogonal_weights_with_the_activation_gain():
    model = build({"name": "mlp", "input_shape": [1, 1, 20], "widths": [30, 12],
                   "activation": "tanh"})
    init_ldi(model, gen())
    eye = torch.eye
    w1, w2, w3 = model.fc1.weight, model.fc2.weight, model.fc3.weight  # (30,20) (12,30) (10,12)
    torch.testing.assert_close(w1.T @ w1, eye(20), atol=1e-5, rtol=0)  # out > in
    torch.testing.assert_close(w2 @ w2.T, eye(12), atol=1e-5, rtol=0)  # out <= in
    torch.testing.assert_close(w3 @ w3.T, eye(10), atol=1e-5, rtol=0)
    assert all(not m.bias.detach().any() for _, m in prunable(model))
    relu = build({"name": "mlp", "input_shape": [1, 1, 20], "widths": [12]})
    init_ldi(relu, gen())
    torch.testing.assert_close(relu.fc1.weight @ relu.fc1.weight.T, 2 * eye(12), atol=1e-5,
                               rtol=0)
    init_ldi(relu, gen(), gain=0.5)
    torch.testing.assert_close(relu.fc2.weight @ relu.fc2.weight.T, 0.25 * eye(10), atol=1e-6,
                               rtol=0)


def test_ldi_conv_is_delta_orthogonal():
    model = build({"name": "conv4", "input_shape": [3, 8, 8], "channels": [8, 16, 16, 16],
                   "fc": [32]})
    init_ldi(model, gen(1), gain=1.0)
    w = model.conv3.weight.detach()  # (16, 16, 3, 3)
    centre = w[:, :, 1, 1]
    torch.testing.assert_close(centre @ centre.T, torch.eye(16), atol=1e-5, rtol=0)
    off = w.clone()
    off[:, :, 1, 1] = 0
    assert float(off.abs().max()) == 0
    c1 = model.conv1.weight[:, :, 1, 1]  # (8, 3): out > in, orthonormal columns
    torch.testing.assert_close(c1.T @ c1, torch.eye(3), atol=1e-5, rtol=0)
    # The Gram matrix of M = (C_in*kh*kw, C_out) is centre @ centre.T: the identity when
    # C_out <= C_in, rank C_in otherwise (conv1 3 -> 8, conv2 8 -> 16), so
    # OS = (sqrt(8 - 3) + sqrt(16 - 8)) / 6 layers.
    assert orthogonality_score(model) == pytest.approx((math.sqrt(5) + math.sqrt(8)) / 6)
    init_variance_scaling(model, gen(), mode="glorot")
    assert orthogonality_score(model) > 0.5


def test_scaled_gaussian_variance_is_gamma():
    model = build({"name": "mlp", "input_shape": [1, 1, 100], "widths": [100, 100]})
    init_scaled_gaussian(model, 0.25, gen())
    w = torch.cat([m.weight.detach().flatten() for _, m in prunable(model)])
    assert abs(float(w.var()) / 0.25 - 1) < 0.03 and abs(float(w.mean())) < 0.01
    with pytest.raises(SpecError):
        init_scaled_gaussian(model, 0.0, gen())


def test_variance_scaling_modes():
    model = build({"name": "mlp", "input_shape": [1, 1, 400], "widths": [200]})
    init_variance_scaling(model, gen(), mode="lecun")
    assert abs(float(model.fc1.weight.detach().std()) * math.sqrt(400) - 1) < 0.03
    init_variance_scaling(model, gen(), mode="glorot")
    # Xavier-uniform: variance 2 / (fan_in + fan_out)
    assert abs(float(model.fc1.weight.detach().var()) * 600 / 2 - 1) < 0.03
    with pytest.raises(SpecError):
        init_variance_scaling(model, gen(), mode="orthogonal")


def test_jacobian_singular_values_of_an_orthogonal_linear_net_are_one():
    model = build({"name": "mlp", "input_shape": [1, 1, 16], "widths": [16, 16],
                   "num_classes": 16, "activation": "linear"})
    init_ldi(model, gen())
    x = torch.randn(5, 1, 1, 16, generator=gen(1))
    stats = jacobian_singular_values(model, x)
    assert stats["values"].shape == (5, 16)
    torch.testing.assert_close(stats["values"], torch.ones(5, 16, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert abs(stats["condition_number"] - 1) < 1e-5 and stats["std"] < 1e-6
    assert model.training  # a copy was evaluated


def test_approximate_isometry_lowers_the_score_and_keeps_the_mask():
    model = build({"name": "mlp", "input_shape": [1, 1, 64], "widths": [64, 64, 32],
                   "activation": "tanh"})
    init_ldi(model, gen())
    masks = masks_from_scores(random_scores(model, gen(1)), 0.7)
    apply_masks(model, masks)
    before = orthogonality_score(model, masks)
    report = approximate_isometry(model, masks)
    after = orthogonality_score(model, masks)
    assert report["os_before"] == pytest.approx(before)
    assert report["os_after"] == pytest.approx(after)
    assert after < 0.5 * before and 0 < report["steps"] <= 10_000
    assert set(report["layers"]) == {"fc1", "fc2", "fc3", "fc4"}
    for name, layer in prunable(model):
        assert (layer.weight[~masks[name]] == 0).all()
    assert layer_report(masks) == layer_report(
        {n: m.weight != 0 for n, m in prunable(model)})  # no kept weight driven to 0


def test_retained_input_heatmap():
    mask = torch.zeros(4, 2 * 3 * 3, dtype=torch.bool)
    mask[:2, 0] = True
    mask[:, 17] = True
    heat = retained_input_heatmap(mask, [2, 3, 3])
    assert heat.shape == (2, 3, 3) and heat[0, 0, 0] == 0.5 and heat[1, 2, 2] == 1.0
    assert float(heat.sum()) == 1.5
    conv = torch.ones(6, 3, 5, 5, dtype=torch.bool)
    conv[:3, 0, 2, 2] = False
    assert retained_input_heatmap(conv, [3, 28, 28])[0, 2, 2] == 0.5
    with pytest.raises(SpecError):
        retained_input_heatmap(mask, [1, 28, 28])


def snip_tanh7(init, data, sparsity=0.9):
    model = build(TANH7)
    init(model)
    batches = [(data.x[i:i + 1000], data.y[i:i + 1000]) for i in range(0, len(data), 1000)]
    masks = masks_from_scores(snip_scores(model, batches), sparsity)
    return model, masks


def glorot(model):
    init_variance_scaling(model, gen(0), mode="glorot")


def sg_one(model):
    init_scaled_gaussian(model, 1.0, gen(0))


def reachable_outputs(masks):
    """How many output units of a chain of dense layers some input still reaches."""
    reached = None
    for mask in masks.values():  # (out, in)
        reached = mask.any(1) if reached is None else mask[:, reached].any(1)
    return int(reached.sum())


def test_snip_collapses_layers_of_a_badly_initialised_tanh_mlp():
    """Seed 004 Table 4.1: SG(gamma=1) -> layers disconnected at 90% sparsity; variance
    scaling -> every layer keeps weights. Scores over the whole training set (App. 4.B)."""
    data = synthetic("synthetic-blobs", 0)[0]  # 2000 images of 28x28
    bad_model, bad = snip_tanh7(sg_one, data)
    good_model, good = snip_tanh7(glorot, data)
    assert collapsed_layers(bad) == ["fc4", "fc5", "fc6", "fc7"], layer_report(bad)
    assert collapsed_layers(good) == [], layer_report(good)
    # ... because the initial Jacobian is badly conditioned (Table 4.1 CN column).
    x = data.x[:8]
    assert (jacobian_singular_values(bad_model, x)["condition_number"]
            > 1e3 * jacobian_singular_values(good_model, x)["condition_number"])


def test_snip_disconnects_a_badly_initialised_tanh_mlp_on_fashion_mnist():
    """The same on real images: the first 10k Fashion-MNIST training images (the thesis uses
    all of MNIST; with all 60k Fashion-MNIST images a thin path of 1-10 units survives). No
    layer is strictly empty, but fc5 and fc6 keep a handful of weights and no input reaches an
    output: the network is disconnected (Table 4.1, error 90.2%)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST files are not installed")
    data = fashion_mnist(FASHION)[0].subset(torch.arange(10_000))
    _, bad = snip_tanh7(sg_one, data)
    _, good = snip_tanh7(glorot, data)
    report = layer_report(bad)
    assert report["fc5"]["kept"] <= 10 and report["fc6"]["kept"] <= 10, report
    assert reachable_outputs(bad) == 0, report
    assert reachable_outputs(good) == 10 and collapsed_layers(good) == []
    assert min(r["fraction"] for r in layer_report(good).values()) > 0.03


def test_activation_option_of_the_mlp():
    x = torch.randn(3, 1, 1, 4, generator=gen())
    linear = build({"name": "mlp", "input_shape": [1, 1, 4], "widths": [5],
                    "activation": "linear"})
    w = linear.fc2.weight @ linear.fc1.weight
    b = linear.fc2.weight @ linear.fc1.bias + linear.fc2.bias
    torch.testing.assert_close(linear(x), x.flatten(1) @ w.T + b)
    assert build({"name": "mlp"}).slimline_arch["activation"] == "relu"
    with pytest.raises(SpecError, match="activation"):
        build({"name": "mlp", "activation": "swish"})
    assert isinstance(build({"name": "mlp", "activation": "tanh"}), nn.Module)
