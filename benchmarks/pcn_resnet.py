"""PCN on a wide ResNet-20 (width x4) / Fashion-MNIST: dense versus the paper's PCN0, PCN1 and
PCN2 configurations (seed 000 Table 2, App. E) and a narrower ResNet-20 trained from scratch.

Run from the repository root (the figures in BENCHMARKS.md):

    .venv/bin/python -m benchmarks.pcn_resnet --seeds 1 --epochs 4 --transform-epoch 1 \
        --train-subset 2000 --batch-size 32 --val 500 --test-subset 5000 --calib 1000 \
        --threads 2 --out benchmarks/out/pcn_resnet.json

Model: `{"name": "resnet", "depth": 20, "width": 4}` (filters 64/128/256 per stage instead of
ResNet-20's 16/32/64; projection shortcut in the first block of every stage; kaiming init).
Per seed (seed s: data split s, init and shuffling generator s; Adam, batch 32, no
augmentation — the paper trains 182 epochs of SGD 0.1 with augmentation on CIFAR-10; a few CPU
epochs cannot follow that schedule):
* dense: trained `--epochs` epochs; its state after K = `--transform-epoch` epochs (model and
  shuffling generator) is the start of every PCN run;
* PCN (input-based, fixed dims = the input width of the same layer in a plain ResNet-20):
  * pcn0: every conv of stages 2 and 3 except stage2.0.conv1 and stage2.0.shortcut_conv (which
    read stage 1's output): dims 32 in stage 2 and for stage3.0.conv1/shortcut_conv, 64 for the
    rest of stage 3;
  * pcn1: every conv of every residual block (not the stem conv1): dims 16 in stage 1 and for
    stage2.0.conv1/shortcut_conv, 32 for the rest of stage 2 and stage3.0.conv1/shortcut_conv,
    64 for the rest of stage 3;
  * pcn2: pcn1 plus the dense layer fc (dims 64) and the output-based transform of every conv
    of stage 3 keeping 64 of 256 filters (the stage-3 residual stream, pruned together, and
    each block's inner conv1);
  then PCA on `--calib` training samples (core.pca.collect_input_stats, one forward pass) +
  core.pcn_output.pcn_transform, and `--epochs - K` more epochs with a fresh optimizer;
* narrow: a ResNet-20 whose width is chosen (in steps of 1/16) so that its trainable count is
  closest to pcn1's, trained from scratch `--epochs` epochs.
Test accuracy on the first `--test-subset` test images (0: all 10k) at the end of each run;
accuracy right after the transform on the `--val` validation images.
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

from benchmarks.common import dump_results, grouped_stats, run_meta
from benchmarks.pcn_lenet300 import _pct
from core import data, metrics, models, pca
from core.pcn_output import pcn_transform
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
BLOCKS = 3  # ResNet-20: 3 blocks per stage


def _stage_dims(s: int, first_in: int, rest: int) -> dict[str, int]:
    """dims for every conv of stage s: block 0's conv1 + shortcut read the previous stage."""
    d = {f"stage{s}.0.conv1": first_in, f"stage{s}.0.shortcut_conv": first_in,
         f"stage{s}.0.conv2": rest}
    for b in range(1, BLOCKS):
        d[f"stage{s}.{b}.conv1"] = rest
        d[f"stage{s}.{b}.conv2"] = rest
    return d


def _config(dims: dict[str, int], output: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"layers": list(dims), "select": {"per_layer": {n: {"dims": k}
                                                           for n, k in dims.items()}},
            "output": output}


_PCN0 = {k: v for k, v in {**_stage_dims(2, 16, 32), **_stage_dims(3, 32, 64)}.items()
         if k not in ("stage2.0.conv1", "stage2.0.shortcut_conv")}
_PCN1 = {**_stage_dims(1, 16, 16), **_stage_dims(2, 16, 32), **_stage_dims(3, 32, 64)}
_STAGE3_OUT = {"stage3": {"keep": 64}, **{f"stage3.{b}.conv1": {"keep": 64}
                                          for b in range(BLOCKS)}}
