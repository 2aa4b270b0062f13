import math

import pytest
import torch

from core.errors import SpecError
from core.models import build, from_state_dict
from core.redundancy import (
    elbow,
    elbow_accuracy,
    frame_potential,
    frame_potential_contributions,
    frame_potential_greedy,
    frame_potential_order,
    frame_potential_order_naive,
    init_variance,
    magnitude_order,
    marchenko_pastur,
    principal_angles,
    random_order,
    rank_k_projection,
    spectrum,
    unit_pruning,
    unit_pruning_curve,
)
from tests.tiny_models import double_model

TINY_MLP = {"name": "mlp", "input_shape": [1, 1, 6], "widths": [7, 5]}
TINY_CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 5, 6, 4],
              "fc": [12, 9]}
TINY_RESNET = {"name": "resnet", "input_shape": [3, 8, 8], "depth": 8, "width": 0.25}


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ---- frame potential -------------------------------------------------------------------

def test_frame_potential_is_frobenius_norm_of_correlation_matrix():
    w = randn(9, 6)
    wh = w / w.norm(dim=1, keepdim=True)
    x = wh @ wh.T
    fp = frame_potential(w)
    assert fp == pytest.approx(float(torch.linalg.eigvalsh(x).square().sum()), rel=1e-12)
    assert fp == pytest.approx(float(torch.trace(x.T @ x)), rel=1e-12)
    assert fp == pytest.approx(float(frame_potential_contributions(w).sum()), rel=1e-12)
    q, _ = torch.linalg.qr(randn(10, 4, seed=1))  # (10, 4) orthonormal columns
    assert frame_potential(3.0 * q.T) == pytest.approx(4.0, rel=1e-12)  # orthonormal rows: m
    assert frame_potential(torch.ones(5, 3)) == pytest.approx(25.0)  # all equal: m^2
    conv = randn(4, 2, 3, 3)
    assert frame_potential(conv) == pytest.approx(frame_potential(conv.reshape(4, -1)))


def test_greedy_order_equals_naive_recompute_and_tracks_potential():
    w = randn(25, 8, seed=2)
    for largest in (False, True):
        order, potentials = frame_potential_greedy(w, largest_first=largest)
        assert order == frame_potential_order_naive(w, largest_first=largest)
        assert sorted(order) == list(range(25)) and len(potentials) == 26
        for t in range(1, 25):  # leave-one-out update == FP recomputed on the rows left
            left = sorted(set(range(25)) - set(order[:t]))
            assert potentials[t] == pytest.approx(frame_potential(w[left]), rel=1e-10)
        assert potentials[-1] == pytest.approx(0.0, abs=1e-9)
    assert frame_potential_order(w) == frame_potential_greedy(w)[0]
    # the first removal is the unit with the smallest contribution on the full matrix
    assert frame_potential_order(w)[0] == int(torch.argmin(frame_potential_contributions(w)))


def test_frame_potential_keeps_a_near_duplicate_pair_to_the_end():
    base = randn(6, 40, seed=3)
    w = torch.cat([base, base[:1] + 1e-3 * randn(1, 40, seed=4)])  # unit 6 ~ unit 0
    assert set(frame_potential_order(w)[-2:]) == {0, 6}  # the pair has the largest c_i
    assert frame_potential_order(w, largest_first=True)[0] in {0, 6}


def test_magnitude_and_random_orders():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    assert magnitude_order(w) == [3, 1, 2, 0]
    assert magnitude_order(w, largest_first=True) == [0, 2, 1, 3]
    a = random_order(10, torch.Generator().manual_seed(5))
    assert sorted(a) == list(range(10))
    assert a == random_order(10, torch.Generator().manual_seed(5))


# ---- Marchenko–Pastur / spectrum ------------------------------------------------------

