"""Curves from a job's events (torch-free): the one fold behind the worker's `curves.json` and
`GET /v1/jobs/{id}/curves`. Each method registers its curves keys and how its events fold into
them (`service.registry.register_curve`, `curve_fold`, `MethodSpec.curve_records`); the shapes are
described in worker/steps.py."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import service.spec  # noqa: F401  (registers every method)
from service.registry import curve_keys, folds_for


def empty() -> dict[str, Any]:
    """Curves with every registered key and no data."""
    return {key: make() for key, make in curve_keys().items()}


def add(curves: dict[str, Any], kind: str, data: dict[str, Any]) -> None:
    """Fold one event into `curves` (in place). Keys missing from `curves` (curves of a
    checkpoint written before a method existed) are added; kinds without a fold are ignored."""
    folds = folds_for(kind)
    if not folds:
        return
    for key, make in curve_keys().items():
        if key not in curves:
            curves[key] = make()
    for fold in folds:
        fold(curves, data)


def fold(events: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Curves from `(kind, data)` events in the order they were emitted."""
    curves = empty()
    for kind, data in events:
        add(curves, kind, data or {})
    return curves
