"""Export a stored model checkpoint to ONNX or a torch.export program, out of the API process.

    python -m worker.export_file --input MODEL.safetensors --format onnx|pt2 --output PATH
        [--opset 18]

The API runs this in a subprocess (api/exports.py, under the inspector's RLIMIT_AS / RLIMIT_CPU,
wall-clock limit and concurrency slots) when a model is downloaded in a format no job stored, so
torch stays out of its process. The input is a checkpoint the API wrote itself (an upload after
worker.inspect normalized it, or a job's output). It prints exactly ONE JSON line on stdout and
exits 0 either way:
`{"ok": true, "format": "onnx", "bytes": N, ...}` after writing --output (atomically: nothing is
left there on failure), or `{"ok": false, "status": 422, "error": "ExportError", "detail": "<the
layer or op that could not be exported, and what to do>"}`, with `"limit": "memory"` when an
allocation failed (the address-space cap).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.inspect import _out_of_memory

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18


def export_checkpoint(source: Path, fmt: str, output: Path, opset: int = DEFAULT_OPSET
                      ) -> dict[str, Any]:
    """Load the checkpoint at `source` and export it to `output` in `fmt`; returns the reply."""
    from core import models as zoo
    from core.arch import input_shape
    from core.export import export_onnx, export_pt2

    model = zoo.load(source).eval()
    arch = zoo.model_arch(model)
    shape = input_shape(arch)
    if (arch.get("preprocessing") or {}).get("layout") == "flat" and len(shape) != 1:
        shape = [math.prod(shape)]  # the (N, D) samples its jobs feed it (worker.inputs)
    if fmt == "onnx":
        info = export_onnx(model, shape, output, opset=opset)
    else:
        info = export_pt2(model, shape, output)
    return {"ok": True, "format": fmt, **info, "bytes": output.stat().st_size}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.export_file", description=__doc__)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)
    # Whatever torch prints (the exporter's progress lines) must not corrupt the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from core.errors import ExportError

            try:
                reply = export_checkpoint(args.input, args.format, args.output, args.opset)
            except ExportError as exc:
                reply = {"ok": False, "status": 422, "error": "ExportError", "detail": str(exc)}
        except Exception as exc:  # noqa: BLE001 - never a traceback on stdout; the API shows `detail`
            print(f"worker.export_file: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
            if _out_of_memory(exc):
                reply = {"ok": False, "status": 422, "error": "ExportError", "limit": "memory",
                         "detail": "the model is too large to export within the exporter's "
                                   "memory limit"}
            else:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                reply = {"ok": False, "status": 422, "error": "ExportError",
                         "detail": f"the model could not be exported to {args.format} "
                                   f"({type(exc).__name__}: {first})"}
    if not reply["ok"]:
        args.output.unlink(missing_ok=True)
    print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
