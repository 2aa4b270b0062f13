"""The `pcn` step: statistics (one forward pass, only the kept components), the input and
output-based transform or a target search, and what it reports; and its plateau hook, which
applies a `when: "plateau"` pcn step inside the train step right before it (worker.steps has
the rule)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.configs import PCNConfig
from core.errors import SpecError
from core.models import get_layer, layer_weight
from core.pca import LayerStats, collect_input_stats
from core.pcn import layer_selector
from core.pcn_budget import SHAPE_KINDS, pcn_minimum, refuse_below
from core.pcn_graph import shared_input_sets
from core.pcn_output import apply_pcn, plan_pcn
from core.pcn_select import pcn_transform_to_budget, pcn_transform_to_target
from core.train import evaluate
from service.methods.pcn import PCNStep
from worker.context import (
    SPECTRUM_MAX,
    StepContext,
    TrainHook,
    calibration_set,
    chosen_layers,
    config_from_spec,
    keep_valid_masks,
    model_metrics,
    untouched_layers,
)
from worker.registry import handler, train_hook

PLATEAU_DELTA = 0.005
PLATEAU_MIN_EPOCHS = 1


def _chosen_layers(ctx: StepContext, step: PCNStep) -> list[str]:
    """The layers to transform, checked before any statistics are collected."""
    layers = chosen_layers(ctx.model, step.layers, "pcn layers", op="pcn")
    if not layers:
        untouched = untouched_layers(ctx.model, "pcn")
        raise SpecError("pcn found no plain Linear/Conv2d layer to transform (layers that are "
                        "already PCN, low-rank or DCTpS layers are not transformed again"
                        + (f"; left untouched: {', '.join(untouched)}" if untouched else "")
                        + "); run pcn before lowrank/dctps, or give its layers")
    extra = sorted(set(step.per_layer) - set(layers))
    if extra:
        raise SpecError(f"per_layer names layers that are not transformed: {extra}; "
                        f"transformed layers ({'auto' if step.layers == 'auto' else 'given'}): "
                        f"{', '.join(layers)}")
    return layers


def _collect_stats(ctx: StepContext, config: PCNConfig, layers: list[str],
                   timings: dict[str, float] | None = None) -> dict[str, LayerStats]:
    """One forward pass; one PCA per tensor (layers reading one tensor share it: core fills in
    the partners).

    Default (solver 'auto', no top_k): only the kept components — each tensor's eigenpairs are
    computed until its layers' selectors are decided (`core.pca.selector_enough`), through the
    N x N Gram matrix where a layer sees fewer samples than dims. A target search compares
    directions over the whole spectrum, so it computes every component (Gram route where
    N < m). `top_k` / `solver` override both."""
    shared = {n: tensor[0] for tensor in shared_input_sets(ctx.model) for n in tensor}
    stat_layers = list(dict.fromkeys(shared.get(n, n) for n in layers))
    top_k = config.top_k
    keep: dict[str, list[dict[str, Any]]] | None = None
    if top_k is None and config.solver == "auto":
        if config.target is None:
            select = config.selector()
            keep = {}
            for name in layers:
                layer = get_layer(ctx.model, name)
                kind = "linear" if isinstance(layer, nn.Linear) else "conv"
                keep.setdefault(shared.get(name, name), []).append(
                    layer_selector(select, name, kind))
        else:
            top_k = max(layer_weight(ctx.model, n).shape[1] for n in stat_layers)
    return collect_input_stats(ctx.model, stat_layers, calibration_set(ctx, config.samples),
                               samples=config.samples, batch_size=config.batch_size,
                               device=ctx.device, top_k=top_k, solver=config.solver, keep=keep,
                               max_rows=config.max_rows, timings=timings,
                               generator=torch.Generator().manual_seed(
                                   ctx.generator.initial_seed()))


def _budget_reason(search: dict[str, Any]) -> str:
    kind, goal, value = search["kind"], search["goal"], int(search["value"])
    dims = ", ".join(f"{n} {d}" for n, d in search["dims"].items())
    if search["capped"]:
        return (f"every input direction with variance is kept ({dims} dims): {kind} {value:,} "
                f"is below the budget {goal:,}, which allows more than the layers hold")
    cost = ", ".join(f"{n} {c:,}" for n, c in search["marginal_cost"].items())
    return (f"dims per layer ({dims}) taken greedily, the direction explaining the most of its "
            f"layer's input variance per {kind} it costs first (one more dim costs {cost}), "
            f"as many as fit: the measured {kind} {value:,} is at or below the budget {goal:,} "
            f"({100 * value / goal:.1f}%)")


def _search_summary(search: dict[str, Any]) -> dict[str, Any]:
    if "dims" in search:  # a size target: core.pcn_budget
        keys = ("kind", "goal", "value", "knob", "fraction", "evaluations", "dims", "minimum")
        summary = {k: search[k] for k in keys}
        summary["value"] = int(search["value"])
        summary["reason"] = _budget_reason(search)
        return summary
    (kind, goal), = search["target"].items()
    summary = {"kind": kind, "goal": goal, "threshold": search["threshold"],
               "value": search["value"], "trials": len(search["trials"])}
    summary["baseline"] = search["baseline"]
    summary["reason"] = (f"the largest common eigenvalue threshold on the search grid whose "
                         f"validation accuracy without retraining ({search['value']:.4f}) "
                         f"is >= baseline {search['baseline']:.4f} - {goal}")
    return summary


def transform(ctx: StepContext, step: PCNStep, step_index: int) -> dict[str, Any]:
    """Statistics → transform (input, and output-based where it pays) → metrics right after it.
    Replaces ctx.model; returns the pcn step's op-specific result."""
    ctx.reporter.progress(0.0, "pcn: collecting activation statistics")
    layers = _chosen_layers(ctx, step)
    untouched = untouched_layers(ctx.model, "pcn")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    config = config_from_spec(PCNConfig, step)
    target = config.target
    (kind, goal), = (target or {"": 0}).items()
    if kind in SHAPE_KINDS and not config.output_based:
        # the smallest model it can build, from shapes alone: a budget below it is refused
        # now rather than after the statistics pass
        refuse_below(kind, goal, pcn_minimum(ctx.model, kind, layers,
                                             input_shape=ctx.input_shape), layers, False)
    stats = _collect_stats(ctx, config, layers, timings)
    stats_wall_s = time.perf_counter() - start
    ctx.check_cancel()
    ctx.reporter.progress(0.5, "pcn: transforming layers")
    output = "auto" if config.output_based else None
    start = time.perf_counter()
    if target is not None and "max_accuracy_drop" not in target:
        (kind, goal), = target.items()
        new_model, report = pcn_transform_to_budget(
            ctx.model, stats, kind, goal, layers, output=output, input_shape=ctx.input_shape)
    elif target is not None:
        new_model, report = pcn_transform_to_target(
            ctx.model, stats, target, layers, output=output, val_dataset=ctx.splits.val,
            device=ctx.device)
    else:
        plan = plan_pcn(ctx.model, stats, config.selector(), layers, output=output)
        new_model, report = apply_pcn(ctx.model, plan, stats)
    surgery_wall_s = time.perf_counter() - start
    ctx.model = new_model.to(ctx.device)
    dropped_masks = keep_valid_masks(ctx)
    for name, st in stats.items():
        spectrum = {"step": step_index, "layer": name, "global_epoch": ctx.global_epoch,
                    "source": "pcn", "in_dim": st.dim,
                    "dims": report["input"].get(name, {}).get("dims"), "samples": st.count,
                    "eigvals": [float(v) for v in st.eigvals[:SPECTRUM_MAX]]}
        ctx.emit("spectrum", spectrum)
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
    details: dict[str, Any] = {
        "layers": {name: {"in_dim": r["in_dim"], "dims": r["dims"],
                          "explained_variance": r["explained_variance"]}
                   for name, r in report["input"].items()},
        "output": {group: {"units": r["units"], "keep": r["keep"], "kept": r["kept"]}
                   for group, r in report["output"].items()},
        "layer_selection": "auto" if step.layers == "auto" else "given",
        "untouched": untouched,
        "samples": min(step.samples, len(ctx.splits.train)),
        "stats_wall_s": stats_wall_s, "surgery_wall_s": surgery_wall_s,
        # of stats_wall_s: the forward pass with accumulation, and the eigensolvers
        "stats_pass_s": timings.get("pass_s"), "stats_solve_s": timings.get("solve_s"),
        "transform_wall_s": stats_wall_s + surgery_wall_s,
        "after_transform": model_metrics(ctx.model, ctx.input_shape, ctx.splits.test,
                                         ctx.device) | {"val_accuracy": val},
        "when": step.when}
    if dropped_masks:
        details["masks_dropped"] = dropped_masks
    if step.output_based and not report["output"]:
        details["output_note"] = ("no unit group qualified: output units are pruned only where "
                                  "every reading layer's input is compressed >= 10x")
    if "search" in report:
        details["target"] = _search_summary(report["search"])
    return details


