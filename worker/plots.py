"""PNG plots of a job's curves (matplotlib, Agg; no pyplot, so no global figure state).

* `training.png`: loss and accuracy (train and validation) per epoch over all train steps.
* `effective_dim.png`: effective dimensionality per tracked layer and threshold vs epoch, with
  train/validation accuracy on a twin axis (the shape of seed 000 Fig. 1 / 3b).
* `pruning.png`: per pruning step, the kept fraction of every layer (bars; a collapsed layer is
  marked) and the first layer's retained-input heatmap (seed 004 Fig. 3.2).
* `lowrank.png`: per lowrank step, kept rank and weight fraction per layer.
* `dctps.png`: per dctps step, the trainable S entries (nnz, log scale) and density per layer
  (the data of seed 002 Fig. A.2).
* `unit_pruning.png`, `spectrum.png`, `elbow.png`, `angles.png`: the analyze step's analyses,
  one panel per layer (several analyze steps: one line set per step) — validation accuracy vs
  units removed (magnitude, frame potential, random mean ± std); eigenvalue histograms of
  W W^T (trained and freshly initialised) with the Marchenko–Pastur density; residual energy vs
  rank with its knee and the rank-k projections' validation accuracy; principal angles to the
  other model's layer against random subspaces.
The x axis of the first two is `global_epoch` (epochs over all train steps); dotted vertical
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


def _mark_transforms(ax: Axes, curves: dict[str, Any]) -> None:
    for i, t in enumerate(curves.get("transforms", [])):
        x = t.get("global_epoch")
        if x is not None:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1.2,
                       label="PCN transform" if i == 0 else None)


def _xy(points: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(p["global_epoch"], p[key]) for p in points
             if p.get("global_epoch") is not None and p.get(key) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def training_plot(curves: dict[str, Any], path: Path) -> bool:
    """Loss and accuracy per epoch; False (nothing written) when there was no training."""
    training = curves.get("training") or []
    if not training:
        return False
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, (train_key, val_key, label) in zip(
            (loss_ax, acc_ax), (("loss", "val_loss", "loss"),
                                ("accuracy", "val_accuracy", "accuracy"))):
        ax.plot(*_xy(training, train_key), marker="o", label=f"train {label}")
        ax.plot(*_xy(training, val_key), marker="s", label=f"validation {label}")
        _mark_transforms(ax, curves)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    acc_ax.set_ylim(0, 1.02)
    fig.suptitle("Training")
    fig.savefig(path, format="png")
    return True


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
    _mark_transforms(ax, curves)
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


def pruning_plot(curves: dict[str, Any], path: Path) -> bool:
    """Kept fraction per layer and the first layer's retained-input heatmap, one row per
    pruning step; False (nothing written) when nothing was pruned."""
    records = curves.get("pruning") or []
    if not records:
        return False
    fig = Figure(figsize=(11, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 2, squeeze=False,
                        gridspec_kw={"width_ratios": [2.2, 1]})
    for (bars, heat), rec in zip(axes, records):
        names = list(rec["layers"])
        fractions = [rec["layers"][n]["fraction"] for n in names]
        colors = ["tab:red" if n in rec.get("collapsed", []) else "tab:blue" for n in names]
        bars.bar(range(len(names)), fractions, color=colors)
        bars.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        bars.set_ylabel("kept fraction")
        bars.set_ylim(0, max(1e-3, max(fractions) * 1.15))
        title = (f"step {rec['step'] + 1}: {rec['op']} ({rec['scope']}), "
                 f"sparsity {rec['sparsity']:g}")
        jac = rec.get("jacobian") or {}
        if "dense" in jac and "pruned" in jac:
            title += (f"\nJacobian mean singular value {jac['dense']['mean']:.3g} (dense) → "
                      f"{jac['pruned']['mean']:.3g} (pruned)")
        bars.set_title(title, fontsize="medium")
        bars.grid(alpha=0.3, axis="y")
        image = heat.imshow(rec["heatmap"], cmap="viridis", vmin=0)
        heat.set_title(f"{rec['first_layer']}: retained {rec.get('heatmap_of', 'inputs')}",
                       fontsize="small")
        heat.set_xticks([])
        heat.set_yticks([])
        fig.colorbar(image, ax=heat, shrink=0.8)
    fig.savefig(path, format="png")
    return True


def lowrank_plot(curves: dict[str, Any], path: Path) -> bool:
    """Kept rank per layer (as a fraction of the full rank, summed over blocks) and the kept
    weight fraction, one panel per lowrank step; False when there was none."""
    records = curves.get("lowrank") or []
    if not records:
        return False
    fig = Figure(figsize=(10, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 1, squeeze=False)
    for (ax,), rec in zip(axes, records):
        names = list(rec["layers"])
        rank = [sum(rec["layers"][n]["ranks"]) / max(1, sum(rec["layers"][n]["full_ranks"]))
                for n in names]
        weights = [rec["layers"][n]["weight_params_after"]
                   / max(1, rec["layers"][n]["weight_params_before"]) for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], rank, width=0.4, label="kept rank / full rank")
        ax.bar([x + 0.2 for x in xs], weights, width=0.4, label="weights after / before")
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize="small")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
        ax.set_title(f"step {rec['step'] + 1}: lowrank ({rec['score']}, blocking "
                     f"{rec['blocking']})")
    fig.savefig(path, format="png")
    return True


def dctps_plot(curves: dict[str, Any], path: Path) -> bool:
    """Trainable entries (nnz) and density per layer, one row per dctps step."""
    records = curves.get("dctps") or []
    if not records:
        return False
    fig = Figure(figsize=(11, 3.6 * len(records)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(records), 2, squeeze=False)
    for (nnz_ax, density_ax), rec in zip(axes, records):
        names = list(rec["layers"])
        xs = list(range(len(names)))
        nnz = [max(rec["layers"][n]["nnz"], 0.5) for n in names]
        density = [max(rec["layers"][n]["density"], 1e-7) for n in names]
        nnz_ax.bar(xs, nnz, color="tab:blue")
        nnz_ax.set_yscale("log")
        nnz_ax.set_ylim(0.5, max(nnz) * 3)  # bars from the bottom, not auto-zoomed to equal
        nnz_ax.set_ylabel("trainable entries of S (nnz)")
        for x, v in zip(xs, nnz):
            nnz_ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize="x-small")
        density_ax.bar(xs, density, color="tab:orange")
        density_ax.set_yscale("log")
        density_ax.set_ylim(min(density) / 3, 1.5)
        density_ax.set_ylabel("layer density (nnz / weights)")
        density_ax.axhline(rec["total_nnz"] / max(1, rec["total_weights"]), color="black",
                           linestyle="--", linewidth=1, label="overall density")
        density_ax.legend(fontsize="small")
        for ax in (nnz_ax, density_ax):
            ax.set_xticks(xs, names, rotation=45, ha="right", fontsize="small")
            ax.grid(alpha=0.3, axis="y")
        nnz_ax.set_title(f"step {rec['step'] + 1}: dctps {rec['allocation']}, density "
                         f"{rec['density']:g} ({rec['total_nnz']} of {rec['total_weights']} "
                         "weights trainable)", fontsize="medium")
    fig.savefig(path, format="png")
    return True


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
    return fig, [(ax, name, recs) for ax, (name, recs) in zip(axes, layers.items())]


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
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_title(f"{name} ({recs[-1].get('units')} units)", fontsize="medium")
    ax.set_xlabel("units removed")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


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


def angles_plot(curves: dict[str, Any], path: Path) -> bool:
    return _analysis_plot(curves, path, "angles",
                          "Principal angles between top-k row spaces", _angles_panel)


PLOTS = (("training.png", training_plot), ("effective_dim.png", effective_dim_plot),
         ("pruning.png", pruning_plot), ("lowrank.png", lowrank_plot),
         ("dctps.png", dctps_plot), ("unit_pruning.png", unit_pruning_plot),
         ("spectrum.png", spectrum_plot), ("elbow.png", elbow_plot),
         ("angles.png", angles_plot))


def render_plots(curves: dict[str, Any], directory: Path) -> list[Path]:
    """Every plot that has data, as PNG files in `directory`. A plot that fails to render is
    logged and left out: it must not fail a job whose model is fine."""
    written = []
    for name, draw in PLOTS:
        path = directory / name
        try:
            if draw(curves, path):
                written.append(path)
        except Exception:
            log.warning("could not render %s", name, exc_info=True)
    return written
