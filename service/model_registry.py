"""Models: uploaded checkpoints and the outputs of jobs. The API validates uploads in a
subprocess (worker.inspect) and registers the normalized safetensors file here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import on_rollback  # service.artifacts imports it from here too
from service.errors import NotFound, Unprocessable, UnsupportedFormat
from service.filecheck import (  # noqa: F401 - re-exported for callers of the model registry
    check_safetensors_header_size,
    looks_like_safetensors,
    looks_like_zip,
    read_safetensors_layout,
)
from service.orm import Model, new_id
from service.store import ObjectStore

ACCEPTED = "a .safetensors file, or a .pt/.pth PyTorch state_dict saved with torch.save"


def file_digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes), reading in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def checkpoint_format(path: str | Path, filename: str,
                      max_header_bytes: int | None = None) -> str:
    """'safetensors' or 'pt' from the file name and its magic bytes; anything else is a 415. A
    safetensors header over `max_header_bytes` is a 413 (from its 8-byte length only)."""
    suffix = Path(filename or "").suffix.lower()
    if suffix == ".safetensors" and looks_like_safetensors(path):
        if max_header_bytes is not None:
            check_safetensors_header_size(path, max_header_bytes)
        return "safetensors"
    if suffix in (".pt", ".pth") and looks_like_zip(path):
        return "pt"
    if suffix in (".safetensors", ".pt", ".pth"):
        raise UnsupportedFormat(f"{filename!r} does not look like a {suffix} file (bad magic "
                                f"bytes); upload {ACCEPTED}")
    raise UnsupportedFormat(f"unsupported checkpoint file {filename!r}; upload {ACCEPTED}")


def model_key(tenant_id: str, model_id: str) -> str:
    return f"models/{tenant_id}/{model_id}.safetensors"


def register_model(session: Session, store: ObjectStore, *, tenant_id: str, name: str,
                   arch: dict[str, Any], fmt: str, params: dict[str, int], path: str | Path,
                   source_job_id: str | None = None, model_id: str | None = None,
                   stored: bool = False) -> Model:
    """Store the normalized safetensors file and insert its Model row; if the insert (or the
    commit after it) fails, the stored object is deleted again. `stored=True`: the caller has
    already put `path` at `model_key(tenant_id, model_id)` (and undoes it on rollback)."""
    sha256, size = file_digest(path)
    model = Model(id=model_id or new_id(), tenant_id=tenant_id, name=name, arch=arch,
                  format=fmt, size_bytes=size, sha256=sha256, params=params,
                  source_job_id=source_job_id)
    model.storage_key = model_key(tenant_id, model.id)
    if stored:
        session.add(model)
        session.flush()
        return model
    return store_then_add(session, store, model, path)


def store_then_add(session: Session, store: ObjectStore, row: Any, path: str | Path) -> Any:
    """Put `path` at `row.storage_key`, then add and flush `row`; the stored object is deleted
    again if the flush, or the commit after it, fails (nothing half-written)."""
    key = row.storage_key
    store.put_file(key, path)
    on_rollback(session, lambda: store.delete(key))
    try:
        session.add(row)
        session.flush()
    except Exception:
        store.delete(key)
        raise
    return row


def get_model(session: Session, tenant_id: str, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise NotFound(f"model {model_id!r} not found")
    return model


def list_models(session: Session, tenant_id: str, limit: int = 100) -> list[Model]:
    return list(session.scalars(select(Model).where(Model.tenant_id == tenant_id)
                                .order_by(Model.created_at.desc(), Model.id.desc()).limit(limit)))


def parse_arch(text: str | None) -> dict[str, Any] | None:
    """The `arch` form field: a JSON object with a "name", or empty."""
    if text is None or not text.strip():
        return None
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"arch is not valid JSON ({exc}); e.g. {{\"name\": \"lenet300\"}}") \
            from exc
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise Unprocessable('arch must be a JSON object with a "name", e.g. {"name": "lenet300"}')
    return arch
