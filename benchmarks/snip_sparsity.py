"""Pruning at initialization on Fashion-MNIST: SNIP vs random vs magnitude vs SynFlow vs dense
at several sparsities (the shape of seed 004 Table 3.1), plus scoring time.

Run from the repository root, one model per command:

    .venv/bin/python -m benchmarks.snip_sparsity --model lenet300 --epochs 10
    .venv/bin/python -m benchmarks.snip_sparsity --model lenet5 --epochs 3 --train-subset 20000

Per seed s (data split s, init and shuffling generator s; Adam 1e-3, batch 100):
* dense: the model at variance-scaling (Glorot) init, trained `--epochs`;
* snip / random / synflow: the same init, pruned at init to the sparsity (global scope; SNIP
  on one labelled batch of 100 training images, SynFlow 100 rounds), then trained `--epochs`
  with the mask enforced (`core.train.train(masks=...)`);
* magnitude: the trained dense model pruned by |w| (global), then trained `--epochs` more from
  those weights with the mask (prune after training + fine-tune, the classic baseline).
A method whose mask leaves a layer empty (layer collapse) is still trained and marked.
Test accuracy on the full 10k test set at the end. Scoring time (median of 3) is reported as a
multiple of one training step: the dense run's training time divided by its number of
Adam steps (batch 100; the per-epoch validation pass included), measured in the same process
under the same load. (`step_s`, a separately timed median of 35 isolated steps, is also
recorded, but it is unreliable when another process shares the cores.)

    .venv/bin/python -m benchmarks.snip_sparsity --model lenet300 --summarize-only
re-prints the tables from the JSON.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from core import data, models
from core.prune import (
    collapsed_layers,
    magnitude_scores,
    masks_from_scores,
    random_scores,
    snip_scores,
    synflow_masks,
)
from core.sigprop import init_variance_scaling
from core.train import TrainConfig, evaluate, train

ARCHS = {"lenet300": {"name": "lenet300"}, "lenet5": {"name": "lenet5"}}
METHODS = ("snip", "random", "magnitude", "synflow")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=list(ARCHS), default="lenet300")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on the first N images of each seed's training split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default=None)
    p.add_argument("--summarize-only", action="store_true")
    return p.parse_args(argv)


def step_time(model: torch.nn.Module, splits: data.Splits, generator: torch.Generator) -> float:
    """Median wall time of one Adam step on a batch of 100 (forward, backward, update)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = splits.train.x, splits.train.y
    times = []
    for _ in range(40):
        idx = torch.randint(len(y), (100,), generator=generator)
        t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[5:])


def score(method: str, model: torch.nn.Module, sparsity: float, splits: data.Splits,
          generator: torch.Generator, input_shape: list[int]) -> dict[str, torch.Tensor]:
    if method == "synflow":
        return synflow_masks(model, sparsity, input_shape, rounds=100)
    if method == "snip":
        idx = torch.randperm(len(splits.train), generator=generator)[:100]
        scores = snip_scores(model, [(splits.train.x[idx], splits.train.y[idx])])
    elif method == "random":
        scores = random_scores(model, generator)
    else:
        scores = magnitude_scores(model)
    return masks_from_scores(scores, sparsity)


