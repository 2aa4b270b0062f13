"""Checks of uploaded files that read as little as possible and need no database: safetensors
header and layout checks (from the 8-byte length and the JSON header, never the tensor data), and
dataset validation (the zip directory of an `.npz` is judged before anything is decompressed).

Stdlib only at module level (numpy is imported inside the dataset functions), so the inspector
subprocess starts fast and the API process can use the cheap checks without loading numpy."""
from __future__ import annotations

import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import (
    InvalidDataset,
    SlimlineError,
    Unprocessable,
    UnsupportedFormat,
    UploadTooLarge,
)

if TYPE_CHECKING:
    import numpy as np

REQUIRED = ("x_train", "y_train")
OPTIONAL = ("x_test", "y_test")

# zip directory limits: a dataset has at most four arrays, so a few more members is already wrong
MAX_NPZ_MEMBERS = 16
MAX_NPZ_DIRECTORY_BYTES = 1024 * 1024
# members smaller than this are not judged by their own compression ratio (a tiny all-zero label
# array compresses well and inflates to nothing); the total ratio still counts them
RATIO_FLOOR_BYTES = 1024 * 1024
NPY_MAX_HEADER = 10000  # numpy's own default for .npy headers
_EOCD = struct.Struct("<4s4H2LH")  # zip end-of-central-directory record


def safetensors_header_length(path: str | Path) -> int | None:
    """The 8-byte little-endian header length at the start of a safetensors file (None when the
    file is shorter than 8 bytes). Nothing else is read."""
    with open(path, "rb") as f:
        head = f.read(8)
    return struct.unpack("<Q", head)[0] if len(head) == 8 else None


def looks_like_safetensors(path: str | Path) -> bool:
    """8-byte little-endian header length that fits in the file, then a JSON object."""
    length = safetensors_header_length(path)
    if length is None or length < 2 or length > Path(path).stat().st_size - 8:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        first = f.read(1)
    return first == b"{"


def check_safetensors_header_size(path: str | Path, max_header_bytes: int,
                                  what: str = "checkpoint") -> None:
    """Refuse (413) a safetensors header over `max_header_bytes` from its 8-byte length alone,
    before anything of the header is read or parsed."""
    length = safetensors_header_length(path) or 0
    if length > max_header_bytes:
        raise UploadTooLarge(f"the {what}'s safetensors header is {length} bytes, over the limit "
                             f"of {max_header_bytes} bytes "
                             "(SLIMLINE_MAX_SAFETENSORS_HEADER_BYTES); "
                             "a header holds tensor names, dtypes and shapes and is normally a "
                             "few KiB: re-save the file with safetensors")


# bytes per element of each safetensors dtype
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2,
                      "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                      "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def read_safetensors_layout(path: str | Path, max_header_bytes: int, what: str = "checkpoint",
                            error: type[SlimlineError] = Unprocessable,
                            ) -> tuple[list[TensorEntry], dict[str, str]]:
    """(tensors, metadata) of a safetensors file after checking its layout against the file: the
    header is at most `max_header_bytes` (413 before it is read), valid JSON, every dtype known,
    every tensor's byte range exactly dtype size x shape, and the ranges tile the data area with
    no gap, overlap or trailing bytes. Nothing of the tensor data is read. Other faults raise
    `error` (422)."""
    size = Path(path).stat().st_size
    check_safetensors_header_size(path, max_header_bytes, what)
    length = safetensors_header_length(path)
    fix = "re-save it with safetensors"
    if length is None or length < 2 or 8 + length > size:
        raise error(f"the {what} is truncated or not a safetensors file (its header length does "
                    f"not fit in the {size}-byte file); {fix}")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise error(f"the {what}'s safetensors header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise error(f"the {what}'s safetensors header is not a JSON object; {fix}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"the {what}'s safetensors __metadata__ must map names to strings; {fix}")
    data_start, data_len = 8 + length, size - 8 - length
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise error(f"tensor {name!r} in the {what}'s safetensors header is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise error(f"tensor {name!r} has unknown dtype {dtype!r}; known: "
                        f"{', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise error(f"tensor {name!r} has shape {shape!r}; a shape is a list of "
                        "non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise error(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise error(f"tensor {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) but "
                        f"its data_offsets span {offsets[1] - offsets[0]} bytes; {fix}")
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes))
    end = data_start
    for entry in sorted(entries, key=lambda e: (e.start, e.nbytes)):
        if entry.start != end:
            raise error(f"the {what}'s tensors do not tile its data area (a gap or overlap at "
                        f"tensor {entry.name!r}); {fix}")
        end += entry.nbytes
    if end != size:
        raise error(f"the {what}'s header declares {end - data_start} bytes of tensor data but "
                    f"the file holds {data_len}; it is truncated or padded, {fix}")
    return entries, {str(k): v for k, v in metadata.items()}


