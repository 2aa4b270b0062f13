"""Architectures as data: `{"name": <zoo name>, ...kwargs, "edits": [...]}`.

`build(arch)` builds the zoo model and replays the structural `edits` through the registry
`core.edits.EDIT_OPS` (shapes only; values come from a checkpoint or from the transform that
appended the edit). The ops are registered by the method modules; `core.models.build` (which
imports `core.methods`) has all of them.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from core.edits import EDIT_OPS, replay_edit
from core.errors import SpecError
from core.zoo import ZOO, init_weights


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
        replay_edit(model, edit)
    model.slimline_arch = full
    return model
