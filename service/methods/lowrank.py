"""The `lowrank` step's spec (seed 003) and its curve records (`lowrank`, one per step)."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from service.registry import LayerList, LayerName, MethodSpec, Strict, register_step

# an absolute whole-model budget (core.budget's kinds): a count of parameters or of MACs
BudgetCount = Annotated[int, Field(ge=1, le=10**12)]
BUDGET_KINDS = ("total_params", "nonzero_params", "trainable_params", "macs")


class LowRankTarget(Strict):
    """Exactly one: a global parameter ratio (the chosen layers' weights after / before), a MAC
    ratio (the chosen layers' multiply-accumulates per sample after / before: spends the budget
    where the compute is, i.e. on the convs), explicit ranks per layer (one int for every
    block, or a list with one rank per block), or an absolute budget of the whole model:
    `total_params` (every stored value of the dense-format model), `nonzero_params`,
    `trainable_params` or `macs` (per sample). The ranks are fitted so the factored model's
    measured cost lands at or just below the budget (reported in the step's `budget`)."""

    param_ratio: float | None = Field(default=None, gt=0, le=1)
    mac_ratio: float | None = Field(default=None, gt=0, le=1)
    ranks: dict[LayerName, Annotated[int, Field(ge=1)]
                | Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]] | None = \
        Field(default=None, min_length=1, max_length=256)
    total_params: BudgetCount | None = None
    nonzero_params: BudgetCount | None = None
    trainable_params: BudgetCount | None = None
    macs: BudgetCount | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LowRankTarget:
        kinds = ("param_ratio", "mac_ratio", "ranks", *BUDGET_KINDS)
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(kinds)}; got {given or 'none'}")
        return self


@register_step
class LowRankStep(MethodSpec):
    """Low-rank compression (seed 003): SVD per block of every chosen Linear/Conv2d, the
    globally lowest-scoring singular vectors dropped, each layer materialised as a factor
    pair."""

    needs_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"lowrank": "lowrank"}
    edit_ops: ClassVar[tuple[str, ...]] = ("lowrank",)

    op: Literal["lowrank"]
    target: LowRankTarget
    score: Literal["output_perturbation", "output_variance", "relative_error",
                   "magnitude"] = "output_perturbation"
    blocking: Literal["none", "alds", "square"] = "none"
    samples: int = Field(default=512, ge=1, le=100_000)  # calibration images for the scores
    # "all" = every plain Linear/Conv2d of the model; or a list of names
    layers: Literal["all"] | LayerList = "all"
