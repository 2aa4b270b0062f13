"""The `train` step: epochs with optional effective-dimensionality tracking, and the
`when: "plateau"` pcn transform applied inside it (see worker.steps for the curves' shapes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from core.data import ArrayDataset
from core.dim_tracking import effective_dim_curve
from core.models import get_layer
from core.pcn import PCNConv2d, PCNLinear
from core.train import TrainConfig, evaluate, train
from jobs.spec import PCNStep, TrainStep
from worker.checkpoint import TrainProgress
from worker.context import (
    PLATEAU_DELTA,
    PLATEAU_MIN_EPOCHS,
    TRACK_EIGVALS_MAX,
    TRACK_SAMPLES,
    TRACK_THRESHOLDS,
    StepContext,
    chosen_layers,
    tau_key,
    tracking_set,
)
from worker.step_pcn import apply_pcn, record_transform


@dataclass
class Tracking:
    """Effective-dimensionality tracking of one train step (layers fixed at its start)."""

    layers: list[str]
    thresholds: list[float]
    samples: int
    dataset: ArrayDataset

    @classmethod
    def for_step(cls, ctx: StepContext, step: TrainStep,
                 layers: list[str] | None = None) -> Tracking | None:
        """`layers`: the ones chosen when the step started (a resumed step keeps them)."""
        if "effective_dim" not in step.track:
            return None
        if layers is None:
            layers = chosen_layers(ctx.model, step.track_layers, "track_layers")
        samples = step.track_samples or TRACK_SAMPLES
        return cls(layers, list(step.track_thresholds or TRACK_THRESHOLDS), samples,
                   tracking_set(ctx, samples))

    def record(self, ctx: StepContext, epoch: dict[str, Any]) -> None:
        """effective_dim_curve after an epoch: one `effective_dim` event, curves updated.
        A layer replaced by a PCN layer (after a plateau transform) is still tracked: its input
        is the same m-dim activation. Layers that no longer exist are listed as skipped."""
        current = [n for n in self.layers
                   if isinstance(get_layer(ctx.model, n),
                                 (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d))]
        curve = effective_dim_curve(ctx.model, current, self.dataset, self.thresholds,
                                    self.samples, device=ctx.device,
                                    spectrum=TRACK_EIGVALS_MAX) if current else {}
        layers = {}
        for name, c in curve.items():
            layer = get_layer(ctx.model, name)
            layers[name] = {
                "in_dim": layer.in_features if isinstance(layer, (nn.Linear, PCNLinear))
                else layer.in_channels,
                "effective_dim": {tau_key(t): int(m) for t, m in c["effective_dim"].items()},
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
    """Train `step.epochs` epochs (with tracking and a plateau pcn transform where asked); a
    checkpoint after every epoch (`ctx.save_checkpoint`), and a resumed run continues from
    `ctx.resume_train` exactly where the checkpoint was taken."""
    config = _train_config(step)
    resume: TrainProgress | None = ctx.resume_train
    ctx.resume_train = None
    plateau = _plateau_pcn(ctx)
    watch = None
    if resume is not None:
        tracking = Tracking.for_step(ctx, step, resume.tracking_layers)
        watch = PlateauWatch(**resume.watch) if resume.watch else None
        history, offset = resume.history, resume.offset
    else:
        tracking = Tracking.for_step(ctx, step)
        if plateau is not None:
            pcn_step = plateau[1]
            watch = PlateauWatch(pcn_step.plateau_delta or PLATEAU_DELTA,
                                 pcn_step.plateau_min_epochs or PLATEAU_MIN_EPOCHS,
                                 evaluate(ctx.model, ctx.splits.val,
                                          device=ctx.device)["accuracy"])
        history, offset = [], 0  # offset: epochs of this step before the running train call
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

    def on_state(epoch: int, state: dict[str, Any]) -> None:
        if ctx.save_checkpoint is not None:
            ctx.save_checkpoint(TrainProgress(
                epochs_done=offset + epoch, offset=offset, history=history,
                watch=dataclasses.asdict(watch) if watch else None,
                tracking_layers=tracking.layers if tracking else None, train_state=state))

    def fit(cfg: TrainConfig, done: int) -> None:
        """core.train.train for `cfg`, continuing after epoch `done` of it when resuming."""
        state = resume.train_state if resume is not None and resume.train_state else None
        if state is not None and int(state["epoch"]) != done:
            state = None  # the checkpoint was taken in another train call of this step
        train(ctx.model, ctx.splits, cfg, device=ctx.device, generator=ctx.generator,
              on_epoch=on_epoch, should_cancel=ctx.reporter.should_cancel, masks=ctx.masks,
              resume=state, on_state=on_state)

    details: dict[str, Any] = {}
    applied_before = plateau is not None and plateau[0] in ctx.applied  # resumed after it
    if not applied_before:
        try:
            fit(config, resume.epochs_done if resume is not None else 0)
        except _PlateauReached:
            pass
    if plateau is not None and watch is not None:
        index, pcn_step = plateau
        if not applied_before:
            offset = watch.fired_at or step.epochs
            applied = apply_pcn(ctx, pcn_step, index)
            plateau_info = {"delta": watch.delta, "min_epochs": watch.min_epochs,
                            "fired": watch.fired_at is not None}
            if watch.fired_at is None:
                plateau_info["note"] = (
                    f"validation accuracy never rose by less than {watch.delta} in an epoch "
                    f">= {watch.min_epochs} after rising above its start; applied after the "
                    f"last epoch ({step.epochs})")
            applied |= {"when": "plateau", "fired_at_epoch": watch.fired_at,
                        "applied_after_epoch": offset, "applied_in_step": ctx.step_index,
                        "plateau": plateau_info}
            ctx.applied[index] = applied
            record_transform(ctx, index, applied)
        details["pcn"] = {"step": index, "fired_at_epoch": watch.fired_at,
                          "applied_after_epoch": offset}
        if offset < step.epochs:
            ctx.reporter.progress(offset / step.epochs, f"train {offset}/{step.epochs}")
            done = resume.epochs_done - offset if applied_before and resume else 0
            fit(_remaining(config, offset), done)
    ctx.model.eval()
    last = history[-1]
    return {"epochs": step.epochs, "config": config.to_dict(),
            "train_loss": last["loss"], "train_accuracy": last["accuracy"],
            "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
            "history": history, **details}
