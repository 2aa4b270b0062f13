"""DCTpS layers (seed 002; ALGORITHMS.md §5): `DCTpSLinear` and `DCTpSConv2d`.

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
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import CheckpointError, SpecError
from core.layers import ConvDims, LinearDims, conv_macs, linear_macs

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

def check_alpha(alpha: Any) -> str | float:
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

    # buffers and parameters set in __init__ (torch types a module attribute as Tensor | Module)
    D: torch.Tensor
    indices: torch.Tensor
    alpha: torch.Tensor
    bias: torch.Tensor | None

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
        self.alpha_mode = check_alpha(alpha)
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


class DCTpSLinear(LinearDims, DCTpSLayer):
    """DCTpS replacement of an nn.Linear (`weight_shape = (out_features, in_features)`)."""

    in_features: int
    out_features: int

    def __init__(self, layer: nn.Linear, nnz: int, alpha: str | float = "trainable"):
        super().__init__(layer, nnz, alpha)
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        return linear_macs(output, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={self.nnz}, alpha={self.alpha_mode!r}")


class DCTpSConv2d(ConvDims, DCTpSLayer):
    """DCTpS replacement of an nn.Conv2d (same stride/padding/dilation/groups/padding_mode)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: str | tuple[int, int]
    dilation: tuple[int, int]

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
