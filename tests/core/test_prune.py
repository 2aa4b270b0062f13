import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.data import split, synthetic
from core.errors import SpecError
from core.models import build
from core.prune import (
    apply_masks,
    collapsed_layers,
    dense_from_sparse,
    keep_count,
    layer_report,
    magnitude_scores,
    masks_from_scores,
    pack_mask,
    prunable,
    random_scores,
    snip_scores,
    sparse_state,
    synflow_masks,
    unpack_mask,
)
from core.train import TrainConfig, train

TINY = {"name": "mlp", "input_shape": [1, 1, 6], "widths": [5], "num_classes": 3}


def tiny_mlp(seed=0):
    return build(TINY, generator=torch.Generator().manual_seed(seed)).double()


def tiny_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1, 6, generator=g, dtype=torch.float64), torch.randint(3, (n,),
                                                                                     generator=g)


def hand_gradients(model, x, target):
    """dL/dW of sum_n CE(f(x_n), target_n) for a one-hidden-layer ReLU MLP, by hand.

    `target` is a (N, K) distribution; dL/dz = softmax(z) - target."""
    w1, b1, w2, b2 = (t.detach() for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight,
                                           model.fc2.bias))
    h0 = x.flatten(1)  # (N, 6)
    a1 = h0 @ w1.T + b1  # (N, 5)
    h1 = a1.clamp_min(0)
    z = h1 @ w2.T + b2  # (N, 3)
    dz = torch.softmax(z, dim=1) - target  # (N, 3)
    d1 = (dz @ w2) * (a1 > 0)  # (N, 5)
    return {"fc1": d1.T @ h0, "fc2": dz.T @ h1}


def expected_snip(model, grads):
    prods = {"fc1": grads["fc1"] * model.fc1.weight.detach(),
             "fc2": grads["fc2"] * model.fc2.weight.detach()}
    total = sum(p.abs().sum() for p in prods.values())
    return {k: p.abs() / total for k, p in prods.items()}


def test_prunable_is_linear_and_conv_weights_only():
    model = build({"name": "resnet", "depth": 8, "width": 0.25, "input_shape": [3, 8, 8]})
    names = [n for n, _ in prunable(model)]
    assert names[0] == "conv1" and names[-1] == "fc" and "stage1.0.conv1" in names
    assert not any("bn" in n for n in names)
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for _, m in prunable(model))


def test_snip_scores_equal_hand_computed_g_times_w():
    model = tiny_mlp()
    x, y = tiny_batch(7, 1)
    scores = snip_scores(model, [(x, y)])
    expected = expected_snip(model, hand_gradients(model, x, F.one_hot(y, 3).double()))
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-10, atol=1e-14)
    assert math.isclose(sum(float(s.sum()) for s in scores.values()), 1.0, rel_tol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_snip_accumulates_signed_products_over_batches():
    model = tiny_mlp(1)
    (x1, y1), (x2, y2) = tiny_batch(5, 2), tiny_batch(9, 3)
    multi = snip_scores(model, [(x1, y1), (x2, y2)])
    whole = snip_scores(model, [(torch.cat([x1, x2]), torch.cat([y1, y2]))])
    for name in multi:
        torch.testing.assert_close(multi[name], whole[name], rtol=1e-10, atol=1e-14)
    # Taking |g*w| per batch before summing ("abs first") would give other scores.
    g1 = hand_gradients(model, x1, F.one_hot(y1, 3).double())
    g2 = hand_gradients(model, x2, F.one_hot(y2, 3).double())
    abs_first = {"fc1": ((g1["fc1"] * model.fc1.weight).abs()
                         + (g2["fc1"] * model.fc1.weight).abs()).detach()}
    assert not torch.allclose(multi["fc1"] / multi["fc1"].sum(),
                              abs_first["fc1"] / abs_first["fc1"].sum(), rtol=1e-3)


def test_snip_uniform_labels_is_cross_entropy_to_the_uniform_distribution():
    model = tiny_mlp(2)
    x, y = tiny_batch(6, 4)
    expected = expected_snip(model, hand_gradients(model, x, torch.full((6, 3), 1 / 3,
                                                                        dtype=torch.float64)))
    for batches in ([(x, y)], [x]):  # labels ignored; bare inputs accepted
        scores = snip_scores(model, batches, labels="uniform")
        for name in ("fc1", "fc2"):
            torch.testing.assert_close(scores[name], expected[name], rtol=1e-10, atol=1e-14)
    with pytest.raises(SpecError):
        snip_scores(model, [x], labels="true")
    with pytest.raises(SpecError):
        snip_scores(model, [(x, y)], labels="random")


def test_snip_scores_in_eval_mode_and_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model[2].running_mean.fill_(0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = tiny_batch(10, 5)
    first = snip_scores(model, [(x.float(), y)])
    second = snip_scores(model, [(x.float(), y)])
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running stats not updated, weights untouched
    assert all(p.grad is None for p in model.parameters())
    assert list(first) == ["1", "5"]  # Linear layers by module path
    for name in first:  # dropout off: deterministic
        assert torch.equal(first[name], second[name])


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97, 0.999])
def test_global_top_k_keeps_exactly_kappa(sparsity):
    model = build({"name": "mlp", "input_shape": [1, 8, 8], "widths": [32, 16]})
    scores = random_scores(model, torch.Generator().manual_seed(0))
    masks = masks_from_scores(scores, sparsity)
    n = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - sparsity) * n)
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    pruned = torch.cat([scores[k][~masks[k]] for k in scores])
    if len(kept) and len(pruned):
        assert kept.min() >= pruned.max()
    assert all(m.dtype == torch.bool and m.shape == scores[k].shape for k, m in masks.items())


