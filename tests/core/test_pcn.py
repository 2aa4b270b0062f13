import pytest
import torch

from core.data import synthetic
from core.errors import SpecError
from core.metrics import param_counts
from core.models import build
from core.pca import collect_input_stats
from core.pcn import PCNConv2d, PCNLinear, pcn_input_transform
from tests.tiny_models import double_model

TINY_CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 5, 6, 4],
              "fc": [12, 9]}


def calibration(shape, n=300, seed=0):
    from core.data import ArrayDataset
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.zeros(n, dtype=torch.int64))


def full_basis(model, layers, dataset):
    stats = collect_input_stats(model, layers, dataset, samples=len(dataset), batch_size=64)
    select = {"per_layer": {n: {"dims": stats[n].dim} for n in layers}}
    return pcn_input_transform(model, stats, select, layers)


def test_full_basis_mlp_is_exact():
    model = double_model({"name": "mlp", "input_shape": [1, 4, 4], "widths": [12, 7]})
    data = calibration([1, 4, 4])
    new, report = full_basis(model, ["fc1", "fc2", "fc3"], data)
    x = torch.randn(50, 1, 4, 4, dtype=torch.float64) * 3  # off the calibration distribution
    assert torch.allclose(new(x), model(x), atol=1e-5, rtol=0)
    assert (new(x) - model(x)).abs().max() < 1e-10
    assert report["fc2"]["dims"] == report["fc2"]["in_dim"] == 12
    assert report["fc2"]["explained_variance"] == pytest.approx(1.0)


def test_full_basis_conv_with_padding_is_exact():
    model = double_model(TINY_CONV4)
    layers = ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
    data = calibration([1, 8, 8])
    new, _ = full_basis(model, layers, data)
    assert all(isinstance(getattr(new, n), PCNConv2d) for n in layers[:4])
    assert new.conv2.padding == (1, 1)
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    assert (new(x) - model(x)).abs().max() < 1e-10


def test_padding_correction_is_needed():
    """Padding the projected map with 0 instead of -mu U is wrong on the border only
    (seed 000 App. D)."""
    model = double_model(TINY_CONV4)
    new, _ = full_basis(model, ["conv2"], calibration([1, 8, 8]))
    layer = new.conv2
    h = torch.rand(2, 3, 8, 8, dtype=torch.float64) + 0.5  # mu far from 0
    z = torch.einsum("nchw,ck->nkhw", h - layer.mu[:, None, None], layer.U)
    naive = torch.nn.functional.conv2d(z, layer.weight, layer.bias, padding=1)
    exact = layer(h)
    assert (exact - model.conv2(h)).abs().max() < 1e-10
    assert (naive - exact)[..., 1:-1, 1:-1].abs().max() < 1e-10
    assert (naive - exact)[..., 0, :].abs().max() > 1e-3


def test_full_basis_resnet_with_stride_and_no_bias_is_exact():
    arch = {"name": "resnet", "width": 0.25, "input_shape": [1, 8, 8]}
    model = double_model(arch)
    data = calibration([1, 8, 8], n=64)
    layers = ["stage2.0.conv1", "stage2.0.shortcut_conv", "stage3.1.conv2", "fc"]
    new, _ = full_basis(model, layers, data)
    assert new.get_submodule("stage2.0.conv1").stride == (2, 2)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    assert (new(x) - model(x)).abs().max() < 1e-9


