"""Step handlers: a registry `op -> handler(ctx, step) -> dict`; the runner never grows an if-chain.

A handler mutates `ctx.model` (or replaces it), reports progress through `ctx.reporter`, and
returns its op-specific metrics. The runner adds the common ones (`op`, `wall_s`, `params`,
`macs`, `accuracy`) after every step.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from core.data import ArrayDataset, Splits
from core.errors import Cancelled, SpecError
from core.metrics import count_macs, param_counts
from core.models import prunable_layers
from core.pca import collect_input_stats, effective_dimensionality
from core.pcn import pcn_input_transform
from core.train import TrainConfig, evaluate, train
from jobs.settings import Settings
from jobs.spec import EvaluateStep, PCNStep, TrainStep

# Effective-dimensionality curves (track: ["effective_dim"]): the paper's absolute threshold for
# MNIST-sized dense layers, plus the 99% variance count; on this many training samples per epoch.
TRACK_THRESHOLD = 0.1
TRACK_ENERGY = 0.99
TRACK_SAMPLES = 1000
SPECTRUM_MAX = 1024  # eigenvalues kept per layer in the curves


class Reporter(Protocol):
    """What a handler may tell the job: progress within the step, events, and cancellation."""

    def progress(self, fraction: float, stage: str) -> None: ...
    def event(self, kind: str, data: dict[str, Any]) -> None: ...
    def should_cancel(self) -> bool: ...


@dataclass
class StepContext:
    model: nn.Module
    splits: Splits
    input_shape: list[int]
    device: torch.device
    generator: torch.Generator
    settings: Settings
    job_id: str
    reporter: Reporter
    step_index: int = 0  # 0-based index of the running step
    step_count: int = 1
    # curves: {"training": [...], "effective_dim": {layer: [...]}, "spectra": {layer: [...]}}
    curves: dict[str, Any] = field(default_factory=lambda: {
        "training": [], "effective_dim": {}, "spectra": {}})

    def check_cancel(self) -> None:
        if self.reporter.should_cancel():
            raise Cancelled(f"canceled before step {self.step_index + 1}/{self.step_count}")


def model_metrics(model: nn.Module, input_shape: list[int], test: ArrayDataset,
                  device: torch.device) -> dict[str, Any]:
    """The metrics recorded before, after and between steps: params, MACs, test accuracy."""
    return {"params": param_counts(model), "macs": count_macs(model, input_shape),
            "accuracy": evaluate(model, test, device=device)["accuracy"]}


def _dense_layers(model: nn.Module) -> list[str]:
    """Plain Linear/Conv2d layers in forward order (PCN layers are already transformed)."""
    return [n for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))]


def _calibration_set(ctx: StepContext, samples: int) -> ArrayDataset:
    """A seeded random subset of the training split (collect_input_stats reads the first N)."""
    train_set = ctx.splits.train
    order = torch.randperm(len(train_set), generator=ctx.generator)
    return train_set.subset(order[:min(samples, len(train_set))])


def _track_effective_dim(ctx: StepContext, epoch: int) -> dict[str, int]:
    layers = _dense_layers(ctx.model)
    stats = collect_input_stats(ctx.model, layers, _calibration_set(ctx, TRACK_SAMPLES),
                                samples=TRACK_SAMPLES, device=ctx.device)
    dims = {}
    for name, st in stats.items():
        dims[name] = effective_dimensionality(st.eigvals, threshold=TRACK_THRESHOLD)
        ctx.curves["effective_dim"].setdefault(name, []).append({
            "step": ctx.step_index, "epoch": epoch, "threshold": TRACK_THRESHOLD,
            "dims": dims[name], "in_dim": st.dim,
            "energy_dims": effective_dimensionality(st.eigvals, energy=TRACK_ENERGY)})
    return dims


def run_train(ctx: StepContext, step: TrainStep) -> dict[str, Any]:
    config = TrainConfig(epochs=step.epochs, optimizer=step.optimizer, lr=step.lr,
                         momentum=step.momentum, weight_decay=step.weight_decay,
                         batch_size=step.batch_size, lr_steps=tuple(step.lr_steps),
                         lr_gamma=step.lr_gamma, max_batches=step.max_batches)
    ctx.reporter.progress(0.0, f"train 0/{step.epochs}")

    def on_epoch(record: dict[str, Any]) -> None:
        record = {"step": ctx.step_index, **record}
        if "effective_dim" in step.track:
            record["effective_dim"] = _track_effective_dim(ctx, record["epoch"])
        ctx.curves["training"].append(record)
        ctx.reporter.event("epoch", record)
        ctx.reporter.progress(record["epoch"] / step.epochs,
                              f"train {record['epoch']}/{step.epochs}")

    history = train(ctx.model, ctx.splits, config, device=ctx.device, generator=ctx.generator,
                    on_epoch=on_epoch, should_cancel=ctx.reporter.should_cancel)
    last = history[-1]
    return {"epochs": step.epochs, "config": config.to_dict(),
            "train_loss": last["loss"], "train_accuracy": last["accuracy"],
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "history": history}


def run_evaluate(ctx: StepContext, step: EvaluateStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "evaluate")
    test = evaluate(ctx.model, ctx.splits.test, device=ctx.device, batch_size=step.batch_size)
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device, batch_size=step.batch_size)
    return {"loss": test["loss"], "accuracy": test["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"]}


def _core_select(step: PCNStep) -> dict[str, Any]:
    def plain(selector: Any) -> dict[str, Any]:
        return {k: v for k, v in selector.model_dump().items() if v is not None}

    select = plain(step.select)
    if step.per_layer:
        select["per_layer"] = {name: plain(s) for name, s in step.per_layer.items()}
    return select


def run_pcn(ctx: StepContext, step: PCNStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "pcn: collecting activation statistics")
    dense = _dense_layers(ctx.model)
    layers = dense[1:] if step.layers == "auto" else list(step.layers)
    unknown = [n for n in layers if n not in dense]
    if unknown:
        raise SpecError(f"pcn layers {unknown} are not Linear/Conv2d layers of the model; "
                        f"valid layers: {', '.join(dense)}")
    start = time.perf_counter()
    stats = collect_input_stats(ctx.model, layers, _calibration_set(ctx, step.samples),
                                samples=step.samples, batch_size=step.batch_size,
                                device=ctx.device)
    stats_wall_s = time.perf_counter() - start
    ctx.check_cancel()
    ctx.reporter.progress(0.5, "pcn: transforming layers")
    start = time.perf_counter()
    new_model, report = pcn_input_transform(ctx.model, stats, _core_select(step), layers)
    transform_wall_s = time.perf_counter() - start
    ctx.model = new_model.to(ctx.device)
    for name, st in stats.items():
        spectrum = {"step": ctx.step_index, "layer": name, "in_dim": st.dim,
                    "dims": report[name]["dims"], "samples": st.count,
                    "eigvals": [float(v) for v in st.eigvals[:SPECTRUM_MAX]]}
        ctx.curves["spectra"][name] = spectrum
        ctx.reporter.event("spectrum", spectrum)
    return {"layers": {name: {"in_dim": r["in_dim"], "dims": r["dims"],
                              "explained_variance": r["explained_variance"]}
                       for name, r in report.items()},
            "samples": min(step.samples, len(ctx.splits.train)),
            "stats_wall_s": stats_wall_s, "transform_wall_s": transform_wall_s}


Handler = Callable[[StepContext, Any], dict[str, Any]]

HANDLERS: dict[str, Handler] = {
    "train": run_train,
    "evaluate": run_evaluate,
    "pcn": run_pcn,
}


def handler_for(op: str) -> Handler:
    try:
        return HANDLERS[op]
    except KeyError:
        raise SpecError(f"unknown step op {op!r}; this worker runs: "
                        f"{', '.join(sorted(HANDLERS))}") from None


def run_step(ctx: StepContext, step: Any) -> dict[str, Any]:
    """Run one step and return `{op, wall_s, params, macs, accuracy, ...op-specific}`."""
    ctx.check_cancel()
    handler = handler_for(step.op)
    start = time.perf_counter()
    details = handler(ctx, step)
    wall_s = time.perf_counter() - start
    metrics = model_metrics(ctx.model, ctx.input_shape, ctx.splits.test, ctx.device)
    return {"op": step.op, "wall_s": wall_s, **metrics, **details}
