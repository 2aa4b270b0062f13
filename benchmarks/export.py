"""Deployment figures: ONNX bytes and onnxruntime latency of every method against dense
(issue 13), fp32 and int8, with the ratio `latency saving / MACs saving`.

Run from the repository root:

    .venv/bin/python -m benchmarks.export --threads 2

Per model (`benchmarks.export_setups` has the models and each method's setting): a short dense
training (`--epochs` on the first `--train-subset` images; accuracy is not the point: it only
gives the data-dependent methods realistic weights; 0 skips it), every method applied with
core's functions, no fine-tuning. Each model is exported with `core.export.export_onnx`
(dynamo exporter, opset 18) and quantized to int8 with onnxruntime's static QDQ quantization
(`worker.onnx_tools.quantize_int8_static`, min-max calibration on `--calib` training images).
Latency: onnxruntime CPU, ORT_ENABLE_ALL, `--threads` intra-op threads, one inter-op thread;
median of `--repeats-b1` (batch 1) / `--repeats-b256` (batch 256) runs after 3 warm-up runs, all
files of one model timed in turns so the machine's load hits them alike. Rows whose latency
saving is below `--profile-below` of their MACs saving (and dense) are profiled per op
(`SessionOptions.enable_profiling`, kernel time summed by op type, batch 256, fp32).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import dump_results, run_meta
from benchmarks.export_setups import (
    INPUT_SHAPE,
    LABELS,
    METHODS,
    MODELS,
    STRUCTURED,
    build_method,
    nnz_macs,
)
from core import data, metrics, models
from core.export import export_onnx
from core.train import TrainConfig, train
from worker.onnx_tools import ort_session, quantize_int8_static

WARMUP = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--test-subset", type=int, default=512)
    p.add_argument("--repeats-b1", type=int, default=200)
    p.add_argument("--repeats-b256", type=int, default=40)
    p.add_argument("--lowrank-samples", type=int, default=32,
                   help="calibration images of the low-rank output-perturbation scores")
    p.add_argument("--budget-b1", type=float, default=20.0,
                   help="about this many seconds of batch-1 timing per model")
    p.add_argument("--budget-b256", type=float, default=60.0,
                   help="about this many seconds of batch-256 timing per model")
    p.add_argument("--implicit-models", nargs="*", default=["lenet300", "lenet5"],
                   help="models whose DCTpS is also exported with D implicit (fp32 only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--profile-below", type=float, default=0.8)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--workdir", default="benchmarks/out/export")
    p.add_argument("--out", default="benchmarks/out/export.json")
    return p.parse_args(argv)


def round_robin(sessions: list[ort.InferenceSession], x: np.ndarray, repeats: int,
                budget_s: float) -> tuple[list[float], int]:
    """Median ms per run of each session on `x`, timed in turns after WARMUP turns; at most
    `repeats` turns and about `budget_s` seconds (at least 3 turns). Returns (ms, turns)."""
    names = [s.get_inputs()[0].name for s in sessions]

    def turn() -> list[float]:
        ms = []
        for session, name in zip(sessions, names, strict=True):
            start = time.perf_counter()
            session.run(None, {name: x})
            ms.append(1000 * (time.perf_counter() - start))
        return ms

    for _ in range(WARMUP - 1):
        turn()
    last = sum(turn()) / 1000
    turns = max(3, min(repeats, int(budget_s / max(last, 1e-6))))
    times = [turn() for _ in range(turns)]
    return [statistics.median(t[i] for t in times) for i in range(len(sessions))], turns


def top1(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 256]})[0].argmax(1)
                           for i in range(0, len(x), 256)])


def op_profile(path: Path, x: np.ndarray, threads: int, runs: int = 3) -> dict[str, float]:
    """Kernel ms per run summed by op type (onnxruntime's profiler, after one warm-up run)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix("")) + "-profile"
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(runs + 1):
        session.run(None, {name: x})
    trace = Path(session.end_profiling())
    by_op: dict[str, float] = {}
    runs_seen = 0
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs_seen += 1
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            if "_nchwc" in event["name"]:  # ORT's blocked-layout (NCHWc) kernels
                op += " NCHWc"
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1000.0
    trace.unlink()
    n = max(runs_seen, 1)
    return {op: ms / n for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])}


