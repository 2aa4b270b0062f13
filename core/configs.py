"""One frozen config per method at the core boundary; field names equal the JSON spec fields of
the job step (service.methods' PCNStep, PruneStep, LowRankStep, DCTpSStep, AnalyzeStep), so a
handler builds one in a line:

    config = PruneConfig.from_dict(step.model_dump())

`from_dict` drops `None` entries of nested selectors/targets (pydantic dumps unset ones as None),
ignores exactly the keys listed in the class's `IGNORED` (`op` where the op names the step, and
worker-only scheduling keys) and refuses any other unknown key (SpecError). `to_dict()` gives
the JSON-able dict back. Values are validated by the method that runs the config.
(`core.train.TrainConfig` is the train step's.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from core.errors import SpecError

C = TypeVar("C", bound="StepConfig")


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


@dataclass(frozen=True)
class StepConfig:
    """Base of the method configs: `from_dict` / `to_dict` (see module doc)."""

    IGNORED: ClassVar[frozenset[str]] = frozenset({"op"})

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - cls.IGNORED)
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown keys {unknown}; valid: {sorted(names)}")
        return cls(**{k: _drop_none(v) for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PruneConfig(StepConfig):
    """`core.prune.prune_masks`. `op` is the method: snip | random | magnitude | synflow.
    `init` / `repair` (`core.sigprop`) and `allow_collapse` are applied by the caller around the
    masks; `batches` x `batch_size` are SNIP's labelled batches the caller draws. The step's
    `target` (`{"nonzero_params": n}`, the alternative to `sparsity`) is the caller's too: it
    becomes the sparsity (`core.prune.sparsity_for_budget`) once the model is initialised."""

    IGNORED: ClassVar[frozenset[str]] = frozenset({"target"})

    op: str
    sparsity: float | None
    scope: str = "global"
    init: str | None = None
    repair: str | None = None
    labels: str = "true"
    batches: int = 1
    batch_size: int = 100
    rounds: int = 100
    allow_collapse: bool = False


@dataclass(frozen=True)
class LowRankConfig(StepConfig):
    """`core.lowrank.lowrank_plan`. `target`: exactly one of `{"param_ratio": r}`,
    `{"mac_ratio": r}`, `{"ranks": {layer: int | [int, ...]}}` or an absolute whole-model
    budget `{"total_params" | "nonzero_params" | "trainable_params" | "macs": n}`
    (`core.budget`); `samples`: calibration images the caller draws for the output_* scores;
    `layers`: "all" or names."""

    target: dict[str, Any]
    score: str = "output_perturbation"
    blocking: str = "none"
    samples: int = 512
    layers: str | list[str] = "all"


@dataclass(frozen=True)
class DCTpSConfig(StepConfig):
    """`core.dctps.dctps_apply`; `density` None = 0.01 (`core.dctps.DEFAULT_DENSITY`), unless
    `target` (`{"nonzero_params": n}` or `{"trainable_params": n}`, the alternative to
    `density`) is given: `core.dctps_target.dctps_apply_target` turns it into the density."""

    density: float | None = None
    target: dict[str, int] | None = None
    allocation: str = "epl"
    alpha: str | float = "trainable"
    layers: str | list[str] = "all"


@dataclass(frozen=True)
class PCNConfig(StepConfig):
    """`core.pcn_output.plan_pcn_config` (+ `apply_pcn`); the statistics fields (`samples`,
    `batch_size`, `top_k`, `solver`, `max_rows`) go to `core.pca.collect_input_stats`
    (`stats_kwargs()`). `when`/`plateau_*` schedule the step in the worker: ignored here."""

    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"op", "when", "plateau_delta", "plateau_min_epochs"})

    select: dict[str, Any]
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: str | list[str] = "auto"
    output_based: bool = False
    samples: int = 5000
    batch_size: int = 256
    top_k: int | None = None
    solver: str = "auto"
    max_rows: int | None = 100_000

    def selector(self) -> dict[str, Any]:
        """The `select` dict of `core.pcn` (`per_layer` folded in; `target` left out)."""
        out = {k: v for k, v in self.select.items() if k != "target"}
        if self.per_layer:
            out["per_layer"] = dict(self.per_layer)
        return out

    @property
    def target(self) -> dict[str, Any] | None:
        """`select.target`: `{kind: N}` with kind one of `core.budget.BUDGET_KINDS` (met by
        `core.pcn_budget.pcn_transform_to_budget`) or `{"max_accuracy_drop": d}`
        (`core.pcn_select.pcn_transform_to_target`); None when the selector is a criterion."""
        return self.select.get("target")

    def stats_kwargs(self) -> dict[str, Any]:
        return {"samples": self.samples, "batch_size": self.batch_size, "top_k": self.top_k,
                "solver": self.solver, "max_rows": self.max_rows}


@dataclass(frozen=True)
class AnalyzeConfig(StepConfig):
    """The analyze step (`core.redundancy`, `core.spectra`): `kinds` of unit_pruning | spectrum
    | elbow | angles; `other_model` (angles) is an id the caller resolves."""

    kinds: list[str] = field(default_factory=lambda: ["unit_pruning", "spectrum", "elbow"])
    layers: str | list[str] = "auto"
    other_model: str | None = None
    k: int = 10
    seeds: int = 5
    counts: list[int] | None = None
    init: str = "auto"
