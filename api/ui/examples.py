"""The new-job form's templates: the API's own example JobSpec per step op
(`service.spec.JOB_SPEC_EXAMPLES`, also the JobSpec schema's examples in /openapi.json). The form
puts the chosen template into its editor and swaps in the model and dataset picked."""
from __future__ import annotations

from typing import Any

from service.spec import AVAILABLE_OPS, JOB_SPEC_EXAMPLES


def op_templates() -> dict[str, dict[str, Any]]:
    """op -> `{"summary", "value"}` (value: a JobSpec that runs the op). An op without an
    example gets `{"op": op}` alone on a fresh LeNet-300-100."""
    templates = {op: {"summary": example["summary"], "value": example["value"]}
                 for op, example in JOB_SPEC_EXAMPLES.items()}
    for op in AVAILABLE_OPS:
        templates.setdefault(op, {"summary": op, "value": {
            "model": {"arch": {"name": "lenet300"}}, "dataset": "fashion-mnist",
            "steps": [{"op": op}]}})
    return templates
