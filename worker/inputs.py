"""A job's inputs: the model (an uploaded checkpoint or a fresh zoo architecture) and the dataset
(built in or uploaded), fetched from the object store into a temporary directory, and the data
prepared once for the model (`prepare_data`: shapes, normalization, layout)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import data as datasets
from core import models as zoo
from core.data import Splits, split
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


def _check_labels(arch: dict[str, Any], train: datasets.ArrayDataset,
                  test: datasets.ArrayDataset | None) -> None:
    for part, ds in (("training", train), ("test", test)):
        if ds is not None and len(ds) and int(ds.y.max()) >= int(arch["num_classes"]):
            raise DatasetError(f"the {part} labels go up to {int(ds.y.max())} but the model has "
                               f"num_classes={arch['num_classes']}")


# ---- preprocessing: what the model reads, applied once to the whole dataset ----

@dataclass
class PreparedData:
    """The job's data as every step sees it (train, evaluate and every calibration pass)."""

    splits: Splits
    input_shape: list[int]  # one sample as the model reads it (in its layout)
    layout: str  # NCHW, NHWC or flat
    # what the output model's arch records under "preprocessing" (None: nothing was set, the
    # arch stays as it was)
    preprocessing: dict[str, Any] | None
    # what the job's result records about it (None when nothing was set or adapted)
    summary: dict[str, Any] | None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (kind, data)


def _stored_preprocessing(arch: dict[str, Any]) -> dict[str, Any] | None:
    stored = arch.get("preprocessing")
    if stored is None:
        return None
    if not isinstance(stored, dict) or stored.get("layout", "NCHW") not in datasets.LAYOUTS:
        raise CheckpointError(f"the model's preprocessing {stored!r:.200} is malformed: "
                              "expected {'layout': 'NCHW'|'NHWC'|'flat', 'mean': [...]|null, "
                              "'std': [...]|null}")
    return stored


def _model_chw(shape: list[int], layout: str) -> list[int] | None:
    """The [C, H, W] of the images a model with input `shape` in `layout` reads; None for a
    flat input of D values (no image shape known)."""
    if layout == "NHWC":
        if len(shape) != 3:
            raise DatasetError(f"the model's layout is NHWC but its input_shape {shape} is not "
                               "[H, W, C]")
        return [shape[2], shape[0], shape[1]]
    if layout == "flat" and len(shape) != 3:
        return None
    if len(shape) != 3:
        raise DatasetError(f"the model's input_shape {shape} is not an image [C, H, W]; for a "
                           "model reading flat vectors set its preprocessing layout to 'flat'")
    return shape


def _shape_for_model(ds: datasets.ArrayDataset, part: str, shape: list[int], layout: str,
                     can_adapt: bool, events: list[tuple[str, dict[str, Any]]]
                     ) -> datasets.ArrayDataset:
    """`ds` (N, C, H, W) with the [C, H, W] the model reads: adapted (1 -> C channels, bilinear
    resize) when the model's input is fixed (`can_adapt`: a stored model), with a warning event;
    refused otherwise."""
    target = _model_chw(shape, layout)
    have = ds.input_shape
    if target is None:  # flat [D]: the sample must hold D values
        if math.prod(have) != shape[0]:
            raise DatasetError(f"the {part} samples have shape {have} ({math.prod(have)} "
                               f"values) but the model reads flat vectors of {shape[0]}")
        return ds
    if have == target:
        return ds
    fix = ("set input_shape in the arch" if not can_adapt else
           "use data of that shape, or a model made for it")
    refusal = (f"the {part} samples have shape {have} but the model expects input_shape "
               f"{shape} (layout {layout}, images {target}); {fix}")
    if not can_adapt:
        raise DatasetError(refusal)
    if (have[0] != target[0] and have[0] != 1) or (have[1:] != target[1:] and
                                                   (min(have[1:]) < 2 or min(target[1:]) < 2)):
        raise DatasetError(refusal + " (a single channel is replicated and images are resized; "
                           "nothing else is adapted)")
    changes = []
    if have[0] != target[0]:
        changes.append(f"its single channel replicated to {target[0]}")
    if have[1:] != target[1:]:
        changes.append(f"resized from {have[1]}x{have[2]} to {target[1]}x{target[2]} "
                       "(bilinear, no antialiasing)")
    message = (f"the {part} samples {have} do not match the model's input {target}: "
               f"{' and '.join(changes)}")
    events.append(("warning", {"code": "input_adapted", "part": part, "from": have,
                               "to": target, "message": message}))
    return datasets.adapt(ds, target)


