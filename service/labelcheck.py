"""Label ranges of an uploaded dataset: class indices that no sample uses.

A model gets `max(label) + 1` outputs, so labels 1..10 give 11 classes of which class 0 never
occurs, and labels {0, 1, 3} give 4 with class 2 empty; training then spends an output on a class
that does not exist and accuracy is measured over it. `label_gaps` (run in the inspector
subprocess, `service.filecheck.validate_arrays`, numpy only) finds them over the training and
test labels together; `gap_message` says what is wrong and how to fix it. The API refuses such an
upload unless the client opts in with the form field `allow_label_gaps=true`
(`service.datasets.check_label_gaps`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SHOWN = 10  # missing labels listed


def label_gaps(labels: Sequence[np.ndarray]) -> dict[str, Any] | None:
    """`{"classes", "missing", "first_missing", "min_label"}` when some index in
    0..max(label) has no sample (over every array in `labels`: non-negative integer 1-D
    arrays), else None. `classes` is max + 1, the outputs a model needs; `missing` how many of
    them no label uses, `first_missing` the first SHOWN of those."""
    import numpy as np

    present = np.unique(np.concatenate([np.asarray(y).astype(np.int64, copy=False).ravel()
                                        for y in labels]))
    if present.size == 0:
        return None
    classes = int(present[-1]) + 1
    missing = classes - int(present.size)
    if missing == 0:
        return None
    first: list[int] = []
    # a gap is a jump of more than one between consecutive present labels (from -1 before 0)
    for index in np.flatnonzero(np.diff(np.concatenate([[-1], present])) > 1)[:SHOWN]:
        low = -1 if index == 0 else int(present[index - 1])
        first.extend(range(low + 1, min(int(present[index]), low + 1 + SHOWN)))
        if len(first) >= SHOWN:
            break
    return {"classes": classes, "missing": missing, "first_missing": first[:SHOWN],
            "min_label": int(present[0])}


def _ints(values: Sequence[int], total: int) -> str:
    shown = ", ".join(str(v) for v in values)
    return shown + (f" and {total - len(values)} more" if total > len(values) else "")


def gap_message(gaps: dict[str, Any]) -> str:
    """What the gaps mean for a model trained on the dataset, and how to renumber them."""
    classes, missing = int(gaps["classes"]), int(gaps["missing"])
    low = int(gaps.get("min_label", 0))
    if low > 0 and missing == low:  # a shifted range, e.g. 1..10
        return (f"the labels are {low}..{classes - 1}: they do not start at 0, so a model "
                f"trained on them gets {classes} outputs and class"
                f"{'es' if low > 1 else ''} {_ints(gaps['first_missing'], missing)} never "
                f"occur{'' if low > 1 else 's'}. Labels are 0..num_classes-1: subtract {low} "
                f"from y_train (and y_test), e.g. y - {low}, and upload again")
    return (f"the labels use {classes - missing} of the class indices 0..{classes - 1}: no "
            f"sample has label {_ints(gaps['first_missing'], missing)}, so a model trained on "
            f"them gets {classes} outputs of which {missing} never occur. Renumber the labels "
            "to 0..n-1 (e.g. y = numpy.unique(y, return_inverse=True)[1] over y_train and "
            "y_test together) and upload again")
