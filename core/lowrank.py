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
`lowrank_transform` materialises the chosen ranks.
"""
from __future__ import annotations

import copy
import heapq
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.errors import SpecError

BLOCKINGS = ("none", "alds", "square")
ALDS_GROUPS = 4

Block = tuple[int, int, int, int]  # (row0, row1, chan0, chan1)


def _check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise SpecError(f"lowrank: layer {name!r} is a grouped conv (groups={layer.groups}); "
                            "only groups=1 is supported")
        if isinstance(layer.padding, str):
            raise SpecError(f"lowrank: layer {name!r} uses padding={layer.padding!r}; "
                            "only explicit int/tuple padding is supported")
    elif not isinstance(layer, nn.Linear):
        raise SpecError(f"lowrank: layer {name!r} is a {type(layer).__name__}; only nn.Linear "
                        "and nn.Conv2d can be factored")


def _unit(layer: nn.Module) -> int:
    """Matrix columns per input channel: kh*kw for a conv, 1 for a Linear."""
    return int(layer.kernel_size[0] * layer.kernel_size[1]) if isinstance(layer, nn.Conv2d) else 1


def layer_matrix(layer: nn.Module) -> torch.Tensor:
    """The float64 `(out, in)` / `(C_out, C_in*kh*kw)` matrix view of the layer's weight."""
    _check_layer(type(layer).__name__, layer)
    w = layer.weight.detach().to(torch.float64)
    return w.reshape(w.shape[0], -1)


