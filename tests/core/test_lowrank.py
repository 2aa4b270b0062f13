import pytest
import torch
from torch import nn

from core.errors import SpecError
from core.lowrank import (
    LowRankLayer,
    block_layout,
    block_matrices,
    block_shapes,
    block_svds,
    factorize_layer,
    full_ranks,
    layer_matrix,
    layer_scores,
    lowrank_transform,
    output_scores,
    output_scores_naive,
    select_ranks,
)
from core.models import build, get_layer, load, save
from tests.tiny_models import double_model


def _double(layer, seed=0):
    torch.manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    return layer


def _product(block):
    """The block's weight matrix as stored (factor product or dense)."""
    if isinstance(block, nn.Sequential):
        first, second = block[0], block[1]
        return second.weight.reshape(second.weight.shape[0], -1) @ \
            first.weight.reshape(first.weight.shape[0], -1)
    return block.weight.reshape(block.weight.shape[0], -1)


@pytest.mark.parametrize("layer", [nn.Linear(12, 9), nn.Conv2d(4, 10, 3, padding=1)])
def test_rank_r_factors_equal_eckart_young_truncation(layer):
    layer = _double(layer)
    w = layer_matrix(layer)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = 2
    new = factorize_layer(layer, "none", [r])
    block = new.blocks[0]
    assert isinstance(block, nn.Sequential)  # 2 * (p + q) < p * q: really factored
    truncated = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    assert torch.allclose(_product(block), truncated, atol=1e-12)
    # and it is the best rank-r approximation: Frobenius error^2 = sum of dropped s_i^2
    err = (w - _product(block)).pow(2).sum()
    assert torch.allclose(err, s[r:].pow(2).sum())
    assert sum(p.numel() for p in new.parameters()) < sum(p.numel() for p in layer.parameters())


def test_factor_pair_shapes_are_real_layers():
    lin = factorize_layer(_double(nn.Linear(20, 15)), "none", [3])
    first, second = lin.blocks[0]
    assert (first.in_features, first.out_features, first.bias) == (20, 3, None)
    assert (second.in_features, second.out_features, second.bias) == (3, 15, None)
    assert lin.bias.shape == (15,)
    conv = _double(nn.Conv2d(6, 16, (3, 5), stride=2, padding=(1, 2), dilation=1))
    fc = factorize_layer(conv, "none", [4])
    first, second = fc.blocks[0]
    assert first.weight.shape == (4, 6, 3, 5) and first.stride == (2, 2)
    assert first.padding == (1, 2) and first.bias is None
    assert second.weight.shape == (16, 4, 1, 1) and second.bias is None


