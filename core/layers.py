"""What every weight layer answers for itself: the `Layer` protocol.

A layer is anything that maps an input of `in_dim` features (Linear-like, `kind == "linear"`)
or channels (`kind == "conv"`) to `out_dim` outputs with ONE dense weight it computes:

* `dense_weight()` — the dense weight the layer applies, shaped like the nn.Linear
  `(out, in)` / nn.Conv2d `(out, in/groups, kh, kw)` weight it stands for (a PCN layer: `W U^T`;
  a low-rank layer: the sum of its blocks; a DCTpS layer: `alpha * D + S`);
* `weight_params()` — the weight entries it stores (factors, sparse values, PCN weight);
* `frozen_tensors()` — buffers counted as parameters (PCN's frozen `U` and `mu`);
* `macs(inputs, output)` — multiply-accumulates of one forward of that batch, everything the
  layer does (its submodules included: a caller counts a layer, never its children).

PCNLinear/PCNConv2d (`core.pcn`), LowRankLayer (`core.lowrank_layer`) and DCTpSLinear/
DCTpSConv2d (`core.dctps`) implement it; plain nn.Linear/nn.Conv2d are wrapped by `DenseLayer`.
`as_layer(module)` gives the protocol view of any module (None when it is not a weight layer),
so `core.metrics`, `core.pca` and `core.surgery.prunable_layers` never list layer classes.
A masked (pruned) nn.Linear/nn.Conv2d is a dense layer: a dense runtime executes it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

KINDS = ("linear", "conv")


@runtime_checkable
class Layer(Protocol):
    """The protocol (see module doc). `kind` is "linear" or "conv"."""

    @property
    def kind(self) -> str: ...

    @property
    def in_dim(self) -> int: ...

    @property
    def out_dim(self) -> int: ...

    def weight_params(self) -> int: ...

    def frozen_tensors(self) -> list[torch.Tensor]: ...

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int: ...

    def dense_weight(self) -> torch.Tensor: ...


def conv_macs(output: torch.Tensor, in_per_group: int, kernel_size: tuple[int, ...]) -> int:
    """MACs of a conv producing `output` (N, C_out, H', W'): every output value is a dot
    product of `in_per_group * kh * kw` inputs."""
    kh, kw = kernel_size
    return output.numel() * in_per_group * kh * kw


def linear_macs(output: torch.Tensor, in_features: int) -> int:
    """MACs of a Linear producing `output` (..., out): `in_features` per output value."""
    return output.numel() * in_features


class LinearDims:
    """`kind`, `in_dim`, `out_dim` of a Linear-like layer (`in_features` / `out_features`)."""

    kind = "linear"
    in_features: int
    out_features: int

    @property
    def in_dim(self) -> int:
        return self.in_features

    @property
    def out_dim(self) -> int:
        return self.out_features


class ConvDims:
    """`kind`, `in_dim`, `out_dim` of a Conv2d-like layer (`in_channels` / `out_channels`)."""

    kind = "conv"
    in_channels: int
    out_channels: int

    @property
    def in_dim(self) -> int:
        return self.in_channels

    @property
    def out_dim(self) -> int:
        return self.out_channels


class DenseLayer:
    """The `Layer` view of a plain nn.Linear / nn.Conv2d (masked or not: counted dense)."""

    def __init__(self, module: nn.Linear | nn.Conv2d):
        self.module = module

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.module, nn.Conv2d) else "linear"

    @property
    def in_dim(self) -> int:
        m = self.module
        return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features

    @property
    def out_dim(self) -> int:
        m = self.module
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features

    def weight_params(self) -> int:
        return self.module.weight.numel()

    def frozen_tensors(self) -> list[torch.Tensor]:
        return []

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        m = self.module
        if isinstance(m, nn.Conv2d):
            return conv_macs(output, m.in_channels // m.groups, tuple(m.kernel_size))
        return linear_macs(output, m.in_features)

    def dense_weight(self) -> torch.Tensor:
        return self.module.weight


def as_layer(module: nn.Module) -> Layer | None:
    """The `Layer` view of `module`: itself when it implements the protocol, a `DenseLayer`
    for a plain nn.Linear/nn.Conv2d, None for anything else (BatchNorm, containers, ...)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return DenseLayer(module)
    if isinstance(module, Layer):
        return module
    return None


def probe(model: nn.Module, input_shape: Sequence[int],
          hooks: Iterable[torch.utils.hooks.RemovableHandle]) -> None:
    """One eval-mode, no-grad forward of a zero sample of `input_shape` in the model's dtype and
    on its device (to fire the forward `hooks` the caller registered); the hooks are removed and
    the model's train/eval mode restored afterwards, whatever happens."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Layer]]:
    """`(name, module, layer view)` of the outermost weight layers in registration order: the
    submodules of a layer (a low-rank layer's factors) are part of it, not layers of their own."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        layer = as_layer(module)
        if layer is not None:
            inside.append(name)
            yield name, module, layer
