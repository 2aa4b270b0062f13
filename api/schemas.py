"""Response documents. Plain dicts built from ORM rows keep the JSON shapes of DESIGN.md."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from service.datasets import BUILTINS
from service.orm import Artifact, Dataset, Model


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def model_document(model: Model, *, report: bool = True) -> dict[str, Any]:
    """A model's metadata; with its prunability report (`"report"`, null when it has none)
    unless `report=False` (lists leave it out: it can be large)."""
    doc = {"id": model.id, "name": model.name, "arch": model.arch, "format": model.format,
           "size_bytes": model.size_bytes, "sha256": model.sha256, "params": model.params,
           "source_job_id": model.source_job_id, "created_at": iso(model.created_at)}
    if report:
        doc["report"] = model.report
    return doc


def dataset_document(dataset: Dataset) -> dict[str, Any]:
    return {"id": dataset.id, "name": dataset.name, "builtin": False, "format": dataset.format,
            "size_bytes": dataset.size_bytes, "sha256": dataset.sha256, **dataset.meta,
            "created_at": iso(dataset.created_at)}


def builtin_documents() -> list[dict[str, Any]]:
    return [{"id": name, "name": name, "builtin": True, "description": description}
            for name, description in BUILTINS.items()]


def artifact_document(artifact: Artifact) -> dict[str, Any]:
    return {"name": artifact.name, "kind": artifact.kind, "size_bytes": artifact.size_bytes,
            "sha256": artifact.sha256}