@pytest.mark.parametrize("blocking", ["none", "alds", "square"])
@pytest.mark.parametrize("layer,x", [
    (nn.Linear(13, 7), torch.randn(5, 13)),
    (nn.Linear(5, 17), torch.randn(5, 5)),
    (nn.Conv2d(6, 5, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
    (nn.Conv2d(3, 20, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(1, 2)),
     torch.randn(2, 3, 8, 10)),
])
def test_full_rank_reproduces_outputs(layer, x, blocking):
    layer = _double(layer)
    x = x.double()
    new = factorize_layer(layer, blocking, full_ranks(layer, blocking))
    assert torch.allclose(new(x), layer(x), atol=1e-10)


def test_dense_kept_where_factoring_does_not_save():
    layer = _double(nn.Linear(6, 4))
    new = factorize_layer(layer, "none", [3])  # 3 * (4 + 6) = 30 >= 24: dense
    assert isinstance(new.blocks[0], nn.Linear) and new.blocks[0].weight.shape == (4, 6)
    u, s, vh = block_svds(layer, "none")[0]
    assert torch.allclose(new.blocks[0].weight, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    new = factorize_layer(layer, "none", [1])  # 10 < 24: factored
    assert isinstance(new.blocks[0], nn.Sequential)


def test_square_blocking_picks_largest_square_blocks():
    assert block_layout(nn.Linear(10, 4), "square") == [(0, 4, 0, 4), (0, 4, 4, 8), (0, 4, 8, 10)]
    assert block_layout(nn.Linear(3, 7), "square") == [(0, 3, 0, 3), (3, 6, 0, 3), (6, 7, 0, 3)]
    assert block_layout(nn.Linear(8, 8), "square") == [(0, 8, 0, 8)]
    # conv: K = 9 columns per input channel; 18 rows -> 2 channels (18 columns) per block
    conv = nn.Conv2d(5, 18, 3)
    assert block_layout(conv, "square") == [(0, 18, 0, 2), (0, 18, 2, 4), (0, 18, 4, 5)]
    assert [b.shape for b in block_matrices(conv, "square")] == [(18, 18), (18, 18), (18, 9)]
    # tall conv: 45 columns, 100 rows -> 45x45 blocks
    assert block_layout(nn.Conv2d(5, 100, 3), "square") == [(0, 45, 0, 5), (45, 90, 0, 5),
                                                            (90, 100, 0, 5)]


def test_alds_blocking_groups_input_channels():
    assert block_layout(nn.Conv2d(10, 8, 3), "alds") == [(0, 8, 0, 3), (0, 8, 3, 6),
                                                         (0, 8, 6, 8), (0, 8, 8, 10)]
    assert block_layout(nn.Linear(2, 8), "alds") == [(0, 8, 0, 1), (0, 8, 1, 2)]
    mats = block_matrices(nn.Conv2d(10, 8, 3), "alds")
    assert [m.shape for m in mats] == [(8, 27), (8, 27), (8, 18), (8, 18)]


def test_blocked_truncation_is_per_block():
    layer = _double(nn.Conv2d(8, 6, 3, padding=1))
    ranks = [2, 1, 3, 2]
    new = factorize_layer(layer, "alds", ranks)
    for blk, (u, s, vh), r in zip(new.blocks, block_svds(layer, "alds"), ranks, strict=True):
        assert torch.allclose(_product(blk), (u[:, :r] * s[:r]) @ vh[:r], atol=1e-12)
    # the layer computes x -> sum over blocks of the truncated blocks, + bias
    w = torch.cat([_product(b) for b in new.blocks], dim=1).reshape(6, 8, 3, 3)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    ref = nn.functional.conv2d(x, w, layer.bias, padding=1)
    assert torch.allclose(new(x), ref, atol=1e-10)


def test_bad_ranks_and_layers_are_rejected():
    layer = nn.Linear(6, 4)
    for ranks in ([0], [5], [1, 1], [1.5]):
        with pytest.raises(SpecError):
            factorize_layer(layer, "none", ranks)
    with pytest.raises(SpecError):
        block_layout(layer, "diagonal")
    with pytest.raises(SpecError):
        factorize_layer(nn.Conv2d(4, 4, 3, groups=2), "none", [1])


def test_save_load_round_trip_of_factored_lenet5(tmp_path):
    arch = {"name": "lenet5", "input_shape": [1, 16, 16], "num_classes": 10}
    torch.manual_seed(0)
    model = build(arch).eval()
    plan = {"conv1": {"blocking": "none", "ranks": [3]},
            "conv2": {"blocking": "alds", "ranks": [2, 3, 4, 5]},
            "fc1": {"blocking": "square", "ranks": [5, 24] * 5},  # 500 x 50
            "fc2": {"blocking": "none", "ranks": [10]}}
    new, report = lowrank_transform(model, plan)
    assert [e["op"] for e in new.slimline_arch["edits"]] == ["lowrank"] * 4
    assert isinstance(new.conv2, LowRankLayer) and not isinstance(model.conv2, LowRankLayer)
    assert report["fc1"]["weight_params_after"] < report["fc1"]["weight_params_before"]
    assert sum(p.numel() for p in new.parameters()) < sum(p.numel() for p in model.parameters())
    path = tmp_path / "m.safetensors"
    save(new, path)
    back = load(path)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), new(x))
    rebuilt = build(new.slimline_arch)
    assert [tuple(p.shape) for p in rebuilt.parameters()] == \
        [tuple(p.shape) for p in new.parameters()]


TINY_CONV4 = {"name": "conv4", "input_shape": [2, 8, 8], "channels": [3, 5, 6, 4],
              "fc": [12, 9], "num_classes": 5}


@pytest.mark.parametrize("layer,blocking", [("conv2", "alds"), ("conv3", "square"),
                                            ("fc1", "square"), ("fc3", "none")])
def test_batched_output_scores_match_naive(layer, blocking):
    model = double_model(TINY_CONV4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(6, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    batched = output_scores(model, layer, blocking, batches, chunk=4)
    naive = output_scores_naive(model, layer, blocking, batches)
    for key in ("output_perturbation", "output_variance"):
        assert [t.shape for t in batched[key]] == [t.shape for t in naive[key]]
        for b, n in zip(batched[key], naive[key], strict=True):
            assert torch.allclose(b, n, rtol=1e-5, atol=1e-10)
            assert (n > 0).all()
    # the model is left untouched
    ref = double_model(TINY_CONV4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


def test_magnitude_and_relative_error_scores():
    model = double_model(TINY_CONV4)
    mag = layer_scores(model, ["conv2", "fc1"], "alds", "magnitude")
    rel = layer_scores(model, ["conv2", "fc1"], "alds", "relative_error")
    for name in ("conv2", "fc1"):
        for s, r in zip(mag[name], rel[name], strict=True):
            assert torch.allclose(r, s.pow(2) / s.pow(2).sum())
            assert torch.allclose(r.sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(SpecError):
        layer_scores(model, ["fc1"], "none", "output_perturbation")


def test_select_ranks_greedy_to_budget():
    scores = {"a": [torch.tensor([5.0, 1.0, 0.5])], "b": [torch.tensor([4.0, 3.0]),
                                                         torch.tensor([2.0, 0.1])]}
    shapes = {"a": [(3, 3)], "b": [(2, 2), (2, 2)]}
    # real cost min(r(p+q), pq): a (3x3) costs 9 at rank 3 or 2 and 6 at rank 1; a 2x2 block
    # never saves (r*4 >= 4), so it costs 4 at any rank. Total p*q = 17.
    assert select_ranks(scores, shapes, 1.0) == {"a": [3], "b": [2, 2]}  # nothing to remove
    # target 15.3: remove 0.1 (b1, saves 0), 0.5 (a 3->2, saves 0), 1.0 (a 2->1, saves 3): 14
    assert select_ranks(scores, shapes, 0.9) == {"a": [1], "b": [2, 1]}
    assert select_ranks(scores, shapes, 0.01) == {"a": [1], "b": [1, 1]}  # floor at rank 1
    with pytest.raises(SpecError):
        select_ranks(scores, shapes, 0.0)


def test_score_select_factor_pipeline_shrinks_model():
    model = double_model(TINY_CONV4)
    layers = ["conv2", "conv3", "fc1"]
    x = torch.rand(8, 2, 8, 8, dtype=torch.float64)
    scores = layer_scores(model, layers, "square", "output_perturbation", x)
    shapes = {n: block_shapes(get_layer(model, n), "square") for n in layers}
    ranks = select_ranks(scores, shapes, 0.5)
    new, report = lowrank_transform(model, {n: {"blocking": "square", "ranks": ranks[n]}
                                            for n in layers})
    counted = sum(r * (p + q)
                  for n in layers for r, (p, q) in zip(ranks[n], shapes[n], strict=True))
    assert counted <= 0.5 * sum(p * q for n in layers for p, q in shapes[n])
    assert sum(report[n]["weight_params_after"] for n in layers) <= counted
    assert new(x).shape == model(x).shape


def test_layer_positions_and_mac_weighted_selection():
    from core.lowrank import layer_positions

    model = double_model(TINY_CONV4)
    layers = ["conv1", "conv3", "fc1"]
    pos = layer_positions(model, layers, TINY_CONV4["input_shape"])
    assert pos == {"conv1": 64, "conv3": 16, "fc1": 1}  # 8x8, after one 2x2 pool, flat
    shapes = {n: block_shapes(get_layer(model, n), "none") for n in layers}
    scores = layer_scores(model, layers, "none", "relative_error")
    by_macs = select_ranks(scores, shapes, 0.5, pos)
    macs = sum(pos[n] * min(r * (p + q), p * q) for n in layers
               for r, (p, q) in zip(by_macs[n], shapes[n], strict=True))
    assert macs <= 0.5 * sum(pos[n] * p * q for n in layers for p, q in shapes[n])
    assert by_macs != select_ranks(scores, shapes, 0.5)


@pytest.mark.parametrize("blocking", ["none", "alds", "square"])
@pytest.mark.parametrize("ratio", [0.8, 0.5, 0.2])
def test_select_ranks_counts_the_real_cost_and_stops_at_the_target(blocking, ratio):
    from core.lowrank import block_params

    model = double_model(TINY_CONV4)
    layers = ["conv2", "conv3", "fc1", "fc2"]
    shapes = {n: block_shapes(get_layer(model, n), blocking) for n in layers}
    scores = layer_scores(model, layers, blocking, "relative_error")
    ranks = select_ranks(scores, shapes, ratio)
    real = sum(block_params(p, q, r)
               for n in layers for r, (p, q) in zip(ranks[n], shapes[n], strict=True))
    dense = sum(p * q for n in layers for p, q in shapes[n])
    # within budget, and no further below it than one vector's saving (<= p + q): blocks above
    # the break-even rank cost p*q, so trimming them saves nothing and must not over-shoot
    if real > ratio * dense:  # unreachable target: every block at rank 1
        assert all(r == 1 for n in layers for r in ranks[n])
    else:
        assert real > ratio * dense - max(p + q for n in layers for p, q in shapes[n])
    _, report = lowrank_transform(model, {n: {"blocking": blocking, "ranks": r}
                                          for n, r in ranks.items()})
    assert sum(r["weight_params_after"] for r in report.values()) == real
