"""Structured channel pruning: whole output units / channels are removed, so the model is
physically narrower (fewer parameters and MACs, less latency), not masked.

Units go per coupled group (`core.pcn_graph.unit_groups`): one producer's units and the next
layer's inputs, or a ResNet residual stream (every block's conv2 + bn2, the projection shortcut +
its BN and every reader of the stream) together, by `core.pcn_graph.prune_units`' surgery. An
imported model's groups come from its graph (`core.graph_deps`: residual adds, depthwise convs
and BatchNorms sliced with the group, concatenations); the groups it cannot prune are left
untouched (`core.pcn_graph.untouched_units` says why).
Layout: score (`l1_scores`, `taylor_scores`) -> select (`select_keeps`: per-group keep counts
meeting a param/MAC budget counted on the real pruned model; `core.select.top_k_indices`) ->
apply (`prune_units`).

* l1: per unit, the L1 norm of each producer's output row `W[c]`, times `|gamma_c| /
  sqrt(var_c + eps)` where a BatchNorm follows, summed over the producers (Li et al. 2017).
* taylor: per unit, |sum over the batch and positions of a * dL/da| for the tensor `a` carrying
  it (after the BN, if any), summed over producers, accumulated over calibration batches
  (first-order Taylor estimate of the loss change on removal; Molchanov et al. 2017).
* scope global: all groups ranked on one scale (scores / their group's mean, Torch-Pruning's
  `mean` normaliser); layerwise: every group loses the same fraction (as near as units allow).

Targets: `param_ratio` / `mac_ratio` (the whole model's parameters / MACs after over before,
counted by `core.metrics`), or an absolute whole-model budget of `core.budget`'s kinds
(`total_params`, `nonzero_params`, `trainable_params`, `macs`, measured with
`core.budget.model_cost`; `nonzero_params` as trained, `core.prune.as_trained`, with the
pruning masks cut alongside); the same bisection over the removal order and fill-up reach both
(the scores are computed once; every candidate is measured on the real pruned model).

The result lands at or just below the target; a group keeps a multiple of `round_to` units (or
all of them), never fewer than `max(round_to, 1)`. The structural edit is
`{"op": "channel_prune", "keep": {group: n}}`, replayed by `replay_channel_prune`.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.applies import conv_kind, register_applies
from core.budget import BUDGET_KINDS, model_cost
from core.data import ArrayDataset
from core.edits import register_edit
from core.errors import BelowMinimum, SpecError
from core.metrics import count_macs, param_counts
from core.pcn import PCNConv2d, PCNLinear
from core.pcn_graph import (
    UnitGroup,
    group_units,
    layer_rows,
    prune_units,
    unit_groups,
    untouched_units,
)
from core.prune import as_trained, trained_nonzero
from core.select import top_k_indices
from core.surgery import get_layer, with_edit

CRITERIA = ("l1", "taylor")
SCOPES = ("global", "layerwise")
RATIO_TARGETS = ("param_ratio", "mac_ratio")
TARGETS = (*RATIO_TARGETS, *BUDGET_KINDS)
MAX_BUDGET = 10**12
ROUND_TO = (1, 8, 16)
_UNIT_LAYERS = (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d)


@dataclass(frozen=True)
class ChannelPruneConfig:
    """The `channel_prune` step's fields (JSON-able via `to_dict` / `from_dict`)."""

    # {"param_ratio": r} | {"mac_ratio": r}, r in (0, 1]; or {kind: n}, a core.budget kind
    target: dict[str, float]
    criterion: str = "l1"  # l1 | taylor
    scope: str = "global"  # global | layerwise
    layers: tuple[str, ...] | None = None  # unit groups (or a producer of one); None: all
    round_to: int = 1  # kept counts are multiples of this (or a group's full width)
    samples: int = 512  # taylor: calibration samples

    def __post_init__(self) -> None:
        if not isinstance(self.target, Mapping) or len(self.target) != 1 or \
                next(iter(self.target)) not in TARGETS:
            raise SpecError(f"channel_prune target must be one of {{'param_ratio': r}}, "
                            f"{{'mac_ratio': r}} or {{kind: n}} with kind one of "
                            f"{', '.join(BUDGET_KINDS)}; got {self.target!r}")
        (kind, ratio), = self.target.items()
        if kind in BUDGET_KINDS:
            if isinstance(ratio, bool) or not isinstance(ratio, int) or \
                    not 1 <= ratio <= MAX_BUDGET:
                raise SpecError(f"channel_prune target {kind} must be an integer in "
                                f"[1, {MAX_BUDGET}], got {ratio!r}")
        elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or \
                not 0 < ratio <= 1:
            raise SpecError(f"channel_prune target {kind} must be in (0, 1], got {ratio!r}")
        object.__setattr__(self, "target",
                           {kind: ratio if kind in BUDGET_KINDS else float(ratio)})
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers or \
                    not all(isinstance(n, str) for n in self.layers):
                raise SpecError(f"channel_prune layers must be null or a non-empty list of "
                                f"unit groups, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        for name, value, valid in (("criterion", self.criterion, CRITERIA),
                                   ("scope", self.scope, SCOPES),
                                   ("round_to", self.round_to, ROUND_TO)):
            if isinstance(value, bool) or value not in valid:
                raise SpecError(f"channel_prune {name} must be one of "
                                f"{', '.join(map(str, valid))}, got {value!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise SpecError(f"channel_prune samples must be a positive integer, "
                            f"got {self.samples!r}")

    @property
    def target_kind(self) -> str:
        return next(iter(self.target))

    @property
    def target_ratio(self) -> float:
        """The ratio of a ratio target, or the absolute budget of a `core.budget` kind."""
        return next(iter(self.target.values()))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": None if self.layers is None else list(self.layers)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelPruneConfig:
        """From the JSON step (its `op` key is ignored); SpecError names a bad field."""
        d = {k: v for k, v in d.items() if k != "op"}
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - names):
            raise SpecError(f"unknown channel_prune fields {unknown}; valid: {sorted(names)}")
        if "target" not in d:
            raise SpecError("channel_prune needs a target: {'param_ratio': r}, "
                            "{'mac_ratio': r} or an absolute budget {kind: n} (kind one of "
                            f"{', '.join(BUDGET_KINDS)})")
        return cls(**d)


