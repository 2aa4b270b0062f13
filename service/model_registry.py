"""Models: uploaded checkpoints and the outputs of jobs. The API validates uploads in a
subprocess (worker.inspect) and registers the normalized safetensors file here, with the model's
prunability report and, for an imported model, its graph (stored once per tenant,
content-addressed: `graphs/<tenant>/<sha256>.json`)."""
from __future__ import annotations

import hashlib
import json
import math
import re
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

ACCEPTED = ("a .safetensors file, a .pt/.pth PyTorch state_dict saved with torch.save, a .pt2 "
            "archive written by torch.export.save, or an .onnx model")
GRAPH_FORMATS = ("pt2", "onnx")  # uploads the inspector converts to an imported graph
LAYOUTS = ("NCHW", "NHWC", "flat")
MAX_INPUT_DIMS = 4
MAX_DIM = 1 << 20
MAX_CHANNELS = 4096
MAX_CLASSES = 1_000_000
# the first byte of an ONNX file: a protobuf tag of ModelProto's fields 1..8 (ir_version,
# producer_name, producer_version, domain, model_version, doc_string, graph, opset_import)
_ONNX_FIRST = frozenset({0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42})
_SHA = re.compile(r"[0-9a-f]{64}\Z")


def file_digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes), reading in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def looks_like_onnx(path: str | Path) -> bool:
    """A light check (the inspector parses the file): not a zip or a safetensors file, and the
    first byte is a protobuf tag of one of ModelProto's fields."""
    with open(path, "rb") as f:
        first = f.read(1)
    return bool(first) and first[0] in _ONNX_FIRST and not looks_like_zip(path) \
        and not looks_like_safetensors(path)


def checkpoint_format(path: str | Path, filename: str,
                      max_header_bytes: int | None = None) -> str:
    """'safetensors', 'pt', 'pt2' or 'onnx' from the file name and its magic bytes; anything
    else is a 415. A safetensors header over `max_header_bytes` is a 413 (from its 8-byte
    length only)."""
    suffix = Path(filename or "").suffix.lower()
    if suffix == ".safetensors" and looks_like_safetensors(path):
        if max_header_bytes is not None:
            check_safetensors_header_size(path, max_header_bytes)
        return "safetensors"
    if suffix in (".pt", ".pth") and looks_like_zip(path):
        return "pt"
    if suffix == ".pt2" and looks_like_zip(path):
        return "pt2"
    if suffix == ".onnx" and looks_like_onnx(path):
        return "onnx"
    if suffix == ".pt2":
        raise UnsupportedFormat(f"{filename!r} is not a zip archive, which torch.export.save "
                                "writes; save the program with torch.export.save(program, "
                                "'model.pt2') and upload that file")
    if suffix in (".safetensors", ".pt", ".pth", ".onnx"):
        raise UnsupportedFormat(f"{filename!r} does not look like a {suffix} file (bad magic "
                                f"bytes); upload {ACCEPTED}")
    raise UnsupportedFormat(f"unsupported checkpoint file {filename!r}; upload {ACCEPTED}")


def _field_error(name: str, text: str, expected: str) -> Unprocessable:
    shown = text if len(text) <= 80 else text[:80] + "..."
    return Unprocessable(f"form field '{name}' is {shown!r}; expected {expected}")


def _ints(name: str, text: str, expected: str, *, maximum: int, max_items: int) -> list[int]:
    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    if not parts or len(parts) > max_items or not all(re.fullmatch(r"[0-9]{1,9}", p)
                                                       for p in parts):
        raise _field_error(name, text, expected)
    values = [int(p) for p in parts]
    if not all(1 <= v <= maximum for v in values):
        raise _field_error(name, text, expected)
    return values


def _floats(name: str, text: str, *, positive: bool) -> list[float]:
    expected = ("comma-separated numbers, one per input channel, e.g. 0.5,0.5,0.5"
                + (" (all > 0)" if positive else ""))
    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    if not parts or len(parts) > MAX_CHANNELS:
        raise _field_error(name, text, expected)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _field_error(name, text, expected) from None
    if not all(math.isfinite(v) for v in values) or (positive and not all(v > 0 for v in values)):
        raise _field_error(name, text, expected)
    return values


