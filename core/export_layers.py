"""Export forms of slimline's layers: what `core.export.prepare_for_export` swaps in.

Each form computes what the layer computes, with ops that stay compressed after an ONNX
runtime's constant folding (which evaluates every subgraph whose inputs are all constants and
stores the result as one initializer):

* PCN (`PCNLinear`): `MatMul(h, U)` then `Gemm` with `b~ = b - W U^T mu` (mu folded into the
  bias, seed 000 Eq. 2 rearranged) — `U (m, k)` and `W (n, k)` stay two factors.
* PCN (`PCNConv2d`): a 1x1 `Conv` with `U^T`, bias `-U^T mu` and the layer's zero padding,
  then the k-channel `Conv` with padding 0. The ring the 1x1 conv pads gets only its bias,
  `-mu U`: exactly the padding correction of seed 000 App. D.
* `LowRankLayer`: unchanged — its forward already applies every factor pair as two layers.
* DCTpS "dense": a plain Linear/Conv2d with `alpha * D + S` (one GEMM/Conv, the dense model's
  speed and bytes). DCTpS "implicit": `core.export_dctps` (D never stored); a grouped conv
  (an imported model's depthwise conv) stays in the dense form, said in its description.
* Masked (pruned) and channel-pruned layers are plain Linear/Conv2d: dense weights, zeros kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.dctps_layer import DCTpSConv2d, DCTpSLayer, DCTpSLinear
from core.export_dctps import ImplicitDCTConv2d, ImplicitDCTLinear
from core.lowrank_layer import LowRankLayer
from core.pcn import PCNConv2d, PCNLinear

DCTPS_MODES = ("dense", "implicit")


class PCNLinearExport(nn.Module):
    """`(h @ U) @ W^T + (b - W U^T mu)`: a MatMul and a Gemm, mu in the bias."""

    def __init__(self, layer: PCNLinear):
        super().__init__()
        with torch.no_grad():
            self.U = nn.Parameter(layer.U.detach().clone(), requires_grad=False)  # (m, k)
            self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            bias = layer.bias - layer.weight @ (layer.U.T @ layer.mu)  # (n,)
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h @ self.U, self.weight, self.bias)  # (..., k) -> (..., n)


class PCNConv2dExport(nn.Module):
    """1x1 projection conv (padded, bias `-U^T mu`) then the k-channel conv with padding 0."""

    def __init__(self, layer: PCNConv2d):
        super().__init__()
        m, k = layer.U.shape
        self.project = nn.Conv2d(m, k, 1, padding=layer.padding, dtype=layer.U.dtype,
                                 device=layer.U.device)
        self.conv = nn.Conv2d(k, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              dtype=layer.weight.dtype, device=layer.weight.device)
        with torch.no_grad():
            self.project.weight.copy_(layer.U.T.reshape(k, m, 1, 1))
            self.project.bias.copy_(-(layer.mu @ layer.U))  # (k,): the projection of 0
            self.conv.weight.copy_(layer.weight)
            self.conv.bias.copy_(layer.bias)
        self.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(self.project(h))


def dense_dctps(layer: DCTpSLayer) -> nn.Module:
    """The plain Linear/Conv2d computing `alpha * D + S` (same geometry and bias)."""
    kw = {"dtype": layer.values.dtype, "device": layer.values.device}
    dense: nn.Linear | nn.Conv2d
    if isinstance(layer, DCTpSConv2d):
        dense = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                          stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                          groups=layer.groups, bias=layer.bias is not None,
                          padding_mode=layer.padding_mode, **kw)
    elif isinstance(layer, DCTpSLinear):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **kw)
    else:
        raise TypeError(f"not a DCTpS layer: {type(layer).__name__}")
    with torch.no_grad():
        dense.weight.copy_(layer.weight_matrix())
        if layer.bias is not None and dense.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense.requires_grad_(False)


def export_form(layer: nn.Module, dctps: str) -> tuple[nn.Module, str] | None:
    """`(replacement, description of the ops it exports as)` for a slimline layer, or None when
    the module is exported as it is (plain layers, LowRankLayer, containers)."""
    if isinstance(layer, PCNLinear):
        return PCNLinearExport(layer), "pcn: MatMul(h, U) + Gemm (mu folded into the bias)"
    if isinstance(layer, PCNConv2d):
        return PCNConv2dExport(layer), "pcn: Conv 1x1 (U, padded, bias -mu U) + Conv"
    if isinstance(layer, DCTpSLayer):
        if dctps == "dense":
            return dense_dctps(layer), "dctps dense: one Gemm/Conv with alpha*D + S"
        if isinstance(layer, DCTpSConv2d):
            if layer.groups != 1:  # the DFT of a patch mixes channels: dense conv only
                return dense_dctps(layer), (f"dctps dense: one Conv with alpha*D + S (the "
                                            f"implicit form needs groups=1, this conv has "
                                            f"groups={layer.groups})")
            return ImplicitDCTConv2d(layer), "dctps implicit: patches + DFT (alpha*D) + Conv (S)"
        return ImplicitDCTLinear(layer), "dctps implicit: DFT (alpha*D) + Gemm (S)"
    if isinstance(layer, LowRankLayer):
        return None
    return None


def describe(layer: nn.Module) -> str | None:
    """What a layer exported as it is stands for (None for modules that are not weight layers)."""
    if isinstance(layer, LowRankLayer):
        pairs = sum(isinstance(b, nn.Sequential) for b in layer.blocks)
        return (f"lowrank {layer.blocking}: {pairs} factor pair(s) as two "
                f"{'Conv' if layer.conv else 'MatMul/Gemm'} ops each, "
                f"{len(layer.blocks) - pairs} dense block(s)")
    return None
