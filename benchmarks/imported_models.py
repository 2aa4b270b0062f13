"""Imported models (issue 14): three architectures outside the zoo on Fashion-MNIST, every method
at one setting, and the time the inspector takes to take in a 50 MB model.

Run from the repository root:

    .venv/bin/python -m benchmarks.imported_models                      # both parts
    .venv/bin/python -m benchmarks.imported_models --no-intake          # the method table only
    .venv/bin/python -m benchmarks.imported_models --summarize-only     # re-print the tables

Part 1 (methods). Per architecture of `tests/import_models.py` (MobileNetV2-style, ResNet-18-
style, TinyViT; seed 0): `torch.export` with a dynamic batch -> `.pt2` -> the inspector's own
path (`worker.pt2_check.load_program`: archive checks, clean copy, weights-only load;
`core.import_pt2.graph_from_program` with verification; `core.models.import_graph` with the
standardization as the model's preprocessing). Data: seed 0's split of Fashion-MNIST, the first
`--train-subset` training images (no validation set: nothing selects on one), the full 10k
test set, both standardized with the training subset's mean/std (a job's `"normalize":
"standardize"`).
Training: Adam, `--lr`, batch `--batch-size`, generator seed 0, `--threads` torch threads (1 by
default: 2 threads on a 2-core machine shared with other jobs oversubscribed it). The dense
model trains `--epochs` (E); a copy then trains `--finetune-epochs` (F) more with a fresh
optimizer (the dense reference at the same total epochs, E + F); every method is applied to the
E-epoch model and fine-tuned F epochs (the same fresh-optimizer training), except DCTpS, whose
transform discards the trained weights: it is applied to the untrained imported model and
trained E + F epochs (a `dctps -> train` job). Settings (one each):
* structured methods at the same MAC budget, `--mac-ratio` of the dense model's MACs:
  `lowrank` (output-perturbation scores on `--lowrank-samples` training images, no blocking,
  every layer it applies to) with its `mac_ratio` — which counts the layers it factors — set so
  that the whole model lands at r (the depthwise convs it leaves out keep their MACs);
  `channel_prune` `{"mac_ratio": r}` (l1, global, round_to 1: the defaults; where r is out of
  its reach, `--cp-fallback`); `pcn` input-based on every layer it applies to but the first
  (which reads the one image channel) with ONE common selector `{"energy": f}`, f the largest
  whose model meets the same MAC budget (bisection on f; a benchmark-side search: the service's
  own target search takes a trainable-parameter budget), PCA on `--calib` training images;
* unstructured methods at the same number of non-zero weights: `snip` at `--snip-sparsity`
  (global, one labelled batch of 100 training images, masks enforced while fine-tuning; where
  the global mask empties a layer, which the worker refuses as layer collapse, scope
  'layerwise', the refusal's first hint) and
  `dctps` at density 1 - sparsity (EPL, trainable alpha).
Reported per model: parameters (total, non-zero; `core.metrics.param_counts`), MACs
(`core.metrics.count_macs`: Linear/Conv2d layers only; masks: the dense MACs, plus the MACs of
the non-zero weights), test accuracy (torch, full test set), the layers each method changed
and those the prunability report (`core.prunability`, as stored at upload) leaves untouched
for it, ONNX bytes (`core.export.export_onnx`, the export step's function: dynamo exporter,
opset 18, masks as dense weights with zeros, DCTpS dense-equivalent) and onnxruntime latency
(`worker.onnx_tools.ort_session`: CPU, ORT_ENABLE_ALL, `--ort-threads` intra-op threads; all
files of one architecture timed in turns, median after 3 warm-up turns, batch 1 and 256). The
ONNX files are checked against torch (max |logit difference| and top-1 agreement on the first
`--ort-check` test images). Torch evaluates in batches of 256 (`core.train.evaluate`'s default
1,024 is several times slower on the MobileNet-style net's wide activations here).

Part 2 (intake). `ResNet18ish(in_channels=3, width=--intake-width)` at 3x32x32 (width 68:
50.5 MB of float32 weights), exported as `.pt2` (`torch.export`, dynamic batch) and `.onnx`
(dynamo exporter, weights inside the file); each file inspected `--intake-runs` times by
`python -m worker.inspect` with the API's exact command line and environment
(`api.inspect_client.Inspector._command` under the default `Settings`: RLIMIT_AS 4 GiB, 120 s
CPU, one BLAS thread, `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`, `MALLOC_ARENA_MAX=2`), wrapped in
`/usr/bin/time -v` for the peak RSS: archive/ONNX checks, load, conversion, verification,
`import_graph`, the normalized checkpoint, the prunability report and the graph file. One more
run per format, in a fresh interpreter with the same environment, times those phases one by
one (imports first; the pt2 conversion once without and once with its verification).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import core.models as cm
from benchmarks.common import dump_results, run_meta
from benchmarks.export import round_robin
from core import data
from core.channel_prune import ChannelPruneConfig, channel_prune
from core.configs import LowRankConfig, PruneConfig
from core.dctps import dctps_transform
from core.errors import SpecError
from core.export import export_onnx
from core.import_pt2 import graph_from_program
from core.lowrank import lowrank_layers, lowrank_plan, lowrank_transform
from core.masks import apply_masks
from core.metrics import count_macs, param_counts
from core.pca import collect_input_stats
from core.pcn import pcn_untouched
from core.pcn_output import apply_pcn, chosen_layers, plan_pcn
from core.prunability import prunability_report
from core.prune import collapsed_layers, prune_masks
from core.surgery import get_layer, plain_layers
from core.train import TrainConfig, evaluate, train
from tests.import_models import example_input, export_pt2, make
from tests.import_models import export_onnx as export_user_onnx
from worker.onnx_tools import ort_session

ARCHS = ("mobilenetv2", "resnet18", "vit")
LABELS = {"mobilenetv2": "MobileNetV2-style", "resnet18": "ResNet-18-style", "vit": "TinyViT"}
METHODS = ("lowrank", "pcn", "channel_prune", "snip", "dctps")
SHAPE = [1, 28, 28]
MiB = 1024 * 1024
EVAL_BATCH = 256  # core.train.evaluate's default 1024 is 3-7x slower here on the wide nets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--train-subset", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=3, help="dense training before compression")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mac-ratio", type=float, default=0.5)
    p.add_argument("--snip-sparsity", type=float, default=0.9)
    p.add_argument("--cp-fallback", type=float, default=0.75,
                   help="channel_prune's mac_ratio where --mac-ratio is out of its reach")
    p.add_argument("--calib", type=int, default=2000, help="PCA samples of pcn")
    p.add_argument("--lowrank-samples", type=int, default=128)
    p.add_argument("--ort-check", type=int, default=2000,
                   help="test images run through onnxruntime to check the file against torch")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (training; 1 is robust on a shared machine)")
    p.add_argument("--ort-threads", type=int, default=1)
    p.add_argument("--repeats-b1", type=int, default=200)
    p.add_argument("--repeats-b256", type=int, default=30)
    p.add_argument("--budget-b1", type=float, default=10.0)
    p.add_argument("--budget-b256", type=float, default=25.0)
    p.add_argument("--no-methods", action="store_true")
    p.add_argument("--no-intake", action="store_true")
    p.add_argument("--intake-width", type=int, default=68)
    p.add_argument("--intake-runs", type=int, default=3)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--workdir", default="benchmarks/out/imported")
    p.add_argument("--out", default="benchmarks/out/imported_models.json")
    p.add_argument("--summarize-only", action="store_true")
    return p.parse_args(argv)


# ---- part 1: the methods ------------------------------------------------------------------

def prepared_splits(args: argparse.Namespace) -> tuple[data.Splits, list[float], list[float]]:
    train_set, test_set = data.fashion_mnist(args.data_dir)
    s = data.split(train_set, test_set, 0)
    train_part = s.train.subset(torch.arange(min(args.train_subset, len(s.train))))
    mean, std = data.channel_stats(train_part)
    # no validation set: nothing here selects on it, and train() would evaluate it every epoch
    return data.Splits(*(data.standardize(part, mean, std) for part in (
        train_part, s.val.subset(torch.arange(0)), s.test))), mean, std


def import_arch(name: str, workdir: Path, mean: list[float], std: list[float]
                ) -> tuple[nn.Module, dict[str, float]]:
    """`make(name)` -> .pt2 (dynamic batch) -> the inspector's loader and converter."""
    from worker.pt2_check import load_program

    path = workdir / f"{name}.pt2"
    t = time.perf_counter()
    export_pt2(make(name), path)
    export_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=workdir) as work:
        t = time.perf_counter()
        program = load_program(path, work, max_bytes=2048 * MiB, max_ratio=100.0)
        load_s = time.perf_counter() - t
    t = time.perf_counter()
    ir, tensors = graph_from_program(program)
    model = cm.import_graph(ir, tensors, preprocessing={"layout": "NCHW", "mean": mean,
                                                        "std": std})
    convert_s = time.perf_counter() - t
    return model, {"export_s": export_s, "load_s": load_s, "convert_s": convert_s,
                   "pt2_bytes": path.stat().st_size}


