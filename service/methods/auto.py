"""The `auto` step's spec (auto-compress: a budget in, the best model and the whole frontier
out) and the curves its events fold into (`auto`: the budget, every trial, the Pareto set and
the winner).

The search itself is not a step handler: the job is a coordinator (`worker.auto_search`) whose
trials are child jobs any worker takes. The budget kinds and what each counts exactly:

* `total_params` — every value the dense-format model stores (what a deployed ONNX holds:
  parameters, frozen buffers such as PCN's projections and BatchNorm statistics, DCTpS layers as
  their dense weight); masks do not reduce it.
* `nonzero_params` — what a sparse file stores (the non-zero entries).
* `trainable_params` — parameters a later training step updates.
* `macs` — multiply-accumulates of one sample, what a dense runtime executes; masks do not
  reduce it.
* `latency_ms` (+ `batch_size`) — measured with onnxruntime on the worker that runs the trial.
* `bytes` — the exported ONNX file (the int8 one when the trial quantizes).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from service.registry import MethodSpec, Strict, curve_fold, register_curve, register_step

EXACT_KINDS = ("total_params", "nonzero_params", "trainable_params", "macs")
MEASURED_KINDS = ("latency_ms", "bytes")
BUDGET_KINDS = (*EXACT_KINDS, *MEASURED_KINDS)
# the method families the search draws from; chains of two are formed from them
FAMILIES = ("pcn", "lowrank", "channel_prune", "snip", "magnitude", "synflow", "dctps", "int8")
MAX_TRIALS = 256


class AutoBudget(Strict):
    """Exactly one budget kind (see the module doc for what each counts); `batch_size` goes
    with `latency_ms` (default 256)."""

    total_params: int | None = Field(default=None, ge=1, le=10**12)
    nonzero_params: int | None = Field(default=None, ge=1, le=10**12)
    trainable_params: int | None = Field(default=None, ge=1, le=10**12)
    macs: int | None = Field(default=None, ge=1, le=10**15)
    latency_ms: float | None = Field(default=None, gt=0, le=3_600_000, allow_inf_nan=False)
    bytes: int | None = Field(default=None, ge=1, le=10**13)
    batch_size: int | None = Field(default=None, ge=1, le=65536)

    @model_validator(mode="after")
    def _exactly_one(self) -> AutoBudget:
        given = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a budget is exactly one of {', '.join(BUDGET_KINDS)} (with "
                             f"batch_size for latency_ms), got {given or 'none'}")
        if self.batch_size is not None and given[0] != "latency_ms":
            raise ValueError("batch_size: only used with latency_ms (the batch the latency "
                             "is measured at)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    @property
    def latency_batch(self) -> int:
        return self.batch_size or 256


@register_step
class AutoStep(MethodSpec):
    """Auto-compress: search every method that applies to the model, their knobs and chains of
    two (and int8 on export where the budget is bytes or latency) for the most accurate model
    within `budget`. `trials` candidates are scored right after the cut (no retraining; the
    multi-objective search proposes them), the `finetune_trials` most promising within the
    budget are fine-tuned `finetune_epochs`, the winner (highest validation accuracy within the
    budget) another `final_epochs`. It must be the job's only step; the job's model is the
    starting point (a trained model)."""

    needs_dense_weights: ClassVar[bool] = True

    op: Literal["auto"]
    budget: AutoBudget
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    methods: Literal["all"] | Annotated[
        list[Literal["pcn", "lowrank", "channel_prune", "snip", "magnitude", "synflow",
                     "dctps", "int8"]], Field(min_length=1, max_length=8)] = "all"
    trials: int = Field(default=24, ge=2, le=MAX_TRIALS)
    finetune_trials: int | None = Field(default=None, ge=1, le=MAX_TRIALS)
    finetune_epochs: int = Field(default=1, ge=0, le=200)
    final_epochs: int = Field(default=5, ge=0, le=200)
    chains: bool = True  # also try chains of two methods
    # the fine-tuning of every trial and of the winner
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=10)
    batch_size: int = Field(default=128, ge=1, le=65536)

    @model_validator(mode="after")
    def _consistent(self) -> AutoStep:
        if self.finetune_trials is not None and self.finetune_trials > self.trials:
            raise ValueError(f"finetune_trials ({self.finetune_trials}) cannot exceed trials "
                             f"({self.trials}): the fine-tuned ones are chosen among them")
        if isinstance(self.methods, list) and len(set(self.methods)) != len(self.methods):
            raise ValueError("methods names a method twice")
        if self.methods == ["int8"]:
            raise ValueError("methods: int8 is applied on export after a compression; add at "
                             "least one compression method")
        return self

    @property
    def promoted(self) -> int:
        """How many screened candidates are fine-tuned."""
        return self.finetune_trials or max(2, min(self.trials, self.trials // 4))

    @property
    def epochs(self) -> int:
        """Training epochs the search spends at most (counted against the job epoch quota)."""
        return self.promoted * self.finetune_epochs + self.final_epochs

    def job_rule(self, steps: Sequence[MethodSpec], index: int) -> str | None:
        if len(steps) != 1:
            return (f"steps[{index}]: auto must be the job's only step (it runs its own trials "
                    "as child jobs); train the model in a job of its own first and give its "
                    "result.model_id as the model, and export the chosen model afterwards")
        return None


# ---- curves: `auto` = {budget, baseline, trials: [...], pareto: [trial numbers], winner} -----

register_curve("auto", dict)


def pareto(points: list[dict[str, Any]], cost: str = "cost", value: str = "val_accuracy"
           ) -> list[int]:
    """Indices of the points no other point dominates (cost <= and value >=, one strictly),
    by ascending cost. Points without both numbers are left out."""
    usable = [(i, p) for i, p in enumerate(points)
              if isinstance(p.get(cost), (int, float)) and isinstance(p.get(value), (int, float))]
    usable.sort(key=lambda item: (item[1][cost], -item[1][value]))
    front: list[int] = []
    best = float("-inf")
    for i, p in usable:
        if p[value] > best:
            front.append(i)
            best = p[value]
    return front


@curve_fold("auto_budget")
def _budget(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """The budget and the starting model's numbers (event `auto_budget`, once)."""
    curves["auto"].update({"budget": data.get("budget"), "baseline": data.get("baseline")})
    curves["auto"].setdefault("trials", [])


@curve_fold("auto_trial")
def _trial(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """One finished trial (event `auto_trial`): its phase, method, cost and accuracy; the
    Pareto set of the fine-tuned trials (the numbers of the trials on it) is kept current."""
    auto = curves["auto"]
    trials = auto.setdefault("trials", [])
    trials.append(dict(data))
    tuned = [t for t in trials if t.get("phase") == "finetune" and t.get("status") == "succeeded"]
    auto["pareto"] = [tuned[i].get("trial") for i in pareto(tuned)]
    screened = [t for t in trials if t.get("phase") == "screen"
                and t.get("status") == "succeeded"]
    auto["pareto_screen"] = [screened[i].get("trial") for i in pareto(screened)]


@curve_fold("auto_result")
def _result(curves: dict[str, Any], data: dict[str, Any]) -> None:
    """The winner and why (event `auto_result`, once)."""
    curves["auto"]["winner"] = data
