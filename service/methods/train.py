"""The `train` step's spec, and the curves its events fold into: `training` (event `epoch`),
`effective_dim` and `spectra` (event `effective_dim`, from `track: ["effective_dim"]`)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from service.registry import (
    LayerList,
    MethodSpec,
    curve_fold,
    distinct,
    register_curve,
    register_step,
)

MAX_EPOCHS = 200  # per train step, when the validation context gives no limit
TRAINING_KEYS = ("epoch", "global_epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                 "wall_s")
WHERE_KEYS = ("step", "epoch", "global_epoch")


@register_step
class TrainStep(MethodSpec):
    op: Literal["train"]
    epochs: int = Field(default=1, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    batch_size: int = Field(default=128, ge=1, le=65536)
    lr_steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=64)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    track: list[Literal["effective_dim"]] = Field(default_factory=list, max_length=1)
    # effective-dimensionality tracking (only with track: ["effective_dim"]); None = default:
    # layers "auto" (core.pcn_select.auto_layers at the start of the step), thresholds [0.1],
    # 1000 training samples per epoch
    track_layers: Literal["auto"] | LayerList | None = None
    track_thresholds: Annotated[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]],
                                Field(min_length=1, max_length=16)] | None = None
    track_samples: int | None = Field(default=None, ge=2, le=100_000)
    max_batches: int | None = Field(default=None, ge=1)

    @field_validator("epochs")
    @classmethod
    def _epochs_within_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_epochs", MAX_EPOCHS)
        if value > limit:
            raise ValueError(f"at most {limit} epochs per train step (configured maximum)")
        return value

    @field_validator("lr_steps")
    @classmethod
    def _ascending(cls, value: list[int]) -> list[int]:
        if value != sorted(set(value)):
            raise ValueError("lr_steps must be strictly increasing epoch numbers")
        return value

    _distinct_layers = field_validator("track_layers")(distinct("a layer"))

    @model_validator(mode="after")
    def _tracking_options_need_tracking(self) -> TrainStep:
        given = [k for k in ("track_layers", "track_thresholds", "track_samples")
                 if getattr(self, k) is not None]
        if given and "effective_dim" not in self.track:
            raise ValueError(f"{', '.join(given)}: only used with track: [\"effective_dim\"]")
        return self


register_curve("training", list)
register_curve("effective_dim", dict)
register_curve("spectra", dict)


@curve_fold("epoch")
def _training(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """One record per epoch: `{step, epoch, global_epoch, loss, accuracy, val_loss,
    val_accuracy, lr, wall_s}`."""
    curves["training"].append({"step": data.get("step")} | {k: data.get(k) for k in TRAINING_KEYS})


@curve_fold("effective_dim")
def _effective_dim(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """Per tracked layer: the effective dimensionality after the epoch, and its spectrum."""
    where = {k: data.get(k) for k in WHERE_KEYS}
    for name, layer in (data.get("layers") or {}).items():
        curves["effective_dim"].setdefault(name, []).append(
            where | {"in_dim": layer.get("in_dim"), "effective_dim": layer.get("effective_dim"),
                     "accuracy": data.get("accuracy"), "val_accuracy": data.get("val_accuracy")})
        curves["spectra"].setdefault(name, []).append(
            where | {"source": "effective_dim", "in_dim": layer.get("in_dim"),
                     "eigvals": layer.get("eigvals")})
