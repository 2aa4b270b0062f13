"""Validate an uploaded checkpoint or dataset out of the API process.

    python -m worker.inspect [--kind model] --input PATH --format safetensors|pt --arch JSON|''
        --output PATH [--max-header-bytes N]
    python -m worker.inspect --kind dataset --input PATH --format npz|safetensors
        [--max-header-bytes N] [--max-dataset-bytes N] [--max-ratio R]

The API runs this in a subprocess (api/inspect_client.py, under RLIMIT_AS / RLIMIT_CPU) so torch,
numpy and the uploaded arrays stay out of its process. It prints exactly ONE JSON line on stdout
and exits 0 either way:
`{"ok": true, "arch": {...normalized...}, "params": {"total", "trainable", "nonzero"}}` (a model,
after writing it as one normalized safetensors file to --output), `{"ok": true, "meta": {...}}`
(a dataset), or `{"ok": false, "status": 413|415|422, "error": "<code>", "detail": "<what is
wrong, how to fix it>"}` with `"limit": "memory"` when an allocation failed (the address-space
cap).

No pickle is ever executed: `.pt` files are read with `torch.load(weights_only=True)` only. A
safetensors header over --max-header-bytes is refused from its 8-byte length before it is read,
and its declared tensor sizes must tile the file exactly before any tensor is loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FORMATS = ("safetensors", "pt")
KINDS = ("model", "dataset")
MiB = 1024 * 1024
DEFAULT_MAX_HEADER = 16 * MiB
DEFAULT_MAX_DATASET = 2048 * MiB
DEFAULT_MAX_RATIO = 100.0


class Rejected(Exception):
    """A checkpoint that cannot be accepted, with its HTTP status and error code."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _invalid(detail: str) -> Rejected:
    return Rejected(422, "InvalidCheckpoint", detail)


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation refused by the address-space cap (Python's or torch's allocator)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "cannot allocate memory", "out of memory",
                            "not enough memory"))


