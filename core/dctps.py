"""DCT plus Sparse (DCTpS) layers (seed 002; ALGORITHMS.md §5): the pure-torch core.

Every Linear/Conv2d weight becomes `W = alpha * D + S`:
* `D` is a fixed DCT-II matrix (seed 002 App. B), a non-persistent buffer rebuilt from the shape
  (never stored). `dct_matrix(q)` is orthonormal with the basis vectors as rows,
  `C[k, i] = sqrt((1 if k == 0 else 2) / q) * cos(pi * (2i + 1) * k / (2q))`, so `C @ x` is the
  DCT of `x` (scipy `dct(x, norm="ortho")`). Linear `(m, n)`: `q = max(m, n)`, `D = C[:m, :n]`
  (surplus right-most columns or bottom-most rows removed: a DCT of the zero-padded input, or a
  truncated DCT output). Conv2d with `m` filters of `kh x kw x n`: `P = kh*kw*n`,
  `q = max(P, m)`, the paper's `P x m` matrix is `C.T[:P, :m]`, reshaped like the authors' code
  (github.com/IlanPrice/DCTpS, `DCTconv2d`): filter `o` is `C[o, (i*kw + j)*n + c]` at
  `[o, c, i, j]`, i.e. a patch is flattened channel-last `(i, j, c)` and the conv outputs the
  first `m` DCT coefficients of every (zero-padded if `P < m`) patch.
* `S` has a fixed random support: a trainable 1-D `values` (nnz,) plus a persistent int64
  `indices` buffer (sorted, unique flat positions into the weight). S is zero-initialised (the
  authors' code runs DCTpS with `--init zeros`: "the sparse trainable matrices in DCTpS networks
  are zero-initialized"), so a fresh DCTpS layer computes `alpha * D`.
* `alpha` is a trainable scalar (init 1.0, seed 002 App. A.4) or a fixed buffer.

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
import torch.nn.functional as F
from torch import nn

from core.configs import DCTpSConfig
from core.edits import register_edit
from core.errors import CheckpointError, SpecError
from core.layers import conv_macs, linear_macs
from core.surgery import get_layer, prunable_layers, set_layer, with_edit

ALLOCATIONS = ("epl", "epf", "uniform", "erk")


# ---- the fixed DCT part -----------------------------------------------------------------

def _dct_block(rows: int, cols: int, q: int, dtype: torch.dtype) -> torch.Tensor:
    """`C_q[:rows, :cols]` without forming the q x q matrix (float64 maths, exact angles)."""
    k = torch.arange(rows, dtype=torch.int64)[:, None]
    i = torch.arange(cols, dtype=torch.int64)[None, :]
    phase = ((2 * i + 1) * k) % (4 * q)  # cos has period 4q in these units
    block = torch.cos(phase.to(torch.float64) * (math.pi / (2 * q)))
    scale = torch.full((rows, 1), math.sqrt(2.0 / q), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / q)
    return (block * scale).to(dtype)


def dct_matrix(q: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal q x q DCT-II matrix, basis vectors as rows (see module doc)."""
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise SpecError(f"dct_matrix needs a positive int size, got {q!r}")
    return _dct_block(q, q, q, dtype)


