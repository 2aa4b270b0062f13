"""PCN on LeNet-300-100 / Fashion-MNIST versus dense and two equal-size baselines.

Run from the repository root:

    .venv/bin/python -m benchmarks.pcn_lenet300 --seeds 3

Per seed (seed s: data split s, init and shuffling generator s; batch 128, Adam 1e-3):
* dense: LeNet-300-100 trained `--epochs` epochs in one run;
* PCN: the same run stopped after K epochs (bit-identical to the dense run's first K epochs),
  input-based PCN transform of the chosen layers (core.pca + core.pcn, `--calib` calibration
  samples from the training split), then `--epochs - K` more epochs (a fresh Adam, as the product
  does);
* unit pruning: the same K-epoch model, hidden units with the smallest incoming-weight L2 norm
  physically removed down to the PCN model's trainable parameter count, same fine-tuning epochs
  (same shuffling as PCN's);
* small dense MLP: an `mlp` of the same trainable count trained from scratch `--epochs` epochs.
Everything goes through core's public API; only the two baselines live in benchmarks/.
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

from benchmarks.baselines import match_mlp_widths, mlp_trainable, prune_units_by_magnitude
from benchmarks.common import dump_results, grouped_stats, run_meta
from core import data, metrics, models, pca, pcn
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
LAYERS = ["fc1", "fc2", "fc3"]
LENET = {"name": "lenet300"}

# name -> core.pcn.pcn_input_transform `select` and layer list. dims are chosen to land at
# ~6-11x fewer trainable parameters than dense (266,610); fc1's input is the raw 784-d image.
SETTINGS: dict[str, dict[str, Any]] = {
    "d128-64-32": {"layers": LAYERS, "select": {"per_layer": {
        "fc1": {"dims": 128}, "fc2": {"dims": 64}, "fc3": {"dims": 32}}}},
    "d96-64-32": {"layers": LAYERS, "select": {"per_layer": {
        "fc1": {"dims": 96}, "fc2": {"dims": 64}, "fc3": {"dims": 32}}}},
    "d64-48-32": {"layers": LAYERS, "select": {"per_layer": {
        "fc1": {"dims": 64}, "fc2": {"dims": 48}, "fc3": {"dims": 32}}}},
    "t0.1": {"layers": LAYERS, "select": {"threshold": 0.1}},  # seed 000's MNIST threshold
    "fc1-d64": {"layers": ["fc1"], "select": {"dims": 64}},  # only the widest layer
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=10, help="total training epochs per method")
    p.add_argument("--transform-epochs", type=int, nargs="+", default=[1, 2],
                   help="K: epochs before the PCN transform / pruning")
    p.add_argument("--dims", nargs="+", choices=list(SETTINGS),
                   default=["d128-64-32", "d96-64-32", "d64-48-32", "t0.1"],
                   help="PCN settings to run (see SETTINGS)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib", type=int, default=5000, help="PCA calibration samples")
    p.add_argument("--train-subset", type=int, default=None,
                   help="use only the first N samples of the training split (quick runs)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_lenet300.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: robust on a shared 2-core machine)")
    p.add_argument("--summarize-only", action="store_true",
                   help="print the table from an existing --out file (e.g. a partial run)")
    return p.parse_args(argv)


def history_summary(model: torch.nn.Module, splits: data.Splits, config: TrainConfig,
                    generator: torch.Generator) -> dict[str, Any]:
    """Train; return final test accuracy, test accuracy at the best-val epoch, per-epoch records."""
    tests: list[float] = []

    def on_epoch(_record: dict[str, Any]) -> None:
        tests.append(evaluate(model, splits.test)["accuracy"])

    history = train(model, splits, config, generator=generator, on_epoch=on_epoch)
    for record, acc in zip(history, tests, strict=True):
        record["test_accuracy"] = acc
    best = max(history, key=lambda r: r["val_accuracy"]) if history else None
    return {
        "test_accuracy": tests[-1] if tests else evaluate(model, splits.test)["accuracy"],
        "best_val_epoch": best["epoch"] if best else None,
        "test_accuracy_at_best_val": best["test_accuracy"] if best else None,
        "history": history,
    }


def size_of(model: torch.nn.Module) -> dict[str, int]:
    return {**metrics.param_counts(model), "macs": metrics.count_macs(model, INPUT_SHAPE)}


def _config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adam", lr=args.lr, batch_size=args.batch_size)


def seed_splits(seed: int, args: argparse.Namespace, train_set: data.ArrayDataset,
                test_set: data.ArrayDataset) -> data.Splits:
    splits = data.split(train_set, test_set, seed)
    if args.train_subset:
        splits = data.Splits(splits.train.subset(torch.arange(args.train_subset)), splits.val,
                             splits.test)
    return splits


def run_dense(seed: int, args: argparse.Namespace, splits: data.Splits) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    dense = models.build(LENET, generator=g)
    result = history_summary(dense, splits, _config(args, args.epochs), g)
    epoch_s = statistics.median(r["wall_s"] for r in result["history"])
    print(f"seed {seed} dense: test {result['test_accuracy']:.4f}, epoch {epoch_s:.2f}s",
          flush=True)
    return {"method": "dense", "setting": "lenet300", "K": None, "seed": seed,
            **size_of(dense), "dense_epoch_s": epoch_s, **result}


def run_transforms(seed: int, K: int, args: argparse.Namespace, splits: data.Splits,
                   small_cache: dict[tuple[int, ...], dict[str, Any]]):
    """Yield the PCN / unit-prune / small-MLP rows of every setting for one (seed, K)."""
    g = torch.Generator().manual_seed(seed)
    base = models.build(LENET, generator=g)
    pre = train(base, splits, _config(args, K), generator=g)  # == the dense run's first K epochs
    pre_state = g.get_state()
    epoch_s = pre[-1]["wall_s"]  # the epoch right before the transform: same machine load
    base_test = evaluate(base, splits.test)["accuracy"]
    calib_order = torch.randperm(len(splits.train),
                                 generator=torch.Generator().manual_seed(10_000 + seed))
    for name in args.dims:
        setting = SETTINGS[name]
        # --- PCN: calibration subset + stats (one forward pass) + eigh + surgery, timed together
        start = time.perf_counter()
        calib = splits.train.subset(calib_order[:args.calib])
        stats = pca.collect_input_stats(base, setting["layers"], calib, samples=args.calib)
        pcn_model, report = pcn.pcn_input_transform(base, stats, setting["select"],
                                                    setting["layers"])
        transform_s = time.perf_counter() - start
        after = evaluate(pcn_model, splits.test)["accuracy"]
        size = size_of(pcn_model)
        g_ft = torch.Generator()
        g_ft.set_state(pre_state)
        result = history_summary(pcn_model, splits, _config(args, args.epochs - K), g_ft)
        yield {"method": "pcn", "setting": name, "K": K, "seed": seed, **size,
               "test_accuracy_before_transform": base_test,
               "test_accuracy_after_transform": after,
               "transform_s": transform_s, "dense_epoch_s": epoch_s,
               "transform_epoch_fraction": transform_s / epoch_s,
               "dims": {n: r["dims"] for n, r in report.items()},
               "explained_variance": {n: r["explained_variance"] for n, r in report.items()},
               "pre_history": pre, **result}

        # --- baselines at the PCN model's trainable count
        widths = match_mlp_widths(size["trainable"])
        pruned = prune_units_by_magnitude(base, widths)
        p_size = size_of(pruned)
        assert mlp_trainable(widths, 784, 10) == p_size["trainable"]
        p_after = evaluate(pruned, splits.test)["accuracy"]
        g_ft = torch.Generator()
        g_ft.set_state(pre_state)
        p_result = history_summary(pruned, splits, _config(args, args.epochs - K), g_ft)
        yield {"method": "unit-prune", "setting": name, "K": K, "seed": seed,
               "widths": widths, **p_size, "test_accuracy_before_transform": base_test,
               "test_accuracy_after_transform": p_after, **p_result}

        key = (seed, *widths)
        if key not in small_cache:
            g_s = torch.Generator().manual_seed(seed)
            small = models.build({"name": "mlp", "widths": widths}, generator=g_s)
            small_cache[key] = {**size_of(small),
                                **history_summary(small, splits, _config(args, args.epochs), g_s)}
        yield {"method": "small-mlp", "setting": name, "K": K, "seed": seed, "widths": widths,
               **small_cache[key]}
        print(f"seed {seed} K={K} {name}: pcn {size['trainable']} params "
              f"after {after:.4f} final {result['test_accuracy']:.4f} "
              f"transform {transform_s:.3f}s / epoch {epoch_s:.2f}s | prune {widths} "
              f"{p_size['trainable']} final {p_result['test_accuracy']:.4f} | small "
              f"{small_cache[key]['test_accuracy']:.4f}", flush=True)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s, rs in grouped_stats(rows, ("method", "setting", "K"), (
            "trainable", "total", "macs", "test_accuracy", "test_accuracy_at_best_val",
            "test_accuracy_after_transform", "transform_s", "transform_epoch_fraction",
            "dense_epoch_s")):
        if "widths" in rs[0]:
            s["widths"] = sorted({tuple(r["widths"]) for r in rs})
        if "dims" in rs[0]:
            s["dims"] = sorted({tuple(r["dims"].values()) for r in rs})
        out.append(s)
    return out


def _pct(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "–"
    return f"{100 * stat['mean']:.2f} [{100 * stat['min']:.2f}, {100 * stat['max']:.2f}]"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    dense = next(s for s in summary if s["method"] == "dense")
    head = ("| method | setting | K | shape | trainable | x fewer | total | MACs | "
            "test after transform % | final test % mean [min, max] | Δ vs dense pt | "
            "test @ best val % | transform s, median (x epoch; max) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        shape = ("300-100" if s["method"] == "dense" else
                 "/".join("-".join(map(str, d)) for d in s.get("dims", s.get("widths", []))))
        tr = s["trainable"]["mean"]
        transform = (f"{s['transform_s']['median']:.2f} "
                     f"({s['transform_epoch_fraction']['median']:.2f}"
                     f", max {s['transform_epoch_fraction']['max']:.2f})"
                     if "transform_s" in s else "–")
        lines.append(
            f"| {s['method']} | {s['setting']} | {s['K'] if s['K'] is not None else '–'} | "
            f"{shape} | {tr:,.0f} | {dense['trainable']['mean'] / tr:.1f} | "
            f"{s['total']['mean']:,.0f} | {s['macs']['mean']:,.0f} | "
            f"{_pct(s.get('test_accuracy_after_transform'))} | {_pct(s['test_accuracy'])} | "
            f"{s['delta_vs_dense_pt']:+.2f} | {_pct(s.get('test_accuracy_at_best_val'))} | "
            f"{transform} |")
    return "\n".join(lines)


def write_results(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]],
                  runtime: float, complete: bool) -> str:
    summary = summarize(rows)
    meta = run_meta(args, complete=complete, runtime=runtime,
                    settings=copy.deepcopy({k: SETTINGS[k] for k in args.dims}))
    return dump_results(out, meta, summary, rows, markdown_table(summary))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if any(not 0 < k < args.epochs for k in args.transform_epochs):
        raise SystemExit("--transform-epochs must lie strictly between 0 and --epochs")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summarize_only:
        rows = json.loads(out.read_text())["runs"]
        print(markdown_table(summarize(rows)))
        return
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    splits = {s: seed_splits(s, args, train_set, test_set) for s in range(args.seeds)}
    rows: list[dict[str, Any]] = []
    # order: every seed's dense run, then K by K, so a run cut short still has whole seeds sets
    for seed in range(args.seeds):
        rows.append(run_dense(seed, args, splits[seed]))
        write_results(out, args, rows, time.perf_counter() - started, complete=False)
    small_cache: dict[tuple[int, ...], dict[str, Any]] = {}
    for K in args.transform_epochs:
        for seed in range(args.seeds):
            for row in run_transforms(seed, K, args, splits[seed], small_cache):
                rows.append(row)
            write_results(out, args, rows, time.perf_counter() - started, complete=False)
    runtime = time.perf_counter() - started
    table = write_results(out, args, rows, runtime, complete=True)
    print()
    print(table)
    print(f"\nruntime {runtime / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
