"""The `channel_prune` step's spec (structured pruning of whole units) and its curve records
(`channel_pruning`, one per step: kept / total units per group)."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from service.registry import LayerList, MethodSpec, Strict, distinct, register_step

# an absolute whole-model budget (core.budget's kinds): a count of parameters or of MACs
BudgetCount = Annotated[int, Field(ge=1, le=10**12)]
BUDGET_KINDS = ("total_params", "nonzero_params", "trainable_params", "macs")


class ChannelPruneTarget(Strict):
    """Exactly one: the whole model's parameters after / before (`param_ratio`) or its
    multiply-accumulates per sample after / before (`mac_ratio`), in (0, 1]; or an absolute
    budget of the whole model: `total_params` (every stored value of the dense-format model),
    `nonzero_params`, `trainable_params` or `macs` (per sample). The pruned model lands at or
    just below it (an absolute budget's measured value is in the step's `budget`)."""

    param_ratio: float | None = Field(default=None, gt=0, le=1)
    mac_ratio: float | None = Field(default=None, gt=0, le=1)
    total_params: BudgetCount | None = None
    nonzero_params: BudgetCount | None = None
    trainable_params: BudgetCount | None = None
    macs: BudgetCount | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ChannelPruneTarget:
        kinds = ("param_ratio", "mac_ratio", *BUDGET_KINDS)
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a target is exactly one of {', '.join(kinds)}; got "
                             f"{given or 'none'}")
        return self


@register_step
class ChannelPruneStep(MethodSpec):
    """Structured channel pruning: whole output units / channels are removed, so the model is
    physically narrower and faster. Units are scored by `l1` (the L1 norm of the weights that
    produce them, scaled by their BatchNorm) or `taylor` (|activation x gradient| on `samples`
    training images) and removed per coupled group (a layer's units with the next layer's
    inputs; a ResNet stage's residual stream with every layer that adds to or reads it) until
    the target is met. `scope` global ranks every group on one scale, layerwise shrinks every
    group by the same fraction; `round_to` keeps unit counts a multiple of 8 or 16; `layers`
    names unit groups (a layer name, `stage2` for a residual stream) or null for all."""

    needs_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"channel_prune": "channel_pruning"}
    edit_ops: ClassVar[tuple[str, ...]] = ("channel_prune",)  # core.channel_prune's replay

    op: Literal["channel_prune"]
    target: ChannelPruneTarget
    criterion: Literal["l1", "taylor"] = "l1"
    scope: Literal["global", "layerwise"] = "global"
    layers: LayerList | None = None  # unit groups (or a layer of one); None: every group
    round_to: Literal[1, 8, 16] = 1
    samples: int = Field(default=512, ge=1, le=100_000)  # taylor: calibration images

    _distinct_layers = field_validator("layers")(distinct("a unit group"))

    @model_validator(mode="after")
    def _samples_need_taylor(self) -> ChannelPruneStep:
        # a stored spec has every default filled in: only a non-default value is an error
        if self.criterion != "taylor" and \
                self.samples != type(self).model_fields["samples"].default:
            raise ValueError("samples: only used with criterion 'taylor' (l1 reads no data)")
        return self
