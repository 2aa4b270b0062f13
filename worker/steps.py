"""Step handlers: a registry `op -> handler(ctx, step) -> dict` (worker.registry), filled by the
handler modules this module imports — `worker/step_<name>.py` for every method module
`service/methods/<name>.py` — so the runner never grows an if-chain and a new method is found
without being listed here.

A handler mutates `ctx.model` (or replaces it), reports progress through `ctx.reporter`, and
returns its op-specific metrics. The runner adds the common ones (`op`, `wall_s`, `params`,
`macs`, `accuracy`) after every step.

Curves (`ctx.curves`, stored as `curves.json`; handlers emit events with `ctx.emit`, which
folds each into ctx.curves with `service.curves.add`, the fold `GET /v1/jobs/{id}/curves` applies
to the stored events, so both have the same shape; each method registers its keys and folds in
its `service/methods/<name>.py`):
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

`when: "plateau"` (a pcn step right after a train step): its train hook (worker.step_pcn,
registered with `worker.registry.train_hook`; the train handler only runs the hook the next
step contributes) applies that pcn step after the first epoch k >= plateau_min_epochs (default
1) whose validation-accuracy gain `val_acc(k) - val_acc(k-1)` is below plateau_delta (default
0.005), provided val_acc(k) > val_acc(0) (val_acc(0) = the model at the start of the step: a
model that has not started learning is not on a plateau). It then trains the remaining epochs
of the step on the transformed model (a fresh optimizer; lr and lr_steps continue where they
were). If it never fires, the transform is applied after the last epoch. The pcn step's record
holds what the transform did (`fired_at_epoch`, `applied_after_epoch`, metrics right after it).
"""
from __future__ import annotations

import importlib
import time
from typing import Any

from core.errors import SpecError
from service.registry import dense_weights_refusal, step_models
from worker.context import StepContext, dctps_layers, model_metrics
from worker.registry import HANDLERS, Handler, handler_for

__all__ = ["HANDLERS", "Handler", "handler_for", "handler_modules", "run_step"]


def handler_modules() -> list[str]:
    """The handler module of every registered method, in registration order."""
    methods = dict.fromkeys(model.__module__.rsplit(".", 1)[-1] for model in step_models())
    return [f"worker.step_{name}" for name in methods]


for _module in handler_modules():
    importlib.import_module(_module)


def run_step(ctx: StepContext, step: Any, accuracy: bool = True) -> dict[str, Any]:
    """Run one step and return `{op, wall_s, params, macs, accuracy, ...op-specific}`
    (`accuracy` False: the test accuracy is not measured and is None)."""
    ctx.check_cancel()
    handler = handler_for(step.op)
    removed = dctps_layers(ctx.model)
    if removed:
        # JobSpec refuses these after a dctps step and the API after a model with a dctps edit;
        # this catches whatever gets here anyway (e.g. an arch with a hand-written edit)
        refusal = dense_weights_refusal(step.op, f"steps[{ctx.step_index}]",
                                        f"the DCTpS transform of layers {', '.join(removed)}")
        if refusal is not None:
            raise SpecError(refusal)
    start = time.perf_counter()
    details = handler(ctx, step)
    wall_s = time.perf_counter() - start
    metrics = model_metrics(ctx.model, ctx.input_shape, ctx.splits.test, ctx.device,
                            accuracy=accuracy)
    return {"op": step.op, "wall_s": wall_s, **metrics, **details}
