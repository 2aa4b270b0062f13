"""The output-based PCN transform and the combined transform (seed 000 App. C, C.1, D).

Layer i's output units feed layer i+1, whose input basis is U^{i+1} (m x k). The importance of
unit l is the L1 norm of row l of U^{i+1} (seed 000 Eq. 4-5); a conv feeding a flattened dense
layer owns h'*w' rows (channel-major flatten: rows l*h'*w' .. (l+1)*h'*w'-1), whose L1 norms
are summed. Residual streams (ResNet stages) average the scores over every tensor that carries
the stream (App. D, Fig. 4). The top-|S| units are kept: output rows of the producers' weights
and biases, the BatchNorm after them, and the readers' input columns / `mu` entries / `U` rows.

Layout: score (`unit_scores`) -> select (`select_units`, via `core.select`) -> apply
(`core.pcn_graph.prune_units`, the unit surgery, re-exported here; it also replays
`pcn_output` edits on placeholder models). `pcn_transform` runs the whole of App. C.1 as
`plan_pcn` (every U from the ORIGINAL network's stats: dims per layer, kept units per group;
a frozen `core.pcn.PCNPlan`) then `apply_pcn` (output truncation, then the input transform of
every chosen layer on the truncated stats).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from core.applies import conv_kind, register_applies
from core.configs import PCNConfig
from core.edits import register_edit
from core.errors import SpecError
from core.layers import as_layer
from core.pca import LayerStats
from core.pcn import (
    PCNConv2d,
    PCNLinear,
    PCNPlan,
    _validate_select,
    check_stats,
    layer_selector,
    resolve_layers,
    select_dims,
    transform_inputs,
)
from core.pcn_auto import auto_layers, auto_output
from core.pcn_graph import (
    UnitGroup,
    group_units,
    prune_units,
    shared_input_sets,
    unit_groups,
    unit_rows,
)
from core.select import top_k_indices
from core.surgery import get_layer, with_edit

UNIT_RULES = ("keep", "fraction", "score_mass")


# ---- where it applies ---------------------------------------------------------------------

@register_applies("pcn_output")
def pcn_output_applies(name: str, module: nn.Module) -> str | None:
    """The layer part of the rule (None: its output units can be truncated when its group
    allows it, `output_unsupported`): Linear, dense Conv2d and PCN layers produce units; the
    readers are input-transformed."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"{conv_kind(module)}: the output-based transform truncates the units of "
                "dense layers (a depthwise conv is sliced with the group it passes)")
    if isinstance(module, (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d)):
        return None
    return (f"a {type(module).__name__}: the output-based transform truncates Linear/Conv2d "
            "layers only")


def output_unsupported(model: nn.Module, group: UnitGroup) -> str | None:
    """Why the output-based transform cannot truncate `group` (None: it can): every reader
    must be a Linear / dense Conv2d (it is input-transformed and its U scores the units), and
    read the group alone (a reader of a concatenation would score several groups at once)."""
    for reader in group.reader_layers:
        layer = get_layer(model, reader)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1 or \
                not isinstance(layer, (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d)):
            return (f"reader {reader!r} is a {conv_kind(layer)}, which the input transform "
                    "does not replace")
    for layer, _, _ in group.segments:
        return f"{layer!r} reads the units at an offset of a concatenation"
    return None


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
    return top_k_indices(scores, keep)


# ---- apply ------------------------------------------------------------------------------

@register_edit("pcn_output")
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


# ---- the combined transform (seed 000 App. C.1): plan, then apply -------------------------

def _slice_stats(st: LayerStats, rows: torch.Tensor, dims: int) -> LayerStats:
    """Stats restricted to kept input rows: mu[rows], U = V[rows, :dims] (App. C.1 step 3)."""
    return replace(st, mu=st.mu[rows], eigvecs=st.eigvecs[rows, :dims],
                   eigvals=st.eigvals[:dims], total_variance=None)


def chosen_layers(model: nn.Module, layers: list[str] | str) -> list[str]:
    """The layers to transform: the named ones, or "auto" = `core.pcn_auto.auto_layers`."""
    return resolve_layers(model, layers, auto=lambda _valid: auto_layers(model))


def _shared_stats(model: nn.Module, stats: dict[str, LayerStats], chosen: list[str]
                  ) -> tuple[dict[str, LayerStats], list[tuple[str, ...]]]:
    """`stats` plus, for layers reading one tensor, the stats of one serving all."""
    stats = dict(stats)
    shared = [s for s in shared_input_sets(model) if any(n in chosen for n in s)]
    for tensor in shared:  # one PCA serves every layer reading the tensor
        have = [n for n in tensor if n in stats]
        for n in tensor:
            if n not in stats and have:
                stats[n] = stats[have[0]]
    return stats, shared


