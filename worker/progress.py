"""Job progress weighted by each step's expected cost.

A job's progress is `done cost / total cost`, where every step has an expected cost in one unit,
"sample passes" (one sample through the model forward). The estimate only needs to rank the
steps roughly: a train step of several epochs dwarfs a pcn step over a few thousand calibration
samples, so a one-second pcn step no longer counts as much as an hour of training.

* every step: `STEP_OVERHEAD` plus the test set when the runner measures the accuracy after it;
* train: epochs x (batches per epoch x batch size x `TRAIN_PASSES` + the validation set + the
  tracking samples), plus the samples of a `when: "plateau"` pcn step applied inside it;
* pcn, lowrank, channel_prune (taylor), export (verification + int8 calibration): their
  calibration `samples`; snip: batches x batch size; synflow: rounds;
* analyze: validation-set evaluations (unit pruning orders x counts, elbow ranks) per layer;
* export, measure, dctps: small constants (plus the validation set a measure step reads).

Within a step, a handler's `progress(fraction)` moves through that step's share; a train step
reports after every batch (throttled by `worker.reporter.JobReporter`). The ETA is derived from
the elapsed time and the progress (`service.events.eta_seconds`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STEP_OVERHEAD = 1_000.0  # model metrics, bookkeeping, moving the model around
TRAIN_PASSES = 3.0  # a training sample: forward, backward, optimizer step
TRACK_SAMPLES_DEFAULT = 1_000  # worker.context.TRACK_SAMPLES (not imported: no torch here)
EXPORT_COST = 5_000.0  # ONNX and torch.export tracing, latency timing
MEASURE_COST = 2_000.0  # cost counting, one ONNX export, latency timing
DCTPS_COST = 2_000.0
ANALYZE_LAYERS_DEFAULT = 2  # layers "auto": the widest ones
ANALYZE_COUNTS_DEFAULT = 10
ANALYZE_ELBOW_RANKS = 10


@dataclass(frozen=True)
class DataSizes:
    """Samples in the job's splits."""

    train: int
    val: int
    test: int


def batches_per_epoch(samples: int, batch_size: int, max_batches: int | None) -> int:
    batches = math.ceil(max(0, samples) / max(1, batch_size))
    return batches if max_batches is None else min(batches, max_batches)


def _train_cost(step: Any, sizes: DataSizes) -> float:
    batch_size = int(getattr(step, "batch_size", 128) or 128)
    batches = batches_per_epoch(sizes.train, batch_size, getattr(step, "max_batches", None))
    seen = min(sizes.train, batches * batch_size)
    tracking = 0
    if "effective_dim" in (getattr(step, "track", None) or []):
        tracking = int(getattr(step, "track_samples", None) or TRACK_SAMPLES_DEFAULT)
    per_epoch = seen * TRAIN_PASSES + sizes.val + tracking
    return int(getattr(step, "epochs", 1)) * per_epoch


def _analyze_cost(step: Any, sizes: DataSizes) -> float:
    layers = getattr(step, "layers", "auto")
    n_layers = len(layers) if isinstance(layers, list) else ANALYZE_LAYERS_DEFAULT
    counts = len(getattr(step, "counts", None) or []) or ANALYZE_COUNTS_DEFAULT
    evaluations = 0
    for kind in getattr(step, "kinds", None) or []:
        if kind == "unit_pruning":
            evaluations += (2 + int(getattr(step, "seeds", 5))) * counts
        elif kind == "elbow":
            evaluations += ANALYZE_ELBOW_RANKS
        else:  # spectrum, angles: weights only
            evaluations += 1
    return n_layers * evaluations * max(1, sizes.val) / 4


def step_cost(step: Any, sizes: DataSizes, accuracy: bool = True) -> float:
    """The expected cost of one step (validated step spec) in sample passes."""
    op = getattr(step, "op", "")
    cost = STEP_OVERHEAD + (sizes.test if accuracy else 0)
    if op == "train":
        return cost + _train_cost(step, sizes)
    if op == "pcn" and getattr(step, "when", "now") == "plateau":
        return cost  # its transform runs inside the train step before it (counted there)
    if op == "analyze":
        return cost + _analyze_cost(step, sizes)
    if op == "export":
        cost += EXPORT_COST * max(1, len(getattr(step, "formats", None) or [1]))
        cost += int(getattr(step, "samples", 0) or 0)
        if getattr(step, "quantize", None) == "int8_static":
            cost += int(getattr(step, "calibration_samples", 0) or 0)
        return cost
    if op == "measure":
        return cost + MEASURE_COST + sizes.val
    if op == "evaluate":
        return cost + sizes.test
    if op == "dctps":
        return cost + DCTPS_COST
    if op == "snip":
        return cost + int(getattr(step, "batches", 1)) * int(getattr(step, "batch_size", 100)) \
            * TRAIN_PASSES
    if op == "synflow":
        return cost + int(getattr(step, "rounds", 100)) * 2
    if op == "channel_prune" and getattr(step, "criterion", "l1") != "taylor":
        return cost
    samples = getattr(step, "samples", None)  # pcn, lowrank, taylor channel_prune, plug-ins
    return cost + (int(samples) if isinstance(samples, int) else 0)


def step_costs(steps: Sequence[Any], sizes: DataSizes, lean: bool = False) -> list[float]:
    """Every step's expected cost (`lean`: only the last step measures the test accuracy)."""
    costs = [step_cost(step, sizes, accuracy=not lean or i == len(steps) - 1)
             for i, step in enumerate(steps)]
    for i, step in enumerate(steps):
        if i and getattr(step, "op", "") == "pcn" and getattr(step, "when", "") == "plateau":
            costs[i - 1] += int(getattr(step, "samples", 0) or 0)
    return costs


class WeightedProgress:
    """Maps (step index, fraction of that step) to the job's progress, never moving back."""

    def __init__(self, costs: Sequence[float] | None = None, steps: int = 1) -> None:
        self.set_costs(list(costs) if costs else [1.0] * max(1, steps))
        self.last = 0.0

    def set_costs(self, costs: Sequence[float]) -> None:
        self.costs = [max(0.0, float(c)) for c in costs] or [1.0]
        self.total = sum(self.costs) or 1.0
        self.before = [sum(self.costs[:i]) for i in range(len(self.costs))]

    def at(self, step_index: int, fraction: float) -> float:
        """The job's progress (0..1) at `fraction` of step `step_index`; monotonic."""
        i = min(max(0, step_index), len(self.costs) - 1)
        fraction = min(1.0, max(0.0, fraction))
        value = (self.before[i] + fraction * self.costs[i]) / self.total
        self.last = max(self.last, min(1.0, value))
        return self.last


def train_batch_share(step: Any, sizes: DataSizes) -> float:
    """The share of one epoch's cost spent in its batches (the rest: validation, tracking)."""
    per_epoch = _train_cost(step, sizes) / max(1, int(getattr(step, "epochs", 1)))
    if per_epoch <= 0:
        return 1.0
    batch_size = int(getattr(step, "batch_size", 128) or 128)
    batches = batches_per_epoch(sizes.train, batch_size, getattr(step, "max_batches", None))
    return min(1.0, min(sizes.train, batches * batch_size) * TRAIN_PASSES / per_epoch)
