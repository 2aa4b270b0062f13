"""The `dctps` step (seed 002, ALGORITHMS.md §5): every chosen Linear/Conv2d becomes
`alpha * D + S` (`core.dctps.dctps_transform`): D the fixed DCT of the layer's shape (a
non-persistent buffer: never stored in a checkpoint, never trained), S zero-initialised sparse
values on a fixed random support of `round(density * weights)` entries split over the layers by
`allocation`, alpha a trainable (or fixed) scalar per layer. A `target` (`nonzero_params` or
`trainable_params` of the whole model) picks the density that lands on it
(`core.dctps_target`), reported with the measured value in `budget`. The original weights are
discarded, biases kept. A following `train` step trains only S's values, alpha and the biases
(the support never changes); the paper trains with Adam, lr 1e-3, weight decay 5e-4.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from core.configs import DCTpSConfig
from core.dctps import DEFAULT_DENSITY
from core.dctps_target import dctps_apply_target
from core.errors import SpecError
from core.metrics import fixed_dct_params
from core.models import layer_weight, save, set_masks
from core.train import evaluate
from service.methods.dctps import DCTpSStep
from worker.context import (
    StepContext,
    chosen_layers,
    config_from_spec,
    dense_layers,
    keep_valid_masks,
    untouched_layers,
)
from worker.plots import DPI, plot
from worker.registry import handler


def _layers(ctx: StepContext, step: DCTpSStep) -> list[str] | None:
    """None = every plain Linear/Conv2d (the core's default); else the checked names."""
    if step.layers == "all":
        if not dense_layers(ctx.model):
            raise SpecError("dctps found no plain Linear/Conv2d layer to transform (are they "
                            "all DCTpS, PCN or low-rank layers already?)")
        return None
    return chosen_layers(ctx.model, step.layers, "dctps layers", op="dctps")


def checkpoint_size(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> int:
    """Bytes of the safetensors file `core.models.save` writes for `model` (with `masks`)."""
    clone = copy.deepcopy(model).cpu()
    set_masks(clone, masks)
    with tempfile.TemporaryDirectory(prefix="slimline-dctps-") as tmp:
        path = Path(tmp) / "model.safetensors"
        save(clone, path)
        return path.stat().st_size


@handler(DCTpSStep)
def run_dctps(ctx: StepContext, step: DCTpSStep) -> dict[str, Any]:
    density = DEFAULT_DENSITY if step.density is None else step.density
    ctx.reporter.progress(0.0, f"dctps: {step.allocation} allocation, " + (
        f"density {density:g}" if step.target is None else
        f"target {step.target.model_dump(exclude_none=True)}"))
    layers = _layers(ctx, step)
    untouched = untouched_layers(ctx.model, "dctps")  # every Linear/Conv2d applies today
    dense_bytes = sum(layer_weight(ctx.model, n).numel()
                      * layer_weight(ctx.model, n).element_size()
                      for n in (layers or dense_layers(ctx.model)))
    report = dctps_apply_target(ctx.model, config_from_spec(DCTpSConfig, step),
                                generator=ctx.generator, masks=ctx.masks)
    if "budget" in report:
        density = report["budget"]["knob"]
    ctx.model.to(ctx.device)
    dropped_masks = keep_valid_masks(ctx)
    ctx.reporter.progress(0.5, "dctps: measuring the transformed model")
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
    fixed = fixed_dct_params(ctx.model)
    details: dict[str, Any] = {
        "density": density, "allocation": step.allocation, "alpha": step.alpha,
        "layers": report["layers"], "total_weights": report["total_weights"],
        "total_nnz": report["total_nnz"], "actual_density": report["density"],
        "fixed_dct_params": fixed,
        "params_note": ("params count S's values, alpha and biases (and every other layer); "
                        "the fixed DCT matrices D (fixed_dct_params entries) are buffers "
                        "rebuilt from the layer shapes, never stored nor trained, and are not "
                        "counted. S starts at zero, so nonzero grows only with training."),
        "val_accuracy": val,
        "checkpoint_bytes": checkpoint_size(ctx.model, ctx.masks),
        "dense_weight_bytes": dense_bytes, "untouched": untouched}
    if "budget" in report:
        details["budget"] = report["budget"]
    if dropped_masks:
        details["masks_dropped"] = dropped_masks
    record = {"step": ctx.step_index, "global_epoch": ctx.global_epoch,
              "density": density, "allocation": step.allocation,
              "alpha": step.alpha,
              "total_weights": report["total_weights"], "total_nnz": report["total_nnz"],
              "layers": {n: {k: r[k] for k in ("shape", "weights", "nnz", "density")}
                         for n, r in report["layers"].items()}}
    ctx.emit("dctps", record)
    return details


@plot("dctps.png")
def dctps_plot(curves: dict[str, Any], path: Path) -> bool:
    """Trainable entries (nnz) and density per layer, one row per dctps step."""
    records = curves.get("dctps") or []
    if not records:
        return False
    fig = Figure(figsize=(11, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 2, squeeze=False)
    for (nnz_ax, density_ax), rec in zip(axes, records, strict=False):
        names = list(rec["layers"])
        xs = list(range(len(names)))
        nnz = [max(rec["layers"][n]["nnz"], 0.5) for n in names]
        density = [max(rec["layers"][n]["density"], 1e-7) for n in names]
        nnz_ax.bar(xs, nnz, color="tab:blue")
        nnz_ax.set_yscale("log")
        nnz_ax.set_ylim(0.5, max(nnz) * 3)  # bars from the bottom, not auto-zoomed to equal
        nnz_ax.set_ylabel("trainable entries of S (nnz)")
        for x, v in zip(xs, nnz, strict=False):
            nnz_ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize="x-small")
        density_ax.bar(xs, density, color="tab:orange")
        density_ax.set_yscale("log")
        density_ax.set_ylim(min(density) / 3, 1.5)
        density_ax.set_ylabel("layer density (nnz / weights)")
        density_ax.axhline(rec["total_nnz"] / max(1, rec["total_weights"]), color="black",
                           linestyle="--", linewidth=1, label="overall density")
        density_ax.legend(fontsize="small")
        for ax in (nnz_ax, density_ax):
            ax.set_xticks(xs, names, rotation=45, ha="right", fontsize="small")
            ax.grid(alpha=0.3, axis="y")
        nnz_ax.set_title(f"step {rec['step'] + 1}: dctps {rec['allocation']}, density "
                         f"{rec['density']:g} ({rec['total_nnz']} of {rec['total_weights']} "
                         "weights trainable)", fontsize="medium")
    fig.savefig(path, format="png")
    return True
