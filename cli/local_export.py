"""`slimline import`: build the user's model from their own code ON THEIR MACHINE (where it is
trusted), load its weights, export it with `torch.export` (a dynamic batch dimension) and save
the `.pt2` archive that `slimline upload` sends. The service never runs this code: it only
receives the exported graph and weights.

Every failure is an `ImportFailure` whose message says what to fix (the factory cannot be
imported, the weights do not fit, torch.export stopped at a given op or source line).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

BATCH = 2  # the example batch; the batch dimension is exported as dynamic


class ImportFailure(Exception):
    """A model that cannot be built, loaded or exported; the message says why and what to do."""


def resolve_factory(target: str) -> Any:
    """`package.module:factory` (a function or an nn.Module class, possibly `module:Outer.attr`),
    imported with the current directory on sys.path (as `python -m` would)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr or not all(
            part.isidentifier() for part in [*module_name.split("."), *attr.split(".")]):
        raise ImportFailure(f"{target!r} is not MODULE:FACTORY, e.g. mypkg.models:build_net "
                            "(a function returning an nn.Module, or an nn.Module class)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportFailure(f"cannot import module {module_name!r}: {exc}; run the command "
                            "where the package is importable (or set PYTHONPATH)") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise ImportFailure(f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
                            f"{_where(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportFailure(f"module {module_name!r} has no {attr!r} (factory not found); "
                                f"names it defines: {', '.join(_public(obj))}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportFailure(f"{target!r} is a {type(obj).__name__}, not a factory; give a "
                            "function returning an nn.Module, or an nn.Module class")
    return obj


def _public(obj: Any, limit: int = 12) -> list[str]:
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    return names[:limit] or ["(none)"]


def _where(exc: BaseException) -> str:
    """' at FILE:LINE (code)' of the deepest frame outside torch and the standard library."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "site-packages" not in f.filename
            and "/lib/python" not in f.filename and "<frozen" not in f.filename]
    if not user:
        return ""
    frame = user[-1]
    return f" at {frame.filename}:{frame.lineno}" + (f" ({frame.line.strip()})"
                                                      if frame.line else "")


def build_model(factory: Any, factory_args: str | None) -> Any:
    """`factory(*args)` or `factory(**kwargs)` from the JSON `factory_args`; an nn.Module."""
    from torch import nn

    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if factory_args:
        try:
            parsed = json.loads(factory_args)
        except json.JSONDecodeError as exc:
            raise ImportFailure(f"--factory-args is not valid JSON ({exc}); give an object of "
                                'keyword arguments, e.g. {"num_classes": 10}, or a list') \
                from None
        if isinstance(parsed, dict):
            kwargs = parsed
        elif isinstance(parsed, list):
            args = parsed
        else:
            raise ImportFailure("--factory-args must be a JSON object (keyword arguments) or a "
                                "list (positional arguments)")
    try:
        model = factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's factory raised
        raise ImportFailure(f"the factory raised {type(exc).__name__}: {exc}{_where(exc)}") \
            from None
    if not isinstance(model, nn.Module):
        raise ImportFailure(f"the factory returned a {type(model).__name__}, not a "
                            "torch.nn.Module")
    return model


def load_weights(model: Any, path: Path) -> None:
    """Load a state dict into `model`: `.safetensors`, or a `.pt`/`.pth` file read with
    `torch.load(weights_only=True)` (a bare state dict, or one under "state_dict"/"model")."""
    import torch

    if not path.is_file():
        raise ImportFailure(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with objects, garbled files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ImportFailure(f"cannot read weights from {path} ({first}); save "
                            "model.state_dict() with torch.save or safetensors") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ImportFailure(f"{path} does not hold a state dict (names -> tensors); save "
                            "model.state_dict()")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4]) or str(exc)
        raise ImportFailure(f"the weights in {path} do not fit the model built by the factory "
                            f"({detail[:500]}); check --factory-args") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {sorted(result.missing_keys)[:8]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {sorted(result.unexpected_keys)[:8]}")
    if problems:
        raise ImportFailure(f"the weights in {path} do not fit the model built by the factory "
                            f"({'; '.join(problems)}); check --factory-args")


def export_program(model: Any, input_shape: list[int]) -> tuple[Any, bool]:
    """`torch.export.export` with a dynamic batch dimension (falling back to a static batch when
    the model pins it: slimline rewrites or refuses that at upload); returns (program,
    dynamic)."""
    import torch

    model.eval()
    example = torch.randn(BATCH, *input_shape)
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - the model does not run on that input
        raise ImportFailure(f"the model does not run on an input of shape "
                            f"{[BATCH, *input_shape]} ({type(exc).__name__}: "
                            f"{_first_line(exc)}){_where(exc)}; check --input-shape "
                            "(without the batch dimension)") from None
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), True
    except Exception as dynamic_exc:  # noqa: BLE001 - retry with a static batch below
        try:
            return torch.export.export(model, (example,)), False
        except Exception as exc:  # noqa: BLE001 - report the export error, with its place
            raise ImportFailure(f"torch.export failed ({type(exc).__name__}: "
                                f"{_first_line(exc)}){_source_line(exc)}; make the forward "
                                "traceable (no data-dependent Python control flow, no "
                                "unsupported calls) and try again") from dynamic_exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]


def _source_line(exc: BaseException) -> str:
    """Where in the user's code torch.export stopped: its 'from user code' frame, else the
    deepest frame outside torch."""
    found = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', str(exc))
    user = [f for f in found if "site-packages" not in f[0]]
    if user:
        file, line, func, code = user[-1]
        return f" at {file}:{line} in {func} ({code.strip()})"
    return _where(exc)


def save_program(program: Any, path: Path) -> Path:
    import torch

    torch.export.save(program, str(path))
    return path
