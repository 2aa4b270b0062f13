"""PCN on Conv4 / Fashion-MNIST versus dense, a narrower Conv4 trained from scratch and
Torch-Pruning structured channel pruning, plus fc1's effective dimensionality over training.

Run from the repository root (the figures in BENCHMARKS.md; the Torch-Pruning baseline needs the
optional `bench` extra: `.venv/bin/pip install -e '.[bench]'`, or pass `--no-tp`):

    .venv/bin/python -m benchmarks.pcn_conv4 --seeds 3 --epochs 4 --transform-epochs 1 2 \
        --train-subset 3000 --calib 2000 --val 1000 --threads 2 \
        --settings all-48-48-96-128-128 all-32-32-64-64-64 all-16-16-32-32-32 \
        --out benchmarks/out/pcn_conv4.json --plot docs/figures/conv4_fc1_effective_dim.png

Per seed (seed s: data split s, init and shuffling generator s; batch 60, Adam 1e-3, the paper's
Conv4 setting):
* dense: Conv4 (conv 64,64,128,128, fc 256,256) trained `--epochs` epochs in one run; its state
  after K epochs (model and shuffling generator) is the starting point of every PCN and
  Torch-Pruning run. After every epoch (and at init) the effective dimensionality of fc1's input
  is measured on `--dim-samples` fixed training samples (seed 000 Fig. 3b);
* PCN: that K-epoch model, PCN transform (core.pca.collect_input_stats on `--calib` calibration
  samples + core.pcn_output.pcn_transform, input-based, optionally output-based), then
  `--epochs - K` more epochs (a fresh Adam, as the product does);
* tp-prune: that K-epoch model, structured channel/unit pruning with Torch-Pruning
  (`tp.pruner.MagnitudePruner`, L1-magnitude importance, one uniform ratio for every layer, the
  output layer fc3 ignored), the ratio bisected so that the trainable count is as close as
  possible to the PCN model's; then the same `--epochs - K` epochs with a fresh Adam and the
  same shuffling state as the PCN run;
* narrow: a Conv4 with every width scaled by one factor so that its trainable count is as close
  as possible to the PCN model's, trained from scratch `--epochs` epochs.
Test accuracy is measured on the full 10k test set only at the end of each run; accuracy right
after the transform / pruning is measured on the `--val` validation samples (a 10k test pass
costs about as much as a training epoch of 3k images here).

Effective dimensionality: m_e(tau) = number of eigenvalues of the covariance of fc1's input
(128*7*7 = 6,272 dims) above tau, computed with `core.pca.collect_input_stats(solver="gram")`
on `--dim-samples` samples (N < 6,272, so the covariance has rank <= N - 1 and the Gram route
gives exactly its non-zero spectrum: the same eigenvalues `core.dim_tracking.effective_dim_curve`
gets from a full 6,272 x 6,272 eigh, at a fraction of the cost; `--dim-check` compares the two
once).
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

from benchmarks.common import dump_results, grouped_stats, run_meta, stat
from benchmarks.pcn_lenet300 import _pct  # one summary format for all PCN benchmarks
from core import data, metrics, models, pca
from core.dim_tracking import effective_dim_curve
from core.pcn_output import pcn_transform
from core.train import TrainConfig, evaluate, train

INPUT_SHAPE = [1, 28, 28]
BASE_CH, BASE_FC = [64, 64, 128, 128], [256, 256]
CONV4 = {"name": "conv4", "channels": BASE_CH, "fc": BASE_FC}
ALL = ["conv2", "conv3", "conv4", "fc1", "fc2"]
TP_HINT = ("the Torch-Pruning baseline needs the optional 'bench' extra: "
           ".venv/bin/pip install -e '.[bench]' (torch-pruning==1.6.1); or pass --no-tp")


def _per(d: dict[str, int]) -> dict[str, Any]:
    return {"per_layer": {n: {"dims": k} for n, k in d.items()}}


def _all(c2: int, c3: int, c4: int, f1: int, f2: int) -> dict[str, Any]:
    return {"layers": ALL, "select": _per(
        {"conv2": c2, "conv3": c3, "conv4": c4, "fc1": f1, "fc2": f2}), "output": None}


# name -> layers, select, output (core.pcn_output.pcn_transform arguments)
SETTINGS: dict[str, dict[str, Any]] = {
    # every layer after conv1 but the output layer, at three compression levels (~7x, ~12x,
    # ~23x fewer trainable); the middle one is the quick-run setting
    "all-48-48-96-128-128": _all(48, 48, 96, 128, 128),
    "all-32-32-64-64-64": _all(32, 32, 64, 64, 64),
    "all-16-16-32-32-32": _all(16, 16, 32, 32, 32),
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
DEFAULT_SETTINGS = ["all-48-48-96-128-128", "all-32-32-64-64-64", "all-16-16-32-32-32"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--transform-epochs", type=int, nargs="+", default=[1])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS)
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib", type=int, default=2000, help="PCA calibration samples")
    p.add_argument("--train-subset", type=int, default=3000,
                   help="first N samples of the (seeded) training split; 0: all 54k")
    p.add_argument("--val", type=int, default=1000, help="validation samples used per epoch")
    p.add_argument("--no-narrow", action="store_true", help="skip the narrow-Conv4 baseline")
    p.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning baseline")
    p.add_argument("--dim-samples", type=int, default=1000,
                   help="fixed training samples for fc1's effective dimensionality (0: off)")
    p.add_argument("--dim-thresholds", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--dim-check", action="store_true",
                   help="once, compare the Gram-route spectrum with effective_dim_curve's")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default="benchmarks/out/pcn_conv4.json")
    p.add_argument("--plot", default="docs/figures/conv4_fc1_effective_dim.png",
                   help="effective-dim figure ('' to skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true",
                   help="print the table of --out (and redraw --plot) without training")
    return p.parse_args(argv)


def _import_tp():
    try:
        import torch_pruning
    except ImportError as exc:
        raise SystemExit(f"torch_pruning is not installed: {TP_HINT}") from exc
    return torch_pruning


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


def widths_of(model: torch.nn.Module) -> list[int]:
    """Conv4's widths: conv output channels, then hidden dense widths."""
    return ([getattr(model, n).out_channels for n in model.conv_names]
            + [getattr(model, n).out_features for n in model.fc_names[:-1]])


