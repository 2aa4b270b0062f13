"""The `auto` step on the worker: not a step handler like the others — an auto job is a search
whose coordinator (`worker.auto_search`) runs trials as child jobs — plus its plot,
`frontier.png`: every trial's cost against its validation accuracy (screened right after the
cut, fine-tuned, the winner), the Pareto set of the fine-tuned ones, the budget line and the
starting model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from core.errors import SpecError
from service.methods.auto import AutoStep, pareto
from worker.context import StepContext
from worker.plots import DPI, plot
from worker.registry import handler


@handler(AutoStep)
def run_auto(ctx: StepContext, step: AutoStep) -> dict[str, Any]:
    raise SpecError("an auto step runs as a search of its own (its coordinator starts the "
                    "trials); it must be the job's only step")


@plot("frontier.png")
def frontier_plot(curves: dict[str, Any], path: Path) -> bool:
    """Cost vs validation accuracy of every trial; False when the job searched nothing."""
    auto = curves.get("auto") or {}
    trials = [t for t in auto.get("trials") or []
              if t.get("cost") is not None and t.get("val_accuracy") is not None]
    if not trials:
        return False
    budget = auto.get("budget") or {}
    kind = budget.get("kind", "cost")
    fig = Figure(figsize=(9, 5.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    screened = [t for t in trials if t.get("phase") == "screen"]
    tuned = [t for t in trials if t.get("phase") == "finetune"]
    final = [t for t in trials if t.get("phase") == "final"]
    if screened:
        ax.scatter([t["cost"] for t in screened], [t["val_accuracy"] * 100 for t in screened],
                   facecolors="none", edgecolors="tab:grey", s=36,
                   label="screened (right after the cut)")
    methods = sorted({str((t.get("params") or {}).get("method", "?")) for t in tuned})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for method in methods:
        points = [t for t in tuned if str((t.get("params") or {}).get("method")) == method]
        ax.scatter([t["cost"] for t in points], [t["val_accuracy"] * 100 for t in points],
                   color=colors[method], s=48, label=f"fine-tuned: {method.replace('+', ' → ')}")
    front = [tuned[i] for i in pareto(tuned)]
    if len(front) > 1:
        ax.step([t["cost"] for t in front], [t["val_accuracy"] * 100 for t in front],
                where="post", color="black", linewidth=1, label="Pareto set (fine-tuned)")
    for t in final:
        ax.scatter([t["cost"]], [t["val_accuracy"] * 100], marker="*", s=260, color="gold",
                   edgecolors="black", zorder=5, label="winner (after the final epochs)")
    if budget.get("value") is not None:
        ax.axvline(budget["value"], color="tab:red", linestyle="--",
                   label=f"budget: {budget['value']:g} {kind}")
    baseline = auto.get("baseline") or {}
    if baseline.get("val_accuracy") is not None:
        ax.axhline(baseline["val_accuracy"] * 100, color="tab:green", linestyle=":",
                   label="starting model")
    ax.set_xlabel(kind)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"Auto-compress: {len(tuned)} fine-tuned of {len(screened)} screened "
                 "candidates")
    fig.savefig(path, format="png")
    return True
