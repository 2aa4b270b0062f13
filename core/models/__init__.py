"""Architectures, layers and checkpoints: the public face of `core.arch`, `core.surgery`,
`core.edits`, `core.zoo` and `core.models.checkpoint` (the names live there; this package
re-exports them and sits at the TOP of core's layering, above every method).

An architecture is data: `{"name": <zoo name>, ...kwargs, "edits": [...]}` (or an imported
graph, `{"name": "graph", "graph": <sha256>, ...}`: `import_graph`, `core.graph`).
`build(arch)` builds the zoo model and replays the structural `edits` (shapes only; values
come from a checkpoint or from the transform that appended the edit). Modules inside core
import the lower modules directly (`core.surgery.get_layer`, ...), never this package.
"""
from __future__ import annotations

from core.arch import build, input_shape, normalize_arch
from core.edits import EDIT_OPS, register_edit
from core.graph import GRAPH_FORMAT, graph_for, graph_id, is_graph_model, register_graph
from core.models.checkpoint import (
    from_state_dict,
    from_tensors,
    import_graph,
    load,
    read_arch,
    save,
)
from core.surgery import (
    get_layer,
    layer_weight,
    model_arch,
    prunable_layers,
    set_layer,
    set_masks,
    with_edit,
)
from core.zoo import ZOO

__all__ = [
    "EDIT_OPS",
    "GRAPH_FORMAT",
    "ZOO",
    "build",
    "from_state_dict",
    "from_tensors",
    "get_layer",
    "graph_for",
    "graph_id",
    "import_graph",
    "input_shape",
    "is_graph_model",
    "layer_weight",
    "load",
    "model_arch",
    "normalize_arch",
    "prunable_layers",
    "read_arch",
    "register_graph",
    "register_edit",
    "save",
    "set_layer",
    "set_masks",
    "with_edit",
]
