"""Every compression method of core, imported so that each registers its structural edit
(`core.edits.register_edit`). Checkpoint I/O (`core.models.checkpoint`) imports this module
before it rebuilds a model; `core.arch.build` itself never imports a method.

Adding a method with an edit: register the replay in its module and import the module here.
"""
from __future__ import annotations

from core import channel_prune, dctps, lowrank, pcn, pcn_output
from core.edits import EDIT_OPS

METHOD_MODULES = (pcn, pcn_output, lowrank, dctps, channel_prune)

__all__ = ["EDIT_OPS", "METHOD_MODULES"]