def looks_like_zip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def zip_directory_size(path: str | Path) -> tuple[int, int] | None:
    """(entries, central directory bytes) of a zip file from its end-of-central-directory record
    (and the zip64 one when the plain record holds the zip64 sentinels), read from the file's
    end before anything else of it is parsed; None when there is no such record."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = max(0, size - (_EOCD.size + 65535))
        f.seek(start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            return None
        _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
        if entries != 0xFFFF and cd_size != 0xFFFFFFFF:
            return entries, cd_size
        # zip64: a locator (20 bytes) right before the record points at the zip64 record
        loc = at - _ZIP64_LOCATOR.size
        if loc < 0 or tail[loc:loc + 4] != b"PK\x06\x07":
            return None
        _, _, record_at, _ = _ZIP64_LOCATOR.unpack_from(tail, loc)
        if record_at + _ZIP64_EOCD.size > size:
            return None
        f.seek(record_at)
        raw = f.read(_ZIP64_EOCD.size)
    if len(raw) < _ZIP64_EOCD.size or raw[:4] != b"PK\x06\x06":
        return None
    fields = _ZIP64_EOCD.unpack(raw)
    return fields[7], fields[8]


_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _zip_directory_size(path: Path) -> tuple[int, int]:
    """(entries, central directory bytes) from the end-of-central-directory record."""
    found = zip_directory_size(path)
    if found is None:
        raise InvalidDataset("cannot read the npz file (truncated or corrupt?): no zip directory "
                             "at its end; save it again with numpy.savez")
    return found


def check_npz_directory(path: str | Path, max_bytes: int, max_ratio: float
                        ) -> list[zipfile.ZipInfo]:
    """Refuse an `.npz` from its zip directory alone, before anything is decompressed: too many
    members, members that are not plain `.npy` files, more than `max_bytes` uncompressed (413),
    or a compression ratio over `max_ratio` per member or in total (422, a zip bomb)."""
    path = Path(path)
    entries, cd_size = _zip_directory_size(path)
    if entries > MAX_NPZ_MEMBERS or cd_size > MAX_NPZ_DIRECTORY_BYTES:
        raise InvalidDataset(f"the npz file has {entries} members ({cd_size} bytes of zip "
                             f"directory); a dataset holds at most {MAX_NPZ_MEMBERS}: x_train, "
                             "y_train and optionally x_test, y_test")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InvalidDataset(f"cannot read the npz file (truncated or corrupt?): {exc}") from exc
    if len(infos) > MAX_NPZ_MEMBERS:
        raise InvalidDataset(f"the npz file has {len(infos)} members; a dataset holds at most "
                             f"{MAX_NPZ_MEMBERS}")
    seen: set[str] = set()
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".npy") or "/" in info.filename:
            raise InvalidDataset(f"npz member {info.filename!r} is not a .npy array; save the "
                                 "arrays with numpy.savez")
        if info.filename in seen:
            raise InvalidDataset(f"npz member {info.filename!r} appears twice")
        seen.add(info.filename)
        if info.flag_bits & 0x1:
            raise InvalidDataset(f"npz member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidDataset(f"npz member {info.filename!r} uses zip compression method "
                                 f"{info.compress_type}; save with numpy.savez or "
                                 "numpy.savez_compressed")
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > max_bytes:
        raise UploadTooLarge(f"the dataset's arrays are {total} bytes ({_mib(total)}) "
                             f"uncompressed, over the limit of {max_bytes} bytes "
                             "(SLIMLINE_MAX_DATASET_BYTES)")
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > max_ratio:
            raise InvalidDataset(
                f"npz member {info.filename!r} inflates from {info.compress_size} to "
                f"{info.file_size} bytes, a compression ratio of {ratio:.0f} over the limit of "
                f"{max_ratio:g} (SLIMLINE_MAX_DECOMPRESSION_RATIO); this looks like a zip bomb. "
                "Save real data with numpy.savez (uncompressed)")
    ratio = total / max(packed, 1)
    if total > RATIO_FLOOR_BYTES and ratio > max_ratio:
        raise InvalidDataset(f"the npz file inflates from {packed} to {total} bytes, a "
                             f"compression ratio of {ratio:.0f} over the limit of {max_ratio:g} "
                             "(SLIMLINE_MAX_DECOMPRESSION_RATIO); this looks like a zip bomb. "
                             "Save real data with numpy.savez (uncompressed)")
    return infos


def _npy_header(fp: Any, member: str) -> tuple[Any, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of the `.npy` stream at `fp`; refuses object arrays."""
    import numpy as np
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(fp)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(fp, max_header_size=NPY_MAX_HEADER)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidDataset(f"npz member {member!r} is not a valid .npy array ({exc}); save "
                             "the arrays with numpy.savez") from exc
    if dtype.hasobject:
        raise InvalidDataset(f"{member.removesuffix('.npy')} holds object (pickled) arrays, "
                             "which are never loaded; save plain numeric arrays")
    if dtype.itemsize == 0 and not np.issubdtype(dtype, np.void):
        raise InvalidDataset(f"npz member {member!r} has dtype {dtype} of size 0")
    return dtype, tuple(shape), bool(fortran)


