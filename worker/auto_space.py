"""The auto-compress search space (no torch): which methods and chains of two apply to a model
and a budget, the knobs the search draws for a candidate, and the child-job steps a candidate
becomes in each phase.

A candidate is `{"method": "pcn" | "pcn+lowrank" | ..., "fraction": f, "split": s, knobs...}`.
Every method step gets an absolute target (`select.target` / `target`, landing at or just below
its goal by the method's own budget fit), so a candidate costs about `fraction` of the budget:

* budgets the methods count exactly (`total_params`, `nonzero_params`, `trainable_params`,
  `macs`) are their targets as they are;
* `latency_ms` is aimed at through MACs, `bytes` through total parameters: at first the
  starting model's MACs scaled by budget / its measured latency (bytes per parameter measured
  on the starting model's ONNX; int8 weights take about 0.3 of that); once trials have
  measured a few models, through the line `measured = a + b * proxy` fitted to them and the
  starting model (`calibrate`: a runtime's fixed cost per batch makes latency fall slower than
  MACs, and a file has headers). The trial measures the real latency or file, and only a
  measured value within the budget counts.
* in a chain the first method cuts to the geometric point `start^(1-split) * goal^split`, the
  second to the goal.

Floors: a method cannot build a model below its smallest one (pcn at one principal component per
layer, lowrank at rank 1, ...). The search knows some floors before it starts (pcn without
output pruning: `core.pcn_budget.pcn_minimum`, in the baseline's measure report) and learns the
rest from the trials that method refuses (`core.errors.BelowMinimum`'s message). `Floors`
holds them per step key (`floor_key`: the method, the knobs that change its smallest model, and
the methods before it), each with the cost of the model the step started from: a floor seen
from a model of cost c bounds every step of that key starting from a model of cost >= c (a
smaller model can only have a smaller floor; from the starting model, whose cost is fixed, the
floor is exact). `cut_steps` moves a chain's first target that lies below its known floor into
the method's reach (the split then places it between the starting model and just above the
floor, as it would between the start and the goal; the second method cuts the rest), and
`unreachable` says when a candidate cannot be built at all, so it is told to the sampler as
infeasible without running.
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

KNOBS: dict[str, dict[str, optuna.distributions.BaseDistribution]] = {  # default first
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
DEFAULT_KNOBS: dict[str, Any] = {
    name: dist.choices[0] for knobs in KNOBS.values() for name, dist in knobs.items()
    if isinstance(dist, optuna.distributions.CategoricalDistribution)}
# the knobs that change a method's smallest model (its floor)
FLOOR_KNOBS = {"pcn": ("pcn_output_based",), "lowrank": ("lowrank_blocking",),
               "dctps": ("dctps_allocation",)}
FLOOR_MARGIN = 1.01  # a chain's first target raised to its floor aims this much above it


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
    # measured kinds: (a, b) of `measured = a + b * proxy` fitted to the trials so far
    calibration: tuple[float, float] | None = None

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
                "latency_batch": self.latency_batch,
                "calibration": list(self.calibration) if self.calibration else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Space:
        return cls(kind=data["kind"], value=float(data["value"]), start=dict(data["start"]),
                   choices=tuple(data["choices"]), int8=bool(data["int8"]),
                   latency_batch=int(data.get("latency_batch", 256)),
                   calibration=(float(data["calibration"][0]), float(data["calibration"][1]))
                   if data.get("calibration") else None)


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


def calibrate(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of the least-squares line `measured = a + b * proxy` through `points` [(proxy,
    measured)] (the starting model and the float, not int8, trials measured so far), None
    while it is not a usable fit (fewer than two distinct proxies, or a slope <= 0)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    if b <= 0:
        return None
    return my - b * mx, b


def goal(space: Space, fraction: float, int8: bool) -> float:
    """The proxy-kind cost a candidate aims at."""
    if space.calibration is not None and space.kind == "latency_ms":
        a, b = space.calibration
        # a runtime's fixed cost above the budget: aim at a tenth of the budget's slope share
        return fraction * max(space.value - a, 0.1 * space.value) / b
    if space.kind == "latency_ms":
        scale = space.value / max(space.start["latency_ms"], 1e-9)
        return fraction * space.start["macs"] * scale
    if space.kind == "bytes":
        per_param = space.start["bytes"] / max(space.start["total_params"], 1.0)
        value = space.value
        if space.calibration is not None:  # fitted on float files: the headers are `a`
            a, per_param = space.calibration
            value = max(space.value - a, 0.1 * space.value)
        return fraction * value / (per_param * (INT8_BYTES if int8 else 1.0))
    return fraction * space.value


def in_budget_units(space: Space, value: float, int8: bool) -> float:
    """A proxy-kind cost in the budget's own units, as `goal` relates them."""
    if space.calibration is not None and space.kind == "latency_ms":
        a, b = space.calibration
        return a + b * value
    if space.calibration is not None and space.kind == "bytes":
        a, b = space.calibration
        return a + b * value * (INT8_BYTES if int8 else 1.0)
    return value * space.value / goal(space, 1.0, int8)


