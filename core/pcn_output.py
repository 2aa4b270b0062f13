"""The output-based PCN transform and the combined transform (seed 000 App. C, C.1, D).

Layer i's output units feed layer i+1, whose input basis is U^{i+1} (m x k). The importance of
unit l is the L1 norm of row l of U^{i+1} (seed 000 Eq. 4-5); a conv feeding a flattened dense
layer owns h'*w' rows (channel-major flatten: rows l*h'*w' .. (l+1)*h'*w'-1), whose L1 norms
are summed. Residual streams (ResNet stages) average the scores over every tensor that carries
the stream (App. D, Fig. 4). The top-|S| units are kept: output rows of the producers' weights
and biases, the BatchNorm after them, and the readers' input columns / `mu` entries / `U` rows.

Layout: score (`unit_scores`) -> select (`select_units`) -> apply (`prune_units`, the only
place that does layer surgery; it also replays `pcn_output` edits on placeholder models).
`pcn_transform` runs the whole of App. C.1: every U from the ORIGINAL network's stats, then the
output truncation, then the input transform of every chosen layer on the truncated stats.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from core.errors import SpecError
from core.pca import LayerStats
from core.pcn import (
    PCNConv2d,
    PCNLinear,
    _validate_select,
    layer_selector,
    pcn_from_layer,
    resolve_layers,
    select_dims,
)
from core.pcn_graph import UnitGroup, shared_input_sets, unit_groups

UNIT_RULES = ("keep", "fraction", "score_mass")


# ---- score ------------------------------------------------------------------------------

def unit_scores(bases: list[torch.Tensor], units: int) -> torch.Tensor:
    """Importance (units,) = mean over reader tensors of the summed row L1 norms of their U.

    `bases`: one U (m_r, k_r) per tensor carrying the units; m_r must be a multiple of `units`
    (m_r / units rows per unit, channel-major, for a conv read through a flatten).
    """
    if not bases:
        raise SpecError("unit_scores needs the U of at least one reading layer")
    scores = torch.zeros(units, dtype=torch.float64)
    for U in bases:
        if U.shape[0] % units:
            raise SpecError(f"a U with {U.shape[0]} rows cannot be split into {units} units")
        rows = U.detach().to(torch.float64).abs().sum(dim=1)  # (m_r,) row L1 norms
        scores += rows.reshape(units, -1).sum(dim=1)  # (units,) sum over the h'*w' rows
    return scores / len(bases)


# ---- select -----------------------------------------------------------------------------

def select_units(scores: torch.Tensor, rule: dict[str, Any]) -> torch.Tensor:
    """Indices (ascending) of the units to keep: the top ones by score (ties: lower index).

    rule: `{"keep": n}` (capped at the unit count), `{"fraction": f}` (ceil(f * units)),
    `{"score_mass": f}` (smallest top set whose scores sum to >= f of the total).
    """
    units = scores.numel()
    if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in UNIT_RULES:
        raise SpecError(f"an output rule is one of {{'keep': n}}, {{'fraction': f}}, "
                        f"{{'score_mass': f}}; got {rule!r}")
    (key, value), = rule.items()
    if key == "keep":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"keep must be an integer >= 1, got {value!r}")
        keep = min(value, units)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise SpecError(f"{key} must be a fraction in (0, 1], got {value!r}")
        if key == "fraction":
            keep = max(1, int(torch.ceil(torch.tensor(value * units - 1e-9))))
        else:
            s = scores.to(torch.float64).clamp(min=0)
            total = float(s.sum())
            ordered = torch.sort(s, descending=True, stable=True).values
            keep = units if total <= 0 else int(
                (torch.cumsum(ordered, 0) / total < value - 1e-12).sum()) + 1
            keep = min(keep, units)
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


# ---- apply ------------------------------------------------------------------------------

def _out_units(name: str, layer: nn.Module) -> int:
    if isinstance(layer, (nn.Linear, PCNLinear)):
        return layer.out_features
    if isinstance(layer, (nn.Conv2d, PCNConv2d)):
        return layer.out_channels
    raise SpecError(f"layer {name!r} is a {type(layer).__name__}; output units can only be "
                    "pruned from Linear/Conv2d/PCN layers")


def _in_dim(layer: nn.Module) -> int:
    if isinstance(layer, (nn.Linear, PCNLinear)):
        return layer.in_features
    if isinstance(layer, (nn.Conv2d, PCNConv2d)):
        return layer.in_channels
    raise SpecError(f"a {type(layer).__name__} cannot read pruned units")


def _new_like(layer: nn.Module, tensors: dict[str, torch.Tensor], **shape: Any) -> nn.Module:
    """A layer of the same type and geometry as `layer` with new sizes, filled from `tensors`."""
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(shape["in_dim"], shape["out_dim"], bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(shape["in_dim"], shape["out_dim"], layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                        bias=layer.bias is not None, padding_mode=layer.padding_mode)
    elif isinstance(layer, PCNLinear):
        new = PCNLinear(shape["in_dim"], layer.dims, shape["out_dim"])
    else:
        new = PCNConv2d(shape["in_dim"], layer.dims, shape["out_dim"], layer.kernel_size,
                        layer.stride, layer.padding)
    new = new.to(dtype=layer.weight.dtype, device=layer.weight.device)
    state = new.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)
    new.train(layer.training)
    return new


def _slice_output(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Keep output units `keep` of a Linear/Conv2d/PCN layer (rows of W, entries of b)."""
    tensors = {k: v for k, v in layer.state_dict().items()}
    tensors["weight"] = tensors["weight"][keep]
    if "bias" in tensors:
        tensors["bias"] = tensors["bias"][keep]
    return _new_like(layer, tensors, in_dim=_in_dim(layer), out_dim=int(keep.numel()))


