"""Architectures as data: `{"name": <zoo name>, ...kwargs, "edits": [...]}`, or an imported
graph `{"name": "graph", "graph": <sha256>, "input_shape", "num_classes", "init": "torch",
"edits": [...]}` (`core.graph`; the IR is looked up with `graph_for`).

`build(arch)` builds the zoo model (or the graph's module) and replays the structural `edits`
through the registry `core.edits.EDIT_OPS` (shapes only; values come from a checkpoint or from
the transform that appended the edit). The ops are registered by the method modules;
`core.models.build` (which imports `core.methods`) has all of them.

Any arch may carry `"preprocessing": {"layout": "NCHW"|"NHWC"|"flat", "mean": [...]|null,
"std": [...]|null}` (what the worker applies to the data); it is kept in the normalized arch
only when present, so archs without it are unchanged.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from core.edits import EDIT_OPS, replay_edit
from core.errors import SpecError
from core.graph import build_graph_module, graph_for, is_sha
from core.zoo import ZOO, init_weights

GRAPH = "graph"  # the arch name of an imported graph
GRAPH_DEFAULTS: dict[str, Any] = {"init": "torch"}
GRAPH_KWARGS = ("graph", "input_shape", "num_classes", "init")
LAYOUTS = ("NCHW", "NHWC", "flat")


def normalize_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """Return a new, JSON-able arch dict with every kwarg present (missing ones get defaults).

    Raises SpecError for an unknown name, unknown kwargs or malformed edits.
    """
    if not isinstance(arch, dict):
        raise SpecError(f"an architecture must be a dict with a 'name', got {type(arch).__name__}")
    name = arch.get("name")
    if name != GRAPH and name not in ZOO:
        raise SpecError(f"unknown architecture {name!r}; valid names: "
                        f"{', '.join(sorted(ZOO))} (or 'graph' for an imported model)")
    if name == GRAPH:
        defaults: dict[str, Any] = GRAPH_DEFAULTS
        valid = GRAPH_KWARGS
        missing = [k for k in GRAPH_KWARGS if k not in arch and k not in defaults]
        if missing:
            raise SpecError(f"architecture 'graph' needs {missing}; an imported model's arch "
                            "comes from core.models.import_graph or its checkpoint")
    else:
        defaults = ZOO[name][0]
        valid = tuple(defaults)
    unknown = sorted(set(arch) - set(valid) - {"name", "edits", "preprocessing"})
    if unknown:
        raise SpecError(f"unknown kwargs {unknown} for architecture {name!r}; "
                        f"valid kwargs: {', '.join(sorted([*valid, 'preprocessing']))}")
    try:
        full = json.loads(json.dumps({"name": name, **defaults, **arch}, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"architecture {name!r} is not JSON-serialisable: {exc}") from None
    if name == GRAPH:
        _check_graph_arch(full)
    if "preprocessing" in full:
        full["preprocessing"] = normalize_preprocessing(full["preprocessing"])
    edits = full.get("edits", [])
    if not isinstance(edits, list):
        raise SpecError("'edits' must be a list of {'op': ..., ...} dicts")
    for i, edit in enumerate(edits):
        if not isinstance(edit, dict) or edit.get("op") not in EDIT_OPS:
            raise SpecError(f"edit #{i} {edit!r} is not one of the known ops: "
                            f"{', '.join(sorted(EDIT_OPS))}")
    full["edits"] = edits
    return full


def _check_graph_arch(full: dict[str, Any]) -> None:
    if not is_sha(full["graph"]):
        raise SpecError(f"'graph' must be a graph id (64 hex digits), got {full['graph']!r}")
    shape = full["input_shape"]
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise SpecError(f"input_shape must be a list of positive integers (without the batch "
                        f"dimension), got {shape!r}")
    if full["init"] != "torch":
        raise SpecError(f"an imported graph's init is 'torch' (its weights come from the "
                        f"upload), got {full['init']!r}")


def normalize_preprocessing(value: object) -> dict[str, Any]:
    """`{"layout": "NCHW"|"NHWC"|"flat", "mean": [floats]|None, "std": [floats > 0]|None}` with
    missing keys filled (layout NCHW, no mean/std); SpecError says what is wrong."""
    if not isinstance(value, dict):
        raise SpecError(f"preprocessing must be an object {{'layout', 'mean', 'std'}}, got "
                        f"{value!r}")
    unknown = sorted(set(value) - {"layout", "mean", "std"})
    if unknown:
        raise SpecError(f"unknown preprocessing keys {unknown}; valid: layout, mean, std")
    out: dict[str, Any] = {"layout": value.get("layout", "NCHW"), "mean": value.get("mean"),
                           "std": value.get("std")}
    if out["layout"] not in LAYOUTS:
        raise SpecError(f"preprocessing layout {out['layout']!r} is not one of "
                        f"{', '.join(LAYOUTS)}")
    for key in ("mean", "std"):
        values = out[key]
        if values is None:
            continue
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values):
            raise SpecError(f"preprocessing {key} must be a non-empty list of finite numbers "
                            f"(one per channel) or null, got {values!r}")
        out[key] = [float(v) for v in values]
    if out["std"] is not None and any(v <= 0 for v in out["std"]):
        raise SpecError(f"preprocessing std must be > 0, got {out['std']}")
    if out["mean"] is not None and out["std"] is not None \
            and len(out["mean"]) != len(out["std"]):
        raise SpecError(f"preprocessing mean ({len(out['mean'])} values) and std "
                        f"({len(out['std'])} values) must have the same length")
    return out


def input_shape(arch: dict[str, Any]) -> list[int]:
    """The `[C, H, W]` a model built from `arch` expects (without the batch dimension)."""
    return [int(s) for s in normalize_arch(arch)["input_shape"]]


def build(arch: dict[str, Any], *, generator: torch.Generator | None = None) -> nn.Module:
    """Build the zoo model for `arch`, initialise it (`init` kwarg) and replay its edits.

    The returned model carries `model.slimline_arch` (the normalized arch). Layers created by
    edits are zero-initialised placeholders: their values come from a checkpoint.
    """
    full = normalize_arch(arch)
    num_classes = full["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SpecError(f"num_classes must be a positive integer, got {num_classes!r}")
    if full["name"] == GRAPH:
        model = _build_graph(full)
    else:
        _, constructor = ZOO[full["name"]]
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


def _build_graph(full: dict[str, Any]) -> nn.Module:
    """The module of an imported graph (PyTorch's default init; tensors zero)."""
    ir = graph_for(full["graph"])
    if list(full["input_shape"]) != list(ir["input"]["shape"]):
        raise SpecError(f"input_shape {full['input_shape']} does not match the graph's input "
                        f"shape {ir['input']['shape']}")
    return build_graph_module(ir)
