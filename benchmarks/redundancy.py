"""Redundancy analyses of seed 001 on a trained LeNet-300-100 (Fashion-MNIST): unit-pruning
curves without retraining, spectrum of W W^T at init vs trained against Marchenko–Pastur, the
elbow rank and rank-k accuracy, and principal angles between independently trained runs.

Run from the repository root:

    .venv/bin/python -m benchmarks.redundancy --epochs 10 --threads 1
    .venv/bin/python -m benchmarks.redundancy --summarize-only   # re-print, redraw from --out

Two models, seeds 0 and 1 (data split s, Glorot init and shuffling generator s), each trained
`--epochs` epochs on the full 54k training split (Adam 1e-3, batch 100). Accuracies are on the
full 10k test set. On model 0 (model 1 repeats the unit-pruning curves as a check):
* unit pruning (`core.redundancy.unit_pruning`) of fc1 (300 units) and fc2 (100 units): units
  removed physically (the next layer's columns too), no retraining; magnitude (smallest norm
  first), frame potential (greedy, smallest contribution first), random (5 orders, mean ± std),
  and the adversarial orders (largest norm / largest FP contribution first) of seed 001 Fig. 2;
* spectrum (`core.spectra.spectrum`) of W W^T for fc1, fc2 at init and trained, with the MP law
  for the Glorot variance 2 / (fan_in + fan_out): fraction of eigenvalues outside [λ-, λ+];
* elbow (`core.spectra.elbow`): knee of the residual energy vs rank, and test accuracy with the
  layer replaced by its rank-k projection (`elbow_accuracy`) for k = knee and a sweep;
* principal angles (`core.spectra.principal_angles`) between the top-k row spaces of fc1 in the
  two trained models, against the two random inits and against model 0's own init.
Figures: docs/figures/redundancy_{unit_pruning,spectrum,elbow,angles}.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import dump_results, run_meta
from core import data, models
from core.redundancy import unit_pruning
from core.sigprop import init_variance_scaling
from core.spectra import elbow, elbow_accuracy, init_variance, principal_angles, spectrum
from core.train import TrainConfig, evaluate, train

LAYERS = ("fc1", "fc2")
ORDERS = ("magnitude", "frame_potential", "magnitude_largest", "frame_potential_largest")
ORDER_LABELS = {"magnitude": "magnitude (smallest norm first = max-mag)",
                "frame_potential": "frame potential (smallest c first = max-FP)",
                "magnitude_largest": "largest norm first (min-mag)",
                "frame_potential_largest": "largest c first (min-FP)"}
RANKS = (1, 2, 5, 10, 20, 50, 100)
ANGLE_KS = (5, 10, 20, 50, 100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--random-orders", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="points per unit-pruning curve")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/redundancy_lenet300.json")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--summarize-only", action="store_true")
    return p.parse_args(argv)


def trained_pair(seed: int, args: argparse.Namespace, train_set, test_set
                 ) -> tuple[torch.nn.Module, torch.nn.Module, data.Splits, float]:
    """(init copy, trained model, splits, train seconds) for one seed."""
    splits = data.split(train_set, test_set, seed)
    splits = data.Splits(splits.train, splits.val.subset(torch.arange(1000)), splits.test)
    model = models.build({"name": "lenet300"}, generator=torch.Generator().manual_seed(seed))
    init_variance_scaling(model, torch.Generator().manual_seed(seed))
    init = copy.deepcopy(model)
    t = time.perf_counter()
    train(model, splits, TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3,
                                     batch_size=100),
          generator=torch.Generator().manual_seed(seed))
    return init, model, splits, time.perf_counter() - t


def spectrum_record(layer: torch.nn.Module) -> dict[str, Any]:
    s = spectrum(layer, variance=init_variance(layer, "glorot"))
    eig = s["eigenvalues"][:min(s["shape"])]
    return {"shape": list(s["shape"]), "variance": s["variance"],
            "lambda_minus": s["lambda_minus"], "lambda_plus": s["lambda_plus"],
            "outside_fraction": s["outside_fraction"],
            "above_plus": int((eig > s["lambda_plus"]).sum()),
            "below_minus": int((eig < s["lambda_minus"]).sum()),
            "eig_max": float(eig[0]), "eig_min": float(eig[-1]), "eigenvalues": eig.tolist()}


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    train_set, test_set = data.fashion_mnist(args.data_dir)
    pairs = [trained_pair(seed, args, train_set, test_set) for seed in (0, 1)]
    (init0, model0, splits0, train_s0), (init1, model1, _, train_s1) = pairs
    test = splits0.test  # the 10k test set (the same for every seed)

    def acc(m: torch.nn.Module) -> float:
        return evaluate(m, test)["accuracy"]

    res: dict[str, Any] = {"accuracy": {"seed0": acc(model0), "seed1": acc(model1)},
                           "train_s": [train_s0, train_s1]}
    t = time.perf_counter()
    res["unit_pruning"] = {}
    for name, model in (("seed0", model0), ("seed1", model1)):
        for layer in LAYERS:
            units = models.get_layer(model, layer).out_features
            counts = sorted({units * i // args.steps for i in range(args.steps)})
            res["unit_pruning"][f"{name}/{layer}"] = unit_pruning(
                model, layer, acc, counts=counts, seeds=args.random_orders, worst_case=True)
    res["unit_pruning_s"] = time.perf_counter() - t
    res["spectrum"] = {f"{when}/{layer}": spectrum_record(models.get_layer(m, layer))
                       for when, m in (("init", init0), ("trained", model0))
                       for layer in (*LAYERS, "fc3")}
    res["elbow"] = {}
    for when, m in (("init", init0), ("trained", model0)):
        for layer in LAYERS:
            e = elbow(models.get_layer(m, layer))
            ks = sorted({k for k in (*RANKS, e["knee"]) if k <= len(e["singular_values"])})
            res["elbow"][f"{when}/{layer}"] = {
                "knee": e["knee"], "residual": e["residual"].tolist(),
                "residual_at_knee": float(e["residual"][e["knee"]]),
                "accuracy": elbow_accuracy(m, layer, ks, acc) if when == "trained" else None}
    fc1 = {k: models.get_layer(m, "fc1") for k, m in
           (("trained0", model0), ("trained1", model1), ("init0", init0), ("init1", init1))}
    pairs_k = {"trained seed 0 vs trained seed 1": ("trained0", "trained1"),
               "init seed 0 vs init seed 1 (random)": ("init0", "init1"),
               "trained seed 0 vs its init": ("trained0", "init0")}
    knee = res["elbow"]["trained/fc1"]["knee"]
    res["angles"] = {label: {str(k): principal_angles(fc1[a], fc1[b], k).tolist()
                             for k in sorted({*ANGLE_KS, knee})}
                     for label, (a, b) in pairs_k.items()}
    return res


# ---- report -------------------------------------------------------------------------------

def _at(curve: list[dict], n: int, key: str = "accuracy") -> float:
    return next(p[key] for p in curve if p["removed"] == n)


def table(res: dict[str, Any]) -> str:
    a = res["accuracy"]
    lines = [(f"trained LeNet-300-100 test accuracy: seed 0 {100 * a['seed0']:.2f} %, "
             f"seed 1 {100 * a['seed1']:.2f} %"), "",
             "unit pruning, no retraining (test %; random: mean ± std over orders)", "",
             ("| model / layer | removed | magnitude | frame potential (max-FP) | random | "
              "largest norm first | largest c first (min-FP) |"), "|---|---|---|---|---|---|---|"]
    for key, up in res["unit_pruning"].items():
        units = up["units"]
        for frac in (0.25, 0.5, 0.75, 0.9):
            n = max(c for c in up["counts"] if c <= round(frac * units))
            rnd = next(p for p in up["random"] if p["removed"] == n)
            lines.append(
                f"| {key} | {n}/{units} | {100 * _at(up['magnitude'], n):.2f} | "
                f"{100 * _at(up['frame_potential'], n):.2f} | "
                f"{100 * rnd['accuracy_mean']:.2f} ± {100 * rnd['accuracy_std']:.2f} | "
                f"{100 * _at(up['magnitude_largest'], n):.2f} | "
                f"{100 * _at(up['frame_potential_largest'], n):.2f} |")
    lines += ["", "spectrum of W W^T vs Marchenko–Pastur (Glorot variance)", "",
              ("| layer | shape | init: outside [λ-, λ+] | trained: outside | trained: above λ+ / "
               "below λ- | λ+ | largest eigenvalue init → trained |"),
              "|---|---|---|---|---|---|---|"]
    for layer in (*LAYERS, "fc3"):
        i, t = res["spectrum"][f"init/{layer}"], res["spectrum"][f"trained/{layer}"]
        lines.append(f"| {layer} | {i['shape'][0]}×{i['shape'][1]} | "
                     f"{100 * i['outside_fraction']:.1f} % | {100 * t['outside_fraction']:.1f} % | "
                     f"{t['above_plus']} / {t['below_minus']} | {i['lambda_plus']:.3f} | "
                     f"{i['eig_max']:.3f} → {t['eig_max']:.2f} |")
    base = 100 * a["seed0"]
    lines += ["", ("elbow (residual energy vs rank) and rank-k projection of the trained layer "
              "(test %, seed 0)"), ""]
    for layer in LAYERS:
        e, ei = res["elbow"][f"trained/{layer}"], res["elbow"][f"init/{layer}"]
        lines.append(f"* {layer}: knee k = {e['knee']} (residual {100 * e['residual_at_knee']:.1f}"
                     f" % of the energy; at init: knee {ei['knee']}, residual "
                     f"{100 * ei['residual_at_knee']:.1f} %); rank-k accuracy: " + ", ".join(
                         f"k={p['rank']} {100 * p['accuracy']:.2f} "
                         f"({100 * p['accuracy'] - base:+.2f})" for p in e["accuracy"]))
    lines += ["", "principal angles between top-k row spaces of fc1 (mean / min / max, degrees)",
              "", "| pair | " + " | ".join(f"k={k}" for k in res["angles"][next(iter(
                  res["angles"]))]) + " |", "|---" * (1 + len(res["angles"][next(iter(
                      res["angles"]))])) + "|"]
    for label, by_k in res["angles"].items():
        lines.append(f"| {label} | " + " | ".join(
            f"{statistics.fmean(v):.1f} ({min(v):.1f}–{max(v):.1f})" for v in by_k.values())
            + " |")
    return "\n".join(lines)


def figures(res: dict[str, Any], folder: str, threads: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(folder).mkdir(parents=True, exist_ok=True)
    note = f"LeNet-300-100, Fashion-MNIST, CPU threads={threads}"
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, layer in zip(axes, LAYERS, strict=True):
        up = res["unit_pruning"][f"seed0/{layer}"]
        for i, key in enumerate(ORDERS):
            ax.plot([p["removed"] for p in up[key]], [100 * p["accuracy"] for p in up[key]],
                    "-" if i < 2 else ":", color=f"C{i}", marker="." if i < 2 else None,
                    label=ORDER_LABELS[key])
        rnd = up["random"]
        ax.errorbar([p["removed"] for p in rnd], [100 * p["accuracy_mean"] for p in rnd],
                    yerr=[100 * p["accuracy_std"] for p in rnd], color="C4", capsize=2,
                    label=f"random ({len(rnd[0]['accuracies'])} orders)")
        ax.set_xlabel(f"units removed from {layer} (of {up['units']})")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{layer}, no retraining", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"unit pruning (seed 001 Fig. 2) — {note}", fontsize=10)
    paths.append(_save(fig, plt, folder, "redundancy_unit_pruning.png"))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, layer in zip(axes, (*LAYERS, "fc3"), strict=True):
        for when, color in (("init", "C0"), ("trained", "C3")):
            s = res["spectrum"][f"{when}/{layer}"]
            eig = torch.tensor(s["eigenvalues"]).clamp(min=1e-12)
            ax.hist(torch.log10(eig).numpy(), bins=min(40, max(8, len(eig) // 4)), density=True,
                    alpha=0.5, color=color,
                    label=f"{when} ({100 * s['outside_fraction']:.0f} % outside MP)")
        s = res["spectrum"][f"init/{layer}"]
        m, n = s["shape"]
        lam = torch.logspace(math.log10(max(s["lambda_minus"], 1e-6)),
                             math.log10(s["lambda_plus"]), 300, dtype=torch.float64)
        rho = torch.sqrt(((s["lambda_plus"] - lam) * (lam - s["lambda_minus"])).clamp(min=0)) / (
            2 * math.pi * s["variance"] * m * lam)  # per eigenvalue of X
        # density per log10(λ) unit, normalised over the min(m, n) non-zero eigenvalues
        ax.plot(torch.log10(lam), rho * lam * math.log(10) * m / min(m, n), "k-", lw=1,
                label="Marchenko–Pastur (Glorot σ²)")
        for edge in (s["lambda_minus"], s["lambda_plus"]):
            if edge > 0:
                ax.axvline(math.log10(edge), color="k", ls=":", lw=0.8)
        ax.set_xlabel("log10 eigenvalue of W W^T")
        ax.set_title(f"{layer} ({m}×{n})", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density")
    fig.suptitle(f"spectral density at init vs trained — {note}", fontsize=10)
    paths.append(_save(fig, plt, folder, "redundancy_spectrum.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    base = 100 * res["accuracy"]["seed0"]
    for i, layer in enumerate(LAYERS):
        for when, ls in (("trained", "-"), ("init", ":")):
            e = res["elbow"][f"{when}/{layer}"]
            axes[0].plot(range(len(e["residual"])), e["residual"], ls, color=f"C{i}",
                         label=f"{layer} {when}")
            if when == "trained":
                axes[0].plot([e["knee"]], [e["residual_at_knee"]], "o", color=f"C{i}")
                axes[1].plot([p["rank"] for p in e["accuracy"]],
                             [100 * p["accuracy"] for p in e["accuracy"]], "-o", color=f"C{i}",
                             label=f"{layer} (knee k={e['knee']})")
    axes[0].set_xscale("symlog", linthresh=1)
    axes[0].set_xlabel("rank k")
    axes[0].set_ylabel("residual energy Σ_{i>k} s_i² / Σ s_i²")
    axes[0].legend(fontsize=7)
    axes[1].axhline(base, color="grey", ls=":", label="unmodified")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("rank k of the projected layer")
    axes[1].set_ylabel("test accuracy %")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"elbow rank and rank-k projection — {note}", fontsize=10)
    paths.append(_save(fig, plt, folder, "redundancy_elbow.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, by_k) in enumerate(res["angles"].items()):
        ks = [int(k) for k in by_k]
        ax.plot(ks, [statistics.fmean(v) for v in by_k.values()], "-o", color=f"C{i}",
                label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 92)
    ax.set_xlabel("k (top-k row space of fc1, in R^784)")
    ax.set_ylabel("mean principal angle (degrees)")
    ax.legend(fontsize=7)
    ax.set_title(f"principal angles — {note}", fontsize=9)
    paths.append(_save(fig, plt, folder, "redundancy_angles.png"))
    return paths


def _save(fig, plt, folder: str, name: str) -> str:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    path = str(Path(folder) / name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.summarize_only:
        saved = json.loads(out.read_text())
        print(table(saved["summary"]))
        figures(saved["summary"], args.figures, saved["meta"]["threads"])
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    res = analyse(args)
    text = table(res)
    print(text)
    dump_results(out, run_meta(args, complete=True, runtime=time.perf_counter() - started),
                 res, [], text)
    print("\n".join(figures(res, args.figures, args.threads)))
    print(f"runtime {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
