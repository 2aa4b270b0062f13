"""Safety checks of an uploaded `.pt2` archive (the file `torch.export.save` writes), made before
any torch loader sees it, and the clean copy the loader is given.

`torch.export.load` can reach `pickle` (weights or constants flagged `use_pickle`, torchbind and
opaque custom objects, sample inputs retried with `weights_only=False`), loads AOTInductor
payloads (compiled `.so` files) when the archive holds them, evaluates the program's symbolic
shape expressions with `sympy.sympify` (Python `eval`), and generates and runs Python code (FX)
from the names in the program. So the archive is judged here, with the standard library only:

1. as a zip, from its directory (nothing is decompressed yet): at most `MAX_ENTRIES` entries
   and `MAX_DIRECTORY_BYTES` of directory, no encrypted entries, stored or deflated only,
   at most `max_bytes` uncompressed (413) and a compression ratio of at most `max_ratio` per entry
   (above 1 MiB) and in total (422: a zip bomb);
2. entry names: no absolute paths, `..`, `.`, empty parts, backslashes, drive letters or
   control characters, no duplicates, all under one top-level archive folder;
3. only the entries an honest `torch.export.save` writes: `archive_format` (`pt2`),
   `archive_version`, `byteorder` (`little`), `.data/version`, `.data/serialization_id`,
   `models/model.json` (one program), `data/weights/model_weights_config.json` +
   `data/weights/weight_<n>`, `data/constants/model_constants_config.json` +
   `data/constants/tensor_<n>`, `data/sample_inputs/model.pt`. Anything else is refused by
   name: AOTInductor (`data/aotinductor/`, `.so`, `.cpp`, ...), ExecuTorch (`.pte`,
   `data/executorch/`), `extra/` files, custom objects (`custom_obj_*`, `opaque_obj_*`), legacy
   pickled weights (`data/weights/model.pt`), unknown entries;
4. the weights/constants configs: every entry a raw tensor (`use_pickle` false, a strided
   `tensor_meta` of a plain dtype whose extent fits its file), every file referenced;
5. the program (`models/model.json`): no guard code, no custom objects, every node an
   `aten` or `operator` call, every symbolic expression a plain sympy `srepr` of allowed
   functions (checked token by token), every other string a plain name.

`write_clean_archive` then writes what the loader reads: a new zip with only the checked entries
(stored, under `archive/`), the program re-serialized without node metadata (stack traces,
source locations) and the sample inputs emptied (never unpickled). `load_program` loads that copy
with `torch.export.load` and `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`.
"""
from __future__ import annotations

import io
import json
import os
import re
import tokenize
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import InvalidCheckpoint, SlimlineError, UnsupportedFormat, UploadTooLarge
from service.filecheck import looks_like_zip, zip_directory_size

MiB = 1024 * 1024
MAX_ENTRIES = 20_000
MAX_DIRECTORY_BYTES = 8 * MiB
MAX_NAME_LENGTH = 1024
MAX_JSON_BYTES = 512 * MiB  # models/model.json and the two payload configs
MAX_SMALL_BYTES = 256  # archive_format, archive_version, byteorder, .data/*
MAX_DEPTH = 64  # JSON nesting and sympy expression nesting
MAX_NODES = 100_000
MAX_EXPR_CHARS = 4096
RATIO_FLOOR_BYTES = 1 * MiB
MODEL = "model"  # torch.export.save names its one program "model"

REEXPORT = ("re-export the model with torch.export.save(torch.export.export(model, (x,)), "
            "'model.pt2') (or `slimline import`)")

# torch._export.serde.schema.ScalarType -> (name, bytes per element); others are refused
DTYPES = {1: ("uint8", 1), 2: ("int8", 1), 3: ("int16", 2), 4: ("int32", 4), 5: ("int64", 8),
          6: ("float16", 2), 7: ("float32", 4), 8: ("float64", 8), 12: ("bool", 1),
          13: ("bfloat16", 2)}
STRIDED = 7  # schema.Layout.Strided

