"""Architectures as data: `{"name": <zoo name>, ...kwargs, "edits": [...]}`.

`build(arch)` builds the zoo model and replays the structural `edits` (shapes only; values come
from a checkpoint or from the transform that appended the edit). Checkpoints live in
`core.models.checkpoint` and are re-exported here.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.errors import SpecError
from core.models.zoo import ZOO, init_weights

__all__ = [
    "EDIT_OPS",
    "ZOO",
    "build",
    "from_state_dict",
    "from_tensors",
    "get_layer",
    "input_shape",
    "load",
    "normalize_arch",
    "prunable_layers",
    "read_arch",
    "save",
    "set_layer",
]


def normalize_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """Return a new, JSON-able arch dict with every kwarg present (missing ones get defaults).

    Raises SpecError for an unknown name, unknown kwargs or malformed edits.
    """
    if not isinstance(arch, dict):
        raise SpecError(f"an architecture must be a dict with a 'name', got {type(arch).__name__}")
    name = arch.get("name")
    if name not in ZOO:
        raise SpecError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(ZOO))}")
    defaults, _ = ZOO[name]
    unknown = sorted(set(arch) - set(defaults) - {"name", "edits"})
    if unknown:
        raise SpecError(f"unknown kwargs {unknown} for architecture {name!r}; "
                        f"valid kwargs: {', '.join(sorted(defaults))}")
    try:
        full = json.loads(json.dumps({"name": name, **defaults, **arch}))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"architecture {name!r} is not JSON-serialisable: {exc}") from None
    edits = full.get("edits", [])
    if not isinstance(edits, list):
        raise SpecError("'edits' must be a list of {'op': ..., ...} dicts")
    for i, edit in enumerate(edits):
        if not isinstance(edit, dict) or edit.get("op") not in EDIT_OPS:
            raise SpecError(f"edit #{i} {edit!r} is not one of the known ops: "
                            f"{', '.join(sorted(EDIT_OPS))}")
    full["edits"] = edits
    return full


def input_shape(arch: dict[str, Any]) -> list[int]:
    """The `[C, H, W]` a model built from `arch` expects (without the batch dimension)."""
    return [int(s) for s in normalize_arch(arch)["input_shape"]]


def build(arch: dict[str, Any], *, generator: torch.Generator | None = None) -> nn.Module:
    """Build the zoo model for `arch`, initialise it (`init` kwarg) and replay its edits.

    The returned model carries `model.slimline_arch` (the normalized arch). Layers created by
    edits are zero-initialised placeholders: their values come from a checkpoint.
    """
    full = normalize_arch(arch)
    _, constructor = ZOO[full["name"]]
    num_classes = full["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SpecError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        model = constructor(full)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"cannot build {full['name']!r} from {full}: {exc}") from None
    init_weights(model, full["init"], generator)
    for edit in full["edits"]:
        EDIT_OPS[edit["op"]](model, edit)
    model.slimline_arch = full
    return model


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (dotted path), or SpecError naming the valid layers."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        valid = [n for n, _ in prunable_layers(model)]
        raise SpecError(f"unknown layer {name!r}; valid layers: {', '.join(valid)}") from None


def set_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    get_layer(model, name)  # validates the name
    model.set_submodule(name, module)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d layers (and their PCN replacements) in forward order.

    Forward order is observed with hooks on one zero input when the model carries an arch;
    otherwise registration order is used (the zoo registers modules in forward order).
    """
    from core.pcn import PCNConv2d, PCNLinear

    kinds = (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    arch = getattr(model, "slimline_arch", None)
    if arch is None:
        return layers
    order: list[str] = []
    names = {id(m): n for n, m in layers}
    handles = [m.register_forward_pre_hook(lambda mod, _inp: order.append(names[id(mod)]))
               for _, m in layers]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *arch["input_shape"], dtype=dtype, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    seen = dict.fromkeys(order)  # first call wins; keeps order
    by_name = dict(layers)
    return [(n, by_name[n]) for n in seen] + [(n, m) for n, m in layers if n not in seen]


def _replay_pcn_input(model: nn.Module, edit: dict[str, Any]) -> None:
    from core.pcn import placeholder_pcn_layer

    layer, dims = edit.get("layer"), edit.get("dims")
    if not isinstance(layer, str) or not isinstance(dims, int) or isinstance(dims, bool):
        raise SpecError(f"pcn_input edit needs a string 'layer' and an int 'dims', got {edit}")
    set_layer(model, layer, placeholder_pcn_layer(layer, get_layer(model, layer), dims))


def _replay_pcn_output(model: nn.Module, edit: dict[str, Any]) -> None:
    from core.pcn_output import replay_pcn_output

    replay_pcn_output(model, edit)


def _replay_lowrank(model: nn.Module, edit: dict[str, Any]) -> None:
    from core.lowrank import replay_lowrank

    replay_lowrank(model, edit)


def _replay_dctps(model: nn.Module, edit: dict[str, Any]) -> None:
    from core.dctps import replay_dctps

    replay_dctps(model, edit)


EDIT_OPS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {
    "pcn_input": _replay_pcn_input,
    "pcn_output": _replay_pcn_output,
    "lowrank": _replay_lowrank,
    "dctps": _replay_dctps,
}


def with_edit(model: nn.Module, edit: dict[str, Any]) -> dict[str, Any]:
    """A copy of the model's arch with `edit` appended (for transforms that change structure)."""
    arch = copy.deepcopy(getattr(model, "slimline_arch", None))
    if arch is None:
        raise SpecError("model has no slimline_arch; build it with core.models.build")
    arch["edits"] = [*arch.get("edits", []), dict(edit)]
    return arch


from core.models.checkpoint import from_state_dict, from_tensors, load, read_arch, save
