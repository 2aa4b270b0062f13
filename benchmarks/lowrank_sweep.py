"""Low-rank compression on Fashion-MNIST (seed 003 Fig. 3 shape): accuracy vs parameter ratio for
every score and blocking, before and after a short fine-tune; scoring time (batched vs naive,
and vs one epoch); measured CPU latency of the factored model vs the dense one.

Run from the repository root:

    .venv/bin/python -m benchmarks.lowrank_sweep --model lenet5 --train-subset 20000

Per seed: the model (Glorot init) is trained `--epochs` epochs (Adam 1e-3, batch 100) on the
first `--train-subset` images of the seed's training split. For every blocking and score the
singular vectors of every Linear/Conv2d are scored once (`core.lowrank.layer_scores`, output
scores on `--samples` calibration images), then for every ratio the ranks are selected
(`select_ranks`), the model factored (`lowrank_transform`), tested on the 10k test set, fine-tuned
`--finetune-epochs` epoch(s) and tested again. param_ratio counts the factored layers' weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import dump_results, run_meta, save_figure
from core import data, metrics, models
from core.lowrank import (
    block_shapes,
    layer_scores,
    lowrank_transform,
    output_scores,
    output_scores_naive,
    select_ranks,
)
from core.models import get_layer, prunable_layers
from core.sigprop import init_variance_scaling
from core.train import TrainConfig, evaluate, train

SCORES = ("magnitude", "relative_error", "output_perturbation", "output_variance")
BLOCKINGS = ("none", "alds", "square")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["lenet5", "conv4"], default="lenet5")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    p.add_argument("--scores", nargs="+", choices=SCORES, default=list(SCORES))
    p.add_argument("--blockings", nargs="+", choices=BLOCKINGS, default=list(BLOCKINGS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=20_000)
    p.add_argument("--test-subset", type=int, default=10_000,
                   help="test images used (first N of the 10k test split)")
    p.add_argument("--samples", type=int, default=256, help="calibration images for scores")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--naive-layers", nargs="+", default=None,
                   help="layers for the naive-vs-batched timing (default: all)")
    p.add_argument("--plot", default=None,
                   help="accuracy-vs-ratio figure (default docs/figures/lowrank_<model>.png)")
    p.add_argument("--summarize-only", action="store_true",
                   help="re-print the table and redraw the plot from --out")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[5:])


def run_seed(seed: int, args: argparse.Namespace, train_set, test_set) -> dict[str, Any]:
    splits = data.split(train_set, test_set, seed)
    splits = data.Splits(splits.train.subset(torch.arange(args.train_subset)),
                         splits.val.subset(torch.arange(1000)),
                         splits.test.subset(torch.arange(min(args.test_subset, len(splits.test)))))
    model = models.build({"name": args.model}, generator=torch.Generator().manual_seed(seed))
    init_variance_scaling(model, torch.Generator().manual_seed(seed))
    cfg = TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3, batch_size=100)
    hist = train(model, splits, cfg, generator=torch.Generator().manual_seed(seed))
    epoch_s = statistics.median(h["wall_s"] for h in hist)
    dense_acc = evaluate(model, splits.test)["accuracy"]
    layers = [n for n, m in prunable_layers(model)
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    calib = splits.train.x[torch.randperm(len(splits.train),
                                          generator=torch.Generator().manual_seed(seed))
                           [:args.samples]]
    rows, timing = [], {}
    for blocking in args.blockings:
        shapes = {n: block_shapes(get_layer(model, n), blocking) for n in layers}
        for score in args.scores:
            t = time.perf_counter()
            scores = layer_scores(model, layers, blocking, score,
                                  calib if score.startswith("output") else None)
            timing[f"{score}/{blocking}"] = time.perf_counter() - t
            for ratio in args.ratios:
                ranks = select_ranks(scores, shapes, ratio)
                cut, report = lowrank_transform(
                    model, {n: {"blocking": blocking, "ranks": r} for n, r in ranks.items()})
                before = sum(r["weight_params_before"] for r in report.values())
                after = sum(r["weight_params_after"] for r in report.values())
                acc_cut = evaluate(cut, splits.test)["accuracy"]
                train(cut, splits, TrainConfig(epochs=args.finetune_epochs, optimizer="adam",
                                               lr=1e-3, batch_size=100),
                      generator=torch.Generator().manual_seed(seed))
                rows.append({"seed": seed, "blocking": blocking, "score": score,
                             "ratio": ratio, "weight_ratio": after / before,
                             "accuracy_cut": acc_cut,
                             "accuracy_finetuned": evaluate(cut, splits.test)["accuracy"],
                             "ranks": {n: r["ranks"] for n, r in report.items()},
                             "min_rank_fraction": min(
                                 sum(r["ranks"]) / sum(r["full_ranks"])
                                 for r in report.values())})
                print(rows[-1] | {"ranks": None}, flush=True)
    # batched vs naive output perturbation (no blocking), per layer
    per_layer = {}
    for n in args.naive_layers or layers:
        t = time.perf_counter()
        batched = torch.cat(output_scores(model, n, "none", calib)["output_perturbation"])
        batched_s = time.perf_counter() - t
        t = time.perf_counter()
        naive = torch.cat(output_scores_naive(model, n, "none", calib)["output_perturbation"])
        naive_s = time.perf_counter() - t
        per_layer[n] = {"vectors": naive.numel(), "batched_s": batched_s, "naive_s": naive_s,
                        "max_rel_diff": float(((batched - naive).abs()
                                               / naive.abs().clamp(min=1e-30)).max())}
        print(n, per_layer[n], flush=True)
    # latency at batch 256: dense vs the ratio-0.1 output-perturbation cut, no blocking
    scores = layer_scores(model, layers, "none", "output_perturbation", calib)
    ranks = select_ranks(scores, {n: block_shapes(get_layer(model, n), "none")
                                  for n in layers}, 0.1)
    cut, _ = lowrank_transform(model, {n: {"blocking": "none", "ranks": r}
                                       for n, r in ranks.items()})
    x = splits.test.x[:256]
    shape = [1, 28, 28]
    latency = {"dense_ms": latency_ms(model, x), "factored_ms": latency_ms(cut, x),
               "dense_macs": metrics.count_macs(model, shape),
               "factored_macs": metrics.count_macs(cut, shape),
               "dense_params": metrics.param_counts(model)["total"],
               "factored_params": metrics.param_counts(cut)["total"]}
    return {"seed": seed, "dense_accuracy": dense_acc, "epoch_s": epoch_s, "rows": rows,
            "scoring_s": timing, "naive_vs_batched": per_layer,
            "latency": latency}


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = [r for res in results for r in res["rows"]]
    dense = statistics.mean(r["dense_accuracy"] for r in results)
    lines = [f"dense: {100 * dense:.2f} %", "",
             "| blocking | score | " + " | ".join(f"ratio {r:g}" for r in args.ratios) + " |",
             "|---|---|" + "---|" * len(args.ratios)]
    for b in args.blockings:
        for s in args.scores:
            cells = []
            for ratio in args.ratios:
                rs = [r for r in rows if r["blocking"] == b and r["score"] == s
                      and r["ratio"] == ratio]
                cells.append(f"{100 * statistics.mean(r['accuracy_cut'] for r in rs):.1f} → "
                             f"{100 * statistics.mean(r['accuracy_finetuned'] for r in rs):.1f}")
            lines.append(f"| {b} | {s} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        spread = {key: max(statistics.stdev(100 * r[key] for r in rows if r["blocking"] == b
                                            and r["score"] == s and r["ratio"] == ratio)
                           for b in args.blockings for s in args.scores for ratio in args.ratios)
                  for key in ("accuracy_cut", "accuracy_finetuned")}
        lines += ["", (f"means over {len(results)} seeds; the largest std of a cell: "
                  f"{spread['accuracy_cut']:.1f} pt after the cut, "
                  f"{spread['accuracy_finetuned']:.1f} pt fine-tuned")]
    res = results[0]
    lines += ["", "| scoring (seed 0) | seconds | x one epoch |", "|---|---|---|"]
    for key, v in res["scoring_s"].items():
        lines.append(f"| {key} | {v:.2f} | {v / res['epoch_s']:.3f} |")
    nb = res["naive_vs_batched"]
    lines += ["", ("| output perturbation, no blocking | vectors | batched s | naive s | speed-up "
                   "| batched x one epoch | max rel. diff |"), "|---|---|---|---|---|---|---|"]
    tot_b, tot_n = sum(v["batched_s"] for v in nb.values()), sum(v["naive_s"] for v in nb.values())
    for layer, v in [*nb.items(), ("all", {"vectors": sum(v["vectors"] for v in nb.values()),
                                            "batched_s": tot_b, "naive_s": tot_n,
                                            "max_rel_diff": max(v["max_rel_diff"]
                                                                for v in nb.values())})]:
        lines.append(f"| {layer} | {v['vectors']} | {v['batched_s']:.2f} | {v['naive_s']:.2f} | "
                     f"{v['naive_s'] / v['batched_s']:.1f}x | {v['batched_s'] / res['epoch_s']:.3f}"
                     f" | {v['max_rel_diff']:.1e} |")
    lines.append(f"one training epoch: {res['epoch_s']:.1f} s")
    lat = res["latency"]
    lines += [(f"latency (batch 256, median of 25): dense {lat['dense_ms']:.2f} ms, factored "
              f"(ratio 0.1) {lat['factored_ms']:.2f} ms "
              f"({lat['dense_ms'] / lat['factored_ms']:.2f}x); "
              f"MACs ratio {lat['dense_macs'] / lat['factored_macs']:.2f}x; params "
              f"{lat['dense_params']:,} → {lat['factored_params']:,}")]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for res in results for r in res["rows"]]
    dense = statistics.mean(r["dense_accuracy"] for r in results)
    fig, axes = plt.subplots(1, len(args.blockings), figsize=(4.2 * len(args.blockings), 3.6),
                             sharey=True, squeeze=False)
    for ax, b in zip(axes[0], args.blockings, strict=True):
        for i, s in enumerate(args.scores):
            for key, style in (("accuracy_cut", "--"), ("accuracy_finetuned", "-")):
                ys = [100 * statistics.mean(r[key] for r in rows if r["blocking"] == b
                                            and r["score"] == s and r["ratio"] == ratio)
                      for ratio in args.ratios]
                ax.plot(args.ratios, ys, style, marker="o", color=f"C{i}",
                        label=s if key == "accuracy_finetuned" else None)
        ax.axhline(100 * dense, color="grey", lw=0.8, ls=":", label="dense")
        ax.set_xscale("log")
        ax.set_xticks(args.ratios, [f"{r:g}" for r in args.ratios])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("parameter ratio")
        ax.set_title(f"blocking: {b}")
    axes[0][0].set_ylabel("test accuracy %")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{args.model}, Fashion-MNIST, {len(results)} seed(s); dashed: right after "
                 "the cut, solid: after one fine-tuning epoch")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out or f"benchmarks/out/lowrank_{args.model}.json")
    figure = args.plot or f"docs/figures/lowrank_{args.model}.png"
    if args.summarize_only:
        results = json.loads(out.read_text())["runs"]
        print(table(results, args))
        plot(results, args, figure)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    results = [run_seed(s, args, train_set, test_set) for s in range(args.seeds)]
    text = table(results, args)
    print(text)
    dump_results(out, run_meta(args, complete=True, runtime=time.perf_counter() - started),
                 None, results, text)
    plot(results, args, figure)
    print(f"runtime {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
