"""A job's inputs: the model (an uploaded checkpoint or a fresh zoo architecture) and the dataset
(built in or uploaded), fetched from the object store into a temporary directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import data as datasets
from core import models as zoo
from core.errors import CheckpointError, DatasetError, SpecError
from service.db import session_scope
from service.orm import Dataset, Job, Model
from service.settings import Settings
from service.spec import JobSpec
from service.store import ObjectStore
from worker.datasets import locate_fashion_mnist


@dataclass(frozen=True)
class InputModel:
    model: nn.Module
    name: str
    model_id: str | None  # the Model row it came from, if any


def load_input_model(spec: JobSpec, tenant_id: str, settings: Settings, store: ObjectStore,
                     workdir: Path) -> InputModel:
    if spec.model_id is None:
        arch = spec.model.arch  # type: ignore[union-attr]
        model = zoo.build(arch, generator=torch.Generator().manual_seed(spec.seed))
        return InputModel(model, str(arch["name"]), None)
    model, name = fetch_model(spec.model_id, tenant_id, settings, store,
                              workdir / "input.safetensors")
    return InputModel(model, name, spec.model_id)


def fetch_model(model_id: str, tenant_id: str, settings: Settings, store: ObjectStore,
                path: Path) -> tuple[nn.Module, str]:
    """(model, name) of the tenant's Model `model_id`, fetched to `path`; a missing or foreign
    id is a SpecError (the API checked it at submission; it may have gone since)."""
    with session_scope(settings) as session:
        row = session.get(Model, model_id)
        if row is None or row.tenant_id != tenant_id:
            raise SpecError(f"model {model_id} does not exist (or belongs to another tenant)")
        name, key = row.name, row.storage_key
    store.get_to_file(key, path)
    try:
        model = zoo.load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"stored checkpoint of model {model_id} is unreadable: {exc}") \
            from None
    return (model.float() if _is_half(model) else model), name


def model_origin(spec: JobSpec, tenant_id: str, settings: Settings) -> str:
    """"zoo" when the job's input model was built by the service (a fresh arch, or a chain of
    job outputs starting from one: the arch's `init` is how its weights began), "upload" when
    its lineage starts at an uploaded checkpoint (trained elsewhere; the arch's `init` is only
    the filled-in default)."""
    model_id = spec.model_id
    with session_scope(settings) as session:
        for _ in range(1000):  # a lineage is a chain of jobs; never a cycle, but be safe
            if model_id is None:
                return "zoo"
            row = session.get(Model, model_id)
            if row is None or row.tenant_id != tenant_id or row.source_job_id is None:
                return "upload"
            job = session.get(Job, row.source_job_id)
            source = (job.spec or {}).get("model") if job is not None else None
            if not isinstance(source, (str, dict)):
                return "upload"
            model_id = source if isinstance(source, str) else None
    return "upload"


def _is_half(model: nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is not None and param.dtype in (torch.float16, torch.bfloat16)


def _uploaded_arrays(row: Dataset, path: Path) -> dict[str, np.ndarray]:
    if row.format == "npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise DatasetError(f"dataset {row.id} is not a readable .npz file: {exc}") from None
    if row.format == "safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DatasetError(f"dataset {row.id} is not a readable safetensors file: {exc}") \
                from None
    raise DatasetError(f"dataset {row.id} has unsupported format {row.format!r}")


def load_dataset(spec: JobSpec, tenant_id: str, settings: Settings, store: ObjectStore,
                 workdir: Path, num_classes: int
                 ) -> tuple[datasets.ArrayDataset, datasets.ArrayDataset | None]:
    """(train, test or None) for the spec's dataset."""
    name = spec.dataset
    if name == "fashion-mnist":
        return datasets.fashion_mnist(locate_fashion_mnist(settings))
    if name.startswith("synthetic-"):
        return datasets.synthetic(name, spec.seed)
    with session_scope(settings) as session:
        row = session.get(Dataset, name)
        if row is None or row.tenant_id != tenant_id:
            raise DatasetError(f"dataset {name!r} does not exist: use 'fashion-mnist', "
                               f"{', '.join(datasets.SYNTHETIC)} or an uploaded dataset id")
        session.expunge(row)
    path = workdir / f"dataset.{row.format}"
    store.get_to_file(row.storage_key, path)
    return datasets.from_arrays(_uploaded_arrays(row, path), num_classes=num_classes)


def check_compatible(model: nn.Module, train: datasets.ArrayDataset,
                     test: datasets.ArrayDataset | None) -> list[int]:
    """The model's input shape, after checking the data fits it (shape and label range)."""
    arch = zoo.model_arch(model)
    shape = [int(s) for s in arch["input_shape"]]
    for part, ds in (("training", train), ("test", test)):
        if ds is None:
            continue
        if ds.input_shape != shape:
            raise DatasetError(f"the {part} samples have shape {ds.input_shape} but the model "
                               f"expects input_shape {shape}; set input_shape in the arch")
        if len(ds) and int(ds.y.max()) >= int(arch["num_classes"]):
            raise DatasetError(f"the {part} labels go up to {int(ds.y.max())} but the model has "
                               f"num_classes={arch['num_classes']}")
    return shape
