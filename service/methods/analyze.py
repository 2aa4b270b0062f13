"""The `analyze` step's spec (the redundancy analyses of seed 001) and the curves its events
fold into: `analysis[kind][layer]` (event `analysis`, one per kind and step)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from service.registry import (
    LayerList,
    MethodSpec,
    curve_fold,
    distinct,
    register_curve,
    register_step,
)

AnalysisKind = Literal["unit_pruning", "spectrum", "elbow", "angles"]


def _default_kinds() -> list[AnalysisKind]:
    return ["unit_pruning", "spectrum", "elbow"]


@register_step
class AnalyzeStep(MethodSpec):
    """Redundancy analyses of seed 001 on the current model; the model is not changed.
    `unit_pruning`: validation accuracy vs units removed physically (magnitude, frame
    potential, random over `seeds` orders); `spectrum`: eigenvalues of W W^T against
    Marchenko–Pastur for the init variance; `elbow`: residual energy vs rank, its knee, and
    validation accuracy of rank-k projections; `angles`: principal angles between the top-`k`
    row spaces of each layer and the same layer of `other_model`."""

    op: Literal["analyze"]
    kinds: Annotated[list[AnalysisKind], Field(min_length=1, max_length=4)] = \
        Field(default_factory=_default_kinds)
    # "auto" = the widest layers (core.pcn_select.auto_layers), or a list of layer names
    layers: Literal["auto"] | LayerList = "auto"
    other_model: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    k: int = Field(default=10, ge=1, le=100_000)  # angles: subspace dim; elbow: an extra rank
    seeds: int = Field(default=5, ge=1, le=100)  # random unit-pruning orders
    counts: Annotated[list[Annotated[int, Field(ge=0)]],
                      Field(min_length=1, max_length=256)] | None = None
    # init the spectrum's Marchenko–Pastur law assumes; "auto": the zoo's `init` for models
    # built by the service, PyTorch's default for a lineage starting at an upload
    init: Literal["auto", "glorot", "kaiming", "torch"] = "auto"

    _distinct_entries = field_validator("kinds", "layers")(distinct("an entry"))

    @field_validator("counts")
    @classmethod
    def _ascending(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and value != sorted(set(value)):
            raise ValueError("counts must be strictly increasing numbers of units removed, "
                             "e.g. [0, 8, 16, 32]")
        return value

    @model_validator(mode="after")
    def _fields_of_the_kinds(self) -> AnalyzeStep:
        if "angles" in self.kinds and self.other_model is None:
            raise ValueError('kinds has "angles": give other_model, the id of a second model '
                             "of yours with the same layer shapes (e.g. the same architecture "
                             "trained from another seed), or drop \"angles\"")
        if "angles" not in self.kinds and self.other_model is not None:
            raise ValueError('other_model: only used with kinds containing "angles"')
        if "unit_pruning" not in self.kinds:
            fields = type(self).model_fields
            changed = [k for k in ("seeds", "counts") if getattr(self, k) != fields[k].default]
            if changed:
                raise ValueError(f"{', '.join(changed)}: only used with kinds containing "
                                 '"unit_pruning"')
        if "spectrum" not in self.kinds and self.init != "auto":
            raise ValueError('init: only used with kinds containing "spectrum"')
        return self

    def referenced_models(self) -> list[str]:
        return [self.other_model] if self.other_model is not None else []


register_curve("analysis", dict)


@curve_fold("analysis")
def _analysis(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """`analysis[kind][layer]` gets `{step, global_epoch, ...kind-specific data}`."""
    where = {"step": data.get("step"), "global_epoch": data.get("global_epoch")}
    kind = curves["analysis"].setdefault(str(data.get("kind")), {})
    for name, layer in (data.get("layers") or {}).items():
        kind.setdefault(name, []).append(where | layer)