# ---- groups -----------------------------------------------------------------------------

@register_applies("channel_prune")
def channel_prune_applies(name: str, module: nn.Module) -> str | None:
    """The layer part of the rule (None: its units can be cut when its group allows it):
    Linear, Conv2d and PCN layers are cut; a depthwise conv is sliced with the group it passes;
    a grouped conv or a compressed layer (low-rank, DCTpS) is not. Whether the layer's units
    are in a prunable group is `core.pcn_graph.unit_groups`' answer."""
    if isinstance(module, nn.Conv2d) and module.groups != 1 and \
            not module.groups == module.in_channels == module.out_channels:
        return f"{conv_kind(module)}: channel_prune does not cut channel groups"
    if isinstance(module, _UNIT_LAYERS):
        return None
    return (f"a {type(module).__name__}: channel_prune cuts Linear/Conv2d/PCN layers only "
            "(prune channels before compressing the layer)")


def _unprunable(model: nn.Module, group: UnitGroup) -> str | None:
    """Why `group` cannot be pruned by layer surgery (None: it can)."""
    for name in (*group.producers, *group.reader_layers):
        layer = get_layer(model, name)
        if not isinstance(layer, _UNIT_LAYERS):
            return f"{name!r} is a {type(layer).__name__}, not a Linear/Conv2d/PCN layer"
    return None


def prunable_groups(model: nn.Module, layers: tuple[str, ...] | None = None
                    ) -> dict[str, UnitGroup]:
    """The unit groups to prune: every group whose layers allow it (`layers=None`), or the
    named ones (a group name, or a producer of one: `stage1.1.conv2` means `stage1`)."""
    try:
        groups = unit_groups(model)
    except SpecError as exc:
        raise SpecError(f"channel_prune: {exc}") from None
    if layers is None:
        return {n: g for n, g in groups.items() if _unprunable(model, g) is None}
    by_producer = {p: g for g in groups.values() for p in g.producers}
    chosen: dict[str, UnitGroup] = {}
    for name in layers:
        group = groups.get(name) or by_producer.get(name)
        if group is None:
            untouched = untouched_units(model)
            why = f" ({untouched[name]})" if name in untouched else ""
            raise SpecError(f"channel_prune: {name!r} is no prunable unit group{why}; valid: "
                            f"{', '.join(groups) or 'none'}")
        if (reason := _unprunable(model, group)) is not None:
            raise SpecError(f"channel_prune: group {group.name!r} cannot be pruned: {reason}")
        chosen[group.name] = group
    return chosen


# ---- score ------------------------------------------------------------------------------