def record_transform(ctx: StepContext, step_index: int, details: dict[str, Any]) -> None:
    """The `pcn` event / curves entry: where a transform was applied and what it kept."""
    data = {"step": step_index, "global_epoch": ctx.global_epoch, "when": details["when"],
            "fired_at_epoch": details.get("fired_at_epoch"),
            "layers": {n: r["dims"] for n, r in details["layers"].items()},
            "output": {g: r["keep"] for g, r in details["output"].items()}}
    if details.get("untouched"):  # layers the transform cannot replace, with the reason
        data["untouched"] = details["untouched"]
    ctx.emit("pcn", data)


@handler(PCNStep)
def run_pcn(ctx: StepContext, step: PCNStep) -> dict[str, Any]:
    if step.when == "plateau":  # applied inside the preceding train step
        details = ctx.applied.pop(ctx.step_index, None)
        if details is None:
            raise SpecError(f"steps[{ctx.step_index}]: a pcn step with when: 'plateau' must "
                            "directly follow a train step")
        val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
        return details | {"val_accuracy": val}
    details = transform(ctx, step, ctx.step_index)
    record_transform(ctx, ctx.step_index, details)
    return details | {"val_accuracy": details["after_transform"]["val_accuracy"]}




# ---- when: "plateau" -----------------------------------------------------------------------

