"""What each method can do to a model, before any compute is spent: the prunability report.

`prunability_report(model)` lists, per weight layer (forward order), its kind, weight shape,
parameters and MACs (one sample; `core.layers.Layer.macs`, as `core.metrics.count_macs`), the
methods that apply and, for the others, why they leave the layer untouched; then the coupled
unit groups (`core.pcn_graph.unit_groups`: producers, BatchNorms, channel-wise layers, readers,
units) and the groups / layers whose units no unit method prunes, with the reason
(`core.pcn_graph.untouched_units`). Per-layer rules come from `core.applies` (each method
registers its own); `channel_prune` and `pcn_output` also need the layer's units to be in a
prunable group (and, for `pcn_output`, `core.pcn_output.output_unsupported` to hold none).
JSON-able and deterministic; zoo models get the same report.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.applies import METHOD_OPS, why_not
from core.errors import SpecError
from core.graph_deps import UnitGroup, graph_deps, graph_input_shape, is_graph_model
from core.layers import probe, weight_layers
from core.metrics import param_counts
from core.pcn_graph import group_units, unit_groups, untouched_units
from core.pcn_output import output_unsupported

GROUP_OPS = ("channel_prune", "pcn_output")


def layer_kind(module: nn.Module) -> str:
    """linear | conv | depthwise_conv | grouped_conv, or the class name of a compressed layer
    (PCNLinear, LowRankLayer, DCTpSConv2d, ...)."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d:
        if module.groups == 1:
            return "conv"
        return "depthwise_conv" if module.groups == module.in_channels else "grouped_conv"
    return type(module).__name__


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> list[int]:
    if input_shape is not None:
        return [int(s) for s in input_shape]
    if is_graph_model(model):
        return graph_input_shape(model)
    arch = getattr(model, "slimline_arch", None)
    if isinstance(arch, dict) and arch.get("input_shape"):
        return [int(s) for s in arch["input_shape"]]
    raise SpecError("prunability_report needs the input shape of a model without an arch")


def _layer_costs(model: nn.Module, input_shape: list[int]) -> dict[str, int]:
    """{layer: MACs of one sample}, in the order the layers run (unused layers last, 0)."""
    macs: dict[str, int] = {}
    handles = []
    for name, module, layer in weight_layers(model):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                 name: str = name, layer: Any = layer) -> None:
            macs[name] = macs.get(name, 0) + int(layer.macs(inputs[0], output))
        handles.append(module.register_forward_hook(hook))
    probe(model, input_shape, handles)
    for name, _, _ in weight_layers(model):
        macs.setdefault(name, 0)
    return macs


def _groups(model: nn.Module) -> tuple[dict[str, UnitGroup], dict[str, tuple[UnitGroup, str]],
                                       dict[str, str]]:
    """(prunable groups, blocked groups with reasons, untouched layers with reasons)."""
    if is_graph_model(model):
        deps = graph_deps(model)
        return deps.groups, deps.blocked, deps.untouched
    try:
        groups = unit_groups(model)
    except SpecError as exc:
        return {}, {}, {name: str(exc) for name, _, _ in weight_layers(model)}
    return groups, {}, untouched_units(model)


def prunability_report(model: nn.Module, input_shape: Sequence[int] | None = None
                       ) -> dict[str, Any]:
    """`{"layers": [{"name", "kind", "shape", "params", "macs", "group", "methods",
    "untouched": {op: reason}}], "groups": [{"name", "units", "producers", "norms",
    "channelwise", "readers", "segments", "methods", "untouched"}], "untouched_groups":
    [{"name", "producers", "reason"}], "totals": {"params", "macs", "layers", "groups",
    "units", "untouched_groups"}}` (see the module docstring). `input_shape` (no batch dim)
    defaults to the model's."""
    shape = _input_shape(model, input_shape)
    macs = _layer_costs(model, shape)
    modules = {name: module for name, module, _ in weight_layers(model)}
    groups, blocked, untouched_layers = _groups(model)

    group_of: dict[str, str] = {}  # layer -> the group its output units belong to
    for g in [*groups.values(), *(g for g, _ in blocked.values())]:
        for layer in (*g.producers, *g.channelwise):
            group_of.setdefault(layer, g.name)

    group_rows = []
    group_why: dict[str, dict[str, str]] = {}
    for g in groups.values():
        why: dict[str, str] = {}
        if (reason := output_unsupported(model, g)) is not None:
            why["pcn_output"] = reason
        group_why[g.name] = why
        group_rows.append({
            "name": g.name, "units": group_units(model, g), "producers": list(g.producers),
            "norms": list(g.norms), "channelwise": list(g.channelwise),
            "readers": [list(t) for t in g.readers],
            "segments": [{"layer": layer, "before": list(before), "per": per}
                         for layer, before, per in g.segments],
            "methods": [op for op in GROUP_OPS if op not in why], "untouched": why})
    untouched_groups = [{"name": name, "producers": list(g.producers), "reason": reason}
                        for name, (g, reason) in blocked.items()]
    untouched_groups += [{"name": name, "producers": [name], "reason": reason}
                         for name, reason in untouched_layers.items()
                         if name not in blocked]

    rows = []
    for name in macs:
        module = modules[name]
        why = {}
        for op in METHOD_OPS:
            reason = why_not(op, name, module)
            if reason is None and op in GROUP_OPS:
                reason = _group_reason(op, name, group_of, groups, blocked, untouched_layers,
                                       group_why)
            if reason is not None:
                why[op] = reason
        params = sum(p.numel() for p in module.parameters())
        layer = next(v for n, _, v in weight_layers(module) if n == "")
        params += sum(t.numel() for t in layer.frozen_tensors())
        weight = getattr(module, "weight", None)
        with torch.no_grad():
            w_shape = weight.shape if type(module) in (nn.Linear, nn.Conv2d) and \
                isinstance(weight, torch.Tensor) else layer.dense_weight().shape
        rows.append({"name": name, "kind": layer_kind(module), "shape": [int(s) for s in w_shape],
                     "params": int(params), "macs": int(macs[name]),
                     "group": group_of.get(name),
                     "methods": [op for op in METHOD_OPS if op not in why], "untouched": why})
    return {
        "layers": rows, "groups": group_rows, "untouched_groups": untouched_groups,
        "totals": {"params": int(param_counts(model)["total"]), "macs": int(sum(macs.values())),
                   "layers": len(rows), "groups": len(group_rows),
                   "units": int(sum(r["units"] for r in group_rows)),
                   "untouched_groups": len(untouched_groups)}}


def _group_reason(op: str, name: str, group_of: dict[str, str], groups: dict[str, UnitGroup],
                  blocked: dict[str, tuple[UnitGroup, str]], untouched: dict[str, str],
                  group_why: dict[str, dict[str, str]]) -> str | None:
    """Why a group method leaves the layer's output units alone (None: it can prune them)."""
    group = group_of.get(name)
    if group in groups:
        if op == "pcn_output" and name in groups[group].channelwise:
            return f"sliced with group {group!r} (a channel-wise layer; its units are not scored)"
        return group_why[group].get(op)
    if group in blocked:
        return f"its units are in group {group!r}, which cannot be pruned: {blocked[group][1]}"
    if name in untouched:
        return untouched[name]
    return "its units are in no prunable group"
