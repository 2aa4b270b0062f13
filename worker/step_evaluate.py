"""The `evaluate` step: test and validation loss and accuracy of the current model."""
from __future__ import annotations

from typing import Any

from core.train import evaluate
from service.methods.evaluate import EvaluateStep
from worker.context import StepContext
from worker.registry import handler


@handler(EvaluateStep)
def run_evaluate(ctx: StepContext, step: EvaluateStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "evaluate")
    test = evaluate(ctx.model, ctx.splits.test, device=ctx.device, batch_size=step.batch_size)
    val = evaluate(ctx.model, ctx.splits.val, device=ctx.device, batch_size=step.batch_size)
    return {"loss": test["loss"], "accuracy": test["accuracy"],
            "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
