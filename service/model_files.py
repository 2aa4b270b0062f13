"""Where a model's file in each download format is (torch-free): the normalized safetensors
checkpoint, the export of the job that produced the model (`model.onnx` / `model.pt2` artifacts
of an `export` step), or an earlier on-demand export kept next to the checkpoint in the store
(`models/<tenant>/<model id>.onnx`). `locate_model_file` answers in one short transaction, so no
database connection is held while a missing export is made (api/exports.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.model_registry import get_model
from service.orm import Artifact, Job, Model
from service.store import ObjectStore

# format -> the file name suffix (also the extension of the on-demand export's object key)
FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "pt2": ".pt2"}
EXPORTED = ("onnx", "pt2")
# the artifact an `export` step stores for each format
EXPORT_ARTIFACTS = {"onnx": "model.onnx", "pt2": "model.pt2"}
# ops that leave the weights as they are: an export step followed only by these exported the
# job's final model
READ_ONLY_OPS = frozenset({"export", "evaluate", "analyze", "measure"})


@dataclass(frozen=True)
class ModelFile:
    """One model's file in one format: `key` is in the store already (`size_bytes` when known),
    or `key` is where an on-demand export goes (`stored` False) made from `checkpoint_key`."""

    model_id: str
    fmt: str
    key: str
    stored: bool
    size_bytes: int | None
    checkpoint_key: str
    arch: dict[str, Any]

    @property
    def filename(self) -> str:
        return f"{self.model_id}{FORMATS[self.fmt]}"


def export_key(tenant_id: str, model_id: str, fmt: str) -> str:
    """The object key of a model's on-demand export (next to `model_key`, same tenant prefix)."""
    return f"models/{tenant_id}/{model_id}{FORMATS[fmt]}"


def exports_final_model(spec: dict[str, Any] | None) -> bool:
    """True when the job's last `export` step is followed by read-only steps only (its files
    hold the weights of the model the job stored)."""
    ops = [str(step.get("op")) for step in (spec or {}).get("steps", [])
           if isinstance(step, dict)]
    if "export" not in ops:
        return False
    last = len(ops) - 1 - ops[::-1].index("export")
    return all(op in READ_ONLY_OPS for op in ops[last + 1:])


def job_export(session: Session, model: Model, fmt: str) -> Artifact | None:
    """The `export` artifact in `fmt` of the job that produced `model`, if that job exported
    its final model."""
    if model.source_job_id is None or fmt not in EXPORT_ARTIFACTS:
        return None
    job = session.get(Job, model.source_job_id)
    if job is None or job.tenant_id != model.tenant_id or job.status != "succeeded" \
            or (job.result or {}).get("model_id") != model.id \
            or not exports_final_model(job.spec):
        return None
    return session.scalar(select(Artifact).where(Artifact.job_id == job.id,
                                                 Artifact.name == EXPORT_ARTIFACTS[fmt],
                                                 Artifact.kind == "export"))


def locate_model_file(session: Session, store: ObjectStore, tenant_id: str, model_id: str,
                      fmt: str) -> ModelFile:
    """Where this tenant's model `model_id` is in `fmt` (404 for another tenant's model)."""
    model = get_model(session, tenant_id, model_id)

    def found(key: str, size: int | None, stored: bool = True) -> ModelFile:
        return ModelFile(model_id=model.id, fmt=fmt, key=key, stored=stored, size_bytes=size,
                         checkpoint_key=model.storage_key, arch=dict(model.arch))

    if fmt == "safetensors":
        return found(model.storage_key, model.size_bytes)
    artifact = job_export(session, model, fmt)
    if artifact is not None:
        return found(artifact.storage_key, artifact.size_bytes)
    key = export_key(tenant_id, model.id, fmt)
    return found(key, None, stored=store.exists(key))
