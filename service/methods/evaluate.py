"""The `evaluate` step's spec: test and validation metrics of the current model."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.registry import MethodSpec, register_step


@register_step
class EvaluateStep(MethodSpec):
    op: Literal["evaluate"]
    batch_size: int = Field(default=1024, ge=1, le=65536)
