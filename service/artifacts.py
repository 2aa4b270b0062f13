"""Job artifacts: files a job produced (compressed model, report, plots, exports)."""
from __future__ import annotations

import functools
import mimetypes
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.model_registry import file_digest, on_rollback
from service.orm import Artifact
from service.store import ObjectStore


def artifact_key(tenant_id: str, job_id: str, name: str) -> str:
    return f"jobs/{tenant_id}/{job_id}/{name}"


# what an artifact is, from its name, where the producer does not say (DESIGN.md's kinds)
_KIND_BY_NAME = {"report.json": "report", "curves.json": "curves"}
_KIND_BY_SUFFIX = {".safetensors": "model", ".png": "plot", ".onnx": "export", ".pt2": "export"}


def artifact_kind(name: str) -> str:
    """model | report | curves | plot | export, else the file's suffix ("file" without one)."""
    suffix = Path(name).suffix
    return _KIND_BY_NAME.get(name) or _KIND_BY_SUFFIX.get(suffix) or suffix.lstrip(".") or "file"


def add_artifact(session: Session, store: ObjectStore, *, tenant_id: str, job_id: str,
                 name: str, path: str | Path, kind: str | None = None,
                 stored: bool = False) -> Artifact:
    """Store a file as artifact `name` of a job (replacing one of the same name). `stored=True`:
    the caller has already put `path` at `artifact_key(...)` (and undoes it on rollback)."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"artifact name {name!r} must be a plain file name")
    sha256, size = file_digest(path)
    key = artifact_key(tenant_id, job_id, name)
    if not stored:
        store.put_file(key, path)
        on_rollback(session, lambda: store.delete(key))
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id,
                                                     Artifact.name == name))
    if artifact is None:
        artifact = Artifact(job_id=job_id, name=name)
        session.add(artifact)
    artifact.kind = kind or artifact_kind(name)
    artifact.size_bytes, artifact.sha256, artifact.storage_key = size, sha256, key
    session.flush()
    return artifact


def put_files(session: Session, store: ObjectStore, files: dict[str, Path],
              workers: int = 8) -> None:
    """Put every `{key: path}` concurrently (an object store answers in parallel; one after the
    other was most of a trivial job's finish on S3). Each object is deleted again if the
    session rolls back."""
    from concurrent.futures import ThreadPoolExecutor

    for key in files:
        on_rollback(session, functools.partial(store.delete, key))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        for future in [pool.submit(store.put_file, key, path) for key, path in files.items()]:
            future.result()


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)
                                .order_by(Artifact.name)))


def get_artifact(session: Session, job_id: str, name: str) -> Artifact:
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id,
                                                     Artifact.name == name))
    if artifact is None:
        raise NotFound(f"job {job_id} has no artifact {name!r}")
    return artifact


def media_type(name: str) -> str:
    if name.endswith((".safetensors", ".onnx")):
        return "application/octet-stream"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
