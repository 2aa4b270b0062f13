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
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from core.configs import LowRankConfig
from core.errors import SpecError
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


def lowrank_plan(model: nn.Module, config: LowRankConfig, *, input_shape: list[int],
                 inputs: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
    """The `lowrank_transform` plan `{layer: {"blocking", "ranks"}}` for `config`
    (`LowRankConfig.from_dict(step.model_dump())`): given ranks, or scores (`inputs`: the
    calibration images of the output_* scores) selected to the param or MAC ratio."""
    layers = lowrank_layers(model, config.layers)
    target = config.target
    if len(target) != 1 or next(iter(target)) not in ("param_ratio", "mac_ratio", "ranks"):
        raise SpecError("target must be exactly one of param_ratio, mac_ratio, ranks; got "
                        f"{target!r}")
    if "ranks" in target:
        ranks = _given_ranks(model, config, layers)
    else:
        scores = layer_scores(model, layers, config.blocking, config.score, inputs)
        shapes = {n: block_shapes(get_layer(model, n), config.blocking) for n in layers}
        weights = (layer_positions(model, layers, input_shape) if "mac_ratio" in target
                   else None)
        ranks = select_ranks(scores, shapes, float(next(iter(target.values()))), weights)
    return {name: {"blocking": config.blocking, "ranks": r} for name, r in ranks.items()}


__all__ = ["ALDS_GROUPS", "BLOCKINGS", "SCORES", "Block", "block_layout", "block_matrices",
           "block_params", "block_shapes", "block_svds", "factorize_layer", "full_ranks",
           "is_factored", "layer_matrix", "layer_positions", "layer_scores", "lowrank_applies",
           "lowrank_layers", "lowrank_plan", "lowrank_transform", "lowrank_untouched",
           "LowRankConfig", "LowRankLayer", "output_scores", "output_scores_naive",
           "replay_lowrank", "select_ranks"]
