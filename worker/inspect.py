"""Validate an uploaded checkpoint or dataset out of the API process.

    python -m worker.inspect [--kind model] --input PATH --format safetensors|pt|pt2|onnx
        --arch JSON|'' --output PATH [--options JSON] [--graph-output PATH]
        [--report-output PATH] [--max-header-bytes N] [--max-dataset-bytes N] [--max-ratio R]
    python -m worker.inspect --kind dataset --input PATH --format npz|safetensors
        [--max-header-bytes N] [--max-dataset-bytes N] [--max-ratio R]

The API runs this in a subprocess (api/inspect_client.py, under RLIMIT_AS / RLIMIT_CPU) so torch,
numpy and the uploaded arrays stay out of its process. It prints exactly ONE JSON line on stdout
and exits 0 either way:
`{"ok": true, "arch": {...normalized...}, "params": {"total", "trainable", "nonzero"},
"report": PATH|null, "graph": {"sha", "path"}|null}` (a model, after writing it as one
normalized safetensors file to --output, its prunability report to --report-output and, for an
imported graph, the canonical graph IR to --graph-output), `{"ok": true, "meta": {...}}`
(a dataset), or `{"ok": false, "status": 413|415|422, "error": "<code>", "detail": "<what is
wrong, how to fix it>"}` with `"limit": "memory"` when an allocation failed (the address-space
cap).

`--options` (JSON, from the upload's form fields): `input_shape` (without the batch dimension),
`num_classes`, `preprocessing` `{"layout", "mean", "std"}`; stored in the model's arch.

No pickle is ever executed: `.pt` files are read with `torch.load(weights_only=True)` only, and
the process forces that for every load (`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`). A safetensors header
over --max-header-bytes is refused from its 8-byte length before it is read, and its declared
tensor sizes must tile the file exactly before any tensor is loaded. A `.pt2` archive is checked
entry by entry before torch sees it (`worker.pt2_check`) and converted with
`core.import_pt2.graph_from_program` (the op allow-list); an ONNX file goes through
`worker.onnx_import` (`check_onnx`, then `graph_from_onnx`).
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

FORMATS = ("safetensors", "pt", "pt2", "onnx")
GRAPH_FORMATS = ("pt2", "onnx")  # files that carry a graph, converted to an imported model
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
        raise _invalid("the .pt file holds objects other than tensors, which are never "
                       "unpickled (weights_only=True refused it: " + _unpickler_reason(exc)
                       + "); save only model.state_dict() with torch.save, or upload "
                       "safetensors") from None
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


def _unpickler_reason(exc: BaseException) -> str:
    """The part of torch's weights_only refusal that names what was refused ("Unsupported
    global: GLOBAL __main__.Net ..."), without its advice to load with weights_only=False or
    to allow-list the class (the service does neither) and without terminal escapes."""
    from service.textcheck import plain_text

    text = plain_text(str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip()
        reason = reason.split(" Please use `torch.serialization", 1)[0]
        reason = reason.split("\n", 1)[0].strip()
    else:
        reason = (text.splitlines() or ["unsupported object"])[0].strip()
    return reason[:300] or "unsupported object"


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


def _rejected(exc: Exception) -> Rejected:
    """A service error (status, code, detail) as the inspector's refusal."""
    from service.errors import SlimlineError

    if isinstance(exc, SlimlineError):
        code = {413: "UploadTooLarge", 415: "UnsupportedFormat"}.get(exc.status,
                                                                    "InvalidCheckpoint")
        return Rejected(exc.status, code, exc.detail)
    return _invalid(str(exc))


def parse_options(text: str) -> dict[str, Any]:
    """The `--options` JSON: {"input_shape": [ints], "num_classes": int, "preprocessing":
    {"layout", "mean", "std"}}, every key optional (the API validated the form fields)."""
    if not text.strip():
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(f"--options is not valid JSON ({exc})") from None
    if not isinstance(options, dict) or set(options) - {"input_shape", "num_classes",
                                                        "preprocessing"}:
        raise _invalid("--options must be an object with input_shape, num_classes and "
                       "preprocessing")
    shape = options.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not shape or not all(
            type(d) is int and d >= 1 for d in shape)):
        raise _invalid(f"input_shape must be positive integers, got {shape!r}")
    classes = options.get("num_classes")
    if classes is not None and (type(classes) is not int or classes < 1):
        raise _invalid(f"num_classes must be a positive integer, got {classes!r}")
    return {k: v for k, v in options.items() if v is not None}


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(d) for d in shape)