def test_init_variance_matches_pytorch_default_init():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(400, 300), torch.nn.Conv2d(16, 64, 3)
    assert init_variance(lin) == pytest.approx(1 / 1200)
    assert init_variance(conv) == pytest.approx(1 / (3 * 144))
    assert float(lin.weight.detach().var()) == pytest.approx(1 / 1200, rel=0.02)
    assert init_variance(lin, "glorot") == pytest.approx(2 / 700)
    assert init_variance(conv, "kaiming") == pytest.approx(2 / (64 * 9))
    with pytest.raises(SpecError):
        init_variance(lin, "lecun")


@pytest.mark.parametrize("m,n", [(200, 800), (800, 200)])
def test_marchenko_pastur_edges_and_mass(m, n):
    var = 2.0 / 800
    out = spectrum(randn(m, n, seed=6) * math.sqrt(var), variance=var)
    eig = out["eigenvalues"]
    assert eig.shape == (m,) and bool((eig[:-1] >= eig[1:]).all())
    bulk = eig[:min(m, n)]
    assert float(bulk[0]) == pytest.approx(out["lambda_plus"], rel=0.1)
    assert float(bulk[-1]) == pytest.approx(out["lambda_minus"], rel=0.1)
    assert out["lambda_plus"] == pytest.approx(var * n * (1 + math.sqrt(m / n)) ** 2)
    assert out["outside_fraction"] < 0.05
    mp = marchenko_pastur(m, n, var, torch.linspace(out["lambda_minus"], out["lambda_plus"],
                                                    20001, dtype=torch.float64))
    mass = float(torch.trapezoid(mp["density"], mp["grid"]))
    assert mass + mp["zero_mass"] == pytest.approx(1.0, abs=0.01)
    assert mp["zero_mass"] == pytest.approx(max(0.0, 1 - n / m))


def test_spectrum_defaults_to_the_torch_init_variance_and_flags_a_spike():
    torch.manual_seed(1)
    layer = torch.nn.Linear(500, 100)
    assert spectrum(layer)["variance"] == pytest.approx(init_variance(layer))
    with torch.no_grad():
        layer.weight += 0.5 * torch.ones(100, 1) @ torch.ones(1, 500) / 500 ** 0.5
    assert spectrum(layer)["outside"] >= 1  # a planted rank-1 signal leaves the bulk


# ---- principal angles -----------------------------------------------------------------

def test_principal_angles_random_self_and_rotated():
    a, b = randn(5, 1000, seed=7), randn(5, 1000, seed=8)
    angles = principal_angles(a, b, 5)
    assert angles.shape == (5,) and bool((angles > 80).all())
    assert float(principal_angles(a, a, 5).max()) < 1e-4
    w = randn(8, 30, seed=9)
    q, _ = torch.linalg.qr(randn(8, 8, seed=10))
    assert float(principal_angles(w, q @ w, 5).max()) < 1e-4  # same right-singular vectors
    with pytest.raises(SpecError, match="same shape"):
        principal_angles(a, randn(6, 1000), 3)
    with pytest.raises(SpecError, match="k must be"):
        principal_angles(a, b, 6)
    low = randn(5, 2, seed=11) @ randn(2, 1000, seed=12)  # rank 2
    with pytest.raises(SpecError, match="numerical rank"):
        principal_angles(low, a, 3)


# ---- elbow ----------------------------------------------------------------------------

def test_elbow_finds_planted_rank_and_full_rank_projection_is_exact():
    u, _ = torch.linalg.qr(randn(30, 3, seed=13))
    v, _ = torch.linalg.qr(randn(40, 3, seed=14))
    w = u @ torch.diag(torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64)) @ v.T
    out = elbow(w + 1e-3 * randn(30, 40, seed=15))
    assert out["knee"] == 3
    assert out["residual"].shape == (31,) and float(out["residual"][0]) == pytest.approx(1.0)
    assert float(out["residual"][-1]) == 0.0

    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 6, 3).double()
    full = rank_k_projection(conv, 6)
    assert torch.allclose(full.weight, conv.weight, atol=1e-12)
    assert torch.equal(full.bias, conv.bias)
    r2 = rank_k_projection(conv, 2)
    assert r2.weight.shape == conv.weight.shape
    assert int(torch.linalg.matrix_rank(r2.weight.reshape(6, -1))) == 2
    with pytest.raises(SpecError):
        rank_k_projection(conv, 7)


