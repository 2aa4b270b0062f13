"""Which layers to transform and how much (seed 000 App. E heuristics; ALGORITHMS §2).

* `auto_layers` / `auto_output` (the widest layers; where output pruning pays): defined in
  `core.pcn_auto`, re-exported here.
* `pcn_transform_to_target`: one common eigenvalue threshold for every layer, found by
  bisection over a log-spaced grid so that the model meets `{"max_accuracy_drop": d}`
  (validation accuracy, no retraining) or `{"trainable_params": N}` (at or below N; coarse:
  the pcn step's size targets use the per-layer allocation below instead).
* `pcn_transform_to_budget` (defined in `core.pcn_budget`, re-exported here): a size target
  (`trainable_params`, `total_params`, `nonzero_params`, `macs`) met by per-layer dims, greedy
  by explained variance per unit of measured cost, landing within ~1% below the budget.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from core.errors import SpecError
from core.metrics import param_counts
from core.pca import LayerStats
from core.pcn_auto import AUTO_OUTPUT_RULE, auto_layers, auto_output
from core.pcn_budget import pcn_transform_to_budget
from core.pcn_output import chosen_layers, pcn_transform
from core.train import evaluate

__all__ = ["AUTO_OUTPUT_RULE", "auto_layers", "auto_output", "pcn_transform_to_budget",
           "pcn_transform_to_target", "threshold_grid"]

# ---- target search ------------------------------------------------------------------------

def threshold_grid(stats: dict[str, LayerStats], layers: list[str], points: int = 48
                   ) -> list[float]:
    """Log-spaced thresholds from below the smallest positive eigenvalue to the largest one
    of the chosen layers, plus 0 (keep everything) first; ascending."""
    values = torch.cat([stats[n].eigvals.to(torch.float64).flatten() for n in layers])
    positive = values[values > 0]
    if positive.numel() == 0:
        return [0.0]
    lo, hi = float(positive.min()) / 2, float(positive.max())
    grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
    return [0.0, *(float(t) for t in grid)]


def pcn_transform_to_target(model: nn.Module, stats: dict[str, LayerStats],
                            target: dict[str, Any], layers: list[str] | str = "auto", *,
                            output: dict[str, dict[str, Any]] | str | None = None,
                            val_dataset: Dataset | None = None, points: int = 48,
                            device: str | torch.device = "cpu"
                            ) -> tuple[nn.Module, dict[str, Any]]:
    """Transform with the common `{"threshold": t}` that meets `target`; (new model, report).

    target: `{"trainable_params": N}` — the smallest t whose model has <= N trainable params
    (the least compression that fits); `{"max_accuracy_drop": d}` — the largest t whose
    validation accuracy (on `val_dataset`, no retraining) is >= baseline - d. Bisection over
    `threshold_grid` assumes the measure is monotone in t (fewer dims -> fewer params / lower
    accuracy); every accepted candidate was evaluated, so the budget is always met.
    SpecError when no threshold meets the target (e.g. N below the minimum: one component per
    layer). Report: the `pcn_transform` report plus `"search": {"threshold", "target",
    "value", "trials": [{"threshold", "value"}]}`.
    """
    if not isinstance(target, dict) or len(target) != 1 or \
            next(iter(target)) not in ("trainable_params", "max_accuracy_drop"):
        raise SpecError("target must be {'trainable_params': N} or {'max_accuracy_drop': d}, "
                        f"got {target!r}")
    (kind, goal), = target.items()
    if kind == "trainable_params" and (isinstance(goal, bool) or not isinstance(goal, int)
                                       or goal < 1):
        raise SpecError(f"trainable_params must be an integer >= 1, got {goal!r}")
    if kind == "max_accuracy_drop":
        if isinstance(goal, bool) or not isinstance(goal, (int, float)) or not 0 <= goal <= 1:
            raise SpecError(f"max_accuracy_drop must be a fraction in [0, 1], got {goal!r}")
        if val_dataset is None:
            raise SpecError("max_accuracy_drop needs a validation dataset (val_dataset)")
    chosen = chosen_layers(model, layers)
    missing = [n for n in chosen if n not in stats]
    if missing:
        raise SpecError(f"no PCA stats for layers {missing}; collect them with "
                        "core.pca.collect_input_stats first")
    grid = threshold_grid(stats, chosen, points)
    trials: list[dict[str, float]] = []
    cache: dict[int, tuple[nn.Module, dict[str, Any], float]] = {}

    def measure(i: int) -> tuple[nn.Module, dict[str, Any], float]:
        if i not in cache:
            new, report = pcn_transform(model, stats, {"threshold": grid[i]}, chosen,
                                        output=output)
            if kind == "trainable_params":
                value = float(param_counts(new)["trainable"])
            else:
                value = evaluate(new, val_dataset, device=device)["accuracy"]
            cache[i] = (new, report, value)
            trials.append({"threshold": grid[i], "value": value})
        return cache[i]

    if kind == "trainable_params":
        def ok(i: int) -> bool:
            return measure(i)[2] <= goal
        # want the smallest index (least compression) that fits; ok() is monotone up
        if not ok(len(grid) - 1):
            raise SpecError(f"trainable_params {goal} is below the minimum achievable "
                            f"{int(measure(len(grid) - 1)[2])} (one principal component per "
                            f"layer of {chosen}); transform more layers or add output pruning")
        lo, hi = 0, len(grid) - 1  # ok(hi) holds
        if ok(0):
            hi = lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        best = hi
    else:
        baseline = evaluate(model, val_dataset, device=device)["accuracy"]
        floor = baseline - float(goal)

        def ok(i: int) -> bool:
            return measure(i)[2] >= floor - 1e-12
        # want the largest index (most compression) that keeps accuracy; ok() is monotone down
        if not ok(0):
            raise SpecError(f"even keeping every component the accuracy "
                            f"{measure(0)[2]:.4f} is below baseline {baseline:.4f} - {goal}")
        lo, hi = 0, len(grid)  # ok(lo) holds; ok(hi) assumed false
        if ok(len(grid) - 1):
            lo = len(grid) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        best = lo
    new_model, report, value = measure(best)
    report["search"] = {"threshold": grid[best], "target": dict(target), "value": value,
                        "trials": trials}
    if kind == "max_accuracy_drop":
        report["search"]["baseline"] = baseline
    return new_model, report
