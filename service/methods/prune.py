"""The pruning steps' spec (`snip`, `random`, `magnitude`, `synflow`) and their curve records
(`pruning`, one per step)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from service.registry import MethodSpec, Strict, register_step


class PruneTarget(Strict):
    """An absolute budget of the whole model's non-zero parameters (`core.budget`'s
    `nonzero_params`: what a sparse file stores): the sparsity is chosen so the masked model
    has at most this many (biases, normalisation and unmasked layers count as they are)."""

    nonzero_params: int = Field(ge=1, le=10**12)

    @model_validator(mode="before")
    @classmethod
    def _only_nonzero(cls, data: Any) -> Any:
        dense = [k for k in ("total_params", "trainable_params", "macs")
                 if isinstance(data, dict) and k in data]
        if dense:
            raise ValueError(f"{', '.join(dense)}: not reduced by masks (a masked weight is "
                             "still stored, trained and multiplied densely); a pruning target "
                             "is {'nonzero_params': n}; channel_prune or lowrank meet the "
                             "other budgets")
        return data


@register_step
class PruneStep(MethodSpec):
    """Pruning at initialization and its baselines (seed 004 ch. 3-4): one mask, kept through
    every later train step. `snip` scores |dL/dw * w| on labelled batches, `random` and
    `magnitude` (meant for a trained model) share its fields; `synflow` is data-free.
    Exactly one of `sparsity` (the fraction of the Linear/Conv2d weights masked) and `target`
    (`{"nonzero_params": n}`: the sparsity that leaves the whole model at most n non-zero
    parameters)."""

    needs_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"pruning": "pruning"}

    op: Literal["snip", "random", "magnitude", "synflow"]
    target: PruneTarget | None = None  # before sparsity: its check below reads it
    sparsity: float | None = Field(default=None, gt=0, lt=1, validate_default=True)
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

    @field_validator("sparsity")
    @classmethod
    def _sparsity_or_target(cls, value: float | None, info: ValidationInfo) -> float | None:
        if "target" not in info.data:
            return value  # the target itself is invalid: that error is reported
        if (value is None) == (info.data["target"] is None):
            raise ValueError("give exactly one of sparsity (the fraction of the weights "
                             "masked) and target ({'nonzero_params': n}); got "
                             + ("both" if value is not None else "neither"))
        return value

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