def _load_npz(path: Path, infos: list[zipfile.ZipInfo]) -> dict[str, np.ndarray]:
    """The arrays of a checked `.npz`: stored (uncompressed) members are memory-mapped from the
    file, deflated ones are read (their size was bounded by the directory check)."""
    import numpy as np
    from numpy.lib import format as npy

    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in infos:
            name = info.filename.removesuffix(".npy")
            with zf.open(info) as member:
                dtype, shape, fortran = _npy_header(member, info.filename)
                header_end = member.tell()
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if header_end + nbytes != info.file_size:
                raise InvalidDataset(f"npz member {info.filename!r} declares shape "
                                     f"{list(shape)} of {dtype} ({nbytes} bytes) but holds "
                                     f"{info.file_size - header_end}; save it again with "
                                     "numpy.savez")
            if info.compress_type == zipfile.ZIP_STORED and nbytes > 0:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise InvalidDataset(f"npz member {info.filename!r}: bad zip local header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len + header_end
                arrays[name] = np.memmap(raw, dtype=dtype, mode="r", offset=start, shape=shape,
                                         order="F" if fortran else "C")
            else:
                with zf.open(info) as member:
                    try:
                        arrays[name] = npy.read_array(member, allow_pickle=False)
                    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                        raise InvalidDataset(f"cannot read npz member {info.filename!r} "
                                             f"(truncated or corrupt?): {exc}") from exc
    return arrays


_NUMPY_DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
                 "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8",
                 "F64": "<f8"}


def _load_safetensors(path: Path, max_bytes: int, max_header_bytes: int
                      ) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of a safetensors file whose header and layout were checked first."""
    import numpy as np

    entries, _ = read_safetensors_layout(path, max_header_bytes, "dataset", InvalidDataset)
    total = sum(e.nbytes for e in entries)
    if total > max_bytes:
        raise UploadTooLarge(f"the dataset's arrays are {total} bytes ({_mib(total)}), over the "
                             f"limit of {max_bytes} bytes (SLIMLINE_MAX_DATASET_BYTES)")
    arrays: dict[str, np.ndarray] = {}
    for e in entries:
        if e.dtype not in _NUMPY_DTYPES:
            raise InvalidDataset(f"{e.name} has dtype {e.dtype}; use a numeric dtype (float32 "
                                 "for inputs, int64 for labels)")
        dtype = np.dtype(_NUMPY_DTYPES[e.dtype])
        arrays[e.name] = (np.memmap(path, dtype=dtype, mode="r", offset=e.start, shape=e.shape)
                          if e.nbytes else np.zeros(e.shape, dtype))
    return arrays


def _all_finite(x: np.ndarray, chunk_bytes: int = 16 * 1024 * 1024) -> bool:
    """np.isfinite(x).all() in slices along the first axis (no full-size temporary)."""
    import numpy as np

    rows = max(1, chunk_bytes // max(1, x[:1].nbytes))
    return all(np.isfinite(x[i:i + rows]).all() for i in range(0, len(x), rows))


def _check_pair(arrays: dict[str, np.ndarray], split: str) -> tuple[int, tuple[int, ...], int]:
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.dtype.kind not in "biuf":
        raise InvalidDataset(f"x_{split} has dtype {x.dtype}; use a numeric dtype (float32)")
    if x.ndim not in (2, 3, 4):
        raise InvalidDataset(f"x_{split} has shape {x.shape}; use (N, features), (N, H, W) "
                             "or (N, C, H, W)")
    if x.dtype.kind == "f" and not _all_finite(x):
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
    from service.labelcheck import label_gaps

    gaps = label_gaps([arrays[k] for k in ("y_train", "y_test") if k in arrays])
    if gaps is not None:  # class indices no sample uses (the API refuses them unless asked)
        meta["label_gaps"] = gaps
    return meta


def inspect_dataset_file(path: str | Path, fmt: str, *, max_bytes: int, max_ratio: float,
                         max_header_bytes: int) -> dict[str, Any]:
    """Validate an uploaded dataset file and return its meta (run by the inspector subprocess,
    never in the API process). Raises InvalidDataset (422), UploadTooLarge (413) or
    UnsupportedFormat (415)."""
    path = Path(path)
    if fmt == "npz":
        arrays = _load_npz(path, check_npz_directory(path, max_bytes, max_ratio))
    elif fmt == "safetensors":
        arrays = _load_safetensors(path, max_bytes, max_header_bytes)
    else:
        raise UnsupportedFormat(f"unsupported dataset format {fmt!r}; upload .npz or "
                                ".safetensors")
    return validate_arrays(arrays)
