"""JobSpec: what a compression job does. Each step is a pydantic model in a union discriminated on
`op`; bounds are real, extra fields are refused. The configured epoch limit is passed in the
validation context: `JobSpec.model_validate(data, context={"max_epochs": settings.max_epochs})`."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_EPOCHS = 200
MAX_STEPS = 32
BUILTIN_DATASETS = ("fashion-mnist", "synthetic-blobs", "synthetic-tiny")
# Named in DESIGN.md but not implemented by the worker yet: refused with a clear 422.
PLANNED_OPS = ("snip", "random", "magnitude", "lowrank", "dctps", "analyze", "export")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainStep(Strict):
    op: Literal["train"]
    epochs: int = Field(default=1, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, lt=1)
    batch_size: int = Field(default=128, ge=1, le=65536)
    lr_steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=64)
    lr_gamma: float = Field(default=0.1, gt=0, le=1)
    track: list[Literal["effective_dim"]] = Field(default_factory=list)
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


class EvaluateStep(Strict):
    op: Literal["evaluate"]
    batch_size: int = Field(default=1024, ge=1, le=65536)


class PCNSelect(Strict):
    """How many principal directions to keep: exactly one criterion."""

    threshold: float | None = Field(default=None, gt=0)
    dims: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> PCNSelect:
        given = [k for k in ("threshold", "dims", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of threshold (>0), dims (>=1) or energy (0..1], "
                             f"got {given or 'none'}")
        return self


class PCNStep(Strict):
    op: Literal["pcn"]
    select: PCNSelect
    per_layer: dict[str, PCNSelect] = Field(default_factory=dict)
    layers: Literal["auto"] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                        Field(min_length=1)] = "auto"
    output_based: bool = False
    samples: int = Field(default=5000, ge=1, le=100_000)
    batch_size: int = Field(default=256, ge=1, le=65536)

    @field_validator("output_based")
    @classmethod
    def _input_based_only(cls, value: bool) -> bool:
        if value:
            raise ValueError("output_based PCN is not available yet; use output_based: false "
                             "(input-based PCN)")
        return value


Step = Annotated[TrainStep | EvaluateStep | PCNStep, Field(discriminator="op")]
AVAILABLE_OPS = ("train", "evaluate", "pcn")


class ModelArch(Strict):
    """A fresh model of a zoo architecture: `{"arch": {"name": "lenet300", ...kwargs}}`."""

    arch: dict[str, Any]

    @field_validator("arch")
    @classmethod
    def _named(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise ValueError('arch needs a "name", e.g. {"name": "lenet300"}')
        return value


class JobSpec(Strict):
    model: Annotated[str, Field(min_length=1, max_length=64)] | ModelArch
    dataset: str = Field(min_length=1, max_length=64)
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("steps", mode="before")
    @classmethod
    def _known_ops(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, step in enumerate(value):
                op = step.get("op") if isinstance(step, dict) else None
                if op is None or op in AVAILABLE_OPS:
                    continue
                available = ", ".join(AVAILABLE_OPS)
                if op in PLANNED_OPS:
                    raise ValueError(f"steps[{i}]: op '{op}' is not available yet; "
                                     f"available ops: {available}")
                raise ValueError(f"steps[{i}]: unknown op '{op}'; available ops: {available}")
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError("dataset is 'fashion-mnist', 'synthetic-<name>' or a dataset id")
        return value

    @property
    def queue(self) -> str:
        """`cuda` jobs go to the gpu queue; `auto` and `cpu` to the cpu queue (a gpu worker may
        still pick cuda for auto jobs it receives)."""
        return "gpu" if self.device == "cuda" else "cpu"

    @property
    def model_id(self) -> str | None:
        return self.model if isinstance(self.model, str) else None

    @property
    def builtin_dataset(self) -> bool:
        return self.dataset in BUILTIN_DATASETS or self.dataset.startswith("synthetic-")
