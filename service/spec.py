"""JobSpec: what a compression job does. Each step is a method's spec model (`service/methods/`,
registered in `service.registry`); `Step` is their union discriminated on `op`, built from the
registrations. Bounds are real, extra fields are refused. The configured epoch limit is passed
in the validation context: `JobSpec.model_validate(data, context={"max_epochs":
settings.max_epochs})`."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

import service.methods  # noqa: F401  (registers every method)
from service.methods.train import MAX_EPOCHS
from service.registry import (
    MethodSpec,
    Strict,
    available_ops,
    dense_weights_refusal,
    step_models,
)

__all__ = ["AVAILABLE_OPS", "BUILTIN_DATASETS", "JOB_SPEC_EXAMPLES", "MAX_CHANNELS",
           "MAX_EPOCHS", "MAX_STEPS", "NORMALIZE_MODES", "JobSpec", "ModelArch",
           "Normalization", "Step", "check_normalize", "control_character"]

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


_LENET = {"arch": {"name": "lenet300"}}  # fc1 (784 -> 300), fc2 (300 -> 100), fc3 (100 -> 10)
_TRAIN = {"op": "train", "epochs": 2, "optimizer": "adam", "lr": 0.001}

# One JobSpec per step op, as OpenAPI Example Objects (`summary`, `value`): the examples of
# `POST /v1/jobs` in /docs and of the JobSpec schema. Each one validates and runs as it is on a
# fresh LeNet-300-100 and Fashion-MNIST (tests/api/test_openapi.py validates them all).
JOB_SPEC_EXAMPLES: dict[str, dict[str, Any]] = {
    "train": {"summary": "train: train a fresh model, then evaluate it", "value": {
        "model": _LENET, "dataset": "fashion-mnist", "seed": 0, "device": "auto",
        "steps": [{"op": "train", "epochs": 3, "optimizer": "sgd", "lr": 0.05,
                   "momentum": 0.9, "lr_steps": [2], "batch_size": 128},
                  {"op": "evaluate"}]}},
    "evaluate": {"summary": "evaluate: test accuracy of a model (use your model's id as model)",
                 "value": {"model": _LENET, "dataset": "fashion-mnist",
                           "steps": [{"op": "evaluate", "batch_size": 1024}]}},
    "pcn": {"summary": "pcn: project layer inputs onto their principal components, fine-tune",
            "value": {"model": _LENET, "dataset": "fashion-mnist", "seed": 0,
                      "steps": [_TRAIN,
                                {"op": "pcn", "layers": ["fc1", "fc2"], "select": {"dims": 32},
                                 "samples": 5000},
                                {"op": "train", "epochs": 2}, {"op": "evaluate"}]}},
    "snip": {"summary": "snip: prune 90 % of the weights at init by connection sensitivity",
             "value": {"model": _LENET, "dataset": "fashion-mnist",
                       "steps": [{"op": "snip", "sparsity": 0.9, "batches": 1},
                                 _TRAIN, {"op": "evaluate"}]}},
    "random": {"summary": "random: a random mask per layer (a pruning baseline)",
               "value": {"model": _LENET, "dataset": "fashion-mnist",
                         "steps": [{"op": "random", "sparsity": 0.9, "scope": "layerwise"},
                                   _TRAIN, {"op": "evaluate"}]}},
    "magnitude": {"summary": "magnitude: prune the smallest 80 % of a trained model, fine-tune",
                  "value": {"model": _LENET, "dataset": "fashion-mnist",
                            "steps": [_TRAIN, {"op": "magnitude", "sparsity": 0.8},
                                      {"op": "train", "epochs": 1}, {"op": "evaluate"}]}},
    "synflow": {"summary": "synflow: data-free pruning at init to a non-zero budget",
                "value": {"model": _LENET, "dataset": "fashion-mnist",
                          "steps": [{"op": "synflow", "target": {"nonzero_params": 20000},
                                     "rounds": 100},
                                    _TRAIN, {"op": "evaluate"}]}},
    "lowrank": {"summary": "lowrank: factor layers to 30 % of their weights, fine-tune",
                "value": {"model": _LENET, "dataset": "fashion-mnist",
                          "steps": [_TRAIN,
                                    {"op": "lowrank", "target": {"param_ratio": 0.3},
                                     "score": "output_perturbation", "blocking": "none"},
                                    {"op": "train", "epochs": 1}, {"op": "evaluate"}]}},
    "dctps": {"summary": "dctps: alpha * DCT + a 1 % sparse matrix per layer, trained",
              "value": {"model": {"arch": {"name": "lenet5"}}, "dataset": "fashion-mnist",
                        "steps": [{"op": "dctps", "density": 0.01, "allocation": "epl"},
                                  {"op": "train", "epochs": 2, "optimizer": "adam",
                                   "lr": 0.001, "weight_decay": 0.0005},
                                  {"op": "evaluate"}]}},
    "channel_prune": {"summary": "channel_prune: remove units to half the MACs, fine-tune",
                      "value": {"model": _LENET, "dataset": "fashion-mnist",
                                "steps": [_TRAIN,
                                          {"op": "channel_prune", "target": {"mac_ratio": 0.5},
                                           "criterion": "l1"},
                                          {"op": "train", "epochs": 1}, {"op": "evaluate"}]}},
    "analyze": {"summary": "analyze: redundancy of a trained model's layers (model unchanged)",
                "value": {"model": _LENET, "dataset": "fashion-mnist",
                          "steps": [_TRAIN,
                                    {"op": "analyze", "kinds": ["unit_pruning", "spectrum",
                                                                "elbow"],
                                     "layers": ["fc1", "fc2"], "seeds": 5}]}},
    "export": {"summary": "export: ONNX (and int8) and torch.export files, verified",
               "value": {"model": _LENET, "dataset": "fashion-mnist",
                         "steps": [_TRAIN, {"op": "evaluate"},
                                   {"op": "export", "formats": ["onnx", "pt2"],
                                    "quantize": "int8_dynamic"}]}},
    "measure": {"summary": "measure: accuracy, every cost, CPU latency and ONNX bytes",
                "value": {"model": _LENET, "dataset": "fashion-mnist",
                          "steps": [_TRAIN,
                                    {"op": "measure", "latency_batch_size": 256,
                                     "bytes": True, "report": True}]}},
    "auto": {"summary": "auto: the most accurate model within 27,000 parameters (use a trained "
                        "model's id as model)",
             "value": {"model": _LENET, "dataset": "fashion-mnist",
                       "steps": [{"op": "auto", "budget": {"total_params": 27000},
                                  "max_accuracy_drop": 0.02, "methods": "all", "trials": 24,
                                  "finetune_epochs": 1, "final_epochs": 5}]}},
}


class JobSpec(Strict):
    model_config = ConfigDict(json_schema_extra={
        "examples": [example["value"] for example in JOB_SPEC_EXAMPLES.values()]})

    model: Annotated[str, Field(min_length=1, max_length=64)] | ModelArch = Field(
        description='The model the job starts from: the id of one of your models (POST '
                    '/v1/models, or a job\'s result.model_id), or a fresh model of a zoo '
                    'architecture, `{"arch": {"name": "lenet300"}}` (mlp, lenet300, lenet5, '
                    'conv4, resnet; other keys are the architecture\'s arguments).')
    dataset: str = Field(min_length=1, max_length=64, description=(
        "A built-in dataset (fashion-mnist, synthetic-blobs, synthetic-tiny) or the id of one "
        "of your datasets (POST /v1/datasets)."))
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS, description=(
        "What the job does, in order; each step is one op and works on the model the step "
        "before left."))
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description=(
        "Seeds every random choice (init, data order, masks, supports): the same spec and "
        "seed give the same model."))
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description=(
        "cuda sends the job to the gpu queue (only a GPU worker takes it); auto and cpu go "
        "to the cpu queue, where a worker uses a GPU for auto when it has one."))
    # input scaling: None = the model's stored preprocessing (raw inputs when it has none)
    normalize: Literal["none", "standardize"] | Normalization | None = Field(
        default=None, description=(
            "Input scaling: null uses the model's stored preprocessing (raw inputs when it "
            "has none); none feeds raw inputs; standardize uses the training split's "
            "per-channel mean and std; or explicit {mean: [...], std: [...]} per channel."))

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
