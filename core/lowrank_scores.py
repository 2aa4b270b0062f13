"""Low-rank scores on one global scale and the greedy global rank selection (seed 003 §3.3).

`layer_scores` rates every singular vector (block b, index i) of the chosen layers; `select_ranks`
removes the lowest-scoring vectors to a parameter or MAC budget (`layer_positions`). See
`core.lowrank` for the whole method.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch
from torch import nn

from core.errors import SpecError
from core.lowrank_layer import (
    Block,
    _check_layer,
    _unit,
    block_layout,
    block_params,
    block_svds,
)
from core.surgery import get_layer
from core.tail import tail_runner

SCORES = ("magnitude", "relative_error", "output_perturbation", "output_variance")


def _batches(inputs: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    return [inputs] if isinstance(inputs, torch.Tensor) else inputs


def _block_deltas(layer: nn.Module, a: torch.Tensor, block: Block, u: torch.Tensor,
                  s: torch.Tensor, vh: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Change of the layer output when each of G singular vectors is removed: (G, *out shape).

    `u (p, G)`, `s (G,)`, `vh (G, q)` of one block; `a` is the layer's captured input (reused).
    Removing `s_i u_i v_i^T` from the block subtracts `s_i u_i (v_i^T a_slice)` on its rows.
    """
    r0, r1, c0, c1 = block
    g = s.numel()
    left = torch.zeros(g, out_dim, dtype=a.dtype, device=a.device)
    left[:, r0:r1] = (u * s).T.to(a.dtype)  # (G, out): s_i u_i placed on the block's rows
    if isinstance(layer, nn.Conv2d):
        kernels = vh.reshape(g, c1 - c0, *layer.kernel_size).to(a.dtype)
        proj = layer._conv_forward(a[:, c0:c1], kernels, None)  # (N, G, H', W')
        return -(proj.transpose(0, 1)[:, :, None] * left[:, None, :, None, None])
    proj = a[..., c0:c1] @ vh.T.to(a.dtype)  # (N, ..., G)
    return -(proj[..., None] * left).movedim(-2, 0)  # (G, N, ..., out)


