"""Model size and cost: parameter counts and multiply-accumulates (MACs).

Every weight layer answers for itself (`core.layers.Layer`): `count_macs` hooks the outermost
weight layers (`core.layers.weight_layers`) and adds their `macs(inputs, output)` for ONE
sample: Linear `in*out`; Conv2d `H_out*W_out*C_out*(C_in/groups)*kh*kw`; PCNLinear
`m*k + k*n` (projection + layer); PCNConv2d `H_in*W_in*m*k` (1x1 projection at input
resolution) plus the k-channel conv; a low-rank layer every factor and dense block (each weight
entry once per output position); a DCTpS layer the dense Linear/Conv2d it computes; a masked
layer the dense layer (a dense runtime executes it). Biases, mean subtraction, BatchNorm,
activations and pooling are not counted.

Parameters: a DCTpS layer's fixed D is a non-persistent buffer rebuilt from the shape (never
stored or trained): it is not counted (`fixed_dct_params` gives its size separately).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.dctps import fixed_dct_params
from core.layers import probe, weight_layers

__all__ = ["count_macs", "count_params", "fixed_dct_params", "param_counts"]


def param_counts(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "nonzero"}.

    total = every parameter + the buffers a layer counts as parameters (the frozen `U`/`mu` of
    PCN layers; BatchNorm running statistics are not counted); trainable = parameters with
    requires_grad; nonzero = non-zero entries of parameters and those buffers.
    """
    tensors = list(model.parameters())
    for _, _, layer in weight_layers(model):
        tensors += layer.frozen_tensors()
    return {
        "total": sum(t.numel() for t in tensors),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "nonzero": sum(int(torch.count_nonzero(t)) for t in tensors),
    }


def count_params(model: nn.Module) -> int:
    """`param_counts(model)["total"]`."""
    return param_counts(model)["total"]


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass of one sample of shape `input_shape` (see module docstring)."""
    total = 0
    handles = []
    for _, module, layer in weight_layers(model):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 layer=layer) -> None:  # type: ignore[no-untyped-def]
            nonlocal total
            total += int(layer.macs(inputs[0], output))
        handles.append(module.register_forward_hook(hook))
    probe(model, input_shape, handles)
    return total
