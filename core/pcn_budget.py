"""PCN size targets: per-layer dims allocated so the measured cost lands on a budget.

`pcn_transform_to_budget(model, stats, kind, budget, layers)` — kind one of
`core.budget.BUDGET_KINDS` (trainable_params, total_params, nonzero_params, macs):

1. Marginal costs, measured: the model with every chosen layer at 1 principal component, and
   with one layer (one shared-input set: a ResNet block's conv1 and shortcut_conv share U and
   dims) at 2 — the difference is that layer's cost of one more dim for `kind` (a PCN layer's
   cost is linear in its dims: its `U` column, its weight column and its projection MACs).
   Measured on real transformed models without output pruning, never derived from formulas.
2. Greedy allocation under an internal budget B: every further direction d of layer l is an
   item worth `eigval_l[d] / total_variance_l` (the fraction of the layer's input variance it
   adds) at the layer's marginal cost; items are taken by value per unit of cost, best first,
   each while the running (linear) cost stays <= B; a layer whose next item does not fit takes
   no more (its later items explain less at the same cost), cheaper layers keep filling.
   Directions with no variance (eigenvalue <= 1e-10 of the layer's largest) are never taken.
3. `core.budget.fit_to_budget` over B: each candidate model is built with per-layer
   `{"dims": d}` selectors (`plan_pcn` + `apply_pcn`, output pruning as asked) and its real
   cost measured (`core.budget.model_cost`), so the result is at or below the budget, normally
   within `tol` (1%) of it — output pruning (`output="auto"`) changes costs non-linearly and
   the outer fit absorbs it. B starts at the budget itself (exact without output pruning: two
   or three builds) and doubles while the measured cost fits, which brackets the fit.
4. Where the fit stops short of `tol` (a layer's dim is coarse next to the budget, or the
   auto output rule's 10x step sits right there), single dims are added while the measured
   cost fits (`_top_up`). Near such a step a result can still land a few percent below.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from core.budget import BUDGET_KINDS, Fit, fit_to_budget, model_cost
from core.errors import BelowMinimum, SpecError
from core.pca import LayerStats
from core.pcn_graph import shared_input_sets
from core.pcn_output import apply_pcn, chosen_layers, plan_pcn
from core.surgery import get_layer, layer_weight

__all__ = ["NEGLIGIBLE", "SHAPE_KINDS", "pcn_minimum", "pcn_transform_to_budget", "refuse_below"]

NEGLIGIBLE = 1e-10  # an eigenvalue <= this fraction of the layer's largest explains nothing


def _units(model: nn.Module, chosen: list[str]) -> list[tuple[str, ...]]:
    """The allocation units in forward order: a layer, or the chosen layers reading one tensor
    (they share one U, so one dims)."""
    partner: dict[str, tuple[str, ...]] = {}
    for tensor in shared_input_sets(model):
        members = tuple(n for n in chosen if n in tensor)
        for n in members:
            partner[n] = members
    units: list[tuple[str, ...]] = []
    for n in chosen:
        unit = partner.get(n, (n,))
        if unit not in units:
            units.append(unit)
    return units


def _spectrum(stats: dict[str, LayerStats], unit: tuple[str, ...]) -> tuple[torch.Tensor, int]:
    """(variance fraction of each direction, directions worth keeping >= 1) of a unit."""
    st = stats[unit[0]]
    e = st.eigvals.detach().to(torch.float64).flatten().clamp(min=0)
    total = float(e.sum()) if st.total_variance is None else max(float(st.total_variance),
                                                                 float(e.sum()))
    limit = min(e.numel(), int(st.eigvecs.shape[1]))
    top = float(e[0]) if e.numel() else 0.0
    useful = int((e[:limit] > NEGLIGIBLE * top).sum()) if top > 0 else 0
    fractions = e / total if total > 0 else torch.zeros_like(e)
    return fractions, max(1, useful)


def _top_up(dims: tuple[int, ...], value: float, budget: int,
            spectra: list[tuple[torch.Tensor, int]], marginal: list[int],
            cost: Callable[[tuple[int, ...]], float], *, limit: int
            ) -> tuple[tuple[int, ...], float, int]:
    """Where the fit stopped short of the budget (a unit's next dim is coarse next to what is
    left, or output pruning moved the cost): one more dim at a time, the best next direction
    per unit of cost first, each kept when the measured cost stays within budget, a unit
    dropped at its first miss. (dims, cost, dims added); at most `limit` builds."""
    open_units = {i for i, (_, useful) in enumerate(spectra) if dims[i] < useful}
    added = 0
    while open_units and limit > 0:
        i = max(open_units, key=lambda j: (float(spectra[j][0][dims[j]]) / marginal[j], -j))
        trial = tuple(d + 1 if j == i else d for j, d in enumerate(dims))
        limit -= 1
        measured = cost(trial)
        if measured <= budget:
            dims, value, added = trial, measured, added + 1
            if dims[i] >= spectra[i][1]:
                open_units.discard(i)
        else:
            open_units.discard(i)
    return dims, value, added


def _check_args(kind: str, budget: Any, input_shape: Sequence[int] | None) -> None:
    if kind not in BUDGET_KINDS:
        raise SpecError(f"unknown budget kind {kind!r}; one of {', '.join(BUDGET_KINDS)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise SpecError(f"{kind} must be an integer >= 1, got {budget!r}")
    if kind == "macs" and input_shape is None:
        raise SpecError("a macs budget needs the model's input shape (input_shape)")


SHAPE_KINDS = tuple(k for k in BUDGET_KINDS if k != "nonzero_params")


def _placeholder_stats(model: nn.Module, chosen: list[str]) -> dict[str, LayerStats]:
    """One direction per layer input: what a cost at one component per layer needs (a PCN
    layer's shapes, hence its cost, do not depend on which direction it keeps)."""
    found = {}
    for name in chosen:
        layer = get_layer(model, name)
        dim = int(layer_weight(model, name).shape[1])
        found[name] = LayerStats(mu=torch.zeros(dim), eigvals=torch.ones(1),
                                 eigvecs=torch.full((dim, 1), dim ** -0.5), count=1,
                                 kind="linear" if isinstance(layer, nn.Linear) else "conv",
                                 total_variance=1.0)
    return found


def pcn_minimum(model: nn.Module, kind: str, layers: list[str] | str = "auto", *,
                input_shape: Sequence[int] | None = None) -> int:
    """The measured `kind` cost of the model with one principal component per chosen layer and
    no output pruning: the smallest `pcn_transform_to_budget` can build without output
    pruning (its `minimum`), found without statistics, so a budget below it is refused before
    the PCA pass (output pruning can go lower, by how much depends on the statistics).
    `nonzero_params` is not a shape: an input channel that is always zero leaves zeros in the
    real projection, so it is a SpecError here (`SHAPE_KINDS` are the kinds it gives)."""
    if kind not in SHAPE_KINDS:
        raise SpecError(f"pcn's smallest {kind} depends on the statistics; one of "
                        f"{', '.join(SHAPE_KINDS)}")
    _check_args(kind, 1, input_shape)
    chosen = chosen_layers(model, layers)
    stats = _placeholder_stats(model, chosen)
    plan = plan_pcn(model, stats, {"per_layer": {n: {"dims": 1} for n in chosen}}, chosen)
    return model_cost(apply_pcn(model, plan, stats)[0], kind, input_shape)


def refuse_below(kind: str, budget: int, minimum: int, chosen: list[str], output: bool) -> None:
    """BelowMinimum when `budget` is below `minimum`, the cost at one component per layer."""
    if minimum > budget:
        raise BelowMinimum(
            "pcn", kind, budget, minimum, f"one principal component per layer of "
            f"{', '.join(chosen)}{' with output pruning' if output else ''}",
            "transform more layers" + ("" if output else ", or turn on output_based"))


def pcn_transform_to_budget(model: nn.Module, stats: dict[str, LayerStats], kind: str,
                            budget: int, layers: list[str] | str = "auto", *,
                            output: dict[str, dict[str, Any]] | str | None = None,
                            input_shape: Sequence[int] | None = None, tol: float = 0.01,
                            max_evals: int = 32) -> tuple[nn.Module, dict[str, Any]]:
    """The PCN transform whose measured `kind` cost is the largest at or below `budget`, dims
    allocated per layer (see the module doc); returns (new model, report).

    `stats`: the full spectrum of every chosen layer (`core.pca.collect_input_stats`; with
    `top_k` only the computed directions are candidates). `layers`, `output`: as
    `core.pcn_output.pcn_transform`. `input_shape`: one sample, needed for `macs`.
    SpecError when even one component per layer exceeds the budget (naming that minimum).
    Report: the `pcn_transform` report plus `"search"`: `core.budget.Fit.summary` (kind, goal,
    value, knob = the greedy's internal budget, fraction; evaluations = distinct models built
    and measured, the marginal-cost ones included) and `target`, `dims` {layer: d}, `minimum`
    (cost at one component per layer), `capped` (the budget holds every direction with
    variance), `marginal_cost` {layer: cost of one more dim}, `explained_variance` {layer:
    fraction}, `topped_up` (dims added one at a time after the fit, see `_top_up`) and
    `trials` [{knob, cost}] (the bracket, then the fit's bisection)."""
    _check_args(kind, budget, input_shape)
    chosen = chosen_layers(model, layers)
    stats = dict(stats)
    for tensor in shared_input_sets(model):  # one PCA serves every layer reading the tensor
        have = [n for n in tensor if n in stats]
        for n in tensor:
            if n not in stats and have:
                stats[n] = stats[have[0]]
    missing = [n for n in chosen if n not in stats]
    if missing:
        raise SpecError(f"no PCA stats for layers {missing}; collect them with "
                        "core.pca.collect_input_stats first")
    units = _units(model, chosen)
    spectra = [_spectrum(stats, u) for u in units]
    measured: dict[tuple[tuple[int, ...], bool], int] = {}  # costs only: models can be big

    def build(dims: Sequence[int], with_output: bool = True
              ) -> tuple[nn.Module, dict[str, Any]]:
        per_layer = {n: {"dims": int(d)} for u, d in zip(units, dims, strict=True) for n in u}
        plan = plan_pcn(model, stats, {"per_layer": per_layer}, chosen,
                        output=output if with_output else None)
        return apply_pcn(model, plan, stats)

    def cost(dims: Sequence[int], with_output: bool = True) -> int:
        key = (tuple(dims), with_output and output is not None)
        if key not in measured:
            measured[key] = model_cost(build(dims, with_output)[0], kind, input_shape)
        return measured[key]

    ones = [1] * len(units)
    lowest = cost(ones)
    refuse_below(kind, budget, lowest, chosen, output is not None)
    # marginal cost of one more dim per unit, measured on the input transform alone
    base = cost(ones, with_output=False)
    marginal: list[int] = []
    for i, (_, useful) in enumerate(spectra):
        if useful < 2:
            marginal.append(0)
            continue
        bumped = list(ones)
        bumped[i] = 2
        marginal.append(max(1, cost(bumped, with_output=False) - base))
    # every further direction: (value per unit of cost, unit, dims it brings the unit to)
    items: list[tuple[float, int, int]] = []
    for i, (fractions, useful) in enumerate(spectra):
        for d in range(2, useful + 1):
            items.append((float(fractions[d - 1]) / marginal[i], i, d))
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    top = base + sum(c * (s[1] - 1) for c, s in zip(marginal, spectra, strict=True))

    def allocate(internal: float) -> tuple[int, ...]:
        dims = list(ones)
        left = internal - base
        blocked: set[int] = set()
        for _, i, d in items:
            if i in blocked or d != dims[i] + 1:
                continue
            if marginal[i] <= left:
                dims[i] = d
                left -= marginal[i]
            else:
                blocked.add(i)
                if len(blocked) == len(units):
                    break
        return tuple(dims)

    # bracket: the linear prediction first (exact without output pruning), doubled while the
    # measured cost still fits; then the fit between the last fitting and the first over
    bracket: list[dict[str, float]] = []
    top = max(top, base)
    fits, over = float(base), None
    knob = float(min(max(budget, base), top))
    while over is None:
        value = cost(allocate(knob))
        bracket.append({"knob": knob, "cost": value})
        if value > budget:
            over = knob
        elif knob >= top:
            break
        else:
            fits, knob = knob, float(min(2 * knob, top))
    if over is None:  # the budget holds every direction with variance
        fit = Fit(allocate(top), float(top), float(cost(allocate(top))), [])
    else:
        fit = fit_to_budget(allocate, cost, budget, fits, over,
                            what=f"the PCN transform's {kind}", tol=tol, max_evals=max_evals,
                            integer=True)
    chosen_dims, topped = fit.built, 0
    if fit.cost < budget * (1 - tol) and fit.knob < top:
        chosen_dims, _, topped = _top_up(chosen_dims, fit.cost, budget, spectra, marginal, cost,
                                         limit=4 * len(units) + 8)
    new_model, report = build(chosen_dims)
    dims = {n: int(d) for u, d in zip(units, chosen_dims, strict=True) for n in u}
    search = fit.summary(kind, budget) | {
        "value": model_cost(new_model, kind, input_shape), "knob": int(fit.knob),
        "evaluations": len(measured), "target": {kind: budget}, "dims": dims,
        "minimum": lowest,
        "capped": all(d == s[1] for d, s in zip(chosen_dims, spectra, strict=True)),
        "marginal_cost": {n: c for u, c in zip(units, marginal, strict=True) for n in u},
        "explained_variance": {n: r["explained_variance"] for n, r in report["input"].items()},
        "topped_up": topped, "trials": bracket + fit.trials}
    search["fraction"] = search["value"] / budget
    report["search"] = search
    return new_model, report