def tp_prune(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """A pruned deep copy: Torch-Pruning, L1-magnitude importance, one ratio for every layer
    (channels of conv1..conv4, units of fc1..fc2; the output layer fc3 is ignored)."""
    tp = _import_tp()
    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        pruned, torch.zeros(1, *INPUT_SHAPE), importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=[getattr(pruned, pruned.fc_names[-1])])
    pruner.step()
    return pruned


def tp_prune_to(model: torch.nn.Module, target: int, steps: int = 24
                ) -> tuple[torch.nn.Module, float]:
    """Bisect the pruning ratio so that the pruned trainable count is closest to `target`."""
    lo, hi = 0.0, 0.99
    best: tuple[int, float, torch.nn.Module] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        pruned = tp_prune(model, mid)
        n = metrics.param_counts(pruned)["trainable"]
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), mid, pruned)
        if n == target:
            break
        if n > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[2], best[1]


def size_of(model: torch.nn.Module) -> dict[str, int]:
    return {**metrics.param_counts(model), "macs": metrics.count_macs(model, INPUT_SHAPE)}


def _config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adam", lr=args.lr, batch_size=args.batch_size)


def seed_splits(seed: int, args: argparse.Namespace, train_set, test_set) -> data.Splits:
    s = data.split(train_set, test_set, seed)
    tr = s.train.subset(torch.arange(args.train_subset)) if args.train_subset else s.train
    return data.Splits(tr, s.val.subset(torch.arange(min(args.val, len(s.val)))), s.test)


