"""The analyze step's plots, registered with `worker.plots.plot` (imported by
worker.step_analyze): `unit_pruning.png`, `spectrum.png`, `elbow.png`, `angles.png`, one panel
per analysed layer (several analyze steps: one line set per step) — validation accuracy vs units
removed (magnitude, frame potential, random mean ± std); eigenvalue histograms of W W^T
(trained and freshly initialised) with the Marchenko–Pastur density; residual energy vs rank
with its knee and the rank-k projections' validation accuracy; principal angles to the other
model's layer against random subspaces."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from worker.plots import DPI, plot


def _analysis_panels(curves: dict[str, Any], kind: str, title: str
                     ) -> tuple[Figure, list[tuple[Axes, str, list[dict[str, Any]]]]] | None:
    """A figure with one panel per analysed layer of `kind`, or None when there is none."""
    layers = {n: recs for n, recs in ((curves.get("analysis") or {}).get(kind) or {}).items()
              if recs}
    if not layers:
        return None
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.9 * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, [(ax, name, recs) for ax, (name, recs) in zip(axes, layers.items(), strict=False)]


def _analysis_plot(curves: dict[str, Any], path: Path, kind: str, title: str,
                   panel: Callable[[Axes, str, list[dict[str, Any]]], None]) -> bool:
    """One panel per analysed layer of `kind`, drawn by `panel`; False when there is none."""
    made = _analysis_panels(curves, kind, title)
    if made is None:
        return False
    fig, panels = made
    for ax, name, recs in panels:
        panel(ax, name, recs)
    fig.savefig(path, format="png")
    return True


def _suffix(recs: list[dict[str, Any]], rec: dict[str, Any]) -> str:
    return f" (step {rec['step'] + 1})" if len(recs) > 1 and rec.get("step") is not None else ""


def _unit_pruning_panel(ax: Axes, name: str, recs: list[dict[str, Any]]) -> None:
    for rec in recs:
        sfx = _suffix(recs, rec)
        for order, style in (("magnitude", "o-"), ("frame_potential", "s-")):
            pts = rec.get(order) or []
            ax.plot([p["removed"] for p in pts], [p["accuracy"] for p in pts], style,
                    markersize=3, label=order.replace("_", " ") + sfx)
        rand = rec.get("random") or []
        xs = [p["removed"] for p in rand]
        mean = [p["accuracy_mean"] for p in rand]
        std = [p["accuracy_std"] for p in rand]
        ax.plot(xs, mean, "^--", markersize=3, label="random (mean ± std)" + sfx)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=False)],
                        [m + s for m, s in zip(mean, std, strict=False)], alpha=0.2)
    ax.set_title(f"{name} ({recs[-1].get('units')} units)", fontsize="medium")
    ax.set_xlabel("units removed")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


@plot("unit_pruning.png")
def unit_pruning_plot(curves: dict[str, Any], path: Path) -> bool:
    return _analysis_plot(curves, path, "unit_pruning",
                          "Unit pruning without retraining (validation accuracy)",
                          _unit_pruning_panel)


def _spectrum_panel(ax: Axes, name: str, recs: list[dict[str, Any]]) -> None:
    rec = recs[-1]
    m, n = rec["shape"]
    bulk = min(m, n)
    scale = m / bulk  # MP integrates to min(1, n/m); histograms to 1
    top = max([*rec["eigenvalues"][:1], *rec["init_eigenvalues"][:1], rec["lambda_plus"]])
    bins = [top * 1.02 * i / 60 for i in range(61)]
    ax.hist(rec["init_eigenvalues"][:bulk], bins=bins, density=True, alpha=0.45,
            color="tab:grey", label=f"fresh {rec['init_scheme']} init")
    for r in recs:
        ax.hist(r["eigenvalues"][:bulk], bins=bins, density=True, alpha=0.5,
                histtype="stepfilled", label="trained" + _suffix(recs, r))
    ax.plot(rec["grid"], [d * scale for d in rec["density"]], color="black",
            label=f"MP, σ²={rec['variance']:.3g}")
    ax.axvline(rec["lambda_plus"], color="black", linestyle=":", linewidth=1)
    ax.set_xlim(0, top * 1.05)
    ax.set_title(f"{name} {m}x{n}: {rec['outside_fraction']:.0%} outside MP",
                 fontsize="medium")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


@plot("spectrum.png")
def spectrum_plot(curves: dict[str, Any], path: Path) -> bool:
    return _analysis_plot(curves, path, "spectrum",
                          "Eigenvalues of W W^T vs Marchenko–Pastur", _spectrum_panel)


def _elbow_panel(ax: Axes, name: str, recs: list[dict[str, Any]]) -> None:
    acc = ax.twinx()
    for rec in recs:
        sfx = _suffix(recs, rec)
        ax.plot(range(len(rec["residual"])), rec["residual"], label="residual" + sfx)
        ax.axvline(rec["knee"], color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"knee k={rec['knee']}" + sfx)
        ranks = rec.get("ranks") or []
        acc.plot([p["rank"] for p in ranks], [p["accuracy"] for p in ranks], "o--",
                 color="tab:green", markersize=4, label="val. accuracy" + sfx)
    ax.set_xlabel("rank k")
    ax.set_ylabel("residual energy fraction")
    ax.set_ylim(0, 1.02)
    acc.set_ylim(0, 1.02)
    acc.set_ylabel("validation accuracy (rank-k projection)")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = acc.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize="x-small", loc="center right")
    ax.set_title(name, fontsize="medium")


@plot("elbow.png")
def elbow_plot(curves: dict[str, Any], path: Path) -> bool:
    return _analysis_plot(curves, path, "elbow",
                          "Residual energy vs rank, and rank-k projections", _elbow_panel)


def _angles_panel(ax: Axes, name: str, recs: list[dict[str, Any]]) -> None:
    for rec in recs:
        sfx = _suffix(recs, rec)
        xs = range(1, len(rec["angles"]) + 1)
        ax.plot(xs, rec["angles"], "o-", markersize=3,
                label=f"vs model {rec['other_model']}" + sfx)
        ax.plot(xs, rec["random_angles"], "x--", markersize=3, color="tab:grey",
                label="vs a random matrix" + sfx)
    ax.set_ylim(0, 92)
    ax.set_xlabel("index (ascending angle)")
    ax.set_ylabel("principal angle (degrees)")
    ax.set_title(f"{name}, k={recs[-1]['k']}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


@plot("angles.png")
def angles_plot(curves: dict[str, Any], path: Path) -> bool:
    return _analysis_plot(curves, path, "angles",
                          "Principal angles between top-k row spaces", _angles_panel)
