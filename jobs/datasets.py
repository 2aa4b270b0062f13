"""Datasets: built-in names and uploaded `.npz`/`.safetensors` arrays, validated with numpy
(never unpickled) before they are stored."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.errors import InvalidDataset, NotFound, UnsupportedFormat
from jobs.model_registry import (
    file_digest,
    looks_like_safetensors,
    looks_like_zip,
    store_then_add,
)
from jobs.orm import Dataset, new_id
from jobs.spec import BUILTIN_DATASETS
from jobs.store import ObjectStore

REQUIRED = ("x_train", "y_train")
OPTIONAL = ("x_test", "y_test")
BUILTINS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST, 60k/10k 28x28 grayscale images, 10 classes",
    "synthetic-blobs": "seeded Gaussian clusters as 1x28x28 images, 10 classes",
    "synthetic-tiny": "a few hundred seeded samples, for tests",
}
assert set(BUILTINS) == set(BUILTIN_DATASETS)


def dataset_format(path: str | Path, filename: str) -> str:
    suffix = Path(filename or "").suffix.lower()
    if suffix == ".npz" and looks_like_zip(path):
        return "npz"
    if suffix == ".safetensors" and looks_like_safetensors(path):
        return "safetensors"
    raise UnsupportedFormat(f"unsupported dataset file {filename!r}; upload a .npz "
                            "(numpy.savez) or .safetensors file with arrays x_train, y_train "
                            "and optionally x_test, y_test")


def _load_arrays(path: str | Path, fmt: str) -> dict[str, np.ndarray]:
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InvalidDataset("the file holds object (pickled) arrays, which are never "
                                 "loaded; save plain numeric arrays") from exc
        raise InvalidDataset(f"cannot read the {fmt} file: {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidDataset(f"cannot read the {fmt} file (truncated or corrupt?): {exc}") \
            from exc
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidDataset(f"cannot read the {fmt} file: {exc}") from exc


def _check_pair(arrays: dict[str, np.ndarray], split: str) -> tuple[int, tuple[int, ...], int]:
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.dtype.kind not in "biuf":
        raise InvalidDataset(f"x_{split} has dtype {x.dtype}; use a numeric dtype (float32)")
    if x.ndim not in (2, 3, 4):
        raise InvalidDataset(f"x_{split} has shape {x.shape}; use (N, features), (N, H, W) "
                             "or (N, C, H, W)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InvalidDataset(f"x_{split} contains NaN or infinite values")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InvalidDataset(f"y_{split} must be a 1-D integer array of class labels, got shape "
                             f"{y.shape} dtype {y.dtype}")
    if len(x) != len(y):
        raise InvalidDataset(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    if len(y) == 0:
        raise InvalidDataset(f"x_{split} is empty")
    if y.min() < 0:
        raise InvalidDataset(f"y_{split} has negative labels; labels are 0..num_classes-1")
    return len(x), tuple(int(d) for d in x.shape[1:]), int(y.max()) + 1


def validate_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Check names, dtypes, shapes, finiteness and labels; return the dataset's meta."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise InvalidDataset(f"missing arrays {missing}; a dataset holds x_train, y_train and "
                             "optionally x_test, y_test")
    unexpected = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unexpected:
        raise InvalidDataset(f"unexpected arrays {unexpected}; allowed: "
                             f"{list(REQUIRED + OPTIONAL)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise InvalidDataset("give both x_test and y_test, or neither")
    n_train, shape, classes = _check_pair(arrays, "train")
    meta: dict[str, Any] = {"input_shape": list(shape), "counts": {"train": n_train}}
    if "x_test" in arrays:
        n_test, test_shape, test_classes = _check_pair(arrays, "test")
        if test_shape != shape:
            raise InvalidDataset(f"x_test samples have shape {list(test_shape)} but x_train "
                                 f"samples have {list(shape)}")
        meta["counts"]["test"] = n_test
        classes = max(classes, test_classes)
    meta["num_classes"] = classes
    return meta


def validate_dataset_file(path: str | Path, fmt: str) -> dict[str, Any]:
    return validate_arrays(_load_arrays(path, fmt))


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
