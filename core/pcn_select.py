"""Which layers to transform and how much (seed 000 App. E heuristics; ALGORITHMS §2).

* `auto_layers`: the "widest layers" heuristic made precise: among every Linear/Conv2d layer
  except the first in forward order (it reads the raw image), take layers by decreasing weight
  count (`m * n * kh * kw`: input dims times width) until they hold >= `coverage` (default 90%)
  of those layers' weights, plus the partners of a picked layer that read the same tensor (a
  ResNet block's shortcut_conv with its conv1: they share U); returned in forward order.
* `auto_output`: the output-based transform only where it pays (App. C, E): on every unit group
  whose readers are all input-transformed with `in_dim / dims >= min_ratio` (10x), keeping the
  top units that hold `score_mass` (default 0.9) of the summed L1 scores.
* `pcn_transform_to_target`: one common eigenvalue threshold for every layer, found by
  bisection over a log-spaced grid so that the model meets `{"trainable_params": N}` (at or
  below N) or `{"max_accuracy_drop": d}` (validation accuracy, no retraining).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from core.errors import SpecError
from core.pca import LayerStats
from core.pcn_graph import shared_input_sets, unit_groups

AUTO_OUTPUT_RULE = {"score_mass": 0.9}


def auto_layers(model: nn.Module, *, coverage: float = 0.9, min_in_dim: int = 16) -> list[str]:
    """The widest layers (seed 000 App. E: "the input-based transformation on the widest
    layers"): fewest Linear/Conv2d layers, by decreasing weight count, holding >= coverage of
    the weights of every candidate, plus their shared-input partners; forward order.

    The first layer is a candidate only when its input has >= `min_in_dim` dims: a first conv
    reading 1-3 image channels has nothing to compress, while an MLP's first layer reading 784
    pixels is its widest (LeNet-300-100: fc1 holds 88% of the weights, like Conv4's fc1).
    """
    from core.models import prunable_layers

    if not 0 < coverage <= 1:
        raise SpecError(f"coverage must be in (0, 1], got {coverage!r}")
    layers = [(n, m) for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    first = layers[0][1] if layers else None
    wide_first = first is not None and (
        first.in_features if isinstance(first, nn.Linear) else first.in_channels) >= min_in_dim
    candidates = layers if wide_first else layers[1:]
    if not candidates:
        raise SpecError("the model has no Linear/Conv2d layer to transform (its first layer "
                        f"reads fewer than {min_in_dim} input dims)")
    sizes = {n: m.weight.numel() for n, m in candidates}
    total = sum(sizes.values())
    picked: set[str] = set()
    held = 0
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: forward order on ties
        if held >= coverage * total - 1e-9:
            break
        picked.add(name)
        held += sizes[name]
    for tensor in shared_input_sets(model):  # partners reading the same tensor share U
        if picked & set(tensor):
            picked |= {n for n in tensor if n in sizes}
    return [n for n, _ in candidates if n in picked]


def auto_output(model: nn.Module, stats: dict[str, LayerStats], dims: dict[str, int], *,
                min_ratio: float = 10.0,
                rule: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{group: rule} for the unit groups whose every reader is compressed >= min_ratio."""
    rule = dict(rule or AUTO_OUTPUT_RULE)
    out = {}
    for name, group in unit_groups(model).items():
        readers = group.reader_layers
        if all(r in dims and r in stats and stats[r].dim >= min_ratio * dims[r]
               for r in readers):
            out[name] = rule
    return out


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
    from core.metrics import param_counts
    from core.pcn_output import _chosen_layers, pcn_transform

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
    chosen = _chosen_layers(model, layers)
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
                from core.train import evaluate
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
        from core.train import evaluate
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
