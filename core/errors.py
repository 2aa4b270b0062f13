"""Domain errors raised by core/. The service layer maps them onto HTTP errors."""
from __future__ import annotations

import re


class CheckpointError(ValueError):
    """A checkpoint (or architecture inside one) cannot be turned into a model."""


class DatasetError(ValueError):
    """Arrays or files cannot be turned into a dataset."""


class SpecError(ValueError):
    """A request names things that do not exist or cannot be combined (layer names, selectors)."""


class BelowMinimum(SpecError):
    """A size budget below the smallest model a method can build. The message has one format
    (`parse` reads it back), so whoever sees only a failed job's message, e.g. the auto search
    deciding which further candidates cannot be built, learns the method's floor from it."""

    PATTERN = re.compile(r"a (\w+) budget of (\d+) is out of reach: the smallest it can build "
                         r"has (\d+)")

    def __init__(self, method: str, kind: str, budget: float, minimum: float, why: str,
                 how: str) -> None:
        self.method, self.kind = method, kind
        self.budget, self.minimum = int(budget), int(minimum)
        super().__init__(f"{method}: a {kind} budget of {self.budget} is out of reach: the "
                         f"smallest it can build has {self.minimum} ({why}); raise the budget "
                         f"to at least {self.minimum}, or {how}")

    @classmethod
    def parse(cls, message: str | None) -> tuple[str, int, int] | None:
        """(kind, budget, minimum) from such a message (anywhere in it), else None."""
        found = cls.PATTERN.search(message or "")
        return None if found is None else (found[1], int(found[2]), int(found[3]))


class Cancelled(Exception):
    """Raised by long-running loops when their `should_cancel()` callback returns True."""


class ExportError(ValueError):
    """A model (or one of its layers/ops) cannot be exported to ONNX or torch.export; the
    message names the layer or op and what to do."""
