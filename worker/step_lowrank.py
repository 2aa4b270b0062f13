"""The `lowrank` step (seed 003): every chosen Linear/Conv2d viewed as a matrix (conv:
`(C_out, C_in*kh*kw)`), optionally blocked, SVD'd per block; the singular vectors are scored on
one global scale, the lowest-scoring ones dropped greedily until the parameter target
(`param_ratio`) or the MAC target (`mac_ratio`: the chosen layers' MACs per sample) is met (or
the given ranks are used; an absolute whole-model budget, `total_params` / `nonzero_params` /
`trainable_params` / `macs`, is fitted by `core.lowrank.fit_ranks` and reported in `budget`),
and each layer is materialised as a real factor pair
(`core.lowrank`). Fine-tuning is a normal `train` step after it. Layers lowrank cannot
factor (depthwise/grouped convs of an imported model) are left as they are and reported in
`untouched` with the reason.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from core.budget import BUDGET_KINDS, model_cost
from core.configs import LowRankConfig
from core.errors import SpecError
from core.lowrank import layer_positions, lowrank_plan, lowrank_transform
from core.prune import trained_nonzero
from core.train import evaluate
from service.methods.lowrank import LowRankStep
from worker.context import (
    StepContext,
    calibration_set,
    chosen_layers,
    config_from_spec,
    dense_layers,
    keep_valid_masks,
    model_metrics,
    untouched_layers,
)
from worker.plots import DPI, plot
from worker.registry import handler


def _layers(ctx: StepContext, step: LowRankStep) -> list[str]:
    """"all" = every plain Linear/Conv2d lowrank can factor (depthwise/grouped convs are left
    untouched and reported), else the checked names."""
    if step.layers == "all":
        untouched = untouched_layers(ctx.model, "lowrank")
        layers = [n for n in dense_layers(ctx.model) if n not in untouched]
    else:
        layers = chosen_layers(ctx.model, step.layers, "lowrank layers", op="lowrank")
    if not layers:
        raise SpecError("lowrank found no plain Linear/Conv2d layer to factor")
    return layers


@handler(LowRankStep)
def run_lowrank(ctx: StepContext, step: LowRankStep) -> dict[str, Any]:
    layers = _layers(ctx, step)
    untouched = untouched_layers(ctx.model, "lowrank")
    positions = layer_positions(ctx.model, layers, ctx.input_shape)
    config = config_from_spec(LowRankConfig, step)  # core's "all" = the same `layers`
    start = time.perf_counter()
    inputs = None
    if step.target.ranks is None:
        ctx.reporter.progress(0.0, f"lowrank: scoring ({step.score})")
        if step.score in ("output_perturbation", "output_variance"):
            inputs = calibration_set(ctx, step.samples).x.to(ctx.device)
    # given ranks checked against the layers, or scores selected to the param or MAC ratio
    # (or fitted to an absolute whole-model budget: `fitted["budget"]`)
    fitted: dict[str, Any] = {}
    plan = lowrank_plan(ctx.model, config, input_shape=ctx.input_shape, inputs=inputs,
                        report=fitted, masks=ctx.masks)
    scoring_wall_s = time.perf_counter() - start
    ctx.check_cancel()
    ctx.reporter.progress(0.5, "lowrank: factoring layers")
    new_model, report = lowrank_transform(ctx.model, plan)
    ctx.model = new_model.to(ctx.device)
    dropped_masks = keep_valid_masks(ctx)
    before = sum(r["weight_params_before"] for r in report.values())
    after = sum(r["weight_params_after"] for r in report.values())
    macs_before = sum(positions[n] * r["weight_params_before"] for n, r in report.items())
    macs_after = sum(positions[n] * r["weight_params_after"] for n, r in report.items())
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
    details: dict[str, Any] = {
        "score": step.score, "blocking": step.blocking,
        "target": step.target.model_dump(exclude_none=True),
        "layers": report, "weight_params_before": before, "weight_params_after": after,
        "weight_ratio": after / before if before else 1.0,
        "layer_macs_before": macs_before, "layer_macs_after": macs_after,
        "mac_ratio": macs_after / macs_before if macs_before else 1.0,
        "scoring_wall_s": scoring_wall_s, "untouched": untouched,
        "after_cut": model_metrics(ctx.model, ctx.input_shape, ctx.splits.test, ctx.device)
        | {"val_accuracy": val},
        "val_accuracy": val}
    met = None
    kind = next((k for k in BUDGET_KINDS if getattr(step.target, k) is not None), None)
    if kind is not None:  # the absolute budget, measured on the factored model itself
        goal = getattr(step.target, kind)
        value = trained_nonzero(ctx.model, ctx.masks) if kind == "nonzero_params" else \
            model_cost(ctx.model, kind, ctx.input_shape)
        details["budget"] = fitted["budget"] | {"goal": goal, "value": value,
                                                "fraction": value / goal}
        met = value <= goal
    elif step.target.param_ratio is not None:
        met = after <= step.target.param_ratio * before + 1e-9
    elif step.target.mac_ratio is not None:
        met = macs_after <= step.target.mac_ratio * macs_before + 1e-9
    if met is not None:
        details["target_met"] = met
        if not details["target_met"]:
            details["target_note"] = ("every block is at rank 1: the chosen layers cannot get "
                                      "smaller by truncation alone")
    if dropped_masks:
        details["masks_dropped"] = dropped_masks
    record: dict[str, Any] = {
        "step": ctx.step_index, "global_epoch": ctx.global_epoch, "score": step.score,
        "blocking": step.blocking,
        "layers": {n: {"ranks": r["ranks"], "full_ranks": r["full_ranks"],
                       "weight_params_before": r["weight_params_before"],
                       "weight_params_after": r["weight_params_after"]}
                   for n, r in report.items()}}
    if untouched:  # layers lowrank cannot factor, with the reason
        record["untouched"] = untouched
    ctx.emit("lowrank", record)
    return details


@plot("lowrank.png")
def lowrank_plot(curves: dict[str, Any], path: Path) -> bool:
    """Kept rank per layer (as a fraction of the full rank, summed over blocks) and the kept
    weight fraction, one panel per lowrank step; False when there was none."""
    records = curves.get("lowrank") or []
    if not records:
        return False
    fig = Figure(figsize=(10, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 1, squeeze=False)
    for (ax,), rec in zip(axes, records, strict=False):
        names = list(rec["layers"])
        rank = [sum(rec["layers"][n]["ranks"]) / max(1, sum(rec["layers"][n]["full_ranks"]))
                for n in names]
        weights = [rec["layers"][n]["weight_params_after"]
                   / max(1, rec["layers"][n]["weight_params_before"]) for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], rank, width=0.4, label="kept rank / full rank")
        ax.bar([x + 0.2 for x in xs], weights, width=0.4, label="weights after / before")
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize="small")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
        ax.set_title(f"step {rec['step'] + 1}: lowrank ({rec['score']}, blocking "
                     f"{rec['blocking']})")
    fig.savefig(path, format="png")
    return True