def test_ties_are_broken_by_layer_order_then_index():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = masks_from_scores(scores, 0.5)  # keep 5 of 10
    assert masks["a"].flatten().tolist() == [True] * 5 + [False]
    assert not masks["b"].any()


def test_layerwise_scope_keeps_kappa_in_every_layer():
    model = build({"name": "mlp", "input_shape": [1, 8, 8], "widths": [30, 7]})
    scores = random_scores(model, torch.Generator().manual_seed(1))
    for sparsity in (0.3, 0.9, 0.95):
        masks = masks_from_scores(scores, sparsity, scope="layerwise")
        for name, mask in masks.items():
            assert int(mask.sum()) == keep_count(mask.numel(), sparsity)
            assert scores[name][mask].min() >= scores[name][~mask].max()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_a_spec_error(sparsity):
    with pytest.raises(SpecError, match="sparsity"):
        masks_from_scores({"a": torch.rand(4)}, sparsity)


def test_bad_scope_and_nan_scores_are_spec_errors():
    with pytest.raises(SpecError, match="scope"):
        masks_from_scores({"a": torch.rand(4)}, 0.5, scope="per-unit")
    with pytest.raises(SpecError, match="NaN"):
        masks_from_scores({"a": torch.tensor([1.0, float("nan")])}, 0.5)


def test_magnitude_and_random_scores():
    model = build({"name": "mlp", "input_shape": [1, 4, 4], "widths": [8]})
    masks = masks_from_scores(magnitude_scores(model), 0.75)
    kept = torch.cat([m.weight.detach().abs()[masks[n]] for n, m in prunable(model)])
    pruned = torch.cat([m.weight.detach().abs()[~masks[n]] for n, m in prunable(model)])
    assert kept.min() >= pruned.max()
    a = random_scores(model, torch.Generator().manual_seed(3))
    b = random_scores(model, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) and a[k].shape == m.weight.shape
               for k, m in prunable(model))


def test_apply_masks_validates_and_zeroes():
    model = build({"name": "mlp", "input_shape": [1, 4, 4], "widths": [8]})
    masks = masks_from_scores(magnitude_scores(model), 0.5)
    bias = model.fc1.bias.detach().clone()
    apply_masks(model, masks)
    assert (model.fc1.weight[~masks["fc1"]] == 0).all() and torch.equal(model.fc1.bias, bias)
    with pytest.raises(SpecError, match="unknown layer"):
        apply_masks(model, {"fc9": masks["fc1"]})
    with pytest.raises(SpecError, match="shape"):
        apply_masks(model, {"fc1": masks["fc2"]})


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_survive_training_with_momentum_and_weight_decay(optimizer):
    splits = split(*synthetic("synthetic-tiny", 0), seed=0)
    model = build({"name": "mlp", "input_shape": [1, 8, 8], "widths": [32]},
                  generator=torch.Generator().manual_seed(0))
    batch = (splits.train.x[:100], splits.train.y[:100])
    masks = masks_from_scores(snip_scores(model, [batch]), 0.8)
    before = {n: m.weight.detach().clone() for n, m in prunable(model)}
    config = TrainConfig(epochs=4, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2,
                         momentum=0.9, weight_decay=5e-4, batch_size=8, max_batches=25)
    train(model, splits, config, generator=torch.Generator().manual_seed(0), masks=masks)
    for name, layer in prunable(model):  # 100 optimizer steps
        assert (layer.weight[~masks[name]] == 0).all(), name
        assert not torch.equal(layer.weight[masks[name]], before[name][masks[name]])
    # Without enforcement the same run revives pruned weights (weight decay/momentum aside,
    # their gradients are non-zero).
    control = build({"name": "mlp", "input_shape": [1, 8, 8], "widths": [32]},
                    generator=torch.Generator().manual_seed(0))
    apply_masks(control, masks)
    train(control, splits, config, generator=torch.Generator().manual_seed(0))
    assert (control.fc1.weight[~masks["fc1"]] != 0).any()