def method_step(family: str, kind: str, target: int, params: dict[str, Any]) -> dict[str, Any]:
    """One method's step aiming at `target` of `kind`, with the candidate's knobs."""
    if family == "pcn":
        return {"op": "pcn", "select": {"target": {kind: target}},
                "output_based": bool(knob(params, "pcn_output_based"))}
    if family == "lowrank":
        return {"op": "lowrank", "target": {kind: target},
                "score": knob(params, "lowrank_score"),
                "blocking": knob(params, "lowrank_blocking")}
    if family == "channel_prune":
        return {"op": "channel_prune", "target": {kind: target},
                "criterion": knob(params, "channel_prune_criterion")}
    if family == "dctps":
        return {"op": "dctps", "target": {kind: target},
                "allocation": knob(params, "dctps_allocation")}
    return {"op": family, "target": {"nonzero_params": target}}


def knob(params: dict[str, Any], name: str) -> Any:
    return params.get(name, DEFAULT_KNOBS[name])


def floor_key(families: list[str], params: dict[str, Any], position: int) -> str:
    """The floor key of step `position` of a candidate: `channel_prune>pcn(pcn_output_based=
    True)` — the method, the knobs that change its smallest model, the methods before it."""
    parts = []
    for family in families[:position + 1]:
        knobs = ",".join(f"{k}={knob(params, k)}" for k in FLOOR_KNOBS.get(family, ()))
        parts.append(family + (f"({knobs})" if knobs else ""))
    return ">".join(parts)


class Floors:
    """Known floors: {floor_key: [[cost of the model the step started from, floor], ...]} (the
    JSON the coordinator keeps in the search state)."""

    def __init__(self, data: dict[str, list[list[float]]] | None = None) -> None:
        self.data = {k: [list(map(float, p)) for p in v] for k, v in (data or {}).items()}

    def add(self, key: str, start: float, floor: float) -> None:
        seen = self.data.setdefault(key, [])
        if [start, floor] not in seen:
            seen.append([float(start), float(floor)])

    def at_least(self, key: str, start: float) -> float:
        """The largest known floor of `key` for a step starting from a model of cost `start`
        (0 when none is known)."""
        return max((f for s, f in self.data.get(key, []) if s <= start * (1 + 1e-9)),
                   default=0.0)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return self.data


def cut_steps(space: Space, params: dict[str, Any], floors: Floors | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the method steps of a candidate, their targets `{method, kind, goal, start, floor}`).
    With `floors`, a chain's first target below its known floor is moved into the method's
    reach, `start^(1-split) * (floor * FLOOR_MARGIN)^split` (`raised_from` keeps the drawn
    one); a target still below its floor has `floor` > `goal`: `unreachable` tells."""
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
    floors = floors or Floors()
    targets: list[dict[str, Any]] = []
    before = start
    for position, (family, value) in enumerate(zip(families, goals, strict=True)):
        target = max(1, int(value))
        floor = floors.at_least(floor_key(families, params, position), before)
        entry: dict[str, Any] = {"method": family, "kind": kind, "goal": target}
        if position < len(families) - 1 and floor > target:
            # the split then places the first target between the model it starts from and
            # just above the method's floor, as it places it between the start and the goal
            lowest = floor * FLOOR_MARGIN + 1
            if lowest < before * 0.999:
                split = float(params.get("split", 0.5))
                raised = int(before ** (1 - split) * lowest ** split)
                entry |= {"goal": max(raised, int(lowest)), "raised_from": target}
        if floor:
            entry["floor"] = int(floor)
        targets.append(entry)
        before = entry["goal"]
    steps = steps_for(kind, targets, params)
    return steps, targets


def steps_for(kind: str, targets: list[dict[str, Any]], params: dict[str, Any]
              ) -> list[dict[str, Any]]:
    """The method steps that cut to `targets` (as `cut_steps` planned them)."""
    return [method_step(t["method"], t.get("kind", kind), int(t["goal"]), params)
            for t in targets]


def unreachable(targets: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first target below its method's known floor (that step would refuse), or None."""
    return next((t for t in targets if t.get("floor", 0) > t["goal"]), None)


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
    """One candidate per method choice aiming at the whole budget (a count: every method lands
    at or just below its target) or at 0.8 of it (a measured kind, until the proxy calibration
    knows better); enqueued first, so every method that applies is scored at least once
    whatever the sampler draws."""
    fraction = 1.0 if space.exact else 0.8
    found = []

    def candidate(choice: str, **extra: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"method": choice, "fraction": fraction}
        families = choice.split("+")
        if len(families) == 2:
            params["split"] = 0.5
        # every knob at its default: a knob left out would be drawn at random
        params.update({name: DEFAULT_KNOBS[name] for f in families for name in KNOBS.get(f, {})})
        if space.int8:
            params["int8"] = False
        return params | extra

    for choice in space.choices:
        found.append(candidate(choice))
    if space.int8:  # and the first single method quantized
        singles = [c for c in space.choices if "+" not in c]
        if singles:
            found.append(candidate(singles[0], int8=True))
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
