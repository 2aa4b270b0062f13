"""The `channel_prune` step: whole units scored (l1 or taylor), removed per coupled group until
the param/MAC ratio or the absolute whole-model budget (`total_params`, `nonzero_params`,
`trainable_params`, `macs`; the result's `budget`) is met (`core.channel_prune`), so the model
is physically narrower; its
checkpoint rebuilds from the arch's `channel_prune` edit. Fine-tuning is a normal `train` step
after it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from core.channel_prune import ChannelPruneConfig, channel_prune
from core.train import evaluate
from service.methods.channel_prune import ChannelPruneStep
from worker.context import (
    StepContext,
    calibration_set,
    config_from_spec,
    keep_valid_masks,
    model_metrics,
)
from worker.plots import DPI, plot
from worker.registry import handler


@handler(ChannelPruneStep)
def run_channel_prune(ctx: StepContext, step: ChannelPruneStep) -> dict[str, Any]:
    config = config_from_spec(ChannelPruneConfig, step)
    ctx.reporter.progress(0.0, f"channel_prune: scoring ({step.criterion}) and selecting")
    calib = calibration_set(ctx, step.samples) if step.criterion == "taylor" else None
    start = time.perf_counter()
    # the job's pruning masks (never a stale `slimline_masks` of the model) cut with their layers
    new_model, report = channel_prune(ctx.model, config, data=calib, device=ctx.device,
                                      masks=ctx.masks or {})
    wall_s = time.perf_counter() - start
    ctx.model = new_model.to(ctx.device)
    if ctx.masks:
        ctx.masks = getattr(new_model, "slimline_masks", None)
    dropped_masks = keep_valid_masks(ctx)
    ctx.check_cancel()
    groups = {g: {"total": r["total"], "kept": r["kept"]} for g, r in report["groups"].items()}
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
    details: dict[str, Any] = {
        "criterion": step.criterion, "scope": step.scope, "round_to": step.round_to,
        "target": report["target"], "ratio": report["ratio"],
        "groups": {g: groups[g] | {"keep": r["keep"]} for g, r in report["groups"].items()},
        "params_before": report["params"]["before"], "params_after": report["params"]["after"],
        "macs_before": report["macs"]["before"], "macs_after": report["macs"]["after"],
        "samples": len(calib) if calib is not None else None, "prune_wall_s": wall_s,
        "after_prune": model_metrics(ctx.model, ctx.input_shape, ctx.splits.test, ctx.device)
        | {"val_accuracy": val}}
    if "budget" in report:  # an absolute target: measured on the pruned model
        details["budget"] = report["budget"]
    if dropped_masks:
        details["masks_dropped"] = dropped_masks
    ctx.emit("channel_prune", {"step": ctx.step_index, "global_epoch": ctx.global_epoch,
                               "criterion": step.criterion, "target": report["target"],
                               "ratio": report["ratio"], "groups": groups})
    return details


@plot("channel_prune.png")
def channel_prune_plot(curves: dict[str, Any], path: Path) -> bool:
    """Kept units / total units per group, one panel per channel_prune step; False when there
    was none."""
    records = curves.get("channel_pruning") or []
    if not records:
        return False
    fig = Figure(figsize=(10, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 1, squeeze=False)
    for (ax,), rec in zip(axes, records, strict=True):
        names = list(rec["groups"])
        kept = [rec["groups"][n]["kept"] / max(1, rec["groups"][n]["total"]) for n in names]
        ax.bar(range(len(names)), kept)
        for x, n in enumerate(names):
            ax.annotate(f"{rec['groups'][n]['kept']}/{rec['groups'][n]['total']}",
                        (x, kept[x]), ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(list(range(len(names))), names, rotation=45, ha="right", fontsize="small")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("kept units / units")
        ax.grid(alpha=0.3, axis="y")
        (kind, goal), = rec["target"].items()
        ax.set_title(f"step {rec['step'] + 1}: channel_prune ({rec['criterion']}), {kind} "
                     f"{goal:g} -> {rec['ratio']:.3f}")
    fig.savefig(path, format="png")
    return True
