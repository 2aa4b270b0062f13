"""Baselines the PCN benchmarks compare against (benchmark code, not product code).

* `match_mlp_widths`: hidden widths of a plain MLP whose trainable parameter count is as close as
  possible to a target (used for the small-dense-from-scratch baseline and as the target shape of
  structured pruning, so both baselines have exactly the same size).
* `prune_units_by_magnitude`: structured unit pruning of a trained `mlp`/`lenet300` by the L2
  norm of each hidden unit's incoming weight row; the removed units are physically removed
  (rows of layer i, entries of its bias, columns of layer i+1), giving a narrower `mlp`.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from core import models


def mlp_trainable(widths: Sequence[int], input_dim: int, num_classes: int) -> int:
    """Weights + biases of an MLP `input_dim -> widths... -> num_classes`."""
    dims = [input_dim, *widths, num_classes]
    return sum(d_in * d_out + d_out for d_in, d_out in itertools.pairwise(dims))


def match_mlp_widths(target: int, *, input_dim: int = 784, num_classes: int = 10,
                     max_widths: tuple[int, int] = (300, 100), ratio: float = 3.0,
                     ratio_tolerance: float = 0.15) -> list[int]:
    """Two hidden widths `[a, b]` with `a/b` near `ratio` (LeNet-300-100's shape) whose
    trainable count is closest to `target`; ties go to the pair with `a/b` closest to `ratio`.
    """
    best: tuple[int, float, list[int]] | None = None
    for a in range(1, max_widths[0] + 1):
        lo = max(1, int(a / (ratio * (1 + ratio_tolerance))))
        hi = min(max_widths[1], max(lo, round(a / (ratio * (1 - ratio_tolerance)))))
        for b in range(lo, hi + 1):
            key = (abs(mlp_trainable([a, b], input_dim, num_classes) - target),
                   abs(a / b - ratio), [a, b])
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None
    return best[2]


def prune_units_by_magnitude(model: nn.Module, widths: Sequence[int]) -> nn.Module:
    """A narrower `mlp` keeping, in each hidden layer, the `widths[i]` units with the largest
    L2 norm of their incoming weights.

    Layers are pruned front to back; a unit's norm is taken over the incoming weights that
    survive the previous layer's pruning. Weights, biases and the output layer are copied; the
    result is a real smaller model built by `core.models.build` (arch `mlp`).
    """
    arch = getattr(model, "slimline_arch", None)
    if arch is None or arch["name"] not in ("mlp", "lenet300") or arch.get("edits"):
        raise ValueError("prune_units_by_magnitude needs an unedited core 'mlp' or 'lenet300'")
    names = model.layer_names  # fc1..fcL
    if len(widths) != len(names) - 1:
        raise ValueError(f"need {len(names) - 1} widths for layers {names}, got {list(widths)}")
    kept_in = torch.arange(getattr(model, names[0]).in_features)
    new_tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        layer: nn.Linear = getattr(model, name)
        W = layer.weight.detach()[:, kept_in]  # (out, kept inputs)
        if i < len(names) - 1:
            if not 1 <= widths[i] <= layer.out_features:
                raise ValueError(f"{name}: width {widths[i]} not in [1, {layer.out_features}]")
            norms = W.norm(dim=1)  # (out,)
            kept_out = torch.topk(norms, widths[i]).indices.sort().values
        else:
            kept_out = torch.arange(layer.out_features)
        new_tensors[f"{name}.weight"] = W[kept_out].clone()
        new_tensors[f"{name}.bias"] = layer.bias.detach()[kept_out].clone()
        kept_in = kept_out
    small_arch = {"name": "mlp", "widths": [int(w) for w in widths],
                  "input_shape": arch["input_shape"], "num_classes": arch["num_classes"],
                  "init": arch["init"]}
    small = models.build(small_arch)
    small.load_state_dict(new_tensors)
    return small
