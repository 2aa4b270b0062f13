"""DCT plus Sparse (DCTpS) vs SNIP vs random pruning at init on Fashion-MNIST, accuracy vs
density (seed 002 Fig. A.1 / A.3 shape), the per-layer trainable budget of EPL vs EPF (Fig. A.2
data) and the alpha ablation (Fig. A.6: fixed alpha = 1 vs trainable).

Run from the repository root, one model per command:

    .venv/bin/python -m benchmarks.dctps_density --model lenet5 --train-subset 20000 \
        --epochs 3 --seeds 3
    .venv/bin/python -m benchmarks.dctps_density --model conv4 --train-subset 3000 \
        --epochs 4 --seeds 2 --val-subset 500 --test-subset 5000
    .venv/bin/python -m benchmarks.dctps_density --model lenet5 --summarize-only  # re-print

Density = trainable fraction of the prunable (Linear/Conv2d) weights. Per seed s (data split s,
Glorot init from generator s, shuffling generator s, supports/scores from generator s + 1),
every run is trained `--epochs` epochs with the same optimiser (Adam, lr 1e-3, weight decay
5e-4, the paper's setting; batch `--batch-size`) on the first `--train-subset` images of the
split, and tested at the end on the first `--test-subset` test images:
* dense: the Glorot init, all weights trained (reference);
* dctps-epl / dctps-epf: every Linear/Conv2d becomes `alpha * D + S` (`core.dctps`): D the
  fixed DCT, S zero-initialised on a fixed random support of round(density * weights) entries
  allocated equal-per-layer / equal-per-filter, alpha trainable (init 1);
* snip / random: the Glorot init pruned at init to the density (global scope; SNIP on one
  labelled batch of 100 training images; `benchmarks.snip_sparsity.score`), then trained with
  the mask enforced (`core.train.train(masks=...)`). A mask leaving a layer empty (layer
  collapse) is still trained and flagged;
* ablation: dctps-epl with alpha fixed at 1.0 at `--ablation-density`.
Results go to benchmarks/out/dctps_<model>.json after every run (`complete` false until the
end); the figure (accuracy vs density, per-layer budget at 1 %) to docs/figures/dctps_<model>.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import dump_results, grouped_stats, run_meta, save_figure
from benchmarks.snip_sparsity import score
from core import data, models
from core.dctps import dctps_transform
from core.prune import collapsed_layers, layer_report
from core.sigprop import init_variance_scaling
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
METHODS = ("dctps-epl", "dctps-epf", "snip", "random")
LABELS = {"dense": "dense", "dctps-epl": "DCTpS EPL", "dctps-epf": "DCTpS EPF",
          "snip": "SNIP", "random": "random", "dctps-epl-fixed": "DCTpS EPL, alpha = 1 fixed"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["lenet5", "conv4"], default="lenet5")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ablation-density", type=float, default=0.01,
                   help="density of the fixed-alpha ablation run (0: skip it)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--train-subset", type=int, default=20_000,
                   help="first N images of each seed's training split")
    p.add_argument("--val-subset", type=int, default=1000)
    p.add_argument("--test-subset", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default=None, help="default benchmarks/out/dctps_<model>.json")
    p.add_argument("--plot", default=None, help="default docs/figures/dctps_<model>.png")
    p.add_argument("--summarize-only", action="store_true",
                   help="re-print the tables and redraw the figure from --out")
    return p.parse_args(argv)


def seed_splits(args: argparse.Namespace, seed: int, train_set, test_set) -> data.Splits:
    splits = data.split(train_set, test_set, seed)
    return data.Splits(splits.train.subset(torch.arange(args.train_subset)),
                       splits.val.subset(torch.arange(args.val_subset)),
                       splits.test.subset(torch.arange(min(args.test_subset,
                                                           len(splits.test)))))


def prepare(method: str, init: torch.nn.Module, density: float, splits: data.Splits,
            seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(model to train, masks or None, row fields describing the sparse topology)."""
    model = copy.deepcopy(init)
    if method == "dense":
        return model, None, {"nnz": {}, "collapsed": []}
    gen = torch.Generator().manual_seed(seed + 1)
    if method.startswith("dctps"):
        allocation = method.split("-")[1]
        alpha: str | float = 1.0 if method.endswith("fixed") else "trainable"
        report = dctps_transform(model, density, allocation, alpha, generator=gen)
        return model, None, {"nnz": {n: r["nnz"] for n, r in report["layers"].items()},
                             "collapsed": [n for n, r in report["layers"].items()
                                           if r["nnz"] == 0]}
    masks = score(method, model, 1.0 - density, splits, gen, INPUT_SHAPE)
    return model, masks, {"nnz": {n: r["kept"] for n, r in layer_report(masks).items()},
                          "collapsed": collapsed_layers(masks)}


