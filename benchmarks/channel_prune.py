"""Structured channel pruning: `core.channel_prune` (l1, taylor) next to Torch-Pruning
(MagnitudePruner with L1 magnitude / Taylor importance) at equal MACs on Fashion-MNIST.

Run from the repository root (Torch-Pruning is the optional `bench` extra:
`.venv/bin/pip install -e '.[bench]'`, i.e. torch-pruning==1.6.1):

    .venv/bin/python -m benchmarks.channel_prune --models lenet300 conv4 resnet20 \
        --train-subset 6000 --epochs 3 --ft-epochs 1 --mac-ratios 0.5 0.25 --threads 2

Per model (seed 0: data split, init and shuffling): dense training for `--epochs` epochs (Adam
1e-3, batch 60) on the first `--train-subset` training images; then for every MAC ratio r:
* cp-l1 / cp-taylor: `core.channel_prune.channel_prune` with `{"mac_ratio": r}`, scope global,
  round_to 1 (taylor: the first `--calib` training images as calibration data);
* tp-l1 / tp-taylor: `tp.pruner.MagnitudePruner`, global pruning, importance
  `MagnitudeImportance(p=1)` / `TaylorImportance()` (gradients of the same calibration images),
  the output layer ignored; its pruning ratio is bisected so that the MACs are as close as
  possible to cp-l1's (equal MACs: both are counted with `core.metrics.count_macs`);
then `--ft-epochs` epochs of fine-tuning (same optimiser, a fresh Adam, the same shuffling seed
for every method), once per `--ft-seeds` shuffling seed (default 1; the fine-tuned accuracy is
their mean, every seed's in `acc_seeds`: one short fine-tuning swings by several points).
Accuracy on the first `--test-subset` test images, right after pruning and after fine-tuning.
Latency: median of `--repeats` forwards at batch 256 and `--repeats-b1` forwards at batch 1 with
`--threads` threads, every model of one architecture timed in turns (dense, cp-l1, ..., dense,
...) after 3 warm-up turns.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import dump_results, round_robin_ms, run_meta
from core import data, metrics, models
from core.channel_prune import ChannelPruneConfig, channel_prune, prunable_groups
from core.pcn_graph import group_units
from core.train import TrainConfig, evaluate, train

ARCHS = {"lenet300": {"name": "lenet300"}, "conv4": {"name": "conv4"},
         "resnet20": {"name": "resnet", "depth": 20}}
SHAPE = [1, 28, 28]
METHODS = ("cp-l1", "cp-taylor", "tp-l1", "tp-taylor")
TP_HINT = ("Torch-Pruning is the optional 'bench' extra: .venv/bin/pip install -e '.[bench]' "
           "(torch-pruning==1.6.1)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(ARCHS), default=["lenet300", "conv4"])
    p.add_argument("--mac-ratios", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-seeds", type=int, nargs="+", default=[1],
                   help="fine-tuning shuffling seeds (the accuracy is their mean)")
    p.add_argument("--train-subset", type=int, default=6000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--calib", type=int, default=512, help="taylor calibration images")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards at batch 256")
    p.add_argument("--repeats-b1", type=int, default=200, help="timed forwards at batch 1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/channel_prune.json")
    return p.parse_args(argv)


def _tp():
    try:
        import torch_pruning
    except ImportError as exc:
        raise SystemExit(f"torch_pruning is not installed: {TP_HINT}") from exc
    return torch_pruning


def _last_layer(model: torch.nn.Module) -> torch.nn.Module:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def with_taylor_grads(model: torch.nn.Module, calib: data.ArrayDataset) -> torch.nn.Module:
    """A copy whose parameters hold the summed gradients of the mean loss of every calibration
    batch of 64 (what Torch-Pruning's TaylorImportance reads)."""
    net = copy.deepcopy(model).eval()
    net.zero_grad()
    for begin in range(0, len(calib), 64):
        F.cross_entropy(net(calib.x[begin:begin + 64]), calib.y[begin:begin + 64]).backward()
    return net


def tp_prune(model: torch.nn.Module, ratio: float, importance: str) -> torch.nn.Module:
    """A pruned deep copy of `model` (Torch-Pruning, global pruning at `ratio`)."""
    tp = _tp()
    net = copy.deepcopy(model)
    for new, old in zip(net.parameters(), model.parameters(), strict=True):
        new.grad = None if old.grad is None else old.grad.clone()  # deepcopy drops them
    imp = tp.importance.MagnitudeImportance(p=1) if importance == "l1" else \
        tp.importance.TaylorImportance()
    pruner = tp.pruner.MagnitudePruner(net, torch.zeros(1, *SHAPE), importance=imp,
                                       global_pruning=True, pruning_ratio=ratio,
                                       ignored_layers=[_last_layer(net)])
    pruner.step()
    for p in net.parameters():
        p.grad = None
    return net


def tp_prune_to_macs(model: torch.nn.Module, macs: int, importance: str, steps: int = 14
                     ) -> tuple[torch.nn.Module, float]:
    """Bisect the global pruning ratio for the MACs closest to `macs`."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        net = tp_prune(model, mid, importance)
        got = metrics.count_macs(net, SHAPE)
        if best is None or abs(got - macs) < best[0]:
            best = (abs(got - macs), mid, net)
        if got == macs:
            break
        lo, hi = (mid, hi) if got > macs else (lo, mid)
    assert best is not None
    return best[2], best[1]


def fine_tuned_accuracy(net: torch.nn.Module, splits: data.Splits, ft: TrainConfig, seed: int
                        ) -> float:
    """Test accuracy of a copy of `net` after fine-tuning with shuffling seed `seed`."""
    net = copy.deepcopy(net)
    train(net, splits, ft, generator=torch.Generator().manual_seed(seed))
    return evaluate(net.eval(), splits.test)["accuracy"]


def widths(model: torch.nn.Module) -> list[int]:
    """Output widths of every Linear/Conv2d but the last, in registration order."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return [m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
            for m in layers[:-1]]