def _stats(value: Any, channels: int, what: str, error: type[Exception] = SpecError
           ) -> list[float] | None:
    if value is None:
        return None
    stats = [float(v) for v in value]
    if len(stats) != channels:
        raise error(f"{what} has {len(stats)} entries but the data has {channels} "
                    f"channel(s); give one per input channel")
    return stats


def _same(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
                                    for x, y in zip(a, b, strict=True))


def prepare_data(model: nn.Module, train: datasets.ArrayDataset,
                 test: datasets.ArrayDataset | None, *, normalize: Any, seed: int,
                 can_adapt: bool) -> PreparedData:
    """Split the data (`core.data.split`) and prepare it once for the model: shapes fitted to
    its input, per-channel `(x - mean) / std`, then its layout (NHWC permuted, flat flattened).

    The model's arch may carry `preprocessing` {layout, mean, std} (an upload's form fields, or
    an earlier job's output). `normalize` (the JobSpec's field) decides the statistics: None =
    the stored ones (raw inputs when there are none), "none" = raw, "standardize" = per-channel
    mean/std of the training split, {"mean", "std"} = those. A spec that changes a stored
    model's statistics wins, with a warning event. `can_adapt`: the model's input is fixed (a
    stored model), so a single channel is replicated and images resized to fit it (warning
    event); a fresh arch's mismatch is refused (set its input_shape).
    """
    arch = zoo.model_arch(model)
    _check_labels(arch, train, test)
    stored = _stored_preprocessing(arch)
    layout = str(stored.get("layout", "NCHW")) if stored else "NCHW"
    shape = [int(s) for s in arch["input_shape"]]
    events: list[tuple[str, dict[str, Any]]] = []
    train = _shape_for_model(train, "training", shape, layout, can_adapt, events)
    if test is not None:
        test = _shape_for_model(test, "test", shape, layout, can_adapt, events)
    splits = split(train, test, seed)
    channels = splits.train.input_shape[0]
    stored = stored or {}
    stored_mean = _stats(stored.get("mean"), channels, "the model's preprocessing mean",
                         DatasetError)
    stored_std = _stats(stored.get("std"), channels, "the model's preprocessing std",
                        DatasetError)
    if normalize is None:
        mean, std, source = stored_mean, stored_std, "model"
    elif normalize == "none":
        mean, std, source = None, None, "none"
    elif normalize == "standardize":
        mean, std = datasets.channel_stats(splits.train)
        source = "standardize"
    else:
        values = normalize if isinstance(normalize, dict) else normalize.model_dump()
        mean = _stats(values["mean"], channels, "normalize.mean")
        std = _stats(values["std"], channels, "normalize.std")
        source = "spec"
    if normalize is not None and stored and not (
            _same(mean, stored_mean) and _same(std, stored_std)):
        events.append(("warning", {
            "code": "normalize_overrides_model",
            "message": (f"normalize {source!r} overrides the model's stored preprocessing "
                        f"(mean {stored_mean}, std {stored_std}): the job feeds mean {mean}, "
                        f"std {std}"),
            "stored": {"mean": stored_mean, "std": stored_std}}))
    if mean is not None or std is not None:
        mean = mean if mean is not None else [0.0] * channels
        std = std if std is not None else [1.0] * channels
        splits = Splits(*(datasets.standardize(part, mean, std) for part in
                          (splits.train, splits.val, splits.test)))
    if layout != "NCHW":
        splits = Splits(*(datasets.to_layout(part, layout) for part in
                          (splits.train, splits.val, splits.test)))
    record = None
    if stored or normalize is not None:
        record = {"layout": layout, "mean": mean, "std": std}
    adapted = [data for kind, data in events if data.get("code") == "input_adapted"]
    summary = None
    if record is not None or adapted:
        summary = {"layout": layout, "mean": mean, "std": std,
                   "source": source if mean is not None else "none",
                   "adapted": [{k: d[k] for k in ("part", "from", "to")} for d in adapted]}
        events.append(("preprocessing", dict(summary)))
    return PreparedData(splits, splits.train.input_shape, layout, record, summary, events)
