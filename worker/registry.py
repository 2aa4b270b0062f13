"""The worker's side of the method registry: each step module registers its handler
(`@handler(SpecModel)`) and, where a method acts inside the train step before it, a train hook
(`@train_hook(SpecModel)`); plots register with `worker.plots.plot`. worker.steps imports every
handler module (`worker/step_<name>.py` for `service/methods/<name>.py`), so the tables are full
once it is imported."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from core.errors import SpecError
from service.registry import MethodSpec
from worker.context import StepContext, TrainHook

Handler = Callable[[StepContext, Any], dict[str, Any]]
# (ctx, the step right after a train step, its index) -> a hook the train step runs, or None
TrainHookFactory = Callable[[StepContext, Any, int], TrainHook | None]
F = TypeVar("F", bound=Callable[..., Any])

HANDLERS: dict[str, Handler] = {}  # op -> handler(ctx, step) -> op-specific result
TRAIN_HOOKS: dict[str, TrainHookFactory] = {}  # op -> the hook its step gives the train step


def handler(spec: type[MethodSpec]) -> Callable[[F], F]:
    """Decorator: `fn(ctx, step) -> dict` runs every op of `spec` (a registered spec model)."""
    def register(fn: F) -> F:
        for op in spec.ops:
            if op in HANDLERS:
                raise TypeError(f"op {op!r} already has a handler ({HANDLERS[op].__qualname__})")
            HANDLERS[op] = fn
        return fn
    return register


def train_hook(spec: type[MethodSpec]) -> Callable[[F], F]:
    """Decorator: `factory(ctx, step, index) -> TrainHook | None` is asked, when the step
    after a train step has an op of `spec`, for a hook the train step runs (None: no hook, e.g.
    a pcn step with `when: "now"`)."""
    def register(fn: F) -> F:
        for op in spec.ops:
            TRAIN_HOOKS[op] = fn
        return fn
    return register


def handler_for(op: str) -> Handler:
    try:
        return HANDLERS[op]
    except KeyError:
        raise SpecError(f"unknown step op {op!r}; this worker runs: "
                        f"{', '.join(sorted(HANDLERS))}") from None


def next_step_hook(ctx: StepContext) -> TrainHook | None:
    """The hook the step right after the running train step contributes, if any."""
    index = ctx.step_index + 1
    if index >= len(ctx.steps):
        return None
    step = ctx.steps[index]
    factory = TRAIN_HOOKS.get(step.op)
    return factory(ctx, step, index) if factory is not None else None