def test_train_rejects_masks_for_unknown_layers():
    splits = split(*synthetic("synthetic-tiny", 0), seed=0)
    model = build({"name": "mlp", "input_shape": [1, 8, 8], "widths": [4]})
    with pytest.raises(SpecError):
        train(model, splits, TrainConfig(epochs=1), generator=torch.Generator(),
              masks={"conv1": torch.ones(3, dtype=torch.bool)})


def test_layer_report_and_collapse():
    masks = {"fc1": torch.tensor([[True, False], [False, False]]),
             "fc2": torch.zeros(3, dtype=torch.bool), "fc3": torch.ones(2, 2, dtype=torch.bool)}
    report = layer_report(masks)
    assert report["fc1"] == {"kept": 1, "total": 4, "fraction": 0.25}
    assert report["fc2"]["kept"] == 0 and report["fc3"]["fraction"] == 1.0
    assert collapsed_layers(masks) == ["fc2"]


def test_synflow_keeps_kappa_restores_weights_and_avoids_collapse():
    # 20 000 + 400 + 40 weights; at 99.9% sparsity 20 are kept. Global random pruning then
    # empties the small layers and SNIP the wide first one (its scores are the smallest);
    # SynFlow keeps a path through every layer (Tanaka et al. 2020).
    arch = {"name": "mlp", "input_shape": [1, 1, 1000], "widths": [20, 20], "num_classes": 2}
    model = build(arch, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(m.weight.numel() for _, m in prunable(model))
    sparsity = 0.999
    masks = synflow_masks(model, sparsity, [1, 1, 1000])
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - sparsity) * n) == 20
    assert collapsed_layers(masks) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    rand = masks_from_scores(random_scores(model, torch.Generator().manual_seed(0)), sparsity)
    assert collapsed_layers(rand)
    x = torch.randn(64, 1, 1, 1000, generator=torch.Generator().manual_seed(0))
    snip = masks_from_scores(snip_scores(model, [(x, torch.arange(64) % 2)]), sparsity)
    assert collapsed_layers(snip)
    layerwise = synflow_masks(model, 0.9, [1, 1, 1000], rounds=10, scope="layerwise")
    assert all(int(m.sum()) == keep_count(m.numel(), 0.9) for m in layerwise.values())


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (4, 2, 3, 3)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.6
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.flatten().numpy()))
    assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(ValueError):
        unpack_mask(packed, (mask.numel() + 9,))


def test_sparse_state_round_trip():
    model = build({"name": "lenet5", "input_shape": [1, 16, 16]},
                  generator=torch.Generator().manual_seed(0))
    masks = masks_from_scores(random_scores(model, torch.Generator().manual_seed(0)), 0.9)
    apply_masks(model, masks)
    sparse = sparse_state(model, masks)
    assert "fc1.weight" not in sparse and "fc1.bias" in sparse
    assert sparse["fc1.weight.sparse_values"].numel() == int(masks["fc1"].sum())
    dense_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    sparse_bytes = sum(v.numel() * v.element_size() for v in sparse.values())
    assert sparse_bytes < 0.2 * dense_bytes
    state, back = dense_from_sparse(sparse)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    clone = build({"name": "lenet5", "input_shape": [1, 16, 16]})
    clone.load_state_dict(state)
    del sparse["fc2.weight.sparse_shape"]
    with pytest.raises(ValueError, match="fc2.weight"):
        dense_from_sparse(sparse)
