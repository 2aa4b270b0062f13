"""Datasets: built-in names and uploaded `.npz`/`.safetensors` arrays.

Uploads are validated out of the API process (`python -m worker.inspect --kind dataset`, under
memory and CPU limits) by `service.filecheck.inspect_dataset_file`, which never unpickles and
refuses zip bombs from the zip directory before anything is decompressed; the API process never
loads numpy or the arrays."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import InvalidDataset, NotFound, UnsupportedFormat
from service.filecheck import (  # noqa: F401 - re-exported
    OPTIONAL,
    REQUIRED,
    check_safetensors_header_size,
    inspect_dataset_file,
    looks_like_safetensors,
    looks_like_zip,
    validate_arrays,
)
from service.labelcheck import gap_message
from service.model_registry import file_digest, store_then_add
from service.orm import Dataset, new_id
from service.spec import BUILTIN_DATASETS
from service.store import ObjectStore

BUILTINS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST, 60k/10k 28x28 grayscale images, 10 classes",
    "synthetic-blobs": "seeded Gaussian clusters as 1x28x28 images, 10 classes",
    "synthetic-tiny": "a few hundred seeded 1x8x8 samples, 10 classes, for tests",
}
assert set(BUILTINS) == set(BUILTIN_DATASETS)
# what the worker loads for each built-in (core.data: fashion_mnist, synthetic; a test keeps them
# equal): one sample's shape and the classes, checked against the model at submission
BUILTIN_SHAPES: dict[str, tuple[list[int], int]] = {
    "fashion-mnist": ([1, 28, 28], 10),
    "synthetic-blobs": ([1, 28, 28], 10),
    "synthetic-tiny": ([1, 8, 8], 10),
}
assert set(BUILTIN_SHAPES) == set(BUILTIN_DATASETS)
ALLOW_LABEL_GAPS = "allow_label_gaps"  # the upload's form field that accepts label gaps
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def check_label_gaps(meta: dict[str, Any], allow: str | None) -> dict[str, Any]:
    """An uploaded dataset's meta, refused (422 InvalidDataset) when its labels leave class
    indices unused (`meta["label_gaps"]`, `service.labelcheck`: labels 1..10, or 0, 1, 3)
    unless the form field allow_label_gaps is true; then the meta keeps `label_gaps` and gains
    the warning under `warnings`, so the dataset's document says it."""
    text = (allow or "").strip().lower()
    if text not in _TRUE + _FALSE:
        raise InvalidDataset(f"{ALLOW_LABEL_GAPS} must be true or false, got {allow!r:.40}")
    gaps = meta.get("label_gaps")
    if not gaps:
        return meta
    message = gap_message(gaps)
    if text not in _TRUE:
        raise InvalidDataset(f"y_train: {message}; or, if those classes are meant to have no "
                             f"sample, upload it with the form field {ALLOW_LABEL_GAPS}=true")
    return {**meta, "warnings": [*meta.get("warnings", []),
                                 f"{message} (accepted with {ALLOW_LABEL_GAPS}=true)"]}

def dataset_format(path: str | Path, filename: str, max_header_bytes: int | None = None) -> str:
    """'npz' or 'safetensors' from the file name and magic bytes (415 otherwise); a safetensors
    header over `max_header_bytes` is a 413 from its 8-byte length alone."""
    suffix = Path(filename or "").suffix.lower()
    if suffix == ".npz" and looks_like_zip(path):
        return "npz"
    if suffix == ".safetensors" and looks_like_safetensors(path):
        if max_header_bytes is not None:
            check_safetensors_header_size(path, max_header_bytes, "dataset")
        return "safetensors"
    raise UnsupportedFormat(f"unsupported dataset file {filename!r}; upload a .npz "
                            "(numpy.savez) or .safetensors file with arrays x_train, y_train "
                            "and optionally x_test, y_test")


def register_dataset(session: Session, store: ObjectStore, *, tenant_id: str, name: str,
                     fmt: str, meta: dict[str, Any], path: str | Path) -> Dataset:
    sha256, size = file_digest(path)
    dataset = Dataset(id=new_id(), tenant_id=tenant_id, name=name, format=fmt, size_bytes=size,
                      sha256=sha256, meta=meta)
    dataset.storage_key = f"datasets/{tenant_id}/{dataset.id}.{fmt}"
    return store_then_add(session, store, dataset, path)


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id!r} not found; built-in datasets are "
                       f"{', '.join(BUILTINS)}")
    return dataset


def list_datasets(session: Session, tenant_id: str, limit: int = 100) -> list[Dataset]:
    return list(session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id)
        .order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit)))


def check_dataset_ref(session: Session, tenant_id: str, name: str) -> None:
    """A JobSpec's dataset: a built-in name or a dataset id of this tenant, else 404."""
    if name in BUILTINS:
        return
    if name.startswith("synthetic-"):
        raise NotFound(f"unknown synthetic dataset {name!r}; built-in datasets are "
                       f"{', '.join(BUILTINS)}")
    get_dataset(session, tenant_id, name)
