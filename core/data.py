"""Datasets as in-memory tensors: IDX files (Fashion-MNIST), user arrays, synthetic sets, splits.

Every dataset is an `ArrayDataset` with `x` float32 `(N, C, H, W)` and `y` int64 `(N,)`.
Flat feature arrays `(N, D)` become `(N, 1, 1, D)`: one layout for every consumer; the zoo
models flatten their input, so an MLP with `input_shape=[1, 1, D]` reads them directly.

Preprocessing (what a model expects of its inputs, `arch["preprocessing"]`): `channel_stats`
(per-channel mean/std), `standardize` ((x - mean[c]) / std[c]), `adapt` (replicate a single
channel, bilinear resize) and `to_layout` (NCHW as read, NHWC `(N, H, W, C)` or flat `(N, D)`,
the only datasets whose `x` is not 4-D).
"""
from __future__ import annotations

import gzip
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from core.errors import DatasetError

FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz":
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz":
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz":
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

SYNTHETIC = ("synthetic-blobs", "synthetic-tiny")
LAYOUTS = ("NCHW", "NHWC", "flat")
_CHUNK = 4096  # samples per chunk of the preprocessing passes (bounds their temporary memory)

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ArrayDataset(Dataset):
    """`x` float32 (N, C, H, W), `y` int64 (N,), held as tensors. `to_layout` makes the only
    other shapes: (N, H, W, C) and (N, D)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.ndim not in (2, 4) or x.dtype != torch.float32:
            raise DatasetError(f"x must be float32 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or y.dtype != torch.int64 or y.shape[0] != x.shape[0]:
            raise DatasetError(f"y must be int64 (N,) with N={x.shape[0]}, "
                               f"got {y.dtype} {tuple(y.shape)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    @property
    def input_shape(self) -> list[int]:
        return [int(s) for s in self.x.shape[1:]]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self) else 0

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class Splits:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


# ---- IDX files ----

def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into a native-endian numpy array."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path} is not a valid gzip file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: IDX shape {shape} needs {expected} data bytes, "
                           f"file has {len(raw) - header}")
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzip-compressed when the path ends in .gz)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise DatasetError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[codes[dtype]]).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    Path(path).write_bytes(payload)


def _find_idx(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.exists():
            return candidate
    raise DatasetError(f"{directory} has neither {name}.gz nor {name}")


def fashion_mnist(directory: str | os.PathLike[str]) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from the four IDX files in `directory`; pixels scaled to [0, 1]."""
    directory = Path(directory)
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
            raise DatasetError(f"{prefix}: expected uint8 (N, 28, 28) images and (N,) labels, "
                               f"got {images.dtype} {images.shape} and {labels.shape}")
        if images.shape[0] != labels.shape[0] or labels.size and labels.max() > 9:
            raise DatasetError(f"{prefix}: {images.shape[0]} images but {labels.shape[0]} "
                               "labels, or labels outside 0..9")
        x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28)
        parts.append(ArrayDataset(x, torch.from_numpy(labels.astype(np.int64))))
    return parts[0], parts[1]


# ---- user arrays ----

def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DatasetError(f"{name} must be a numpy array or a torch tensor, "
                       f"got {type(value).__name__}")


def _images(name: str, value: Any) -> torch.Tensor:
    arr = _as_numpy(name, value)
    if arr.ndim not in (2, 3, 4):
        raise DatasetError(f"{name} must have shape (N, D), (N, H, W) or (N, C, H, W), "
                           f"got {arr.shape}")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise DatasetError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] == 0:
        raise DatasetError(f"{name} is empty")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DatasetError(f"{name} contains NaN or Inf values")
    x = torch.from_numpy(np.ascontiguousarray(arr))
    x = x.float() / 255.0 if arr.dtype == np.uint8 else x.float()
    if x.ndim == 2:
        x = x[:, None, None, :]  # (N, D) -> (N, 1, 1, D)
    elif x.ndim == 3:
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    return x.contiguous()


def _labels(name: str, value: Any, n: int, num_classes: int | None) -> torch.Tensor:
    arr = _as_numpy(name, value)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DatasetError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "ui":
        raise DatasetError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise DatasetError(f"{name} labels must be in {limit}, found range [{low}, {high}]")
    return torch.from_numpy(arr.astype(np.int64))


def from_arrays(mapping: Mapping[str, Any], *, num_classes: int | None = None,
                ) -> tuple[ArrayDataset, ArrayDataset | None]:
    """(train, test or None) from `x_train, y_train[, x_test, y_test]` arrays or tensors.

    uint8 images are scaled to [0, 1]; other numeric dtypes are cast to float32 unchanged.
    `(N, H, W)` gains a channel axis; `(N, D)` becomes `(N, 1, 1, D)`.
    """
    allowed = {"x_train", "y_train", "x_test", "y_test"}
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise DatasetError(f"unexpected arrays {unknown}; expected {sorted(allowed)}")
    for key in ("x_train", "y_train"):
        if key not in mapping:
            raise DatasetError(f"missing array {key!r}")
    if ("x_test" in mapping) != ("y_test" in mapping):
        raise DatasetError("give both x_test and y_test, or neither")
    x = _images("x_train", mapping["x_train"])
    train = ArrayDataset(x, _labels("y_train", mapping["y_train"], x.shape[0], num_classes))
    if "x_test" not in mapping:
        return train, None
    xt = _images("x_test", mapping["x_test"])
    if xt.shape[1:] != x.shape[1:]:
        raise DatasetError(f"x_test samples have shape {tuple(xt.shape[1:])}, x_train samples "
                           f"{tuple(x.shape[1:])}")
    return train, ArrayDataset(xt, _labels("y_test", mapping["y_test"], xt.shape[0], num_classes))