CONFIGS: dict[str, dict[str, Any]] = {
    "pcn0": _config(_PCN0),
    "pcn1": _config(_PCN1),
    "pcn2": _config({**_PCN1, "fc": 64}, _STAGE3_OUT),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    p.add_argument("--width", type=float, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--transform-epoch", type=int, default=1)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32,
                   help="128 gives too few steps on 2k images: BatchNorm running stats lag")
    p.add_argument("--calib", type=int, default=1000, help="PCA calibration samples")
    p.add_argument("--train-subset", type=int, default=2000,
                   help="first N samples of the (seeded) training split; 0: all 54k")
    p.add_argument("--val", type=int, default=500, help="validation samples used per epoch")
    p.add_argument("--test-subset", type=int, default=5000, help="first N test images; 0: all 10k")
    p.add_argument("--no-narrow", action="store_true", help="skip the narrow ResNet-20")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_resnet.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    return p.parse_args(argv)


def spec(width: float) -> dict[str, Any]:
    return {"name": "resnet", "depth": 20, "width": width}


def size_of(model: torch.nn.Module) -> dict[str, int]:
    return {**metrics.param_counts(model), "macs": metrics.count_macs(model, INPUT_SHAPE)}


def match_width(target: int, max_width: float) -> float:
    """The ResNet-20 width (a multiple of 1/16) whose trainable count is closest to target."""
    best = min((abs(metrics.param_counts(models.build(spec(i / 16)))["trainable"] - target),
                i / 16) for i in range(1, int(max_width * 16) + 1))
    return best[1]


def _train_config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer=args.optimizer, lr=args.lr,
                       batch_size=args.batch_size)


def seed_splits(seed: int, args: argparse.Namespace, train_set, test_set) -> data.Splits:
    s = data.split(train_set, test_set, seed)
    tr = s.train.subset(torch.arange(args.train_subset)) if args.train_subset else s.train
    test = s.test.subset(torch.arange(args.test_subset)) if args.test_subset else s.test
    return data.Splits(tr, s.val.subset(torch.arange(min(args.val, len(s.val)))), test)


def _log(rec: dict[str, Any], label: str) -> None:
    print(f"  {label} epoch {rec['epoch']}: loss {rec['loss']:.3f} train {rec['accuracy']:.4f} "
          f"val {rec['val_accuracy']:.4f} ({rec['wall_s']:.1f}s)", flush=True)


