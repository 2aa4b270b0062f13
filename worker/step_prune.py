"""The pruning steps `snip`, `random`, `magnitude` and `synflow` (seed 004 ch. 3-4; SynFlow from
seed 002's comparison): one mask over every Linear/Conv2d weight, kept through every later train
step (`ctx.masks`, enforced by `core.train.train`) and stored compactly in the checkpoint.

Order inside the step: optional re-initialisation (`init`), the Jacobian of the dense net at
that point, scoring, the mask (exactly kappa kept), the layer-collapse check (before any
training), the optional data-free approximate-isometry repair, and the Jacobian of the pruned
net. A `target: {"nonzero_params": n}` becomes the sparsity right after the re-initialisation
(`core.prune.sparsity_for_budget`); the masked (and repaired) model's count, as training can
leave it (`core.prune.trained_nonzero`), is measured and reported in `budget`. A model that is
already pruned keeps its pruned weights pruned: they score below every live weight.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from core.configs import PruneConfig
from core.errors import SpecError
from core.prune import (
    apply_masks,
    collapsed_layers,
    layer_report,
    linearise_activations,
    prunable,
    prune_masks,
    sparsity_for_budget,
    trained_nonzero,
)
from core.sigprop import (
    approximate_isometry,
    init_ldi,
    init_variance_scaling,
    jacobian_singular_values,
    orthogonality_score,
    retained_input_heatmap,
)
from service.methods.prune import PruneStep
from worker.context import StepContext, config_from_spec, input_map, untouched_layers
from worker.plots import DPI, plot
from worker.registry import handler

JACOBIAN_SAMPLES = 16  # validation images the input-output Jacobian is measured on


def _scoring_batches(ctx: StepContext, step: PruneStep) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` seeded random batches of the training split (SNIP's labelled batches)."""
    train = ctx.splits.train
    need = step.batches * step.batch_size
    if need > len(train):
        raise SpecError(f"snip needs batches * batch_size = {need} training samples, the "
                        f"training split has {len(train)}; lower batches or batch_size")
    order = torch.randperm(len(train), generator=ctx.generator)[:need]
    return [(train.x[idx], train.y[idx]) for idx in order.split(step.batch_size)]


def _jacobian(ctx: StepContext) -> dict[str, Any]:
    x = ctx.splits.val.x[:JACOBIAN_SAMPLES]
    stats = jacobian_singular_values(ctx.model, x.to(ctx.device))
    return {k: v for k, v in stats.items() if k != "values"}


def _init(ctx: StepContext, step: PruneStep) -> None:
    if step.init == "variance_scaling":
        init_variance_scaling(ctx.model, ctx.generator)
    elif step.init == "ldi":
        init_ldi(ctx.model, ctx.generator)


def _collapse_error(step: PruneStep, sparsity: float, collapsed: list[str]) -> SpecError:
    hints = ["a lower sparsity" if step.target is None else "a larger nonzero_params budget"]
    if step.scope == "global":
        hints.append("scope 'layerwise'")
    if step.op != "synflow":
        hints.append("op 'synflow' (designed to avoid collapse)")
    if step.init is None and step.op == "snip":
        hints.append("init 'variance_scaling' or 'ldi'")
    shown = sparsity if step.target is None else f"{sparsity:.6g} (for its target)"
    return SpecError(f"{step.op} at sparsity {shown} leaves no weight in layer(s) "
                     f"{', '.join(collapsed)} (layer collapse: the network would output a "
                     f"constant); try {', '.join(hints)}, or set allow_collapse: true to "
                     "train it anyway")


