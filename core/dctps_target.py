"""A DCTpS step's absolute budget: `{"nonzero_params": n}` or `{"trainable_params": n}` (the
alternative to `density`) turned into the density that lands the whole model on it.

Both counts grow by exactly one per trainable entry of S (a `values` element), so the density
is computed directly: the model is measured (`core.budget.model_cost`) with every chosen layer
made a DCTpS layer holding no entry, and the rest of the budget is S's
(`density = (n - that) / the chosen layers' weights`, which `core.dctps.allocate` turns into
exactly that many entries). The transformed model is measured again for the report.

`nonzero_params` is counted as trained (`core.prune.trained_nonzero`): S's values as the
non-zeros training makes them (S starts at zero, so a plain count right after the step is
lower; a sparse file stores its whole support), biases likewise, masked weights of the layers
left dense as zeros. Separate from `core.dctps` because `core.budget` imports that module.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from core.budget import model_cost
from core.configs import DCTpSConfig
from core.dctps import dctps_apply, dctps_transform
from core.dctps_layer import dctps_layer
from core.errors import BelowMinimum, SpecError
from core.prune import trained_nonzero
from core.surgery import get_layer, plain_layers, set_layer

__all__ = ["TARGET_KINDS", "dctps_apply_target", "dctps_cost", "dctps_density"]

TARGET_KINDS = ("nonzero_params", "trainable_params")


def dctps_cost(model: nn.Module, kind: str, input_shape: Sequence[int] | None = None,
               masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """`core.budget.model_cost`; `nonzero_params` as trained (`core.prune.trained_nonzero`
    with the pruning `masks` of the layers left dense; see module doc)."""
    if kind != "nonzero_params":
        return model_cost(model, kind, input_shape)
    return trained_nonzero(model, masks)


def _chosen(model: nn.Module, layers: list[str] | None) -> list[str]:
    return [n for n, _ in plain_layers(model)] if layers is None else list(dict.fromkeys(layers))


def dctps_density(model: nn.Module, kind: str, budget: int, layers: list[str] | None = None,
                  alpha: str | float = "trainable",
                  masks: Mapping[str, torch.Tensor] | None = None) -> float:
    """The density of `layers` (None: every plain Linear/Conv2d) whose DCTpS transform leaves
    the whole model with `budget` of `kind` (`TARGET_KINDS`); 1.0 when even a full S fits.
    SpecError when the rest of the model alone (biases, alphas, other layers) is over it."""
    if kind not in TARGET_KINDS:
        raise SpecError(f"a dctps target is one of {', '.join(TARGET_KINDS)}, got {kind!r}: "
                        "a DCTpS layer is shipped and computed as a dense weight, so "
                        "total_params and macs do not shrink")
    names = _chosen(model, layers)
    if not names:
        raise SpecError("dctps: no Linear/Conv2d layers to transform")
    originals = {n: get_layer(model, n) for n in names}
    for n, layer in originals.items():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise SpecError(f"dctps: layer {n!r} is a {type(layer).__name__}; only nn.Linear "
                            "and nn.Conv2d")
    probe = _empty_copy(model, originals, alpha)
    base = dctps_cost(probe, kind, masks=masks)
    weights = sum(math.prod(layer.weight.shape) for layer in originals.values())
    entries = budget - base
    if entries < 1:
        raise BelowMinimum("dctps", kind, budget, base + 1, "one entry in S; the biases, "
                           "alphas and the layers left dense hold the rest",
                           "transform more layers")
    return min(1.0, entries / weights)


def _empty_copy(model: nn.Module, originals: dict[str, nn.Module], alpha: str | float
                ) -> nn.Module:
    """A copy of `model` whose chosen layers are DCTpS layers without an entry in S."""
    probe = copy.deepcopy(model)
    for n, layer in originals.items():
        set_layer(probe, n, dctps_layer(layer, 0, alpha))
    return probe


def dctps_apply_target(model: nn.Module, config: DCTpSConfig,
                       generator: torch.Generator | None = None,
                       masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """`core.dctps.dctps_apply`, or, with `config.target`, the transform at the density that
    meets it (`dctps_density`; `masks`: the job's pruning masks, default the model's
    `slimline_masks`); its report then has `budget`: `{kind, goal, value (measured), knob (the
    density), fraction, evaluations}`."""
    if config.target is None:
        return dctps_apply(model, config, generator)
    if config.density is not None:
        raise SpecError("dctps: give density or target, not both")
    if not isinstance(config.target, dict) or len(config.target) != 1:
        raise SpecError(f"a dctps target is one of {{'nonzero_params': n}}, "
                        f"{{'trainable_params': n}}; got {config.target!r}")
    (kind, goal), = config.target.items()
    layers = None if config.layers == "all" else list(config.layers)
    if masks is None:
        masks = getattr(model, "slimline_masks", None)
    density = dctps_density(model, kind, goal, layers, config.alpha, masks)
    report = dctps_transform(model, density, config.allocation, config.alpha, layers, generator)
    value = dctps_cost(model, kind, masks=masks)  # the replaced layers' masks no longer apply
    report["budget"] = {"kind": kind, "goal": goal, "value": value, "knob": density,
                        "fraction": value / goal, "evaluations": 2}
    return report
