"""Low-rank pruning of Linear/Conv2d layers (seed 003; ALGORITHMS.md §4): the pure-torch core.

Matrix view: a Linear weight is `(out, in)`; a Conv2d weight `(C_out, C_in, kh, kw)` is viewed as
`(C_out, C_in*kh*kw)` (im2col order: column `c*kh*kw + i*kw + j`), so the columns of one input
channel are contiguous.

Blocking (`BLOCKINGS`) splits that matrix into blocks `(r0, r1, c0, c1)`: output rows
`[r0, r1)` times input channels `[c0, c1)` (input features for a Linear), i.e. matrix columns
`[c0*K, c1*K)` with `K = kh*kw` (1 for a Linear). Blocks tile the matrix; rows are split only by
"square" blocking. Layouts depend on the layer's shape only, so an edit can replay them.
* "none": one block, the whole matrix.
* "alds": the input channels split into `k = min(4, C_in)` contiguous groups as equal as possible
  (the first groups get the extra channel); every block has all rows.
* "square": the largest square blocks. With `n` rows and `m` columns: if `m <= n`, one column
  block and rows cut into chunks of `m` (`m x m` blocks, the last chunk the remainder); else
  columns cut into chunks of `w = max(1, n // K)` whole input channels (`n x w*K` blocks, square
  whenever `K` divides `n`, the last chunk the remainder) and rows are not split.

Each block is SVD'd on its own in float64: `B = U diag(S) Vh`. Keeping rank `r` of a block
materialises as a factor pair that computes `(U_r S_r) (Vh_r x_slice)`:
* Linear: `Linear(q, r, bias=False)` (weight `Vh_r`) then `Linear(r, p, bias=False)` (weight
  `U_r S_r`), q = block inputs, p = block outputs;
* Conv2d: `Conv2d(c, r, (kh, kw), same stride/padding/dilation/padding_mode, bias=False)` (weight
  `Vh_r` reshaped to `(r, c, kh, kw)`) then `Conv2d(r, p, 1, bias=False)` (weight `U_r S_r`).
A block is kept dense (one bias-free Linear/Conv2d holding `U_r S_r Vh_r`, the rank-r
truncation) where factoring would not save parameters: `r * (p + q) >= p * q` with `q` the block's
matrix columns. `LowRankLayer` applies every block to its input slice, sums the blocks of one row
range, concatenates the row ranges in order along the feature/channel dimension and adds the
original bias once (a module-level parameter). Ranks are >= 1 per block.

Structure is recorded as the edit `{"op": "lowrank", "layer": name, "blocking": b, "ranks": [...]}`
(ranks in layout order) so `core.models.build` rebuilds the factored layer.

Scores (`layer_scores`, `SCORES`) rate every singular vector (block b, index i) on one global
scale; `select_ranks` greedily removes the lowest-scoring vectors to a parameter budget; then
`lowrank_transform` materialises the chosen ranks. Modules: `core.lowrank_layer` (layouts,
SVDs, `LowRankLayer`, the edit's replay), `core.lowrank_scores` (scores, selection); this one
re-exports both and holds the transform.

Absolute whole-model budgets (`BUDGET_KINDS` of `core.budget`: `total_params`,
`nonzero_params`, `trainable_params`, `macs`) are met by `fit_ranks`: the scores are computed
once, and `core.budget.fit_to_budget` bisects the ratio given to `select_ranks` (parameter- or
MAC-weighted), measuring the whole model each time on a cheap structural probe (the chosen
layers as `LowRankLayer`s, no SVD; for `nonzero_params` their entries set to one, so the real
factors can only count less, and the rest of the model counted as trained,
`core.prune.as_trained`, so fine-tuning cannot push it over). A fill-up pass then gives back,
best score first, the removed vectors whose exact cost still fits, and the result is measured
once more. It lands at or below the budget, normally within 1 %.
"""
from __future__ import annotations

import copy
import heapq
from typing import Any

import torch
from torch import nn

from core.budget import BUDGET_KINDS, model_cost
from core.budget import fit_to_budget as _fit_to_budget
from core.configs import LowRankConfig
from core.errors import BelowMinimum, SpecError
from core.lowrank_layer import (
    ALDS_GROUPS,
    BLOCKINGS,
    Block,
    LowRankLayer,
    _check_layer,
    _unit,
    block_layout,
    block_matrices,
    block_params,
    block_shapes,
    block_svds,
    factorize_layer,
    full_ranks,
    is_factored,
    layer_matrix,
    lowrank_applies,
    replay_lowrank,
)
from core.lowrank_scores import (
    SCORES,
    layer_positions,
    layer_scores,
    output_scores,
    output_scores_naive,
    select_ranks,
)
from core.prune import as_trained
from core.surgery import get_layer, plain_layers, set_layer, with_edit


