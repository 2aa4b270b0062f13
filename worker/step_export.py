"""The `export` step: the job's model written as ONNX (`core.export.export_onnx`, the
torch.export-based exporter) and/or `.pt2` (`core.export.export_pt2`), optionally an int8 ONNX
(`worker.onnx_tools`), every file verified against torch and timed with onnxruntime next to the
model the job started from. The model itself is not changed. The files become job artifacts
(kind "export") when the job succeeds; an ExportError fails the job with its message (naming
the layer or op) and no export is stored.

Verification (per file, `result.steps[i][fmt]`): logits of the file vs torch's on `samples`
inputs (the test split, topped up from the validation and training splits when it is smaller):
`max_abs_diff`, `max_abs_logit`, `relative_diff` = their ratio; fp32 files pass when
`relative_diff <= 1e-4`, int8 files when their top-1 agrees with torch's on >= 99 % of the
inputs. `verified: false` comes with a `reason`. `accuracy`: the file's on the whole test
split (the step's own `accuracy`, added by the runner, is torch's). Sizes: file bytes,
initializer bytes as written and after onnxruntime's basic optimisation (constant folding
would turn a factor pair's `U @ V` back into one dense matrix) next to the torch parameter
bytes. Latency: onnxruntime CPU, median of repeated runs after
warm-up at batch 1 and 256 with the worker's torch thread count, for the file and for the
job's start model (its input model, exported the same way), so `speedup_vs_start` stands next
to `macs_ratio`."""
from __future__ import annotations

import copy
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from core import export as exporter
from core import models as zoo
from core.data import ArrayDataset
from core.metrics import count_macs
from service.methods.export import ExportStep
from worker import onnx_tools
from worker.context import StepContext, calibration_set, dctps_layers
from worker.registry import handler

FP32_TOLERANCE = 1e-4  # max |Δlogit| / max |logit|
INT8_AGREEMENT = 0.99  # top-1 agreement with torch
LATENCY_BATCHES = (1, 256)
KIND = "export"


@handler(ExportStep)
def run_export(ctx: StepContext, step: ExportStep) -> dict[str, Any]:
    if ctx.workdir is None:
        raise RuntimeError("the export step needs the job's workdir (set by the runner)")
    outdir = ctx.workdir / "export"
    outdir.mkdir(parents=True, exist_ok=True)
    model = float_cpu_copy(ctx.model)  # ctx.model stays as it is
    threads = onnx_threads()
    inputs, source = verification_inputs(ctx, step.samples)
    test = ctx.splits.test
    with torch.no_grad():
        reference = torch_logits(model, inputs)
    path = outdir / "model.onnx"
    exported = None
    if "onnx" in step.formats and same_structure(ctx, model):
        ctx.reporter.progress(0.05, "export: ONNX")  # also the start model's file
        exported = exporter.export_onnx(model, ctx.input_shape, path, opset=step.opset)
    ctx.reporter.progress(0.1, "export: the start model's latency")
    start = start_model_latency(ctx, outdir / "start.onnx", step.opset, threads,
                                same_file=path if exported is not None else None)
    macs_ratio = count_macs(model, ctx.input_shape) / max(1, start["macs"])
    check = Check(inputs=inputs, reference=reference, test=test,
                  input_shape=ctx.input_shape, threads=threads, start=start,
                  macs_ratio=macs_ratio)
    details: dict[str, Any] = {
        "formats": list(step.formats), "quantize": step.quantize, "samples": len(inputs),
        "samples_from": source, "tolerance": {"fp32_relative": FP32_TOLERANCE,
                                              "int8_top1_agreement": INT8_AGREEMENT},
        "threads": threads, "machine": machine(threads), "start": start["about"],
        "macs_ratio": macs_ratio, "masks_note": masks_note(ctx)}
    if "onnx" in step.formats:
        ctx.reporter.progress(0.2, "export: ONNX")
        details["onnx"] = export_onnx_file(ctx, model, path, step.opset, check, exported)
        ctx.add_artifact(path.name, path, KIND)
        if step.quantize is not None:
            ctx.check_cancel()
            ctx.reporter.progress(0.5, f"export: {step.quantize}")
            int8 = outdir / "model.int8.onnx"
            if step.quantize == "int8_static":
                samples = calibration_set(ctx, step.calibration_samples).x.numpy()
                how = onnx_tools.quantize_int8_static(path, int8, samples)
            else:
                how = onnx_tools.quantize_int8_dynamic(path, int8)
            details["onnx_int8"] = {"quantization": how, **check.onnx(int8, int8=True)}
            details["onnx_int8"]["size_ratio_vs_fp32"] = \
                details["onnx"]["bytes"] / details["onnx_int8"]["bytes"]
            ctx.add_artifact(int8.name, int8, KIND)
    if "pt2" in step.formats:
        ctx.check_cancel()
        ctx.reporter.progress(0.8, "export: torch.export (.pt2)")
        path = outdir / "model.pt2"
        info = exporter.export_pt2(model, ctx.input_shape, path)
        details["pt2"] = {"file": path.name, "exporter": "torch.export", **info,
                          **check.pt2(path)}
        ctx.add_artifact(path.name, path, KIND)
    files = [details[k] for k in ("onnx", "onnx_int8", "pt2") if k in details]
    details["verified"] = all(f["verified"] for f in files)
    return details


