"""Model size and cost: parameter counts and multiply-accumulates (MACs).

MACs count multiply-accumulates of Linear, Conv2d and PCN layers for ONE sample (a layer that
applies weights functionally, without calling a Linear/Conv2d module, declares those MACs with a
`functional_macs(output) -> int` method, e.g. `core.lowrank.LowRankLayer`):
Linear `in*out`; Conv2d `H_out*W_out*C_out*(C_in/groups)*kh*kw`; PCNLinear `m*k + k*n`
(projection + layer); PCNConv2d `H_in*W_in*m*k` (1x1 projection at input resolution) plus the
k-channel conv. A DCTpS layer (`core.dctps`) computes a dense `alpha * D + S` weight and is
counted as the Linear/Conv2d it computes. Biases, mean subtraction, BatchNorm, activations and
pooling are not counted.

Parameters: a DCTpS layer's fixed D is a non-persistent buffer rebuilt from the shape (never
stored or trained): it is not counted (`fixed_dct_params` gives its size separately).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.dctps import DCTpSConv2d, DCTpSLayer, DCTpSLinear
from core.pcn import PCNConv2d, PCNLinear

_PCN = (PCNLinear, PCNConv2d)


def param_counts(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", "nonzero"}.

    total = every parameter + the frozen `U`/`mu` buffers of PCN layers (BatchNorm running
    statistics are not counted); trainable = parameters with requires_grad; nonzero = non-zero
    entries of parameters and PCN buffers.
    """
    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, _PCN):
            tensors += [module.U, module.mu]
    return {
        "total": sum(t.numel() for t in tensors),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "nonzero": sum(int(torch.count_nonzero(t)) for t in tensors),
    }


def fixed_dct_params(model: nn.Module) -> int:
    """Entries of the fixed DCT matrices D of the model's DCTpS layers (not in `param_counts`:
    D is rebuilt from the layer shape, never stored nor trained)."""
    return sum(m.D.numel() for m in model.modules() if isinstance(m, DCTpSLayer))


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass of one sample of shape `input_shape` (see module docstring)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        h = inputs[0]
        functional = getattr(module, "functional_macs", None)
        if functional is not None:  # work a layer does without calling its submodules
            total += int(functional(output))
        elif isinstance(module, (nn.Linear, DCTpSLinear)):
            total += output.numel() // module.out_features * module.in_features * module.out_features
        elif isinstance(module, (nn.Conv2d, DCTpSConv2d)):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, PCNLinear):
            rows = h.numel() // module.in_features
            total += rows * (module.in_features * module.dims + module.dims * module.out_features)
        elif isinstance(module, PCNConv2d):
            kh, kw = module.kernel_size
            spatial_in = h.shape[0] * h.shape[2] * h.shape[3]
            total += spatial_in * module.in_channels * module.dims
            total += output.numel() * module.dims * kh * kw

    kinds = (nn.Linear, nn.Conv2d, *_PCN, DCTpSLinear, DCTpSConv2d)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, kinds) or hasattr(m, "functional_macs")]
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
        for handle in handles:
            handle.remove()
    return total
