"""The `dctps` step's spec (seed 002) and its curve records (`dctps`, one per step: the
per-layer allocation and totals). Its layers have no dense weight: ops that need one are
refused after it (`service.registry.dense_weights_refusal`)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from service.registry import LayerList, MethodSpec, Strict, distinct, register_step


class DCTpSTarget(Strict):
    """Exactly one absolute budget of the whole model: `nonzero_params` (what a sparse file
    stores: S's entries, counted as the non-zeros training makes them, alphas, biases and the
    layers left dense) or `trainable_params`; the density is chosen so the model lands on it
    (reported in the step's `budget`)."""

    nonzero_params: int | None = Field(default=None, ge=1, le=10**12)
    trainable_params: int | None = Field(default=None, ge=1, le=10**12)

    @model_validator(mode="before")
    @classmethod
    def _not_dense_kinds(cls, data: Any) -> Any:
        dense = [k for k in ("total_params", "macs") if isinstance(data, dict) and k in data]
        if dense:
            raise ValueError(f"{', '.join(dense)}: not reduced by dctps (a DCTpS layer is "
                             "shipped and computed as the dense weight alpha * D + S); a dctps "
                             "target is {'nonzero_params': n} or {'trainable_params': n}")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> DCTpSTarget:
        given = [k for k in ("nonzero_params", "trainable_params")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a dctps target is exactly one of nonzero_params, "
                             f"trainable_params; got {given or 'none'}")
        return self


@register_step
class DCTpSStep(MethodSpec):
    """DCT plus Sparse (seed 002): every chosen Linear/Conv2d becomes `alpha * D + S`, D the
    fixed DCT of the layer's shape (a buffer, never stored or trained), S sparse on a fixed
    random support of `density` (0.01) of the chosen layers' weights, split by `allocation`;
    or, instead of `density`, a `target`: an absolute whole-model budget the density is
    computed for.
    A following train step trains only S's values, alpha and biases (the paper: Adam 1e-3,
    weight decay 5e-4)."""

    removes_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"dctps": "dctps"}
    edit_ops: ClassVar[tuple[str, ...]] = ("dctps",)

    op: Literal["dctps"]
    density: float | None = 0.01  # None (left out when `target` is given): what it needs
    target: DCTpSTarget | None = None
    allocation: Literal["epl", "epf", "uniform", "erk"] = "epl"
    alpha: Literal["trainable"] | float = "trainable"
    # "all" = every plain Linear/Conv2d of the model; or a list of names
    layers: Literal["all"] | LayerList = "all"

    @field_validator("density", mode="before")
    @classmethod
    def _density(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 < value <= 1:
            raise ValueError(f"density must be a number in (0, 1] (the fraction of the chosen "
                             f"layers' weights kept trainable in S, e.g. 0.01 for 1%), got "
                             f"{value!r}")
        return float(value)

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        if value == "trainable":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f'alpha must be "trainable" (a learned scalar per layer, the '
                             f'default) or a finite number that fixes it (e.g. 1.0), got '
                             f'{value!r}')
        return float(value)

    _distinct_layers = field_validator("layers")(distinct("a layer"))

    @model_validator(mode="before")
    @classmethod
    def _density_or_target(cls, data: Any) -> Any:
        # a target leaves density unset (None): a stored spec (defaults filled in, None left
        # out) then validates again, and density's default 0.01 stays when there is no target
        if isinstance(data, dict) and data.get("target") is not None:
            if data.get("density") is not None:
                raise ValueError("give density or target, not both (target picks the density "
                                 "that meets its budget)")
            data = {**data, "density": None}
        return data