def parse_import_options(fields: dict[str, str]) -> dict[str, Any]:
    """The upload's preprocessing form fields, validated (422 naming the field): `input_shape`
    ("3,32,32", without the batch dimension), `num_classes`, `layout` (NCHW | NHWC | flat),
    `mean` and `std` (comma lists, one value per channel). Returns the inspector's options:
    `{"input_shape", "num_classes", "preprocessing": {"layout", "mean", "std"}}`, keys only for
    the fields given (empty fields count as not given)."""
    given = {k: v.strip() for k, v in fields.items()
             if k in ("input_shape", "num_classes", "layout", "mean", "std") and v.strip()}
    options: dict[str, Any] = {}
    if "input_shape" in given:
        options["input_shape"] = _ints(
            "input_shape", given["input_shape"], "the input's shape without the batch "
            "dimension as comma-separated positive integers, e.g. 3,32,32 (or 784)",
            maximum=MAX_DIM, max_items=MAX_INPUT_DIMS)
    if "num_classes" in given:
        options["num_classes"] = _ints(
            "num_classes", given["num_classes"], f"a positive integer (at most {MAX_CLASSES})",
            maximum=MAX_CLASSES, max_items=1)[0]
    pre: dict[str, Any] = {}
    if "layout" in given:
        layout = {v.lower(): v for v in LAYOUTS}.get(given["layout"].lower())
        if layout is None:
            raise _field_error("layout", given["layout"], "one of NCHW, NHWC, flat")
        pre["layout"] = layout
    if "mean" in given:
        pre["mean"] = _floats("mean", given["mean"], positive=False)
    if "std" in given:
        pre["std"] = _floats("std", given["std"], positive=True)
    if "mean" in pre and "std" in pre and len(pre["mean"]) != len(pre["std"]):
        raise Unprocessable(f"form fields 'mean' ({len(pre['mean'])} values) and 'std' "
                            f"({len(pre['std'])} values) must give one value per channel each")
    if pre:
        options["preprocessing"] = pre
    return options


def model_key(tenant_id: str, model_id: str) -> str:
    return f"models/{tenant_id}/{model_id}.safetensors"


def graph_key(tenant_id: str, sha: str) -> str:
    """Where a tenant's imported graph (the canonical IR JSON) is stored, by its sha256."""
    return f"graphs/{tenant_id}/{sha}.json"


def store_graph(session: Session, store: ObjectStore, tenant_id: str, sha: str,
                path: str | Path) -> str:
    """Store an imported graph once (content-addressed; put only if absent). The file must hash
    to `sha`. A graph put by this call is deleted again if the transaction rolls back; one
    that was there already is left alone (other models use it). Returns its key."""
    if not _SHA.match(sha):
        raise ValueError(f"graph id {sha!r} is not a sha256 hex digest")
    digest, _ = file_digest(path)
    if digest != sha:
        raise ValueError(f"graph file {path} hashes to {digest}, not {sha}")
    key = graph_key(tenant_id, sha)
    if not store.exists(key):
        store.put_file(key, path)
        on_rollback(session, lambda: store.delete(key))
    return key


def register_model(session: Session, store: ObjectStore, *, tenant_id: str, name: str,
                   arch: dict[str, Any], fmt: str, params: dict[str, int], path: str | Path,
                   source_job_id: str | None = None, model_id: str | None = None,
                   stored: bool = False, report: dict[str, Any] | None = None,
                   graph: tuple[str, Path] | None = None) -> Model:
    """Store the normalized safetensors file and insert its Model row (with its prunability
    `report`); if the insert (or the commit after it) fails, the stored object is deleted
    again. `graph` = (sha, canonical IR file) of an imported model, stored once
    (`store_graph`). `stored=True`: the caller has already put `path` at
    `model_key(tenant_id, model_id)` (and undoes it on rollback)."""
    sha256, size = file_digest(path)
    model = Model(id=model_id or new_id(), tenant_id=tenant_id, name=name, arch=arch,
                  format=fmt, size_bytes=size, sha256=sha256, params=params,
                  source_job_id=source_job_id, report=report)
    model.storage_key = model_key(tenant_id, model.id)
    if graph is not None:
        store_graph(session, store, tenant_id, *graph)
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