def plan_pcn(model: nn.Module, stats: dict[str, LayerStats],
             select: PCNConfig | dict[str, Any], layers: list[str] | str = "auto", *,
             output: dict[str, dict[str, Any]] | str | None = None) -> PCNPlan:
    """What `pcn_transform` keeps: dims per layer and kept units per output group (see there).
    Nothing is modified. `select` may be a `core.configs.PCNConfig`
    (`PCNConfig.from_dict(step.model_dump())`): its selector, layers and `output_based`
    ("auto" output) are used and `layers`/`output` must be left out."""
    if isinstance(select, PCNConfig):
        if select.target is not None:
            raise SpecError("select.target needs a search: use core.pcn_select."
                            "pcn_transform_to_target")
        select, layers, output = (select.selector(), select.layers,
                                  "auto" if select.output_based else None)
    chosen = chosen_layers(model, layers)
    if isinstance(select, dict) and "target" in select:
        raise SpecError("select['target'] needs a search: use core.pcn_select.pcn_transform_to_"
                        "target")
    stats, shared = _shared_stats(model, stats, chosen)
    check_stats(stats, chosen)
    _validate_select(select, chosen)
    kinds = {n: as_layer(get_layer(model, n)).kind for n in chosen}  # type: ignore[union-attr]
    dims = {n: select_dims(stats[n], layer_selector(select, n, kinds[n])) for n in chosen}
    for tensor in shared:
        members = [n for n in tensor if n in dims]
        for n in members:
            dims[n] = max(dims[m] for m in members)

    groups = unit_groups(model) if output else {}
    if output == "auto":
        output = auto_output(model, stats, dims)
    if output is not None and not isinstance(output, dict):
        raise SpecError(f"output must be None, 'auto' or {{group: rule}}, got {output!r}")
    output = output or {}
    unknown = sorted(set(output) - set(groups))
    if unknown:
        raise SpecError(f"unknown output groups {unknown}; valid: {', '.join(groups)}")
    kept: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    for name, rule in output.items():  # scores use the ORIGINAL U's (App. C.1 step 1)
        group = groups[name]
        if (reason := output_unsupported(model, group)) is not None:
            raise SpecError(f"the output-based transform cannot truncate {name!r}: {reason}")
        _check_readers(name, group, dims)
        bases = [stats[t[0]].eigvecs[:, :dims[t[0]]] for t in group.readers]
        unit_score = unit_scores(bases, group_units(model, group))
        kept[name] = select_units(unit_score, rule).tolist()
        scores[name] = [float(s) for s in unit_score]
    return PCNPlan(dims=dims, output=kept, scores=scores)


def _check_readers(name: str, group: UnitGroup, dims: dict[str, int]) -> None:
    untransformed = [r for r in group.reader_layers if r not in dims]
    if untransformed:
        raise SpecError(f"output transform of {name!r} needs its readers {untransformed} "
                        "to be input-transformed too (seed 000 App. C); add them to layers")


def apply_pcn(model: nn.Module, plan: PCNPlan, stats: dict[str, LayerStats]
              ) -> tuple[nn.Module, dict[str, Any]]:
    """The surgery of `plan` on a deep copy of `model`: output units pruned group by group, then
    every planned layer input-transformed on its truncated `mu`/`U` (App. C.1 step 3).
    `stats`: as given to `plan_pcn`. Returns (new model, report) as `pcn_transform`."""
    stats, _ = _shared_stats(model, stats, list(plan.dims))
    check_stats(stats, list(plan.dims))
    groups = unit_groups(model) if plan.output else {}
    unknown = sorted(set(plan.output) - set(groups))
    if unknown:
        raise SpecError(f"unknown output groups {unknown}; valid: {', '.join(groups)}")
    new_model = copy.deepcopy(model)
    arch_edits: list[dict[str, Any]] = []
    out_report: dict[str, Any] = {}
    sliced: dict[str, LayerStats] = {}
    for name, kept in plan.output.items():
        group = groups[name]
        _check_readers(name, group, plan.dims)
        units = group_units(new_model, group)
        keep = torch.tensor(kept, dtype=torch.int64)
        prune_units(new_model, group, keep)
        for reader in group.reader_layers:
            st = stats[reader]
            rows = unit_rows(keep, units, st.dim, reader)
            sliced[reader] = _slice_stats(st, rows, plan.dims[reader])
        arch_edits.append({"op": "pcn_output", "layer": name, "keep": int(keep.numel())})
        out_report[name] = {"units": units, "keep": int(keep.numel()), "kept": list(kept),
                            "scores": list(plan.scores.get(name, []))}
    in_report, in_edits = transform_inputs(new_model, plan.dims, stats, sliced)
    for edit in arch_edits + in_edits:
        new_model.slimline_arch = with_edit(new_model, edit)
    return new_model, {"input": in_report, "output": out_report}


def pcn_transform(model: nn.Module, stats: dict[str, LayerStats], select: dict[str, Any],
                  layers: list[str] | str = "auto", *,
                  output: dict[str, dict[str, Any]] | str | None = None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Input- and output-based PCN transform; returns (deep-copied new model, report).

    `select`, `stats`: as `core.pcn.pcn_input_transform` (stats from the ORIGINAL model).
    `layers`: list of layer names, or "auto" = `core.pcn_auto.auto_layers` (widest layers).
    Layers that read the same tensor (`core.pcn_graph.shared_input_sets`, e.g. a ResNet block's
    conv1 and shortcut_conv) share U: stats of one serve all, and all get the largest dims
    selected among them. `output`: None (input transform only), "auto"
    (`core.pcn_auto.auto_output`: groups whose readers are compressed >= 10x) or
    `{group: rule}` with groups from `core.pcn_graph.unit_groups` (a layer name, or `stage{s}`
    for a ResNet residual stream) and rules `{"keep": n}` | `{"fraction": f}` |
    `{"score_mass": f}` (see `select_units`). Every reader of an output group must be
    input-transformed (seed 000 App. C). Edits: one `{"op": "pcn_output", "layer": group,
    "keep": n}` per group, then `{"op": "pcn_input", ...}` per layer (the order they apply in).
    Report: `{"input": {layer: {"in_dim", "dims", "eigvals", "explained_variance"}},
    "output": {group: {"units", "keep", "kept", "scores"}}}`. = `plan_pcn` + `apply_pcn`.
    """
    return apply_pcn(model, plan_pcn(model, stats, select, layers, output=output), stats)
