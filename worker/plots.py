"""PNG plots of a job's curves (matplotlib, Agg; no pyplot, so no global figure state): the
plot registry (`@plot("name.png")`, used by the handler modules next to their code), the
train step's plots, and `render_plots`.

* `training.png`: loss and accuracy (train and validation) per epoch over all train steps.
* `effective_dim.png`: effective dimensionality per tracked layer and threshold vs epoch, with
  train/validation accuracy on a twin axis (the shape of seed 000 Fig. 1 / 3b).
Every other plot is registered next to its method's handler (`worker/step_<name>.py`; the
analyze step's in worker.analyze_plots).
The x axis of both is `global_epoch` (epochs over all train steps); dotted vertical
lines mark where a pcn transform was applied.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

DPI = 100
# (curves, path) -> True when it wrote the PNG file, False when it had nothing to plot
Plot = Callable[[dict[str, Any], Path], bool]
PLOTS: dict[str, Plot] = {}  # file name -> plot, in registration order


def plot(filename: str) -> Callable[[Plot], Plot]:
    """Decorator: register a plot of the job's curves, stored as the artifact `filename`."""
    def register(draw: Plot) -> Plot:
        if filename in PLOTS:
            raise TypeError(f"plot {filename!r} is already registered")
        PLOTS[filename] = draw
        return draw
    return register


def mark_transforms(ax: Axes, curves: dict[str, Any]) -> None:
    for i, t in enumerate(curves.get("transforms", [])):
        x = t.get("global_epoch")
        if x is not None:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1.2,
                       label="PCN transform" if i == 0 else None)


def _xy(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(p["global_epoch"], p[key]) for p in points
             if p.get("global_epoch") is not None and p.get(key) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


@plot("training.png")
def training_plot(curves: dict[str, Any], path: Path) -> bool:
    """Loss and accuracy per epoch; False (nothing written) when there was no training."""
    training = curves.get("training") or []
    if not training:
        return False
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, (train_key, val_key, label) in zip(
            (loss_ax, acc_ax), (("loss", "val_loss", "loss"),
                                ("accuracy", "val_accuracy", "accuracy")), strict=False):
        ax.plot(*_xy(training, train_key), marker="o", label=f"train {label}")
        ax.plot(*_xy(training, val_key), marker="s", label=f"validation {label}")
        mark_transforms(ax, curves)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    acc_ax.set_ylim(0, 1.02)
    fig.suptitle("Training")
    fig.savefig(path, format="png")
    return True


@plot("effective_dim.png")
def effective_dim_plot(curves: dict[str, Any], path: Path) -> bool:
    """Effective dimensionality vs epoch per layer and threshold, accuracy on a twin axis;
    False (nothing written) when no layer was tracked."""
    tracked = {name: points for name, points in (curves.get("effective_dim") or {}).items()
               if points}
    if not tracked:
        return False
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for name, points in tracked.items():
        taus = list(dict.fromkeys(t for p in points for t in (p.get("effective_dim") or {})))
        for tau in taus:
            xs = [p["global_epoch"] for p in points if tau in (p.get("effective_dim") or {})]
            ys = [p["effective_dim"][tau] for p in points
                  if tau in (p.get("effective_dim") or {})]
            ax.plot(xs, ys, marker="o", label=f"{name} (eigenvalues > {tau})")
    mark_transforms(ax, curves)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("effective dimensionality")
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    accuracy_points = next(iter(tracked.values()))
    acc.plot(*_xy(accuracy_points, "accuracy"), color="black", linestyle="--",
             label="train accuracy")
    acc.plot(*_xy(accuracy_points, "val_accuracy"), color="tab:red", linestyle="--",
             label="validation accuracy")
    acc.set_ylabel("accuracy")
    acc.set_ylim(0, 1.02)
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = acc.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, fontsize="small", loc="best")
    fig.suptitle("Effective dimensionality of layer inputs during training")
    fig.savefig(path, format="png")
    return True


def render_plots(curves: dict[str, Any], directory: Path) -> list[Path]:
    """Every registered plot that has data, as PNG files in `directory` (the handler modules
    register theirs: import worker.steps first, as the runner does). A plot that fails to render is
    logged and left out: it must not fail a job whose model is fine."""
    written = []
    for name, draw in PLOTS.items():
        path = directory / name
        try:
            if draw(curves, path):
                written.append(path)
        except Exception:
            log.warning("could not render %s", name, exc_info=True)
    return written