@dataclass
class PlateauWatch:
    """Fires after the first epoch >= min_epochs whose val-accuracy gain is < delta, once
    validation accuracy has risen above where the step started (a model that has not started
    learning is not on a plateau). Stored as a dict in the train step's checkpoints."""

    delta: float
    min_epochs: int
    previous: float
    fired_at: int | None = None
    start: float | None = None

    def __post_init__(self) -> None:
        self.start = self.previous

    def update(self, epoch: int, val_accuracy: float | None) -> bool:
        if self.fired_at is not None or val_accuracy is None:
            return False
        gain, self.previous = val_accuracy - self.previous, val_accuracy
        learning = self.start is None or val_accuracy > self.start
        if epoch >= self.min_epochs and gain < self.delta and learning:
            self.fired_at = epoch
            return True
        return False


class PlateauHook(TrainHook):
    """A `when: "plateau"` pcn step, run by the train step before it: the transform applies
    after the epoch the watch fires at (or after the last one), its result waits in
    `ctx.applied` for the pcn step's own turn (`run_pcn`)."""

    key = "pcn"

    def __init__(self, step: PCNStep, step_index: int) -> None:
        self.step, self.step_index = step, step_index
        self.watch: PlateauWatch | None = None

    def start(self, ctx: StepContext) -> None:
        self.watch = PlateauWatch(self.step.plateau_delta or PLATEAU_DELTA,
                                  self.step.plateau_min_epochs or PLATEAU_MIN_EPOCHS,
                                  evaluate(ctx.model, ctx.splits.val,
                                           device=ctx.device)["accuracy"])

    def state(self) -> dict[str, Any] | None:
        return dataclasses.asdict(self.watch) if self.watch else None

    def restore(self, state: dict[str, Any] | None) -> bool:
        self.watch = PlateauWatch(**state) if state else None
        return self.watch is not None

    def stop_after(self, epoch: int, record: dict[str, Any]) -> bool:
        assert self.watch is not None
        return self.watch.update(epoch, record["val_accuracy"])

    def apply_after(self, epochs: int) -> int:
        assert self.watch is not None
        return self.watch.fired_at or epochs

    def done(self, ctx: StepContext) -> bool:
        return self.step_index in ctx.applied

    def apply(self, ctx: StepContext, after_epoch: int, epochs: int) -> None:
        watch = self.watch
        assert watch is not None
        applied = transform(ctx, self.step, self.step_index)
        plateau_info: dict[str, Any] = {"delta": watch.delta, "min_epochs": watch.min_epochs,
                                        "fired": watch.fired_at is not None}
        if watch.fired_at is None:
            plateau_info["note"] = (
                f"validation accuracy never rose by less than {watch.delta} in an epoch "
                f">= {watch.min_epochs} after rising above its start; applied after the "
                f"last epoch ({epochs})")
        applied |= {"when": "plateau", "fired_at_epoch": watch.fired_at,
                    "applied_after_epoch": after_epoch, "applied_in_step": ctx.step_index,
                    "plateau": plateau_info}
        ctx.applied[self.step_index] = applied
        record_transform(ctx, self.step_index, applied)

    def summary(self, after_epoch: int) -> dict[str, Any]:
        assert self.watch is not None
        return {"step": self.step_index, "fired_at_epoch": self.watch.fired_at,
                "applied_after_epoch": after_epoch}


@train_hook(PCNStep)
def plateau_hook(ctx: StepContext, step: PCNStep, step_index: int) -> PlateauHook | None:
    return PlateauHook(step, step_index) if step.when == "plateau" else None
