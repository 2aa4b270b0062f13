"""core.budget: what each cost kind counts (measured on small models) and fit_to_budget's
bisection (largest knob within the budget, never over it, integer mode, unreachable budgets)."""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from core.budget import BUDGET_KINDS, Fit, costs, fit_to_budget, model_cost
from core.dctps import dctps_transform
from core.errors import SpecError
from core.metrics import count_macs


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_costs_count_params_buffers_zeros_and_frozen_tensors():
    net = _net()
    shape = [1, 6, 6]
    with torch.no_grad():  # no zero anywhere yet (BatchNorm starts with zero bias and mean)
        net[1].bias.fill_(0.1)
        net[1].running_mean.fill_(0.2)
    params = sum(p.numel() for p in net.parameters())
    got = costs(net, shape)
    assert set(got) == set(BUDGET_KINDS)
    # BatchNorm's running mean and var are stored (floats); num_batches_tracked is not
    assert got["total_params"] == got["nonzero_params"] == params + 2 * 4
    assert got["trainable_params"] == params
    assert got["macs"] == count_macs(net, shape) == 4 * 9 * 36 + 144 * 5
    with torch.no_grad():
        net[4].weight[:, :100] = 0  # masked weights: still stored, no longer non-zero
        net[1].running_mean.zero_()  # zero buffers do not count as non-zero either
    net[0].weight.requires_grad_(False)
    after = costs(net, shape)
    assert after["total_params"] == got["total_params"]
    assert after["nonzero_params"] == got["total_params"] - 5 * 100 - 4
    assert after["trainable_params"] == params - 36
    assert after["macs"] == got["macs"]
    for kind in BUDGET_KINDS:
        assert model_cost(net, kind, shape) == after[kind]


def test_model_cost_refuses_unknown_kinds_and_macs_without_a_shape():
    net = _net()
    with pytest.raises(SpecError, match="unknown budget kind"):
        model_cost(net, "bytes")
    with pytest.raises(SpecError, match="input shape"):
        model_cost(net, "macs")


def _dctps_net(alpha: str | float) -> tuple[nn.Sequential, int]:
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    report = dctps_transform(net, 0.25, alpha=alpha, layers=["1"],
                             generator=torch.Generator().manual_seed(0))
    assert report["total_nnz"] == round(0.25 * 128)
    with torch.no_grad():  # S as training leaves it (it starts at zero)
        net[1].values.fill_(0.5)
    return net, report["total_nnz"]


def test_a_dctps_layer_counts_dense_in_total_and_its_values_in_nonzero():
    net, nnz = _dctps_net(1.0)  # a fixed alpha is a buffer rebuilt from the edit
    got = costs(net, [1, 4, 4])
    # total: the dense weight it ships (16 x 8) + its bias, and the plain layer
    assert got["total_params"] == 128 + 8 + 8 * 3 + 3
    assert got["trainable_params"] == got["nonzero_params"] == nnz + 8 + 8 * 3 + 3


def test_a_trainable_dctps_alpha_counts_once():
    net, nnz = _dctps_net("trainable")
    got = costs(net, [1, 4, 4])
    assert got["trainable_params"] == nnz + 1 + 8 + 8 * 3 + 3
    assert got["total_params"] == 128 + 1 + 8 + 8 * 3 + 3
    assert got["nonzero_params"] == nnz + 1 + 8 + 8 * 3 + 3


def test_fit_lands_within_tol_below_a_continuous_budget():
    fit = fit_to_budget(lambda x: x, lambda x: 1000.0 * x, 333.0, 0.0, 1.0)
    assert isinstance(fit, Fit)
    assert 333.0 * 0.99 <= fit.cost <= 333.0
    assert fit.built == fit.knob and fit.cost == pytest.approx(1000.0 * fit.knob)
    assert fit.trials[:2] == [{"knob": 1.0, "cost": 1000.0}, {"knob": 0.0, "cost": 0.0}]
    assert len(fit.trials) <= 24
    summary = fit.summary("macs", 333.0)
    assert summary == {"kind": "macs", "goal": 333.0, "value": fit.cost, "knob": fit.knob,
                       "fraction": fit.cost / 333.0, "evaluations": len(fit.trials)}


def test_fit_is_never_over_budget_on_random_monotone_step_functions():
    rng = random.Random(0)
    for _ in range(50):
        steps = sorted(rng.uniform(0, 1) for _ in range(rng.randint(1, 40)))
        sizes = [rng.uniform(1, 100) for _ in steps]

        def cost(x: float, steps=steps, sizes=sizes) -> float:
            return 10.0 + sum(s for t, s in zip(steps, sizes, strict=True) if x >= t)

        top = cost(1.0)
        budget = rng.uniform(10.0, top * 1.1)
        fit = fit_to_budget(lambda x: x, cost, budget, 0.0, 1.0, tol=0.01)
        assert fit.cost <= budget and fit.cost == cost(fit.knob)
        assert all(t["cost"] == cost(t["knob"]) for t in fit.trials)
        # the largest reachable cost within the budget, or within tol of the budget
        best = max(c for c in (cost(t) for t in [0.0, *steps]) if c <= budget)
        assert fit.cost >= min(best, budget * 0.99) - 1e-9


def test_fit_returns_hi_at_once_when_it_fits():
    fit = fit_to_budget(lambda x: x, lambda x: 10 * x, 100.0, 0.0, 5.0)
    assert fit.knob == 5.0 and fit.cost == 50.0 and len(fit.trials) == 1


def test_integer_mode_stops_at_adjacent_integers():
    seen: list[float] = []

    def build(n: float) -> float:
        assert n == int(n)
        seen.append(n)
        return n

    fit = fit_to_budget(build, lambda n: 7.0 * n, 100.0, 0, 1000, integer=True, tol=0.0)
    assert fit.knob == 14 and fit.cost == 98.0
    assert len(fit.trials) <= 2 + math.ceil(math.log2(1000)) + 1
    assert all(float(n).is_integer() for n in seen)


def test_unreachable_budgets_name_the_smallest_cost():
    with pytest.raises(SpecError, match=r"cannot get below 50 .*budget 40"):
        fit_to_budget(lambda x: x, lambda x: 50 + x, 40.0, 0.0, 10.0, what="the net")
    with pytest.raises(SpecError, match="positive"):
        fit_to_budget(lambda x: x, lambda x: x, 0.0, 0.0, 1.0)