def fc1_dims(model: torch.nn.Module, dataset, args: argparse.Namespace) -> dict[str, Any]:
    """fc1's effective dimensionality on the first `--dim-samples` items of `dataset`."""
    t = time.perf_counter()
    st = pca.collect_input_stats(model, ["fc1"], dataset, samples=args.dim_samples,
                                 solver="gram")["fc1"]
    return {"effective_dim": {str(tau): pca.effective_dimensionality(st.eigvals, threshold=tau)
                              for tau in args.dim_thresholds},
            "top_eigvals": [float(v) for v in st.eigvals[:50]],
            "wall_s": time.perf_counter() - t}


def dim_check(model: torch.nn.Module, dataset, args: argparse.Namespace) -> dict[str, Any]:
    """The Gram-route spectrum against `core.dim_tracking.effective_dim_curve` (full eigh)."""
    t = time.perf_counter()
    ref = effective_dim_curve(model, ["fc1"], dataset, args.dim_thresholds,
                              samples=args.dim_samples)["fc1"]
    ref_s = time.perf_counter() - t
    ours = fc1_dims(model, dataset, args)
    e_ref = torch.tensor(ref["eigvals"][:50], dtype=torch.float64)
    e_ours = torch.tensor(ours["top_eigvals"], dtype=torch.float64)
    out = {"effective_dim_curve": {str(k): v for k, v in ref["effective_dim"].items()},
           "gram": ours["effective_dim"], "effective_dim_curve_s": ref_s,
           "gram_s": ours["wall_s"],
           "max_rel_diff_top50": float(((e_ref - e_ours).abs() / e_ref.abs().clamp(min=1e-12))
                                       .max())}
    print(f"dim check: {out}", flush=True)
    return out


def run_seed(seed: int, args: argparse.Namespace, splits: data.Splits, rows: list, flush,
             narrow_cache: dict, extra: dict) -> None:
    g = torch.Generator().manual_seed(seed)
    dense = models.build(CONV4, generator=g)
    snaps: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    calib_order = torch.randperm(len(splits.train),
                                 generator=torch.Generator().manual_seed(10_000 + seed))
    calib = splits.train.subset(calib_order[:args.calib])
    dim_set = splits.train.subset(calib_order[:args.dim_samples]) if args.dim_samples else None
    dims_curve: list[dict[str, Any]] = []
    if dim_set is not None:
        dims_curve.append({"epoch": 0, **fc1_dims(dense, dim_set, args)})
        if args.dim_check and "dim_check" not in extra:
            extra["dim_check"] = dim_check(dense, dim_set, args)

    def on_epoch(rec: dict[str, Any]) -> None:
        if rec["epoch"] in args.transform_epochs:
            snaps[rec["epoch"]] = (copy.deepcopy(dense), g.get_state())
        if dim_set is not None:
            dims_curve.append({"epoch": rec["epoch"], **fc1_dims(dense, dim_set, args)})
            print(f"seed {seed} epoch {rec['epoch']}: train {rec['accuracy']:.4f} val "
                  f"{rec['val_accuracy']:.4f} fc1 m_e {dims_curve[-1]['effective_dim']} "
                  f"({rec['wall_s']:.1f}s)", flush=True)

    hist = train(dense, splits, _config(args, args.epochs), generator=g, on_epoch=on_epoch)
    acc = evaluate(dense, splits.test)["accuracy"]
    epoch_s = statistics.median(r["wall_s"] for r in hist)
    print(f"seed {seed} dense: test {acc:.4f} epoch {epoch_s:.1f}s", flush=True)
    rows.append({"method": "dense", "setting": "conv4", "K": None, "seed": seed,
                 **size_of(dense), "test_accuracy": acc, "epoch_s": epoch_s, "history": hist,
                 "fc1_effective_dim": dims_curve})
    flush()
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
            print(f"seed {seed} K={K} {name}: pcn {size['trainable']}/{size['total']} "
                  f"after {after:.4f} final {final:.4f} transform {transform_s:.2f}s "
                  f"out {rows[-1]['output_keep']}", flush=True)
            flush()
            if not args.no_tp:
                t = time.perf_counter()
                pruned, ratio = tp_prune_to(base, size["trainable"])
                prune_s = time.perf_counter() - t
                p_after = evaluate(pruned, splits.val)["accuracy"]
                p_size = size_of(pruned)
                g_tp = torch.Generator()
                g_tp.set_state(state)
                hp = train(pruned, splits, _config(args, args.epochs - K), generator=g_tp)
                p_final = evaluate(pruned, splits.test)["accuracy"]
                rows.append({"method": "tp-prune", "setting": name, "K": K, "seed": seed,
                             **p_size, "ratio": ratio, "widths": widths_of(pruned),
                             "val_accuracy_after_transform": p_after,
                             "test_accuracy": p_final, "prune_s": prune_s, "history": hp})
                print(f"seed {seed} K={K} {name}: tp-prune ratio {ratio:.4f} "
                      f"{widths_of(pruned)} {p_size['trainable']} after {p_after:.4f} "
                      f"final {p_final:.4f}", flush=True)
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
                print(f"seed {seed} K={K} {name}: narrow {spec['channels']}/{spec['fc']} "
                      f"{narrow_cache[key]['trainable']} final "
                      f"{narrow_cache[key]['test_accuracy']:.4f}", flush=True)
                flush()


