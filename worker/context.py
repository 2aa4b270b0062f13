"""What every step handler gets: the job's model, data and reporter (`StepContext`), the
metrics recorded around steps, and what a step running inside a train step implements
(`TrainHook`). Handlers live in worker/step_<name>.py; the registry in worker.registry."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from pydantic import BaseModel
from torch import nn

from core.applies import why_not
from core.data import ArrayDataset, Splits
from core.dctps import DCTpSLayer
from core.errors import Cancelled, SpecError
from core.graph import is_graph_model
from core.metrics import count_macs, param_counts
from core.surgery import plain_layers
from core.train import evaluate
from service import curves as job_curves
from service.registry import MethodSpec
from service.settings import Settings

C = TypeVar("C")

# Effective-dimensionality tracking defaults (track: ["effective_dim"]): the paper's absolute
# threshold for MNIST-sized dense layers, on this many (fixed) training samples per epoch.
TRACK_THRESHOLDS = (0.1,)
TRACK_SAMPLES = 1000
TRACK_EIGVALS_MAX = 256  # eigenvalues kept per layer and epoch
SPECTRUM_MAX = 1024  # eigenvalues kept per layer of a pcn transform


class Reporter(Protocol):
    """What a handler may tell the job: progress within the step, events, and cancellation."""

    def progress(self, fraction: float, stage: str) -> None: ...
    def event(self, kind: str, data: dict[str, Any]) -> None: ...
    def should_cancel(self) -> bool: ...


@dataclass
class StepContext:
    model: nn.Module
    splits: Splits
    input_shape: list[int]  # one sample as the model reads it (in its layout)
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
    # the job's events folded into curves (`service.curves`; stored as curves.json): see `emit`
    curves: dict[str, Any] = field(default_factory=job_curves.empty)
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
    # the job's temporary directory (files a handler writes live there until the job ends)
    workdir: Path | None = None
    # the normalized arch of the model the job started from (its input model; set by the runner)
    start_arch: dict[str, Any] | None = None
    # extra files stored as job artifacts with the model when the job succeeds: (name, path,
    # kind); see add_artifact
    artifacts: list[tuple[str, Path, str]] = field(default_factory=list)
    # how the model reads its input (the arch's preprocessing layout): NCHW, NHWC or flat
    layout: str = "NCHW"

    def check_cancel(self) -> None:
        if self.reporter.should_cancel():
            raise Cancelled(f"canceled before step {self.step_index + 1}/{self.step_count}")

    def add_artifact(self, name: str, path: Path, kind: str) -> None:
        """Store `path` (a file under `workdir`) as the job artifact `name` of `kind` when the
        job succeeds (in the final transaction, with the model); a failed job stores none."""
        if "/" in name or name in ("", ".", "..") or any(a[0] == name for a in self.artifacts):
            raise ValueError(f"artifact name {name!r} must be a new plain file name")
        self.artifacts.append((name, path, kind))

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event of the job and fold it into `curves` — the same fold
        `GET /v1/jobs/{id}/curves` applies to the stored events, so both have one shape."""
        job_curves.add(self.curves, kind, data)
        self.reporter.event(kind, data)


class TrainHook(ABC):
    """What the step right after a train step does inside it (a `when: "plateau"` pcn step),
    registered with `worker.registry.train_hook`. The train handler calls `start` (or `restore`
    on resume), asks `stop_after` after each epoch of its first run, then — unless `done` — calls
    `apply` after epoch `apply_after(epochs)`, and trains the remaining epochs on the changed
    model. `state()` is saved with every checkpoint of the train step."""

    key: str  # the train step's result holds `{key: summary(...)}`
    step_index: int  # the index of the step the hook belongs to

    @abstractmethod
    def start(self, ctx: StepContext) -> None:
        """At the start of the train step (not when resuming it)."""

    @abstractmethod
    def state(self) -> dict[str, Any] | None:
        """What a resumed train step needs (JSON-able; stored in its checkpoints)."""

    @abstractmethod
    def restore(self, state: dict[str, Any] | None) -> bool:
        """From `state()` of a checkpoint; False: nothing to restore (the hook is dropped)."""

    @abstractmethod
    def stop_after(self, epoch: int, record: dict[str, Any]) -> bool:
        """After every epoch of the step's first run: True to apply after this epoch."""

    @abstractmethod
    def apply_after(self, epochs: int) -> int:
        """The epoch after which the hook applies (`epochs`: where it did not stop earlier)."""

    @abstractmethod
    def done(self, ctx: StepContext) -> bool:
        """Already applied (a run resumed after it)."""

    @abstractmethod
    def apply(self, ctx: StepContext, after_epoch: int, epochs: int) -> None:
        """Do it (may replace ctx.model); the step's own handler reports the result later."""

    @abstractmethod
    def summary(self, after_epoch: int) -> dict[str, Any]:
        """What the train step's result records about it."""