def _even_splits(total: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def block_layout(layer: nn.Module, blocking: str) -> list[Block]:
    """The blocks `(row0, row1, chan0, chan1)` of `layer` under `blocking` (see module doc)."""
    _check_layer(type(layer).__name__, layer)
    if blocking not in BLOCKINGS:
        raise SpecError(f"unknown blocking {blocking!r}; valid: {', '.join(BLOCKINGS)}")
    n = int(layer.weight.shape[0])
    c_in = int(layer.weight.shape[1])
    k = _unit(layer)
    if blocking == "none":
        return [(0, n, 0, c_in)]
    if blocking == "alds":
        return [(0, n, c0, c1) for c0, c1 in _even_splits(c_in, min(ALDS_GROUPS, c_in))]
    m = c_in * k
    if m <= n:
        return [(r0, r1, 0, c_in) for r0, r1 in _chunks(n, m)]
    return [(0, n, c0, c1) for c0, c1 in _chunks(c_in, max(1, n // k))]


def block_matrices(layer: nn.Module, blocking: str) -> list[torch.Tensor]:
    """The float64 matrix of every block, in layout order."""
    w, k = layer_matrix(layer), _unit(layer)
    return [w[r0:r1, c0 * k:c1 * k] for r0, r1, c0, c1 in block_layout(layer, blocking)]


def block_svds(layer: nn.Module, blocking: str
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`(U, S, Vh)` (float64, thin SVD) of every block, in layout order."""
    return [tuple(torch.linalg.svd(b, full_matrices=False))  # type: ignore[misc]
            for b in block_matrices(layer, blocking)]


def full_ranks(layer: nn.Module, blocking: str) -> list[int]:
    """`min(p, q)` of every block: the largest rank each block can keep."""
    k = _unit(layer)
    return [min(r1 - r0, (c1 - c0) * k) for r0, r1, c0, c1 in block_layout(layer, blocking)]


def is_factored(p: int, q: int, rank: int) -> bool:
    """Whether a `p x q` block kept at `rank` is stored as a factor pair (saves parameters)."""
    return rank * (p + q) < p * q


def block_params(p: int, q: int, rank: int) -> int:
    """Weight parameters a `p x q` block of rank `rank` is stored with."""
    return rank * (p + q) if is_factored(p, q, rank) else p * q


class LowRankLayer(nn.Module):
    """A Linear/Conv2d replaced by per-block factor pairs (or dense blocks); see module doc.

    `blocks[i]` is an `nn.Sequential(first, second)` (factored) or a single bias-free layer
    (dense); `layout[i] = (row0, row1, chan0, chan1)`; `bias` is the original layer's bias.
    """

    def __init__(self, layer: nn.Module, blocking: str, ranks: list[int]):
        super().__init__()
        layout = block_layout(layer, blocking)
        fulls = full_ranks(layer, blocking)
        if len(ranks) != len(layout) or any(isinstance(r, bool) or not isinstance(r, int)
                                            for r in ranks):
            raise SpecError(f"lowrank: {blocking!r} blocking of this layer has {len(layout)} "
                            f"blocks; 'ranks' must be that many ints, got {ranks!r}")
        for r, f in zip(ranks, fulls):
            if not 1 <= r <= f:
                raise SpecError(f"lowrank: every rank must be in [1, block's full rank]; got "
                                f"{ranks} for full ranks {fulls}")
        self.blocking, self.ranks, self.layout = blocking, list(ranks), layout
        self.conv = isinstance(layer, nn.Conv2d)
        self.in_channels, self.out_channels = int(layer.weight.shape[1]), int(layer.weight.shape[0])
        if self.conv:
            self.conv_args = {"stride": layer.stride, "padding": layer.padding,
                              "dilation": layer.dilation, "padding_mode": layer.padding_mode}
            self.kernel_size = tuple(layer.kernel_size)
        k = _unit(layer)
        self.blocks = nn.ModuleList()
        kw: dict[str, Any] = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        for (r0, r1, c0, c1), r in zip(layout, ranks):
            p, c = r1 - r0, c1 - c0
            factored = is_factored(p, c * k, r)
            if self.conv:
                first: nn.Module = nn.Conv2d(c, r if factored else p, self.kernel_size,
                                             bias=False, **self.conv_args, **kw)
                block = nn.Sequential(first, nn.Conv2d(r, p, 1, bias=False, **kw)) \
                    if factored else first
            else:
                first = nn.Linear(c, r if factored else p, bias=False, **kw)
                block = nn.Sequential(first, nn.Linear(r, p, bias=False, **kw)) \
                    if factored else first
            for prm in block.parameters():
                nn.init.zeros_(prm)  # placeholders: values come from factorize or a checkpoint
            self.blocks.append(block)
        self.bias = (nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None
                     else None)

    def _row_groups(self) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """Row ranges in order, each with its blocks `(chan0, chan1, index into blocks)`."""
        groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for i, (r0, r1, c0, c1) in enumerate(self.layout):
            groups.setdefault((r0, r1), []).append((c0, c1, i))
        return [(r0, r1, members) for (r0, r1), members in sorted(groups.items())]

    def _last(self, block: nn.Module, h: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        """Apply the block's last layer with `bias` fused into it (no separate add)."""
        if self.conv:
            return block._conv_forward(h, block.weight, bias)
        return nn.functional.linear(h, block.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one output per row range (the sum of its blocks), the bias fused into the first
        # block's last layer; no concatenation when the rows are not split (every blocking
        # but "square" on a tall matrix)
        outs = []
        for r0, r1, members in self._row_groups():
            y: torch.Tensor | None = None
            for j, (c0, c1, i) in enumerate(members):
                block = self.blocks[i]
                h = x if (c0, c1) == (0, self.in_channels) else x[:, c0:c1]
                if isinstance(block, nn.Sequential):
                    h, block = block[0](h), block[1]
                bias = self.bias[r0:r1] if self.bias is not None and j == 0 else None
                part = self._last(block, h, bias)
                y = part if y is None else y + part
            assert y is not None
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def functional_macs(self, output: torch.Tensor) -> int:
        """MACs (per forward of `output`'s batch) of what `forward` applies functionally: every
        block's last factor, or its dense weight. The first factors are modules, counted by
        `core.metrics.count_macs`'s own hooks."""
        positions = output.numel() // self.out_channels  # N * H' * W' (conv) or N (flat)
        return sum(positions * (b[1] if isinstance(b, nn.Sequential) else b).weight.numel()
                   for b in self.blocks)

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, blocking={self.blocking!r}, "
                f"ranks={self.ranks}")


def factorize_layer(layer: nn.Module, blocking: str, ranks: list[int]) -> LowRankLayer:
    """The `LowRankLayer` keeping the top-`ranks[i]` singular triplets of every block."""
    new = LowRankLayer(layer, blocking, ranks)
    dtype = layer.weight.dtype
    with torch.no_grad():
        for (u, s, vh), r, block in zip(block_svds(layer, blocking), ranks, new.blocks):
            left, right = u[:, :r] * s[:r], vh[:r]  # (p, r), (r, q)
            if isinstance(block, nn.Sequential):
                first, second = block[0], block[1]
                first.weight.copy_(right.reshape(first.weight.shape).to(dtype))
                second.weight.copy_(left.reshape(second.weight.shape).to(dtype))
            else:
                block.weight.copy_((left @ right).reshape(block.weight.shape).to(dtype))
    return new


def replay_lowrank(model: nn.Module, edit: dict[str, Any]) -> None:
    """Structural replay of `{"op": "lowrank", "layer", "blocking", "ranks"}` (shapes only)."""
    from core.models import get_layer, set_layer

    name, blocking, ranks = edit.get("layer"), edit.get("blocking"), edit.get("ranks")
    if not isinstance(name, str) or blocking not in BLOCKINGS or not isinstance(ranks, list):
        raise SpecError(f"lowrank edit needs a string 'layer', a 'blocking' in {BLOCKINGS} and "
                        f"a list 'ranks', got {edit}")
    layer = get_layer(model, name)
    _check_layer(name, layer)
    set_layer(model, name, LowRankLayer(layer, blocking, ranks))


def lowrank_transform(model: nn.Module, plan: dict[str, dict[str, Any]]
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `model` with every `plan[layer] = {"blocking": b, "ranks": [...]}` factored.

    Appends one "lowrank" edit per layer to the copy's `slimline_arch` (so `core.models.save` /
    `load` rebuild it). Report per layer: blocking, ranks, full ranks, weight params before/after.
    """
    from core.models import get_layer, set_layer, with_edit

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
                        "weight_params_after": sum(block_params(p, q, r)
                                                   for (p, q), r in zip(shapes, ranks))}
        new_model.slimline_arch = with_edit(new_model, {"op": "lowrank", "layer": name,
                                                        "blocking": blocking, "ranks": ranks})
    return new_model, report


# ---- scores on one global scale (seed 003 §3.3) and greedy global selection ------------

SCORES = ("magnitude", "relative_error", "output_perturbation", "output_variance")


def block_shapes(layer: nn.Module, blocking: str) -> list[tuple[int, int]]:
    """`(p, q)` matrix shape of every block, in layout order."""
    k = _unit(layer)
    return [(r1 - r0, (c1 - c0) * k) for r0, r1, c0, c1 in block_layout(layer, blocking)]


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
    pushed through the part of the network *after* the layer only. Untraceable models fall back to full forwards of the repeated batch.
    Runs in eval mode, no_grad. Returns float64 tensors per block (layout order), indexed like
    the block's singular values.
    """
    from core.models import get_layer
    from core.tail import tail_runner

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
                    sums = [[torch.zeros(s.numel(), dtype=torch.float64, device=y.device),
                             torch.zeros(s.numel(), y_flat.shape[1], dtype=torch.float64, device=y.device),
                             torch.zeros(s.numel(), y_flat.shape[1], dtype=torch.float64, device=y.device)]
                            for _, s, _ in svds]
                for (u, s, vh), block, acc in zip(svds, layout, sums):
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
    parts = [_finish(*acc, seen) for acc in sums]
    pert = [p.cpu() for p, _ in parts]
    var = [v.cpu() for _, v in parts]
    return {"output_perturbation": pert, "output_variance": var}


def output_scores_naive(model: nn.Module, name: str, blocking: str,
                        inputs: torch.Tensor | Iterable[torch.Tensor]
                        ) -> dict[str, list[torch.Tensor]]:
    """Reference for `output_scores`: one forward per removed singular vector, done by
    subtracting `s_i u_i v_i^T` from the layer's weight."""
    from core.models import get_layer

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
                                                  block_svds(layer, blocking)):
                bp, bv = [], []
                for i in range(s.numel()):
                    w = original.to(torch.float64).reshape(original.shape[0], -1).clone()
                    w[r0:r1, c0 * k:c1 * k] -= s[i] * torch.outer(u[:, i], vh[i])
                    layer.weight.copy_(w.reshape(original.shape).to(original.dtype))
                    diffs = torch.cat([(ref - model(x).reshape(x.shape[0], -1))
                                       for ref, x in zip(refs, batches)]).to(torch.float64)
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
    from core.models import get_layer

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
    from core.models import get_layer

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
    above the break-even rank saves nothing yet, so the budget is not over-shot. With `weights=None` (w = 1) the cost is the parameter count;
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


__all__ = ["BLOCKINGS", "SCORES", "LowRankLayer", "block_layout", "block_matrices",
           "block_params", "block_shapes", "block_svds", "factorize_layer", "full_ranks",
           "is_factored", "layer_matrix", "layer_positions", "layer_scores", "lowrank_transform", "output_scores",
           "output_scores_naive", "replay_lowrank", "select_ranks"]