def l1_scores(model: nn.Module, groups: Mapping[str, UnitGroup]) -> dict[str, torch.Tensor]:
    """Per group, (units,) float64: sum over producers of |W[c]|_1 (x |gamma_c|/sqrt(var_c+eps)
    where a BatchNorm follows)."""
    scores = {}
    for name, group in groups.items():
        total = torch.zeros(group_units(model, group), dtype=torch.float64)
        for producer, norm in zip(group.producers, group.norms, strict=True):
            w = get_layer(model, producer).weight.detach().to("cpu", torch.float64)
            total += w.abs().reshape(w.shape[0], -1).sum(dim=1) * (  # (units,) row L1 norms
                1.0 if norm is None else _bn_scale(get_layer(model, norm)))
        scores[name] = total
    return scores


def _bn_scale(bn: nn.Module) -> torch.Tensor | float:
    """|gamma| / sqrt(running_var + eps) per channel: how much the BN scales each unit."""
    scale = bn.weight.detach().to("cpu", torch.float64).abs() if bn.affine else 1.0
    var = bn.running_var if bn.track_running_stats else None
    return scale if var is None else scale / (var.detach().to("cpu", torch.float64)
                                              + bn.eps).sqrt()


def taylor_scores(model: nn.Module, groups: Mapping[str, UnitGroup], data: ArrayDataset, *,
                  samples: int, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Per group, (units,) float64: sum over calibration batches of |sum over producers, the
    batch and positions of a * dL/da| (`a`: the tensor carrying the unit, after the producer's
    BN if any; L: mean cross-entropy of the batch; BN in eval mode). The first `samples`
    items of `data` are used; `model` is not modified (a copy takes the gradients)."""
    n = min(samples, len(data))
    if n < 1:
        raise SpecError("channel_prune criterion 'taylor' needs calibration data")
    work = copy.deepcopy(model).to(device).eval()
    totals = {g: torch.zeros(group_units(work, groups[g]), dtype=torch.float64) for g in groups}
    batch: dict[str, torch.Tensor] = {}

    def watch(group: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def forward_hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            act = output.detach()
            reduce = [0, *range(2, output.ndim)]  # all but the unit dim

            def grad_hook(grad: torch.Tensor) -> None:
                batch[group] += (act * grad).sum(dim=reduce).to("cpu", torch.float64)
            output.register_hook(grad_hook)
        return forward_hook

    handles = [work.get_submodule(norm or producer).register_forward_hook(watch(name))
               for name, group in groups.items()
               for producer, norm in zip(group.producers, group.norms, strict=True)]
    dtype = next(work.parameters()).dtype
    try:
        for start in range(0, n, batch_size):
            x = data.x[start:min(start + batch_size, n)].to(device, dtype).requires_grad_(True)
            y = data.y[start:min(start + batch_size, n)].to(device)
            batch.update({g: torch.zeros_like(t) for g, t in totals.items()})
            work.zero_grad(set_to_none=True)
            F.cross_entropy(work(x), y).backward()
            for g, t in totals.items():
                t += batch[g].abs()
    finally:
        for handle in handles:
            handle.remove()
    return totals


# ---- select -----------------------------------------------------------------------------

def _round_keep(keep: int, total: int, round_to: int) -> int:
    return min(total, math.ceil(keep / round_to) * round_to)


def removal_order(scores: Mapping[str, torch.Tensor], min_keep: Mapping[str, int], scope: str
                  ) -> list[tuple[float, str]]:
    """Every removable unit as (key, group), least important first.

    global: key = the unit's score / its group's mean score (one scale for all groups);
    layerwise: key = the fraction of its group removed with it (groups shrink in step).
    A group's `min_keep` best units are never removable."""
    keys, names = [], []
    for name, s in scores.items():
        removable = s.numel() - min_keep[name]
        if scope == "global":
            mean = float(s.mean())
            norm = s / mean if mean > 0 else torch.zeros_like(s)
            key = torch.sort(norm, stable=True).values[:removable]
        else:
            key = torch.arange(1, removable + 1, dtype=torch.float64) / s.numel()
        keys.append(key.to(torch.float64))
        names += [name] * removable
    if not names:
        return []
    flat = torch.cat(keys)
    order = torch.sort(flat, stable=True).indices.tolist()
    return [(float(flat[i]), names[i]) for i in order]


def select_keeps(model: nn.Module, groups: Mapping[str, UnitGroup],
                 scores: Mapping[str, torch.Tensor], config: ChannelPruneConfig,
                 input_shape: list[int], stats: dict[str, int] | None = None
                 ) -> tuple[dict[str, int], int, int]:
    """Per group keep counts that meet the target with the least removed, counted on the real
    pruned model. Returns (keeps, size before, size after), the sizes in the target's
    quantity; `stats` (a dict, optional) gets `evaluations`, the pruned models measured.

    Bisection on k, the number of units removed in `removal_order` (keep counts rounded up to
    `round_to`, so sizes fall monotonically with k), then a fill-up pass: a group whose best
    removed units fit back into the budget gets them back (as many as fit, round_to at a time),
    so rounding and costly last units do not leave the result far below the target."""
    kind, ratio = config.target_kind, config.target_ratio
    totals = {n: int(s.numel()) for n, s in scores.items()}
    step = max(config.round_to, 1)
    min_keep = {n: min(t, step) for n, t in totals.items()}
    order = removal_order(scores, min_keep, config.scope)
    before = _size(model, kind, input_shape)
    budget = ratio * before if kind in RATIO_TARGETS else float(ratio)
    cache: dict[tuple[int, ...], int] = {}

    def size_of(keeps: dict[str, int]) -> int:
        key = tuple(keeps.values())
        if key not in cache:  # each group keeps its top units (nested as counts grow)
            trial = _pruned(model, groups,
                            {n: top_k_indices(scores[n], c) for n, c in keeps.items()})
            cache[key] = _size(trial, kind, input_shape)
        return cache[key]

    def keeps_at(k: int) -> dict[str, int]:
        removed = dict.fromkeys(totals, 0)
        for _, name in order[:k]:
            removed[name] += 1
        return {n: _round_keep(totals[n] - removed[n], totals[n], step) for n in totals}

    if (smallest := size_of(keeps_at(len(order)))) > budget:
        if kind not in RATIO_TARGETS:
            raise BelowMinimum("channel_prune", kind, ratio, smallest,
                               f"{step} unit(s) kept per pruned group; the model has {before}",
                               "prune more groups (layers)")
        raise SpecError(f"channel_prune: {kind} {ratio} is out of reach: keeping {step} unit(s) "
                        f"per pruned group gives {smallest / before:.4f}; prune more groups "
                        "(layers) or raise the target")
    lo, hi = 0, len(order)  # keeps_at(hi) meets the budget: find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        if size_of(keeps_at(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    keeps = keeps_at(hi)
    best_removed = {**dict.fromkeys(totals, -math.inf),  # each group's best removed unit's key
                    **{name: key for key, name in order[:hi]}}  # (order: ascending keys)
    ranked = sorted((n for n in totals if keeps[n] < totals[n]),  # the best removed unit first
                    key=lambda n: -best_removed[n] if config.scope == "global"
                    else keeps[n] / totals[n])  # layerwise: the least kept group first
    for name in ranked:  # fill-up: each group takes back as many units as the budget allows
        grown = [{**keeps, name: _round_keep(keeps[name] + extra * step, totals[name], step)}
                 for extra in range(math.ceil((totals[name] - keeps[name]) / step) + 1)]
        lo, hi = 0, len(grown) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size_of(grown[mid]) <= budget else (lo, mid - 1)
        keeps = grown[lo]
    after = size_of(keeps)
    if stats is not None:
        stats["evaluations"] = len(cache)
    return keeps, before, after


def _size(model: nn.Module, kind: str, input_shape: list[int]) -> int:
    """The target's quantity: `core.metrics`' for the ratios, `core.budget`'s for a budget."""
    if kind == "param_ratio":
        return param_counts(model)["total"]
    if kind == "mac_ratio":
        return count_macs(model, input_shape)
    return model_cost(model, kind, input_shape)


def _pruned(model: nn.Module, groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor]
            ) -> nn.Module:
    new = copy.deepcopy(model)
    for name, idx in keep.items():
        if idx.numel() < group_units(new, groups[name]):
            prune_units(new, groups[name], idx)
    return new


