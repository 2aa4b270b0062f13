"""The pruning steps' spec (`snip`, `random`, `magnitude`, `synflow`) and their curve records
(`pruning`, one per step)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from service.registry import MethodSpec, register_step


@register_step
class PruneStep(MethodSpec):
    """Pruning at initialization and its baselines (seed 004 ch. 3-4): one mask, kept through
    every later train step. `snip` scores |dL/dw * w| on labelled batches, `random` and
    `magnitude` (meant for a trained model) share its fields; `synflow` is data-free."""

    needs_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"pruning": "pruning"}

    op: Literal["snip", "random", "magnitude", "synflow"]
    sparsity: float = Field(gt=0, lt=1)
    scope: Literal["global", "layerwise"] = "global"
    # re-initialise before scoring: variance scaling (Glorot), or layerwise dynamical isometry
    # (orthogonal / delta-orthogonal); None keeps the model's weights
    init: Literal["variance_scaling", "ldi"] | None = None
    # data-free approximate-isometry repair of the pruned weights (mask fixed), thesis Eq. 4.8
    repair: Literal["ai"] | None = None
    # snip only: "uniform" = unsupervised SNIP (uniform target distribution)
    labels: Literal["true", "uniform"] = "true"
    batches: int = Field(default=1, ge=1, le=1000)  # snip: labelled batches, summed signed
    batch_size: int = Field(default=100, ge=1, le=65536)
    rounds: int = Field(default=100, ge=1, le=10_000)  # synflow iterations
    # a layer left with 0 weights fails the job before training unless this is true
    allow_collapse: bool = False

    @model_validator(mode="after")
    def _fields_of_the_op(self) -> PruneStep:
        # a stored spec has every default filled in: only a non-default value is an error
        def changed(*names: str) -> list[str]:
            fields = type(self).model_fields
            return [k for k in names if getattr(self, k) != fields[k].default]

        if self.op != "snip" and changed("batches", "labels"):
            raise ValueError(f"{', '.join(changed('batches', 'labels'))}: only used by op "
                             "'snip'")
        if self.op != "synflow" and changed("rounds"):
            raise ValueError("rounds: only used by op 'synflow'")
        return self
