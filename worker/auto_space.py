"""The auto-compress search space (no torch): which methods and chains of two apply to a model
and a budget, the knobs the search draws for a candidate, and the child-job steps a candidate
becomes in each phase.

A candidate is `{"method": "pcn" | "pcn+lowrank" | ..., "fraction": f, "split": s, knobs...}`.
Every method step gets an absolute target (`select.target` / `target`, landing at or just below
its goal by the method's own budget fit), so a candidate costs about `fraction` of the budget:

* budgets the methods count exactly (`total_params`, `nonzero_params`, `trainable_params`,
  `macs`) are their targets as they are;
* `latency_ms` is aimed at through MACs (the starting model's MACs scaled by budget / its
  measured latency), `bytes` through total parameters (bytes per parameter measured on the
  starting model's ONNX; int8 weights take about 0.3 of that); the trial then measures the real
  latency or file, and only a measured value within the budget counts.
* in a chain the first method cuts to the geometric point `start^(1-split) * goal^split`, the
  second to the goal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

# the budget kinds each method's target can aim at
ALL_KINDS = frozenset({"total_params", "nonzero_params", "trainable_params", "macs"})
FAMILY_KINDS: dict[str, frozenset[str]] = {
    "pcn": ALL_KINDS,
    "lowrank": ALL_KINDS,
    "channel_prune": ALL_KINDS,
    "snip": frozenset({"nonzero_params"}),
    "magnitude": frozenset({"nonzero_params"}),
    "synflow": frozenset({"nonzero_params"}),
    "dctps": frozenset({"nonzero_params", "trainable_params"}),
}
# chains of two that compose (the second method still finds layers of its kind after the first)
CHAINS = (("channel_prune", "lowrank"), ("channel_prune", "pcn"), ("pcn", "lowrank"),
          ("channel_prune", "magnitude"), ("channel_prune", "snip"))
# `applies` keys of the measure step's report a method needs non-zero
APPLIES_KEY = {"pcn": "pcn", "lowrank": "lowrank", "channel_prune": "channel_prune",
               "snip": "snip", "magnitude": "snip", "synflow": "snip", "dctps": "dctps"}
PROXY = {"latency_ms": "macs", "bytes": "total_params"}
INT8_BYTES = 0.3  # int8 weights: about this share of the fp32 bytes per parameter

KNOBS: dict[str, dict[str, optuna.distributions.BaseDistribution]] = {
    "pcn": {"pcn_output_based": optuna.distributions.CategoricalDistribution([False, True])},
    "lowrank": {"lowrank_score": optuna.distributions.CategoricalDistribution(
                    ["output_perturbation", "output_variance", "relative_error", "magnitude"]),
                "lowrank_blocking": optuna.distributions.CategoricalDistribution(
                    ["none", "alds"])},
    "channel_prune": {"channel_prune_criterion": optuna.distributions.CategoricalDistribution(
        ["l1", "taylor"])},
    "dctps": {"dctps_allocation": optuna.distributions.CategoricalDistribution(
        ["epl", "erk", "uniform"])},
}


@dataclass(frozen=True)
class Space:
    """What the search may draw for one job: the budget, its proxy kind, the starting model's
    costs, and the method choices that apply."""

    kind: str  # the budget kind
    value: float  # the budget
    start: dict[str, float]  # the starting model's costs (every kind it measured)
    choices: tuple[str, ...]  # "pcn", "channel_prune+lowrank", ...
    int8: bool  # int8 on export is a knob (bytes and latency budgets)
    latency_batch: int = 256

    @property
    def proxy(self) -> str:
        return PROXY.get(self.kind, self.kind)

    @property
    def exact(self) -> bool:
        return self.kind not in PROXY

    def fraction_range(self) -> tuple[float, float]:
        """The share of the budget a candidate may aim at: near the whole budget for a count
        (more of the budget rarely costs accuracy; the low end still draws the frontier below
        it), wider for a measured kind (the proxy's relation to it is only known afterwards)."""
        return (0.75, 1.0) if self.exact else (0.2, 1.2)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        lo, hi = self.fraction_range()
        found: dict[str, optuna.distributions.BaseDistribution] = {
            "method": optuna.distributions.CategoricalDistribution(list(self.choices)),
            "fraction": optuna.distributions.FloatDistribution(lo, hi),
            "split": optuna.distributions.FloatDistribution(0.2, 0.8)}
        for family in {f for choice in self.choices for f in choice.split("+")}:
            found.update(KNOBS.get(family, {}))
        if self.int8:
            found["int8"] = optuna.distributions.CategoricalDistribution([False, True])
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "start": self.start,
                "choices": list(self.choices), "int8": self.int8,
                "latency_batch": self.latency_batch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Space:
        return cls(kind=data["kind"], value=float(data["value"]), start=dict(data["start"]),
                   choices=tuple(data["choices"]), int8=bool(data["int8"]),
                   latency_batch=int(data.get("latency_batch", 256)))


def method_choices(kind: str, methods: list[str] | str, applies: dict[str, int] | None,
                   chains: bool) -> tuple[list[str], dict[str, str]]:
    """(choices, {method: why it is left out}) for a budget kind, the methods the user allows
    and what applies to the model (the measure step's `applies`; None = unknown, all apply)."""
    allowed = set(FAMILY_KINDS) if methods == "all" else set(methods) & set(FAMILY_KINDS)
    proxy = PROXY.get(kind, kind)
    left_out: dict[str, str] = {}
    singles = []
    for family in FAMILY_KINDS:
        if family not in allowed:
            continue
        if proxy not in FAMILY_KINDS[family]:
            left_out[family] = (f"cannot reduce {kind}: " + (
                "masks leave every weight stored in the dense format" if family in
                ("snip", "magnitude", "synflow") else f"its targets are "
                f"{', '.join(sorted(FAMILY_KINDS[family]))}"))
            continue
        if applies is not None and not applies.get(APPLIES_KEY[family], 0):
            left_out[family] = "no layer of the model it can change (the prunability report)"
            continue
        singles.append(family)
    found = list(singles)
    if chains:
        found += [f"{a}+{b}" for a, b in CHAINS if a in singles and b in singles]
    return found, left_out


def goal(space: Space, fraction: float, int8: bool) -> float:
    """The proxy-kind cost a candidate aims at."""
    if space.kind == "latency_ms":
        scale = space.value / max(space.start["latency_ms"], 1e-9)
        return fraction * space.start["macs"] * scale
    if space.kind == "bytes":
        per_param = space.start["bytes"] / max(space.start["total_params"], 1.0)
        return fraction * space.value / (per_param * (INT8_BYTES if int8 else 1.0))
    return fraction * space.value


def method_step(family: str, kind: str, target: int, params: dict[str, Any]) -> dict[str, Any]:
    """One method's step aiming at `target` of `kind`, with the candidate's knobs."""
    if family == "pcn":
        return {"op": "pcn", "select": {"target": {kind: target}},
                "output_based": bool(params.get("pcn_output_based", False))}
    if family == "lowrank":
        return {"op": "lowrank", "target": {kind: target},
                "score": params.get("lowrank_score", "output_perturbation"),
                "blocking": params.get("lowrank_blocking", "none")}
    if family == "channel_prune":
        return {"op": "channel_prune", "target": {kind: target},
                "criterion": params.get("channel_prune_criterion", "l1")}
    if family == "dctps":
        return {"op": "dctps", "target": {kind: target},
                "allocation": params.get("dctps_allocation", "epl")}
    return {"op": family, "target": {"nonzero_params": target}}


def cut_steps(space: Space, params: dict[str, Any]) -> tuple[list[dict[str, Any]],
                                                            list[dict[str, Any]]]:
    """(the method steps of a candidate, their targets `{method, kind, goal}`)."""
    families = str(params["method"]).split("+")
    int8 = bool(params.get("int8", False))
    final = goal(space, float(params.get("fraction", 1.0)), int8)
    kind = space.proxy
    start = float(space.start[kind])
    final = min(final, start * 0.999)
    goals = [final]
    if len(families) == 2:
        split = float(params.get("split", 0.5))
        goals = [start ** (1 - split) * final ** split, final]
    steps, targets = [], []
    for family, value in zip(families, goals, strict=True):
        target = max(1, int(value))
        steps.append(method_step(family, kind, target, params))
        targets.append({"method": family, "kind": kind, "goal": target})
    return steps, targets


def measure_step(space: Space, int8: bool, report: bool = False) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "measure"}
    if space.kind == "latency_ms":
        step["latency_batch_size"] = space.latency_batch
    if space.kind == "bytes":
        step["bytes"] = True
    if int8:
        step["quantize"] = "int8_dynamic"
    if report:
        step["report"] = True
    return step