def test_elbow_accuracy_evaluates_copies():
    model = double_model(TINY_MLP)
    x = randn(4, 1, 1, 6, seed=16)
    ref = model(x)
    curve = elbow_accuracy(model, "fc1", [1, 6], lambda m: float((m(x) - ref).abs().max()))
    assert [c["rank"] for c in curve] == [1, 6]
    assert curve[0]["accuracy"] > 1e-3 and curve[1]["accuracy"] < 1e-10  # fc1 is 7x6: rank 6
    assert torch.equal(model(x), ref)


# ---- unit pruning -----------------------------------------------------------------------

def zero_reader_inputs(reader, rows):
    """Pre-hook zeroing `rows` of the reader's (flattened) input: units removed after ReLU."""
    def hook(_mod, inputs):
        x = inputs[0].clone()
        x.flatten(1)[:, rows] = 0  # view of x for a contiguous tensor
        return (x,)
    return reader.register_forward_pre_hook(hook)


def test_physical_removal_equals_zeroing_after_activation_not_row_masking():
    model = double_model(TINY_MLP)
    removed = [1, 4]
    with torch.no_grad():
        model.fc1.bias[removed] = 0.5  # ReLU(b_i) > 0: a masked row would leak it
    x = randn(16, 1, 1, 6, seed=17)
    models = []
    curve = unit_pruning_curve(model, "fc1", [*removed, 0, 2], [0, 2],
                               lambda m: models.append(m) or 1.0)
    assert [c["units_left"] for c in curve] == [7, 5]
    dense, pruned = models
    assert torch.equal(dense(x), model(x))  # removing 0 units changes nothing
    assert pruned.fc1.weight.shape == (5, 6) and pruned.fc1.bias.shape == (5,)
    assert pruned.fc2.weight.shape == (5, 5)
    assert pruned.slimline_arch["edits"][-1] == {"op": "pcn_output", "layer": "fc1", "keep": 5}
    handle = zero_reader_inputs(model.fc2, removed)
    zeroed = model(x)
    handle.remove()
    assert (pruned(x) - zeroed).abs().max() < 1e-12
    masked = double_model(TINY_MLP)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        masked.fc1.weight[removed] = 0  # naive masking of the weight row only
    assert (masked(x) - zeroed).abs().max() > 1e-3
    assert model.fc1.weight.shape == (7, 6)  # the original is untouched


@pytest.mark.parametrize("arch,layer,reader,rows_per_unit", [
    (TINY_CONV4, "conv4", "fc1", 4),  # conv -> flatten (2x2 map) -> linear
    (TINY_CONV4, "conv2", "conv3", None),
    ({"name": "lenet5", "input_shape": [1, 16, 16]}, "conv2", "fc1", 1),
    (TINY_RESNET, "stage1.0.conv1", "stage1.0.conv2", None),  # with its BatchNorm
])
def test_conv_unit_removal_shapes_and_equivalence(arch, layer, reader, rows_per_unit):
    model = double_model(arch)
    model.eval()
    x = randn(3, *arch["input_shape"], seed=18)
    layer_mod = model.get_submodule(layer)
    units = layer_mod.out_channels
    removed = [0, units - 1]
    kept = []
    curve = unit_pruning_curve(model, layer, [*removed], [0, 2],
                               lambda m: kept.append(m) or 0.0)
    assert [c["removed"] for c in curve] == [0, 2]
    assert torch.equal(kept[0](x), model(x))
    pruned = kept[1]
    assert pruned.get_submodule(layer).out_channels == units - 2
    reader_mod = pruned.get_submodule(reader)
    if rows_per_unit is None:
        assert reader_mod.in_channels == units - 2
        hook_rows = removed  # channel index of a conv input: zero whole channels
        handle = model.get_submodule(reader).register_forward_pre_hook(
            lambda _m, inp: (inp[0] * torch.tensor(
                [0.0 if c in hook_rows else 1.0 for c in range(units)],
                dtype=inp[0].dtype)[None, :, None, None],))
    else:
        assert reader_mod.in_features == (units - 2) * rows_per_unit
        rows = [u * rows_per_unit + r for u in removed for r in range(rows_per_unit)]
        handle = zero_reader_inputs(model.get_submodule(reader), rows)
    zeroed = model(x)
    handle.remove()
    assert (pruned(x) - zeroed).abs().max() < 1e-10


