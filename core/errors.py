"""Domain errors raised by core/. The service layer maps them onto HTTP errors."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or architecture inside one) cannot be turned into a model."""


class DatasetError(ValueError):
    """Arrays or files cannot be turned into a dataset."""


class SpecError(ValueError):
    """A request names things that do not exist or cannot be combined (layer names, selectors)."""


class Cancelled(Exception):
    """Raised by long-running loops when their `should_cancel()` callback returns True."""


class ExportError(ValueError):
    """A model (or one of its layers/ops) cannot be exported to ONNX or torch.export; the
    message names the layer or op and what to do."""