def _max_dims(select: dict[str, Any]) -> int:
    if "dims" in select:
        return int(select["dims"])
    return max(int(v["dims"]) for v in select["per_layer"].values())


def _shape(r: dict[str, Any]) -> str:
    if r["method"] == "narrow":
        return "-".join(map(str, r["spec"]["channels"] + r["spec"]["fc"]))
    if r["method"] == "tp-prune":
        return "-".join(map(str, r["widths"]))
    if r["method"] == "pcn":
        return ("-".join(f"{k}" for k in r["dims"].values())
                + ("" if not r["output_keep"] else
                   " out " + ",".join(map(str, r["output_keep"].values()))))
    return "-".join(map(str, BASE_CH + BASE_FC))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s, rs in grouped_stats(rows, ("method", "setting", "K"), (
            "trainable", "total", "macs", "test_accuracy", "val_accuracy_after_transform",
            "transform_s", "epoch_s")):
        s["shape"] = sorted({_shape(r) for r in rs})
        out.append(s)
    order = {"dense": 0, "pcn": 1, "tp-prune": 2, "narrow": 3}
    first = {r["setting"]: i for i, r in reversed(list(enumerate(rows)))}
    return sorted(out, key=lambda s: (s["K"] or 0, first[s["setting"]], order[s["method"]]))


