"""The registry of structural edits: `{"op": ..., ...}` entries of an arch's `edits` list.

Each method module registers the replay of its own edit at import time:

    @register_edit("lowrank")
    def replay_lowrank(model, edit): ...

`core.arch.build` replays an arch's edits through `EDIT_OPS` and never imports a method;
`core.methods` imports every method module (so every op is registered), and checkpoint I/O
(`core.models.checkpoint`) imports `core.methods` before it rebuilds a model.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from core.errors import SpecError

Replay = Callable[[nn.Module, dict[str, Any]], None]

# op -> replay(model, edit); filled by `register_edit` (read it, never write it)
EDIT_OPS: dict[str, Replay] = {}


def register_edit(op: str) -> Callable[[Replay], Replay]:
    """Decorator: `replay` rebuilds the structure of an `{"op": op, ...}` edit in place (shapes
    only; values come from a checkpoint or from the transform that appended the edit)."""
    def decorate(replay: Replay) -> Replay:
        known = EDIT_OPS.get(op)
        if known is not None and known is not replay:
            raise ValueError(f"edit op {op!r} is registered twice ({known.__module__}."
                             f"{known.__qualname__} and {replay.__module__}."
                             f"{replay.__qualname__})")
        EDIT_OPS[op] = replay
        return replay
    return decorate


def replay_edit(model: nn.Module, edit: dict[str, Any]) -> None:
    """Apply the structural replay of `edit` to `model` (SpecError for an unknown op)."""
    op = edit.get("op") if isinstance(edit, dict) else None
    if op not in EDIT_OPS:
        raise SpecError(f"edit {edit!r} is not one of the known ops: {', '.join(sorted(EDIT_OPS))}")
    EDIT_OPS[op](model, edit)
