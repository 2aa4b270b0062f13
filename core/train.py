"""Supervised training and evaluation with cross-entropy.

Batches are sliced from the datasets' in-memory tensors (no DataLoader workers); shuffling uses
the explicit `generator`. `train` moves the model to `device` and leaves it in eval mode.
With `masks` (from `core.prune`), pruned weights stay exactly zero throughout training.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.data import ArrayDataset, Splits
from core.errors import Cancelled
from core.masks import masked_parameters


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    optimizer: str = "adam"  # adam | sgd (with momentum)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    lr_steps: tuple[int, ...] = ()  # epochs (1-based) after which lr *= lr_gamma
    lr_gamma: float = 0.1
    max_batches: int | None = None  # per epoch; None = the whole training set

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ValueError("lr must be a positive number and weight_decay >= 0")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError("max_batches must be >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid: {sorted(names)}")
        return cls(**d)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters the optimizer holds, in its order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _to_device(x: torch.Tensor, model_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return x.to(device=device, dtype=model_dtype, non_blocking=True)


def _model_dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _masked_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor] | None
                       ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    if not masks:
        return []
    masked = masked_parameters(model, masks)
    _mask_weights(masked)
    return masked


def _mask_grads(masked: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for weight, mask in masked:
        if weight.grad is not None:
            weight.grad.mul_(mask)


@torch.no_grad()
def _mask_weights(masked: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for weight, mask in masked:
        weight.mul_(mask)


def train(model: nn.Module, splits: Splits, config: TrainConfig, *,
          device: str | torch.device = "cpu", generator: torch.Generator,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          should_cancel: Callable[[], bool] | None = None,
          masks: Mapping[str, torch.Tensor] | None = None,
          resume: Mapping[str, Any] | None = None,
          on_state: Callable[[int, dict[str, Any]], None] | None = None,
          on_batch: Callable[[int, int, int], None] | None = None
          ) -> list[dict[str, Any]]:
    """Train `model` in place; return one record per epoch.

    Record: `{"epoch", "loss", "accuracy" (running train averages over the epoch), "val_loss",
    "val_accuracy", "wall_s", "lr"}`. `should_cancel()` is checked before every batch and raises
    `Cancelled`. Only parameters with `requires_grad` are optimised, so PCN buffers stay frozen.

    `masks` (`{layer: BoolTensor}` shaped like the layer's weight, from `core.prune`) fixes a
    sparse topology: the masks are applied once before training, the masked gradients are
    zeroed before every optimizer step (so momentum buffers and Adam moments of pruned weights
    stay zero; weight decay acts on zero weights) and the masks are re-applied after every step,
    so a pruned weight is exactly zero whatever the optimizer does. Unknown layers or shape
    mismatches raise `SpecError` before anything is trained.

    Resumable: after every epoch (and its `on_epoch`), `on_state(epoch, state)` gets the
    optimizer and LR-schedule state (`{"epoch", "optimizer", "scheduler", "params"}`; tensors
    only, loadable with `torch.load(weights_only=True)`). `train(..., resume=state)` continues
    after `state["epoch"]`: with the generator's state restored as it was then, the resumed run
    computes exactly what the uninterrupted one would have. Optimizer state is matched to the
    parameters by name, so a model rebuilt from its checkpoint may order them differently.

    `on_batch(epoch, batches_done, batches_per_epoch)` is called after every optimizer step
    (progress within an epoch; keep it cheap).
    """
    device = torch.device(device)
    model.to(device)
    masked = _masked_parameters(model, masks)
    dtype = _model_dtype(model)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_steps),
                                                     gamma=config.lr_gamma)
    first = 1
    if resume is not None:
        _load_state(model, optimizer, scheduler, resume)
        first = int(resume["epoch"]) + 1
    data: ArrayDataset = splits.train
    n = len(data)
    batches = math.ceil(n / config.batch_size)
    if config.max_batches is not None:
        batches = min(batches, config.max_batches)
    history: list[dict[str, Any]] = []
    for epoch in range(first, config.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = torch.randperm(n, generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        for b, begin in enumerate(range(0, n, config.batch_size)):
            if config.max_batches is not None and b >= config.max_batches:
                break
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"training cancelled in epoch {epoch} before batch {b}")
            idx = order[begin:begin + config.batch_size]
            x = _to_device(data.x[idx], dtype, device)
            y = data.y[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _mask_grads(masked)
            optimizer.step()
            _mask_weights(masked)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(idx)
            if on_batch is not None:
                on_batch(epoch, b + 1, batches)
        scheduler.step()
        val = (evaluate(model, splits.val, device=device) if len(splits.val)
               else {"loss": None, "accuracy": None})
        record = {
            "epoch": epoch,
            "loss": total_loss / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "wall_s": time.perf_counter() - start,
            "lr": lr,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if on_state is not None:
            on_state(epoch, {"epoch": epoch, "optimizer": optimizer.state_dict(),
                             "scheduler": {"last_epoch": scheduler.last_epoch,
                                           "last_lr": scheduler.get_last_lr()},
                             "params": trainable_names(model)})
    model.eval()
    return history


def _load_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, state: Mapping[str, Any]
                ) -> None:
    """Load a `train(on_state=...)` state, matching optimizer entries by parameter name."""
    names = trainable_names(model)
    saved_names = list(state.get("params") or names)
    if sorted(saved_names) != sorted(names):
        raise ValueError("the resume state's parameters do not match the model's: "
                         f"{sorted(set(saved_names) ^ set(names))[:5]}")
    where = {name: i for i, name in enumerate(names)}
    saved = state["optimizer"]
    remap = {saved_i: where[name] for saved_i, name in enumerate(saved_names)}
    optimizer.load_state_dict({
        "state": {remap[int(i)]: v for i, v in saved["state"].items()},
        "param_groups": [dict(g, params=sorted(remap[int(i)] for i in g["params"]))
                         for g in saved["param_groups"]]})
    # milestones and gamma come from the config; only the position in the schedule is state
    scheduler.load_state_dict(scheduler.state_dict() | {
        "last_epoch": int(state["scheduler"]["last_epoch"]),
        "_last_lr": [float(v) for v in state["scheduler"]["last_lr"]]})


def evaluate(model: nn.Module, dataset: ArrayDataset, *, device: str | torch.device = "cpu",
             batch_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on `dataset` (eval mode, no_grad).

    Restores the model's train/eval mode afterwards.
    """
    device = torch.device(device)
    dtype = _model_dtype(model)
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, len(dataset)
    try:
        with torch.no_grad():
            for begin in range(0, n, batch_size):
                x = _to_device(dataset.x[begin:begin + batch_size], dtype, device)
                y = dataset.y[begin:begin + batch_size].to(device)
                logits = model(x)
                total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    return {"loss": total_loss / n, "accuracy": correct / n}