_WEIGHT = re.compile(r"weight_[0-9]{1,9}\Z")
_TENSOR = re.compile(r"tensor_[0-9]{1,9}\Z")
_NAME = re.compile(r"[A-Za-z0-9_.]{0,1000}\Z")  # every other string in the program
_FQN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VERSION = re.compile(r"[A-Za-z0-9_.+\-]{0,64}\Z")
_STRING_ARG = re.compile(r"[A-Za-z0-9_ ,.\->:|]{0,256}\Z")  # string arguments (einsum, modes)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRIVE = re.compile(r"[A-Za-z]:")
_TARGET = re.compile(r"(?:torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*"
                     r"|_operator\.[A-Za-z_][A-Za-z0-9_]*)\Z")

# what a symbolic shape expression (`sympy.srepr`) may name; sympify evaluates it with eval
SYMPY_NAMES = frozenset((
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "sign", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan",
    "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not",
    "Xor", "true", "false", "BooleanTrue", "BooleanFalse", "NegativeOne", "One", "Zero", "Half",
    "Infinity", "NegativeInfinity", "oo", "nan", "zoo", "Piecewise", "ExprCondPair", "FloorDiv",
    "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat",
    "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    "IsNonOverlappingAndDenseIndicator", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log",
    "OpaqueUnaryFn_cos", "OpaqueUnaryFn_sin", "OpaqueUnaryFn_tanh"))
SYMPY_KWARGS = frozenset((
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite",
    "zero", "nonzero", "rational", "irrational", "even", "odd", "prime", "composite",
    "extended_real", "extended_positive", "extended_negative", "extended_nonnegative",
    "extended_nonpositive", "commutative", "precision", "evaluate"))
_STRING_CALLS = frozenset({"Symbol", "Float"})  # the only calls that take a string argument
_SYMBOL_TEXT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_NUMBER_TEXT = re.compile(r"[-+]?[0-9.]{1,400}(?:[eE][-+]?[0-9]{1,4})?\Z")
_SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict",
                         "collections.OrderedDict", "collections.defaultdict",
                         "torch.fx.immutable_collections.immutable_list",
                         "torch.fx.immutable_collections.immutable_dict"})


