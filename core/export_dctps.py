"""DCTpS with D implicit: the DCT computed as ops at run time instead of stored (seed 002).

`alpha * D` applied to an input is `alpha` times the first `m` orthonormal DCT-II coefficients
of the (zero-padded to q) input vector (core.dctps_layer's module doc): Linear on `x`, Conv2d on
every patch flattened in `(i, j, c)` order. The DCT-II of length q is one DFT of length q of the
even/odd reordered input (Makhoul 1980):
`v = [x_0, x_2, ..., x_5, x_3, x_1]`, `X_k = s_k (Re V_k cos(pi k / 2q) + Im V_k sin(pi k / 2q))`
with `s_0 = sqrt(1/q)`, `s_k = sqrt(2/q)`. Only the `m` cos/sin/scale entries (alpha folded in)
are stored. `S` stays sparse at run time too: `values` with int32 `rows` (output) and `cols`
(input or patch entry), applied as `Gather` (the inputs S reads) * values, then summed per output
row as a segment sum: the entries are stored sorted by row, and row r's sum is the difference of
the running sum (`CumSum`) at its last and first entry. No dense S in the file, nor in the graph a
runtime optimises (a dense S built from constants would be folded back at load). A scatter-add
(`ScatterND`/`ScatterElements` with reduction add) is not used: onnxruntime 1.32 runs it on
several threads without atomic adds, so rows with several entries came out wrong at random
(0.02-0.1 of the logits' scale at 2 threads; exact at 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.dctps_layer import DCTpSConv2d, DCTpSLayer, DCTpSLinear


class _ImplicitDCT(nn.Module):
    """Shared part: the DCT coefficients' constants and the sparse S."""

    def __init__(self, layer: DCTpSLayer, q: int, m: int):
        super().__init__()
        self.q, self.m = q, m
        dtype, device = layer.values.dtype, layer.values.device
        k = torch.arange(m, dtype=torch.float64)
        angle = k * (math.pi / (2 * q))
        scale = torch.full((m,), math.sqrt(2.0 / q), dtype=torch.float64)
        scale[0] = math.sqrt(1.0 / q)
        alpha = float(layer.alpha.detach())
        self.register_buffer("cos", (alpha * scale * torch.cos(angle)).to(dtype=dtype,
                                                                         device=device))
        self.register_buffer("sin", (alpha * scale * torch.sin(angle)).to(dtype=dtype,
                                                                         device=device))
        evens = torch.arange(0, q, 2)
        odds = torch.arange(1, q, 2).flip(0)
        self.register_buffer("order", torch.cat([evens, odds]).to(device=device))  # (q,)
        rows, cols = self.sparse_positions(layer)
        order = torch.sort(rows, stable=True).indices  # entries grouped by output row
        counts = torch.bincount(rows, minlength=m)
        ends = torch.cumsum(counts, 0)
        self.values = nn.Parameter(layer.values.detach()[order].clone(), requires_grad=False)
        self.register_buffer("cols", cols[order].to(device=device, dtype=torch.int32))
        # positions in the running sum with a leading 0: row r sums entries starts[r]..ends[r]-1
        self.register_buffer("starts", (ends - counts).to(device=device))
        self.register_buffer("ends", ends.to(device=device))
        self.bias = (nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
                     if layer.bias is not None else None)

    def sparse_positions(self, layer: DCTpSLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows, cols)` of S's entries in the `(m, input vector)` matrix."""
        raise NotImplementedError

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """`(..., n)` input vectors -> `(..., m)`: `alpha D z + S z + b`."""
        n = z.shape[-1]
        padded = F.pad(z, (0, self.q - n)) if n < self.q else z  # (..., q)
        v = torch.index_select(padded, -1, self.order)  # (..., q) Makhoul order
        spectrum = torch.view_as_real(torch.fft.fft(v, dim=-1))[..., :self.m, :]  # (..., m, 2)
        y = spectrum[..., 0] * self.cos + spectrum[..., 1] * self.sin  # (..., m)
        picked = torch.index_select(z, -1, self.cols.long()) * self.values  # (..., nnz)
        running = F.pad(torch.cumsum(picked, -1), (1, 0))  # (..., nnz + 1), leading 0
        y = y + (torch.index_select(running, -1, self.ends)
                 - torch.index_select(running, -1, self.starts))
        return y if self.bias is None else y + self.bias


class ImplicitDCTLinear(_ImplicitDCT):
    """`DCT(x)[:m] * alpha + x S^T + b` for a DCTpSLinear."""

    def __init__(self, layer: DCTpSLinear):
        m, n = layer.weight_shape
        super().__init__(layer, max(m, n), m)

    def sparse_positions(self, layer: DCTpSLayer) -> tuple[torch.Tensor, torch.Tensor]:
        n = layer.weight_shape[1]
        return layer.indices // n, layer.indices % n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


class ImplicitDCTConv2d(_ImplicitDCT):
    """alpha * DCT + S of every `(i, j, c)`-flattened patch, + b, for a DCTpSConv2d
    (groups 1; zero, reflect, replicate or circular padding)."""

    def __init__(self, layer: DCTpSConv2d):
        m, n, kh, kw = layer.weight_shape
        if layer.groups != 1:
            raise ValueError("implicit DCT export needs groups=1")
        super().__init__(layer, max(m, n * kh * kw), m)
        self.kernel_size, self.stride, self.dilation = (kh, kw), layer.stride, layer.dilation
        self.padding_mode = layer.padding_mode
        self.pad = tuple(layer._pad)  # (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        if any(self.pad):
            x = F.pad(x, self.pad, mode=mode)
        c = x.shape[1]
        kh, kw = self.kernel_size
        ho = (x.shape[2] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (x.shape[3] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation,
                           stride=self.stride)  # (N, c*kh*kw, L), (c, i, j) order
        patches = patches.unflatten(1, (c, kh * kw)).permute(0, 3, 2, 1)  # (N, L, kh*kw, c)
        y = self.transform(patches.flatten(2))  # (N, L, m)
        return y.transpose(1, 2).unflatten(2, (ho, wo))  # (N, m, H', W')

    def sparse_positions(self, layer: DCTpSLayer) -> tuple[torch.Tensor, torch.Tensor]:
        _, n, kh, kw = layer.weight_shape
        o, rest = layer.indices // (n * kh * kw), layer.indices % (n * kh * kw)
        c, ij = rest // (kh * kw), rest % (kh * kw)
        return o, ij * n + c  # the patch entry in (i, j, c) order
