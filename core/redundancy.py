"""Redundancy analyses of seed 001 (Heitmann, *Sources of Redundancy in Neural Networks*;
ALGORITHMS.md §6): unit-pruning curves without retraining, plus the spectral analyses of
`core.spectra` (re-exported here).

Rows are units: a weight is viewed as `(m, n)` (`core.spectra.weight_matrix`). Scores and orders
are pure float64 tensor functions; removal of units is physical and reuses the output-unit surgery
of the PCN output transform (`core.pcn_output.prune_units` on a `core.pcn_graph.unit_groups`
group): the producer's rows and bias, its BatchNorm, and the readers' input columns (h'*w'
columns per filter for a conv read through a flatten). A removed unit therefore contributes
nothing downstream — unlike masking its weight row, which still leaks ReLU(b_i).

Orders (seed 001 §3.1 "Problem setup"), each a permutation of the m units, removed front first:
* magnitude: ||w_i|| smallest first;
* frame potential: FP(Ŵ) = sum_{i,j} <ŵ_i, ŵ_j>² = ||Ŵ Ŵ^T||_F² of the row-normalised W; greedily
  drop the unit with the smallest contribution c_i = sum_j <ŵ_i, ŵ_j>² (j over the remaining
  units, j = i included), which keeps the FP of the pruned matrix as large as possible (the
  paper's `max_fp_pruning`, the variant that beats random in its Fig. 2). `largest_first=True`
  gives the adversarial variants (`min_fp_pruning`, `max_mag_pruning`);
* random: `torch.randperm` with an explicit generator.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from core.errors import SpecError
from core.pcn_graph import UnitGroup, group_units, prune_units, unit_groups
from core.spectra import (
    elbow,
    elbow_accuracy,
    init_variance,
    marchenko_pastur,
    principal_angles,
    rank_k_projection,
    spectrum,
    weight_matrix,
)
from core.surgery import get_layer, with_edit

__all__ = [
    "elbow",
    "elbow_accuracy",
    "frame_potential",
    "frame_potential_contributions",
    "frame_potential_greedy",
    "frame_potential_order",
    "frame_potential_order_naive",
    "init_variance",
    "magnitude_order",
    "marchenko_pastur",
    "principal_angles",
    "random_order",
    "rank_k_projection",
    "spectrum",
    "unit_pruning",
    "unit_pruning_curve",
    "weight_matrix",
]

Evaluate = Callable[[nn.Module], float]
_TIE_RTOL = 1e-9


# ---- score: frame potential ---------------------------------------------------------------

def _normalised_rows(w: torch.Tensor | nn.Module) -> torch.Tensor:
    """Ŵ (m, n): rows of W scaled to unit norm; an all-zero row stays zero (no direction)."""
    mat = weight_matrix(w)
    norms = mat.norm(dim=1, keepdim=True)  # (m, 1)
    return torch.where(norms > 0, mat / norms.clamp(min=torch.finfo(mat.dtype).tiny), 0.0)


def frame_potential(w: torch.Tensor | nn.Module) -> float:
    """FP(Ŵ) = ||X||_F² with X = Ŵ Ŵ^T (seed 001 §3.1); m for orthonormal rows, m² if all equal."""
    with torch.no_grad():
        wh = _normalised_rows(w)
        return float((wh @ wh.T).square().sum())


def frame_potential_contributions(w: torch.Tensor | nn.Module) -> torch.Tensor:
    """c (m,): c_i = sum_j <ŵ_i, ŵ_j>² (j = i included, so c_i >= 1 for a non-zero row)."""
    with torch.no_grad():
        wh = _normalised_rows(w)
        return (wh @ wh.T).square().sum(dim=1)


def _pick(c: torch.Tensor, live: torch.Tensor, largest_first: bool) -> int:
    """Index of the smallest (largest) live c; near-ties (the O(m) update's rounding, e.g. the
    last two units, whose c are equal) go to the lowest index."""
    vals = c[live]
    best = vals.max() if largest_first else vals.min()
    tol = _TIE_RTOL * max(1.0, float(vals.abs().max()))
    near = live & ((c - best).abs() <= tol)
    return int(torch.nonzero(near)[0])


def frame_potential_greedy(w: torch.Tensor | nn.Module, largest_first: bool = False
                           ) -> tuple[list[int], list[float]]:
    """Greedy FP removal of all m units: (order, potentials).

    The Gram matrix G = Ŵ Ŵ^T is computed once (O(m² n)); each step removes k = argmin c
    (argmax with `largest_first`; ties within 1e-9 relative: lowest index) and updates
    c_j -= G_jk² and FP -= 2 c_k - G_kk² in O(m). `potentials[t]` is the FP of the matrix left
    after t removals (length m + 1, ending at 0).
    """
    with torch.no_grad():
        wh = _normalised_rows(w)
        g2 = (wh @ wh.T).square()  # (m, m) squared cosines
        c = g2.sum(dim=1)  # (m,)
        fp = float(c.sum())
        live = torch.ones(c.numel(), dtype=torch.bool, device=c.device)
        order: list[int] = []
        potentials = [fp]
        for _ in range(c.numel()):
            k = _pick(c, live, largest_first)
            fp -= 2.0 * float(c[k]) - float(g2[k, k])
            c -= g2[:, k]
            live[k] = False
            order.append(k)
            potentials.append(max(fp, 0.0))
    return order, potentials


def frame_potential_order(w: torch.Tensor | nn.Module, largest_first: bool = False) -> list[int]:
    """Units in greedy frame-potential removal order (smallest contribution first)."""
    return frame_potential_greedy(w, largest_first)[0]


def frame_potential_order_naive(w: torch.Tensor | nn.Module,
                                largest_first: bool = False) -> list[int]:
    """Reference for `frame_potential_order`: recomputes every c on the remaining rows (O(m³))."""
    with torch.no_grad():
        wh = _normalised_rows(w)
        g2 = (wh @ wh.T).square()
        live = torch.ones(wh.shape[0], dtype=torch.bool, device=wh.device)
        order: list[int] = []
        while bool(live.any()):
            c = (g2 * live[None, :]).sum(dim=1)  # (m,) over the remaining units only
            k = _pick(c, live, largest_first)
            order.append(k)
            live[k] = False
    return order


def magnitude_order(w: torch.Tensor | nn.Module, largest_first: bool = False) -> list[int]:
    """Units by row norm ||w_i||, smallest first (ties: lowest index)."""
    with torch.no_grad():
        norms = weight_matrix(w).norm(dim=1)
    return torch.sort(norms, descending=largest_first, stable=True).indices.tolist()


def random_order(m: int, generator: torch.Generator) -> list[int]:
    """A uniformly random permutation of the m units drawn from `generator`."""
    return torch.randperm(m, generator=generator).tolist()


# ---- apply: physical unit removal and the curves ------------------------------------------

def _group(model: nn.Module, layer: str) -> UnitGroup:
    groups = unit_groups(model)
    if layer not in groups:
        raise SpecError(f"unit pruning: {layer!r} is not a unit group of this model; valid: "
                        f"{', '.join(groups)}")
    return groups[layer]


def group_matrix(model: nn.Module, layer: str) -> torch.Tensor:
    """(m, n) weight of the group's units: the producer's matrix, or for a ResNet stream the
    producers' matrices side by side (a unit's weight vector spans every producer)."""
    group = _group(model, layer)
    return torch.cat([weight_matrix(get_layer(model, p)) for p in group.producers], dim=1)


def _check_counts(counts: Sequence[int], units: int, order_len: int) -> list[int]:
    out = []
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < units or n > order_len:
            raise SpecError(f"unit pruning: counts must be ints in [0, {units - 1}] (at least one "
                            f"unit stays) and <= len(order) = {order_len}, got {n!r}")
        out.append(n)
    return out


def unit_pruning_curve(model: nn.Module, layer: str, order: Sequence[int],
                       counts: Sequence[int], evaluate: Evaluate) -> list[dict]:
    """[{"removed": n, "units_left": m - n, "accuracy": evaluate(pruned)}] for n in `counts`.

    `layer`: a unit group (`core.pcn_graph.unit_groups`: the layer name in plain zoo models,
    `stage{s}` for a ResNet residual stream). For each n a deep copy of `model` loses the first n
    units of `order` physically (no retraining) and is evaluated in eval mode under no_grad; the
    copy's arch records a `pcn_output` edit so its shapes can be rebuilt. `model` is untouched.
    """
    group = _group(model, layer)
    units = group_units(model, group)
    order_t = torch.as_tensor(list(order), dtype=torch.int64)
    if order_t.numel() and (int(order_t.min()) < 0 or int(order_t.max()) >= units
                            or torch.unique(order_t).numel() != order_t.numel()):
        raise SpecError(f"unit pruning: order must hold distinct unit indices in [0, {units})")
    curve = []
    for n in _check_counts(list(counts), units, order_t.numel()):
        pruned = copy.deepcopy(model)
        if n:
            keep = torch.ones(units, dtype=torch.bool)
            keep[order_t[:n]] = False
            prune_units(pruned, group, torch.nonzero(keep).flatten())
            if getattr(pruned, "slimline_arch", None) is not None:
                # replay keeps the first units; shapes are what a checkpoint load needs
                pruned.slimline_arch = with_edit(pruned, {"op": "pcn_output", "layer": layer,
                                                          "keep": units - n})
        pruned.eval()
        with torch.no_grad():
            accuracy = float(evaluate(pruned))
        curve.append({"removed": n, "units_left": units - n, "accuracy": accuracy})
    return curve


def default_counts(units: int) -> list[int]:
    """0, 10%, ..., 90% of the units (floored, deduplicated, ascending)."""
    return sorted({units * tenth // 10 for tenth in range(10)})


def unit_pruning(model: nn.Module, layer: str, evaluate: Evaluate,
                 counts: Sequence[int] | None = None, seeds: int = 5, generator_seed: int = 0,
                 worst_case: bool = False) -> dict:
    """Magnitude, frame-potential and random unit-pruning curves of one unit group.

    Returns {"layer", "units", "counts", "magnitude": curve, "frame_potential": curve,
    "random": [{"removed", "units_left", "accuracy_mean", "accuracy_std", "accuracies"}]} with
    curves as `unit_pruning_curve`; random orders are drawn from one generator seeded with
    `generator_seed`, std is the sample std over `seeds` orders (0 for one seed).
    `worst_case=True` adds "magnitude_largest" and "frame_potential_largest" (seed 001 Fig. 2).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise SpecError(f"unit pruning: seeds must be an int >= 1, got {seeds!r}")
    group = _group(model, layer)
    units = group_units(model, group)
    counts = default_counts(units) if counts is None else _check_counts(list(counts), units, units)
    w = group_matrix(model, layer)
    result: dict = {"layer": layer, "units": units, "counts": list(counts)}
    orders = {"magnitude": magnitude_order(w), "frame_potential": frame_potential_order(w)}
    if worst_case:
        orders["magnitude_largest"] = magnitude_order(w, largest_first=True)
        orders["frame_potential_largest"] = frame_potential_order(w, largest_first=True)
    for name, order in orders.items():
        result[name] = unit_pruning_curve(model, layer, order, counts, evaluate)
    generator = torch.Generator().manual_seed(generator_seed)
    runs = [unit_pruning_curve(model, layer, random_order(units, generator), counts, evaluate)
            for _ in range(seeds)]
    random_curve = []
    for i, n in enumerate(counts):
        acc = torch.tensor([run[i]["accuracy"] for run in runs], dtype=torch.float64)
        random_curve.append({"removed": n, "units_left": units - n,
                             "accuracy_mean": float(acc.mean()),
                             "accuracy_std": float(acc.std()) if seeds > 1 else 0.0,
                             "accuracies": acc.tolist()})
    result["random"] = random_curve
    return result