# ---- synthetic data ----

def _blobs(generator: torch.Generator, shape: tuple[int, int, int], classes: int,
           n_train: int, n_test: int, noise: float) -> tuple[ArrayDataset, ArrayDataset]:
    dim = shape[0] * shape[1] * shape[2]
    means = torch.rand(classes, dim, generator=generator)  # one prototype image per class
    out = []
    for n in (n_train, n_test):
        y = torch.randint(0, classes, (n,), generator=generator)
        x = means[y] + noise * torch.randn(n, dim, generator=generator)  # (n, dim)
        out.append(ArrayDataset(x.reshape(n, *shape).contiguous(), y))
    return out[0], out[1]


def synthetic(name: str, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Deterministic (train, test) for `seed`: Gaussian clusters around 10 class prototypes.

    synthetic-blobs: (1, 28, 28), 2000 train / 500 test; synthetic-tiny: (1, 8, 8), 256 / 128.
    """
    generator = torch.Generator().manual_seed(int(seed))
    if name == "synthetic-blobs":
        return _blobs(generator, (1, 28, 28), 10, 2000, 500, noise=1.0)
    if name == "synthetic-tiny":
        return _blobs(generator, (1, 8, 8), 10, 256, 128, noise=0.5)
    raise DatasetError(f"unknown synthetic dataset {name!r}; valid: {', '.join(SYNTHETIC)}")


# ---- preprocessing ----

def _chunks(n: int) -> list[slice]:
    return [slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)]


def _nchw(data: ArrayDataset, what: str) -> None:
    if data.x.ndim != 4:
        raise DatasetError(f"{what} needs (N, C, H, W) samples, got {tuple(data.x.shape)}")


def channel_stats(data: ArrayDataset) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) over every sample and position of (N, C, H, W) data: population
    statistics, accumulated in float64. A channel with no spread (std 0) gets std 1."""
    _nchw(data, "channel statistics")
    if not len(data):
        raise DatasetError("channel statistics of an empty dataset")
    c = data.x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for part in _chunks(len(data)):
        x = data.x[part].double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = data.x.numel() // c
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [float(v) for v in mean], [float(v) for v in std]


def standardize(data: ArrayDataset, mean: list[float], std: list[float]) -> ArrayDataset:
    """A copy with `(x - mean[c]) / std[c]` per channel of (N, C, H, W) data."""
    _nchw(data, "standardize")
    c = data.x.shape[1]
    if len(mean) != c or len(std) != c:
        raise DatasetError(f"mean/std have {len(mean)}/{len(std)} entries but the samples "
                           f"have {c} channel(s); give one per channel")
    m = torch.tensor(mean, dtype=torch.float64).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, c, 1, 1)
    out = torch.empty_like(data.x)
    for part in _chunks(len(data)):
        out[part] = ((data.x[part].double() - m) / s).float()
    return ArrayDataset(out, data.y)


def adapt(data: ArrayDataset, shape: list[int]) -> ArrayDataset:
    """(N, C', H', W') data as `shape` = [C, H, W]: a single channel is replicated to C (any
    other channel count must equal C), and H' x W' is resized to H x W (bilinear, no
    antialiasing) when they differ. Returns `data` itself when it already has `shape`."""
    _nchw(data, "adapt")
    c, h, w = (int(v) for v in shape)
    c0, h0, w0 = data.input_shape
    if c0 != c and c0 != 1:
        raise DatasetError(f"cannot turn samples with {c0} channels into {c} channels "
                           "(only a single channel is replicated)")
    if [c0, h0, w0] == [c, h, w]:
        return data
    out = torch.empty(len(data), c, h, w, dtype=torch.float32)
    for part in _chunks(len(data)):
        x = data.x[part]
        if (h0, w0) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=False)
        out[part] = x.expand(-1, c, -1, -1) if c0 != c else x
    return ArrayDataset(out, data.y)


def to_layout(data: ArrayDataset, layout: str) -> ArrayDataset:
    """(N, C, H, W) data as the model reads it: NCHW (unchanged), NHWC (N, H, W, C), flat (N,
    C*H*W in NCHW order)."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    _nchw(data, "to_layout")
    if layout == "NHWC":
        return ArrayDataset(data.x.permute(0, 2, 3, 1).contiguous(), data.y)
    if layout == "flat":
        return ArrayDataset(data.x.reshape(len(data), math.prod(data.input_shape)), data.y)
    return data


# ---- splits ----

def split(train: ArrayDataset, test: ArrayDataset | None, seed: int,
          val_fraction: float = 0.1) -> Splits:
    """Carve a validation set (and the test set, when `test` is None) out of `train`.

    Deterministic in `seed`; each carved part has `round(val_fraction * N)` samples (at least 1
    while N allows a non-empty training set).
    """
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(train)
    carve = max(1, round(val_fraction * n))
    parts = 1 if test is not None else 2
    if n - parts * carve < 1:
        raise DatasetError(f"{n} training samples are too few to split off "
                           f"{parts} x {carve} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val = train.subset(order[:carve])
    if test is None:
        test = train.subset(order[carve:2 * carve])
    return Splits(train.subset(order[parts * carve:]), val, test)