def train_cfg(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adam", lr=args.lr, batch_size=args.batch_size)


def fit(model: nn.Module, splits: data.Splits, args: argparse.Namespace, epochs: int,
        masks: dict[str, torch.Tensor] | None = None) -> float:
    t = time.perf_counter()
    train(model, splits, train_cfg(args, epochs), generator=torch.Generator().manual_seed(0),
          masks=masks)
    return time.perf_counter() - t


def layer_macs(model: nn.Module) -> dict[str, int]:
    return {r["name"]: r["macs"] for r in prunability_report(model)["layers"]}


def nnz_macs(model: nn.Module) -> int:
    """MACs of the non-zero weights: each layer's MACs times its weight's density (a weight
    entry is used once per output position)."""
    total = 0.0
    for name, macs in layer_macs(model).items():
        weight = getattr(get_layer(model, name), "weight", None)
        if isinstance(weight, torch.Tensor):
            total += macs * int(torch.count_nonzero(weight)) / weight.numel()
        else:
            total += macs
    return round(total)


def changed_layers(dense: nn.Module, new: nn.Module, names: list[str],
                   masks: dict[str, torch.Tensor] | None) -> int:
    """Layers of the dense model that the method replaced, resized or masked."""
    count = 0
    for name in names:
        a, b = get_layer(dense, name), get_layer(new, name)
        shapes_a = [tuple(t.shape) for t in a.state_dict().values()]
        shapes_b = [tuple(t.shape) for t in b.state_dict().values()]
        masked = masks is not None and name in masks and not bool(masks[name].all())
        count += type(a) is not type(b) or shapes_a != shapes_b or masked
    return count


def untouched_by_report(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: how many layers the prunability report leaves untouched, and why (distinct
    reasons, shortened)."""
    out: dict[str, dict[str, Any]] = {}
    for op in METHODS:
        rows = [r for r in report["layers"] if op in r["untouched"]]
        reasons = sorted({re.sub(r"\d+", "N", r["untouched"][op])[:140] for r in rows})
        out[op] = {"layers": len(rows), "of": len(report["layers"]), "reasons": reasons}
    out["channel_prune"]["untouched_groups"] = report["totals"]["untouched_groups"]
    out["channel_prune"]["groups"] = report["totals"]["groups"]
    return out


def pcn_layers(model: nn.Module) -> list[str]:
    """Every layer the input transform applies to, less the first (it reads the 1 image
    channel): the MACs of these nets sit in their early, high-resolution layers, which "auto"
    (the layers holding 90 % of the weights) leaves out."""
    untouched = pcn_untouched(model)
    return [n for n, _ in plain_layers(model) if n not in untouched][1:]


def pcn_to_macs(model: nn.Module, calib: data.ArrayDataset, budget: float, steps: int = 14
                ) -> tuple[nn.Module, dict[str, Any]]:
    """PCN input-based on `pcn_layers` with one common `{"energy": f}` selector (each layer
    keeps the leading components holding a fraction f of its input variance), f the largest
    whose model has at most `budget` MACs (bisection on f)."""
    layers = chosen_layers(model, pcn_layers(model))
    stats = collect_input_stats(model, layers, calib, samples=len(calib))

    def build(f: float) -> tuple[nn.Module, dict[str, Any], int]:
        new, report = apply_pcn(model, plan_pcn(model, stats, {"energy": f}, layers), stats)
        return new, report, count_macs(new, SHAPE)

    lo, hi = 0.0, 1.0
    trials: list[tuple[float, int]] = []
    best = None
    for _ in range(steps):  # the largest energy that meets the budget
        mid = (lo + hi) / 2
        cand = build(mid)
        trials.append((mid, cand[2]))
        if cand[2] <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    reached = best is not None
    if best is None:  # not reachable: the smallest energy tried
        best = cand
    return best[0], {"select": {"energy": round(lo if reached else trials[-1][0], 5)},
                     "reached": reached, "trials": trials, "layers": len(layers),
                     "dims": {n: r["dims"] for n, r in best[1]["input"].items()},
                     "in_dims": {n: r["in_dim"] for n, r in best[1]["input"].items()}}


def compress(method: str, dense: nn.Module, splits: data.Splits, args: argparse.Namespace,
             dense_macs: int) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor] | None]:
    """(compressed copy, setting/what was done, masks) of the trained dense model."""
    budget = args.mac_ratio * dense_macs
    tr = splits.train
    if method == "lowrank":
        # lowrank's mac_ratio counts the layers it factors; the layers it leaves out (depthwise
        # convs) keep their MACs, so the ratio that gives the whole model `--mac-ratio` is
        # (budget - their MACs) / the factored layers' MACs
        macs = layer_macs(dense)
        chosen = sum(macs[n] for n in lowrank_layers(dense))
        ratio = (budget - (dense_macs - chosen)) / chosen
        if ratio <= 0:
            raise SpecError(f"lowrank cannot reach {args.mac_ratio} of the MACs: the layers it "
                            f"leaves out hold {(dense_macs - chosen) / dense_macs:.2f}")
        config = LowRankConfig(target={"mac_ratio": round(ratio, 4)})
        plan = lowrank_plan(dense, config, input_shape=SHAPE,
                            inputs=tr.x[:args.lowrank_samples])
        net, _ = lowrank_transform(dense, plan)
        return net, {"target": dict(config.target), "score": config.score,
                     "samples": args.lowrank_samples,
                     "ranks": {n: p["ranks"] for n, p in plan.items()}}, None
    if method == "pcn":
        net, what = pcn_to_macs(dense, tr.subset(torch.arange(min(args.calib, len(tr)))),
                                budget)
        return net, what, None
    if method == "channel_prune":
        ratio, note = args.mac_ratio, None
        try:
            net, report = channel_prune(dense, ChannelPruneConfig(target={"mac_ratio": ratio}))
        except SpecError as exc:
            if "out of reach" not in str(exc):
                raise
            ratio, note = args.cp_fallback, str(exc)
            net, report = channel_prune(dense, ChannelPruneConfig(target={"mac_ratio": ratio}))
        return net, {"target": {"mac_ratio": ratio}, "criterion": "l1", "round_to": 1,
                     "out_of_reach": note,
                     "kept": {g: f"{r['kept']}/{r['total']}"
                              for g, r in report["groups"].items()}}, None
    if method == "snip":
        # the worker refuses a mask that empties a layer (layer collapse) and suggests scope
        # 'layerwise' first: taken here when the global mask collapses
        net = copy.deepcopy(dense)
        batches = [(tr.x[:100], tr.y[:100])]
        masks = prune_masks(net, PruneConfig(op="snip", sparsity=args.snip_sparsity),
                            batches=batches)
        collapsed, scope = collapsed_layers(masks), "global"
        if collapsed:
            scope = "layerwise"
            masks = prune_masks(net, PruneConfig(op="snip", sparsity=args.snip_sparsity,
                                                 scope=scope), batches=batches)
        apply_masks(net, masks)
        density = {n: round(float(m.float().mean()), 4) for n, m in masks.items()}
        return net, {"sparsity": args.snip_sparsity, "scope": scope,
                     "global_collapsed": collapsed, "layer_density": density}, masks
    raise ValueError(method)


def run_arch(name: str, args: argparse.Namespace, splits: data.Splits, mean: list[float],
             std: list[float]) -> list[dict[str, Any]]:
    started = time.perf_counter()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    imported, intake = import_arch(name, workdir, mean, std)
    print(f"{name}: exported and imported ({intake['export_s']:.1f} s + {intake['load_s']:.1f} s"
          f" + {intake['convert_s']:.1f} s)", flush=True)
    untrained = copy.deepcopy(imported)
    report = prunability_report(imported)
    names = [r["name"] for r in report["layers"]]
    untouched = untouched_by_report(report)
    E, F = args.epochs, args.finetune_epochs
    dense = imported
    dense_train_s = fit(dense, splits, args, E)
    dense_macs = count_macs(dense, SHAPE)
    base = {"model": name, "dense_macs": dense_macs, "layers": len(names), **intake}

    def row(method: str, net: nn.Module, epochs: str, what: dict[str, Any],
            masks: dict[str, torch.Tensor] | None, **extra: Any) -> dict[str, Any]:
        counts = param_counts(net)
        macs = count_macs(net, SHAPE)
        return base | {
            "method": method, "epochs": epochs, "setting": what,
            "params": counts["total"], "trainable": counts["trainable"],
            "nonzero": counts["nonzero"], "macs": macs, "macs_ratio": macs / dense_macs,
            "nnz_macs": nnz_macs(net) if masks else None,
            "test_accuracy": evaluate(net, splits.test, batch_size=EVAL_BATCH)["accuracy"],
            "changed_layers": 0 if method.startswith("dense") else
            changed_layers(untrained, net, names, masks),
            "untouched": untouched.get(method), "net": net, **extra}

    rows = [row("dense", dense, f"{E}", {}, None, train_s=dense_train_s)]
    ref = copy.deepcopy(dense)
    rows.append(row("dense", ref, f"{E}+{F}", {}, None, train_s=fit(ref, splits, args, F)))
    print(f"{name}: dense {rows[0]['test_accuracy']:.4f} -> {rows[1]['test_accuracy']:.4f} "
          f"({dense_train_s:.0f} s)", flush=True)
    for method in args.methods:
        t = time.perf_counter()
        try:
            if method == "dctps":
                net = copy.deepcopy(untrained)
                rep = dctps_transform(net, 1.0 - args.snip_sparsity, "epl", "trainable",
                                      generator=torch.Generator().manual_seed(1))
                what, masks = {"density": 1.0 - args.snip_sparsity, "nnz": rep["total_nnz"]}, None
                epochs = E + F
            else:
                net, what, masks = compress(method, dense, splits, args, dense_macs)
                epochs = F
        except Exception as exc:  # noqa: BLE001 - a method that fails is a row, not a crash
            rows.append(base | {"method": method, "error": f"{type(exc).__name__}: {exc}"[:400],
                                "untouched": untouched.get(method)})
            print(f"{name} {method}: FAILED {rows[-1]['error']}", flush=True)
            continue
        compress_s = time.perf_counter() - t
        macs_before_ft = count_macs(net, SHAPE)
        acc_before_ft = None if method == "dctps" else \
            evaluate(net, splits.test, batch_size=EVAL_BATCH)["accuracy"]
        train_s = fit(net, splits, args, epochs, masks)
        label = f"{E}+{F}" if method != "dctps" else f"0+{E + F}"
        rows.append(row(method, net, label, what, masks, compress_s=compress_s,
                        train_s=train_s, accuracy_before_finetune=acc_before_ft,
                        macs_at_transform=macs_before_ft))
        print(f"{name} {method}: MACs {rows[-1]['macs_ratio']:.3f}, acc "
              f"{acc_before_ft if acc_before_ft is None else round(acc_before_ft, 4)} -> "
              f"{rows[-1]['test_accuracy']:.4f} ({compress_s:.0f} s + {train_s:.0f} s)",
              flush=True)
    deploy(name, rows, splits, args, workdir)
    for r in rows:
        r.pop("net", None)
        r["arch_wall_s"] = time.perf_counter() - started
    return rows


def deploy(name: str, rows: list[dict[str, Any]], splits: data.Splits,
           args: argparse.Namespace, workdir: Path) -> None:
    """ONNX file per row (the export step's function), onnxruntime latency in turns, and the
    file checked against torch."""
    live = [r for r in rows if "net" in r]
    for r in live:
        path = workdir / f"{name}-{r['method']}-{r['epochs'].replace('+', 'p')}.onnx"
        info = export_onnx(r["net"], SHAPE, path)
        r["onnx_path"], r["onnx_bytes"] = str(path), int(info["bytes"])
    sessions = [ort_session(r["onnx_path"], args.ort_threads) for r in live]
    x_test = splits.test.x.numpy()
    n = min(args.ort_check, len(x_test))
    for r, s in zip(live, sessions, strict=True):
        first = s.get_inputs()[0].name
        got = np.concatenate([s.run(None, {first: x_test[i:min(i + 256, n)]})[0]
                              for i in range(0, n, 256)])
        with torch.no_grad():
            r["net"].eval()
            want = np.concatenate([r["net"](splits.test.x[i:min(i + 256, n)]).numpy()
                                   for i in range(0, n, 256)])
        r["ort_top1_agreement"] = float((got.argmax(1) == want.argmax(1)).mean())
        r["ort_max_abs_diff"] = float(np.abs(got - want).max())
        r["ort_rel_diff"] = r["ort_max_abs_diff"] / float(np.abs(want).max())
    for b, batch, repeats, budget in (("b1", 1, args.repeats_b1, args.budget_b1),
                                      ("b256", 256, args.repeats_b256, args.budget_b256)):
        x = np.ascontiguousarray(x_test[:batch])
        times, turns = round_robin(sessions, x, repeats, budget)
        for r, ms in zip(live, times, strict=True):
            r[f"latency_{b}_ms"], r[f"repeats_{b}"] = ms, turns
    del sessions


# ---- part 2: intake ---------------------------------------------------------------------

def inspector_command(args_: list[str]) -> tuple[list[str], dict[str, str]]:
    """The API's command line and environment for `python -m worker.inspect` (the defaults of
    `service.settings.Settings`)."""
    from api.inspect_client import _ONE_THREAD, Inspector
    from service.settings import Settings

    command = Inspector(Settings())._command(args_)
    env = dict(os.environ) | dict.fromkeys(_ONE_THREAD, "1")
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env["MALLOC_ARENA_MAX"] = "2"
    return command, env


def timed_inspection(path: Path, fmt: str, out_dir: Path) -> dict[str, Any]:
    output = out_dir / "model.safetensors"
    graph, report = out_dir / "model.graph.json", out_dir / "model.report.json"
    command, env = inspector_command([
        "--kind", "model", "--input", str(path), "--format", fmt, "--arch", "",
        "--output", str(output), "--options", "{}", "--graph-output", str(graph),
        "--report-output", str(report)])
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True,
                          text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = [float(v) for v in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)",
                                        proc.stderr)]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"wall_s": wall, "cpu_s": sum(cpu), "peak_rss_mib": int(rss.group(1)) / 1024
              if rss else None, "ok": reply.get("ok"), "returncode": proc.returncode}
    if reply.get("ok"):
        result |= {"params": reply["params"]["total"], "checkpoint_bytes": output.stat().st_size,
                   "report_bytes": report.stat().st_size, "graph_bytes": graph.stat().st_size}
    else:
        result["reply"] = reply
    for p in (output, graph, report):
        p.unlink(missing_ok=True)
    return result


# The inspector's steps timed one by one in a fresh interpreter (cold, as the inspector runs):
# the same functions as `worker.inspect.inspect_checkpoint`; argv: path, format, out_dir.
PHASES = """
import json, sys, tempfile, time
from pathlib import Path
times = {}
t = time.perf_counter()
import torch
from core.graph import canonical, graph_for
from core.import_pt2 import graph_from_program
from core.models import import_graph, save
from core.prunability import prunability_report
from worker.onnx_import import check_onnx, graph_from_onnx
from worker.pt2_check import load_program
times["imports_s"] = time.perf_counter() - t
path, fmt, out_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cap = 2048 * 1024 * 1024
t = time.perf_counter()
with tempfile.TemporaryDirectory(dir=out_dir) as work:
    if fmt == "pt2":
        program = load_program(path, work, max_bytes=cap, max_ratio=100.0)
        times["check_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ir, tensors = graph_from_program(program, verify=False)
        times["convert_s"] = time.perf_counter() - t
        t = time.perf_counter()
        graph_from_program(program, verify=True)
        times["convert_verify_s"] = time.perf_counter() - t
    else:
        proto = check_onnx(path, max_bytes=cap)
        times["check_load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ir, tensors = graph_from_onnx(proto)
        times["convert_verify_s"] = time.perf_counter() - t
t = time.perf_counter()
model = import_graph(ir, tensors)
times["import_graph_s"] = time.perf_counter() - t
t = time.perf_counter()
save(model, out_dir / "phase.safetensors")
times["save_s"] = time.perf_counter() - t
t = time.perf_counter()
json.dumps(prunability_report(model), allow_nan=False)
times["report_s"] = time.perf_counter() - t
t = time.perf_counter()
canonical(graph_for(model.slimline_arch["graph"]))
times["graph_s"] = time.perf_counter() - t
(out_dir / "phase.safetensors").unlink()
print(json.dumps(times))
"""


def phases(path: Path, fmt: str, out_dir: Path) -> dict[str, float]:
    """`PHASES` in a fresh interpreter with the inspector's environment (no rlimits)."""
    _, env = inspector_command([])
    proc = subprocess.run([sys.executable, "-c", PHASES, str(path), fmt, str(out_dir)],
                          env=env, capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    times: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return times


def intake(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(args.workdir) / "intake"
    workdir.mkdir(parents=True, exist_ok=True)
    model = make("resnet18", in_channels=3, width=args.intake_width)
    example = example_input(2, (3, 32, 32))
    params = param_counts(model)["total"]
    files = {"pt2": workdir / "resnet18-50mb.pt2", "onnx": workdir / "resnet18-50mb.onnx"}
    t = time.perf_counter()
    export_pt2(model, files["pt2"], example)
    export_user_onnx(model, files["onnx"], example)
    print(f"intake: {params:,} params ({4 * params / 1e6:.1f} MB), exported in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for fmt, path in files.items():
        runs = [timed_inspection(path, fmt, workdir) for _ in range(args.intake_runs)]
        row = {"format": fmt, "file_bytes": path.stat().st_size, "weights_bytes": 4 * params,
               "params": params, "width": args.intake_width, "runs": runs,
               "phases": phases(path, fmt, workdir)}
        ok = [r for r in runs if r["ok"]]
        if ok:
            row |= {k: statistics.median(r[k] for r in ok)
                    for k in ("wall_s", "cpu_s", "peak_rss_mib")}
        rows.append(row)
        print(f"intake {fmt}: {json.dumps({k: v for k, v in row.items() if k != 'runs'})}",
              flush=True)
    return rows


# ---- tables -----------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def method_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | epochs | params (non-zero) | MACs (ratio) | test % "
             "(Δ vs dense same epochs, pt) | layers changed / untouched by the report | "
             "ONNX KiB | ORT b1 ms | ORT b256 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {r["model"]: r["test_accuracy"] for r in rows
           if r["method"] == "dense" and "+" in r["epochs"]}
    for r in rows:
        label = LABELS[r["model"]]
        if "error" in r:
            lines.append(f"| {label} | {r['method']} | – | failed: {r['error'][:120]} "
                         "| | | | | | |")
            continue
        macs = f"{r['macs'] / 1e6:.2f} M ({r['macs_ratio']:.2f})"
        if r.get("nnz_macs"):
            macs += f"; nnz {r['nnz_macs'] / r['dense_macs']:.2f}"
        acc = _pct(r["test_accuracy"])
        if r["method"] != "dense" or "+" not in r["epochs"]:
            acc += f" ({100 * (r['test_accuracy'] - ref[r['model']]):+.2f})"
        u = r.get("untouched")
        touched = "–" if r["method"] == "dense" else \
            f"{r['changed_layers']} / {u['layers'] if u else '–'} of {r['layers']}"
        lines.append(
            f"| {label} | {r['method']} | {r['epochs']} | {r['params']:,} ({r['nonzero']:,}) "
            f"| {macs} | {acc} | {touched} | {r['onnx_bytes'] / 1024:,.0f} "
            f"| {r['latency_b1_ms']:.3f} | {r['latency_b256_ms']:.1f} |")
    return "\n".join(lines)


def intake_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| upload | file MB | inspector wall s, median (min–max) | CPU s | peak RSS MiB "
             "| phases (one cold run), s |", "|---|---|---|---|---|---|"]
    for r in rows:
        walls = [x["wall_s"] for x in r["runs"] if x["ok"]]
        ph = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f}" for k, v in r["phases"].items())
        wall = (f"{r['wall_s']:.1f} ({min(walls):.1f}–{max(walls):.1f})" if walls
                else f"refused: {r['runs'][0].get('reply')}")
        lines.append(f"| .{r['format']} | {r['file_bytes'] / 1e6:.1f} | {wall} | "
                     f"{r.get('cpu_s', 0):.1f} | {r.get('peak_rss_mib', 0):,.0f} | {ph} |")
    return "\n".join(lines)


def tables(method_rows: list[dict[str, Any]], intake_rows: list[dict[str, Any]]) -> str:
    parts = []
    if method_rows:
        parts.append(method_table(method_rows))
    if intake_rows:
        parts.append(intake_table(intake_rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.summarize_only:
        print(json.loads(out.read_text())["table_md"])
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    method_rows: list[dict[str, Any]] = []
    intake_rows: list[dict[str, Any]] = []
    load = {"loadavg_start": os.getloadavg()}

    def save(complete: bool) -> str:
        meta = run_meta(args, complete=complete, runtime=time.perf_counter() - started,
                        onnxruntime=ort.__version__, loadavg_now=os.getloadavg(), **load,
                        git=_git_state())
        return dump_results(out, meta, None, method_rows, tables(method_rows, intake_rows),
                            intake=intake_rows)

    if not args.no_methods:
        splits, mean, std = prepared_splits(args)
        for name in args.archs:
            method_rows += run_arch(name, args, splits, mean, std)
            save(False)
    if not args.no_intake:
        intake_rows = intake(args)
    print(save(True))
    print(f"runtime {time.perf_counter() - started:.0f} s, load average {os.getloadavg()}")


def _git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              check=False).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": git("status", "--porcelain", "--untracked-files=no").splitlines()}


if __name__ == "__main__":
    main()
