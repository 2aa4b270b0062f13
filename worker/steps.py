"""Step handlers: a registry `op -> handler(ctx, step) -> dict`; the runner never grows an if-chain.

A handler mutates `ctx.model` (or replaces it), reports progress through `ctx.reporter`, and
returns its op-specific metrics. The runner adds the common ones (`op`, `wall_s`, `params`,
`macs`, `accuracy`) after every step.

Curves (`ctx.curves`, stored as `curves.json`, and rebuilt from the job's events by
`GET /v1/jobs/{id}/curves` in the same shape):
* `training`: one record per epoch `{step, epoch, global_epoch, loss, accuracy, val_loss,
  val_accuracy, lr, wall_s}` (event `epoch`); `global_epoch` counts epochs over all train steps.
* `effective_dim`: `{layer: [{step, epoch, global_epoch, in_dim, effective_dim: {tau: m_e},
  accuracy, val_accuracy}]}` (event `effective_dim`, from `track: ["effective_dim"]`).
* `spectra`: `{layer: [{step, epoch, global_epoch, source, in_dim, eigvals, ...}]}` — source
  `effective_dim` (tracking, top 256 eigenvalues) or `pcn` (the transform's PCA, top 1024).
* `transforms`: one record per pcn step (event `pcn`): where it was applied and what it kept.

`when: "plateau"` (a pcn step right after a train step): the train handler applies that pcn
step after the first epoch k >= plateau_min_epochs (default 1) whose validation-accuracy gain
`val_acc(k) - val_acc(k-1)` is below plateau_delta (default 0.005), provided val_acc(k) >
val_acc(0) (val_acc(0) = the model at the start of the step: a model that has not started
learning is not on a plateau). It then trains the remaining epochs of the step on the
transformed model (a fresh optimizer; lr and lr_steps continue where they were). If it never
fires, the transform is applied after the last epoch. The pcn step's record holds what the
transform did (`fired_at_epoch`, `applied_after_epoch`, metrics right after it).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from core.data import ArrayDataset, Splits
from core.dim_tracking import effective_dim_curve
from core.errors import Cancelled, SpecError
from core.metrics import count_macs, param_counts
from core.models import get_layer, prunable_layers
from core.pca import LayerStats, collect_input_stats
from core.pcn import PCNConv2d, PCNLinear
from core.pcn_graph import shared_input_sets
from core.pcn_output import pcn_transform
from core.pcn_select import auto_layers, pcn_transform_to_target
from core.train import TrainConfig, evaluate, train
from jobs.settings import Settings
from jobs.spec import EvaluateStep, PCNStep, TrainStep

# Effective-dimensionality tracking defaults (track: ["effective_dim"]): the paper's absolute
# threshold for MNIST-sized dense layers, on this many (fixed) training samples per epoch.
TRACK_THRESHOLDS = (0.1,)
TRACK_SAMPLES = 1000
TRACK_EIGVALS_MAX = 256  # eigenvalues kept per layer and epoch
SPECTRUM_MAX = 1024  # eigenvalues kept per layer of a pcn transform
PLATEAU_DELTA = 0.005
PLATEAU_MIN_EPOCHS = 1


class Reporter(Protocol):
    """What a handler may tell the job: progress within the step, events, and cancellation."""

    def progress(self, fraction: float, stage: str) -> None: ...
    def event(self, kind: str, data: dict[str, Any]) -> None: ...
    def should_cancel(self) -> bool: ...


def empty_curves() -> dict[str, Any]:
    return {"training": [], "effective_dim": {}, "spectra": {}, "transforms": [], "pruning": []}


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
    steps: list[Any] = field(default_factory=list)  # every step of the job (validated specs)
    # results of steps applied inside an earlier step (a `when: "plateau"` pcn), by index
    applied: dict[int, dict[str, Any]] = field(default_factory=dict)
    global_epoch: int = 0  # epochs trained so far over all train steps
    curves: dict[str, Any] = field(default_factory=empty_curves)

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


def _tracking_set(ctx: StepContext, samples: int) -> ArrayDataset:
    """The same training subset every epoch (its own generator: tracking must not change the
    order training sees)."""
    generator = torch.Generator().manual_seed(ctx.generator.initial_seed())
    order = torch.randperm(len(ctx.splits.train), generator=generator)
    return ctx.splits.train.subset(order[:min(samples, len(ctx.splits.train))])


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


# ---- train ----------------------------------------------------------------------------------

@dataclass
class Tracking:
    """Effective-dimensionality tracking of one train step (layers fixed at its start)."""

    layers: list[str]
    thresholds: list[float]
    samples: int
    dataset: ArrayDataset

    @classmethod
    def for_step(cls, ctx: StepContext, step: TrainStep) -> Tracking | None:
        if "effective_dim" not in step.track:
            return None
        plain = _dense_layers(ctx.model)
        if step.track_layers in (None, "auto"):
            layers = auto_layers(ctx.model)
        else:
            layers = list(step.track_layers)
            unknown = [n for n in layers if n not in plain]
            if unknown:
                raise SpecError(f"track_layers {unknown} are not Linear/Conv2d layers of the "
                                f"model; valid layers: {', '.join(plain)}")
        samples = step.track_samples or TRACK_SAMPLES
        return cls(layers, list(step.track_thresholds or TRACK_THRESHOLDS), samples,
                   _tracking_set(ctx, samples))

    def record(self, ctx: StepContext, epoch: dict[str, Any]) -> None:
        """effective_dim_curve after an epoch: one `effective_dim` event, curves updated.
        A layer replaced by a PCN layer (after a plateau transform) is still tracked: its input
        is the same m-dim activation. Layers that no longer exist are listed as skipped."""
        current = [n for n in self.layers
                   if isinstance(get_layer(ctx.model, n),
                                 (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d))]
        curve = effective_dim_curve(ctx.model, current, self.dataset, self.thresholds,
                                    self.samples, device=ctx.device) if current else {}
        layers = {}
        for name, c in curve.items():
            layer = get_layer(ctx.model, name)
            layers[name] = {
                "in_dim": layer.in_features if isinstance(layer, (nn.Linear, PCNLinear))
                else layer.in_channels,
                "effective_dim": {_tau_key(t): int(m) for t, m in c["effective_dim"].items()},
                "eigvals": c["eigvals"][:TRACK_EIGVALS_MAX]}
        data = {"step": epoch["step"], "epoch": epoch["epoch"],
                "global_epoch": epoch["global_epoch"], "accuracy": epoch["accuracy"],
                "val_accuracy": epoch["val_accuracy"], "samples": len(self.dataset),
                "thresholds": self.thresholds, "layers": layers,
                "skipped": [n for n in self.layers if n not in current]}
        add_effective_dim(ctx.curves, data)
        ctx.reporter.event("effective_dim", data)


def add_effective_dim(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """Fold one `effective_dim` event into curves (the API's /curves does the same)."""
    where = {k: data.get(k) for k in ("step", "epoch", "global_epoch")}
    for name, layer in (data.get("layers") or {}).items():
        curves["effective_dim"].setdefault(name, []).append(
            where | {"in_dim": layer.get("in_dim"), "effective_dim": layer.get("effective_dim"),
                     "accuracy": data.get("accuracy"), "val_accuracy": data.get("val_accuracy")})
        curves["spectra"].setdefault(name, []).append(
            where | {"source": "effective_dim", "in_dim": layer.get("in_dim"),
                     "eigvals": layer.get("eigvals")})


@dataclass
class PlateauWatch:
    """Fires after the first epoch >= min_epochs whose val-accuracy gain is < delta, once
    validation accuracy has risen above where the step started (a model that has not started
    learning is not on a plateau)."""

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


class _PlateauReached(Exception):
    """Raised from on_epoch to stop core.train.train where the plateau transform applies."""


def _plateau_pcn(ctx: StepContext) -> tuple[int, PCNStep] | None:
    index = ctx.step_index + 1
    if index < len(ctx.steps):
        nxt = ctx.steps[index]
        if isinstance(nxt, PCNStep) and nxt.when == "plateau":
            return index, nxt
    return None


def _train_config(step: TrainStep) -> TrainConfig:
    return TrainConfig(epochs=step.epochs, optimizer=step.optimizer, lr=step.lr,
                       momentum=step.momentum, weight_decay=step.weight_decay,
                       batch_size=step.batch_size, lr_steps=tuple(step.lr_steps),
                       lr_gamma=step.lr_gamma, max_batches=step.max_batches)


def _remaining(config: TrainConfig, done: int) -> TrainConfig:
    """The config of epochs done+1.. of a run: lr decayed as the schedule had it by then."""
    decays = sum(1 for s in config.lr_steps if s <= done)
    return dataclasses.replace(config, epochs=config.epochs - done,
                               lr=config.lr * config.lr_gamma ** decays,
                               lr_steps=tuple(s - done for s in config.lr_steps if s > done))


def run_train(ctx: StepContext, step: TrainStep) -> dict[str, Any]:
    config = _train_config(step)
    tracking = Tracking.for_step(ctx, step)
    plateau = _plateau_pcn(ctx)
    watch = None
    if plateau is not None:
        pcn_step = plateau[1]
        watch = PlateauWatch(pcn_step.plateau_delta or PLATEAU_DELTA,
                             pcn_step.plateau_min_epochs or PLATEAU_MIN_EPOCHS,
                             evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"])
    history: list[dict[str, Any]] = []
    offset = 0  # epochs of this step before the running core.train.train call
    ctx.reporter.progress(0.0, f"train 0/{step.epochs}")

    def on_epoch(record: dict[str, Any]) -> None:
        ctx.global_epoch += 1
        record = {"step": ctx.step_index, **record, "epoch": offset + record["epoch"],
                  "global_epoch": ctx.global_epoch}
        history.append(record)
        ctx.curves["training"].append(record)
        ctx.reporter.event("epoch", record)
        if tracking is not None:
            tracking.record(ctx, record)
        ctx.reporter.progress(record["epoch"] / step.epochs,
                              f"train {record['epoch']}/{step.epochs}")
        if watch is not None and offset == 0 and \
                watch.update(record["epoch"], record["val_accuracy"]) and \
                record["epoch"] < step.epochs:
            raise _PlateauReached

    details: dict[str, Any] = {}
    try:
        train(ctx.model, ctx.splits, config, device=ctx.device, generator=ctx.generator,
              on_epoch=on_epoch, should_cancel=ctx.reporter.should_cancel)
    except _PlateauReached:
        pass
    if plateau is not None and watch is not None:
        index, pcn_step = plateau
        offset = watch.fired_at or step.epochs
        applied = apply_pcn(ctx, pcn_step, index)
        plateau_info = {"delta": watch.delta, "min_epochs": watch.min_epochs,
                        "fired": watch.fired_at is not None}
        if watch.fired_at is None:
            plateau_info["note"] = (f"validation accuracy never rose by less than {watch.delta} "
                                    f"in an epoch >= {watch.min_epochs} after rising above its "
                                    f"start; applied after the last epoch ({step.epochs})")
        applied |= {"when": "plateau", "fired_at_epoch": watch.fired_at,
                    "applied_after_epoch": offset, "applied_in_step": ctx.step_index,
                    "plateau": plateau_info}
        ctx.applied[index] = applied
        record_transform(ctx, index, applied)
        details["pcn"] = {"step": index, "fired_at_epoch": watch.fired_at,
                          "applied_after_epoch": offset}
        if offset < step.epochs:
            ctx.reporter.progress(offset / step.epochs, f"train {offset}/{step.epochs}")
            train(ctx.model, ctx.splits, _remaining(config, offset), device=ctx.device,
                  generator=ctx.generator, on_epoch=on_epoch,
                  should_cancel=ctx.reporter.should_cancel)
    ctx.model.eval()
    last = history[-1]
    return {"epochs": step.epochs, "config": config.to_dict(),
            "train_loss": last["loss"], "train_accuracy": last["accuracy"],
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "history": history, **details}


def run_evaluate(ctx: StepContext, step: EvaluateStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "evaluate")
    test = evaluate(ctx.model, ctx.splits.test, device=ctx.device, batch_size=step.batch_size)
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device, batch_size=step.batch_size)
    return {"loss": test["loss"], "accuracy": test["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"]}


# ---- pcn ------------------------------------------------------------------------------------

def _core_select(step: PCNStep) -> dict[str, Any]:
    def plain(selector: Any) -> dict[str, Any]:
        return {k: v for k, v in selector.model_dump().items() if v is not None}

    select = plain(step.select)
    if step.per_layer:
        select["per_layer"] = {name: plain(s) for name, s in step.per_layer.items()}
    return select


def _chosen_layers(ctx: StepContext, step: PCNStep) -> list[str]:
    """The layers to transform, checked before any statistics are collected."""
    plain = _dense_layers(ctx.model)
    if step.layers == "auto":
        layers = auto_layers(ctx.model)
    else:
        layers = list(step.layers)
        unknown = [n for n in layers if n not in plain]
        if unknown:
            raise SpecError(f"pcn layers {unknown} are not Linear/Conv2d layers of the model; "
                            f"valid layers: {', '.join(plain)}")
    extra = sorted(set(step.per_layer) - set(layers))
    if extra:
        raise SpecError(f"per_layer names layers that are not transformed: {extra}; "
                        f"transformed layers ({'auto' if step.layers == 'auto' else 'given'}): "
                        f"{', '.join(layers)}")
    return layers


def _collect_stats(ctx: StepContext, step: PCNStep, layers: list[str]
                   ) -> dict[str, LayerStats]:
    """One forward pass; one PCA per tensor (layers reading one tensor share it: core fills in
    the partners). Default solver: exact fast path — top_k = every component, so a layer that
    sees fewer samples than dims takes the Gram route and any other layer a full eigh."""
    shared = {n: tensor[0] for tensor in shared_input_sets(ctx.model) for n in tensor}
    stat_layers = list(dict.fromkeys(shared.get(n, n) for n in layers))
    top_k = step.top_k
    if top_k is None and step.solver == "auto":
        top_k = max(get_layer(ctx.model, n).weight.shape[1] for n in stat_layers)
    return collect_input_stats(ctx.model, stat_layers, _calibration_set(ctx, step.samples),
                               samples=step.samples, batch_size=step.batch_size,
                               device=ctx.device, top_k=top_k, solver=step.solver,
                               generator=torch.Generator().manual_seed(
                                   ctx.generator.initial_seed()))


def _search_summary(search: dict[str, Any]) -> dict[str, Any]:
    (kind, goal), = search["target"].items()
    summary = {"kind": kind, "goal": goal, "threshold": search["threshold"],
               "value": search["value"], "trials": len(search["trials"])}
    if kind == "trainable_params":
        summary["reason"] = (f"the smallest common eigenvalue threshold on the search grid "
                             f"whose model has <= {goal} trainable parameters "
                             f"({int(search['value'])}); a smaller one exceeds the budget")
    else:
        summary["baseline"] = search["baseline"]
        summary["reason"] = (f"the largest common eigenvalue threshold on the search grid whose "
                             f"validation accuracy without retraining ({search['value']:.4f}) "
                             f"is >= baseline {search['baseline']:.4f} - {goal}")
    return summary


def apply_pcn(ctx: StepContext, step: PCNStep, step_index: int) -> dict[str, Any]:
    """Statistics → transform (input, and output-based where it pays) → metrics right after it.
    Replaces ctx.model; returns the pcn step's op-specific result."""
    ctx.reporter.progress(0.0, "pcn: collecting activation statistics")
    layers = _chosen_layers(ctx, step)
    start = time.perf_counter()
    stats = _collect_stats(ctx, step, layers)
    stats_wall_s = time.perf_counter() - start
    ctx.check_cancel()
    ctx.reporter.progress(0.5, "pcn: transforming layers")
    output = "auto" if step.output_based else None
    start = time.perf_counter()
    if step.select.target is not None:
        target = step.select.target.model_dump(exclude_none=True)
        new_model, report = pcn_transform_to_target(
            ctx.model, stats, target, layers, output=output, val_dataset=ctx.splits.val,
            device=ctx.device)
    else:
        new_model, report = pcn_transform(ctx.model, stats, _core_select(step), layers,
                                          output=output)
    surgery_wall_s = time.perf_counter() - start
    ctx.model = new_model.to(ctx.device)
    for name, st in stats.items():
        spectrum = {"step": step_index, "layer": name, "global_epoch": ctx.global_epoch,
                    "source": "pcn", "in_dim": st.dim,
                    "dims": report["input"].get(name, {}).get("dims"), "samples": st.count,
                    "eigvals": [float(v) for v in st.eigvals[:SPECTRUM_MAX]]}
        ctx.curves["spectra"].setdefault(name, []).append(
            {k: v for k, v in spectrum.items() if k != "layer"} | {"epoch": None})
        ctx.reporter.event("spectrum", spectrum)
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
    details: dict[str, Any] = {
        "layers": {name: {"in_dim": r["in_dim"], "dims": r["dims"],
                          "explained_variance": r["explained_variance"]}
                   for name, r in report["input"].items()},
        "output": {group: {"units": r["units"], "keep": r["keep"], "kept": r["kept"]}
                   for group, r in report["output"].items()},
        "layer_selection": "auto" if step.layers == "auto" else "given",
        "samples": min(step.samples, len(ctx.splits.train)),
        "stats_wall_s": stats_wall_s, "surgery_wall_s": surgery_wall_s,
        "transform_wall_s": stats_wall_s + surgery_wall_s,
        "after_transform": model_metrics(ctx.model, ctx.input_shape, ctx.splits.test,
                                         ctx.device) | {"val_accuracy": val},
        "when": step.when}
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
    ctx.curves["transforms"].append(data)
    ctx.reporter.event("pcn", data)


def run_pcn(ctx: StepContext, step: PCNStep) -> dict[str, Any]:
    if step.when == "plateau":  # applied inside the preceding train step
        details = ctx.applied.pop(ctx.step_index, None)
        if details is None:
            raise SpecError(f"steps[{ctx.step_index}]: a pcn step with when: 'plateau' must "
                            "directly follow a train step")
        val = evaluate(ctx.model, ctx.splits.val, device=ctx.device)["accuracy"]
        return details | {"val_accuracy": val}
    details = apply_pcn(ctx, step, ctx.step_index)
    record_transform(ctx, ctx.step_index, details)
    return details | {"val_accuracy": details["after_transform"]["val_accuracy"]}


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