def read_safetensors(path: Path, max_header_bytes: int = DEFAULT_MAX_HEADER
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file whose header size and layout were checked
    first (so a huge or lying header is refused before safetensors parses it)."""
    from safetensors.torch import load_file

    from service.errors import SlimlineError
    from service.filecheck import read_safetensors_layout

    try:
        _, metadata = read_safetensors_layout(path, max_header_bytes, "checkpoint")
    except SlimlineError as exc:
        raise Rejected(exc.status, "UploadTooLarge" if exc.status == 413 else "InvalidCheckpoint",
                       exc.detail) from None
    try:
        return load_file(str(path)), metadata
    except Exception as exc:  # safetensors raises several error types for garbled input
        if _out_of_memory(exc):
            raise
        raise _invalid("the file is truncated or not a valid safetensors file; re-save it with "
                       "safetensors.torch.save_file (or core.models.save) and upload it again") \
            from None


def read_pt(path: Path) -> dict[str, Any]:
    """The state dict in a `.pt`/`.pth` file, read with `weights_only=True` (never unpickled)."""
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or ["unsupported object"])[0][:300]
        raise _invalid("the .pt file holds objects other than tensors, which are never "
                       "unpickled (weights_only=True refused it: " + first + "); save only "
                       "model.state_dict() with torch.save, or upload safetensors") from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        if _out_of_memory(exc):
            raise  # the address-space cap: main() answers with the memory limit
        raise _invalid("the .pt file is truncated or not a PyTorch file saved with torch.save; "
                       "save model.state_dict() with torch.save and upload it again") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise _invalid(f"the .pt file holds a {type(obj).__name__}, not a state dict; save "
                       "model.state_dict() (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise _invalid(f"state dict entries {bad[:5]} are not tensors; save model.state_dict() "
                       "and nothing else")
    return dict(obj)


def resolve_arch(arch_arg: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    text = arch_arg.strip() or metadata.get("slimline_arch", "")
    source = "--arch" if arch_arg.strip() else "the slimline_arch metadata"
    if not text:
        raise Rejected(422, "MissingArchitecture",
                       'the checkpoint carries no architecture: pass the arch form field, e.g. '
                       '{"name": "lenet300"}, or save the model with core.models.save')
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(f"{source} is not valid JSON ({exc}); "
                       'e.g. {"name": "lenet300"}') from None
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise _invalid(f'{source} must be a JSON object with a "name", e.g. {{"name": "lenet300"}}')
    return arch


def inspect_checkpoint(path: Path, fmt: str, arch_arg: str, output: Path,
                       max_header_bytes: int = DEFAULT_MAX_HEADER) -> dict[str, Any]:
    """Validate `path` and write the normalized checkpoint to `output`; returns the reply."""
    if fmt not in FORMATS:
        raise Rejected(415, "UnsupportedFormat",
                       f"unsupported checkpoint format {fmt!r}; upload .safetensors or a .pt "
                       "state_dict")
    if not path.is_file():
        raise _invalid(f"input file {path} does not exist")
    if fmt == "safetensors":
        tensors, metadata = read_safetensors(path, max_header_bytes)
    else:
        tensors, metadata = read_pt(path), {}
    arch = resolve_arch(arch_arg, metadata)

    from core.errors import CheckpointError
    from core.metrics import param_counts
    from core.models import save

    try:
        model = build_from_upload(arch, tensors)
    except CheckpointError as exc:
        raise _invalid(str(exc)) from None
    del tensors
    save(model, output)
    return {"ok": True, "arch": model.slimline_arch, "params": param_counts(model)}


def build_from_upload(arch: dict[str, Any], tensors: dict[str, Any]) -> Any:
    """`core.models.from_tensors(arch, tensors)` holding the weights once, not twice: a dense
    checkpoint is validated against a model built on the meta device (no memory), and the
    uploaded tensors (cast to the dtypes that model settled on) then become its weights. Sparse
    checkpoints, models with non-persistent buffers and tensors sharing storage take the plain
    path (a fresh model the tensors are copied into)."""
    import torch

    from core.models import from_tensors
    from core.prune import SPARSE_SUFFIXES

    storages = [t.untyped_storage().data_ptr() for t in tensors.values()]
    if any(k.endswith(SPARSE_SUFFIXES) for k in tensors) or len(set(storages)) < len(storages):
        return from_tensors(arch, tensors, source="upload")
    with torch.device("meta"), warnings.catch_warnings():
        # from_state_dict's load into the meta model is the expected no-op
        warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint")
        shell = from_tensors(arch, tensors, source="upload")  # every key, shape, dtype, value
    state = shell.state_dict()
    if any(name not in state for name, _ in shell.named_buffers()):
        return from_tensors(arch, tensors, source="upload")  # e.g. DCTpS's derived D
    shell.load_state_dict({k: t.to(state[k].dtype) for k, t in tensors.items()}, strict=True,
                          assign=True)
    return shell


def inspect_dataset(path: Path, fmt: str, *, max_bytes: int = DEFAULT_MAX_DATASET,
                    max_ratio: float = DEFAULT_MAX_RATIO,
                    max_header_bytes: int = DEFAULT_MAX_HEADER) -> dict[str, Any]:
    """Validate an uploaded dataset file (numpy only, memory-mapped where it can be); returns the
    reply with its meta."""
    from service.errors import SlimlineError
    from service.filecheck import inspect_dataset_file

    if not path.is_file():
        raise Rejected(422, "InvalidDataset", f"input file {path} does not exist")
    try:
        meta = inspect_dataset_file(path, fmt, max_bytes=max_bytes, max_ratio=max_ratio,
                                    max_header_bytes=max_header_bytes)
    except SlimlineError as exc:
        raise Rejected(exc.status, exc.code, exc.detail) from None
    return {"ok": True, "meta": meta}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.inspect", description=__doc__)
    parser.add_argument("--kind", choices=KINDS, default="model")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--format", required=True)
    parser.add_argument("--arch", default="")
    parser.add_argument("--output", default="")
    parser.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER)
    parser.add_argument("--max-dataset-bytes", type=int, default=DEFAULT_MAX_DATASET)
    parser.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO)
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else None
    error = "InvalidDataset" if args.kind == "dataset" else "InvalidCheckpoint"
    # Whatever a library prints must not corrupt the one JSON line on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if args.kind == "dataset":
                reply = inspect_dataset(args.input, args.format,
                                        max_bytes=args.max_dataset_bytes,
                                        max_ratio=args.max_ratio,
                                        max_header_bytes=args.max_header_bytes)
            elif output is None:
                raise Rejected(422, error, "--output is required for a model")
            else:
                reply = inspect_checkpoint(args.input, args.format, args.arch, output,
                                           args.max_header_bytes)
        except Rejected as exc:
            reply = {"ok": False, "status": exc.status, "error": exc.error, "detail": exc.detail}
        except Exception as exc:  # noqa: BLE001 - never a traceback on stdout; the API shows `detail`
            print(f"worker.inspect: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
            if _out_of_memory(exc):
                reply = {"ok": False, "status": 413, "error": "UploadTooLarge", "limit": "memory",
                         "detail": f"the {args.kind} is too large to validate within the "
                                   "inspector's memory limit"}
            else:
                reply = {"ok": False, "status": 422, "error": error,
                         "detail": f"the {args.kind} could not be read ({type(exc).__name__}); "
                                   + ("upload a .npz or .safetensors file of arrays"
                                      if args.kind == "dataset" else
                                      "upload a safetensors file or a .pt state_dict")}
    if not reply["ok"] and output is not None:
        output.unlink(missing_ok=True)
    print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
