"""Layer lookup and replacement by name, forward order, and edits appended to an arch.

The bottom of core's layering (with `core.zoo`, `core.layers` and `core.edits`): every method
module does its layer surgery through these functions. `core.models` re-exports them.
"""
from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import nn

from core.errors import SpecError
from core.layers import as_layer, probe, weight_layers


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (dotted path), or SpecError naming the valid layers."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in prunable_layers(model)]
        raise SpecError(f"unknown layer {name!r}; valid layers: {', '.join(valid)}") from None


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The `weight` of the layer called `name` (torch types a submodule's attribute as
    `Tensor | Module`)."""
    return cast(torch.Tensor, get_layer(model, name).weight)


def model_arch(model: nn.Module) -> dict[str, Any]:
    """`model.slimline_arch`, the normalized arch `core.models.build` attached (AttributeError
    when the model has none)."""
    return cast("dict[str, Any]", model.slimline_arch)


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    """Attach the pruning masks `core.models.save` stores sparsely (`model.slimline_masks`)."""
    # torch types Module.__setattr__'s value as Tensor | Module; any value is accepted
    model.slimline_masks = masks  # type: ignore[assignment]


def set_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (SpecError for an unknown name)."""
    get_layer(model, name)  # validates the name
    model.set_submodule(name, module)


def _holds_weight(module: nn.Module) -> bool:
    """A weight layer (`core.layers.as_layer`) that trains one `weight` parameter in place of a
    Linear/Conv2d weight: nn.Linear, nn.Conv2d and PCN layers — not a low-rank layer (its
    factors are listed instead) nor a DCTpS layer (its weight is computed)."""
    return as_layer(module) is not None and isinstance(getattr(module, "weight", None),
                                                       nn.Parameter)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d layers (and their PCN replacements) in forward order.

    Forward order is observed with hooks on one zero input when the model carries an arch;
    otherwise registration order is used (the zoo registers modules in forward order).
    """
    layers = [(n, m) for n, m in model.named_modules() if _holds_weight(m)]
    arch = getattr(model, "slimline_arch", None)
    if arch is None:
        return layers
    order: list[str] = []
    names = {id(m): n for n, m in layers}
    handles = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[id(mod)]))
               for _, m in layers]
    probe(model, arch["input_shape"], handles)
    seen = dict.fromkeys(order)  # first call wins; keeps order
    by_name = dict(layers)
    return [(n, by_name[n]) for n in seen] + [(n, m) for n, m in layers if n not in seen]


def plain_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The plain nn.Linear/nn.Conv2d layers of `prunable_layers` (forward order) that are not
    part of another weight layer: a low-rank layer's factors belong to it, so the methods
    that replace whole layers (lowrank, pcn, dctps) never pick them."""
    inside = [name for name, _, _ in weight_layers(model)]
    return [(n, m) for n, m in prunable_layers(model)
            if isinstance(m, (nn.Linear, nn.Conv2d))
            and not any(n.startswith(outer + ".") for outer in inside)]


def with_edit(model: nn.Module, edit: dict[str, Any]) -> dict[str, Any]:
    """A copy of the model's arch with `edit` appended (for transforms that change structure)."""
    arch = copy.deepcopy(getattr(model, "slimline_arch", None))
    if arch is None:
        raise SpecError("model has no slimline_arch; build it with core.models.build")
    arch["edits"] = [*arch.get("edits", []), dict(edit)]
    return arch
