"""Step handlers: a registry `op -> handler(ctx, step) -> dict`; the runner never grows an if-chain.

A handler mutates `ctx.model` (or replaces it), reports progress through `ctx.reporter`, and
returns its op-specific metrics. The runner adds the common ones (`op`, `wall_s`, `params`,
`macs`, `accuracy`) after every step.

Curves (`ctx.curves`, stored as `curves.json`, and rebuilt from the job's events by
`GET /v1/jobs/{id}/curves` in the same shape):
* `training`: one record per epoch `{step, epoch, global_epoch, loss, accuracy, val_loss,
  val_accuracy, lr, wall_s}` (event `epoch`); `global_epoch` counts epochs over all train steps.
* `effective_dim`: `{layer: [{step, epoch, global_epoch, in_dim, effective_dim: {tau: m_e},
  accuracy, val_accuracy}]}` (event `effective_dim`, from `track: ["effective_dim"]`).
* `spectra`: `{layer: [{step, epoch, global_epoch, source, in_dim, eigvals, ...}]}` — source
  `effective_dim` (tracking, top 256 eigenvalues) or `pcn` (the transform's PCA, top 1024).
* `transforms`: one record per pcn step (event `pcn`): where it was applied and what it kept.
* `pruning`: one record per pruning step (event `pruning`); `lowrank`: one per lowrank step
  (event `lowrank`: ranks and weight params per layer); `dctps`: one per dctps step (event
  `dctps`: the per-layer allocation `{shape, weights, nnz, density}` and totals).
* `analysis`: `{kind: {layer: [{step, global_epoch, ...kind-specific}]}}` for the analyze
  kinds `unit_pruning`, `spectrum`, `elbow`, `angles` (event `analysis`, one per kind and
  step: `{step, global_epoch, kind, layers: {layer: data}}`); worker.step_analyze has the
  shapes.

`when: "plateau"` (a pcn step right after a train step): the train handler applies that pcn
step after the first epoch k >= plateau_min_epochs (default 1) whose validation-accuracy gain
`val_acc(k) - val_acc(k-1)` is below plateau_delta (default 0.005), provided val_acc(k) >
val_acc(0) (val_acc(0) = the model at the start of the step: a model that has not started
learning is not on a plateau). It then trains the remaining epochs of the step on the
transformed model (a fresh optimizer; lr and lr_steps continue where they were). If it never
fires, the transform is applied after the last epoch. The pcn step's record holds what the
transform did (`fired_at_epoch`, `applied_after_epoch`, metrics right after it).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from core.errors import SpecError
from core.train import evaluate
from jobs.spec import DENSE_WEIGHT_OPS, EvaluateStep, after_dctps_message
from worker.context import StepContext, dctps_layers, model_metrics
from worker.step_analyze import run_analyze
from worker.step_dctps import run_dctps
from worker.step_lowrank import run_lowrank
from worker.step_pcn import run_pcn
from worker.step_prune import run_prune
from worker.step_train import run_train


def run_evaluate(ctx: StepContext, step: EvaluateStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "evaluate")
    test = evaluate(ctx.model, ctx.splits.test, device=ctx.device, batch_size=step.batch_size)
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device, batch_size=step.batch_size)
    return {"loss": test["loss"], "accuracy": test["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"]}



Handler = Callable[[StepContext, Any], dict[str, Any]]

HANDLERS: dict[str, Handler] = {
    "train": run_train,
    "evaluate": run_evaluate,
    "pcn": run_pcn,
    "snip": run_prune,
    "random": run_prune,
    "magnitude": run_prune,
    "synflow": run_prune,
    "lowrank": run_lowrank,
    "dctps": run_dctps,
    "analyze": run_analyze,
}


def handler_for(op: str) -> Handler:
    try:
        return HANDLERS[op]
    except KeyError:
        raise SpecError(f"unknown step op {op!r}; this worker runs: "
                        f"{', '.join(sorted(HANDLERS))}") from None


def run_step(ctx: StepContext, step: Any) -> dict[str, Any]:
    """Run one step and return `{op, wall_s, params, macs, accuracy, ...op-specific}`."""
    ctx.check_cancel()
    handler = handler_for(step.op)
    if step.op in DENSE_WEIGHT_OPS and dctps_layers(ctx.model):
        # JobSpec refuses these after a dctps step and the API after a model with a dctps edit;
        # this catches whatever gets here anyway (e.g. an arch with a hand-written edit)
        raise SpecError(after_dctps_message(
            step.op, f"steps[{ctx.step_index}]",
            f"the DCTpS transform of layers {', '.join(dctps_layers(ctx.model))}"))
    start = time.perf_counter()
    details = handler(ctx, step)
    wall_s = time.perf_counter() - start
    metrics = model_metrics(ctx.model, ctx.input_shape, ctx.splits.test, ctx.device)
    return {"op": step.op, "wall_s": wall_s, **metrics, **details}
