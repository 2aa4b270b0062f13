"""What every step handler gets: the job's model, data and reporter (`StepContext`), and the
metrics recorded around steps. Handlers live in worker.step_train / worker.step_pcn; the
registry in worker.steps."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from core.data import ArrayDataset, Splits
from core.dctps import DCTpSLayer
from core.errors import Cancelled, SpecError
from core.metrics import count_macs, param_counts
from core.models import prunable_layers
from core.train import evaluate
from jobs.settings import Settings

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
    return {"training": [], "effective_dim": {}, "spectra": {}, "transforms": [], "pruning": [],
            "lowrank": [], "dctps": [], "analysis": {}}


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
    # pruning masks {layer: BoolTensor} kept through every later train step (a pruning step, or
    # a sparse input checkpoint); None = dense
    masks: dict[str, torch.Tensor] | None = None
    # tenant-scoped loader of another of the job's models by id (analyze's other_model)
    fetch_model: Callable[[str], nn.Module] | None = None
    # where the input model's weights come from: "zoo" (built by the service: its arch's `init`
    # applies) or "upload" (its lineage starts at an uploaded checkpoint)
    input_origin: str = "zoo"
    # resumable train steps: store a checkpoint of the job now (with the train step's progress;
    # set by the runner), and the progress of the train step a resumed run continues
    save_checkpoint: Callable[[Any], None] | None = None
    resume_train: Any = None  # worker.checkpoint.TrainProgress

    def check_cancel(self) -> None:
        if self.reporter.should_cancel():
            raise Cancelled(f"canceled before step {self.step_index + 1}/{self.step_count}")


def model_metrics(model: nn.Module, input_shape: list[int], test: ArrayDataset,
                  device: torch.device) -> dict[str, Any]:
    """The metrics recorded before, after and between steps: params, MACs, test accuracy."""
    return {"params": param_counts(model), "macs": count_macs(model, input_shape),
            "accuracy": evaluate(model, test, device=device)["accuracy"]}


def dctps_layers(model: nn.Module) -> list[str]:
    """Names of the model's DCTpS layers (`alpha * D + S`, no dense weight)."""
    return [n for n, m in model.named_modules() if isinstance(m, DCTpSLayer)]


def dense_layers(model: nn.Module) -> list[str]:
    """Plain Linear/Conv2d layers in forward order (PCN layers are already transformed)."""
    return [n for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))]


def chosen_layers(model: nn.Module, names: Any, field: str) -> list[str]:
    """`names` = "auto"/None (`core.pcn_select.auto_layers`: the widest layers) or a list of
    Linear/Conv2d layer names, checked: SpecError naming the valid layers otherwise."""
    from core.pcn_select import auto_layers

    if names in (None, "auto"):
        return auto_layers(model)
    plain = dense_layers(model)
    unknown = [n for n in names if n not in plain]
    if unknown:
        raise SpecError(f"{field} {unknown} are not Linear/Conv2d layers of the model; "
                        f"valid layers: {', '.join(plain)}")
    return list(names)


def calibration_set(ctx: StepContext, samples: int) -> ArrayDataset:
    """A seeded random subset of the training split (collect_input_stats reads the first N)."""
    train_set = ctx.splits.train
    order = torch.randperm(len(train_set), generator=ctx.generator)
    return train_set.subset(order[:min(samples, len(train_set))])


def tracking_set(ctx: StepContext, samples: int) -> ArrayDataset:
    """The same training subset every epoch (its own generator: tracking must not change the
    order training sees)."""
    generator = torch.Generator().manual_seed(ctx.generator.initial_seed())
    order = torch.randperm(len(ctx.splits.train), generator=generator)
    return ctx.splits.train.subset(order[:min(samples, len(ctx.splits.train))])


def tau_key(tau: float) -> str:
    return f"{tau:g}"


def keep_valid_masks(ctx: StepContext) -> list[str]:
    """Pruning masks of layers a transform replaced or resized no longer apply: drop them
    (a PCN or low-rank layer's weights are new, dense matrices). Returns the dropped layer names."""
    if not ctx.masks:
        return []
    modules = dict(ctx.model.named_modules())
    kept, dropped = {}, []
    for name, mask in ctx.masks.items():
        layer = modules.get(name)
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.weight.shape == mask.shape:
            kept[name] = mask
        else:
            dropped.append(name)
    ctx.masks = kept or None
    return dropped