def test_truncated_transform_reduces_trainable_params_exactly():
    torch.manual_seed(0)
    model = build(TINY_CONV4).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["conv3", "fc1", "fc2"], train, samples=256,
                                batch_size=128)
    select = {"dims": 2, "per_layer": {"fc1": {"dims": 10}}}
    new, report = pcn_input_transform(model, stats, select, ["conv3", "fc1", "fc2"])
    assert {k: v["dims"] for k, v in report.items()} == {"conv3": 2, "fc1": 10, "fc2": 2}
    # conv3: 5 -> 6 channels, 3x3, keep 2; fc1: 4*2*2=16 -> 12, keep 10; fc2: 12 -> 9, keep 2
    saved = (5 - 2) * 6 * 9 + (16 - 10) * 12 + (12 - 2) * 9
    before, after = param_counts(model), param_counts(new)
    assert before["trainable"] - after["trainable"] == saved
    buffers = (5 * 2 + 5) + (16 * 10 + 16) + (12 * 2 + 12)
    assert after["total"] == after["trainable"] + buffers
    x = torch.randn(3, 1, 8, 8)
    assert new(x).shape == model(x).shape == (3, 10)
    assert not any(p is new.fc1.U for p in new.parameters())
    assert new.slimline_arch["edits"] == [
        {"op": "pcn_input", "layer": "conv3", "dims": 2},
        {"op": "pcn_input", "layer": "fc1", "dims": 10},
        {"op": "pcn_input", "layer": "fc2", "dims": 2}]
    assert model.slimline_arch["edits"] == []  # original untouched
    assert isinstance(model.fc1, torch.nn.Linear)


def test_truncation_keeps_top_components_of_low_rank_input():
    """Inputs living in a 3-dim affine subspace are reproduced exactly with 3 components."""
    model = double_model({"name": "mlp", "input_shape": [1, 1, 10], "widths": [6]})
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(3, 10, generator=g, dtype=torch.float64)
    offset = torch.randn(10, generator=g, dtype=torch.float64)

    def sample(n):
        return (torch.randn(n, 3, generator=g, dtype=torch.float64) @ basis + offset)

    from core.data import ArrayDataset
    data = ArrayDataset(sample(100).float().reshape(100, 1, 1, 10), torch.zeros(100).long())
    model_stats = collect_input_stats(model, ["fc1"], data, samples=100, batch_size=100)
    new, report = pcn_input_transform(model, model_stats, {"threshold": 1e-4}, ["fc1"])
    assert report["fc1"]["dims"] == 3
    x = sample(20).reshape(20, 1, 1, 10)
    x32 = x.float().double()  # same precision as the calibration data
    assert (new(x32) - model(x32)).abs().max() < 1e-4


def test_auto_skips_first_layer():
    model = build(TINY_CONV4).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    names = ["conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
    stats = collect_input_stats(model, names, train, samples=64, batch_size=64)
    new, report = pcn_input_transform(model, stats, {"energy": 0.9})
    assert list(report) == names
    assert isinstance(new.conv1, torch.nn.Conv2d) and isinstance(new.fc3, PCNLinear)


def test_kind_selectors():
    model = build(TINY_CONV4).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["conv2", "fc1"], train, samples=64, batch_size=64)
    _, report = pcn_input_transform(model, stats, {"conv": {"dims": 1}, "linear": {"dims": 4}},
                                    ["conv2", "fc1"])
    assert report["conv2"]["dims"] == 1 and report["fc1"]["dims"] == 4


@pytest.mark.parametrize("layers, select, match", [
    (["fc9"], {"dims": 2}, "valid layers: conv1, conv2"),
    (["fc1"], {"dims": 2, "threshold": 0.1}, "exactly one"),
    (["fc1"], {}, "no selector"),
    (["fc1"], {"dims": 0}, "dims"),
    (["fc1"], {"energy": 1.5}, "energy"),
    (["fc1"], {"dims": 2, "per_layer": {"fc2": {"dims": 1}}}, "not transformed"),
    (["fc1"], {"rank": 2}, "unknown select keys"),
    (["fc1"], {"per_layer": {"fc1": 3}}, "selector dict"),
    (["fc2"], {"dims": 2}, "no PCA stats"),
    ("all", {"dims": 2}, "'auto' or a list"),
])
def test_bad_requests_raise_spec_error(layers, select, match):
    model = build(TINY_CONV4).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["fc1"], train, samples=32, batch_size=32)
    with pytest.raises(SpecError, match=match):
        pcn_input_transform(model, stats, select, layers)


def test_pcn_layers_not_transformable_twice():
    model = build(TINY_CONV4).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["fc1"], train, samples=32, batch_size=32)
    new, _ = pcn_input_transform(model, stats, {"dims": 2}, ["fc1"])
    with pytest.raises(SpecError, match="valid layers"):
        pcn_input_transform(new, stats, {"dims": 2}, ["fc1"])
