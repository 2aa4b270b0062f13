import pytest
import torch

from core.data import ArrayDataset
from core.dim_tracking import effective_dim_curve
from core.errors import SpecError
from core.metrics import param_counts
from core.models import build
from core.pca import collect_input_stats
from core.pcn_output import pcn_transform
from core.pcn_select import auto_layers, auto_output, pcn_transform_to_target
from core.train import evaluate

TINY_CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 5, 6, 4],
              "fc": [12, 9]}


def calibration(shape, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.zeros(n, dtype=torch.int64))


def test_auto_layers_takes_the_widest_layers():
    # conv4 at 28x28: conv2 36864, conv3 73728, conv4 147456, fc1 1605632, fc2 65536,
    # fc3 2560 weights; fc1 alone holds 83% < 90%, fc1 + conv4 hold 90.7%
    assert auto_layers(build({"name": "conv4"})) == ["conv4", "fc1"]
    assert auto_layers(build({"name": "conv4"}), coverage=1.0) == [
        "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
    # an MLP's first layer reads 784 pixels: fc1 (235200 of 266200 weights) + fc2 (30000)
    assert auto_layers(build({"name": "lenet300"})) == ["fc1", "fc2"]
    # a first layer reading fewer than min_in_dim dims is never a candidate
    assert auto_layers(build({"name": "lenet300"}), min_in_dim=1000) == ["fc2"]
    resnet = auto_layers(build({"name": "resnet", "width": 0.5}))
    assert "stage3.0.conv1" in resnet and "stage3.0.shortcut_conv" in resnet
    assert "conv1" not in resnet and "stage1.0.conv1" not in resnet
    with pytest.raises(SpecError, match="coverage"):
        auto_layers(build({"name": "lenet300"}), coverage=0)


def test_auto_output_where_readers_are_compressed_10x():
    torch.manual_seed(0)
    model = build({"name": "mlp", "input_shape": [1, 1, 40], "widths": [30, 20]}).eval()
    stats = collect_input_stats(model, ["fc2", "fc3"], calibration([1, 1, 40]), samples=200)
    assert auto_output(model, stats, {"fc2": 3, "fc3": 2}) == {
        "fc1": {"score_mass": 0.9}, "fc2": {"score_mass": 0.9}}
    assert auto_output(model, stats, {"fc2": 3, "fc3": 3}) == {"fc1": {"score_mass": 0.9}}
    assert auto_output(model, stats, {"fc2": 3}) == {"fc1": {"score_mass": 0.9}}
    new, report = pcn_transform(model, stats, {"dims": 2}, ["fc2", "fc3"], output="auto")
    assert set(report["output"]) == {"fc1", "fc2"}
    assert new.fc1.out_features == report["output"]["fc1"]["keep"] <= 30
    assert new(torch.rand(2, 1, 1, 40)).shape == (2, 10)


def conv4_and_stats():
    torch.manual_seed(0)
    model = build(TINY_CONV4).eval()
    layers = ["conv3", "conv4", "fc1", "fc2"]
    stats = collect_input_stats(model, layers, calibration([1, 8, 8]), samples=200)
    return model, layers, stats


def test_target_trainable_params_meets_the_budget_with_least_compression():
    model, layers, stats = conv4_and_stats()
    before = param_counts(model)["trainable"]
    budget = before - 150
    new, report = pcn_transform_to_target(model, stats, {"trainable_params": budget}, layers)
    search = report["search"]
    assert param_counts(new)["trainable"] == search["value"] <= budget
    # every evaluated smaller threshold (less compression) exceeds the budget
    smaller = [t for t in search["trials"] if t["threshold"] < search["threshold"]]
    assert all(t["value"] > budget for t in smaller)
    assert new.slimline_arch["edits"][-1]["op"] == "pcn_input"
    assert len(search["trials"]) <= 9  # bisection over 49 grid points


def test_target_below_minimum_raises():
    model, layers, stats = conv4_and_stats()
    with pytest.raises(SpecError, match="below the minimum achievable"):
        pcn_transform_to_target(model, stats, {"trainable_params": 10}, layers)
    for bad in ({"trainable_params": 0}, {"params": 5}, {"max_accuracy_drop": 2.0}):
        with pytest.raises(SpecError):
            pcn_transform_to_target(model, stats, bad, layers)
    with pytest.raises(SpecError, match="val_dataset"):
        pcn_transform_to_target(model, stats, {"max_accuracy_drop": 0.1}, layers)
    with pytest.raises(SpecError, match="core.pcn_select"):
        pcn_transform(model, stats, {"target": {"trainable_params": 10}}, layers)


def test_target_max_accuracy_drop():
    model, layers, stats = conv4_and_stats()
    x = calibration([1, 8, 8], n=300, seed=5).x
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = the model's own predictions: baseline accuracy 1.0
    val = ArrayDataset(x, y)
    for drop in (0.0, 0.3):
        new, report = pcn_transform_to_target(model, stats, {"max_accuracy_drop": drop},
                                              layers, val_dataset=val)
        search = report["search"]
        assert search["baseline"] == 1.0
        acc = evaluate(new, val, device="cpu")["accuracy"]
        assert acc == search["value"] >= 1.0 - drop - 1e-9
        larger = [t for t in search["trials"] if t["threshold"] > search["threshold"]]
        assert all(t["value"] < 1.0 - drop for t in larger)
    assert search["threshold"] > 0


def test_effective_dim_curve():
    torch.manual_seed(0)
    model = build(TINY_CONV4)
    data = calibration([1, 8, 8], n=64)
    curve = effective_dim_curve(model, ["conv2", "fc1"], data, [0.0, 1e-3, 1e9], samples=64)
    stats = collect_input_stats(model, ["conv2", "fc1"], data, samples=64)
    for name in ("conv2", "fc1"):
        e = stats[name].eigvals
        assert curve[name]["eigvals"] == [float(v) for v in e]
        assert curve[name]["effective_dim"] == {0.0: int((e > 0).sum()),
                                                1e-3: max(1, int((e > 1e-3).sum())), 1e9: 1}
    with pytest.raises(SpecError):
        effective_dim_curve(model, ["conv2"], data, [], samples=8)


def test_effective_dim_curve_with_a_spectrum_cap_computes_only_what_it_reports():
    """fc1 reads 32 dims from 20 samples (Gram route): the capped curve has the same m_e and
    the same leading eigenvalues as the full one, and at most what it needs beyond k."""
    torch.manual_seed(0)
    model = build(TINY_CONV4)
    data = calibration([1, 8, 8], n=20)
    taus = [1e-3, 1e-2]
    full = effective_dim_curve(model, ["conv2", "fc1"], data, taus, samples=20)
    capped = effective_dim_curve(model, ["conv2", "fc1"], data, taus, samples=20, spectrum=4)
    for name in ("conv2", "fc1"):
        assert capped[name]["effective_dim"] == full[name]["effective_dim"]
        k = len(capped[name]["eigvals"])
        rank = sum(1 for v in full[name]["eigvals"] if v > 1e-12)
        assert k >= min(4, rank)  # the Gram route stops at the rank (zeros are not listed)
        assert capped[name]["eigvals"] == pytest.approx(full[name]["eigvals"][:k], rel=1e-6,
                                                        abs=1e-12)
