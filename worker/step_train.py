"""The `train` step: epochs with optional effective-dimensionality tracking, and the hook the
next step may contribute (`worker.registry.train_hook`: a `when: "plateau"` pcn step is applied
inside the train step; see worker.steps for the curves' shapes)."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from core.data import ArrayDataset
from core.dim_tracking import effective_dim_curve
from core.models import get_layer
from core.pcn import PCNConv2d, PCNLinear
from core.train import TrainConfig, train
from service.methods.train import TrainStep
from worker.checkpoint import TrainProgress
from worker.context import (
    TRACK_EIGVALS_MAX,
    TRACK_SAMPLES,
    TRACK_THRESHOLDS,
    StepContext,
    TrainHook,
    chosen_layers,
    config_from_spec,
    tau_key,
    tracking_set,
)
from worker.progress import DataSizes, train_batch_share
from worker.registry import handler, next_step_hook


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
        ctx.emit("effective_dim", data)


class _StopForHook(Exception):
    """Raised from on_epoch to stop core.train.train where the next step's hook applies."""


def _remaining(config: TrainConfig, done: int) -> TrainConfig:
    """The config of epochs done+1.. of a run: lr decayed as the schedule had it by then."""
    decays = sum(1 for s in config.lr_steps if s <= done)
    return dataclasses.replace(config, epochs=config.epochs - done,
                               lr=config.lr * config.lr_gamma ** decays,
                               lr_steps=tuple(s - done for s in config.lr_steps if s > done))


@handler(TrainStep)
def run_train(ctx: StepContext, step: TrainStep) -> dict[str, Any]:
    """Train `step.epochs` epochs (with tracking, and the next step's hook where it has one); a
    checkpoint after every epoch (`ctx.save_checkpoint`), and a resumed run continues from
    `ctx.resume_train` exactly where the checkpoint was taken."""
    config = config_from_spec(TrainConfig, step)
    resume: TrainProgress | None = ctx.resume_train
    ctx.resume_train = None
    hook: TrainHook | None = next_step_hook(ctx)
    if resume is not None:
        tracking = Tracking.for_step(ctx, step, resume.tracking_layers)
        if hook is not None and not hook.restore(resume.watch):
            hook = None
        history, offset = resume.history, resume.offset
    else:
        tracking = Tracking.for_step(ctx, step)
        if hook is not None:
            hook.start(ctx)
        history, offset = [], 0  # offset: epochs of this step before the running train call
        ctx.reporter.progress(0.0, f"train 0/{step.epochs}")

    def on_epoch(record: dict[str, Any]) -> None:
        ctx.global_epoch += 1
        record = {"step": ctx.step_index, **record, "epoch": offset + record["epoch"],
                  "global_epoch": ctx.global_epoch}
        history.append(record)
        ctx.emit("epoch", record)
        if tracking is not None:
            tracking.record(ctx, record)
        ctx.reporter.progress(record["epoch"] / step.epochs,
                              f"train {record['epoch']}/{step.epochs}")
        if hook is not None and offset == 0 and \
                hook.stop_after(record["epoch"], record) and record["epoch"] < step.epochs:
            raise _StopForHook

    splits = ctx.splits
    share = train_batch_share(step, DataSizes(len(splits.train), len(splits.val),
                                              len(splits.test)))

    def on_batch(epoch: int, done: int, batches: int) -> None:
        """Progress within an epoch (the reporter writes it at most about once a second)."""
        epoch = offset + epoch
        ctx.reporter.progress((epoch - 1 + share * done / max(1, batches)) / step.epochs,
                              f"train epoch {epoch}/{step.epochs}")

    def on_state(epoch: int, state: dict[str, Any]) -> None:
        if ctx.save_checkpoint is not None:
            ctx.save_checkpoint(TrainProgress(
                epochs_done=offset + epoch, offset=offset, history=history,
                watch=hook.state() if hook else None,
                tracking_layers=tracking.layers if tracking else None, train_state=state))

    def fit(cfg: TrainConfig, done: int) -> None:
        """core.train.train for `cfg`, continuing after epoch `done` of it when resuming."""
        state = resume.train_state if resume is not None and resume.train_state else None
        if state is not None and int(state["epoch"]) != done:
            state = None  # the checkpoint was taken in another train call of this step
        train(ctx.model, ctx.splits, cfg, device=ctx.device, generator=ctx.generator,
              on_epoch=on_epoch, should_cancel=ctx.reporter.should_cancel, masks=ctx.masks,
              resume=state, on_state=on_state, on_batch=on_batch)

    details: dict[str, Any] = {}
    applied_before = hook is not None and hook.done(ctx)  # resumed after it
    if not applied_before:
        with contextlib.suppress(_StopForHook):
            fit(config, resume.epochs_done if resume is not None else 0)
    if hook is not None:
        if not applied_before:
            offset = hook.apply_after(step.epochs)
            hook.apply(ctx, offset, step.epochs)
        details[hook.key] = hook.summary(offset)
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
