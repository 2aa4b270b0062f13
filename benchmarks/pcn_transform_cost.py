"""Cost of the PCN transform on Conv4 / Fashion-MNIST against one epoch and one forward pass.

Run from the repository root (about 13 minutes on 2 cores):

    .venv/bin/python -m benchmarks.pcn_transform_cost

Conv4 (conv 64,64,128,128, fc 256,256; fc1 reads 128*7*7 = 6272 dims) is trained one epoch on
the whole seed-0 training split (54k images, batch 60, Adam 1e-3): that epoch's wall time is
the "full epoch". One more epoch on the first `--small-epoch` (10k) images is the "10k epoch"
(the issue's yardstick). Then, per calibration size in `--calib` (a seeded random subset of the
training split), each configuration is timed `--repeats` times (median):

* floor: one plain eval-mode forward pass over the calibration samples (the statistics need at
  least this);
* exact: `collect_input_stats(top_k=None)` — a full float64 eigh of every layer's covariance
  (6272 x 6272 for fc1) — then `pcn_transform`;
* gram-all: every component, through the N x N Gram matrix where a layer sees fewer samples
  than dims (the product's default before the kept-only solver);
* kept-dims: the product's default — only the components the selectors need
  (`keep`, `core.eig.leading_eigh`), dims selectors as below;
* kept-threshold: the same, but dense layers select by the paper's absolute eigenvalue
  threshold 0.1, whose k is unknown until computed (k doubles from 32); conv layers by dims;
* kept-dims + max_rows: conv layers on a random 100k of their N*h*w positions.

Each transform's time is split into the forward pass with accumulation (`pass`) and the
eigensolvers (`solve`), plus surgery. Test accuracy right after the transform is measured on
the first `--test` test images for each configuration (same model, so differences come only
from the statistics).
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

CONV4 = {"name": "conv4", "channels": [64, 64, 128, 128], "fc": [256, 256]}
LAYERS = ["conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
DIMS = {"conv2": 32, "conv3": 32, "conv4": 64, "fc1": 128, "fc2": 64, "fc3": 64}
# the paper's absolute threshold for dense layers; conv layers keep their dims (their
# activations live on another scale, and their solves are cheap either way)
THRESHOLDS = {"fc1": 0.1, "fc2": 0.1, "fc3": 0.1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small-epoch", type=int, default=10_000)
    p.add_argument("--full-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="pre-train (and time) one epoch on the whole training split")
    p.add_argument("--calib", type=int, nargs="+", default=[5000, 2000, 1000])
    p.add_argument("--configs", nargs="+", default=None,
                   help="subset of: exact gram-all kept-dims kept-threshold kept-dims-rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_transform_cost.json")
    return p.parse_args(argv)


def forward_pass(model: torch.nn.Module, dataset: data.ArrayDataset, batch: int = 256) -> None:
    model.eval()
    with torch.no_grad():
        for s in range(0, len(dataset), batch):
            model(dataset.x[s:s + batch])


def per_layer(selectors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"per_layer": selectors}


DIMS_SELECT = per_layer({n: {"dims": d} for n, d in DIMS.items()})
THRESHOLD_SELECT = per_layer({n: {"dims": d} for n, d in DIMS.items()}
                             | {n: {"threshold": t} for n, t in THRESHOLDS.items()})

# name -> (collect_input_stats kwargs, select); calib size filled in later
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "exact": ({"top_k": None, "solver": "eigh"}, DIMS_SELECT),
    "gram-all": ({"top_k": 6272, "solver": "auto"}, DIMS_SELECT),
    "kept-dims": ({"keep": {n: [{"dims": d}] for n, d in DIMS.items()}}, DIMS_SELECT),
    "kept-threshold": ({"keep": {n: [sel] for n, sel in
                                 THRESHOLD_SELECT["per_layer"].items()}}, THRESHOLD_SELECT),
    "kept-dims-rows": ({"keep": {n: [{"dims": d}] for n, d in DIMS.items()},
                        "max_rows": 100_000}, DIMS_SELECT),
}


def run_config(model: torch.nn.Module, calib: data.ArrayDataset, kwargs: dict[str, Any],
               select: dict[str, Any]) -> dict[str, Any]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    stats = pca.collect_input_stats(model, LAYERS, calib, samples=len(calib), timings=timings,
                                    generator=torch.Generator().manual_seed(0), **kwargs)
    stats_s = time.perf_counter() - start
    new, report = pcn_transform(model, stats, select, LAYERS)
    total = time.perf_counter() - start
    return {"total_s": total, "stats_s": stats_s, "pass_s": timings["pass_s"],
            "solve_s": timings["solve_s"], "surgery_s": total - stats_s, "model": new,
            "dims": {n: r["dims"] for n, r in report["input"].items()},
            "eigvals_computed": {n: int(st.eigvals.numel()) for n, st in stats.items()}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = data.fashion_mnist(args.data_dir)
    splits = data.split(train_set, test_set, 0)
    val = splits.val.subset(torch.arange(1000))
    test = splits.test.subset(torch.arange(args.test))
    g = torch.Generator().manual_seed(0)
    model = models.build(CONV4, generator=g)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, batch_size=60)
    full_epoch_s = None
    if args.full_epoch:
        full_epoch_s = train(model, data.Splits(splits.train, val, splits.test), cfg,
                             generator=g)[-1]["wall_s"]
        print(f"full epoch ({len(splits.train)} images): {full_epoch_s:.1f} s", flush=True)
    small = data.Splits(splits.train.subset(torch.arange(args.small_epoch)), val, splits.test)
    small_epoch_s = train(model, small, cfg, generator=g)[-1]["wall_s"]
    print(f"10k epoch: {small_epoch_s:.1f} s", flush=True)
    dense_acc = evaluate(model, test)["accuracy"]
    configs = args.configs or list(CONFIGS)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(1))
    rows: list[dict[str, Any]] = []
    for n_calib in args.calib:
        calib = splits.train.subset(order[:n_calib])
        floor = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            forward_pass(model, calib)
            floor.append(time.perf_counter() - t)
        rows.append({"calib": n_calib, "config": "floor (forward pass)",
                     "total_s": statistics.median(floor)})
        for name in configs:
            kwargs, select = CONFIGS[name]
            runs = [run_config(model, calib, kwargs, select) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("total_s", "stats_s", "pass_s", "solve_s", "surgery_s")}
            new = runs[-1]["model"]
            row = {"calib": n_calib, "config": name, **med,
                   "test_accuracy": evaluate(new, test)["accuracy"],
                   "params": metrics.param_counts(new), "dims": runs[-1]["dims"],
                   "eigvals_computed": runs[-1]["eigvals_computed"]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "params"}), flush=True)
    header = ("| calib | configuration | total s | pass s | solve s | surgery s | x full epoch "
              "| x 10k epoch | x floor | test acc after |")
    lines = [header, "|---" * 10 + "|"]
    floors = {r["calib"]: r["total_s"] for r in rows if r["config"].startswith("floor")}
    for r in rows:
        is_floor = r["config"].startswith("floor")
        full = f"{r['total_s'] / full_epoch_s:.3f}" if full_epoch_s else "-"
        lines.append(
            f"| {r['calib']} | {r['config']} | {r['total_s']:.2f} | "
            + ("- | - | - | " if is_floor else
               f"{r['pass_s']:.2f} | {r['solve_s']:.2f} | {r['surgery_s']:.2f} | ")
            + f"{full} | {r['total_s'] / small_epoch_s:.3f} | "
            + f"{r['total_s'] / floors[r['calib']]:.2f} | "
            + ("-" if is_floor else f"{100 * r['test_accuracy']:.2f}") + " |")
    table = "\n".join(lines)
    print(table)
    print(f"dense test accuracy (first {args.test}): {100 * dense_acc:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "full_epoch_s": full_epoch_s, "small_epoch_s": small_epoch_s,
        "dense_test_accuracy": dense_acc, "rows": rows, "table_md": table}, indent=1))


if __name__ == "__main__":
    main()
