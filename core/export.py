"""Models leave slimline: ONNX (`torch.onnx.export(..., dynamo=True)`) and `.pt2`
(`torch.export.export` + `torch.export.save`), both with a dynamic batch axis.

The dynamo exporter is torch's default since 2.9 and builds the ONNX graph from the same
`torch.export` program the `.pt2` holds (the TorchScript exporter is deprecated). Before either
export, `prepare_for_export` copies the model and swaps every slimline layer for its export form
(`core.export_layers`): factor pairs stay two ops, a PCN projection stays its own MatMul/Conv,
DCTpS becomes a dense layer (default) or keeps D implicit (`core.export_dctps`); masks export as
dense weights with zeros (a dense runtime gains nothing from them).

Files are written atomically: a temp file beside `path`, then `os.replace`; on any failure the
temp file is removed and nothing is left at `path`. A model that cannot be exported raises
`core.errors.ExportError` naming the layer (the deepest submodule that fails on its own) and the
exporter's first error line. Exports are quiet: the exporter's progress lines, warnings and log
records are swallowed so a worker's log stays clean.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ExportError
from core.export_layers import DCTPS_MODES, describe, export_form

EXPORTER = "torch.onnx (dynamo)"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
_EXAMPLE_BATCH = 2  # not 0/1: torch.export would specialise the batch axis to that size
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript")


def prepare_for_export(model: nn.Module, *, dctps: str = "dense") -> nn.Module:
    """A copy of `model` in eval mode with every slimline layer in its export form; the copy's
    `slimline_export_layers` maps each such layer's name to the ops it exports as."""
    if dctps not in DCTPS_MODES:
        raise ExportError(f"dctps must be one of {DCTPS_MODES}, got {dctps!r}")
    prepared = copy.deepcopy(model).eval()
    layers: dict[str, str] = {}
    for name, module in list(prepared.named_modules()):
        if not name:
            continue
        form = export_form(module, dctps)
        if form is not None:
            replacement, ops = form
            parent, _, child = name.rpartition(".")
            setattr(prepared.get_submodule(parent) if parent else prepared, child, replacement)
            layers[name] = ops
        elif (ops_of := describe(module)) is not None:
            layers[name] = ops_of
    prepared.requires_grad_(False)
    prepared.slimline_export_layers = layers  # type: ignore[assignment]
    return prepared


def exported_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of a prepared model (what an export must hold;
    BatchNorm's step counter is not exported)."""
    tensors = [p for p in model.parameters()] + [
        b for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")]
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | os.PathLike[str], *,
                opset: int = 18, dctps: str = "dense") -> dict[str, Any]:
    """Write `model` as ONNX (input "input" `(batch, *input_shape)`, output "logits") to `path`.

    Returns `{"exporter", "opset", "bytes", "param_bytes", "layers", "dctps"}`; raises
    ExportError when the model cannot be exported (nothing is left at `path`)."""
    prepared = prepare_for_export(model, dctps=dctps)
    example = _example(prepared, input_shape)
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    with _atomic(path, ".onnx") as tmp:
        try:
            with _quiet():
                program = torch.onnx.export(
                    prepared, (example,), None, dynamo=True, verbose=False,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=opset, dynamic_shapes=dynamic, optimize=True)
                assert program is not None  # dynamo=True always returns the program
                program.save(tmp, external_data=False)
        except Exception as exc:
            raise _export_error("ONNX", prepared, example, exc) from exc
    return {"exporter": EXPORTER, "opset": opset, "bytes": os.path.getsize(path),
            "param_bytes": exported_bytes(prepared), "dctps": dctps,
            "layers": dict(prepared.slimline_export_layers)}


def export_pt2(model: nn.Module, input_shape: Sequence[int], path: str | os.PathLike[str]
               ) -> dict[str, Any]:
    """Write `model` as a `torch.export` program (`torch.export.load` reads it back with plain
    torch; dynamic batch axis) to `path`. Returns `{"bytes"}`; ExportError as `export_onnx`."""
    prepared = prepare_for_export(model)
    example = _example(prepared, input_shape)
    with _atomic(path, ".pt2") as tmp:
        try:
            with _quiet():
                program = torch.export.export(
                    prepared, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    strict=False)
                torch.export.save(program, tmp)
        except Exception as exc:
            raise _export_error("torch.export", prepared, example, exc) from exc
    return {"bytes": os.path.getsize(path)}


# ---- helpers ----

def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    shape = [int(s) for s in input_shape]
    if not shape or min(shape) < 1:
        raise ExportError(f"input_shape must be positive sizes without the batch axis, got "
                          f"{list(input_shape)}")
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    return torch.rand(_EXAMPLE_BATCH, *shape, generator=g, dtype=dtype).to(device)


@contextlib.contextmanager
def _atomic(path: str | os.PathLike[str], suffix: str) -> Iterator[str]:
    """A temp file name beside `path`, moved onto `path` when the block succeeds and removed
    when it fails (KeyboardInterrupt included)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the exporters' prints, warnings and log records below ERROR."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _export_error(what: str, model: nn.Module, example: torch.Tensor, exc: Exception
                  ) -> ExportError:
    culprit = _failing_module(model, example)
    where = (f"layer {culprit[0]!r} ({culprit[1]})" if culprit is not None
             else "the model (no single layer fails on its own)")
    return ExportError(f"{what} export failed at {where}: {type(exc).__name__}: "
                       f"{_first_line(exc)}. Replace or rewrite that module with ops "
                       "torch.export can trace (no data-dependent control flow, no Python-side "
                       "tensor values), or export without it")


def _failing_module(model: nn.Module, example: torch.Tensor) -> tuple[str, str] | None:
    """`(name, class)` of the deepest submodule that fails `torch.export` on its own, with the
    inputs it receives in a forward of `example`; None when every submodule exports."""
    inputs: dict[str, tuple[Any, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: inputs.setdefault(name, args)))
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # the forward itself fails: the last module entered is the culprit
        pass
    finally:
        for h in hooks:
            h.remove()
    failing: tuple[str, str] | None = None
    for name, args in inputs.items():  # forward order, parents before children
        module = model.get_submodule(name)
        if failing is not None and not name.startswith(failing[0] + "."):
            break
        try:
            with _quiet():
                torch.export.export(module, args, strict=False)
        except Exception:
            failing = (name, type(module).__name__)
    if failing is None and inputs:
        last = next(reversed(inputs))  # the forward raised inside the last module entered
        try:
            with torch.no_grad():
                model.get_submodule(last)(*inputs[last])
        except Exception:
            return last, type(model.get_submodule(last)).__name__
    return failing