def run_model(name: str, args: argparse.Namespace, splits: data.Splits) -> list[dict[str, Any]]:
    cfg = TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3, batch_size=60)
    ft = TrainConfig(epochs=args.ft_epochs, optimizer="adam", lr=1e-3, batch_size=60)
    dense = models.build(ARCHS[name], generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    train(dense, splits, cfg, generator=torch.Generator().manual_seed(0))
    dense.eval()
    rows = [{"model": name, "method": "dense", "mac_ratio": 1.0, "widths": widths(dense),
             "params": metrics.param_counts(dense)["total"],
             "macs": metrics.count_macs(dense, SHAPE), "acc_pruned": None,
             "acc": evaluate(dense, splits.test)["accuracy"], "train_s": time.perf_counter() - t}]
    print(rows[-1], flush=True)
    nets = [dense]
    calib = splits.train.subset(torch.arange(min(args.calib, len(splits.train))))
    taylor_base = with_taylor_grads(dense, calib)
    for ratio in args.mac_ratios:
        target_macs = None
        for method in METHODS:
            t = time.perf_counter()
            extra: dict[str, Any] = {}
            if method.startswith("cp-"):
                config = ChannelPruneConfig(target={"mac_ratio": ratio},
                                            criterion=method[3:], samples=args.calib)
                net, report = channel_prune(dense, config, data=calib)
                extra["kept"] = {g: r["kept"] for g, r in report["groups"].items()}
            else:
                base = dense if method == "tp-l1" else taylor_base
                net, tp_ratio = tp_prune_to_macs(base, target_macs, method[3:])
                extra["tp_ratio"] = tp_ratio
                extra["kept"] = {g: group_units(net, group)  # Torch-Pruning keeps the names
                                 for g, group in prunable_groups(dense).items()}
            prune_s = time.perf_counter() - t
            macs = metrics.count_macs(net, SHAPE)
            target_macs = target_macs or macs  # cp-l1's MACs: the others match them
            row = {"model": name, "method": method, "mac_ratio": ratio, "widths": widths(net),
                   "params": metrics.param_counts(net)["total"], "macs": macs,
                   "prune_s": prune_s, "acc_pruned": evaluate(net, splits.test)["accuracy"],
                   **extra}
            row["acc_seeds"] = [fine_tuned_accuracy(net, splits, ft, seed)
                                for seed in args.ft_seeds]
            row["acc"] = sum(row["acc_seeds"]) / len(row["acc_seeds"])
            rows.append(row)
            nets.append(net)
            print({k: v for k, v in row.items() if k != "kept"}, flush=True)
    for key, batch, repeats in (("latency_b1_ms", 1, args.repeats_b1),
                                ("latency_b256_ms", 256, args.repeats)):
        x = splits.test.x[:batch]
        for row, ms in zip(rows, round_robin_ms(nets, x, repeats), strict=True):
            row[key] = ms
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | MAC target | widths | params | MACs | pruned acc % | "
             "fine-tuned acc % | latency b1 ms | latency b256 ms | speed-up b256 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        pruned = "–" if r["acc_pruned"] is None else f"{100 * r['acc_pruned']:.1f}"
        seeds = r.get("acc_seeds", [])
        tuned = f"{100 * r['acc']:.1f}" + (
            f" ({' / '.join(f'{100 * a:.1f}' for a in seeds)})" if len(seeds) > 1 else "")
        shape = "-".join(map(str, r["widths"])) if len(r["widths"]) <= 8 else \
            f"{len(r['widths'])} layers, sum {sum(r['widths'])}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['mac_ratio']:g} | {shape} | {r['params']:,} | "
            f"{r['macs']:,} ({r['macs'] / d['macs']:.3f}) | {pruned} | {tuned} | "
            f"{r['latency_b1_ms']:.3f} | {r['latency_b256_ms']:.1f} | "
            f"{d['latency_b256_ms'] / r['latency_b256_ms']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _tp()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    s = data.split(train_set, test_set, 0)
    splits = data.Splits(s.train.subset(torch.arange(min(args.train_subset, len(s.train)))),
                         s.val.subset(torch.arange(1000)),
                         s.test.subset(torch.arange(min(args.test_subset, len(s.test)))))
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += run_model(name, args, splits)
        print(table(rows), flush=True)
    text = table(rows)
    dump_results(Path(args.out), run_meta(args, complete=True,
                                          runtime=time.perf_counter() - started),
                 None, rows, text)
    print(text)
    print(f"runtime {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
