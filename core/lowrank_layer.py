"""Low-rank layers (seed 003; ALGORITHMS.md §4): block layouts, SVDs and `LowRankLayer`.

The matrix view, blockings and factor pairs are described in `core.lowrank` (the method's
entry point); this module holds the layer, its layout and the structural replay of the
`{"op": "lowrank", "layer", "blocking", "ranks"}` edit (registered in `core.edits`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.applies import conv_kind, register_applies
from core.edits import register_edit
from core.errors import SpecError
from core.surgery import get_layer, set_layer

BLOCKINGS = ("none", "alds", "square")
ALDS_GROUPS = 4

Block = tuple[int, int, int, int]  # (row0, row1, chan0, chan1)


@register_applies("lowrank")
def lowrank_applies(name: str, module: nn.Module) -> str | None:
    """Why `module` cannot be factored (None: it can): a Linear or a dense conv is one matrix;
    the blocks of a grouped conv read different input channels."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__}: lowrank factorizes nn.Linear/nn.Conv2d layers only"
    if module.groups != 1:
        return f"{conv_kind(module)}: lowrank factorizes dense convs only"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}: lowrank needs explicit int/tuple padding"
    return None


def _check_layer(name: str, layer: nn.Module) -> None:
    reason = lowrank_applies(name, layer)
    if reason is not None:
        raise SpecError(f"lowrank: layer {name!r} cannot be factored: {reason}")


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
        for r, f in zip(ranks, fulls, strict=True):
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
        for (r0, r1, c0, c1), r in zip(layout, ranks, strict=True):
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
                h = x if (c0, c1) == (0, self.in_channels) else (
                    x[:, c0:c1] if self.conv else x[..., c0:c1])
                if isinstance(block, nn.Sequential):
                    h, block = block[0](h), block[1]
                bias = self.bias[r0:r1] if self.bias is not None and j == 0 else None
                part = self._last(block, h, bias)
                y = part if y is None else y + part
            assert y is not None
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1 if self.conv else -1)

    # ---- core.layers.Layer ----
    @property
    def kind(self) -> str:
        return "conv" if self.conv else "linear"

    @property
    def in_dim(self) -> int:
        return self.in_channels

    @property
    def out_dim(self) -> int:
        return self.out_channels

    def weight_params(self) -> int:
        return sum(p.numel() for p in self.blocks.parameters())

    def frozen_tensors(self) -> list[torch.Tensor]:
        return []

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        """Every factor and dense block: the first factor runs at the output's positions (same
        stride/padding as the layer), the second is 1x1, so each weight entry is used once per
        output position."""
        positions = output.numel() // self.out_channels  # N * H' * W' (conv) or N (flat)
        return positions * self.weight_params()

    def dense_weight(self) -> torch.Tensor:
        """The rank-truncated weight, shaped like the original Linear/Conv2d weight."""
        k = int(self.kernel_size[0] * self.kernel_size[1]) if self.conv else 1
        ref = next(self.blocks.parameters())
        w = torch.zeros(self.out_channels, self.in_channels * k, dtype=ref.dtype,
                        device=ref.device)  # (out, in*kh*kw)
        for (r0, r1, c0, c1), block in zip(self.layout, self.blocks, strict=True):
            if isinstance(block, nn.Sequential):
                first, second = block[0].weight, block[1].weight
                part = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
            else:
                part = block.weight.reshape(block.weight.shape[0], -1)
            w[r0:r1, c0 * k:c1 * k] = part
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size) \
            if self.conv else w

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, blocking={self.blocking!r}, "
                f"ranks={self.ranks}")


def factorize_layer(layer: nn.Module, blocking: str, ranks: list[int]) -> LowRankLayer:
    """The `LowRankLayer` keeping the top-`ranks[i]` singular triplets of every block."""
    new = LowRankLayer(layer, blocking, ranks)
    dtype = layer.weight.dtype
    with torch.no_grad():
        for (u, s, vh), r, block in zip(block_svds(layer, blocking), ranks, new.blocks,
                                        strict=True):
            left, right = u[:, :r] * s[:r], vh[:r]  # (p, r), (r, q)
            if isinstance(block, nn.Sequential):
                first, second = block[0], block[1]
                first.weight.copy_(right.reshape(first.weight.shape).to(dtype))
                second.weight.copy_(left.reshape(second.weight.shape).to(dtype))
            else:
                block.weight.copy_((left @ right).reshape(block.weight.shape).to(dtype))
    return new


def block_shapes(layer: nn.Module, blocking: str) -> list[tuple[int, int]]:
    """`(p, q)` matrix shape of every block, in layout order."""
    k = _unit(layer)
    return [(r1 - r0, (c1 - c0) * k) for r0, r1, c0, c1 in block_layout(layer, blocking)]


@register_edit("lowrank")
def replay_lowrank(model: nn.Module, edit: dict[str, Any]) -> None:
    """Structural replay of `{"op": "lowrank", "layer", "blocking", "ranks"}` (shapes only)."""
    name, blocking, ranks = edit.get("layer"), edit.get("blocking"), edit.get("ranks")
    if not isinstance(name, str) or blocking not in BLOCKINGS or not isinstance(ranks, list):
        raise SpecError(f"lowrank edit needs a string 'layer', a 'blocking' in {BLOCKINGS} and "
                        f"a list 'ranks', got {edit}")
    layer = get_layer(model, name)
    _check_layer(name, layer)
    set_layer(model, name, LowRankLayer(layer, blocking, ranks))
