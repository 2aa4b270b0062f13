import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from core.dctps import (
    DCTpSConv2d,
    DCTpSLayer,
    DCTpSLinear,
    allocate,
    dct_matrix,
    dct_weight,
    dctps_layer,
    dctps_transform,
    random_support,
    replay_dctps,
)
from core.errors import CheckpointError, SpecError
from core.models import build, load, save

LENET = {"name": "lenet5", "input_shape": [1, 16, 16], "num_classes": 10}
SHAPES = {"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5), "fc1": (120, 400), "fc2": (84, 120),
          "fc3": (10, 84)}
TOTAL = sum(math.prod(s) for s in SHAPES.values())  # 61470


def _dct_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DCTpSLayer)}


# ---- D ----

@pytest.mark.parametrize("q", [1, 2, 7, 16])
def test_dct_matrix_is_orthonormal_dct_ii(q):
    c = dct_matrix(q)
    assert torch.allclose(c @ c.T, torch.eye(q, dtype=torch.float64), atol=1e-12)
    for k in range(q):
        for i in range(q):
            s = math.sqrt((1 if k == 0 else 2) / q)
            assert abs(c[k, i].item() - s * math.cos(math.pi * (2 * i + 1) * k / (2 * q))) < 1e-12


@pytest.mark.parametrize("m,n", [(5, 9), (9, 5), (6, 6)])
def test_linear_d_is_truncated_dct(m, n):
    d = dct_weight((m, n))
    assert torch.equal(d, dct_matrix(max(m, n))[:m, :n])
    x = torch.randn(n, dtype=torch.float64)
    padded = torch.cat([x, x.new_zeros(max(m - n, 0))])
    # zero-padded input if m > n, truncated output if m < n (seed 002 App. B)
    assert torch.allclose(d @ x, (dct_matrix(max(m, n)) @ padded)[:m], atol=1e-12)
    assert torch.equal(dct_weight(nn.Linear(n, m)), d)


@pytest.mark.parametrize("c_in,m,kernel", [(4, 10, (3, 3)), (3, 30, (3, 3)), (2, 5, (3, 2))])
def test_conv_d_computes_the_dct_of_every_patch(c_in, m, kernel):
    conv = nn.Conv2d(c_in, m, kernel)
    kh, kw = kernel
    x = torch.randn(2, c_in, 7, 8, dtype=torch.float64)
    d = dct_weight(conv)
    assert d.shape == conv.weight.shape
    out = F.conv2d(x, d)  # (N, m, H', W')
    cols = F.unfold(x, kernel)  # (N, c*kh*kw, L), channel-major
    n_, _, length = cols.shape
    # the authors' patch flattening is channel-last (i, j, c)
    patches = cols.view(n_, c_in, kh, kw, length).permute(0, 2, 3, 1, 4).reshape(n_, -1, length)
    p = c_in * kh * kw
    if p < m:  # zero-padded patch
        patches = torch.cat([patches, patches.new_zeros(n_, m - p, length)], dim=1)
    ref = (dct_matrix(max(p, m)) @ patches)[:, :m]  # (N, m, L)
    assert torch.allclose(out.reshape(n_, m, -1), ref, atol=1e-10)


# ---- allocation ----

@pytest.mark.parametrize("allocation", ["epl", "epf", "uniform", "erk"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_allocation_hits_the_exact_budget(allocation, density):
    counts = allocate(SHAPES, density, allocation)
    assert list(counts) == list(SHAPES)
    assert sum(counts.values()) == round(density * TOTAL)
    assert all(0 <= counts[n] <= math.prod(s) for n, s in SHAPES.items())
    if density == 1.0:
        assert all(counts[n] == math.prod(s) for n, s in SHAPES.items())


def test_epl_caps_small_layers_and_shares_the_surplus():
    # 6147 / 5 = 1229.4 > 150 (conv1 capped); 5997 / 4 = 1499.25 > 840 (fc3 capped); 5157 / 3
    counts = allocate(SHAPES, 0.1, "epl")
    assert counts == {"conv1": 150, "conv2": 1719, "fc1": 1719, "fc2": 1719, "fc3": 840}
    assert allocate({"a": (3, 2), "b": (10, 10)}, 0.5, "epl") == {"a": 6, "b": 47}


def test_epf_is_equal_per_row_and_per_row_support():
    counts = allocate(SHAPES, 0.01, "epf")  # 615 entries over 236 rows
    per_row = 615 / 236
    for n, s in SHAPES.items():
        assert abs(counts[n] - per_row * s[0]) < 1
    capped = allocate({"a": (10, 2), "b": (4, 50)}, 0.5, "epf")  # 110 over 14 rows > 2 per row
    assert capped == {"a": 20, "b": 90}
    g = torch.Generator().manual_seed(0)
    for n, s in SHAPES.items():
        idx = random_support(s, counts[n], g, per_row=True)
        rows = torch.bincount(idx // (math.prod(s) // s[0]), minlength=s[0])
        assert int(rows.max() - rows.min()) <= 1 and int(rows.sum()) == counts[n]
        assert torch.equal(idx, torch.unique(idx))


def test_uniform_and_erk_layer_densities():
    uni = allocate(SHAPES, 0.1, "uniform")
    assert all(abs(uni[n] - 0.1 * math.prod(s)) < 1 for n, s in SHAPES.items())
    erk = allocate(SHAPES, 0.05, "erk")
    dens = {n: erk[n] / math.prod(s) for n, s in SHAPES.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in SHAPES.items()}
    assert dens["fc1"] < dens["conv2"] < dens["fc2"] < dens["fc3"]  # bigger layer, sparser
    assert abs(dens["fc2"] / dens["fc1"] - raw["fc2"] / raw["fc1"]) < 0.01
    dense = allocate(SHAPES, 0.5, "erk")  # conv1 and fc3 saturate; the rest re-solved
    assert dense["conv1"] == 150 and dense["fc3"] == 840
    assert sum(dense.values()) == round(0.5 * TOTAL)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True])
def test_allocation_rejects_bad_density(density):
    with pytest.raises(SpecError):
        allocate(SHAPES, density, "epl")


def test_allocation_rejects_unknown_scheme():
    with pytest.raises(SpecError, match="epl, epf, uniform, erk"):
        allocate(SHAPES, 0.1, "snip")


def test_uniform_support_is_sorted_unique_and_seeded():
    a = random_support((20, 30), 50, torch.Generator().manual_seed(3))
    b = random_support((20, 30), 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, torch.unique(a)) and a.dtype == torch.int64
    assert int(a.max()) < 600 and a.numel() == 50


# ---- layers and transform ----

def test_fresh_layer_is_alpha_d_and_s_scatters_into_the_support():
    layer = DCTpSLinear(nn.Linear(8, 5), 7, alpha=0.5)
    assert torch.equal(layer.weight_matrix(), 0.5 * layer.D)
    layer.set_support(torch.tensor([0, 3, 9, 10, 20, 33, 39]))
    with torch.no_grad():
        layer.values.copy_(torch.arange(1.0, 8.0))
    s = layer.sparse_weight().reshape(-1)
    assert s[[0, 3, 9, 10, 20, 33, 39]].tolist() == list(range(1, 8)) and s.count_nonzero() == 7
    with pytest.raises(SpecError):
        layer.set_support(torch.tensor([0, 0, 1, 2, 3, 4, 5]))
    with pytest.raises(SpecError):
        dctps_layer(nn.Linear(2, 2), 5)
    conv = dctps_layer(nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), 4)
    assert isinstance(conv, DCTpSConv2d) and conv(torch.randn(1, 3, 6, 6)).shape == (1, 4, 3, 3)