@handler(PruneStep)
def run_prune(ctx: StepContext, step: PruneStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, f"{step.op}: scoring")
    _init(ctx, step)
    sparsity = step.sparsity if step.target is None else \
        sparsity_for_budget(ctx.model, step.target.nonzero_params, step.scope)
    assert sparsity is not None  # the spec gives exactly one of sparsity, target
    config = dataclasses.replace(config_from_spec(PruneConfig, step), sparsity=sparsity)
    jacobian_dense = _jacobian(ctx)
    start = time.perf_counter()
    scoring: dict[str, Any] = {}
    masks = prune_masks(ctx.model, config,
                        batches=_scoring_batches(ctx, step) if step.op == "snip" else None,
                        generator=ctx.generator, input_shape=ctx.input_shape,
                        previous=ctx.masks, device=ctx.device, report=scoring)
    scoring_wall_s = time.perf_counter() - start
    report = layer_report(masks)
    collapsed = collapsed_layers(masks)
    if collapsed and not step.allow_collapse:
        raise _collapse_error(step, sparsity, collapsed)
    ctx.check_cancel()
    apply_masks(ctx.model, masks)
    ctx.masks = masks
    details: dict[str, Any] = {
        "sparsity": sparsity, "scope": step.scope, "init": step.init,
        "kept": sum(int(r["kept"]) for r in report.values()),
        "prunable": sum(int(r["total"]) for r in report.values()),
        "layers": report, "collapsed": collapsed, "scoring_wall_s": scoring_wall_s,
        "untouched": untouched_layers(ctx.model, step.op)}
    if scoring.get("zero_score_layers"):
        details["zero_score_layers"] = scoring["zero_score_layers"]
        details["zero_score_note"] = (
            "the all-ones input of SynFlow does not reach these layers (e.g. a LayerNorm of the "
            "constant input with a zero bias before them): their scores are all 0 and the "
            "weights they keep are ties (lowest index first); snip or magnitude scores them")
    if step.op == "synflow" and (relu := linearise_activations(copy.deepcopy(ctx.model))):
        details["activations_as_relu"] = relu
        details["activations_note"] = (
            f"{relu} saturating activation(s) of the imported graph (ReLU6, clamp, sigmoid, "
            "tanh) ran as ReLU while scoring: SynFlow's linearised network is all positive, "
            "where a saturating activation would zero every gradient")
    if step.op == "snip":
        details |= {"labels": step.labels, "batches": step.batches,
                    "batch_size": step.batch_size}
    if step.repair == "ai":
        ctx.reporter.progress(0.5, f"{step.op}: approximate-isometry repair")
        details["repair"] = {"method": "ai"} | approximate_isometry(ctx.model, masks)
    else:
        details["orthogonality_score"] = orthogonality_score(ctx.model, masks)
    if step.target is not None:  # measured on the masked (and repaired) model, as trained
        goal, value = step.target.nonzero_params, trained_nonzero(ctx.model, masks)
        details["budget"] = {"kind": "nonzero_params", "goal": goal, "value": value,
                             "knob": sparsity, "fraction": value / goal, "evaluations": 1}
    details["jacobian"] = {"dense": jacobian_dense, "pruned": _jacobian(ctx)}
    first_name, first = prunable(ctx.model)[0]
    record = {"step": ctx.step_index, "op": step.op, "sparsity": sparsity,
              "scope": step.scope, "global_epoch": ctx.global_epoch,
              "layers": {n: {"kept": int(r["kept"]), "total": int(r["total"]),
                             "fraction": float(r["fraction"])} for n, r in report.items()},
              "collapsed": collapsed, "jacobian": details["jacobian"],
              "first_layer": first_name} | _heatmap(ctx, first, masks[first_name])
    ctx.emit("pruning", record)
    del first
    return details


def _heatmap(ctx: StepContext, first: nn.Module, mask: torch.Tensor) -> dict[str, Any]:
    """The first layer's retained inputs (a Linear reading the flattened input) or kernel taps
    (a conv); none when its first Linear reads something else (an imported model that embeds
    patches or tokens before its first Linear)."""
    if isinstance(first, nn.Linear) and mask.shape[1] != math.prod(ctx.input_shape):
        return {"heatmap_of": "none: the first layer does not read the input itself",
                "heatmap": None}
    heatmap = retained_input_heatmap(mask.cpu(), ctx.input_shape)
    linear = isinstance(first, nn.Linear)
    return {"heatmap_of": "inputs" if linear else "kernel taps",
            "heatmap": [[round(float(v), 5) for v in row] for row in
                        (input_map(heatmap, ctx.layout) if linear else heatmap.mean(0))]}


@plot("pruning.png")
def pruning_plot(curves: dict[str, Any], path: Path) -> bool:
    """Kept fraction per layer and the first layer's retained-input heatmap, one row per
    pruning step; False (nothing written) when nothing was pruned."""
    records = curves.get("pruning") or []
    if not records:
        return False
    fig = Figure(figsize=(11, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 2, squeeze=False,
                        gridspec_kw={"width_ratios": [2.2, 1]})
    for (bars, heat), rec in zip(axes, records, strict=False):
        names = list(rec["layers"])
        fractions = [rec["layers"][n]["fraction"] for n in names]
        colors = ["tab:red" if n in rec.get("collapsed", []) else "tab:blue" for n in names]
        bars.bar(range(len(names)), fractions, color=colors)
        bars.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        bars.set_ylabel("kept fraction")
        bars.set_ylim(0, max(1e-3, max(fractions) * 1.15))
        title = (f"step {rec['step'] + 1}: {rec['op']} ({rec['scope']}), "
                 f"sparsity {rec['sparsity']:g}")
        jac = rec.get("jacobian") or {}
        if "dense" in jac and "pruned" in jac:
            title += (f"\nJacobian mean singular value {jac['dense']['mean']:.3g} (dense) → "
                      f"{jac['pruned']['mean']:.3g} (pruned)")
        bars.set_title(title, fontsize="medium")
        bars.grid(alpha=0.3, axis="y")
        if rec.get("heatmap") is None:
            heat.axis("off")
            heat.set_title(f"{rec['first_layer']}: no retained-input map "
                           f"({rec.get('heatmap_of', '')})", fontsize="small")
            continue
        image = heat.imshow(rec["heatmap"], cmap="viridis", vmin=0)
        heat.set_title(f"{rec['first_layer']}: retained {rec.get('heatmap_of', 'inputs')}",
                       fontsize="small")
        heat.set_xticks([])
        heat.set_yticks([])
        fig.colorbar(image, ax=heat, shrink=0.8)
    fig.savefig(path, format="png")
    return True
