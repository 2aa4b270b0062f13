"""Cost of the PCN transform on Conv4 / Fashion-MNIST against one epoch and one forward pass.

Run from the repository root:

    .venv/bin/python -m benchmarks.pcn_transform_cost

Conv4 (conv 64,64,128,128, fc 256,256; fc1 reads 128*7*7 = 6272 dims) is trained for
`--pre-epochs` epochs (default 1) on the first `--train-subset` images of the seed-0 training
split (batch 60, Adam 1e-3); that epoch's wall time is (a). Then, each `--repeats` times:
(b) one plain eval-mode forward pass over the `--calib` calibration samples (the floor: the
statistics need at least this forward pass), (c) the PCN transform with the full float64 eigh
of every layer (`collect_input_stats(top_k=None)` + `pcn_transform`), (d) the same with
`top_k` = the largest kept dims and `solver="auto"` (Gram route for fc1, whose 5,000 samples are
fewer than its 6,272 dims; subspace iteration or eigh elsewhere, as core chooses).
Times are medians; (c) and (d) include statistics (one shared forward pass), eigensolver and
surgery.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from core import data, metrics, models, pca
from core.pcn_output import pcn_transform
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
CONV4 = {"name": "conv4", "channels": [64, 64, 128, 128], "fc": [256, 256]}
LAYERS = ["conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
DIMS = {"conv2": 32, "conv3": 32, "conv4": 64, "fc1": 128, "fc2": 64, "fc3": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-subset", type=int, default=10_000)
    p.add_argument("--pre-epochs", type=int, default=1,
                   help="epochs trained before the transform (0: freshly initialised net)")
    p.add_argument("--calib", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_transform_cost.json")
    return p.parse_args(argv)


def forward_pass(model: torch.nn.Module, dataset: data.ArrayDataset, batch: int = 256) -> None:
    model.eval()
    with torch.no_grad():
        for s in range(0, len(dataset), batch):
            model(dataset.x[s:s + batch].float())


def transform(model: torch.nn.Module, calib: data.ArrayDataset, top_k: int | None
              ) -> tuple[float, float, torch.nn.Module, dict[str, Any]]:
    start = time.perf_counter()
    stats = pca.collect_input_stats(model, LAYERS, calib, samples=len(calib), top_k=top_k,
                                    solver="auto")
    stats_s = time.perf_counter() - start
    new, report = pcn_transform(model, stats, {"per_layer": {n: {"dims": d}
                                                             for n, d in DIMS.items()}}, LAYERS)
    return stats_s, time.perf_counter() - start, new, report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = data.fashion_mnist(args.data_dir)
    splits = data.split(train_set, test_set, 0)
    splits = data.Splits(splits.train.subset(torch.arange(args.train_subset)),
                         splits.val.subset(torch.arange(1000)), splits.test)
    g = torch.Generator().manual_seed(0)
    model = models.build(CONV4, generator=g)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, batch_size=60)
    epoch_s = []
    for _ in range(max(1, args.pre_epochs)):
        # always time one real epoch; with --pre-epochs 0 the timed epoch runs on a copy
        target = model if args.pre_epochs else __import__("copy").deepcopy(model)
        hist = train(target, splits, cfg, generator=g)
        epoch_s.append(hist[-1]["wall_s"])
    a = epoch_s[-1]
    calib = splits.train.subset(torch.randperm(len(splits.train),
                                               generator=torch.Generator().manual_seed(1))
                                [:args.calib])
    b, c, c_stats, d, d_stats = [], [], [], [], []
    reports = {}
    top_k = max(DIMS.values())
    for _ in range(args.repeats):
        t = time.perf_counter()
        forward_pass(model, calib)
        b.append(time.perf_counter() - t)
        s, tot, new_full, reports["eigh"] = transform(model, calib, None)
        c_stats.append(s)
        c.append(tot)
        s, tot, new_fast, reports["fast"] = transform(model, calib, top_k)
        d_stats.append(s)
        d.append(tot)
    acc = {"dense": evaluate(model, splits.test)["accuracy"],
           "pcn_eigh": evaluate(new_full, splits.test)["accuracy"],
           "pcn_fast": evaluate(new_fast, splits.test)["accuracy"]}
    med = {k: statistics.median(v) for k, v in
           {"forward": b, "eigh": c, "eigh_stats": c_stats, "fast": d, "fast_stats": d_stats}.items()}
    rows = [("(a) one training epoch (10k, batch 60)", a),
            ("(b) plain forward pass, calibration samples", med["forward"]),
            ("(c) PCN transform, full float64 eigh", med["eigh"]),
            ("(c') of which statistics + eigh", med["eigh_stats"]),
            ("(d) PCN transform, fast path (top_k, auto)", med["fast"]),
            ("(d') of which statistics + eigensolver", med["fast_stats"])]
    lines = ["| step | seconds (median) | x epoch (a) | x forward (b) |", "|---|---|---|---|"]
    for name, v in rows:
        lines.append(f"| {name} | {v:.2f} | {v / a:.3f} | {v / med['forward']:.1f} |")
    table = "\n".join(lines)
    print(table)
    print("test accuracy:", acc)
    print("max |eigvals| diff fc1 report (first 10):",
          max(abs(x - y) for x, y in zip(reports["eigh"]["input"]["fc1"]["eigvals"],
                                         reports["fast"]["input"]["fc1"]["eigvals"])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "epoch_s": epoch_s, "forward_s": b, "eigh_s": c, "eigh_stats_s": c_stats, "fast_s": d,
        "fast_stats_s": d_stats, "test_accuracy": acc,
        "params": {"dense": metrics.param_counts(model),
                   "pcn": metrics.param_counts(new_fast)},
        "explained_variance": {k: {n: r["explained_variance"] for n, r in rep["input"].items()}
                               for k, rep in reports.items()},
        "table_md": table}, indent=1))


if __name__ == "__main__":
    main()
