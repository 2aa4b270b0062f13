"""The `measure` step: what the job's model costs and scores now; the model is not changed.

* `val_accuracy`: torch on the validation split; with `quantize: "int8_dynamic"` the int8 ONNX
  file's, run with onnxruntime on the same split (the torch value is then `fp32_val_accuracy`).
* `cost`: every `core.budget` kind (`costs(model, input_shape)`), plus `latency_ms` (with
  `latency_batch_size`) and `bytes` (with `bytes`).
* The ONNX file (when latency, bytes or quantize asks for one) is exported once, as the export
  step exports it (`core.export.export_onnx`, the export step's default opset; DCTpS layers in
  their dense form, what `total_params` counts), int8-quantized with
  `worker.onnx_tools.quantize_int8_dynamic` when asked, timed with `onnx_tools.ort_latency_ms`
  (median after warm-up; CPU; `worker.step_export.onnx_threads` intra-op threads) in the one
  session that also scores the int8 file, and deleted when the step ends (no artifact).
  Pruning masks export as dense zeros (`masks_note`).
* `machine`: `worker.step_export.machine(threads)`, where latency is measured.
* `applies` (with `report`): from `core.prunability.prunability_report` — per layer method
  (pcn, lowrank, snip: every pruning op, dctps) the layers it can change, per unit method
  (pcn_output, channel_prune) the unit groups it can prune; `floors` (with `report`): per
  method whose smallest model follows from shapes alone (pcn without output pruning), that
  model's cost of every budget kind it follows for (not `nonzero_params`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from core import export as exporter
from core.budget import costs
from core.errors import SpecError
from core.pcn_budget import SHAPE_KINDS, pcn_minimum
from core.prunability import prunability_report
from core.train import evaluate
from service.methods.export import ExportStep
from service.methods.measure import MeasureStep
from worker import onnx_tools
from worker.context import StepContext, dctps_layers
from worker.registry import handler
from worker.step_export import float_cpu_copy, machine, masks_note, onnx_threads

# what `applies` counts for each method: the layers it transforms, or the unit groups it prunes
APPLIES_COUNTS = {"pcn": "layers", "pcn_output": "unit_groups", "lowrank": "layers",
                  "channel_prune": "unit_groups", "snip": "layers", "dctps": "layers"}
OPSET = ExportStep.model_fields["opset"].default


@handler(MeasureStep)
def run_measure(ctx: StepContext, step: MeasureStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "measure: cost")
    cost: dict[str, Any] = dict(costs(ctx.model, ctx.input_shape))
    val = ctx.splits.val
    fp32_accuracy = evaluate(ctx.model, val, device=ctx.device)["accuracy"]
    threads = onnx_threads()
    result: dict[str, Any] = {"val_accuracy": fp32_accuracy, "cost": cost,
                              "quantize": step.quantize}
    if step.latency_batch_size is not None or step.bytes or step.quantize is not None:
        ctx.check_cancel()
        with tempfile.TemporaryDirectory(prefix=f"measure-{ctx.step_index}-",
                                         dir=ctx.workdir) as tmp:
            result |= _measure_file(ctx, step, Path(tmp), threads, cost)
        if step.quantize is not None:
            result["fp32_val_accuracy"] = fp32_accuracy
    result["machine"] = machine(threads)
    if step.report:
        ctx.check_cancel()
        ctx.reporter.progress(0.9, "measure: what each method can change")
        result["applies"] = applies(prunability_report(ctx.model, ctx.input_shape))
        result["applies_counts"] = dict(APPLIES_COUNTS)
        result["floors"] = floors(ctx, result["applies"])
    return result


def applies(report: dict[str, Any]) -> dict[str, int]:
    """{method: how many layers (layer methods) or unit groups (pcn_output, channel_prune) it
    can change}, from a prunability report; a group counts when a layer whose units it holds
    lists the method (the layer rule and the group's own both allow it)."""
    counts = {}
    for op, what in APPLIES_COUNTS.items():
        rows = [r for r in report["layers"] if op in r["methods"]]
        counts[op] = len(rows) if what == "layers" else \
            len({r["group"] for r in rows if r["group"] is not None})
    return counts


def floors(ctx: StepContext, applies_to: dict[str, int]) -> dict[str, dict[str, int]]:
    """{method: {kind: the smallest cost it can build}} for the methods whose floor follows
    from the model's shapes: pcn without output pruning (`core.pcn_budget.pcn_minimum`, its
    automatic layer choice). The auto search plans with these."""
    if not applies_to.get("pcn"):
        return {}
    found = {}
    for kind in SHAPE_KINDS:
        try:
            found[kind] = pcn_minimum(ctx.model, kind, input_shape=ctx.input_shape)
        except SpecError:  # no layer the automatic choice takes, or no input shape for macs
            continue
    return {"pcn": found} if found else {}


def _measure_file(ctx: StepContext, step: MeasureStep, tmp: Path, threads: int,
                  cost: dict[str, Any]) -> dict[str, Any]:
    """Export (and quantize) once; the int8 file's validation accuracy, the file's latency and
    bytes from it. Returns the result's entries (`cost` is completed in place)."""
    ctx.reporter.progress(0.1, "measure: ONNX export")
    start = time.perf_counter()
    path = tmp / "model.onnx"
    exporter.export_onnx(float_cpu_copy(ctx.model), ctx.input_shape, path, opset=OPSET)
    onnx: dict[str, Any] = {"opset": OPSET, "fp32_bytes": path.stat().st_size,
                            "export_s": time.perf_counter() - start,
                            "dctps": "dense" if dctps_layers(ctx.model) else None}
    out: dict[str, Any] = {"onnx": onnx, "masks_note": masks_note(ctx)}
    timed = path
    session = None
    if step.quantize is not None:
        ctx.check_cancel()
        ctx.reporter.progress(0.4, f"measure: {step.quantize}")
        start = time.perf_counter()
        timed = tmp / "model.int8.onnx"
        onnx["quantization"] = onnx_tools.quantize_int8_dynamic(path, timed)
        onnx["int8_bytes"] = timed.stat().st_size
        onnx["quantize_s"] = time.perf_counter() - start
        ctx.reporter.progress(0.5, "measure: int8 validation accuracy")
        session = onnx_tools.ort_session(timed, threads)
        val = ctx.splits.val
        out["val_accuracy"] = onnx_tools.ort_accuracy(session, val.x.numpy(), val.y.numpy())
    onnx["file"] = timed.name
    if step.latency_batch_size is not None:
        ctx.check_cancel()
        batch = step.latency_batch_size
        ctx.reporter.progress(0.6, f"measure: onnxruntime latency at batch {batch}")
        session = session or onnx_tools.ort_session(timed, threads)
        ms = onnx_tools.ort_latency_ms(timed, ctx.input_shape, batch, threads, session=session)
        cost["latency_ms"] = ms
        out["latency"] = {"batch_size": batch, "threads": threads, "ms": ms,
                          "file": timed.name, "runtime": "onnxruntime",
                          "provider": onnx_tools.PROVIDERS[0],
                          "statistic": "median of repeated runs after warm-up"}
    if step.bytes:
        cost["bytes"] = timed.stat().st_size
    return out
