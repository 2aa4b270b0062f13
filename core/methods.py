"""Every compression method of core, imported so that each registers its structural edit
(`core.edits.register_edit`). Checkpoint I/O (`core.models.checkpoint`) imports this module
before it rebuilds a model; `core.arch.build` itself never imports a method.

A new method needs no line here: every module directly under `core/` (not the `core.models`
facade, not this module) is imported, so registering the replay in the method's own module is
enough.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import core
from core.edits import EDIT_OPS

_SKIP = frozenset({"methods"})


def _import_all() -> tuple[ModuleType, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(core.__path__), key=lambda m: m.name):
        if info.ispkg or info.name in _SKIP or info.name.startswith("_"):
            continue
        found.append(importlib.import_module(f"core.{info.name}"))
    return tuple(found)


METHOD_MODULES = _import_all()

__all__ = ["EDIT_OPS", "METHOD_MODULES"]
