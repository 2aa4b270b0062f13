"""SNIP scoring + selection against one training step on LeNet-300-100 (issue 12, part 8).

Run from the repository root:

    .venv/bin/python -m benchmarks.selection                 # Fashion-MNIST when present
    .venv/bin/python -m benchmarks.selection --synthetic     # synthetic 28x28 data

Per thread count (2, then 1; `torch.set_num_threads`): the median of `--repeats` timings of
* `train_step`: one Adam step (forward, backward, update) on a batch of 100 training images;
* `snip_scores`: `core.prune.snip_scores` on one labelled batch of 100 (SNIP's default);
* `select`: `core.select.masks_from_scores` at sparsity 0.9, global scope (top-k + ties);
* `select_sort` (the previous selection, for reference): a stable descending sort of all
  266,200 scores, the first kappa marked;
and the ratio (snip_scores + select) / train_step — the cost of SNIP in training steps
(target <= 3). Both selections give the same masks (checked).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from core import data, models
from core.prune import snip_scores
from core.select import keep_count, masks_from_scores

FASHION = Path("/usr/share/datasets/fashion-mnist")
SPARSITY = 0.9
BATCH = 100


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sort_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The selection before core.select: a stable sort of every score."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().double() for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:keep_count(flat.numel(), sparsity)]] = True
    out, begin = {}, 0
    for n in names:
        out[n] = mask[begin:begin + scores[n].numel()].view(scores[n].shape)
        begin += scores[n].numel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic", action="store_true", help="synthetic data")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.synthetic or not FASHION.exists():
        source = "synthetic-blobs"
        train, _ = data.synthetic("synthetic-blobs", 0)
    else:
        source = "fashion-mnist"
        train, _ = data.fashion_mnist(FASHION)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=gen)[:BATCH]
    x, y = train.x[idx], train.y[idx]
    model = models.build({"name": "lenet300"}, generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    print(f"# benchmarks/selection.py — {platform.node()} ({platform.processor() or 'cpu'}), "
          f"{dt.date.today()}, torch {torch.__version__}, data {source}, LeNet-300-100, batch "
          f"{BATCH}, sparsity {SPARSITY}, median of {args.repeats}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'threads':>7} {'train_step ms':>13} {'snip_scores ms':>14} {'select ms':>9} "
          f"{'select_sort ms':>14} {'SNIP/step':>9} {'before':>7}")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        scores = snip_scores(model, [(x, y)])
        new, old = masks_from_scores(scores, SPARSITY), sort_masks(scores, SPARSITY)
        assert all(torch.equal(new[n], old[n]) for n in new), "selections differ"
        step = median_s(train_step, args.repeats)
        score = median_s(lambda: snip_scores(model, [(x, y)]), args.repeats)
        select = median_s(lambda s=scores: masks_from_scores(s, SPARSITY), args.repeats)
        select_sort = median_s(lambda s=scores: sort_masks(s, SPARSITY), args.repeats)
        print(f"{threads:>7} {step * 1e3:>13.2f} {score * 1e3:>14.2f} {select * 1e3:>9.2f} "
              f"{select_sort * 1e3:>14.2f} {(score + select) / step:>8.1f}x "
              f"{(score + select_sort) / step:>6.1f}x")


if __name__ == "__main__":
    main()