def export_variants(name: str, method: str, net: torch.nn.Module, workdir: Path,
                    calib: np.ndarray, int8: bool, implicit: bool) -> list[dict[str, Any]]:
    """The files of one compressed model: fp32 and int8 static (DCTpS: dense-equivalent, and
    with `implicit` also D implicit, fp32 only); one row per file."""
    rows = []
    forms = [("dense", method)]
    if method == "dctps" and implicit:
        forms.append(("implicit", "dctps-implicit"))
    for dctps, label in forms:
        path = workdir / f"{name}-{label}.onnx"
        info = export_onnx(net, INPUT_SHAPE, path, dctps=dctps)
        rows.append({"method": label, "precision": "fp32", "path": str(path),
                     "onnx_bytes": info["bytes"], "param_bytes": info["param_bytes"]})
        if int8 and dctps == "dense":
            qpath = workdir / f"{name}-{label}.int8.onnx"
            try:
                quantize_int8_static(path, qpath, calib)
                rows.append({"method": label, "precision": "int8", "path": str(qpath),
                             "onnx_bytes": qpath.stat().st_size})
            except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
                rows.append({"method": label, "precision": "int8", "path": None,
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def run_model(name: str, args: argparse.Namespace, splits: data.Splits) -> list[dict[str, Any]]:
    started = time.perf_counter()
    dense = models.build(MODELS[name], generator=torch.Generator().manual_seed(0))
    if args.epochs:
        train(dense, splits, TrainConfig(epochs=args.epochs, optimizer="adam", lr=1e-3,
                                         batch_size=60), generator=torch.Generator().manual_seed(0))
    dense.eval()
    train_s = time.perf_counter() - started
    calib = splits.train.subset(torch.arange(min(args.calib, len(splits.train))))
    calib_np = calib.x.numpy()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dense_macs = metrics.count_macs(dense, INPUT_SHAPE)
    rows: list[dict[str, Any]] = []
    for method in ("dense", *args.methods):
        t = time.perf_counter()
        net, what = (dense, {}) if method == "dense" else build_method(
            method, name, dense, calib, lowrank_samples=args.lowrank_samples)
        build_s = time.perf_counter() - t
        macs = metrics.count_macs(net, INPUT_SHAPE)
        common = {"model": name, "setting": what, "macs": macs, "macs_ratio": macs / dense_macs,
                  "nnz_macs_ratio": nnz_macs(net) / nnz_macs(dense) if method == "snip" else None,
                  "params": metrics.param_counts(net)["total"], "build_s": build_s}
        for row in export_variants(name, method, net, workdir, calib_np, not args.no_int8,
                                   name in args.implicit_models):
            rows.append(common | row)
        print(f"{name} {method}: {what} MACs {macs / dense_macs:.3f} ({build_s:.1f} s)",
              flush=True)
    live = [r for r in rows if r.get("path")]
    sessions = [ort_session(r["path"], args.threads) for r in live]
    test_x = splits.test.x[:args.test_subset].numpy()
    labels = splits.test.y[:args.test_subset].numpy()
    fp32_pred: dict[str, np.ndarray] = {}
    for r, s in zip(live, sessions, strict=True):
        pred = top1(s, test_x)
        r["accuracy"] = float((pred == labels).mean())
        if r["precision"] == "fp32":
            fp32_pred[r["method"]] = pred
        else:
            r["agreement_fp32"] = float((pred == fp32_pred[r["method"]]).mean())
    for b, batch, repeats, budget in (("b1", 1, args.repeats_b1, args.budget_b1),
                                      ("b256", 256, args.repeats_b256, args.budget_b256)):
        x = np.ascontiguousarray(splits.test.x[:batch].numpy())
        times, turns = round_robin(sessions, x, repeats, budget)
        for r, ms in zip(live, times, strict=True):
            r[f"latency_{b}_ms"], r[f"repeats_{b}"] = ms, turns
    del sessions
    derive(rows)
    x = np.ascontiguousarray(splits.test.x[:256].numpy())
    for r in live:
        if r["precision"] == "fp32" and (r["method"] == "dense" or (
                r["method"] in STRUCTURED and name not in ("lenet300",)
                and (r.get("efficiency_b256") or 0) < args.profile_below)):
            r["profile_b256_ms"] = op_profile(Path(r["path"]), x, args.threads)
    print(f"{name}: {time.perf_counter() - started:.0f} s (training {train_s:.0f} s)",
          flush=True)
    return rows


def derive(rows: list[dict[str, Any]]) -> None:
    """Speed-up against the dense file of the same precision, and latency saving / MACs saving
    (saving = 1 - ratio; MACs: non-zero MACs for masked models)."""
    dense = {r["precision"]: r for r in rows if r["method"] == "dense" and r.get("path")}
    for r in rows:
        ref = dense.get(r["precision"])
        for b in ("b1", "b256"):
            ms = r.get(f"latency_{b}_ms")
            if ms is None or ref is None:
                continue
            r[f"speedup_{b}"] = ref[f"latency_{b}_ms"] / ms
            macs_saving = 1.0 - (r["nnz_macs_ratio"] if r["nnz_macs_ratio"] is not None
                                 else r["macs_ratio"])
            lat_saving = 1.0 - ms / ref[f"latency_{b}_ms"]
            r[f"efficiency_{b}"] = lat_saving / macs_saving if macs_saving > 1e-9 else None


def _f(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per model and method: fp32 / int8 side by side."""
    lines = ["| model | method | MACs ratio | ONNX KiB fp32 / int8 | b1 ms fp32 / int8 "
             "| b256 ms fp32 / int8 | speed-up b1, b256 fp32 (int8) "
             "| lat. saving / MACs saving b1, b256 fp32 (int8) | top-1 % fp32 (int8 = fp32) |",
             "|---|---|---|---|---|---|---|---|---|"]
    pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["method"]), {})[r["precision"]] = r
    for (model, method), by in pairs.items():
        f, q = by["fp32"], by.get("int8", {})
        macs = f"{f['macs_ratio']:.3f}"
        if f["nnz_macs_ratio"] is not None:
            macs += f" (nnz {f['nnz_macs_ratio']:.3f})"
        kb = f"{f['onnx_bytes'] / 1024:,.0f} / " + (
            f"{q['onnx_bytes'] / 1024:,.0f}" if q.get("onnx_bytes") else
            ("failed" if q.get("error") else "–"))
        lines.append(
            f"| {LABELS[model]} | {method} | {macs} | {kb} | "
            f"{_f(f.get('latency_b1_ms'), '.3f')} / {_f(q.get('latency_b1_ms'), '.3f')} | "
            f"{_f(f.get('latency_b256_ms'), '.1f')} / {_f(q.get('latency_b256_ms'), '.1f')} | "
            f"{_f(f.get('speedup_b1'), '.2f', 'x')}, {_f(f.get('speedup_b256'), '.2f', 'x')} "
            f"({_f(q.get('speedup_b256'), '.2f', 'x')}) | "
            f"{_f(f.get('efficiency_b1'), '.2f')}, {_f(f.get('efficiency_b256'), '.2f')} "
            f"({_f(q.get('efficiency_b256'), '.2f')}) | "
            f"{_f(f.get('accuracy'), '.1%')} ({_f(q.get('agreement_fp32'), '.1%')}) |")
    return "\n".join(lines)


def profile_table(rows: list[dict[str, Any]], top: int = 4) -> str:
    """Per profiled file: kernel ms per op type at batch 256 (the `top` largest), against
    dense."""
    lines = ["| model | method | b256 kernel ms by op type (dense in brackets) |", "|---|---|---|"]
    dense = {r["model"]: r.get("profile_b256_ms", {}) for r in rows
             if r["method"] == "dense" and r["precision"] == "fp32"}
    for r in rows:
        prof = r.get("profile_b256_ms")
        if not prof or r["method"] == "dense":
            continue
        ref = dense.get(r["model"], {})
        cells = ", ".join(f"{op} {ms:.1f} ({ref.get(op, 0.0):.1f})"
                          for op, ms in list(prof.items())[:top])
        missing = [f"{op} – ({ms:.1f})" for op, ms in ref.items() if op not in prof][:2]
        lines.append(f"| {LABELS[r['model']]} | {r['method']} | "
                     f"{', '.join([cells, *missing])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_set, test_set = data.fashion_mnist(args.data_dir)
    splits = data.split(train_set, test_set, 0)
    splits = data.Splits(splits.train.subset(torch.arange(args.train_subset)),
                         splits.val.subset(torch.arange(500)), splits.test)
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    for name in args.models:
        rows += run_model(name, args, splits)
        text = table(rows) + "\n\n" + profile_table(rows)
        dump_results(out, run_meta(args, complete=name == args.models[-1],
                                   runtime=time.perf_counter() - started,
                                   onnxruntime=ort.__version__), None, rows, text)
    print(text)
    print(f"runtime {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
