"""Absolute whole-model budgets on the single-method steps: lowrank and channel_prune (every
`core.budget` kind), the pruning ops (`nonzero_params`) and dctps (`nonzero_params`,
`trainable_params`) land at or just below the budget, measured with `core.budget.model_cost` on
LeNet-300-100 and a small conv net; a budget out of reach is a SpecError naming the smallest
reachable value. `nonzero_params` is met as trained (`core.prune.trained_nonzero`: the zeros
fine-tuning can fill count, masked weights do not), so the plain count is at most that."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import core.lowrank as lowrank_core
from core.budget import BUDGET_KINDS, costs, model_cost
from core.channel_prune import ChannelPruneConfig, channel_prune
from core.configs import DCTpSConfig, LowRankConfig, PruneConfig
from core.dctps_layer import DCTpSLayer
from core.dctps_target import dctps_apply_target, dctps_cost
from core.errors import SpecError
from core.lowrank import lowrank_plan, lowrank_transform
from core.models import build
from core.prune import apply_masks, prunable, prune_masks, sparsity_for_budget, trained_nonzero

CONV = {"name": "conv4", "input_shape": [1, 12, 12], "channels": [6, 8, 12, 12], "fc": [24, 16]}
ARCHS = {"lenet300": {"name": "lenet300"}, "conv4": CONV}
LOW = 0.97  # every result lands within 3 % below its budget (normally within 1 %)


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    return build(ARCHS[request.param], generator=torch.Generator().manual_seed(0)).eval()


def _shape(model: nn.Module) -> list[int]:
    return list(model.slimline_arch["input_shape"])


def plan_layers(model: nn.Module) -> list[str]:
    return lowrank_core.lowrank_layers(model)


def _lands(value: float, goal: float) -> None:
    assert LOW * goal <= value <= goal, (value, goal, value / goal)


def _cost(net: nn.Module, kind: str, masks: dict | None = None) -> int:
    """The cost a target is met on; a plain nonzero count is never above it."""
    if kind != "nonzero_params":
        return model_cost(net, kind, _shape(net))
    value = trained_nonzero(net, masks)
    assert model_cost(net, kind) <= value
    return value


@pytest.mark.parametrize("kind", BUDGET_KINDS)
def test_lowrank_lands_on_every_kind_of_budget(model, kind):
    goal = int(costs(model, _shape(model))[kind] * 0.3)
    report: dict = {}
    plan = lowrank_plan(model, LowRankConfig(target={kind: goal}, score="magnitude"),
                        input_shape=_shape(model), report=report)
    new, _ = lowrank_transform(model, plan)
    value = _cost(new, kind)
    _lands(value, goal)
    summary = report["budget"]
    assert summary["kind"] == kind and summary["goal"] == goal
    assert summary["value"] == value  # the probe counts what the real factors hold
    assert 0 < summary["knob"] < 1 and summary["evaluations"] >= 3


def test_lowrank_scores_once_and_keeps_ratio_targets_as_they_were(monkeypatch):
    model = build(CONV, generator=torch.Generator().manual_seed(1)).eval()
    shape, calls = _shape(model), []
    real = lowrank_core.layer_scores

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lowrank_core, "layer_scores", counted)
    inputs = torch.randn(16, *shape, generator=torch.Generator().manual_seed(2))
    goal = int(model_cost(model, "macs", shape) * 0.25)
    config = LowRankConfig(target={"macs": goal}, score="output_perturbation", blocking="alds")
    new, _ = lowrank_transform(model, lowrank_plan(model, config, input_shape=shape,
                                                   inputs=inputs))
    assert calls == [1]  # the output scores (the expensive part) are computed once
    _lands(model_cost(new, "macs", shape), goal)
    # a ratio target is what it was: the greedy selection at that ratio
    layers = plan_layers(model)
    scores = real(model, layers, "none", "magnitude")
    shapes = {n: lowrank_core.block_shapes(lowrank_core.get_layer(model, n), "none")
              for n in layers}
    want = lowrank_core.select_ranks(scores, shapes, 0.4)
    got = lowrank_plan(model, LowRankConfig(target={"param_ratio": 0.4}, score="magnitude"),
                       input_shape=shape)
    assert got == {n: {"blocking": "none", "ranks": r} for n, r in want.items()}


def test_lowrank_budget_out_of_reach_names_the_smallest(model):
    shape = _shape(model)
    # only the last layer factored: the rest of the model alone is over a tiny budget
    last = plan_layers(model)[-1]
    config = LowRankConfig(target={"total_params": 1000}, score="magnitude", layers=[last])
    with pytest.raises(SpecError, match=r"out of reach.*raise the budget to at least \d+"):
        lowrank_plan(model, config, input_shape=shape)
    # a budget above the model: every block keeps its full rank
    big = model_cost(model, "total_params") + 10
    plan = lowrank_plan(model, LowRankConfig(target={"total_params": big}, score="magnitude"),
                        input_shape=shape)
    assert model_cost(lowrank_transform(model, plan)[0], "total_params") <= big


@pytest.mark.parametrize("kind", BUDGET_KINDS)
def test_channel_prune_lands_on_every_kind_of_budget(model, kind):
    shape = _shape(model)
    goal = int(costs(model, shape)[kind] * 0.35)
    new, report = channel_prune(model, ChannelPruneConfig(target={kind: goal}))
    value = _cost(new, kind)
    _lands(value, goal)
    assert report["budget"]["value"] == value and report["budget"]["goal"] == goal
    assert report["ratio"] == pytest.approx(value / _cost(model, kind))
    assert report["target"] == {kind: goal}


def test_channel_prune_counts_the_masked_zeros_of_kept_units():
    model = build({"name": "lenet300"}, generator=torch.Generator().manual_seed(3))
    masks = prune_masks(model, PruneConfig(op="magnitude", sparsity=0.8))
    apply_masks(model, masks)
    goal = int(trained_nonzero(model, masks) * 0.5)
    new, report = channel_prune(model, ChannelPruneConfig(target={"nonzero_params": goal}),
                                masks=masks)
    value = _cost(new, "nonzero_params", new.slimline_masks)
    _lands(value, goal)
    assert value < _cost(new, "nonzero_params")  # its masked weights stay zero
    assert report["budget"]["value"] == value


def test_channel_prune_budget_out_of_reach_and_config_checks(model):
    with pytest.raises(SpecError, match=r"out of reach.*at least \d+"):
        channel_prune(model, ChannelPruneConfig(target={"total_params": 10}))
    for bad in ({"macs": 0}, {"macs": 2.5}, {"macs": True}, {"flops": 10}):
        with pytest.raises(SpecError):
            ChannelPruneConfig(target=bad)
    config = ChannelPruneConfig.from_dict({"target": {"trainable_params": 500}})
    assert ChannelPruneConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("op", "scope"), [("magnitude", "global"), ("magnitude", "layerwise"),
                                           ("random", "layerwise"), ("synflow", "global")])
def test_pruning_sparsity_lands_on_a_nonzero_budget(model, op, scope):
    goal = int(model_cost(model, "nonzero_params") * 0.1) + 7
    sparsity = sparsity_for_budget(model, goal, scope)
    config = PruneConfig(op=op, sparsity=sparsity, scope=scope, rounds=5)
    net = copy.deepcopy(model)
    masks = prune_masks(net, config, generator=torch.Generator().manual_seed(0),
                        input_shape=_shape(model))
    apply_masks(net, masks)
    value = _cost(net, "nonzero_params", masks)
    _lands(value, goal)
    if scope == "global":  # one rounding: exact
        assert value == goal


def test_pruning_budget_edges(model):
    net = copy.deepcopy(model)
    with torch.no_grad():  # the zoo starts biases at zero: give them values to count
        for _, layer in prunable(net):
            layer.bias.fill_(0.1)
    other = model_cost(net, "nonzero_params") - sum(
        int(torch.count_nonzero(layer.weight)) for _, layer in prunable(net))
    assert other > 0
    with pytest.raises(SpecError, match=rf"smallest reachable is {other + 1}\b"):
        sparsity_for_budget(net, other)
    assert sparsity_for_budget(net, other + 1) > 0.99
    # zero biases count as the values fine-tuning gives them
    assert sparsity_for_budget(model, other + 5) == sparsity_for_budget(net, other + 5)
    assert sparsity_for_budget(model, trained_nonzero(model)) == 0.0
    with pytest.raises(SpecError, match="needs a sparsity"):
        prune_masks(model, PruneConfig(op="magnitude", sparsity=None))
    # an already pruned model: its zeros are not counted twice
    net = copy.deepcopy(model)
    apply_masks(net, prune_masks(net, PruneConfig(op="magnitude", sparsity=0.5)))
    previous = {n: m.weight != 0 for n, m in prunable(net)}
    goal = int(trained_nonzero(net, previous) * 0.4)
    masks = prune_masks(net, PruneConfig(op="magnitude", sparsity=sparsity_for_budget(net, goal)),
                        previous=previous)
    apply_masks(net, masks)
    _lands(_cost(net, "nonzero_params", masks), goal)


@pytest.mark.parametrize("alpha", ["trainable", 1.0])
@pytest.mark.parametrize("kind", ["nonzero_params", "trainable_params"])
def test_dctps_density_lands_on_the_budget(model, kind, alpha):
    goal = int(costs(model, _shape(model))[kind] * 0.05) + 3
    net = copy.deepcopy(model)
    report = dctps_apply_target(net, DCTpSConfig(target={kind: goal}, alpha=alpha),
                                torch.Generator().manual_seed(0))
    assert report["budget"]["value"] == dctps_cost(net, kind)
    with torch.no_grad():  # as training leaves it: S's whole support and the biases non-zero
        for m in net.modules():
            if isinstance(m, DCTpSLayer):
                m.values.normal_()
                if m.bias is not None:
                    m.bias.normal_()
    value = model_cost(net, kind)
    _lands(value, goal)
    assert value == report["budget"]["value"] == _cost(net, kind)
    assert report["budget"]["knob"] == pytest.approx(report["density"], rel=0.02)


def test_dctps_target_rules(model):
    layers = plan_layers(model)
    with pytest.raises(SpecError, match=r"smallest it can build has \d+"):
        dctps_apply_target(copy.deepcopy(model), DCTpSConfig(target={"trainable_params": 50},
                                                             layers=layers[:1]))
    with pytest.raises(SpecError, match="not both"):
        dctps_apply_target(copy.deepcopy(model), DCTpSConfig(density=0.1,
                                                             target={"nonzero_params": 100}))
    with pytest.raises(SpecError, match="total_params and macs do not shrink"):
        dctps_apply_target(copy.deepcopy(model), DCTpSConfig(target={"macs": 1000}))
    # only some layers: the others count whole
    net = copy.deepcopy(model)
    goal = model_cost(model, "trainable_params") - sum(
        lowrank_core.get_layer(model, n).weight.numel() for n in layers[:2]) // 2
    report = dctps_apply_target(net, DCTpSConfig(target={"trainable_params": goal},
                                                 layers=layers[:2]))
    assert set(report["layers"]) == set(layers[:2])
    _lands(_cost(net, "trainable_params"), goal)
    # no density, no target: the old default 0.01
    plain = dctps_apply_target(copy.deepcopy(model), DCTpSConfig())
    assert plain["total_nnz"] == round(0.01 * plain["total_weights"]) and "budget" not in plain
