"""The `export` step's spec: the job's model written as ONNX and/or a torch.export `.pt2`
(optionally an int8 ONNX next to the fp32 one), each file verified against torch and timed
with onnxruntime."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from service.registry import MethodSpec, distinct, register_step

# The opsets the torch.onnx (dynamo) exporter writes as asked (below 15 it silently writes 18)
# and onnxruntime 1.32 runs and quantizes; checked by tests/worker/test_export_steps.py.
MIN_OPSET, MAX_OPSET = 16, 23
MIN_VERIFY_SAMPLES = 256


@register_step
class ExportStep(MethodSpec):
    """Export the job's model: `onnx` through torch.onnx's torch.export-based exporter (opset
    `opset`, dynamic batch; input "input", output "logits"), `pt2` through torch.export +
    torch.export.save. Compressed layers stay compressed in the file (factor pairs as two
    ops, PCN projections as Sub+MatMul); pruning masks export as dense weights holding zeros,
    which saves nothing at run time. `quantize` adds `model.int8.onnx`: `int8_dynamic` (int8
    weights, activations quantized at run time; no data) or `int8_static` (QDQ, activations
    calibrated on `calibration_samples` training images). Every file is checked against torch
    on `samples` test images (max |logit difference|, test accuracy) and its onnxruntime
    latency is measured next to that of the model the job started from. It must be the job's
    last step (the files are the job's final model) and it does not change the model."""

    op: Literal["export"]
    formats: Annotated[list[Literal["onnx", "pt2"]], Field(min_length=1, max_length=2)] = \
        ["onnx", "pt2"]
    quantize: Literal["int8_dynamic", "int8_static"] | None = None
    opset: int = Field(default=18, ge=MIN_OPSET, le=MAX_OPSET)
    samples: int = Field(default=MIN_VERIFY_SAMPLES, ge=MIN_VERIFY_SAMPLES, le=100_000)
    calibration_samples: int = Field(default=256, ge=1, le=100_000)  # int8_static only

    _distinct_formats = field_validator("formats")(distinct("a format"))

    @model_validator(mode="after")
    def _fields_that_apply(self) -> ExportStep:
        if self.quantize is not None and "onnx" not in self.formats:
            raise ValueError(f"quantize: {self.quantize!r} quantizes the ONNX file; add "
                             "'onnx' to formats")
        # a stored spec has every default filled in: only a non-default value is an error
        if self.quantize != "int8_static" and \
                self.calibration_samples != type(self).model_fields["calibration_samples"].default:
            raise ValueError("calibration_samples: only used with quantize 'int8_static' "
                             "(int8_dynamic needs no data)")
        return self

    def job_rule(self, steps: Sequence[MethodSpec], index: int) -> str | None:
        if index != len(steps) - 1:
            return (f"steps[{index}]: export must be the job's last step (its files are the "
                    "job's final model); move it to the end, or export in a job of its own on "
                    "the model this job produces")
        return None