def markdown_table(summary: list[dict[str, Any]]) -> str:
    dense = next(s for s in summary if s["method"] == "dense")
    head = ("| method | setting | K | n | dims / widths | trainable | x fewer | total | MACs | "
            "val after transform % | final test % mean [min, max] | Δ vs dense pt | "
            "transform s (median) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        tr = s["trainable"]["mean"]
        transform = f"{s['transform_s']['median']:.2f}" if "transform_s" in s else "–"
        lines.append(
            f"| {s['method']} | {s['setting']} | {s['K'] if s['K'] is not None else '–'} | "
            f"{s['n']} | {' / '.join(s['shape'])} | {tr:,.0f} | "
            f"{dense['trainable']['mean'] / tr:.1f} | {s['total']['mean']:,.0f} | "
            f"{s['macs']['mean']:,.0f} | {_pct(s.get('val_accuracy_after_transform'))} | "
            f"{_pct(s['test_accuracy'])} | {s['delta_vs_dense_pt']:+.2f} | {transform} |")
    return "\n".join(lines)


def dim_table(rows: list[dict[str, Any]]) -> str:
    """fc1's effective dimensionality per epoch: mean [min, max] over seeds, per threshold."""
    dense = [r for r in rows if r["method"] == "dense" and r.get("fc1_effective_dim")]
    if not dense:
        return ""
    taus = list(dense[0]["fc1_effective_dim"][0]["effective_dim"])
    head = ("| epoch | " + " | ".join(f"m_e({t})" for t in taus)
            + " | train acc % | val acc % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, point in enumerate(dense[0]["fc1_effective_dim"]):
        cells = []
        for t in taus:
            v = [r["fc1_effective_dim"][i]["effective_dim"][t] for r in dense]
            cells.append(f"{statistics.fmean(v):.0f} [{min(v)}, {max(v)}]")
        ep = point["epoch"]
        accs = ["–", "–"] if ep == 0 else [
            _pct(stat([r["history"][ep - 1][k] for r in dense]))
            for k in ("accuracy", "val_accuracy")]
        lines.append(f"| {ep} | " + " | ".join(cells) + f" | {accs[0]} | {accs[1]} |")
    return "\n".join(lines)


def plot_dims(rows: list[dict[str, Any]], path: Path, meta: dict[str, Any]) -> None:
    """Seed 000 Fig. 3b's shape: fc1's m_e(0.1) per epoch (mean, min-max band over seeds) and
    train / validation accuracy on a second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r["method"] == "dense" and r.get("fc1_effective_dim")]
    if not dense:
        return
    taus = list(dense[0]["fc1_effective_dim"][0]["effective_dim"])
    tau = "0.1" if "0.1" in taus else taus[0]
    epochs = [p["epoch"] for p in dense[0]["fc1_effective_dim"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    me = torch.tensor([[float(p["effective_dim"][tau]) for p in r["fc1_effective_dim"]]
                       for r in dense])
    ax.plot(epochs, me.mean(0), "o-", color="tab:blue", label=f"fc1 effective dim (τ={tau})")
    ax.fill_between(epochs, me.min(0).values, me.max(0).values, color="tab:blue", alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"fc1 input: effective dim (eigenvalues > {tau})",
                  color="tab:blue")
    ax.set_xticks(epochs)
    ax2 = ax.twinx()
    for key, color, label in (("accuracy", "tab:orange", "train accuracy (running)"),
                              ("val_accuracy", "tab:green", "validation accuracy")):
        acc = torch.tensor([[r["history"][e - 1][key] for e in epochs[1:]] for r in dense])
        ax2.plot(epochs[1:], 100 * acc.mean(0), "s--", color=color, label=label)
        ax2.fill_between(epochs[1:], 100 * acc.min(0).values, 100 * acc.max(0).values,
                         color=color, alpha=0.15)
    ax2.set_ylabel("accuracy %")
    a = meta.get("args", {})
    ax.set_title(f"Conv4 on Fashion-MNIST ({a.get('train_subset') or 54000} training images, "
                 f"Adam; {len(dense)} seeds,\n{a.get('dim_samples')} samples for PCA; "
                 "mean and min-max over seeds)", fontsize=9)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, args, rows, runtime: float, complete: bool, extra: dict) -> str:
    summary = summarize(rows)
    meta = run_meta(args, complete=complete, runtime=runtime,
                    settings={k: SETTINGS[k] for k in args.settings}, **extra)
    return dump_results(out, meta, summary, rows, markdown_table(summary),
                        dim_table_md=dim_table(rows))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if any(not 0 < k < args.epochs for k in args.transform_epochs):
        raise SystemExit("--transform-epochs must lie strictly between 0 and --epochs")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summarize_only:
        saved = json.loads(out.read_text())
        print(markdown_table(summarize(saved["runs"])))
        print()
        print(dim_table(saved["runs"]))
        if args.plot:
            plot_dims(saved["runs"], Path(args.plot), saved["meta"])
        return
    if not args.no_tp:
        _import_tp()  # fail fast, before any training
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    rows: list[dict[str, Any]] = []
    narrow_cache: dict = {}
    extra: dict[str, Any] = {}

    def flush() -> None:
        write_results(out, args, rows, time.perf_counter() - started, complete=False,
                      extra=extra)

    for seed in range(args.seeds):
        run_seed(seed, args, seed_splits(seed, args, train_set, test_set), rows, flush,
                 narrow_cache, extra)
    runtime = time.perf_counter() - started
    table = write_results(out, args, rows, runtime, complete=True, extra=extra)
    if args.plot:
        plot_dims(rows, Path(args.plot), {"args": vars(args)})
    print()
    print(table)
    print()
    print(dim_table(rows))
    print(f"\nruntime {runtime / 60:.1f} min; wrote {out}"
          + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