def export_onnx_file(ctx: StepContext, model: nn.Module, path: Path, opset: int,
                     check: Check, exported: dict[str, Any] | None) -> dict[str, Any]:
    """`model.onnx` (`exported`: already written); with DCTpS layers both forms are exported
    and measured (D as a dense weight, or kept implicit), the one with the lower latency at
    batch 256 is shipped and the other reported under `dctps_alternative`."""
    if not dctps_layers(model):
        info = exported or exporter.export_onnx(model, ctx.input_shape, path, opset=opset)
        return {"file": path.name, **info, **check.onnx(path)}
    records = {}
    for mode in ("dense", "implicit"):
        candidate = path.with_name(f"model.{mode}.onnx")
        info = exporter.export_onnx(model, ctx.input_shape, candidate, opset=opset, dctps=mode)
        records[mode] = {"file": path.name, **info, **check.onnx(candidate)}
    best = min(records, key=lambda m: records[m]["latency_ms"]["batch_256"])
    other = "implicit" if best == "dense" else "dense"
    path.with_name(f"model.{best}.onnx").replace(path)
    path.with_name(f"model.{other}.onnx").unlink()
    alternative = {k: v for k, v in records[other].items() if k != "file"}
    return records[best] | {"dctps_choice": "the form with the lower onnxruntime latency at "
                                            "batch 256", "dctps_alternative": alternative}


