"""The `dctps` step's spec (seed 002) and its curve records (`dctps`, one per step: the
per-layer allocation and totals). Its layers have no dense weight: ops that need one are
refused after it (`service.registry.dense_weights_refusal`)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from service.registry import LayerList, MethodSpec, distinct, register_step


@register_step
class DCTpSStep(MethodSpec):
    """DCT plus Sparse (seed 002): every chosen Linear/Conv2d becomes `alpha * D + S`, D the
    fixed DCT of the layer's shape (a buffer, never stored or trained), S sparse on a fixed
    random support of `density` of the chosen layers' weights, split by `allocation`.
    A following train step trains only S's values, alpha and biases (the paper: Adam 1e-3,
    weight decay 5e-4)."""

    removes_dense_weights: ClassVar[bool] = True
    curve_records: ClassVar[dict[str, str]] = {"dctps": "dctps"}
    edit_ops: ClassVar[tuple[str, ...]] = ("dctps",)

    op: Literal["dctps"]
    density: float = 0.01
    allocation: Literal["epl", "epf", "uniform", "erk"] = "epl"
    alpha: Literal["trainable"] | float = "trainable"
    # "all" = every plain Linear/Conv2d of the model; or a list of names
    layers: Literal["all"] | LayerList = "all"

    @field_validator("density", mode="before")
    @classmethod
    def _density(cls, value: Any) -> Any:
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
