"""Which compression method applies to which layer: one rule per op, registered by the method's
own module (the bottom of core's layering: imports only torch and `core.errors`).

    @register_applies("lowrank")
    def lowrank_applies(name: str, module: nn.Module) -> str | None:
        return "depthwise conv: ..." if ... else None

A rule returns None when the op can transform the layer, else the reason it leaves the layer
untouched (said to the user: what the layer is and why). `why_not(op, name, module)` asks the
registered rule; an op without a rule applies to every nn.Linear/nn.Conv2d. Group-level methods
(`channel_prune`, `pcn_output`) register the per-layer part; whether a layer's units are in a
prunable group is answered by `core.pcn_graph.unit_groups` (`core.prunability` combines both).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from core.errors import SpecError

Rule = Callable[[str, nn.Module], "str | None"]

# the steps (and the output-based PCN variant) a prunability report lists, in plan order
METHOD_OPS = ("snip", "random", "magnitude", "synflow", "lowrank", "pcn", "pcn_output", "dctps",
              "channel_prune", "analyze")

# op -> rule(name, module); filled by `register_applies` (read it, never write it)
APPLIES: dict[str, Rule] = {}


def register_applies(op: str) -> Callable[[Rule], Rule]:
    """Decorator: `rule(name, module)` says why `op` leaves the layer untouched (None: it
    applies). One rule per op."""
    def decorate(rule: Rule) -> Rule:
        known = APPLIES.get(op)
        if known is not None and known is not rule:
            raise ValueError(f"applies rule for {op!r} is registered twice "
                             f"({known.__module__}.{known.__qualname__} and "
                             f"{rule.__module__}.{rule.__qualname__})")
        APPLIES[op] = rule
        return rule
    return decorate


def conv_kind(module: nn.Module) -> str:
    """What a layer is, for reasons and reports: "depthwise conv (groups=C)" (groups ==
    in_channels; a channel multiplier when out_channels = k * in_channels), "grouped conv
    (groups=g)", "conv", "linear", else the class name."""
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "conv"
        if module.groups == module.in_channels:
            return f"depthwise conv (groups={module.groups})"
        return f"grouped conv (groups={module.groups})"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__


def default_rule(name: str, module: nn.Module) -> str | None:
    """An op without a rule applies to every nn.Linear / nn.Conv2d."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return None
    return f"a {type(module).__name__}, not a Linear/Conv2d layer"


def why_not(op: str, name: str, module: nn.Module) -> str | None:
    """None when `op` applies to the layer `name`, else why it leaves it untouched."""
    if not isinstance(op, str) or not op:
        raise SpecError(f"op must be a method name such as {METHOD_OPS[0]!r}, got {op!r}")
    return APPLIES.get(op, default_rule)(name, module)
