"""Budgets: what a model costs, measured exactly, and a knob fitted so a model lands on a budget.

The cost kinds (`BUDGET_KINDS`), each measured on the model itself (never estimated):

* `total_params` — every value the dense-format model stores, what a deployed ONNX holds:
  parameters, persistent floating-point buffers (PCN's frozen `U`/`mu`, BatchNorm running
  statistics; not integer counters or indices), and a DCTpS layer as the dense weight it
  computes (`alpha * D + S` is shipped dense). Masks do not reduce it: a masked weight is stored
  as a dense matrix holding zeros.
* `nonzero_params` — what a sparse file stores: the non-zero entries of the same tensors, with a
  DCTpS layer counted as its stored values, every one of its fixed support (its `D` is rebuilt
  from the shape).
* `trainable_params` — parameters with `requires_grad`.
* `macs` — multiply-accumulates of one sample (`core.metrics.count_macs`): what a dense runtime
  executes; masks do not reduce it either.

`fit_to_budget` finds the largest value of a monotone knob (a keep ratio, a density, a budget
passed on to a greedy allocation) whose model's measured cost is at or below a budget — the one
search behind every method's absolute target, so each lands within a few percent below it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from core.dctps_layer import DCTpSLayer
from core.errors import SpecError
from core.layers import weight_layers
from core.metrics import count_macs

__all__ = ["BUDGET_KINDS", "PARAM_KINDS", "Fit", "costs", "fit_to_budget", "model_cost"]

PARAM_KINDS = ("total_params", "nonzero_params", "trainable_params")
BUDGET_KINDS = (*PARAM_KINDS, "macs")

T = TypeVar("T")


def _stored_tensors(model: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """(tensor, counts as dense-equivalent) for every value the dense-format model stores; a
    DCTpS layer contributes a placeholder of its dense weight's size (see `_param_counts`)."""
    out: list[tuple[torch.Tensor, bool]] = []
    seen: set[int] = set()
    frozen = {id(t) for _, _, layer in weight_layers(model) for t in layer.frozen_tensors()}
    for module in model.modules():
        for name, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if isinstance(module, DCTpSLayer) and name in ("values", "alpha"):
                continue  # counted with the layer below
            out.append((tensor, False))
        for name, tensor in module.named_buffers(recurse=False):
            if id(tensor) in seen or not tensor.is_floating_point():
                continue
            persistent = name not in getattr(module, "_non_persistent_buffers_set", set())
            if not persistent and id(tensor) not in frozen:
                continue
            if isinstance(module, DCTpSLayer) and name in ("D", "alpha"):
                continue
            seen.add(id(tensor))
            out.append((tensor, False))
    return out


def _param_counts(model: nn.Module) -> dict[str, int]:
    total = nonzero = 0
    for tensor, _ in _stored_tensors(model):
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor.detach()))
    for module in model.modules():
        if isinstance(module, DCTpSLayer):
            dense = 1
            for size in module.weight_shape:
                dense *= int(size)
            total += dense + (1 if isinstance(module.alpha, nn.Parameter) else 0)
            # the values S stores (its support is fixed: a sparse file keeps every one)
            nonzero += module.values.numel()
            nonzero += 1 if isinstance(module.alpha, nn.Parameter) else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "nonzero_params": nonzero, "trainable_params": trainable}


def costs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Every cost kind of `model` (one sample of `input_shape` for MACs)."""
    return _param_counts(model) | {"macs": int(count_macs(model, input_shape))}


def model_cost(model: nn.Module, kind: str, input_shape: Sequence[int] | None = None) -> int:
    """One cost kind (see module doc); `input_shape` is needed for `macs`."""
    if kind not in BUDGET_KINDS:
        raise SpecError(f"unknown budget kind {kind!r}; one of {', '.join(BUDGET_KINDS)}")
    if kind == "macs":
        if input_shape is None:
            raise SpecError("a macs budget needs the model's input shape")
        return int(count_macs(model, input_shape))
    return _param_counts(model)[kind]


@dataclass
class Fit(Generic[T]):
    """The result of `fit_to_budget`: the built object at the chosen knob, the knob, its cost,
    and every evaluation `{knob, cost}` in the order they were made."""

    built: T
    knob: float
    cost: float
    trials: list[dict[str, float]] = field(default_factory=list)

    def summary(self, kind: str, goal: float) -> dict[str, Any]:
        return {"kind": kind, "goal": goal, "value": self.cost, "knob": self.knob,
                "fraction": self.cost / goal if goal else None, "evaluations": len(self.trials)}


def fit_to_budget(build: Callable[[float], T], cost: Callable[[T], float], budget: float,
                  lo: float, hi: float, *, what: str = "the model", tol: float = 0.01,
                  max_evals: int = 24, integer: bool = False) -> Fit[T]:
    """The largest knob x in [lo, hi] whose `cost(build(x)) <= budget`, assuming the cost does
    not decrease as x grows (bisection; every accepted value was built and measured, so the
    budget is always met). Stops when the cost is within `tol` (relative) below the budget, the
    interval is exhausted (`integer`: adjacent integers), or after `max_evals` builds.

    SpecError when even `lo` exceeds the budget, naming the smallest cost reachable."""
    trials: list[dict[str, float]] = []

    def measure(x: float) -> tuple[T, float]:
        built = build(x)
        value = float(cost(built))
        trials.append({"knob": x, "cost": value})
        return built, value

    if budget <= 0:
        raise SpecError(f"a budget must be positive, got {budget}")
    best_built, best_cost = measure(hi)
    if best_cost <= budget:
        return Fit(best_built, hi, best_cost, trials)
    low_built, low_cost = measure(lo)
    if low_cost > budget:
        raise SpecError(f"{what} cannot get below {low_cost:.0f} (at its smallest setting, "
                        f"{lo:g}); the budget {budget:.0f} is lower: raise the budget or "
                        "compress more layers")
    best = (low_built, lo, low_cost)
    a, b = lo, hi
    while len(trials) < max_evals:
        if integer and b - a <= 1:
            break
        if not integer and b - a <= 1e-9 * max(1.0, abs(b)):
            break
        if best[2] >= budget * (1 - tol):
            break
        mid = (a + b) / 2
        if integer:
            mid = float(int(mid))
        built, value = measure(mid)
        if value <= budget:
            a = mid
            if value >= best[2]:
                best = (built, mid, value)
        else:
            b = mid
    return Fit(best[0], best[1], best[2], trials)