def run_one(method: str, density: float, init: torch.nn.Module, splits: data.Splits,
            cfg: TrainConfig, seed: int) -> dict[str, Any]:
    t = time.perf_counter()
    model, masks, topo = prepare(method, init, density, splits, seed)
    hist = train(model, splits, cfg, generator=torch.Generator().manual_seed(seed), masks=masks)
    alphas = {n: float(m.alpha.detach()) for n, m in model.named_modules()
              if hasattr(m, "alpha_mode")}  # DCTpS layers' final alpha
    return {"seed": seed, "method": method, "density": density,
            "test_accuracy": evaluate(model, splits.test)["accuracy"],
            "val_accuracy": [h["val_accuracy"] for h in hist],
            "nnz_total": sum(topo["nnz"].values()), **topo, "alpha": alphas,
            "epoch_s": statistics.median(h["wall_s"] for h in hist),
            "run_s": time.perf_counter() - t}


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Per (method, density): n, stats of test accuracy (+ std) and collapses; markdown text."""
    summary = []
    groups = (grouped_stats(rows, ("method", "density"), ("test_accuracy", "nnz_total"))
              if any(r["method"] == "dense" for r in rows) else [])  # needs a dense row
    for s, rs in groups:
        accs = [r["test_accuracy"] for r in rs]
        s["test_accuracy"]["std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        s["collapsed_runs"] = sum(1 for r in rs if r["collapsed"])
        summary.append(s)
    by_key = {(r["method"], r["density"]): [x for x in rows if x["method"] == r["method"]
                                            and x["density"] == r["density"]] for r in rows}
    densities = sorted({r["density"] for r in rows if r["method"] != "dense"}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    dense = [r["test_accuracy"] for r in rows if r["method"] == "dense"]
    seeds = len({r["seed"] for r in rows})
    lines = [f"test accuracy %, mean ± std over {seeds} seed(s)", ""]
    if dense:
        lines += [f"dense: {_fmt(dense)}", ""]
    lines += ["| density | " + " | ".join(LABELS[m] for m in methods) + " |",
              "|---" * (len(methods) + 1) + "|"]
    for d in densities:
        cells = []
        for m in methods:
            rs = by_key.get((m, d), [])
            if not rs:
                cells.append("–")
                continue
            cell = _fmt([r["test_accuracy"] for r in rs])
            collapsed = sum(1 for r in rs if r["collapsed"])
            cells.append(cell + (f" (collapse {collapsed}/{len(rs)})" if collapsed else ""))
        lines.append(f"| {100 * d:g} % | " + " | ".join(cells) + " |")
    # DCTpS margin over the best baseline, and whether every DCTpS seed beats every baseline seed
    lines += ["", ("| density | best DCTpS − best baseline (pt) | worst DCTpS seed > best "
              "baseline seed |"), "|---|---|---|"]
    for d in densities:
        dct = [m for m in methods if m.startswith("dctps") and (m, d) in by_key]
        base = [m for m in methods if not m.startswith("dctps") and (m, d) in by_key]
        if not dct or not base:
            continue
        mean = {m: statistics.fmean(r["test_accuracy"] for r in by_key[(m, d)])
                for m in dct + base}
        best_d, best_b = max(dct, key=mean.get), max(base, key=mean.get)
        sep = (min(r["test_accuracy"] for r in by_key[(best_d, d)])
               > max(r["test_accuracy"] for r in by_key[(best_b, d)]))
        lines.append(f"| {100 * d:g} % | {100 * (mean[best_d] - mean[best_b]):+.2f} "
                     f"({LABELS[best_d]} vs {LABELS[best_b]}) | {'yes' if sep else 'no'} |")
    fixed = [r for r in rows if r["method"] == "dctps-epl-fixed"]
    if fixed:
        d = fixed[0]["density"]
        trainable = by_key.get(("dctps-epl", d), [])
        lines += ["", (f"alpha ablation at {100 * d:g} % (DCTpS EPL): trainable "
                  f"{_fmt([r['test_accuracy'] for r in trainable]) if trainable else '–'}, "
                  f"fixed at 1.0 {_fmt([r['test_accuracy'] for r in fixed])}")]
        if trainable:
            per_layer: dict[str, list[float]] = {}
            for r in trainable:
                for n, a in r["alpha"].items():
                    per_layer.setdefault(n, []).append(a)
            lines.append("learned alpha (mean over seeds): " + ", ".join(
                f"{n} {statistics.fmean(v):.3f}" for n, v in per_layer.items()))
    lines += ["", *allocation_table(rows, 0.01)]
    return summary, "\n".join(lines)


def allocation_table(rows: list[dict[str, Any]], density: float) -> list[str]:
    """Per-layer trainable weights at `density`: EPL, EPF (deterministic), SNIP, random (mean)."""
    per_method = {m: [r for r in rows if r["method"] == m and r["density"] == density]
                  for m in METHODS}
    present = [m for m in METHODS if per_method[m]]
    if not present:
        return []
    layers = list(per_method[present[0]][0]["nnz"])
    lines = [(f"trainable weights per layer at {100 * density:g} % density (SNIP / random: mean "
             "over seeds)"), "", "| layer | " + " | ".join(LABELS[m] for m in present) + " |",
             "|---" * (len(present) + 1) + "|"]
    for n in layers + ["total"]:
        cells = []
        for m in present:
            vals = [sum(r["nnz"].values()) if n == "total" else r["nnz"][n]
                    for r in per_method[m]]
            cells.append(f"{statistics.fmean(vals):,.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for i, m in enumerate(methods):
        ds = sorted({r["density"] for r in rows if r["method"] == m})
        accs = [[100 * r["test_accuracy"] for r in rows if r["method"] == m
                 and r["density"] == d] for d in ds]
        ax.errorbar(ds, [statistics.fmean(a) for a in accs],
                    yerr=[statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs],
                    marker="o", capsize=3, color=f"C{i}", label=LABELS[m])
    fixed = [r for r in rows if r["method"] == "dctps-epl-fixed"]
    if fixed:
        a = [100 * r["test_accuracy"] for r in fixed]
        ax.errorbar([1.15 * fixed[0]["density"]], [statistics.fmean(a)],  # offset to be seen
                    yerr=[statistics.stdev(a) if len(a) > 1 else 0.0], marker="s",
                    mfc="none", capsize=3, ls="none", color="C0", label=LABELS[fixed[0]["method"]])
    dense = [100 * r["test_accuracy"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(statistics.fmean(dense), color="grey", ls=":", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("density (trainable fraction of prunable weights)")
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=7)
    seeds = len({r["seed"] for r in rows})
    ax.set_title(f"{args.model}: {args.train_subset} images, {args.epochs} epochs, "
                 f"{seeds} seed(s)", fontsize=9)
    present = [m for m in METHODS if any(r["method"] == m and r["density"] == 0.01
                                         for r in rows)]
    if present:
        first = next(r for r in rows if r["method"] == present[0] and r["density"] == 0.01)
        layers = list(first["nnz"])
        width = 0.8 / len(present)
        for i, m in enumerate(present):
            rs = [r for r in rows if r["method"] == m and r["density"] == 0.01]
            vals = [max(statistics.fmean(r["nnz"][n] for r in rs), 0.5) for n in layers]
            bx.bar([j + i * width for j in range(len(layers))], vals, width,
                   color=f"C{METHODS.index(m)}", label=LABELS[m])
        bx.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
        bx.set_yscale("log")
        bx.set_ylabel("trainable weights")
        bx.set_title("per-layer budget at 1 % density (seed 002 Fig. A.2)", fontsize=9)
        bx.legend(fontsize=7)
    fig.suptitle(f"DCTpS vs pruning at init, Fashion-MNIST, CPU threads={args.threads}",
                 fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out or f"benchmarks/out/dctps_{args.model}.json")
    figure = args.plot or f"docs/figures/dctps_{args.model}.png"
    if args.summarize_only:
        saved = json.loads(out.read_text())
        args = argparse.Namespace(**saved["meta"]["args"])
        _, text = summarize(saved["runs"])
        print(text)
        plot(saved["runs"], args, figure)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    cfg = TrainConfig(epochs=args.epochs, optimizer="adam", lr=args.lr,
                      weight_decay=args.weight_decay, batch_size=args.batch_size)
    plan = [("dense", 1.0)] * (not args.no_dense)
    plan += [(m, d) for d in args.densities for m in args.methods]
    if args.ablation_density:
        plan.append(("dctps-epl-fixed", args.ablation_density))
    rows: list[dict[str, Any]] = []

    def flush(complete: bool) -> str:
        summary, text = summarize(rows)
        meta = run_meta(args, complete=complete, runtime=time.perf_counter() - started,
                        train_config=cfg.to_dict())
        return dump_results(out, meta, summary, rows, text)

    for seed in range(args.seeds):
        splits = seed_splits(args, seed, train_set, test_set)
        init = models.build({"name": args.model}, generator=torch.Generator().manual_seed(seed))
        init_variance_scaling(init, torch.Generator().manual_seed(seed))
        for method, density in plan:
            rows.append(run_one(method, density, init, splits, cfg, seed))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "nnz"}), flush=True)
            flush(False)
    text = flush(True)
    print(text)
    plot(rows, args, figure)
    print(f"runtime {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
