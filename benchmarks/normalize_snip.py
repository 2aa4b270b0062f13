"""Input normalization and SNIP (issue 14): SNIP at 98 % sparsity on LeNet-300-100, Fashion-MNIST,
trained on raw [0, 1] pixels vs on standardised ones (the job spec's `normalize: "standardize"`:
per-channel mean/std of the training split), with the dense model under both as reference.

Run from the repository root:

    .venv/bin/python -m benchmarks.normalize_snip                     # 3 seeds, 10 epochs
    .venv/bin/python -m benchmarks.normalize_snip --summarize-only    # re-print the table

Protocol (that of benchmarks/snip_sparsity.py, so the raw rows repeat its 98 % cell): per seed s
the data split s (54,000 training images, 1,000 validation images for the per-epoch check, the
full 10k test set), a Glorot (variance-scaling) init from generator s — the SAME init for both
inputs —, SNIP on one labelled batch of 100 training images (global scope, exactly 2 % of the
weights kept; scores computed on the inputs the model is trained on), then `--epochs` epochs of
Adam 1e-3, batch 100, with the mask enforced. `standardize` applies `core.data.standardize` with
`core.data.channel_stats` of the seed's training split to train, validation and test alike: the
worker's `worker.inputs.prepare_data` does the same for a job.
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

from benchmarks.common import dump_results, run_meta
from core import data, models
from core.prune import collapsed_layers, masks_from_scores, snip_scores
from core.sigprop import init_variance_scaling
from core.train import TrainConfig, evaluate, train

INPUTS = ("raw", "standardize")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/normalize_snip.json")
    p.add_argument("--summarize-only", action="store_true")
    return p.parse_args(argv)


def prepared(splits: data.Splits, inputs: str) -> tuple[data.Splits, dict[str, Any]]:
    if inputs == "raw":
        return splits, {"mean": None, "std": None}
    mean, std = data.channel_stats(splits.train)
    return data.Splits(*(data.standardize(part, mean, std)
                         for part in (splits.train, splits.val, splits.test))), \
        {"mean": mean, "std": std}


def run_seed(seed: int, args: argparse.Namespace, train_set: data.ArrayDataset,
             test_set: data.ArrayDataset, rows: list[dict[str, Any]]) -> None:
    base = data.split(train_set, test_set, seed)
    base = data.Splits(base.train, base.val.subset(torch.arange(1000)), base.test)
    init = models.build({"name": "lenet300"}, generator=torch.Generator().manual_seed(seed))
    init_variance_scaling(init, torch.Generator().manual_seed(seed))
    cfg = TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3, batch_size=100)
    methods = ["snip"] if args.no_dense else ["dense", "snip"]
    for inputs in INPUTS:
        splits, stats = prepared(base, inputs)
        for method in methods:
            model = copy.deepcopy(init)
            masks = None
            collapsed: list[str] = []
            if method == "snip":
                idx = torch.randperm(len(splits.train),
                                     generator=torch.Generator().manual_seed(seed + 1))[:100]
                masks = masks_from_scores(
                    snip_scores(model, [(splits.train.x[idx], splits.train.y[idx])]),
                    args.sparsity)
                collapsed = collapsed_layers(masks)
            t = time.perf_counter()
            train(model, splits, cfg, generator=torch.Generator().manual_seed(seed),
                  masks=masks)
            rows.append({"seed": seed, "inputs": inputs, "method": method,
                         "sparsity": args.sparsity if masks else 0.0,
                         "accuracy": evaluate(model, splits.test)["accuracy"],
                         "collapsed": collapsed, "train_s": time.perf_counter() - t, **stats})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("mean", "std")}),
                  flush=True)


def summarize(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| method | raw [0, 1] pixels | standardize | standardize − raw (pt) |",
             "|---|---|---|---|"]
    for method in ("dense", "snip"):
        acc = {i: {r["seed"]: r["accuracy"] for r in rows
                   if r["method"] == method and r["inputs"] == i} for i in INPUTS}
        if not acc["raw"]:
            continue
        paired = [100 * (acc["standardize"][s] - acc["raw"][s]) for s in seeds
                  if s in acc["raw"] and s in acc["standardize"]]
        cells = []
        for i in INPUTS:
            values = [100 * v for v in acc[i].values()]
            cells.append(f"{statistics.fmean(values):.2f} ({min(values):.2f}–{max(values):.2f})")
        delta = (f"{statistics.fmean(paired):+.2f} (per seed "
                 f"{', '.join(f'{d:+.2f}' for d in paired)})")
        name = method if method == "dense" else f"snip {100 * rows[-1]['sparsity']:g} %"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {delta} |")
    stats = [r for r in rows if r["inputs"] == "standardize" and r["mean"]]
    if stats:
        lines += ["", "training-split statistics used by standardize: " + "; ".join(
            f"seed {r['seed']}: mean {r['mean'][0]:.4f}, std {r['std'][0]:.4f}"
            for r in stats if r["method"] == "snip")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.summarize_only:
        print(json.loads(out.read_text())["table_md"])
        return
    torch.set_num_threads(args.threads)
    train_set, test_set = data.fashion_mnist(args.data_dir)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        run_seed(seed, args, train_set, test_set, rows)
        meta = run_meta(args, complete=seed == args.seeds - 1,
                        runtime=time.perf_counter() - started)
        table = dump_results(out, meta, None, rows, summarize(rows))
    print(table)
    print(f"runtime: {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
