"""PCN size targets on LeNet-300-100 / Fashion-MNIST: one common threshold versus the per-layer
allocation (issue 15, item 2).

Run from the repository root:

    .venv/bin/python -m benchmarks.pcn_budget --seeds 3

Per seed (seed s: data split s, init and shuffling generator s; batch 128, Adam 1e-3):
LeNet-300-100 trained `--epochs` (2) epochs; PCA of the pcn step's default layers (`auto`: fc1,
fc2) on `--calib` training samples, the full spectrum as a job's target search computes it; then
for every target of TARGETS:
* old: `core.pcn_select.pcn_transform_to_target` (one common eigenvalue threshold on a 48-point
  log grid; it existed for `trainable_params` only) — what a pcn job returned before;
* new: `core.pcn_budget.pcn_transform_to_budget` (per-layer dims, greedy by explained variance
  per unit of measured cost, fitted to the budget) — what a pcn job returns now;
each measured with `core.budget.model_cost`, test accuracy right after the cut and after
`--finetune` (1) epoch of fine-tuning (a fresh Adam, the same shuffling for old and new).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import dump_results, run_meta
from core import data, models, pca
from core.budget import costs
from core.pcn_select import auto_layers, pcn_transform_to_budget, pcn_transform_to_target
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
LENET = {"name": "lenet300"}
# (kind, budget, output_based): output_based = the step's `output_based: true` (output="auto":
# units pruned where every reader is compressed >= 10x; it costs non-linearly)
TARGETS: list[tuple[str, int, bool]] = [
    ("trainable_params", 30_000, False), ("trainable_params", 20_000, False),
    ("trainable_params", 60_000, False), ("total_params", 27_000, False),
    ("macs", 30_000, False), ("total_params", 27_000, True), ("macs", 30_000, True)]
OLD_KINDS = ("trainable_params",)  # what the common-threshold search accepted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=2, help="training epochs before the cut")
    p.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs after it")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib", type=int, default=5000, help="PCA calibration samples")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_budget.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--summarize-only", action="store_true",
                   help="print the table from an existing --out file")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adam", lr=args.lr, batch_size=args.batch_size)


def run_seed(seed: int, args: argparse.Namespace, splits: data.Splits):
    g = torch.Generator().manual_seed(seed)
    base = models.build(LENET, generator=g)
    train(base, splits, _config(args, args.epochs), generator=g)
    ft_state = g.get_state()
    dense = {"test_accuracy": evaluate(base, splits.test)["accuracy"],
             **costs(base, INPUT_SHAPE)}
    yield {"method": "dense", "seed": seed, **dense}
    layers = auto_layers(base)
    order = torch.randperm(len(splits.train),
                           generator=torch.Generator().manual_seed(10_000 + seed))
    start = time.perf_counter()
    stats = pca.collect_input_stats(base, layers, splits.train.subset(order[:args.calib]),
                                    samples=args.calib, top_k=784)
    stats_s = time.perf_counter() - start
    for kind, goal, output_based in TARGETS:
        output = "auto" if output_based else None
        variants = ["old", "new"] if kind in OLD_KINDS else ["new"]
        for method in variants:
            start = time.perf_counter()
            if method == "old":
                model, report = pcn_transform_to_target(base, stats, {kind: goal}, layers,
                                                        output=output)
            else:
                model, report = pcn_transform_to_budget(base, stats, kind, goal, layers,
                                                        output=output, input_shape=INPUT_SHAPE)
            search_s = time.perf_counter() - start
            measured = costs(model, INPUT_SHAPE)
            after = evaluate(model, splits.test)["accuracy"]
            g_ft = torch.Generator()
            g_ft.set_state(ft_state)
            train(model, splits, _config(args, args.finetune), generator=g_ft)
            row = {"method": method, "seed": seed, "kind": kind, "goal": goal,
                   "output_based": output_based,
                   "kept_units": {g: r["keep"] for g, r in report["output"].items()},
                   "value": measured[kind], "fraction": measured[kind] / goal, **measured,
                   "dims": {n: r["dims"] for n, r in report["input"].items()},
                   "test_accuracy_after_cut": after,
                   "test_accuracy_finetuned": evaluate(model, splits.test)["accuracy"],
                   "search_s": search_s, "stats_s": stats_s,
                   "evaluations": report["search"].get("evaluations",
                                                       len(report["search"]["trials"]))}
            print(f"seed {seed} {kind} {goal}{' output_based' if output_based else ''} "
                  f"{method}: {row['value']} "
                  f"({100 * row['fraction']:.1f}%) dims {row['dims']} after cut {after:.4f} "
                  f"fine-tuned {row['test_accuracy_finetuned']:.4f} ({search_s:.2f}s)",
                  flush=True)
            yield row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["method"], r.get("kind"), r.get("goal"), r.get("output_based"))
        groups.setdefault(key, []).append(r)
    out = []
    for (method, kind, goal, output_based), rs in groups.items():
        s: dict[str, Any] = {"method": method, "kind": kind, "goal": goal,
                             "output_based": output_based, "n": len(rs)}
        for key in ("value", "fraction", "test_accuracy", "test_accuracy_after_cut",
                    "test_accuracy_finetuned", "search_s", "evaluations"):
            if all(key in r for r in rs):
                vals = [float(r[key]) for r in rs]
                s[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
        if "dims" in rs[0]:
            s["dims"] = [r["dims"] for r in rs]
            s["kept_units"] = [r["kept_units"] for r in rs]
        out.append(s)
    return out


def _pct(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "–"
    return f"{100 * stat['mean']:.2f} [{100 * stat['min']:.2f}, {100 * stat['max']:.2f}]"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    head = ("| target | search | measured (mean [min, max]) | % of budget | dims fc1/fc2 "
            "(seed 0) | test % after cut | test % after 1 epoch | search s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        if s["method"] == "dense":
            lines.append(f"| dense, 2 epochs | – | 266,610 params, 266,200 MACs | – | 784/300 "
                         f"| {_pct(s['test_accuracy'])} | – | – |")
            continue
        v, d = s["value"], s["dims"][0]
        name = "common threshold" if s["method"] == "old" else "per-layer"
        if s["output_based"]:
            name += ", output_based (fc1 keeps " + "/".join(
                str(k["fc1"]) if "fc1" in k else "300" for k in s["kept_units"]) + " units)"
        lines.append(
            f"| {s['kind']} {s['goal']:,} | {name} | {v['mean']:,.0f} [{v['min']:,.0f}, "
            f"{v['max']:,.0f}] | {100 * s['fraction']['mean']:.1f} | "
            f"{'/'.join(str(x) for x in d.values())} | {_pct(s['test_accuracy_after_cut'])} | "
            f"{_pct(s['test_accuracy_finetuned'])} | {s['search_s']['mean']:.2f} |")
    return "\n".join(lines)


def write_results(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]],
                  runtime: float, complete: bool) -> str:
    summary = summarize(rows)
    meta = run_meta(args, complete=complete, runtime=runtime, targets=TARGETS)
    return dump_results(out, meta, summary, rows, markdown_table(summary))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summarize_only:
        print(markdown_table(summarize(json.loads(out.read_text())["runs"])))
        return
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for row in run_seed(seed, args, data.split(train_set, test_set, seed)):
            rows.append(row)
        write_results(out, args, rows, time.perf_counter() - started, complete=False)
    runtime = time.perf_counter() - started
    table = write_results(out, args, rows, runtime, complete=True)
    print()
    print(table)
    print(f"\nruntime {runtime / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