def test_unit_pruning_curves_random_mean_and_std():
    model = double_model(TINY_MLP)
    x = randn(32, 1, 1, 6, seed=19)
    labels = model(x).argmax(dim=1)
    calls = []

    def evaluate(m):
        calls.append(m.training)
        return float((m(x).argmax(dim=1) == labels).double().mean())

    out = unit_pruning(model, "fc1", evaluate, seeds=5)
    assert out["units"] == 7 and out["counts"] == [0, 1, 2, 3, 4, 5, 6]
    for name in ("magnitude", "frame_potential"):
        assert [c["removed"] for c in out[name]] == out["counts"]
        assert out[name][0]["accuracy"] == 1.0
    rnd = out["random"]
    assert len(rnd) == 7 and all(len(r["accuracies"]) == 5 for r in rnd)
    assert rnd[0]["accuracy_mean"] == 1.0 and rnd[0]["accuracy_std"] == 0.0
    acc = torch.tensor(rnd[-1]["accuracies"], dtype=torch.float64)
    assert rnd[-1]["accuracy_mean"] == pytest.approx(float(acc.mean()))
    assert rnd[-1]["accuracy_std"] == pytest.approx(float(acc.std()))
    assert not any(calls)  # always evaluated in eval mode
    again = unit_pruning(model, "fc1", evaluate, counts=[0, 3], seeds=2, worst_case=True)
    assert set(again) >= {"magnitude_largest", "frame_potential_largest"}
    assert again["random"][1]["accuracies"] == unit_pruning(
        model, "fc1", evaluate, counts=[0, 3], seeds=2)["random"][1]["accuracies"]


def test_unit_pruning_default_counts_and_errors():
    model = build({"name": "mlp", "input_shape": [1, 1, 6], "widths": [40]})
    out = unit_pruning(model, "fc1", lambda m: 0.0, seeds=1)
    assert out["counts"] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert out["random"][3]["accuracy_std"] == 0.0
    with pytest.raises(SpecError, match="unit group"):
        unit_pruning_curve(model, "fc2", [0], [1], lambda m: 0.0)  # the logits layer
    with pytest.raises(SpecError, match="counts"):
        unit_pruning_curve(model, "fc1", list(range(40)), [40], lambda m: 0.0)
    with pytest.raises(SpecError, match="distinct"):
        unit_pruning_curve(model, "fc1", [1, 1], [1], lambda m: 0.0)


def test_resnet_stream_pruning_and_pruned_copy_reloads_from_its_arch():
    model = double_model(TINY_RESNET)
    x = randn(2, 3, 8, 8, seed=20)
    models = []
    out = unit_pruning(model, "stage1", lambda m: models.append(m) or 0.5, counts=[0, 1],
                       seeds=2)
    assert out["units"] == 4 and out["random"][1]["accuracy_std"] == 0.0
    pruned = models[1]
    assert pruned.stage1[0].conv2.out_channels == 3 and pruned.stage1[0].bn2.num_features == 3
    assert pruned.stage1[0].shortcut_conv.out_channels == 3
    assert pruned.stage2[0].conv1.in_channels == 3
    rebuilt = from_state_dict(pruned.slimline_arch, pruned.state_dict())
    assert torch.equal(rebuilt(x), pruned(x))