def test_support_never_changes_during_training():
    torch.manual_seed(0)
    model = build(LENET)
    report = dctps_transform(model, 0.05, generator=torch.Generator().manual_seed(0))
    layers = _dct_layers(model)
    before = {n: m.indices.clone() for n, m in layers.items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, m in layers.items():
        assert torch.equal(m.indices, before[n])
        off = (m.weight_matrix() - m.alpha * m.D).detach().reshape(-1)
        outside = torch.ones_like(off, dtype=torch.bool)
        outside[m.indices] = False
        assert bool((off[outside] == 0).all())
        assert m.values.abs().sum() > 0 and m.nnz == report["layers"][n]["nnz"]
        assert float(m.alpha.detach()) != 1.0  # trainable alpha moved


def test_alpha_trainable_vs_fixed():
    model = build(LENET)
    dctps_transform(model, 0.02)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    assert all(m.alpha.grad is not None and m.alpha.grad != 0
               for m in _dct_layers(model).values())
    fixed = build(LENET)
    dctps_transform(fixed, 0.02, alpha=1.0)
    names = [n for n, _ in fixed.named_parameters()]
    assert not any(n.endswith("alpha") for n in names)
    assert all(not m.alpha.requires_grad for m in _dct_layers(fixed).values())
    with pytest.raises(SpecError):
        dctps_transform(build(LENET), 0.02, alpha="learned")


def test_trainable_params_are_nnz_plus_alpha_plus_biases():
    model = build(LENET)
    report = dctps_transform(model, 0.01, allocation="epf")
    assert report["total_nnz"] == round(0.01 * report["total_weights"])
    assert [e["op"] for e in model.slimline_arch["edits"]] == ["dctps"]
    layers = _dct_layers(model)
    biases = sum(m.bias.numel() for m in layers.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report["total_nnz"] + len(layers) + biases


def test_save_load_round_trip_without_d(tmp_path):
    torch.manual_seed(0)
    model = build(LENET)
    report = dctps_transform(model, 0.05, allocation="erk")
    with torch.no_grad():
        for m in _dct_layers(model).values():
            m.values.normal_()
            m.alpha.fill_(0.7)
    model.eval()
    path = tmp_path / "m.safetensors"
    save(model, path)
    back = load(path)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        sizes = {k: f.get_slice(k).get_shape() for k in keys}
    assert keys == {f"{n}.{k}" for n in report["layers"]
                    for k in ("values", "indices", "alpha", "bias")}
    for n, r in report["layers"].items():
        assert sizes[f"{n}.values"] == sizes[f"{n}.indices"] == [r["nnz"]]
    for n, m in _dct_layers(back).items():
        assert torch.equal(m.indices, _dct_layers(model)[n].indices)


def test_float64_model_rebuilds_d_at_full_precision():
    model = build(LENET)
    dctps_transform(model, 0.05)
    model.double()
    conv = model.conv2
    assert conv.D.dtype == torch.float64 and torch.equal(conv.D, dct_weight(conv))


def test_replay_validates_the_edit_and_checkpoint_indices():
    model = build(LENET)
    for bad in ({"op": "dctps"}, {"op": "dctps", "layers": {"fc2": {"alpha": 1.0}}},
                {"op": "dctps", "layers": {"fc2": {"nnz": 10**6}}},
                {"op": "dctps", "layers": {"fc2": {"nnz": 3, "alpha": "yes"}}},
                {"op": "dctps", "layers": {"nope": {"nnz": 3}}}):
        with pytest.raises(SpecError):
            replay_dctps(build(LENET), bad)
    replay_dctps(model, {"op": "dctps", "layers": {"fc2": {"nnz": 3, "alpha": "trainable"}}})
    state = model.state_dict()
    state["fc2.indices"] = torch.tensor([5, 5, 7])
    with pytest.raises(CheckpointError):
        model.load_state_dict(state)
