"""The `measure` step's spec: what the job's model costs and scores now, without changing it —
validation accuracy, every budget kind (`core.budget`), and optionally its onnxruntime latency,
its ONNX file's bytes (fp32, or int8_dynamic) and what each method could still change."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.registry import MethodSpec, register_step

MAX_LATENCY_BATCH = 65536  # as a train or evaluate batch (and the auto step's latency batch)


@register_step
class MeasureStep(MethodSpec):
    """Measure the job's model: `val_accuracy` (torch on the validation split, or the int8 ONNX
    file's with onnxruntime when `quantize` is set) and `cost` = every `core.budget` kind
    (total_params, nonzero_params, trainable_params, macs), plus `latency_ms` (onnxruntime CPU
    on the exported ONNX at batch `latency_batch_size`, as the export step times files) and
    `bytes` (the exported ONNX file's size; the int8 file's with `quantize`). The ONNX file is
    exported once and not kept. `report` adds `applies`: how many layers (pcn, lowrank, snip,
    dctps) or unit groups (pcn_output, channel_prune) each method could change. Allowed anywhere
    in a job (also after dctps: it reads no dense weights); the model is not changed."""

    op: Literal["measure"]
    latency_batch_size: int | None = Field(default=None, ge=1, le=MAX_LATENCY_BATCH)
    bytes: bool = False
    quantize: Literal["int8_dynamic"] | None = None
    report: bool = False
