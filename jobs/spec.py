"""JobSpec: what a compression job does. Each step is a pydantic model in a union discriminated on
`op`; bounds are real, extra fields are refused. The configured epoch limit is passed in the
validation context: `JobSpec.model_validate(data, context={"max_epochs": settings.max_epochs})`."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
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
PLANNED_OPS = ("export",)
# Ops that need plain (dense) Linear/Conv2d weights: refused after a dctps step, whose layers
# are `alpha * D + S` with a fixed sparse support (see DCTpSStep).
DENSE_WEIGHT_OPS = ("snip", "random", "magnitude", "synflow", "lowrank", "pcn")
ANALYSIS_KINDS = ("unit_pruning", "spectrum", "elbow", "angles")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


LayerName = Annotated[str, Field(min_length=1, max_length=200)]
LayerList = Annotated[list[LayerName], Field(min_length=1, max_length=256)]


def _distinct(noun: str) -> Callable[[Any, ValidationInfo], Any]:
    """A field validator refusing a list that names the same entry twice (`noun`: "a layer")."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} names {noun} twice")
        return value
    return check


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

    _distinct_layers = field_validator("track_layers")(_distinct("a layer"))

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

    _distinct_layers = field_validator("layers")(_distinct("a layer"))

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


class DCTpSStep(Strict):
    """DCT plus Sparse (seed 002): every chosen Linear/Conv2d becomes `alpha * D + S`, D the
    fixed DCT of the layer's shape (a buffer, never stored or trained), S sparse on a fixed
    random support of `density` of the chosen layers' weights, split by `allocation`.
    A following train step trains only S's values, alpha and biases (the paper: Adam 1e-3,
    weight decay 5e-4)."""

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

    _distinct_layers = field_validator("layers")(_distinct("a layer"))


class AnalyzeStep(Strict):
    """Redundancy analyses of seed 001 on the current model; the model is not changed.
    `unit_pruning`: validation accuracy vs units removed physically (magnitude, frame
    potential, random over `seeds` orders); `spectrum`: eigenvalues of W W^T against
    Marchenko–Pastur for the init variance; `elbow`: residual energy vs rank, its knee, and
    validation accuracy of rank-k projections; `angles`: principal angles between the top-`k`
    row spaces of each layer and the same layer of `other_model`."""

    op: Literal["analyze"]
    kinds: Annotated[list[Literal["unit_pruning", "spectrum", "elbow", "angles"]],
                     Field(min_length=1, max_length=4)] = \
        Field(default_factory=lambda: ["unit_pruning", "spectrum", "elbow"])
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

    _distinct_entries = field_validator("kinds", "layers")(_distinct("an entry"))

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


Step = Annotated[TrainStep | EvaluateStep | PCNStep | PruneStep | LowRankStep | DCTpSStep
                 | AnalyzeStep, Field(discriminator="op")]
AVAILABLE_OPS = ("train", "evaluate", "pcn", "snip", "random", "magnitude", "synflow",
                 "lowrank", "dctps", "analyze")


def after_dctps_message(op: str, where: str, source: str) -> str:
    """Why a step needing dense weights cannot follow a DCTpS transform, and what to do."""
    return (f"{where}: op '{op}' cannot run after {source}: DCTpS layers are alpha * D + S "
            "with a fixed sparse support and no dense weight to prune, factor or project; run "
            f"'{op}' before dctps (dctps then replaces those weights anyway) or in a job on a "
            "model without dctps")


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

    @model_validator(mode="after")
    def _dense_ops_before_dctps(self) -> JobSpec:
        first = next((i for i, s in enumerate(self.steps) if isinstance(s, DCTpSStep)), None)
        if first is not None:
            for i, step in enumerate(self.steps[first + 1:], start=first + 1):
                if step.op in DENSE_WEIGHT_OPS:
                    raise ValueError(after_dctps_message(step.op, f"steps[{i}]",
                                                         f"the dctps step steps[{first}]"))
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
    def other_model_ids(self) -> list[str]:
        """Model ids named by steps (analyze's `other_model`), in step order."""
        return [s.other_model for s in self.steps
                if isinstance(s, AnalyzeStep) and s.other_model is not None]

    @property
    def builtin_dataset(self) -> bool:
        return self.dataset in BUILTIN_DATASETS or self.dataset.startswith("synthetic-")
