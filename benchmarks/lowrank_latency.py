"""Measured CPU latency of low-rank factored models vs dense, next to their MACs: a parameter
budget (`param_ratio`) against a MAC budget (`mac_ratio`, which spends the cut on the convs).

Run from the repository root:

    .venv/bin/python -m benchmarks.lowrank_latency --model lenet5

Per model: trained `--epochs` epochs (Adam 1e-3, batch 100, Glorot init) on the first
`--train-subset` images; output-perturbation scores (no blocking) on `--samples` calibration
images; for each target the model is cut (`select_ranks`, `lowrank_transform`), tested on the
first `--test-subset` test images, fine-tuned one epoch and tested again; latency is the median
of `--repeats` forwards of a batch of 256 test images with `--threads` threads, all models timed
in turns (dense, cut 1, cut 2, ..., dense, ...) after 3 warm-up turns.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import dump_results, round_robin_ms, run_meta
from core import data, metrics, models
from core.lowrank import (
    block_shapes,
    layer_positions,
    layer_scores,
    lowrank_transform,
    select_ranks,
)
from core.models import get_layer, prunable_layers
from core.sigprop import init_variance_scaling
from core.train import TrainConfig, evaluate, train

TARGETS = [("param_ratio", 0.1), ("mac_ratio", 0.5), ("mac_ratio", 0.3), ("mac_ratio", 0.2)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["lenet5", "conv4"], default="lenet5")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=20_000)
    p.add_argument("--test-subset", type=int, default=10_000)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    splits = data.split(train_set, test_set, 0)
    splits = data.Splits(splits.train.subset(torch.arange(args.train_subset)),
                         splits.val.subset(torch.arange(1000)),
                         splits.test.subset(torch.arange(min(args.test_subset,
                                                             len(splits.test)))))
    model = models.build({"name": args.model}, generator=torch.Generator().manual_seed(0))
    init_variance_scaling(model, torch.Generator().manual_seed(0))
    train(model, splits, TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3,
                                     batch_size=100), generator=torch.Generator().manual_seed(0))
    shape = [1, 28, 28]
    layers = [n for n, m in prunable_layers(model)
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    calib = splits.train.x[:args.samples]
    scores = layer_scores(model, layers, "none", "output_perturbation", calib)
    shapes = {n: block_shapes(get_layer(model, n), "none") for n in layers}
    positions = layer_positions(model, layers, shape)
    x = splits.test.x[:256]
    rows: list[dict[str, Any]] = [{
        "target": "dense", "accuracy_cut": evaluate(model, splits.test)["accuracy"],
        "accuracy_finetuned": None, "params": metrics.param_counts(model)["total"],
        "macs": metrics.count_macs(model, shape)}]
    nets = [model]
    for kind, ratio in TARGETS:
        ranks = select_ranks(scores, shapes, ratio, positions if kind == "mac_ratio" else None)
        cut, _ = lowrank_transform(model, {n: {"blocking": "none", "ranks": r}
                                           for n, r in ranks.items()})
        row = {"target": f"{kind} {ratio:g}", "ranks": ranks,
               "params": metrics.param_counts(cut)["total"],
               "macs": metrics.count_macs(cut, shape),
               "accuracy_cut": evaluate(cut, splits.test)["accuracy"]}
        train(cut, splits, TrainConfig(epochs=1, optimizer="adam", lr=1e-3, batch_size=100),
              generator=torch.Generator().manual_seed(0))
        row["accuracy_finetuned"] = evaluate(cut, splits.test)["accuracy"]
        rows.append(row)
        nets.append(cut)
        print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
    for row, ms in zip(rows, round_robin_ms(nets, x, args.repeats), strict=True):
        row["latency_ms"] = ms
    dense = rows[0]
    lines = [("| target | params | MACs | MACs ratio | latency ms (batch 256) | speed-up "
              "| accuracy cut → fine-tuned | ranks |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{100 * r['accuracy_cut']:.1f}" if r["accuracy_finetuned"] is None else
               f"{100 * r['accuracy_cut']:.1f} → {100 * r['accuracy_finetuned']:.1f}")
        ranks = ", ".join(f"{n} {sum(v)}" for n, v in r.get("ranks", {}).items())
        lines.append(f"| {r['target']} | {r['params']:,} | {r['macs']:,} | "
                     f"{dense['macs'] / r['macs']:.2f}x | {r['latency_ms']:.2f} | "
                     f"{dense['latency_ms'] / r['latency_ms']:.2f}x | {acc} | {ranks} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or f"benchmarks/out/lowrank_latency_{args.model}.json")
    dump_results(out, run_meta(args, complete=True, runtime=time.perf_counter() - started),
                 None, rows, text)
    print(f"runtime {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