def run_seed(seed: int, args: argparse.Namespace, splits: data.Splits, rows: list,
             flush) -> None:
    K = args.transform_epoch
    g = torch.Generator().manual_seed(seed)
    dense = models.build(spec(args.width), generator=g)
    snap: dict[str, Any] = {}

    def on_epoch(rec: dict[str, Any]) -> None:
        _log(rec, f"seed {seed} dense")
        if rec["epoch"] == K:
            snap["model"], snap["state"] = copy.deepcopy(dense), g.get_state()

    hist = train(dense, splits, _train_config(args, args.epochs), generator=g,
                 on_epoch=on_epoch)
    acc = evaluate(dense, splits.test)["accuracy"]
    print(f"seed {seed} dense: test {acc:.4f}", flush=True)
    rows.append({"method": "dense", "config": f"wrn20x{args.width:g}", "seed": seed,
                 **size_of(dense), "test_accuracy": acc, "history": hist,
                 "epoch_s": statistics.median(r["wall_s"] for r in hist[K:])})
    flush()
    base, state = snap["model"], snap["state"]
    calib_order = torch.randperm(len(splits.train),
                                 generator=torch.Generator().manual_seed(10_000 + seed))
    calib = splits.train.subset(calib_order[:args.calib])
    pcn1_trainable = None
    for name in args.configs:
        cfg = CONFIGS[name]
        t = time.perf_counter()
        top_k = max(v["dims"] for v in cfg["select"]["per_layer"].values())
        stats = pca.collect_input_stats(base, cfg["layers"], calib, samples=args.calib,
                                        top_k=top_k)
        model, report = pcn_transform(base, stats, cfg["select"], cfg["layers"],
                                      output=cfg["output"])
        transform_s = time.perf_counter() - t
        after = evaluate(model, splits.val)["accuracy"]
        size = size_of(model)
        if name == "pcn1":
            pcn1_trainable = size["trainable"]
        g_ft = torch.Generator()
        g_ft.set_state(state)
        h = train(model, splits, _train_config(args, args.epochs - K), generator=g_ft,
                  on_epoch=lambda rec, n=name: _log(rec, f"seed {seed} {n}"))
        final = evaluate(model, splits.test)["accuracy"]
        rows.append({"method": "pcn", "config": name, "seed": seed, **size,
                     "val_accuracy_after_transform": after, "test_accuracy": final,
                     "transform_s": transform_s, "history": h,
                     "epoch_s": statistics.median(r["wall_s"] for r in h),
                     "dims": {n: r["dims"] for n, r in report["input"].items()},
                     "explained_variance": {n: r["explained_variance"]
                                            for n, r in report["input"].items()},
                     "output_keep": {n: r["keep"] for n, r in report["output"].items()}})
        print(f"seed {seed} {name}: {size['trainable']}/{size['total']} macs {size['macs']:,} "
              f"after {after:.4f} final {final:.4f} transform {transform_s:.1f}s", flush=True)
        flush()
    if not args.no_narrow:
        target = pcn1_trainable or metrics.param_counts(models.build(spec(args.width / 2)))[
            "trainable"]
        width = match_width(target, args.width)
        g_n = torch.Generator().manual_seed(seed)
        small = models.build(spec(width), generator=g_n)
        hn = train(small, splits, _train_config(args, args.epochs), generator=g_n,
                   on_epoch=lambda rec: _log(rec, f"seed {seed} narrow"))
        acc = evaluate(small, splits.test)["accuracy"]
        rows.append({"method": "narrow", "config": f"wrn20x{width:g}", "seed": seed,
                     **size_of(small), "test_accuracy": acc, "history": hn,
                     "epoch_s": statistics.median(r["wall_s"] for r in hn)})
        print(f"seed {seed} narrow x{width:g}: {rows[-1]['trainable']} final {acc:.4f}",
              flush=True)
        flush()


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s, _ in grouped_stats(rows, ("method", "config"), (
        "trainable", "total", "macs", "test_accuracy", "val_accuracy_after_transform",
        "transform_s", "epoch_s"))]


def markdown_table(summary: list[dict[str, Any]]) -> str:
    dense = next(s for s in summary if s["method"] == "dense")
    head = ("| method | config | n | trainable | x fewer | total | MACs | x fewer MACs | "
            "val after transform % | final test % mean [min, max] | Δ vs dense pt | "
            "epoch s after K (median) | transform s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        tr, macs = s["trainable"]["mean"], s["macs"]["mean"]
        transform = f"{s['transform_s']['median']:.1f}" if "transform_s" in s else "–"
        lines.append(
            f"| {s['method']} | {s['config']} | {s['n']} | {tr:,.0f} | "
            f"{dense['trainable']['mean'] / tr:.1f} | {s['total']['mean']:,.0f} | {macs:,.0f} | "
            f"{dense['macs']['mean'] / macs:.1f} | {_pct(s.get('val_accuracy_after_transform'))}"
            f" | {_pct(s['test_accuracy'])} | {s['delta_vs_dense_pt']:+.2f} | "
            f"{s['epoch_s']['median']:.1f} | {transform} |")
    return "\n".join(lines)


def write_results(out: Path, args, rows, runtime: float, complete: bool) -> str:
    summary = summarize(rows)
    meta = run_meta(args, complete=complete, runtime=runtime,
                    configs={k: CONFIGS[k] for k in args.configs})
    return dump_results(out, meta, summary, rows, markdown_table(summary))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 < args.transform_epoch < args.epochs:
        raise SystemExit("--transform-epoch must lie strictly between 0 and --epochs")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summarize_only:
        print(markdown_table(summarize(json.loads(out.read_text())["runs"])))
        return
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        write_results(out, args, rows, time.perf_counter() - started, complete=False)

    for seed in range(args.seeds):
        run_seed(seed, args, seed_splits(seed, args, train_set, test_set), rows, flush)
    runtime = time.perf_counter() - started
    table = write_results(out, args, rows, runtime, complete=True)
    print()
    print(table)
    print(f"\nruntime {runtime / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