class Check:
    """Verification and timing of exported files against the torch model's logits."""

    def __init__(self, *, inputs: np.ndarray, reference: np.ndarray, test: ArrayDataset,
                 input_shape: list[int], threads: int,
                 start: dict[str, Any], macs_ratio: float) -> None:
        self.inputs, self.reference, self.test = inputs, reference, test
        self.input_shape, self.threads = input_shape, threads
        self.start, self.macs_ratio = start, macs_ratio

    def onnx(self, path: Path, *, int8: bool = False) -> dict[str, Any]:
        session = onnx_tools.ort_session(path, self.threads)
        logits = onnx_tools.ort_logits(session, self.inputs)
        record = {"bytes": path.stat().st_size,
                  "file_opset": file_opset(path),
                  "initializer_bytes": onnx_tools.initializer_bytes(path),
                  "optimized_initializer_bytes": onnx_tools.optimized_initializer_bytes(path),
                  **self.compare(logits, int8=int8),
                  "accuracy": onnx_tools.ort_accuracy(session, self.test.x.numpy(),
                                                      self.test.y.numpy())}
        latency = {f"batch_{b}": onnx_tools.ort_latency_ms(
            path, self.input_shape, b, self.threads, session=session) for b in LATENCY_BATCHES}
        start = self.start["latency_ms"]
        record |= {"latency_ms": latency, "start_latency_ms": start,
                   "speedup_vs_start": {k: start[k] / latency[k] for k in latency},
                   "macs_ratio": self.macs_ratio}
        return record

    def pt2(self, path: Path) -> dict[str, Any]:
        program = torch.export.load(str(path)).module()
        with torch.no_grad():
            logits = torch_logits(program, self.inputs)
            test_logits = torch_logits(program, self.test.x)
        return {**self.compare(logits, int8=False),
                "accuracy": accuracy(test_logits, self.test.y.numpy())}

    def compare(self, logits: np.ndarray, *, int8: bool) -> dict[str, Any]:
        ref = self.reference
        if logits.shape != ref.shape:
            return {"verified": False, "reason": f"the file's logits have shape "
                    f"{list(logits.shape)}, torch's {list(ref.shape)}"}
        diff = float(np.abs(logits.astype(np.float64) - ref).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        agreement = float((logits.argmax(1) == ref.argmax(1)).mean()) if ref.size else 1.0
        relative = diff / scale if scale > 0 else diff
        record = {"max_abs_diff": diff, "max_abs_logit": scale, "relative_diff": relative,
                  "top1_agreement": agreement}
        if int8:
            ok = agreement >= INT8_AGREEMENT
            why = (f"top-1 agrees with torch on {agreement:.2%} of the inputs, below "
                   f"{INT8_AGREEMENT:.0%}")
        else:
            ok = bool(np.isfinite(relative)) and relative <= FP32_TOLERANCE
            why = (f"max |logit difference| {diff:.3g} is {relative:.3g} of the largest |logit| "
                   f"{scale:.3g}, above {FP32_TOLERANCE:g}")
        return record | {"verified": ok, "reason": None if ok else why}


def onnx_threads() -> int:
    """The threads an onnxruntime session of a step gets (intra-op; its latency is measured on
    them): the worker's torch thread count — `SLIMLINE_WORKER_THREADS`, else this process's
    share of the CPUs (`worker.celery_app.torch_threads`) — so a job never times on more cores
    than it trains on."""
    return max(1, torch.get_num_threads())


def float_cpu_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of `model` in eval mode (what is exported; the job's model stays as
    it is, on its device and in its mode)."""
    return copy.deepcopy(model).cpu().float().eval()


def verification_inputs(ctx: StepContext, samples: int) -> tuple[np.ndarray, dict[str, int]]:
    """`samples` inputs: the test split first, then the validation and training splits when
    the test split is smaller (a numerical check needs many inputs, not unseen ones)."""
    parts, taken = [], {}
    need = samples
    for name in ("test", "val", "train"):
        x = getattr(ctx.splits, name).x[:need]
        if len(x):
            parts.append(x)
            taken[name] = len(x)
            need -= len(x)
        if need <= 0:
            break
    return torch.cat(parts).numpy(), taken


def torch_logits(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 256
                 ) -> np.ndarray:
    x = torch.as_tensor(x, dtype=torch.float32)
    parts = [model(x[i:i + batch_size]).double().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def same_structure(ctx: StepContext, model: nn.Module) -> bool:
    """The job's model has the architecture it started with (e.g. only trained or pruned)."""
    return ctx.start_arch is None or (ctx.start_arch == zoo.model_arch(model)
                                      and not dctps_layers(model))


def start_model_latency(ctx: StepContext, path: Path, opset: int, threads: int, *,
                        same_file: Path | None = None) -> dict[str, Any]:
    """The model the job started from (its input model: for a job on a compressed model that
    model, not a dense one), rebuilt from its arch — latency does not depend on the weights'
    values — exported like the job's model and timed the same way in a session of its own;
    `same_file`: the job's model file, when the architecture did not change. Not kept."""
    arch = ctx.start_arch or zoo.model_arch(ctx.model)
    start = zoo.build(arch, generator=torch.Generator().manual_seed(0)).float().eval()
    if same_file is None:
        exporter.export_onnx(start, ctx.input_shape, path, opset=opset)
    timed = same_file or path
    session = onnx_tools.ort_session(timed, threads)
    latency = {f"batch_{b}": onnx_tools.ort_latency_ms(timed, ctx.input_shape, b, threads,
                                                       session=session)
               for b in LATENCY_BATCHES}
    if same_file is None:
        path.unlink()
    edits = [e["op"] for e in arch.get("edits", [])]
    about = {"arch": arch["name"], "edits": edits, "compressed": bool(edits),
             "timed_file": "model.onnx (same architecture)" if same_file else "its own export",
             "what": ("the job's input model: dense" if not edits else
                      "the job's input model, already compressed (edits "
                      f"{', '.join(dict.fromkeys(edits))}): speed-ups are relative to it, "
                      "not to a dense model"),
             "latency_ms": latency}
    return {"about": about, "latency_ms": latency, "macs": count_macs(start, ctx.input_shape)}


def masks_note(ctx: StepContext) -> str | None:
    if not ctx.masks:
        return None
    return (f"pruning masks of {len(ctx.masks)} layer(s) export as dense weights holding zeros: "
            "the files are as large and as fast as the dense model's (onnxruntime has no "
            "sparse kernels for them)")


def file_opset(path: Path) -> int | None:
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")),
                None)


def machine(threads: int) -> dict[str, Any]:
    return {"processor": platform.processor() or platform.machine(), "node": platform.node(),
            "platform": platform.platform(), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "provider": onnx_tools.PROVIDERS[0],
            "threads": threads, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())}
