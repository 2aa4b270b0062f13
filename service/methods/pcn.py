"""The `pcn` step's spec (principal components of each layer's input, seed 000), the plateau
rule (a `when: "plateau"` pcn step is applied inside the train step right before it), and the
curves its events fold into: `transforms` (event `pcn`) and `spectra` (event `spectrum`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from service.registry import (
    LayerList,
    LayerName,
    MethodSpec,
    Strict,
    curve_fold,
    distinct,
    register_curve,
    register_step,
)


class PCNLayerSelect(Strict):
    """How many principal directions to keep: exactly one criterion."""

    threshold: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    dims: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> PCNLayerSelect:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            target = " or target" if "target" in type(self).model_fields else ""
            raise ValueError(f"give exactly one of threshold (>0), dims (>=1), energy (0..1]"
                             f"{target}, got {given or 'none'}")
        return self


SIZE_TARGETS = ("trainable_params", "total_params", "nonzero_params", "macs")


class PCNTarget(Strict):
    """A size or accuracy goal, found by search without retraining. A size (the whole model's
    trainable / total / non-zero parameters or MACs per sample, as `core.budget` measures them)
    is met by per-layer dims, greedy by explained variance per unit of cost and fitted so the
    measured cost lands at or just below it (`core.pcn_budget.pcn_transform_to_budget`);
    `max_accuracy_drop` by one common eigenvalue threshold whose candidates are evaluated on
    the validation split (`core.pcn_select.pcn_transform_to_target`)."""

    trainable_params: int | None = Field(default=None, ge=1, le=10**12)
    total_params: int | None = Field(default=None, ge=1, le=10**12)
    nonzero_params: int | None = Field(default=None, ge=1, le=10**12)
    macs: int | None = Field(default=None, ge=1, le=10**12)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> PCNTarget:
        given = [k for k in (*SIZE_TARGETS, "max_accuracy_drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a target is exactly one of trainable_params, total_params, "
                             "nonzero_params, macs (an integer in 1..10**12) or "
                             f"max_accuracy_drop (a fraction in [0, 1]), got {given or 'none'}")
        return self


class PCNSelect(PCNLayerSelect):
    """The selector of every transformed layer: a criterion, or a target to search for."""

    target: PCNTarget | None = None


@register_step
class PCNStep(MethodSpec):
    needs_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"pcn": "transforms"}
    edit_ops: ClassVar[tuple[str, ...]] = ("pcn_input", "pcn_output")

    op: Literal["pcn"]
    select: PCNSelect
    per_layer: dict[LayerName, PCNLayerSelect] = Field(default_factory=dict, max_length=256)
    # "auto" = the widest layers (core.pcn_select.auto_layers), or a list of layer names
    layers: Literal["auto"] | LayerList = "auto"
    # prune output units where every reader's input is compressed >= 10x (seed 000 App. C)
    output_based: bool = False
    samples: int = Field(default=5000, ge=2, le=100_000)
    batch_size: int = Field(default=256, ge=1, le=65536)
    # PCA solver. Default (top_k None, solver "auto"): only the components the selectors need
    # (doubling top-k subspace iteration; the N x N Gram matrix where a layer sees fewer
    # samples than dims); a target search computes every component. top_k = the k leading
    # components per layer; solver "eigh" (with top_k None) = the full spectrum by dense eigh.
    top_k: int | None = Field(default=None, ge=1, le=1_000_000)
    solver: Literal["auto", "eigh", "subspace", "gram"] = "auto"
    # conv layers: at most about this many of the N*h*w positions (a seeded uniform subset) go
    # into the covariance (BENCHMARKS.md: same model, 2 s less on Conv4); None = every position.
    # Dense layers always use every sample.
    max_rows: int | None = Field(default=100_000, ge=1000, le=100_000_000)
    # "now": after the previous step; "plateau": inside the preceding train step, after the
    # first epoch (>= plateau_min_epochs, default 1) whose validation-accuracy gain over the
    # epoch before (or over the model at the start of the step) is < plateau_delta (0.005),
    # once validation accuracy is above where the step started (worker.step_pcn has the details)
    when: Literal["now", "plateau"] = "now"
    plateau_delta: float | None = Field(default=None, gt=0, le=1)
    plateau_min_epochs: int | None = Field(default=None, ge=1)

    _distinct_layers = field_validator("layers")(distinct("a layer"))

    @model_validator(mode="after")
    def _consistent(self) -> PCNStep:
        if self.select.target is not None and self.per_layer:
            raise ValueError("per_layer cannot be combined with select.target: the target "
                             "search chooses every layer's dims")
        if isinstance(self.layers, list):
            extra = sorted(set(self.per_layer) - set(self.layers))
            if extra:
                raise ValueError(f"per_layer names layers that are not in layers: {extra}")
        if self.when != "plateau":
            given = [k for k in ("plateau_delta", "plateau_min_epochs")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only used with when: \"plateau\"")
        return self

    def job_rule(self, steps: Sequence[MethodSpec], index: int) -> str | None:
        if self.when == "plateau" and (index == 0 or steps[index - 1].op != "train"):
            return (f"steps[{index}]: a pcn step with when: \"plateau\" is applied inside the "
                    "train step right before it; put a train step before it")
        return None


register_curve("spectra", dict)


@curve_fold("spectrum")
def _spectrum(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """The PCA spectrum of a transformed layer's input (source `pcn`), next to the tracked
    ones of the same layer."""
    curves["spectra"].setdefault(str(data.get("layer")), []).append(
        {k: v for k, v in data.items() if k != "layer"} | {"epoch": data.get("epoch")})