# ---- the step ---------------------------------------------------------------------------

def _slice_masks(model: nn.Module, groups: Mapping[str, UnitGroup],
                 keep: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Pruning masks cut like the weights they mask (producer rows, depthwise conv channels,
    reader input columns), group by group on a copy pruned alongside (a concatenation's
    offsets move as the groups before it shrink)."""
    out = dict(masks)
    work = copy.deepcopy(model)
    for name, idx in keep.items():
        group = groups[name]
        units = group_units(work, group)
        if idx.numel() >= units:
            continue
        for producer in group.producers:
            if producer in out:
                out[producer] = out[producer][idx.to(out[producer].device)]
        for layer in group.channelwise:
            if layer in out:  # a depthwise conv's mask (C, 1, kh, kw)
                rows = layer_rows(work, group, layer, idx, units)
                out[layer] = out[layer][rows.to(out[layer].device)]
        for reader in group.reader_layers:
            if reader in out and isinstance(get_layer(work, reader), (nn.Linear, nn.Conv2d)):
                rows = layer_rows(work, group, reader, idx, units)
                out[reader] = out[reader][:, rows.to(out[reader].device)]
        prune_units(work, group, idx)
    return out


def channel_prune(model: nn.Module, config: ChannelPruneConfig, *,
                  data: ArrayDataset | None = None, device: str | torch.device = "cpu",
                  masks: Mapping[str, torch.Tensor] | None = None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Prune whole units of `model` to `config.target`; returns (a pruned copy, report).

    `data`: calibration samples for `criterion="taylor"` (the first `config.samples`).
    The copy carries the arch with one `channel_prune` edit (when `model` has an arch) and the
    pruning masks (`masks`, default `model.slimline_masks`) cut to the new shapes in
    `slimline_masks`. Report: `{"criterion", "scope", "target", "round_to", "groups": {group:
    {"total", "kept", "keep": [unit indices]}}, "params": {"before", "after"}, "macs":
    {"before", "after"}, "ratio"}` (`ratio`: the target's quantity after / before, counted on
    the returned model).
    """
    arch = getattr(model, "slimline_arch", None)
    input_shape = list(arch["input_shape"]) if arch else (data.input_shape if data else None)
    if input_shape is None:
        raise SpecError("channel_prune needs a model built by core.models.build (or data) "
                        "to know its input shape")
    if not (groups := prunable_groups(model, config.layers)):
        untouched = "; ".join(f"{n}: {r}" for n, r in untouched_units(model).items())
        raise SpecError("channel_prune: the model has no prunable unit group"
                        + (f" ({untouched})" if untouched else ""))
    if config.criterion == "taylor" and data is None:
        raise SpecError("channel_prune criterion 'taylor' needs calibration data")
    scores = l1_scores(model, groups) if config.criterion == "l1" else \
        taylor_scores(model, groups, data, samples=config.samples, device=device)
    masks = getattr(model, "slimline_masks", None) if masks is None else masks
    stats: dict[str, int] = {}
    # nonzero_params: counted on the model as trained (its masked weights zero, the rest not)
    sized = as_trained(model, masks) if config.target_kind == "nonzero_params" else model
    keeps, before, after = select_keeps(sized, groups, scores, config, input_shape, stats)
    keep = {n: top_k_indices(scores[n], keeps[n]) for n in groups}
    new_model = _pruned(model, groups, keep)
    sliced = _slice_masks(model, groups, keep, masks) if masks else None
    if sliced is not None:
        new_model.slimline_masks = sliced
    changed = {n: keeps[n] for n in groups if keeps[n] < scores[n].numel()}
    if arch is not None:
        new_model.slimline_arch = with_edit(model, {"op": "channel_prune", "keep": changed})
    sizes = {q: (_size(model, kind, input_shape), _size(new_model, kind, input_shape))
             for q, kind in (("params", "param_ratio"), ("macs", "mac_ratio"))}
    kind = config.target_kind
    if kind in RATIO_TARGETS:
        quantity = "params" if kind == "param_ratio" else "macs"
        ratio = sizes[quantity][1] / sizes[quantity][0]
    else:  # measured on the returned model (with its masks cut alongside)
        after = trained_nonzero(new_model, sliced) \
            if kind == "nonzero_params" else _size(new_model, kind, input_shape)
        ratio = after / before
    out = {
        "criterion": config.criterion, "scope": config.scope, "round_to": config.round_to,
        "target": dict(config.target),
        "groups": {n: {"total": int(scores[n].numel()), "kept": keeps[n],
                       "keep": keep[n].tolist()} for n in groups},
        **{q: {"before": b, "after": a} for q, (b, a) in sizes.items()},
        "ratio": ratio}
    if kind not in RATIO_TARGETS:
        goal = config.target_ratio
        out["budget"] = {"kind": kind, "goal": goal, "value": after, "knob": ratio,
                         "fraction": after / goal, "evaluations": stats["evaluations"]}
    return new_model, out


@register_edit("channel_prune")
def replay_channel_prune(model: nn.Module, edit: dict[str, Any]) -> None:
    """Structural replay of `{"op": "channel_prune", "keep": {group: n}}` (shapes only)."""
    keep = edit.get("keep")
    if not isinstance(keep, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in keep.values()):
        raise SpecError(f"channel_prune edit needs 'keep': {{group: int}}, got {edit}")
    groups = unit_groups(model)
    for name, n in keep.items():
        if name not in groups:
            raise SpecError(f"channel_prune edit: unknown unit group {name!r}; valid: "
                            f"{', '.join(groups)}")
        units = group_units(model, groups[name])
        if not 1 <= n <= units:
            raise SpecError(f"channel_prune edit: keep must be in [1, {units}] for {name!r}, "
                            f"got {n}")
        prune_units(model, groups[name], torch.arange(n))