def lowrank_transform(model: nn.Module, plan: dict[str, dict[str, Any]]
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with every `plan[layer] = {"blocking": b, "ranks": [...]}` factored.

    Appends one "lowrank" edit per layer to the copy's `slimline_arch` (so `core.models.save` /
    `load` rebuild it). Report per layer: blocking, ranks, full ranks, weight params before/after.
    """
    new_model = copy.deepcopy(model)
    report: dict[str, Any] = {}
    for name, choice in plan.items():
        layer = get_layer(new_model, name)
        _check_layer(name, layer)
        blocking, ranks = choice.get("blocking", "none"), [int(r) for r in choice["ranks"]]
        factored = factorize_layer(layer, blocking, ranks)
        set_layer(new_model, name, factored)
        k = _unit(layer)
        shapes = [(r1 - r0, (c1 - c0) * k) for r0, r1, c0, c1 in factored.layout]
        report[name] = {"blocking": blocking, "ranks": ranks,
                        "full_ranks": full_ranks(layer, blocking),
                        "weight_params_before": int(layer.weight.numel()),
                        "weight_params_after": sum(
                            block_params(p, q, r)
                            for (p, q), r in zip(shapes, ranks, strict=True))}
        new_model.slimline_arch = with_edit(new_model, {"op": "lowrank", "layer": name,
                                                        "blocking": blocking, "ranks": ranks})
    return new_model, report


def lowrank_untouched(model: nn.Module) -> dict[str, str]:
    """{layer: reason} of the model's Linear/Conv2d layers lowrank cannot factor
    (`lowrank_applies`: depthwise/grouped convs); "all" leaves them out."""
    return {n: reason for n, m in plain_layers(model)
            if (reason := lowrank_applies(n, m)) is not None}


def lowrank_layers(model: nn.Module, layers: str | list[str] = "all") -> list[str]:
    """"all" = every Linear / dense Conv2d in forward order (`core.surgery.plain_layers`: not
    a factor of a low-rank layer; `lowrank_untouched` left out), else the names (checked:
    SpecError naming the reason or the valid layers)."""
    untouched = lowrank_untouched(model)
    plain = [n for n, _ in plain_layers(model) if n not in untouched]
    chosen = plain if layers == "all" else list(dict.fromkeys(layers))
    refused = {n: untouched[n] for n in chosen if n in untouched}
    if refused:
        raise SpecError("lowrank cannot factor " + "; ".join(
            f"{n!r}: {r}" for n, r in refused.items()) + "; leave them out (layers it can "
            f"factor: {', '.join(plain)})")
    bad = [n for n in chosen if n not in plain]
    if bad:
        raise SpecError(f"lowrank cannot factor {bad}; plain Linear/Conv2d layers: "
                        f"{', '.join(plain)}")
    if not chosen:
        raise SpecError("lowrank found no plain Linear/Conv2d layer to factor")
    return chosen


def _given_ranks(model: nn.Module, config: LowRankConfig, layers: list[str]
                 ) -> dict[str, list[int]]:
    ranks: dict[str, list[int]] = {}
    unknown = sorted(set(config.target["ranks"]) - set(layers))
    if unknown:
        raise SpecError(f"target.ranks names layers that are not factored: {unknown}; "
                        f"factored layers: {', '.join(layers)}")
    for name, given in config.target["ranks"].items():
        full = full_ranks(get_layer(model, name), config.blocking)
        wanted = [given] * len(full) if isinstance(given, int) else list(given)
        if len(wanted) != len(full):
            raise SpecError(f"target.ranks[{name!r}] has {len(wanted)} ranks; layer {name} has "
                            f"{len(full)} block(s) with blocking {config.blocking!r}")
        too_big = [(w, f) for w, f in zip(wanted, full, strict=True) if w > f]
        if too_big:
            raise SpecError(f"target.ranks[{name!r}]: rank {too_big[0][0]} exceeds the block's "
                            f"full rank {too_big[0][1]} (full ranks: {full})")
        ranks[name] = wanted
    return ranks


RATIO_KINDS = ("param_ratio", "mac_ratio")
TARGET_KINDS = (*RATIO_KINDS, "ranks", *BUDGET_KINDS)


def _probe_layer(layer: nn.Module, blocking: str, ranks: list[int], fill: bool) -> LowRankLayer:
    """The factored layer's structure without its SVD (entries 0, or 1 with `fill`)."""
    new = LowRankLayer(layer, blocking, ranks)
    if fill:
        with torch.no_grad():
            for prm in new.blocks.parameters():
                prm.fill_(1.0)
    return new


