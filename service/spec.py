"""JobSpec: what a compression job does. Each step is a method's spec model (`service/methods/`,
registered in `service.registry`); `Step` is their union discriminated on `op`, built from the
registrations. Bounds are real, extra fields are refused. The configured epoch limit is passed
in the validation context: `JobSpec.model_validate(data, context={"max_epochs":
settings.max_epochs})`."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

import service.methods  # noqa: F401  (registers every method)
from service.methods.train import MAX_EPOCHS
from service.registry import (
    MethodSpec,
    Strict,
    available_ops,
    dense_weights_refusal,
    step_models,
)

__all__ = ["AVAILABLE_OPS", "BUILTIN_DATASETS", "MAX_CHANNELS", "MAX_EPOCHS", "MAX_STEPS",
           "NORMALIZE_MODES", "JobSpec", "ModelArch", "Normalization", "Step",
           "check_normalize", "control_character"]

MAX_STEPS = 32
MAX_CHANNELS = 4096  # entries of a normalize mean/std (one per input channel)
NORMALIZE_MODES = ("none", "standardize")
BUILTIN_DATASETS = ("fashion-mnist", "synthetic-blobs", "synthetic-tiny")
AVAILABLE_OPS = available_ops()

if TYPE_CHECKING:
    Step = MethodSpec
else:
    Step = Annotated[Union[step_models()], Field(discriminator="op")]  # noqa: UP007


def control_character(value: str) -> str | None:
    """The first control character (C0 incl. NUL, DEL, C1) in `value`, or None. Ids, names and
    every other string of a spec are printable text (PostgreSQL cannot even store a NUL)."""
    return next((ch for ch in value if ch < " " or "\x7f" <= ch <= "\x9f"), None)


def _find_control(value: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    """(path, character) of the first string or key holding a control character, in a raw
    JSON-like document; `path` in the `steps[0].layers[1]` style."""
    if isinstance(value, str):
        ch = control_character(value)
        return (path, ch) if ch is not None else None
    if depth > 64:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            bad = control_character(key) if isinstance(key, str) else None
            if bad is not None:
                return f"{path}[{key!r}]", bad
            where = f"{path}.{key}" if path else str(key)
            found = _find_control(item, where, depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_control(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
    return None


class ModelArch(Strict):
    """A fresh model of a zoo architecture: `{"arch": {"name": "lenet300", ...kwargs}}`."""

    arch: dict[str, Any]

    @field_validator("arch")
    @classmethod
    def _named(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise ValueError('arch needs a "name", e.g. {"name": "lenet300"}')
        return value


class Normalization(Strict):
    """Per-channel input statistics: the worker feeds `(x - mean[c]) / std[c]` to the model.
    Checked by `JobSpec._normalize` (one message naming the entry)."""

    mean: list[float] = Field(min_length=1, max_length=MAX_CHANNELS)
    std: list[float] = Field(min_length=1, max_length=MAX_CHANNELS)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_normalize(value: Any) -> None:
    """Raise ValueError naming the offending entry (`normalize.std[2] ...`) unless `value` is
    None, one of NORMALIZE_MODES or `{"mean": [C numbers], "std": [C numbers > 0]}` (finite)."""
    usage = ("normalize is null (the model's stored preprocessing, else raw inputs), 'none', "
             "'standardize' or {\"mean\": [one per channel], \"std\": [one per channel]}")
    if value is None or (isinstance(value, str) and value in NORMALIZE_MODES):
        return
    if isinstance(value, Normalization):
        value = value.model_dump()
    if not isinstance(value, dict):
        raise ValueError(f"{usage}; got {value!r:.80}")
    unknown = sorted(set(value) - {"mean", "std"}, key=str)
    missing = [k for k in ("mean", "std") if k not in value]
    if unknown or missing:
        raise ValueError(f"{usage}; " + (f"unknown keys {unknown}" if unknown else
                                          f"missing {' and '.join(missing)}"))
    for key in ("mean", "std"):
        items = value[key]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_CHANNELS:
            raise ValueError(f"normalize.{key} must be a list of 1..{MAX_CHANNELS} numbers "
                             "(one per input channel)")
        for i, item in enumerate(items):
            if not _number(item) or not math.isfinite(item):
                raise ValueError(f"normalize.{key}[{i}] must be a finite number, got {item!r}")
            if key == "std" and item <= 0:
                raise ValueError(f"normalize.std[{i}] must be > 0, got {item!r} (a channel "
                                 "with no spread cannot be standardised; use 1)")
    if len(value["mean"]) != len(value["std"]):
        raise ValueError(f"normalize.mean has {len(value['mean'])} entries but normalize.std "
                         f"has {len(value['std'])}; give one of each per input channel")


class JobSpec(Strict):
    model: Annotated[str, Field(min_length=1, max_length=64)] | ModelArch
    dataset: str = Field(min_length=1, max_length=64)
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # input scaling: None = the model's stored preprocessing (raw inputs when it has none)
    normalize: Literal["none", "standardize"] | Normalization | None = None

    @model_validator(mode="before")
    @classmethod
    def _printable_strings(cls, data: Any) -> Any:
        found = _find_control(data, "")
        if found is not None:
            where, ch = found
            raise ValueError(f"{where or 'spec'}: contains the control character {ch!r}; ids, "
                             "names and other values of a spec are printable text (remove it)")
        return data

    @field_validator("steps", mode="before")
    @classmethod
    def _known_ops(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, step in enumerate(value):
                op = step.get("op") if isinstance(step, dict) else None
                if op is None or op in AVAILABLE_OPS:
                    continue
                raise ValueError(f"steps[{i}]: unknown op '{op}'; available ops: "
                                 f"{', '.join(AVAILABLE_OPS)}")
        return value

    @model_validator(mode="after")
    def _job_rules(self) -> JobSpec:
        """Each method's rule about its place in the job, then the dense-weight rule."""
        for i, step in enumerate(self.steps):
            refusal = step.job_rule(self.steps, i)
            if refusal is not None:
                raise ValueError(refusal)
        first = next((i for i, s in enumerate(self.steps) if s.removes_dense_weights), None)
        if first is not None:
            for i, step in enumerate(self.steps[first + 1:], start=first + 1):
                refusal = dense_weights_refusal(step.op, f"steps[{i}]",
                                                f"the {self.steps[first].op} step "
                                                f"steps[{first}]")
                if refusal is not None:
                    raise ValueError(refusal)
        return self

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize(cls, value: Any) -> Any:
        check_normalize(value)
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
    def other_model_ids(self) -> list[str]:
        """Model ids named by steps (analyze's `other_model`), in step order."""
        return [model_id for s in self.steps for model_id in s.referenced_models()]
