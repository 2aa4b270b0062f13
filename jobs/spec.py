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
PLANNED_OPS = ("dctps", "analyze", "export")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


LayerName = Annotated[str, Field(min_length=1, max_length=200)]
LayerList = Annotated[list[LayerName], Field(min_length=1, max_length=256)]


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

    @field_validator("track_layers")
    @classmethod
    def _distinct_layers(cls, value: Any) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("track_layers names a layer twice")
        return value

    @model_validator(mode="after")
    def _tracking_options_need_tracking(self) -> TrainStep:
        given = [k for k in ("track_layers", "track_thresholds", "track_samples")
                 if getattr(self, k) is not None]
        if given and "effective_dim" not in self.track:
            raise ValueError(f"{', '.join(given)}: only used with track: [\"effective_dim\"]")
        return self


class EvaluateStep(Strict):
    op: Literal["evaluate"]
    batch_size: int = Field(default=1024, ge=1, le=65536)


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


class PCNTarget(Strict):
    """A size or accuracy goal met by one common eigenvalue threshold, found by search
    (`core.pcn_select.pcn_transform_to_target`; candidates are evaluated without retraining)."""

    trainable_params: int | None = Field(default=None, ge=1, le=10**12)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> PCNTarget:
        given = [k for k in ("trainable_params", "max_accuracy_drop")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a target is exactly one of trainable_params (an integer >= 1) or "
                             f"max_accuracy_drop (a fraction in [0, 1]), got {given or 'none'}")
        return self


class PCNSelect(PCNLayerSelect):
    """The selector of every transformed layer: a criterion, or a target to search for."""

    target: PCNTarget | None = None


class PCNStep(Strict):
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
    # once validation accuracy is above where the step started (worker.step_train has the details)
    when: Literal["now", "plateau"] = "now"
    plateau_delta: float | None = Field(default=None, gt=0, le=1)
    plateau_min_epochs: int | None = Field(default=None, ge=1)

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: Any) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("layers names a layer twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PCNStep:
        if self.select.target is not None and self.per_layer:
            raise ValueError("per_layer cannot be combined with select.target: the target "
                             "search uses one common threshold for every layer")
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


class PruneStep(Strict):
    """Pruning at initialization and its baselines (seed 004 ch. 3-4): one mask, kept through
    every later train step. `snip` scores |dL/dw * w| on labelled batches, `random` and
    `magnitude` (meant for a trained model) share its fields; `synflow` is data-free."""

    op: Literal["snip", "random", "magnitude", "synflow"]
    sparsity: float = Field(gt=0, lt=1)
    scope: Literal["global", "layerwise"] = "global"
    # re-initialise before scoring: variance scaling (Glorot), or layerwise dynamical isometry
    # (orthogonal / delta-orthogonal); None keeps the model's weights
    init: Literal["variance_scaling", "ldi"] | None = None
    # data-free approximate-isometry repair of the pruned weights (mask fixed), thesis Eq. 4.8
    repair: Literal["ai"] | None = None
    # snip only: "uniform" = unsupervised SNIP (uniform target distribution)
    labels: Literal["true", "uniform"] = "true"
    batches: int = Field(default=1, ge=1, le=1000)  # snip: labelled batches, summed signed
    batch_size: int = Field(default=100, ge=1, le=65536)
    rounds: int = Field(default=100, ge=1, le=10_000)  # synflow iterations
    # a layer left with 0 weights fails the job before training unless this is true
    allow_collapse: bool = False

    @model_validator(mode="after")
    def _fields_of_the_op(self) -> PruneStep:
        # a stored spec has every default filled in: only a non-default value is an error
        def changed(*names: str) -> list[str]:
            fields = type(self).model_fields
            return [k for k in names if getattr(self, k) != fields[k].default]

        if self.op != "snip" and changed("batches", "labels"):
            raise ValueError(f"{', '.join(changed('batches', 'labels'))}: only used by op "
                             "'snip'")
        if self.op != "synflow" and changed("rounds"):
            raise ValueError("rounds: only used by op 'synflow'")
        return self


class LowRankTarget(Strict):
    """Exactly one: a global parameter ratio (the chosen layers' weights after / before), a MAC
    ratio (the chosen layers' multiply-accumulates per sample after / before: spends the budget
    where the compute is, i.e. on the convs), or explicit ranks per layer (one int for every
    block, or a list with one rank per block)."""

    param_ratio: float | None = Field(default=None, gt=0, le=1)
    mac_ratio: float | None = Field(default=None, gt=0, le=1)
    ranks: dict[LayerName, Annotated[int, Field(ge=1)]
                | Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]] | None = \
        Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _exactly_one(self) -> LowRankTarget:
        given = [k for k in ("param_ratio", "mac_ratio", "ranks") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of param_ratio, mac_ratio, ranks; got "
                             f"{given or 'none'}")
        return self


class LowRankStep(Strict):
    """Low-rank compression (seed 003): SVD per block of every chosen Linear/Conv2d, the
    globally lowest-scoring singular vectors dropped, each layer materialised as a factor
    pair."""

    op: Literal["lowrank"]
    target: LowRankTarget
    score: Literal["output_perturbation", "output_variance", "relative_error",
                   "magnitude"] = "output_perturbation"
    blocking: Literal["none", "alds", "square"] = "none"
    samples: int = Field(default=512, ge=1, le=100_000)  # calibration images for the scores
    # "all" = every plain Linear/Conv2d of the model; or a list of names
    layers: Literal["all"] | LayerList = "all"


Step = Annotated[TrainStep | EvaluateStep | PCNStep | PruneStep | LowRankStep,
                 Field(discriminator="op")]
AVAILABLE_OPS = ("train", "evaluate", "pcn", "snip", "random", "magnitude", "synflow",
                 "lowrank")


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

    @model_validator(mode="after")
    def _plateau_follows_train(self) -> JobSpec:
        for i, step in enumerate(self.steps):
            if isinstance(step, PCNStep) and step.when == "plateau" and (
                    i == 0 or not isinstance(self.steps[i - 1], TrainStep)):
                raise ValueError(f"steps[{i}]: a pcn step with when: \"plateau\" is applied "
                                 "inside the train step right before it; put a train step "
                                 "before it")
        return self

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