def train_step(epochs: int, auto: dict[str, Any]) -> dict[str, Any]:
    return {"op": "train", "epochs": epochs, "optimizer": auto.get("optimizer", "adam"),
            "lr": auto.get("lr", 1e-3), "batch_size": auto.get("batch_size", 128)}


def defaults(space: Space) -> list[dict[str, Any]]:
    """One candidate per method choice, the budget's whole share (enqueued first, so every
    method that applies is scored at least once whatever the sampler draws)."""
    fraction = 0.97 if space.exact else 0.8
    found = []
    for choice in space.choices:
        params: dict[str, Any] = {"method": choice, "fraction": fraction, "split": 0.5}
        if space.int8:
            params["int8"] = False
        found.append(params)
    if space.int8:  # and the first single method quantized
        singles = [c for c in space.choices if "+" not in c]
        if singles:
            found.append({"method": singles[0], "fraction": fraction, "split": 0.5,
                          "int8": True})
    return found


def suggest(trial: optuna.trial.Trial, space: Space) -> dict[str, Any]:
    """Draw a candidate (define-by-run: only the knobs of the drawn methods)."""
    method = trial.suggest_categorical("method", list(space.choices))
    lo, hi = space.fraction_range()
    params: dict[str, Any] = {"method": method,
                              "fraction": trial.suggest_float("fraction", lo, hi)}
    families = str(method).split("+")
    if len(families) == 2:
        params["split"] = trial.suggest_float("split", 0.2, 0.8)
    for family in families:
        for name, dist in KNOBS.get(family, {}).items():
            assert isinstance(dist, optuna.distributions.CategoricalDistribution)
            params[name] = trial.suggest_categorical(name, list(dist.choices))
    if space.int8:
        params["int8"] = trial.suggest_categorical("int8", [False, True])
    return params


def describe(params: dict[str, Any]) -> str:
    """A candidate in a few words: `pcn → lowrank (output-based; relative_error) + int8`."""
    families = str(params.get("method", "?")).split("+")
    knobs = []
    if "pcn" in families and params.get("pcn_output_based"):
        knobs.append("output-based")
    if "lowrank" in families:
        knobs.append(f"score {params.get('lowrank_score', 'output_perturbation')}"
                     + (f", {params['lowrank_blocking']} blocking"
                        if params.get("lowrank_blocking", "none") != "none" else ""))
    if "channel_prune" in families:
        knobs.append(f"{params.get('channel_prune_criterion', 'l1')} criterion")
    if "dctps" in families:
        knobs.append(f"{params.get('dctps_allocation', 'epl')} allocation")
    text = " → ".join(families) + (f" ({'; '.join(knobs)})" if knobs else "")
    return text + (" + int8" if params.get("int8") else "")