def _weight_shape(layer_or_shape: nn.Module | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    if isinstance(layer_or_shape, DCTpSLayer):
        return layer_or_shape.weight_shape
    if isinstance(layer_or_shape, (nn.Linear, nn.Conv2d)):
        return tuple(layer_or_shape.weight.shape)
    shape = tuple(int(s) for s in layer_or_shape)  # type: ignore[union-attr]
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise SpecError(f"a DCT weight needs a (out, in) or (out, in/groups, kh, kw) shape of "
                        f"positive sizes, got {list(shape)}")
    return shape


def dct_weight(layer_or_shape: nn.Module | tuple[int, ...] | list[int],
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The fixed D shaped like the layer's weight (seed 002 App. B; see module doc)."""
    shape = _weight_shape(layer_or_shape)
    m = shape[0]
    if len(shape) == 2:
        return _dct_block(m, shape[1], max(shape), dtype)  # (m, n)
    _, n, kh, kw = shape
    patch = kh * kw * n
    d = _dct_block(m, patch, max(patch, m), dtype)  # (m, P), P in (i, j, c) order
    return d.reshape(m, kh, kw, n).permute(0, 3, 1, 2).contiguous()  # (m, n, kh, kw)


# ---- layers -----------------------------------------------------------------------------

def _check_alpha(alpha: Any) -> str | float:
    if alpha == "trainable":
        return "trainable"
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha):
        return float(alpha)
    raise SpecError(f"alpha must be 'trainable' or a finite number, got {alpha!r}")


def _check_indices(indices: torch.Tensor, nnz: int, numel: int) -> str | None:
    """Why `indices` is not a valid support (None when it is)."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        return f"indices must be integers, got {indices.dtype}"
    if indices.ndim != 1 or indices.numel() != nnz:
        return f"indices must be 1-D with {nnz} entries, got shape {list(indices.shape)}"
    if nnz and (int(indices[0]) < 0 or int(indices[-1]) >= numel):
        return f"indices must lie in [0, {numel})"
    if nnz > 1 and not bool((indices[1:] > indices[:-1]).all()):
        return "indices must be sorted and unique"
    return None


class DCTpSLayer(nn.Module):
    """`weight = alpha * D + S` for the weight shape of a Linear or Conv2d (see module doc).

    Built from a template layer: its bias is copied, its weight discarded. `values` start at
    zero and `indices` at the placeholder `0..nnz-1` until `set_support` (or a checkpoint)."""

    def __init__(self, layer: nn.Module, nnz: int, alpha: str | float = "trainable"):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise SpecError(f"dctps: a {type(layer).__name__} cannot be made DCTpS; only "
                            "nn.Linear and nn.Conv2d")
        w = layer.weight
        self.weight_shape = tuple(int(s) for s in w.shape)
        numel = math.prod(self.weight_shape)
        if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= numel:
            raise SpecError(f"dctps: nnz must be an int in [0, {numel}] for weight shape "
                            f"{list(self.weight_shape)}, got {nnz!r}")
        kw: dict[str, Any] = {"dtype": w.dtype, "device": w.device}
        self.register_buffer("D", dct_weight(self.weight_shape).to(**kw), persistent=False)
        self.values = nn.Parameter(torch.zeros(nnz, **kw))  # S zero-initialised (seed 002 code)
        self.register_buffer("indices", torch.arange(nnz, dtype=torch.int64, device=w.device))
        self.alpha_mode = _check_alpha(alpha)
        one = torch.tensor(1.0 if self.alpha_mode == "trainable" else self.alpha_mode, **kw)
        if self.alpha_mode == "trainable":
            self.alpha = nn.Parameter(one)
        else:
            self.register_buffer("alpha", one)
        self.bias = (nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None
                     else None)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def set_support(self, indices: torch.Tensor) -> None:
        """Fix the support (sorted unique flat positions); values are reset to zero."""
        indices = torch.as_tensor(indices)
        problem = _check_indices(indices, self.nnz, math.prod(self.weight_shape))
        if problem:
            raise SpecError(f"dctps: {problem}")
        with torch.no_grad():
            self.indices.copy_(indices)
            self.values.zero_()

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense tensor shaped like the weight."""
        flat = torch.zeros(self.D.numel(), dtype=self.values.dtype, device=self.values.device)
        return flat.index_add(0, self.indices, self.values).view(self.weight_shape)

    def weight_matrix(self) -> torch.Tensor:
        """The effective weight `alpha * D + S` (differentiable w.r.t. values and alpha)."""
        return (self.alpha * self.D).reshape(-1).index_add(0, self.indices, self.values) \
            .view(self.weight_shape)

    # ---- core.layers.Layer (counted as the dense layer it computes) ----
    def weight_params(self) -> int:
        return self.nnz

    def frozen_tensors(self) -> list[torch.Tensor]:
        return []

    def dense_weight(self) -> torch.Tensor:
        return self.weight_matrix()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        before = self.D.dtype
        super()._apply(fn, recurse)
        if self.D.dtype != before and self.D.is_floating_point():  # rebuild D at full precision
            self.D = dct_weight(self.weight_shape).to(dtype=self.D.dtype, device=self.D.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        problem = _check_indices(self.indices, self.nnz, math.prod(self.weight_shape))
        if problem:
            raise CheckpointError(f"dctps layer {prefix.rstrip('.')!r}: {problem}")


class DCTpSLinear(DCTpSLayer):
    """DCTpS replacement of an nn.Linear (`weight_shape = (out_features, in_features)`)."""

    def __init__(self, layer: nn.Linear, nnz: int, alpha: str | float = "trainable"):
        super().__init__(layer, nnz, alpha)
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)

    kind = "linear"

    @property
    def in_dim(self) -> int:
        return self.in_features

    @property
    def out_dim(self) -> int:
        return self.out_features

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        return linear_macs(output, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, alpha={self.alpha_mode!r}")


class DCTpSConv2d(DCTpSLayer):
    """DCTpS replacement of an nn.Conv2d (same stride/padding/dilation/groups/padding_mode)."""

    def __init__(self, layer: nn.Conv2d, nnz: int, alpha: str | float = "trainable"):
        super().__init__(layer, nnz, alpha)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = tuple(layer.kernel_size), layer.stride
        self.padding, self.dilation, self.groups = layer.padding, layer.dilation, layer.groups
        self.padding_mode = layer.padding_mode
        self._pad = layer._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_matrix()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    kind = "conv"

    @property
    def in_dim(self) -> int:
        return self.in_channels

    @property
    def out_dim(self) -> int:
        return self.out_channels

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        return conv_macs(output, self.in_channels // self.groups, self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, nnz={self.nnz}, alpha={self.alpha_mode!r}")


def dctps_layer(layer: nn.Module, nnz: int, alpha: str | float = "trainable") -> DCTpSLayer:
    """The DCTpS layer (placeholder support, S = 0) replacing `layer`."""
    if isinstance(layer, nn.Conv2d):
        return DCTpSConv2d(layer, nnz, alpha)
    if isinstance(layer, nn.Linear):
        return DCTpSLinear(layer, nnz, alpha)
    raise SpecError(f"dctps: a {type(layer).__name__} cannot be made DCTpS; only nn.Linear "
                    "and nn.Conv2d")


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
    return dict(zip(dims, counts))


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
        out[name] = (spec["nnz"], _check_alpha(spec.get("alpha", "trainable")))
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
    alpha = _check_alpha(alpha)
    if layers is None:
        names = [n for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    else:
        names = list(dict.fromkeys(layers))
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
    every plain Linear/Conv2d."""
    layers = None if config.layers == "all" else list(config.layers)
    return dctps_transform(model, config.density, config.allocation, config.alpha, layers,
                           generator)


def fixed_dct_params(model: nn.Module) -> int:
    """Entries of the fixed DCT matrices D of the model's DCTpS layers (not in
    `core.metrics.param_counts`: D is rebuilt from the layer shape, never stored nor trained)."""
    return sum(m.D.numel() for m in model.modules() if isinstance(m, DCTpSLayer))


__all__ = ["ALLOCATIONS", "allocate", "dct_matrix", "dct_weight", "dctps_apply", "dctps_layer",
           "dctps_transform", "DCTpSConfig", "DCTpSConv2d", "DCTpSLayer", "DCTpSLinear",
           "fixed_dct_params", "random_support", "replay_dctps"]