def config_from_spec(config_type: type[C], step: MethodSpec) -> C:
    """The frozen core config of a step, built from the spec's fields of the same names (a
    core config's field names are the spec's): values as they are, nested spec models as dicts
    without their unset (None) entries (`{"param_ratio": 0.5}`); `from_dict` where the config
    has one."""
    names = [f.name for f in dataclasses.fields(config_type)]  # type: ignore[arg-type]
    data = {name: _plain(getattr(step, name)) for name in names
            if name in type(step).model_fields}
    from_dict = getattr(config_type, "from_dict", None)
    return from_dict(data) if from_dict is not None else config_type(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_metrics(model: nn.Module, input_shape: list[int], test: ArrayDataset,
                  device: torch.device, accuracy: bool = True) -> dict[str, Any]:
    """The metrics recorded before, after and between steps: params, MACs, test accuracy
    (None when `accuracy` is False)."""
    return {"params": param_counts(model), "macs": count_macs(model, input_shape),
            "accuracy": evaluate(model, test, device=device)["accuracy"] if accuracy else None}


def input_map(values: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-input values (shaped like one input sample) as a 2-D map for a plot: an image's
    (H, W) averaged over its channels (NCHW: dim 0, NHWC: dim -1); any other input as one row."""
    if values.dim() == 3:
        return values.mean(-1 if layout == "NHWC" else 0)
    return values.reshape(1, -1)


def dctps_layers(model: nn.Module) -> list[str]:
    """Names of the model's DCTpS layers (`alpha * D + S`, no dense weight)."""
    return [n for n, m in model.named_modules() if isinstance(m, DCTpSLayer)]


def dense_layers(model: nn.Module) -> list[str]:
    """Plain Linear/Conv2d layers in forward order (`core.surgery.plain_layers`: PCN layers are
    already transformed, a low-rank layer's factors are part of it)."""
    return [n for n, _ in plain_layers(model)]


def untouched_layers(model: nn.Module, op: str) -> dict[str, str]:
    """{layer: reason} of the plain Linear/Conv2d layers method `op` cannot handle
    (`core.applies.why_not`, e.g. depthwise convs for lowrank and pcn), in forward order: what
    a step leaves untouched and reports."""
    modules = dict(model.named_modules())
    return {n: reason for n in dense_layers(model)
            if (reason := why_not(op, n, modules[n])) is not None}


def chosen_layers(model: nn.Module, names: Any, field: str, op: str | None = None
                  ) -> list[str]:
    """`names` = "auto"/None (`core.pcn_select.auto_layers`: the widest layers) or a list of
    Linear/Conv2d layer names, checked: SpecError naming the valid layers otherwise. With
    `op`, "auto" leaves out the layers `op` cannot handle (`untouched_layers`) and a given name
    of one is a SpecError with the reason."""
    from core.pcn_select import auto_layers

    untouched = untouched_layers(model, op) if op is not None else {}
    plain = dense_layers(model)
    if names in (None, "auto"):
        return [n for n in auto_layers(model) if n in plain and n not in untouched]
    unknown = [n for n in names if n not in plain]
    if unknown:
        hint = ""
        if is_graph_model(model):
            hint = ("; an imported model's layers are named after its graph's modules (the "
                    "model's report, GET /v1/models/{id}, lists them with the methods that "
                    "apply)")
        raise SpecError(f"{field} {unknown} are not Linear/Conv2d layers of the model; "
                        f"valid layers: {', '.join(plain)}{hint}")
    refused = {n: untouched[n] for n in names if n in untouched}
    if refused:
        raise SpecError(f"{field}: {op} cannot handle " + "; ".join(
            f"{n!r} ({r})" for n, r in refused.items()) + "; leave them out")
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