def apply_options(arch: dict[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """`arch` with the upload's input_shape / num_classes (filled in where the arch leaves them
    to defaults, else they must agree) and preprocessing (replacing any stored one)."""
    from core.errors import SpecError
    from core.models import normalize_arch

    arch = dict(arch)
    for key in ("input_shape", "num_classes"):
        if key in options and key not in arch:
            arch[key] = options[key]
    if "preprocessing" in options:
        arch["preprocessing"] = options["preprocessing"]
    try:
        full = normalize_arch(arch)
    except SpecError as exc:
        raise _invalid(str(exc)) from None
    if "input_shape" in options and list(full["input_shape"]) != list(options["input_shape"]):
        raise Rejected(422, "InvalidCheckpoint",
                       f"input_shape {_shape_text(options['input_shape'])} does not match the "
                       f"model's input {_shape_text(full['input_shape'])} (arch "
                       f"{full['name']!r}); leave the input_shape field out or fix it")
    if "num_classes" in options and full["num_classes"] != options["num_classes"]:
        raise Rejected(422, "InvalidCheckpoint",
                       f"num_classes {options['num_classes']} does not match the model's "
                       f"{full['num_classes']} classes (arch {full['name']!r}); leave the "
                       "num_classes field out or fix it")
    check_preprocessing(full)
    return full


def check_preprocessing(arch: Mapping[str, Any]) -> None:
    """mean/std give one value per channel of the model's input (its layout says which
    dimension holds the channels)."""
    pre = arch.get("preprocessing")
    shape = list(arch.get("input_shape") or [])
    if not pre or len(shape) != 3 or pre.get("layout") == "flat":
        return
    channels = shape[-1] if pre.get("layout") == "NHWC" else shape[0]
    for key in ("mean", "std"):
        values = pre.get(key)
        if values is not None and len(values) != channels:
            raise Rejected(422, "InvalidCheckpoint",
                           f"{key} has {len(values)} values but the model's input "
                           f"{_shape_text(shape)} (layout {pre.get('layout')}) has {channels} "
                           f"channels; give one {key} per channel")


def register_stored_graph(arch: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """An imported model's checkpoint (arch 'graph') carries its graph in the `slimline_graph`
    metadata: registered here (validated, and its sha must be the arch's)."""
    from core.errors import SpecError
    from core.graph import register_graph

    text = metadata.get("slimline_graph")
    if text is None:
        raise _invalid("the checkpoint holds an imported model (arch 'graph') but no "
                       "'slimline_graph' metadata; upload the .safetensors file slimline wrote "
                       "for it (GET /v1/models/{id}/file), or the original .pt2/.onnx file")
    try:
        sha = register_graph(json.loads(text))
    except json.JSONDecodeError as exc:
        raise _invalid(f"the checkpoint's 'slimline_graph' metadata is not JSON ({exc})") \
            from None
    except SpecError as exc:
        raise _invalid(f"the checkpoint's imported graph is invalid: {exc}") from None
    if sha != arch.get("graph"):
        raise _invalid(f"the checkpoint's graph has id {sha} but its arch names "
                       f"{arch.get('graph')!r}; the file was modified. Upload the file slimline "
                       "wrote, unchanged")


def import_graph_file(path: Path, fmt: str, options: Mapping[str, Any], workdir: Path, *,
                      max_bytes: int, max_ratio: float) -> Any:
    """The model of an uploaded `.pt2` or ONNX file: archive/file checks, load, conversion to
    the slimline graph IR (op allow-list), `core.models.import_graph` with the options."""
    from core.errors import CheckpointError, SpecError
    from core.models import import_graph
    from service.errors import SlimlineError

    try:
        if fmt == "pt2":
            from core.import_pt2 import graph_from_program
            from worker.pt2_check import load_program

            program = load_program(path, workdir, max_bytes=max_bytes, max_ratio=max_ratio)
            ir, tensors = graph_from_program(program)
            del program
        else:
            from worker.onnx_import import check_onnx, graph_from_onnx

            proto = check_onnx(path, max_bytes=max_bytes)
            ir, tensors = graph_from_onnx(proto)
            del proto
        shape = list(ir["input"]["shape"])
        if "input_shape" in options and list(options["input_shape"]) != shape:
            raise Rejected(422, "InvalidCheckpoint",
                           f"input_shape {_shape_text(options['input_shape'])} does not match "
                           f"the graph's input {_shape_text(shape)} (without the batch "
                           "dimension); leave the input_shape field out or fix it")
        model = import_graph(ir, tensors, num_classes=options.get("num_classes"),
                             preprocessing=options.get("preprocessing"))
    except (SlimlineError, SpecError, CheckpointError) as exc:
        raise _rejected(exc) from None
    arch: dict[str, Any] = model.slimline_arch  # type: ignore[assignment]
    check_preprocessing(arch)
    return model


def prunability(model: Any) -> dict[str, Any] | None:
    """The model's prunability report (`core.prunability`): per layer its kind, shape, MACs and
    the methods that apply, the coupled groups and what is left untouched and why. A failure is
    logged and leaves the model without a report (never fails the upload)."""
    try:
        from core.prunability import prunability_report
    except ImportError:  # the report module is optional for older checkouts
        return None
    try:
        return dict(prunability_report(model))
    except Exception as exc:  # noqa: BLE001 - the report is informative only
        if _out_of_memory(exc):
            raise
        print(f"worker.inspect: no prunability report ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None


def inspect_checkpoint(path: Path, fmt: str, arch_arg: str, output: Path,
                       max_header_bytes: int = DEFAULT_MAX_HEADER, *,
                       options: Mapping[str, Any] | None = None,
                       graph_output: Path | None = None, report_output: Path | None = None,
                       max_bytes: int = DEFAULT_MAX_DATASET,
                       max_ratio: float = DEFAULT_MAX_RATIO) -> dict[str, Any]:
    """Validate `path` and write the normalized checkpoint to `output` (and the report and the
    graph where asked); returns the reply."""
    import tempfile

    if fmt not in FORMATS:
        raise Rejected(415, "UnsupportedFormat",
                       f"unsupported checkpoint format {fmt!r}; upload .safetensors, a .pt "
                       "state_dict, a torch.export .pt2 archive or an .onnx model")
    if not path.is_file():
        raise _invalid(f"input file {path} does not exist")
    options = dict(options or {})

    from core.errors import CheckpointError
    from core.graph import canonical, graph_for, is_graph_model
    from core.metrics import param_counts
    from core.models import save

    if fmt in GRAPH_FORMATS:
        if arch_arg.strip():
            raise _invalid(f"the arch field is for .safetensors/.pt uploads; a .{fmt} file "
                           "carries its graph (give input_shape, num_classes, layout, mean and "
                           "std instead)")
        with tempfile.TemporaryDirectory(dir=output.parent, prefix="import-") as work:
            model = import_graph_file(path, fmt, options, Path(work),
                                      max_bytes=max_bytes, max_ratio=max_ratio)
    else:
        if fmt == "safetensors":
            tensors, metadata = read_safetensors(path, max_header_bytes)
        else:
            tensors, metadata = read_pt(path), {}
        arch = resolve_arch(arch_arg, metadata)
        if arch.get("name") == "graph":
            register_stored_graph(arch, metadata)
        if options:
            arch = apply_options(arch, options)
        try:
            model = build_from_upload(arch, tensors)
        except CheckpointError as exc:
            raise _invalid(str(exc)) from None
        del tensors
    save(model, output)
    reply: dict[str, Any] = {"ok": True, "arch": model.slimline_arch,
                             "params": param_counts(model), "report": None, "graph": None}
    if report_output is not None:
        report = prunability(model)
        if report is not None:
            report_output.write_text(json.dumps(report, allow_nan=False))
            reply["report"] = str(report_output)
    if graph_output is not None and is_graph_model(model):
        sha = model.slimline_arch["graph"]
        graph_output.write_text(canonical(graph_for(sha)))
        reply["graph"] = {"sha": sha, "path": str(graph_output)}
    return reply


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
    parser.add_argument("--options", default="")
    parser.add_argument("--graph-output", default="")
    parser.add_argument("--report-output", default="")
    args = parser.parse_args(argv)
    from worker.pt2_check import force_weights_only

    force_weights_only()  # every torch.load of this process: weights_only=True
    output = Path(args.output) if args.output else None
    extras = [Path(p) for p in (args.graph_output, args.report_output) if p]
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
                reply = inspect_checkpoint(
                    args.input, args.format, args.arch, output, args.max_header_bytes,
                    options=parse_options(args.options),
                    graph_output=Path(args.graph_output) if args.graph_output else None,
                    report_output=Path(args.report_output) if args.report_output else None,
                    max_bytes=args.max_dataset_bytes, max_ratio=args.max_ratio)
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
                                      "upload a safetensors file, a .pt state_dict, a "
                                      "torch.export .pt2 archive or an .onnx model")}
    if not reply["ok"]:
        from service.textcheck import plain_text

        # plain text: torch's messages carry terminal escapes (bold), never meant for JSON
        reply["detail"] = plain_text(str(reply.get("detail") or ""))
        for path in ([output] if output is not None else []) + extras:
            path.unlink(missing_ok=True)
    print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    # modules that raise `worker.inspect.Rejected` (worker.onnx_import) must find this module,
    # not a second copy of it, or main() would not recognise their refusals
    sys.modules.setdefault("worker.inspect", sys.modules[__name__])
    sys.exit(main())