def _finish(sq: torch.Tensor, total: torch.Tensor, totsq: torch.Tensor, n: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector output perturbation and output variance from sums over `n` samples."""
    mean = total / n
    return sq / n, (totsq / n - mean.pow(2)).clamp(min=0).sum(-1)


def output_scores(model: nn.Module, name: str, blocking: str,
                  inputs: torch.Tensor | Iterable[torch.Tensor], *, chunk: int = 64,
                  max_elements: int = 1 << 22) -> dict[str, list[torch.Tensor]]:
    """Batched output perturbation and output variance of every singular vector of `name`.

    For each block b and index i: `output_perturbation = E_x ||y(x) - y_{-(b,i)}(x)||^2` and
    `output_variance = sum_k Var_x[(y - y_{-(b,i)})_k]` (population variance) over the
    calibration `inputs` (one tensor or an iterable of batches). Per batch the network runs once
    (`core.tail.TailRunner`), keeping the layer's input `a` and output `z`; removing vector i
    changes the layer output by `delta_i = -s_i u_i (v_i^T a)` (no weight is touched), and up to
    `chunk` such `z + delta_i` (and at most `max_elements` values in all) are stacked and
    pushed through the part of the network *after* the layer only. Untraceable models fall back
    to full forwards of the repeated batch.
    Runs in eval mode, no_grad. Returns float64 tensors per block (layout order), indexed like
    the block's singular values.
    """
    layer = get_layer(model, name)
    _check_layer(name, layer)
    layout, svds = block_layout(layer, blocking), block_svds(layer, blocking)
    out_dim = int(layer.weight.shape[0])
    sums: list[list[torch.Tensor]] = []  # per block: [sum d^2, sum d, sum d^2 per output]
    seen = 0
    was_training = model.training
    model.eval()
    try:
        runner = tail_runner(model, name, layer)
        with torch.no_grad():
            for x in _batches(inputs):
                y, a, z = runner.prime(x)
                y_flat = y.reshape(y.shape[0], -1).to(torch.float64)
                # stack at most `max_elements` layer-output values: big stacks thrash the cache
                step = max(1, min(chunk, max_elements // max(1, z.numel())))
                if not sums:
                    n_out = y_flat.shape[1]
                    sums = [[torch.zeros(s.numel(), dtype=torch.float64, device=y.device),
                             torch.zeros(s.numel(), n_out, dtype=torch.float64, device=y.device),
                             torch.zeros(s.numel(), n_out, dtype=torch.float64, device=y.device)]
                            for _, s, _ in svds]
                for (u, s, vh), block, acc in zip(svds, layout, sums, strict=True):
                    for start in range(0, s.numel(), step):
                        sl = slice(start, min(start + step, s.numel()))
                        delta = _block_deltas(layer, a, block, u[:, sl], s[sl], vh[sl], out_dim)
                        y_pert = runner.tail(z[None] + delta)  # (G, N, ...)
                        d = y_flat[None] - y_pert.reshape(delta.shape[0], *y_flat.shape)
                        acc[0][sl] += d.pow(2).sum(dim=(1, 2))
                        acc[1][sl] += d.sum(1)
                        acc[2][sl] += d.pow(2).sum(1)
                seen += x.shape[0]
    finally:
        model.train(was_training)
    parts = [_finish(sq, total, totsq, seen) for sq, total, totsq in sums]
    pert = [p.cpu() for p, _ in parts]
    var = [v.cpu() for _, v in parts]
    return {"output_perturbation": pert, "output_variance": var}


def output_scores_naive(model: nn.Module, name: str, blocking: str,
                        inputs: torch.Tensor | Iterable[torch.Tensor]
                        ) -> dict[str, list[torch.Tensor]]:
    """Reference for `output_scores`: one forward per removed singular vector, done by
    subtracting `s_i u_i v_i^T` from the layer's weight."""
    layer = get_layer(model, name)
    _check_layer(name, layer)
    k = _unit(layer)
    batches = list(_batches(inputs))
    was_training = model.training
    model.eval()
    pert: list[torch.Tensor] = []
    var: list[torch.Tensor] = []
    original = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            refs = [model(x).reshape(x.shape[0], -1) for x in batches]
            for (r0, r1, c0, c1), (u, s, vh) in zip(block_layout(layer, blocking),
                                                  block_svds(layer, blocking), strict=True):
                bp, bv = [], []
                for i in range(s.numel()):
                    w = original.to(torch.float64).reshape(original.shape[0], -1).clone()
                    w[r0:r1, c0 * k:c1 * k] -= s[i] * torch.outer(u[:, i], vh[i])
                    layer.weight.copy_(w.reshape(original.shape).to(original.dtype))
                    diffs = torch.cat([(ref - model(x).reshape(x.shape[0], -1))
                                       for ref, x in zip(refs, batches, strict=True)])
                    diffs = diffs.to(torch.float64)
                    bp.append(diffs.pow(2).sum(1).mean())
                    bv.append(diffs.var(0, unbiased=False).sum())
                pert.append(torch.stack(bp))
                var.append(torch.stack(bv))
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
        model.train(was_training)
    return {"output_perturbation": pert, "output_variance": var}


def layer_scores(model: nn.Module, layers: list[str], blocking: str, score: str,
                 inputs: torch.Tensor | Iterable[torch.Tensor] | None = None, *,
                 chunk: int = 64) -> dict[str, list[torch.Tensor]]:
    """Scores (float64, per layer, per block in layout order, per singular vector) of `score`.

    magnitude: `s_i`; relative_error: `s_i^2 / sum_j s_j^2` within the block; output_* need
    calibration `inputs` (see `output_scores`). All on one scale across layers.
    """
    if score not in SCORES:
        raise SpecError(f"unknown low-rank score {score!r}; valid: {', '.join(SCORES)}")
    if score.startswith("output_") and inputs is None:
        raise SpecError(f"score {score!r} needs calibration inputs")
    out: dict[str, list[torch.Tensor]] = {}
    for name in layers:
        if score.startswith("output_"):
            out[name] = output_scores(model, name, blocking, inputs, chunk=chunk)[score]
            continue
        svals = [s for _, s, _ in block_svds(get_layer(model, name), blocking)]
        out[name] = svals if score == "magnitude" else [
            s.pow(2) / s.pow(2).sum().clamp(min=torch.finfo(s.dtype).tiny) for s in svals]
    return out


def layer_positions(model: nn.Module, layers: list[str], input_shape: Iterable[int]
                    ) -> dict[str, int]:
    """Output positions per sample of each layer (H'*W' for a Conv2d, the leading dims' product
    for a Linear: 1 on flat inputs), from one forward of a zero sample. A block's MACs per
    sample are then `positions * (its weight params)`, dense or factored alike."""
    seen: dict[str, int] = {}
    handles = [get_layer(model, n).register_forward_hook(
        lambda m, _i, out, n=n: seen.__setitem__(n, out[0].numel() // int(m.weight.shape[0])))
        for n in layers]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: seen[n] for n in layers}


def select_ranks(scores: dict[str, list[torch.Tensor]],
                 shapes: dict[str, list[tuple[int, int]]], ratio: float,
                 weights: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Greedy global selection of per-block ranks to a cost budget.

    Cost counted as `sum_b w_l min(r_b (p_b + q_b), p_b q_b)` over all blocks of all layers l
    (the real cost: a block stays dense where factoring would not save parameters, see
    `block_params`); target `ratio * sum_b w_l p_b q_b`. Removing a vector from a block still
    above the break-even rank saves nothing yet, so the budget is not over-shot. With
    `weights=None` (w = 1) the cost is the parameter count;
    with `weights = layer_positions(...)` it is the MACs per sample. Truncation keeps the top
    singular vectors, so only a block's current last kept vector can be removed: repeatedly
    remove, over all blocks, the removable vector with the lowest score (ties: first layer,
    block, in order) until the cost meets the target or every block is at rank 1 (ranks never
    drop below 1).
    """
    if not 0 < ratio <= 1:
        raise SpecError(f"the target ratio must be in (0, 1], got {ratio}")
    w = weights or {}
    keys = [(name, b) for name in scores for b in range(len(scores[name]))]
    ranks = {key: int(scores[key[0]][key[1]].numel()) for key in keys}
    dims = {(name, b): pq for name in shapes for b, pq in enumerate(shapes[name])}

    def cost(key: tuple[str, int], rank: int) -> float:
        p, q = dims[key]
        return w.get(key[0], 1) * block_params(p, q, rank)

    target = ratio * sum(w.get(name, 1) * p * q for name in shapes for p, q in shapes[name])
    total = sum(cost(key, ranks[key]) for key in keys)
    heap = [(float(scores[key[0]][key[1]][ranks[key] - 1]), i, key)
            for i, key in enumerate(keys) if ranks[key] > 1]
    heapq.heapify(heap)
    while total > target and heap:
        _, i, key = heapq.heappop(heap)
        total -= cost(key, ranks[key]) - cost(key, ranks[key] - 1)
        ranks[key] -= 1
        if ranks[key] > 1:
            heapq.heappush(heap, (float(scores[key[0]][key[1]][ranks[key] - 1]), i, key))
    return {name: [ranks[(name, b)] for b in range(len(scores[name]))] for name in scores}