def _refuse(detail: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(detail)


@dataclass
class Pt2Archive:
    """A checked archive: its top-level folder, the entries that travel to the loader, the
    program (sanitized JSON) and its payload configs."""

    root: str
    program: dict[str, Any]
    weights_config: dict[str, Any]
    constants_config: dict[str, Any]
    # relative name -> zip member name (the small files and the tensor files kept)
    keep: dict[str, str] = field(default_factory=dict)
    sample_inputs: str | None = None  # the zip member, checked by `check_sample_inputs`


# ---- 1. the zip directory -----------------------------------------------------------------

def _infos(path: Path, max_bytes: int, max_ratio: float) -> list[zipfile.ZipInfo]:
    if not looks_like_zip(path):
        raise UnsupportedFormat("the .pt2 file is not a zip archive (torch.export.save writes "
                                f"one); {REEXPORT}")
    found = zip_directory_size(path)
    if found is None:
        raise _refuse("the .pt2 file is truncated or corrupt: no zip directory at its end; "
                      + REEXPORT)
    entries, directory_bytes = found
    if entries > MAX_ENTRIES or directory_bytes > MAX_DIRECTORY_BYTES:
        raise UploadTooLarge(f"the .pt2 archive has {entries} entries ({directory_bytes} bytes "
                             f"of zip directory); slimline reads at most {MAX_ENTRIES} entries. "
                             f"{REEXPORT[0].upper()}{REEXPORT[1:]}")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _refuse(f"the .pt2 file is not a readable zip archive ({exc}); {REEXPORT}") \
            from None
    if len(infos) > MAX_ENTRIES:
        raise UploadTooLarge(f"the .pt2 archive has {len(infos)} entries; slimline reads at "
                             f"most {MAX_ENTRIES}")
    for info in infos:
        if info.flag_bits & 0x1:
            raise _refuse(f"entry {info.filename!r} of the .pt2 archive is encrypted; "
                          + REEXPORT)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(f"entry {info.filename!r} of the .pt2 archive uses zip compression "
                          f"method {info.compress_type} (torch.export.save stores entries "
                          f"uncompressed); {REEXPORT}")
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > max_bytes:
        raise UploadTooLarge(f"the .pt2 archive's entries are {total} bytes uncompressed, over "
                             f"the limit of {max_bytes} bytes (SLIMLINE_MAX_DATASET_BYTES)")
    bomb = ("this looks like a zip bomb (torch.export.save stores entries uncompressed); "
            + REEXPORT)
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > max_ratio:
            raise _refuse(f"entry {info.filename!r} of the .pt2 archive inflates from "
                          f"{info.compress_size} to {info.file_size} bytes, a compression ratio "
                          f"of {ratio:.0f} over the limit of {max_ratio:g} "
                          f"(SLIMLINE_MAX_DECOMPRESSION_RATIO); {bomb}")
    ratio = total / max(packed, 1)
    if total > RATIO_FLOOR_BYTES and ratio > max_ratio:
        raise _refuse(f"the .pt2 archive inflates from {packed} to {total} bytes, a compression "
                      f"ratio of {ratio:.0f} over the limit of {max_ratio:g} "
                      f"(SLIMLINE_MAX_DECOMPRESSION_RATIO); {bomb}")
    return infos


# ---- 2. entry names -----------------------------------------------------------------------

def _split_name(name: str) -> list[str]:
    """The parts of a safe entry name (refusing unsafe ones by name)."""
    what = f"entry name {name[:200]!r} of the .pt2 archive"
    if not name or len(name) > MAX_NAME_LENGTH:
        raise _refuse(f"{what} is empty or over {MAX_NAME_LENGTH} characters; {REEXPORT}")
    if _CONTROL.search(name):
        raise _refuse(f"{what} contains control characters; {REEXPORT}")
    if "\\" in name:
        raise _refuse(f"{what} contains a backslash (a Windows path); {REEXPORT}")
    if name.startswith("/") or _DRIVE.match(name):
        raise _refuse(f"{what} is an absolute path; {REEXPORT}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _refuse(f"{what} holds an empty, '.' or '..' path part (path traversal); "
                      + REEXPORT)
    if any(":" in p for p in parts):
        raise _refuse(f"{what} contains ':' (a drive letter or stream name); {REEXPORT}")
    return parts


def _entries(infos: list[zipfile.ZipInfo]) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """(the top-level folder, relative name -> entry)."""
    roots: set[str] = set()
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        parts = _split_name(info.filename)
        if len(parts) < 2:
            raise _refuse(f"entry {info.filename!r} of the .pt2 archive is not inside the "
                          f"archive's top-level folder; {REEXPORT}")
        roots.add(parts[0])
        if len(roots) > 1:
            raise _refuse(f"the .pt2 archive has more than one top-level folder "
                          f"({', '.join(repr(r) for r in sorted(roots)[:3])}); torch.export.save "
                          f"writes one. {REEXPORT[0].upper()}{REEXPORT[1:]}")
        rel = "/".join(parts[1:])
        if rel in entries:
            raise _refuse(f"entry {info.filename!r} appears twice in the .pt2 archive; "
                          + REEXPORT)
        entries[rel] = info
    if not roots:
        raise _refuse(f"the .pt2 archive is empty; {REEXPORT}")
    return roots.pop(), entries


# ---- 3. which entries -----------------------------------------------------------------------

SMALL = ("archive_format", "archive_version", "byteorder", ".data/version",
         ".data/serialization_id")
MODEL_JSON = f"models/{MODEL}.json"
WEIGHTS_CONFIG = f"data/weights/{MODEL}_weights_config.json"
CONSTANTS_CONFIG = f"data/constants/{MODEL}_constants_config.json"
SAMPLE_INPUTS = f"data/sample_inputs/{MODEL}.pt"
_AOTI_SUFFIXES = (".so", ".cpp", ".h", ".o", ".cubin", ".ptx", ".wrapper", ".kernel",
                  ".fatbin", ".hsaco", ".spv", ".dll", ".dylib", ".py")


def _foreign(rel: str, full: str) -> str | None:
    """Why an entry an honest torch.export.save does not write is refused (None: not one of
    the known foreign kinds)."""
    lower = rel.lower()
    if lower.startswith("data/aotinductor/") or "aotinductor" in lower or \
            lower.endswith(_AOTI_SUFFIXES):
        return (f"entry {full!r} is an AOTInductor payload (compiled code), which slimline "
                "does not load")
    if lower.startswith("data/executorch/") or lower.endswith(".pte"):
        return f"entry {full!r} is an ExecuTorch program, which slimline does not load"
    if lower.startswith("extra/"):
        return (f"entry {full!r} is an extra file (torch.export.save's extra_files), which "
                "slimline does not load; save without extra_files")
    if lower.startswith(("data/constants/custom_obj_", "data/constants/opaque_obj_")):
        return (f"entry {full!r} is a custom (torchbind or opaque) object, stored pickled, "
                "which slimline never unpickles; export a model whose constants are tensors")
    if lower.startswith("data/weights/") and lower.endswith((".pt", ".pth", ".pkl")):
        return (f"entry {full!r} holds pickled weights (the legacy pt2 weights format), which "
                "slimline never unpickles")
    if lower.startswith("data/mtia") or lower.startswith("xl_model_weights/"):
        return f"entry {full!r} is a device-specific payload, which slimline does not load"
    if lower.endswith((".pkl", ".pickle")):
        return f"entry {full!r} is a pickle, which slimline never unpickles"
    if lower.startswith("models/") and lower.endswith(".json"):
        return (f"entry {full!r} is a second program; slimline imports an archive holding "
                f"one program, '{MODEL}'")
    return None


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise _refuse(f"entry {info.filename!r} of the .pt2 archive is {info.file_size} bytes, "
                      f"over the {limit} bytes slimline reads for it; {REEXPORT}")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _refuse(f"entry {info.filename!r} of the .pt2 archive cannot be read "
                      f"(truncated or corrupt: {exc}); {REEXPORT}") from None
    if len(data) > limit:
        raise _refuse(f"entry {info.filename!r} of the .pt2 archive is larger than its "
                      f"directory says; {REEXPORT}")
    return data


def _json(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    data = _read(zf, info, MAX_JSON_BYTES)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise _refuse(f"entry {info.filename!r} of the .pt2 archive is not valid JSON; "
                      + REEXPORT) from None


# ---- 4. payload configs ---------------------------------------------------------------------

def _int(value: Any, what: str) -> int:
    """A SymInt of a stored tensor: {"as_int": n} with n >= 0."""
    if not (isinstance(value, dict) and set(value) == {"as_int"} and type(value["as_int"]) is int
            and value["as_int"] >= 0):
        raise _refuse(f"{what} is {str(value)[:100]}; a stored tensor's sizes, strides and "
                      f"offset are plain integers. {REEXPORT[0].upper()}{REEXPORT[1:]}")
    return int(value["as_int"])


def _check_config(config: Any, kind: str, pattern: re.Pattern[str],
                  entries: dict[str, zipfile.ZipInfo], directory: str) -> set[str]:
    """Check a weights/constants payload config; returns the files it references."""
    where = f"the .pt2 archive's {kind} config"
    if not isinstance(config, dict) or set(config) != {"config"} or \
            not isinstance(config["config"], dict):
        raise _refuse(f"{where} is not a {{'config': {{...}}}} object; {REEXPORT}")
    used: set[str] = set()
    for fqn, meta in config["config"].items():
        if not isinstance(fqn, str) or not _FQN.match(fqn) or len(fqn) > 1000:
            raise _refuse(f"{where} names {str(fqn)[:100]!r}, not a dotted parameter name; "
                          + REEXPORT)
        if not isinstance(meta, dict):
            raise _refuse(f"{where}: entry {fqn!r} is not an object; {REEXPORT}")
        path_name = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise _refuse(f"{kind} {fqn!r} is stored pickled (a tensor subclass or custom "
                          f"object; use_pickle), which slimline never unpickles; make it a "
                          f"plain tensor before exporting. {REEXPORT[0].upper()}{REEXPORT[1:]}")
        if not isinstance(path_name, str) or not pattern.match(path_name):
            raise _refuse(f"{kind} {fqn!r} is stored as {str(path_name)[:100]!r}, not a raw "
                          f"tensor file; slimline loads plain tensors only. "
                          f"{REEXPORT[0].upper()}{REEXPORT[1:]}")
        rel = directory + path_name
        if rel not in entries:
            raise _refuse(f"{kind} {fqn!r} is stored in {path_name!r}, which the archive does "
                          f"not hold (truncated?); {REEXPORT}")
        meta_t = meta.get("tensor_meta")
        if not isinstance(meta_t, dict):
            raise _refuse(f"{kind} {fqn!r} has no tensor_meta; {REEXPORT}")
        dtype = meta_t.get("dtype")
        if type(dtype) is not int or dtype not in DTYPES:
            raise _refuse(f"{kind} {fqn!r} has dtype code {dtype!r}; slimline loads "
                          f"{', '.join(n for n, _ in DTYPES.values())} tensors")
        if meta_t.get("layout") != STRIDED:
            raise _refuse(f"{kind} {fqn!r} is not a dense (strided) tensor (layout "
                          f"{meta_t.get('layout')!r}); convert sparse or quantized tensors to "
                          "dense before exporting")
        sizes, strides = meta_t.get("sizes"), meta_t.get("strides")
        if not isinstance(sizes, list) or not isinstance(strides, list) or \
                len(sizes) != len(strides) or len(sizes) > 16:
            raise _refuse(f"{kind} {fqn!r} has malformed sizes/strides; {REEXPORT}")
        shape = [_int(s, f"{kind} {fqn!r}'s size") for s in sizes]
        steps = [_int(s, f"{kind} {fqn!r}'s stride") for s in strides]
        offset = _int(meta_t.get("storage_offset"), f"{kind} {fqn!r}'s storage offset")
        item = DTYPES[dtype][1]
        stored = entries[rel].file_size // item
        extent = 0 if 0 in shape else offset + sum((n - 1) * s for n, s in zip(shape, steps,
                                                                                strict=True)) + 1
        if entries[rel].file_size % item or (extent and extent > stored):
            raise _refuse(f"{kind} {fqn!r} of shape {shape} does not fit its stored "
                          f"{entries[rel].file_size} bytes of {DTYPES[dtype][0]}; {REEXPORT}")
        used.add(rel)
    return used


# ---- 5. the program -------------------------------------------------------------------------

def check_sympy_expr(text: Any) -> None:
    """Refuse a symbolic expression that is not a plain `sympy.srepr` of allowed functions,
    symbols and numbers (torch's deserializer passes it to `sympy.sympify`, i.e. `eval`)."""
    what = f"symbolic shape expression {str(text)[:120]!r} in the .pt2 program"
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise _refuse(f"{what} is not a short string; {REEXPORT}")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        raise _refuse(f"{what} does not parse; {REEXPORT}") from None
    depth = 0
    previous: list[str | None] = [None, None]  # the two tokens before this one
    for tok in tokens:
        kind, value = tok.type, tok.string
        if kind in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            pass
        elif kind == tokenize.NAME:
            if value not in SYMPY_NAMES and value not in SYMPY_KWARGS and \
                    value not in ("True", "False", "None"):
                raise _refuse(f"{what} names {value!r}, which is not a sympy function slimline "
                              f"accepts; {REEXPORT}")
        elif kind == tokenize.NUMBER:
            if not _NUMBER_TEXT.match(value):
                raise _refuse(f"{what} holds the number {value!r}; {REEXPORT}")
        elif kind == tokenize.STRING:
            inner = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and \
                value[0] in "'\"" else None
            if previous[0] != "(" or previous[1] not in _STRING_CALLS or inner is None or \
                    not (_SYMBOL_TEXT.match(inner) or _NUMBER_TEXT.match(inner)):
                raise _refuse(f"{what} holds the string {value[:60]!r} where only a symbol "
                              f"name or a number may stand; {REEXPORT}")
        elif kind == tokenize.OP and value in ("(", ")", ",", "=", "-", "+"):
            depth += {"(": 1, ")": -1}.get(value, 0)
            if depth > MAX_DEPTH or depth < 0:
                raise _refuse(f"{what} is nested too deeply; {REEXPORT}")
        else:
            raise _refuse(f"{what} holds {value!r}; only sympy function calls, symbol names "
                          f"and numbers may appear. {REEXPORT[0].upper()}{REEXPORT[1:]}")
        if kind not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            previous = [value, previous[0]]


def _check_spec(text: Any, key: str) -> None:
    """A pytree spec (in_spec/out_spec): JSON of plain container types and names."""
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        spec = None
    if spec is None:
        raise _refuse(f"the .pt2 program's {key} is not a JSON pytree spec; {REEXPORT}")

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _refuse(f"the .pt2 program's {key} is nested too deeply; {REEXPORT}")
        if isinstance(node, list):
            for item in node:
                walk(item, depth + 1)
        elif isinstance(node, dict):
            if "type" in node and node["type"] not in _SPEC_TYPES:
                raise _refuse(f"the .pt2 program's {key} uses the container type "
                              f"{str(node['type'])[:100]!r}; slimline imports models that take "
                              "and return plain tensors, tuples, lists and dicts")
            for k, v in node.items():
                walk(k, depth + 1)
                if k == "context" and isinstance(v, str):
                    try:
                        walk(json.loads(v), depth + 1)
                    except (ValueError, RecursionError):
                        raise _refuse(f"the .pt2 program's {key} has a malformed context; "
                                      + REEXPORT) from None
                else:
                    walk(v, depth + 1)
        elif isinstance(node, str) and not _NAME.match(node):
            raise _refuse(f"the .pt2 program's {key} holds {node[:100]!r}, not a plain name; "
                          + REEXPORT)
    walk(spec, 0)


def _walk_program(node: Any, key: str | None, depth: int) -> Any:
    """Check every string of the program; returns it with node metadata dropped."""
    if depth > MAX_DEPTH:
        raise _refuse(f"the .pt2 program is nested more than {MAX_DEPTH} levels deep; "
                      + REEXPORT)
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            if not _NAME.match(k):
                raise _refuse(f"the .pt2 program holds the key {k[:100]!r}, not a plain name; "
                              + REEXPORT)
            if k == "metadata":
                out[k] = {}  # stack traces and source locations: not needed, never read
            elif k == "expr_str":
                check_sympy_expr(v)
                out[k] = v
            elif k in ("in_spec", "out_spec"):
                _check_spec(v, k)
                out[k] = v
            elif k == "as_string" and isinstance(v, str):
                if not _STRING_ARG.match(v):
                    raise _refuse(f"the .pt2 program passes the string argument {v[:100]!r}; "
                                  f"slimline accepts short plain strings only. "
                                  f"{REEXPORT[0].upper()}{REEXPORT[1:]}")
                out[k] = v
            elif k == "torch_version" and isinstance(v, str):
                if not _VERSION.match(v):
                    raise _refuse(f"the .pt2 program's torch_version {v[:100]!r} is not a "
                                  f"version; {REEXPORT}")
                out[k] = v
            else:
                out[k] = _walk_program(v, k, depth + 1)
        return out
    if isinstance(node, list):
        return [_walk_program(v, key, depth + 1) for v in node]
    if isinstance(node, str) and not _NAME.match(node):
        raise _refuse(f"the .pt2 program holds {node[:100]!r} (under {key!r}) where a plain "
                      f"name belongs; {REEXPORT}")
    if node is not None and not isinstance(node, (str, int, float, bool)):
        raise _refuse(f"the .pt2 program holds a value of type {type(node).__name__}; "
                      + REEXPORT)
    return node


def op_label(target: str) -> str:
    """'torch.ops.my_ns.foo.default' -> 'my_ns::foo' (how users know their custom op)."""
    parts = target.split(".")
    if len(parts) >= 4 and parts[:2] == ["torch", "ops"]:
        return f"{parts[2]}::{parts[3]}"
    return target


def check_program(program: Any) -> dict[str, Any]:
    """Check `models/model.json`; returns it without node metadata."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise _refuse(f"the .pt2 archive's {MODEL_JSON} is not an exported program; "
                      + REEXPORT)
    if program.get("guards_code"):
        raise _refuse("the .pt2 program carries guard code (guards_code), which slimline does "
                      "not run; " + REEXPORT)
    graph = program["graph_module"].get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise _refuse(f"the .pt2 program has no graph; {REEXPORT}")
    if graph.get("custom_obj_values"):
        raise _refuse("the .pt2 program uses custom (torchbind) objects, which slimline does "
                      "not load; export a model whose constants are tensors")
    nodes = graph["nodes"]
    if len(nodes) > MAX_NODES:
        raise _refuse(f"the .pt2 program has {len(nodes)} nodes, over slimline's limit of "
                      f"{MAX_NODES}")
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str):
            raise _refuse(f"the .pt2 program has a node without a target; {REEXPORT}")
        if not _TARGET.match(target):
            label = op_label(target) if _NAME.match(target) else repr(target[:100])
            hint = ("control flow and other higher-order ops are not supported"
                    if target.startswith("torch.ops.higher_order.") else
                    "slimline imports graphs of aten ops only")
            raise _refuse(f"op {label} is not supported ({hint}); re-export without custom "
                          "ops (replace them with standard torch operations)")
    signature = program["graph_module"].get("signature")
    if isinstance(signature, dict):
        for spec in signature.get("input_specs") or []:
            if isinstance(spec, dict) and ("custom_obj" in spec or "token" in spec):
                raise _refuse("the .pt2 program takes custom objects or effect tokens as "
                              "inputs, which slimline does not load; " + REEXPORT)
    return _walk_program(program, None, 0)


# ---- the whole check and the clean copy -----------------------------------------------------

def check_archive(path: str | Path, *, max_bytes: int, max_ratio: float) -> Pt2Archive:
    """Judge the archive at `path` (see the module doc); raises InvalidCheckpoint (422),
    UploadTooLarge (413) or UnsupportedFormat (415) naming what was found."""
    path = Path(path)
    infos = _infos(path, max_bytes, max_ratio)
    root, entries = _entries(infos)
    full = {rel: info.filename for rel, info in entries.items()}
    for rel in entries:
        if rel in SMALL or rel in (MODEL_JSON, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS):
            continue
        if rel.startswith("data/weights/") and _WEIGHT.match(rel[len("data/weights/"):]):
            continue
        if rel.startswith("data/constants/") and _TENSOR.match(rel[len("data/constants/"):]):
            continue
        why = _foreign(rel, full[rel]) or (f"entry {full[rel]!r} is not one torch.export.save "
                                           "writes (unknown entry)")
        raise _refuse(f"{REEXPORT[0].upper()}{REEXPORT[1:]}; {why}.")
    for rel in ("archive_format", "archive_version", MODEL_JSON, WEIGHTS_CONFIG,
                CONSTANTS_CONFIG):
        if rel not in entries:
            raise _refuse(f"the .pt2 archive has no {rel!r} entry (not a torch.export.save "
                          f"archive, or a truncated one); {REEXPORT}")
    with zipfile.ZipFile(path) as zf:
        small = {rel: _read(zf, entries[rel], MAX_SMALL_BYTES) for rel in SMALL if rel in entries}
        if small["archive_format"].strip() != b"pt2":
            raise _refuse(f"the .pt2 archive's archive_format is {small['archive_format'][:20]!r}"
                          f", not 'pt2'; {REEXPORT}")
        if not re.fullmatch(rb"[0-9]{1,4}", small["archive_version"].strip()):
            raise _refuse(f"the .pt2 archive's archive_version is "
                          f"{small['archive_version'][:20]!r}; {REEXPORT}")
        if small.get("byteorder", b"little").strip() != b"little":
            raise _refuse("the .pt2 archive was written on a big-endian machine; re-export it "
                          "on a little-endian one")
        for rel in (".data/version", ".data/serialization_id"):
            if rel in small and not re.fullmatch(rb"[0-9A-Za-z_.\-]*\s*", small[rel]):
                raise _refuse(f"the .pt2 archive's {rel} is not a version string; {REEXPORT}")
        weights = _json(zf, entries[WEIGHTS_CONFIG])
        constants = _json(zf, entries[CONSTANTS_CONFIG])
        used = _check_config(weights, "weight", _WEIGHT, entries, "data/weights/")
        used |= _check_config(constants, "constant", _TENSOR, entries, "data/constants/")
        for rel in entries:
            if rel.startswith(("data/weights/weight_", "data/constants/tensor_")) and \
                    rel not in used:
                raise _refuse(f"entry {full[rel]!r} is not referenced by the archive's payload "
                              f"configs; {REEXPORT}")
        program = check_program(_json(zf, entries[MODEL_JSON]))
    keep = {rel: full[rel] for rel in entries
            if rel in ("archive_format", "archive_version", "byteorder", ".data/version")
            or rel in used}
    return Pt2Archive(root=root, program=program, weights_config=weights,
                      constants_config=constants, keep=keep,
                      sample_inputs=full.get(SAMPLE_INPUTS))


def write_clean_archive(source: str | Path, archive: Pt2Archive, dest: str | Path) -> None:
    """Write the archive the loader reads: the checked entries only (stored, under `archive/`),
    the sanitized program and configs, and empty sample inputs (never unpickled)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for rel, name in archive.keep.items():
            info = zin.getinfo(name)
            target = zipfile.ZipInfo(f"archive/{rel}", date_time=(1980, 1, 1, 0, 0, 0))
            with zin.open(info) as src, zout.open(target, "w",
                                                  force_zip64=info.file_size > 2**31) as out:
                copied = _copy(src, out, info.file_size)
            if copied != info.file_size:
                raise _refuse(f"entry {name!r} of the .pt2 archive holds {copied} bytes, not "
                              f"the {info.file_size} its directory says; {REEXPORT}")
        zout.writestr(f"archive/{MODEL_JSON}", json.dumps(archive.program))
        zout.writestr(f"archive/{WEIGHTS_CONFIG}", json.dumps(archive.weights_config))
        zout.writestr(f"archive/{CONSTANTS_CONFIG}", json.dumps(archive.constants_config))
        zout.writestr(f"archive/{SAMPLE_INPUTS}", b"")


def _copy(src: Any, out: Any, limit: int) -> int:
    copied = 0
    try:
        while block := src.read(min(8 * MiB, limit - copied + 1)):
            copied += len(block)
            if copied > limit:
                return copied
            out.write(block)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _refuse(f"the .pt2 archive cannot be read (truncated or corrupt: {exc}); "
                      + REEXPORT) from None
    return copied


def force_weights_only() -> None:
    """Every torch.load of this process reads with weights_only=True (the pickle subset of
    tensors and plain containers), whatever its call site asks for."""
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)


def check_sample_inputs(source: str | Path, archive: Pt2Archive, workdir: str | Path, *,
                        max_bytes: int, max_ratio: float) -> None:
    """The archive's sample inputs (a torch.save file: a pickle) read with
    `torch.load(weights_only=True)` only — after the same zip checks — so a pickle that would
    run code is refused by name. They are not passed on to the loader either way."""
    if archive.sample_inputs is None:
        return
    nested = Path(workdir) / "sample_inputs.pt"
    with zipfile.ZipFile(source) as zf:
        info = zf.getinfo(archive.sample_inputs)
        with zf.open(info) as src, open(nested, "wb") as out:
            _copy(src, out, info.file_size)
    force_weights_only()
    import pickle

    import torch

    try:
        if nested.stat().st_size == 0:
            return
        _infos(nested, max_bytes, max_ratio)
        torch.load(str(nested), map_location="cpu", weights_only=True)
    except UnsupportedFormat:
        raise _refuse(f"the .pt2 archive's sample inputs ({archive.sample_inputs!r}) are not a "
                      f"torch.save file; {REEXPORT}") from None
    except SlimlineError:
        raise
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or ["unsupported object"])[0][:200]
        raise _refuse(f"the .pt2 archive's sample inputs ({archive.sample_inputs!r}) hold "
                      f"objects other than tensors, which slimline never unpickles "
                      f"(weights_only=True refused them: {first}); {REEXPORT}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled torch.save file
        if isinstance(exc, MemoryError) or "allocate memory" in str(exc).lower():
            raise
        raise _refuse(f"the .pt2 archive's sample inputs ({archive.sample_inputs!r}) cannot be "
                      f"read ({type(exc).__name__}); {REEXPORT}") from None
    finally:
        nested.unlink(missing_ok=True)


def load_program(path: str | Path, workdir: str | Path, *, max_bytes: int,
                 max_ratio: float) -> Any:
    """Check the archive at `path` (entries, configs, program, sample inputs), write its clean
    copy into `workdir` and load that with `torch.export.load` (weights_only loads forced);
    returns the ExportedProgram."""
    archive = check_archive(path, max_bytes=max_bytes, max_ratio=max_ratio)
    check_sample_inputs(path, archive, workdir, max_bytes=max_bytes, max_ratio=max_ratio)
    clean = Path(workdir) / "clean.pt2"
    write_clean_archive(path, archive, clean)
    force_weights_only()
    import torch

    try:
        return torch.export.load(str(clean))
    except SlimlineError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad archive
        if isinstance(exc, MemoryError) or "allocate memory" in str(exc).lower():
            raise  # the address-space cap: the inspector answers with the memory limit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise _refuse(f"torch.export.load cannot read the program ({type(exc).__name__}: "
                      f"{first}); export it on the CPU with the torch version the service runs "
                      f"({torch.__version__}) — {REEXPORT}") from None
    finally:
        clean.unlink(missing_ok=True)
