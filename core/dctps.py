"""DCT plus Sparse (DCTpS) layers (seed 002; ALGORITHMS.md §5): the pure-torch core.

The layers (`W = alpha * D + S`, a fixed DCT part plus a trainable sparse part) live in
`core.dctps_layer` and are importable from here too.

Allocation of the trainable budget `round(density * total_weights)` (seed 002 App. A.2, A.5):
"epl" (default) equal per layer, "epf" equal per filter/row, "uniform" equal density, "erk"
(Evci et al. 2020) density proportional to `sum(dims) / prod(dims)`. Every scheme water-fills
(a layer never gets more than its size; the surplus is shared by the others) and rounds by
largest remainder (ties: earlier layer), so totals are exact.

Structure is recorded as `{"op": "dctps", "allocation", "density", "layers": {name: {"nnz": k,
"alpha": "trainable" | float}}}`; the checkpoint holds `values`, `indices`, `alpha`, `bias`.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from core.applies import register_applies
from core.configs import DCTpSConfig
from core.dctps_layer import (
    DCTpSConv2d,
    DCTpSLayer,
    DCTpSLinear,
    check_alpha,
    dct_matrix,
    dct_weight,
    dctps_layer,
)
from core.edits import register_edit
from core.errors import SpecError
from core.surgery import get_layer, plain_layers, set_layer, with_edit

__all__ = [
    "ALLOCATIONS",
    "DCTpSConv2d",
    "DCTpSLayer",
    "DCTpSLinear",
    "allocate",
    "dct_matrix",
    "dct_weight",
    "dctps_applies",
    "dctps_apply",
    "dctps_layer",
    "dctps_transform",
    "fixed_dct_params",
    "random_support",
    "replay_dctps",
]

ALLOCATIONS = ("epl", "epf", "uniform", "erk")
DEFAULT_DENSITY = 0.01  # the step's density when it gives neither density nor target


# ---- allocation and support -------------------------------------------------------------

def _water_fill(weights: list[int], caps: list[int], budget: int) -> list[Fraction]:
    """Exact quotas `min(cap_l, t * w_l)` summing to `budget` (<= sum of caps)."""
    quotas: list[Fraction | None] = [None] * len(weights)
    active = sorted(range(len(weights)), key=lambda i: Fraction(caps[i], weights[i]))
    left, wsum = Fraction(budget), sum(weights)
    while active and caps[active[0]] * wsum <= left * weights[active[0]]:  # cap_l <= t * w_l
        i = active.pop(0)
        quotas[i] = Fraction(caps[i])
        left -= caps[i]
        wsum -= weights[i]
    for i in active:
        quotas[i] = left * weights[i] / wsum
    return quotas  # type: ignore[return-value]


def _largest_remainder(quotas: list[Fraction]) -> list[int]:
    counts = [math.floor(q) for q in quotas]
    extra = round(sum(quotas)) - sum(counts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:extra]:
        counts[i] += 1
    return counts


def allocate(shapes: dict[str, tuple[int, ...]], density: float,
             allocation: str = "epl") -> dict[str, int]:
    """Trainable S entries per layer, summing exactly to `round(density * total_weights)`.

    epl: equal per layer; epf: equal per output row/filter (`weight_shape[0]` rows); uniform:
    `density` in every layer; erk: proportional to `sum(shape)` (Evci et al.: density ~
    `sum(dims) / prod(dims)`, kernel dims included). All capped at the layer size with the
    surplus shared by the uncapped layers (re-solved), then largest-remainder rounding.
    """
    if allocation not in ALLOCATIONS:
        raise SpecError(f"unknown allocation {allocation!r}; valid: {', '.join(ALLOCATIONS)}")
    if (isinstance(density, bool) or not isinstance(density, (int, float))
            or not 0 < density <= 1):
        raise SpecError(f"density must be in (0, 1], got {density!r}")
    if not shapes:
        raise SpecError("allocate needs at least one layer shape")
    dims = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
    if any(len(s) < 2 or min(s) < 1 for s in dims.values()):
        raise SpecError(f"every layer shape needs >= 2 positive dims, got {dims}")
    caps = [math.prod(s) for s in dims.values()]
    budget = round(density * sum(caps))
    weights = {"epl": [1] * len(caps), "epf": [s[0] for s in dims.values()],
               "uniform": caps, "erk": [sum(s) for s in dims.values()]}[allocation]
    counts = _largest_remainder(_water_fill(weights, caps, budget))
    return dict(zip(dims, counts, strict=True))


def random_support(shape: tuple[int, ...], nnz: int, generator: torch.Generator | None = None,
                   per_row: bool | None = None) -> torch.Tensor:
    """Sorted unique flat positions (int64) of a fixed random support of `nnz` entries.

    `per_row` (EPF): every row `shape[0]` gets `nnz // rows` positions, the first
    `nnz % rows` rows one more, uniformly at random within the row; else uniform in the layer.
    """
    numel = math.prod(shape)
    if not 0 <= nnz <= numel:
        raise SpecError(f"cannot place {nnz} entries in a weight of shape {list(shape)}")
    if not per_row:
        return torch.randperm(numel, generator=generator)[:nnz].sort().values
    rows = shape[0]
    size = numel // rows
    base, extra = divmod(nnz, rows)
    counts = torch.full((rows,), base, dtype=torch.int64)
    counts[:extra] += 1
    take = min(base + 1, size)
    cols = torch.rand(rows, size, generator=generator).argsort(dim=1)[:, :take]  # (rows, take)
    keep = torch.arange(take)[None, :] < counts[:, None]
    flat = torch.arange(rows)[:, None] * size + cols
    return flat[keep].sort().values


# ---- model transform and replay ---------------------------------------------------------

@register_applies("dctps")
def dctps_applies(name: str, module: nn.Module) -> str | None:
    """Why `module` cannot become a DCTpS layer (None: it can). Any nn.Linear/nn.Conv2d can,
    grouped convs included (D is built for the (out, in/groups, kh, kw) weight)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return None
    return f"a {type(module).__name__}: DCTpS replaces nn.Linear/nn.Conv2d layers only"


