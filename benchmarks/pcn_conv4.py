"""PCN on Conv4 / Fashion-MNIST versus dense and a narrower Conv4 trained from scratch.

Run from the repository root:

    .venv/bin/python -m benchmarks.pcn_conv4 --seeds 3

Per seed (seed s: data split s, init and shuffling generator s; batch 60, Adam 1e-3, the paper's
Conv4 setting):
* dense: Conv4 (conv 64,64,128,128, fc 256,256) trained `--epochs` epochs in one run; its state
  after K epochs (model and shuffling generator) is the starting point of every PCN run;
* PCN: that K-epoch model, PCN transform (core.pca.collect_input_stats on `--calib` calibration
  samples + core.pcn_output.pcn_transform, input-based, optionally output-based), then
  `--epochs - K` more epochs (a fresh Adam, as the product does);
* narrow: a Conv4 with every width scaled by one factor so that its trainable count is as close
  as possible to the PCN model's, trained from scratch `--epochs` epochs.
Test accuracy is measured on the full 10k test set only at the end of each run; accuracy right
after the transform is measured on the `--val` validation samples (a 10k test pass costs about
as much as a training epoch of 3k images here).
Torch-Pruning channel pruning is not run here (left for later).
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

from benchmarks.pcn_lenet300 import _pct, _stat  # one summary format for all PCN benchmarks
from core import data, metrics, models, pca
from core.pcn_output import pcn_transform
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
BASE_CH, BASE_FC = [64, 64, 128, 128], [256, 256]
CONV4 = {"name": "conv4", "channels": BASE_CH, "fc": BASE_FC}
ALL = ["conv2", "conv3", "conv4", "fc1", "fc2"]


def _per(d: dict[str, int]) -> dict[str, Any]:
    return {"per_layer": {n: {"dims": k} for n, k in d.items()}}


# name -> layers, select, output (core.pcn_output.pcn_transform arguments)
SETTINGS: dict[str, dict[str, Any]] = {
    # the quick run: every layer after conv1 but the output layer, 32/32/64 conv dims,
    # 64/64 dense dims (~11.6x fewer trainable)
    "all-32-32-64-64-64": {"layers": ALL, "select": _per(
        {"conv2": 32, "conv3": 32, "conv4": 64, "fc1": 64, "fc2": 64}), "output": None},
    # fc1 (83% of the weights) + the two next-widest layers (~8.7x)
    "c4-64-fc1-64-fc2-64": {"layers": ["conv4", "fc1", "fc2"], "select": _per(
        {"conv4": 64, "fc1": 64, "fc2": 64}), "output": None},
    # fc1 only: the paper's ablation says the gain comes from here (~5.6x)
    "fc1-64": {"layers": ["fc1"], "select": {"dims": 64}, "output": None},
    "fc1-32": {"layers": ["fc1"], "select": {"dims": 32}, "output": None},
    # fc1 + output-based pruning of conv4's channels (fc1's input is compressed ~98x >= 10x)
    "fc1-64-out": {"layers": ["fc1"], "select": {"dims": 64}, "output": "auto"},
    "fc1-32-fc2-64-out": {"layers": ["fc1", "fc2"], "select": _per({"fc1": 32, "fc2": 64}),
                          "output": "auto"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--transform-epochs", type=int, nargs="+", default=[1])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                   default=["all-32-32-64-64-64", "c4-64-fc1-64-fc2-64", "fc1-64"])
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib", type=int, default=2000, help="PCA calibration samples")
    p.add_argument("--train-subset", type=int, default=5000,
                   help="first N samples of the (seeded) training split; 0: all 54k")
    p.add_argument("--val", type=int, default=1000, help="validation samples used per epoch")
    p.add_argument("--no-narrow", action="store_true", help="skip the narrow-Conv4 baseline")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_conv4.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    return p.parse_args(argv)


def narrow_spec(scale: float) -> dict[str, Any]:
    return {"name": "conv4", "channels": [max(1, round(c * scale)) for c in BASE_CH],
            "fc": [max(1, round(f * scale)) for f in BASE_FC]}


def match_narrow(target: int) -> dict[str, Any]:
    """The uniformly scaled Conv4 whose trainable count is closest to `target`."""
    best = None
    for i in range(1, 1001):
        spec = narrow_spec(i / 1000)
        n = metrics.param_counts(models.build(spec))["trainable"]
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), spec)
        if n > target * 1.2:
            break
    return best[1]


def size_of(model: torch.nn.Module) -> dict[str, int]:
    return {**metrics.param_counts(model), "macs": metrics.count_macs(model, INPUT_SHAPE)}


def _config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adam", lr=args.lr, batch_size=args.batch_size)


def seed_splits(seed: int, args: argparse.Namespace, train_set, test_set) -> data.Splits:
    s = data.split(train_set, test_set, seed)
    tr = s.train.subset(torch.arange(args.train_subset)) if args.train_subset else s.train
    return data.Splits(tr, s.val.subset(torch.arange(min(args.val, len(s.val)))), s.test)


def run_seed(seed: int, args: argparse.Namespace, splits: data.Splits, rows: list, flush,
             narrow_cache: dict) -> None:
    g = torch.Generator().manual_seed(seed)
    dense = models.build(CONV4, generator=g)
    snaps: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}

    def on_epoch(rec: dict[str, Any]) -> None:
        if rec["epoch"] in args.transform_epochs:
            snaps[rec["epoch"]] = (copy.deepcopy(dense), g.get_state())

    hist = train(dense, splits, _config(args, args.epochs), generator=g, on_epoch=on_epoch)
    acc = evaluate(dense, splits.test)["accuracy"]
    epoch_s = statistics.median(r["wall_s"] for r in hist)
    print(f"seed {seed} dense: test {acc:.4f} epoch {epoch_s:.1f}s", flush=True)
    rows.append({"method": "dense", "setting": "conv4", "K": None, "seed": seed,
                 **size_of(dense), "test_accuracy": acc, "epoch_s": epoch_s, "history": hist})
    flush()
    calib_order = torch.randperm(len(splits.train),
                                 generator=torch.Generator().manual_seed(10_000 + seed))
    calib = splits.train.subset(calib_order[:args.calib])
    for K in args.transform_epochs:
        base, state = snaps[K]
        before = evaluate(base, splits.val)["accuracy"]
        for name in args.settings:
            st = SETTINGS[name]
            t = time.perf_counter()
            top_k = max(_max_dims(st["select"]), 1)
            stats = pca.collect_input_stats(base, st["layers"], calib, samples=args.calib,
                                            top_k=top_k)
            model, report = pcn_transform(base, stats, st["select"], st["layers"],
                                          output=st["output"])
            transform_s = time.perf_counter() - t
            after = evaluate(model, splits.val)["accuracy"]  # val: a 10k test pass is costly
            size = size_of(model)
            g_ft = torch.Generator()
            g_ft.set_state(state)
            h = train(model, splits, _config(args, args.epochs - K), generator=g_ft)
            final = evaluate(model, splits.test)["accuracy"]
            rows.append({"method": "pcn", "setting": name, "K": K, "seed": seed, **size,
                         "val_accuracy_before_transform": before,
                         "val_accuracy_after_transform": after, "test_accuracy": final,
                         "transform_s": transform_s, "epoch_s": hist[K - 1]["wall_s"],
                         "dims": {n: r["dims"] for n, r in report["input"].items()},
                         "output_keep": {n: r["keep"] for n, r in report["output"].items()},
                         "explained_variance": {n: r["explained_variance"]
                                                for n, r in report["input"].items()},
                         "history": h})
            msg = (f"seed {seed} K={K} {name}: pcn {size['trainable']}/{size['total']} "
                   f"after {after:.4f} final {final:.4f} transform {transform_s:.2f}s "
                   f"out {rows[-1]['output_keep']}")
            flush()
            if not args.no_narrow:
                spec = match_narrow(size["trainable"])
                key = (seed, tuple(spec["channels"]), tuple(spec["fc"]))
                if key not in narrow_cache:
                    g_n = torch.Generator().manual_seed(seed)
                    small = models.build(spec, generator=g_n)
                    hn = train(small, splits, _config(args, args.epochs), generator=g_n)
                    narrow_cache[key] = {**size_of(small), "spec": spec, "history": hn,
                                         "test_accuracy": evaluate(small, splits.test)["accuracy"]}
                rows.append({"method": "narrow", "setting": name, "K": K, "seed": seed,
                             **narrow_cache[key]})
                msg += (f" | narrow {spec['channels']}/{spec['fc']} "
                        f"{narrow_cache[key]['trainable']} final "
                        f"{narrow_cache[key]['test_accuracy']:.4f}")
                flush()
            print(msg, flush=True)


def _max_dims(select: dict[str, Any]) -> int:
    if "dims" in select:
        return int(select["dims"])
    return max(int(v["dims"]) for v in select["per_layer"].values())



def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["K"], r["method"]), []).append(r)
    dense_acc = statistics.fmean(r["test_accuracy"] for r in groups[("conv4", None, "dense")])
    out = []
    for (setting, K, method), rs in groups.items():
        s: dict[str, Any] = {"method": method, "setting": setting, "K": K, "n": len(rs)}
        for key in ("trainable", "total", "macs", "test_accuracy",
                    "val_accuracy_after_transform", "transform_s", "epoch_s"):
            if all(key in r and r[key] is not None for r in rs):
                s[key] = _stat([float(r[key]) for r in rs])
        s["delta_vs_dense_pt"] = 100 * (s["test_accuracy"]["mean"] - dense_acc)
        if method == "narrow":
            s["shape"] = sorted({"-".join(map(str, r["spec"]["channels"] + r["spec"]["fc"]))
                                 for r in rs})
        elif method == "pcn":
            s["shape"] = sorted({"-".join(f"{k}" for k in r["dims"].values())
                                 + ("" if not r["output_keep"] else
                                    " out " + ",".join(map(str, r["output_keep"].values())))
                                 for r in rs})
        else:
            s["shape"] = ["64-64-128-128-256-256"]
        out.append(s)
    return out



def markdown_table(summary: list[dict[str, Any]]) -> str:
    dense = next(s for s in summary if s["method"] == "dense")
    head = ("| method | setting | K | n | dims / widths | trainable | x fewer | total | MACs | "
            "val after transform % | final test % mean [min, max] | Δ vs dense pt | "
            "transform s (median) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        tr = s["trainable"]["mean"]
        lines.append(
            f"| {s['method']} | {s['setting']} | {s['K'] if s['K'] is not None else '–'} | "
            f"{s['n']} | {' / '.join(s['shape'])} | {tr:,.0f} | "
            f"{dense['trainable']['mean'] / tr:.1f} | {s['total']['mean']:,.0f} | "
            f"{s['macs']['mean']:,.0f} | {_pct(s.get('val_accuracy_after_transform'))} | "
            f"{_pct(s['test_accuracy'])} | {s['delta_vs_dense_pt']:+.2f} | "
            f"{s['transform_s']['median']:.2f}" if "transform_s" in s else
            f"| {s['method']} | {s['setting']} | {s['K'] if s['K'] is not None else '–'} | "
            f"{s['n']} | {' / '.join(s['shape'])} | {tr:,.0f} | "
            f"{dense['trainable']['mean'] / tr:.1f} | {s['total']['mean']:,.0f} | "
            f"{s['macs']['mean']:,.0f} | – | {_pct(s['test_accuracy'])} | "
            f"{s['delta_vs_dense_pt']:+.2f} | –")
        lines[-1] += " |"
    return "\n".join(lines)


def write_results(out: Path, args, rows, runtime: float, complete: bool) -> str:
    summary = summarize(rows)
    table = markdown_table(summary)
    meta = {"args": vars(args), "settings": {k: SETTINGS[k] for k in args.settings},
            "complete": complete, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "runtime_s": runtime}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows,
                               "table_md": table}, indent=1, default=str))
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if any(not 0 < k < args.epochs for k in args.transform_epochs):
        raise SystemExit("--transform-epochs must lie strictly between 0 and --epochs")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summarize_only:
        print(markdown_table(summarize(json.loads(out.read_text())["runs"])))
        return
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    rows: list[dict[str, Any]] = []
    narrow_cache: dict = {}

    def flush() -> None:
        write_results(out, args, rows, time.perf_counter() - started, complete=False)

    for seed in range(args.seeds):
        run_seed(seed, args, seed_splits(seed, args, train_set, test_set), rows, flush,
                 narrow_cache)
    runtime = time.perf_counter() - started
    table = write_results(out, args, rows, runtime, complete=True)
    print()
    print(table)
    print(f"\nruntime {runtime / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