def fit_ranks(model: nn.Module, layers: list[str], blocking: str,
              scores: dict[str, list[torch.Tensor]], kind: str, budget: float,
              input_shape: list[int], masks: dict[str, torch.Tensor] | None = None
              ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Per-block ranks of `layers` so the whole model's `kind` cost (`core.budget.model_cost`;
    `nonzero_params` as trained, with the pruning `masks` of the other layers) lands at or just
    below `budget`; returns (ranks, the `Fit.summary`-shaped budget dict with the value
    measured on the probe: the real factors count the same, or less for `nonzero_params`).
    See the module doc; SpecError when even rank 1 everywhere is over."""
    if kind not in BUDGET_KINDS:
        raise SpecError(f"unknown budget kind {kind!r}; one of {', '.join(BUDGET_KINDS)}")
    shapes = {n: block_shapes(get_layer(model, n), blocking) for n in layers}
    weights = layer_positions(model, layers, input_shape) if kind == "macs" else None
    fill = kind == "nonzero_params"
    work = as_trained(model, masks) if fill else copy.deepcopy(model)
    originals = {n: get_layer(work, n) for n in layers}  # a probe copies its bias (as trained)

    def measure(ranks: dict[str, list[int]]) -> int:
        evaluations[0] += 1
        for name in layers:
            set_layer(work, name, _probe_layer(originals[name], blocking, ranks[name], fill))
        return model_cost(work, kind, input_shape)

    def build(ratio: float) -> dict[str, list[int]]:
        ranks = select_ranks(scores, shapes, ratio, weights)
        measured[0] = measure(ranks)
        return ranks

    measured, evaluations = [0], [0]
    smallest = measure({n: [1] * len(shapes[n]) for n in layers})
    if smallest > budget:
        raise BelowMinimum("lowrank", kind, budget, smallest,
                           f"every block of {', '.join(layers)} at rank 1", "factor more layers")
    fit = _fit_to_budget(build, lambda _ranks: measured[0], budget, 1e-12, 1.0,
                         what=f"the model's {kind} after lowrank", tol=0.01)
    ranks = {n: list(r) for n, r in fit.built.items()}
    # fill-up: removed vectors back, best score first, while their exact cost fits
    w = weights or {}
    slack = budget - fit.cost
    heap = [(-float(scores[n][b][ranks[n][b]]), i, n, b)
            for i, (n, b) in enumerate((n, b) for n in layers for b in range(len(ranks[n])))
            if ranks[n][b] < len(scores[n][b])]
    heapq.heapify(heap)
    while heap:
        _, i, name, b = heapq.heappop(heap)
        p, q = shapes[name][b]
        r = ranks[name][b]
        extra = w.get(name, 1) * (block_params(p, q, r + 1) - block_params(p, q, r))
        if extra > slack:
            continue  # this block's next vector does not fit (nor, then, its later ones)
        slack -= extra
        ranks[name][b] = r + 1
        if r + 1 < len(scores[name][b]):
            heapq.heappush(heap, (-float(scores[name][b][r + 1]), i, name, b))
    value, knob = fit.cost, fit.knob
    if ranks != fit.built:
        value = measure(ranks)
        if value > budget:  # not expected: the deltas are exact; keep the bisection's result
            ranks, value = {n: list(r) for n, r in fit.built.items()}, fit.cost
    return ranks, {"kind": kind, "goal": budget, "value": value, "knob": knob,
                   "fraction": value / budget, "evaluations": evaluations[0]}


def lowrank_plan(model: nn.Module, config: LowRankConfig, *, input_shape: list[int],
                 inputs: torch.Tensor | None = None, report: dict[str, Any] | None = None,
                 masks: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """The `lowrank_transform` plan `{layer: {"blocking", "ranks"}}` for `config`
    (`LowRankConfig.from_dict(step.model_dump())`): given ranks, or scores (`inputs`: the
    calibration images of the output_* scores) selected to the param or MAC ratio, or fitted
    to an absolute whole-model budget (`fit_ranks`, with the job's pruning `masks`; `report`, a
    dict, then gets its summary under "budget")."""
    layers = lowrank_layers(model, config.layers)
    target = config.target
    if len(target) != 1 or next(iter(target)) not in TARGET_KINDS:
        raise SpecError(f"target must be exactly one of {', '.join(TARGET_KINDS)}; got "
                        f"{target!r}")
    kind, value = next(iter(target.items()))
    if kind == "ranks":
        ranks = _given_ranks(model, config, layers)
    else:
        scores = layer_scores(model, layers, config.blocking, config.score, inputs)
        if kind in BUDGET_KINDS:
            ranks, summary = fit_ranks(model, layers, config.blocking, scores, kind,
                                       float(value), input_shape, masks)
            if report is not None:
                report["budget"] = summary
        else:
            shapes = {n: block_shapes(get_layer(model, n), config.blocking) for n in layers}
            weights = (layer_positions(model, layers, input_shape) if kind == "mac_ratio"
                       else None)
            ranks = select_ranks(scores, shapes, float(value), weights)
    return {name: {"blocking": config.blocking, "ranks": r} for name, r in ranks.items()}


__all__ = ["ALDS_GROUPS", "BLOCKINGS", "SCORES", "Block", "block_layout", "block_matrices",
           "block_params", "block_shapes", "block_svds", "factorize_layer", "fit_ranks",
           "full_ranks",
           "is_factored", "layer_matrix", "layer_positions", "layer_scores", "lowrank_applies",
           "lowrank_layers", "lowrank_plan", "lowrank_transform", "lowrank_untouched",
           "LowRankConfig", "LowRankLayer", "output_scores", "output_scores_naive",
           "replay_lowrank", "select_ranks"]