def _edit_layers(model: nn.Module, edit: dict[str, Any]) -> dict[str, tuple[int, str | float]]:
    layers = edit.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SpecError(f"dctps edit needs a non-empty dict 'layers' of "
                        f"{{name: {{'nnz': int, 'alpha': 'trainable' | float}}}}, got {edit}")
    out = {}
    for name, spec in layers.items():
        if not isinstance(name, str) or not isinstance(spec, dict) or "nnz" not in spec:
            raise SpecError(f"dctps edit: layer {name!r} needs {{'nnz': int, 'alpha': ...}}, "
                            f"got {spec!r}")
        layer = get_layer(model, name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise SpecError(f"dctps edit: layer {name!r} is a {type(layer).__name__}, not an "
                            "nn.Linear/nn.Conv2d")
        out[name] = (spec["nnz"], check_alpha(spec.get("alpha", "trainable")))
    return out


@register_edit("dctps")
def replay_dctps(model: nn.Module, edit: dict[str, Any]) -> None:
    """Structural replay of a "dctps" edit: placeholder layers whose `values`/`indices` a
    checkpoint then overwrites."""
    for name, (nnz, alpha) in _edit_layers(model, edit).items():
        set_layer(model, name, dctps_layer(get_layer(model, name), nnz, alpha))


def dctps_transform(model: nn.Module, density: float, allocation: str = "epl",
                    alpha: str | float = "trainable", layers: list[str] | None = None,
                    generator: torch.Generator | None = None) -> dict[str, Any]:
    """Replace (in place) every prunable Linear/Conv2d, or the named `layers`, by its DCTpS
    layer with `allocate(...)` trainable entries on a `random_support` (per row for "epf"),
    S = 0, alpha 1.0 (trainable) or fixed. Original weights are discarded, biases kept.

    Appends a "dctps" edit to `model.slimline_arch` when the model has one. Returns per layer
    `{shape, weights, nnz, density}` and the totals (seed 002 Fig. A.2).
    """
    alpha = check_alpha(alpha)
    # every plain layer (never a low-rank layer's factors), or the given ones
    names = [n for n, _ in plain_layers(model)] if layers is None else list(dict.fromkeys(layers))
    if not names:
        raise SpecError("dctps: no Linear/Conv2d layers to transform")
    found = {n: get_layer(model, n) for n in names}
    for n, layer in found.items():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise SpecError(f"dctps: layer {n!r} is a {type(layer).__name__}; only nn.Linear "
                            "and nn.Conv2d")
    shapes = {n: tuple(int(s) for s in m.weight.shape) for n, m in found.items()}
    counts = allocate(shapes, density, allocation)
    edit = {"op": "dctps", "allocation": allocation, "density": float(density),
            "layers": {n: {"nnz": counts[n], "alpha": alpha} for n in names}}
    arch = with_edit(model, edit) if getattr(model, "slimline_arch", None) is not None else None
    for n, layer in found.items():
        new = dctps_layer(layer, counts[n], alpha)
        new.set_support(random_support(shapes[n], counts[n], generator,
                                       per_row=allocation == "epf").to(layer.weight.device))
        set_layer(model, n, new)
    masks = getattr(model, "slimline_masks", None)
    if masks:  # the replaced dense weights are gone; so are their pruning masks
        model.slimline_masks = {k: v for k, v in masks.items() if k not in found}
    if arch is not None:
        model.slimline_arch = arch
    per_layer = {n: {"shape": list(shapes[n]), "weights": math.prod(shapes[n]),
                     "nnz": counts[n], "density": counts[n] / math.prod(shapes[n])}
                 for n in names}
    total, nnz = sum(r["weights"] for r in per_layer.values()), sum(counts.values())
    return {"allocation": allocation, "alpha": alpha, "layers": per_layer,
            "total_weights": total, "total_nnz": nnz, "density": nnz / total}


def dctps_apply(model: nn.Module, config: DCTpSConfig,
                generator: torch.Generator | None = None) -> dict[str, Any]:
    """`dctps_transform` by `config` (`DCTpSConfig.from_dict(step.model_dump())`); "all" layers =
    every plain Linear/Conv2d; no density: `DEFAULT_DENSITY`. A config with a `target` goes
    through `core.dctps_target.dctps_apply_target` (which measures the budget)."""
    if config.target is not None:
        raise SpecError("a dctps target is met by core.dctps_target.dctps_apply_target")
    layers = None if config.layers == "all" else list(config.layers)
    density = DEFAULT_DENSITY if config.density is None else config.density
    return dctps_transform(model, density, config.allocation, config.alpha, layers, generator)


def fixed_dct_params(model: nn.Module) -> int:
    """Entries of the fixed DCT matrices D of the model's DCTpS layers (not in
    `core.metrics.param_counts`: D is rebuilt from the layer shape, never stored nor trained)."""
    return sum(m.D.numel() for m in model.modules() if isinstance(m, DCTpSLayer))


__all__ = ["ALLOCATIONS", "DEFAULT_DENSITY", "allocate", "dct_matrix", "dct_weight",
           "dctps_applies", "dctps_apply", "dctps_layer",
           "dctps_transform", "DCTpSConfig", "DCTpSConv2d", "DCTpSLayer", "DCTpSLinear",
           "fixed_dct_params", "random_support", "replay_dctps"]