def _slice_input(layer: nn.Module, rows: torch.Tensor) -> nn.Module:
    """Keep input dims `rows` of a reader: W columns (plain) or U rows / mu entries (PCN)."""
    tensors = {k: v for k, v in layer.state_dict().items()}
    if isinstance(layer, (PCNLinear, PCNConv2d)):
        tensors["U"], tensors["mu"] = tensors["U"][rows], tensors["mu"][rows]
    else:
        tensors["weight"] = tensors["weight"][:, rows]
    return _new_like(layer, tensors, in_dim=int(rows.numel()), out_dim=_out_units("", layer))


def _slice_norm(norm: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(int(keep.numel()), eps=norm.eps, momentum=norm.momentum,
                         affine=norm.affine, track_running_stats=norm.track_running_stats)
    new = new.to(device=norm.weight.device if norm.affine else None,
                 dtype=norm.weight.dtype if norm.affine else None)
    state = {k: (v if v.ndim == 0 else v[keep]) for k, v in norm.state_dict().items()}
    new.load_state_dict(state)
    new.train(norm.training)
    return new


def group_units(model: nn.Module, group: UnitGroup) -> int:
    """The number of units of `group` (all producers must agree)."""
    from core.models import get_layer

    counts = {p: _out_units(p, get_layer(model, p)) for p in group.producers}
    if len(set(counts.values())) != 1:
        raise SpecError(f"group {group.name!r}: producers disagree on the unit count: {counts}")
    return next(iter(counts.values()))


def unit_rows(keep: torch.Tensor, units: int, in_dim: int, layer: str) -> torch.Tensor:
    """Reader input rows of the kept units (h'*w' rows per unit for a flattened conv output)."""
    if in_dim % units:
        raise SpecError(f"layer {layer!r} reads {in_dim} dims, not a multiple of {units} units")
    per_unit = in_dim // units
    return (keep[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)  # (|S|*h'*w',)


def prune_units(model: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
    """In place: keep units `keep` of `group` in its producers, their BatchNorms and readers."""
    from core.models import get_layer, set_layer

    units = group_units(model, group)
    keep = torch.as_tensor(keep, dtype=torch.int64).flatten()
    if keep.numel() < 1 or int(keep.min()) < 0 or int(keep.max()) >= units or \
            torch.unique(keep).numel() != keep.numel():
        raise SpecError(f"group {group.name!r}: keep must be distinct unit indices in "
                        f"[0, {units}), got {keep.tolist()[:20]}")
    for producer, norm in zip(group.producers, group.norms):
        set_layer(model, producer, _slice_output(get_layer(model, producer), keep))
        if norm is not None:
            bn = get_layer(model, norm)
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != units:
                raise SpecError(f"group {group.name!r}: {norm!r} is not a BatchNorm2d over "
                                f"{units} channels")
            set_layer(model, norm, _slice_norm(bn, keep))
    for reader in group.reader_layers:
        layer = get_layer(model, reader)
        rows = unit_rows(keep, units, _in_dim(layer), reader)
        set_layer(model, reader, _slice_input(layer, rows))


def replay_pcn_output(model: nn.Module, edit: dict[str, Any]) -> None:
    """Structural replay of `{"op": "pcn_output", "layer": <group>, "keep": n}` (shapes only)."""
    name, keep = edit.get("layer"), edit.get("keep")
    if not isinstance(name, str) or isinstance(keep, bool) or not isinstance(keep, int):
        raise SpecError(f"pcn_output edit needs a string 'layer' and an int 'keep', got {edit}")
    groups = unit_groups(model)
    if name not in groups:
        raise SpecError(f"pcn_output edit: unknown unit group {name!r}; valid: "
                        f"{', '.join(groups)}")
    units = group_units(model, groups[name])
    if not 1 <= keep <= units:
        raise SpecError(f"pcn_output edit: keep must be in [1, {units}] for {name!r}, got {keep}")
    prune_units(model, groups[name], torch.arange(keep))


# ---- the combined transform (seed 000 App. C.1) -----------------------------------------

def _slice_stats(st: LayerStats, rows: torch.Tensor, dims: int) -> LayerStats:
    """Stats restricted to kept input rows: mu[rows], U = V[rows, :dims] (App. C.1 step 3)."""
    return replace(st, mu=st.mu[rows], eigvecs=st.eigvecs[rows, :dims],
                   eigvals=st.eigvals[:dims], total_variance=None)


def _chosen_layers(model: nn.Module, layers: list[str] | str) -> list[str]:
    from core.pcn_select import auto_layers

    return resolve_layers(model, layers, auto=lambda _valid: auto_layers(model))


def pcn_transform(model: nn.Module, stats: dict[str, LayerStats], select: dict[str, Any],
                  layers: list[str] | str = "auto", *,
                  output: dict[str, dict[str, Any]] | str | None = None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Input- and output-based PCN transform; returns (deep-copied new model, report).

    `select`, `stats`: as `core.pcn.pcn_input_transform` (stats from the ORIGINAL model).
    `layers`: list of layer names, or "auto" = `core.pcn_select.auto_layers` (widest layers).
    Layers that read the same tensor (`core.pcn_graph.shared_input_sets`, e.g. a ResNet block's
    conv1 and shortcut_conv) share U: stats of one serve all, and all get the largest dims
    selected among them. `output`: None (input transform only), "auto"
    (`core.pcn_select.auto_output`: groups whose readers are compressed >= 10x) or
    `{group: rule}` with groups from `core.pcn_graph.unit_groups` (a layer name, or `stage{s}`
    for a ResNet residual stream) and rules `{"keep": n}` | `{"fraction": f}` |
    `{"score_mass": f}` (see `select_units`). Every reader of an output group must be
    input-transformed (seed 000 App. C). Edits: one `{"op": "pcn_output", "layer": group,
    "keep": n}` per group, then `{"op": "pcn_input", ...}` per layer (the order they apply in).
    Report: `{"input": {layer: {"in_dim", "dims", "eigvals", "explained_variance"}},
    "output": {group: {"units", "keep", "kept", "scores"}}}`.
    """
    from core.models import get_layer, set_layer, with_edit

    chosen = _chosen_layers(model, layers)
    if isinstance(select, dict) and "target" in select:
        raise SpecError("select['target'] needs a search: use core.pcn_select.pcn_transform_to_"
                        "target")
    stats = dict(stats)
    shared = [s for s in shared_input_sets(model) if any(n in chosen for n in s)]
    for tensor in shared:  # one PCA serves every layer reading the tensor
        have = [n for n in tensor if n in stats]
        for n in tensor:
            if n not in stats and have:
                stats[n] = stats[have[0]]
    missing = [n for n in chosen if n not in stats]
    if missing:
        raise SpecError(f"no PCA stats for layers {missing}; collect them with "
                        "core.pca.collect_input_stats first")
    _validate_select(select, chosen)
    kinds = {n: "linear" if isinstance(get_layer(model, n), nn.Linear) else "conv"
             for n in chosen}
    dims = {n: select_dims(stats[n], layer_selector(select, n, kinds[n])) for n in chosen}
    for tensor in shared:
        members = [n for n in tensor if n in dims]
        for n in members:
            dims[n] = max(dims[m] for m in members)

    groups = unit_groups(model) if output else {}
    if output == "auto":
        from core.pcn_select import auto_output
        output = auto_output(model, stats, dims)
    if output is not None and not isinstance(output, dict):
        raise SpecError(f"output must be None, 'auto' or {{group: rule}}, got {output!r}")
    output = output or {}
    unknown = sorted(set(output) - set(groups))
    if unknown:
        raise SpecError(f"unknown output groups {unknown}; valid: {', '.join(groups)}")

    new_model = copy.deepcopy(model)
    arch_edits: list[dict[str, Any]] = []
    out_report: dict[str, Any] = {}
    sliced: dict[str, LayerStats] = {}
    for name, rule in output.items():  # scores use the ORIGINAL U's (App. C.1 step 1)
        group = groups[name]
        untransformed = [r for r in group.reader_layers if r not in dims]
        if untransformed:
            raise SpecError(f"output transform of {name!r} needs its readers {untransformed} "
                            "to be input-transformed too (seed 000 App. C); add them to layers")
        units = group_units(new_model, group)
        bases = [stats[t[0]].eigvecs[:, :dims[t[0]]] for t in group.readers]
        scores = unit_scores(bases, units)
        keep = select_units(scores, rule)
        prune_units(new_model, group, keep)
        for reader in group.reader_layers:
            st = stats[reader]
            rows = unit_rows(keep, units, st.dim, reader)
            sliced[reader] = _slice_stats(st, rows, dims[reader])
        arch_edits.append({"op": "pcn_output", "layer": name, "keep": int(keep.numel())})
        out_report[name] = {"units": units, "keep": int(keep.numel()), "kept": keep.tolist(),
                            "scores": [float(s) for s in scores]}

    in_report: dict[str, Any] = {}
    for name in chosen:  # input transform on the truncated U / mu (App. C.1 step 3)
        st = stats[name]
        k = dims[name]
        layer = get_layer(new_model, name)
        set_layer(new_model, name, pcn_from_layer(name, layer, sliced.get(name, st), k))
        arch_edits.append({"op": "pcn_input", "layer": name, "dims": k})
        e = st.eigvals.clamp(min=0)
        total = float(e.sum()) if st.total_variance is None else st.total_variance
        in_report[name] = {"in_dim": _in_dim(layer), "dims": k,
                           "eigvals": [float(v) for v in st.eigvals[:10]],
                           "explained_variance": float(e[:k].sum()) / total if total > 0
                           else 1.0}
    for edit in arch_edits:
        new_model.slimline_arch = with_edit(new_model, edit)
    return new_model, {"input": in_report, "output": out_report}