def run_seed(seed: int, args: argparse.Namespace, train_set, test_set, rows: list, flush
             ) -> None:
    splits = data.split(train_set, test_set, seed)
    if args.train_subset:
        splits = data.Splits(splits.train.subset(torch.arange(args.train_subset)), splits.val,
                             splits.test)
    splits = data.Splits(splits.train, splits.val.subset(torch.arange(1000)), splits.test)
    arch = ARCHS[args.model]
    input_shape = [1, 28, 28]
    g = torch.Generator().manual_seed(seed)
    init = models.build(arch, generator=g)
    init_variance_scaling(init, torch.Generator().manual_seed(seed))
    cfg = TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3, batch_size=100)
    step_s = step_time(init, splits, torch.Generator().manual_seed(seed))

    dense = copy.deepcopy(init)
    t = time.perf_counter()
    train(dense, splits, cfg, generator=torch.Generator().manual_seed(seed))
    rows.append({"seed": seed, "method": "dense", "sparsity": 0.0,
                 "accuracy": evaluate(dense, splits.test)["accuracy"],
                 "train_s": time.perf_counter() - t, "collapsed": []})
    flush()
    for sparsity in args.sparsities:
        for method in args.methods:
            start = dense if method == "magnitude" else init
            model = copy.deepcopy(start)
            timings = []
            for _ in range(3):
                t = time.perf_counter()
                masks = score(method, model, sparsity, splits,
                              torch.Generator().manual_seed(seed + 1), input_shape)
                timings.append(time.perf_counter() - t)
            collapsed = collapsed_layers(masks)
            t = time.perf_counter()
            train(model, splits, cfg, generator=torch.Generator().manual_seed(seed),
                  masks=masks)
            kept = sum(int(m.sum()) for m in masks.values())
            total = sum(m.numel() for m in masks.values())
            rows.append({"seed": seed, "method": method, "sparsity": sparsity,
                         "accuracy": evaluate(model, splits.test)["accuracy"],
                         "kept": kept, "prunable": total, "collapsed": collapsed,
                         "score_s": statistics.median(timings), "step_s": step_s,
                         "train_s": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
            flush()


def summarize(rows: list[dict[str, Any]], steps: int) -> str:
    """Accuracy table and scoring time; `steps` = Adam steps of one dense run."""
    dense = [r["accuracy"] for r in rows if r["method"] == "dense"]
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    head = "| sparsity | " + " | ".join(methods) + " |"
    lines = [(f"dense: {100 * statistics.mean(dense):.2f} % "
             f"(min {100 * min(dense):.2f}, max {100 * max(dense):.2f}, {len(dense)} seeds)"), "",
             head, "|---" * (len(methods) + 1) + "|"]
    for s in sparsities:
        cells = []
        for m in methods:
            accs = [r["accuracy"] for r in rows if r["method"] == m and r["sparsity"] == s]
            collapsed = sum(1 for r in rows if r["method"] == m and r["sparsity"] == s
                            and r["collapsed"])
            if not accs:
                cells.append("-")
                continue
            cell = (f"{100 * statistics.mean(accs):.2f} "
                    f"({100 * min(accs):.2f}–{100 * max(accs):.2f})")
            if collapsed:
                cell += f" collapse {collapsed}/{len(accs)}"
            cells.append(cell)
        lines.append(f"| {100 * s:g} % | " + " | ".join(cells) + " |")
    step = statistics.median(r["train_s"] / steps for r in rows if r["method"] == "dense")
    lines += ["", f"one training step (dense run, median over seeds): {1000 * step:.2f} ms", "",
              "| method | scoring time s (median) | x one training step |", "|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            sc = statistics.median(r["score_s"] for r in rs)
            lines.append(f"| {m} | {sc:.4f} | {sc / step:.1f} |")
    return "\n".join(lines)


def _steps(args: dict[str, Any]) -> int:
    """Adam steps of one dense run: epochs x ceil(train images / 100)."""
    n = args["train_subset"] or 54_000  # the seed split keeps 54,000 training images
    return args["epochs"] * -(-n // 100)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/out/snip_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        saved = json.loads(out.read_text())
        print(summarize(saved["rows"], _steps(saved["args"])))
        return
    train_set, test_set = data.fashion_mnist(args.data_dir)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def flush(complete: bool = False) -> None:
        out.write_text(json.dumps({
            "args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "runtime_s": time.perf_counter() - started, "complete": complete, "rows": rows},
            indent=1))

    for seed in range(args.seeds):
        run_seed(seed, args, train_set, test_set, rows, flush)
    flush(complete=True)
    table = summarize(rows, _steps(vars(args)))
    print(table)
    print(f"runtime: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
