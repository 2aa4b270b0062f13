"""Imported models: the slimline graph IR (JSON) and the trainable module built from it.

An imported graph (torch.export program or ONNX model, converted by `core.import_pt2` or the
ONNX converter) is data:

    {"format": "slimline-graph/1",
     "input":   {"name": "x", "shape": [1, 28, 28]},          # without the batch dim
     "modules": {"layer1.0.conv1": {"type": "Conv2d", ...}, ...},
     "tensors": {"cls_token": {"shape": [1, 1, 32], "dtype": "float32", "trainable": true}},
     "nodes":   [{"name": "conv2d", "op": "module", "target": "conv1", "args": [{"node": "x"}],
                  "kwargs": {}}, {"name": "relu", "op": "aten.relu.default", ...}, ...],
     "output":  {"node": "linear"}}

`build_graph_module(ir)` turns it into a `torch.fx.GraphModule` (`GraphModel`) whose Linear /
Conv2d / BatchNorm / LayerNorm are real modules under their dotted names (`layer1.0.conv1`,
nested plain containers), reached by `call_module` nodes, so `get_layer` / `set_layer` and every
per-layer method work unchanged; `tensors` become parameters (trainable) or buffers; other nodes
call the allow-listed ops of `core.graph_ops`. Weights are not in the IR: the built module's
state dict (module weights + `tensors`) comes from the converter or a checkpoint.

Graphs are content-addressed: `graph_id(ir)` = sha256 of `canonical(ir)`; `register_graph(ir)`
keeps it in a process-wide cache and the arch of an imported model names it
(`{"name": "graph", "graph": <sha>, ...}`, `core.arch`). Checkpoints carry the IR in their
metadata (`core.models.save`), so one file reloads in a fresh process.
"""
from __future__ import annotations

import copy
import hashlib
import json
import keyword
import math
import re
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import fx, nn

from core.errors import SpecError
from core.graph_ops import ALLOWED_OPS, DTYPES

GRAPH_FORMAT = "slimline-graph/1"
MAX_NODES = 100_000
MAX_ELEMENTS = 1_000_000_000  # weights + tensors a graph may declare (4 GB of float32)
IR_KEYS = ("format", "input", "modules", "tensors", "nodes", "output")
MODULE_TYPES = ("Linear", "Conv2d", "BatchNorm2d", "BatchNorm1d", "LayerNorm")
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)\Z")
_SHA = re.compile(r"[0-9a-f]{64}\Z")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}

# sha -> IR (canonical JSON parsed back); filled by `register_graph`
_GRAPHS: dict[str, dict[str, Any]] = {}


def canonical(ir: Mapping[str, Any]) -> str:
    """The canonical JSON text of an IR (sorted keys, no spaces): what `graph_id` hashes and
    checkpoints store."""
    try:
        return json.dumps(ir, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"the graph is not JSON-serialisable ({exc}); encode non-finite floats "
                        "as {'float': 'inf'|'-inf'|'nan'} and dtypes as {'dtype': name}") from None


def graph_id(ir: Mapping[str, Any]) -> str:
    """sha256 hex of `canonical(ir)`."""
    return hashlib.sha256(canonical(ir).encode()).hexdigest()


def is_sha(value: object) -> bool:
    """Whether `value` looks like a graph id (64 lowercase hex digits)."""
    return isinstance(value, str) and _SHA.match(value) is not None


def register_graph(ir: Mapping[str, Any]) -> str:
    """Validate `ir`, keep it in the process-wide cache and return its id (sha256)."""
    validate_graph(ir)
    text = canonical(ir)
    sha = hashlib.sha256(text.encode()).hexdigest()
    if sha not in _GRAPHS:
        _GRAPHS[sha] = json.loads(text)
    return sha


def graph_for(sha: str) -> dict[str, Any]:
    """The registered IR with id `sha` (a copy); SpecError when this process has not seen it."""
    ir = _GRAPHS.get(sha) if isinstance(sha, str) else None
    if ir is None:
        raise SpecError(f"unknown graph {sha!r}; an imported model's graph travels in its "
                        "checkpoint: load the checkpoint with core.models.load (or "
                        "core.models.read_arch) before building its arch")
    return copy.deepcopy(ir)


def is_graph_model(model: nn.Module) -> bool:
    """Whether `model` was built from an imported graph (its arch is `{"name": "graph", ...}`)."""
    arch = getattr(model, "slimline_arch", None)
    return isinstance(arch, dict) and arch.get("name") == "graph"


# ---- validation ----

def _dotted(what: str, name: object) -> str:
    if not isinstance(name, str) or not name or not all(_PART.match(p) for p in name.split(".")):
        raise SpecError(f"{what} name {name!r} must be a dotted name of identifiers or indices "
                        "(e.g. 'layer1.0.conv1')")
    return name


def _ints(what: str, value: object, *, length: int | None = None, minimum: int = 1) -> list[int]:
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                       for v in value)):
        count = f"{length} " if length is not None else ""
        raise SpecError(f"{what} must be a list of {count}integers >= {minimum}, got {value!r}")
    return list(value)


def _int(what: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _flag(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{what} must be true or false, got {value!r}")
    return value


def _positive_float(what: str, value: object, *, allow_zero: bool = False) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
        raise SpecError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


_SPEC_KEYS = {
    "Linear": {"type", "in_features", "out_features", "bias"},
    "Conv2d": {"type", "in_channels", "out_channels", "kernel_size", "stride", "padding",
               "dilation", "groups", "bias"},
    "BatchNorm2d": {"type", "num_features", "eps", "momentum", "affine", "track_running_stats"},
    "BatchNorm1d": {"type", "num_features", "eps", "momentum", "affine", "track_running_stats"},
    "LayerNorm": {"type", "normalized_shape", "eps", "elementwise_affine", "bias"},
}


def _check_module(name: str, spec: object) -> None:
    where = f"module {name!r}"
    if not isinstance(spec, dict) or spec.get("type") not in MODULE_TYPES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise SpecError(f"{where} has type {kind!r}; module types are {', '.join(MODULE_TYPES)}")
    kind = spec["type"]
    keys = set(spec)
    if keys != _SPEC_KEYS[kind]:
        raise SpecError(f"{where} ({kind}) has keys {sorted(keys)}; expected "
                        f"{sorted(_SPEC_KEYS[kind])}")
    if kind == "Linear":
        _int(f"{where}: in_features", spec["in_features"])
        _int(f"{where}: out_features", spec["out_features"])
        _flag(f"{where}: bias", spec["bias"])
    elif kind == "Conv2d":
        c_in = _int(f"{where}: in_channels", spec["in_channels"])
        c_out = _int(f"{where}: out_channels", spec["out_channels"])
        groups = _int(f"{where}: groups", spec["groups"])
        if c_in % groups or c_out % groups:
            raise SpecError(f"{where}: in_channels {c_in} and out_channels {c_out} must be "
                            f"divisible by groups {groups}")
        _ints(f"{where}: kernel_size", spec["kernel_size"], length=2)
        _ints(f"{where}: stride", spec["stride"], length=2)
        _ints(f"{where}: dilation", spec["dilation"], length=2)
        padding = spec["padding"]
        if padding not in ("same", "valid"):
            _ints(f"{where}: padding ('same', 'valid' or)", padding, length=2, minimum=0)
        _flag(f"{where}: bias", spec["bias"])
    elif kind in ("BatchNorm2d", "BatchNorm1d"):
        _int(f"{where}: num_features", spec["num_features"])
        _positive_float(f"{where}: eps", spec["eps"])
        if spec["momentum"] is not None:
            _positive_float(f"{where}: momentum (or null)", spec["momentum"], allow_zero=True)
        _flag(f"{where}: affine", spec["affine"])
        _flag(f"{where}: track_running_stats", spec["track_running_stats"])
    else:
        _ints(f"{where}: normalized_shape", spec["normalized_shape"])
        if not spec["normalized_shape"]:
            raise SpecError(f"{where}: normalized_shape must not be empty")
        _positive_float(f"{where}: eps", spec["eps"])
        affine = _flag(f"{where}: elementwise_affine", spec["elementwise_affine"])
        if _flag(f"{where}: bias", spec["bias"]) and not affine:
            raise SpecError(f"{where}: bias needs elementwise_affine")


def _module_elements(spec: Mapping[str, Any]) -> int:
    """Entries of a (valid) module spec's parameters and buffers."""
    kind = spec["type"]
    if kind == "Linear":
        return int(spec["in_features"] * spec["out_features"]
                   + spec["out_features"] * spec["bias"])
    if kind == "Conv2d":
        kh, kw = spec["kernel_size"]
        return int(spec["out_channels"] * (spec["in_channels"] // spec["groups"]) * kh * kw
                   + spec["out_channels"] * spec["bias"])
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        return 4 * int(spec["num_features"])
    return 2 * math.prod(spec["normalized_shape"])


def _check_tensor(name: str, spec: object) -> None:
    where = f"tensor {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"shape", "dtype", "trainable"}:
        raise SpecError(f"{where} must be {{'shape': [...], 'dtype': ..., 'trainable': bool}}, "
                        f"got {spec!r}")
    _ints(f"{where}: shape", spec["shape"], minimum=0)
    if spec["dtype"] not in DTYPES:
        raise SpecError(f"{where}: dtype {spec['dtype']!r} is not one of {', '.join(DTYPES)}")
    if _flag(f"{where}: trainable", spec["trainable"]) and spec["dtype"] not in FLOAT_DTYPES:
        raise SpecError(f"{where}: only floating tensors can be trainable, got {spec['dtype']}")


def _check_arg(where: str, arg: object, known: set[str], depth: int = 0) -> None:
    """An encoded argument: JSON scalars, lists, {"node"}, {"float"}, {"dtype"}."""
    if depth > 8:
        raise SpecError(f"{where}: arguments nest too deeply")
    if arg is None or isinstance(arg, (bool, int, str)):
        return
    if isinstance(arg, float):
        if not math.isfinite(arg):
            raise SpecError(f"{where}: non-finite float {arg}; encode it as {{'float': 'inf'}}")
        return
    if isinstance(arg, list):
        for item in arg:
            _check_arg(where, item, known, depth + 1)
        return
    if isinstance(arg, dict) and len(arg) == 1:
        (key, value), = arg.items()
        if key == "node":
            if value not in known:
                raise SpecError(f"{where}: refers to {value!r}, which is not the input or an "
                                "earlier node (nodes must be in topological order)")
            return
        if key == "float" and value in _NONFINITE:
            return
        if key == "dtype" and value in DTYPES:
            return
    raise SpecError(f"{where}: cannot decode argument {arg!r}; arguments are JSON scalars, "
                    "lists, {'node': name}, {'float': 'inf'|'-inf'|'nan'} or "
                    f"{{'dtype': one of {', '.join(DTYPES)}}}")


def _refs(arg: object, found: set[str]) -> None:
    if isinstance(arg, list):
        for item in arg:
            _refs(item, found)
    elif isinstance(arg, dict) and "node" in arg:
        found.add(arg["node"])


def validate_graph(ir: object) -> None:
    """Check an IR completely (structure, names, module specs, ops on the allow-list, node
    references); SpecError says what is wrong and how to fix it."""
    if not isinstance(ir, dict):
        raise SpecError(f"a graph must be a JSON object, got {type(ir).__name__}")
    if set(ir) != set(IR_KEYS):
        raise SpecError(f"a graph has the keys {list(IR_KEYS)}, got {sorted(ir)}")
    if ir["format"] != GRAPH_FORMAT:
        raise SpecError(f"graph format {ir['format']!r} is not {GRAPH_FORMAT!r}; convert the "
                        "model again with this version of slimline")
    inp = ir["input"]
    if not isinstance(inp, dict) or set(inp) != {"name", "shape"}:
        raise SpecError(f"graph input must be {{'name': ..., 'shape': [...]}}, got {inp!r}")
    if not isinstance(inp["name"], str) or not _IDENT.match(inp["name"]) \
            or keyword.iskeyword(inp["name"]):
        raise SpecError(f"graph input name {inp['name']!r} must be a Python identifier")
    _ints("graph input shape (without the batch dimension)", inp["shape"])
    if not inp["shape"]:
        raise SpecError("graph input shape must have at least one dimension besides the batch")
    modules, tensors, nodes = ir["modules"], ir["tensors"], ir["nodes"]
    if not isinstance(modules, dict) or not isinstance(tensors, dict):
        raise SpecError("graph 'modules' and 'tensors' must be JSON objects keyed by name")
    for name, spec in modules.items():
        _check_module(_dotted("module", name), spec)
    for name, spec in tensors.items():
        _check_tensor(_dotted("tensor", name), spec)
    elements = sum(_module_elements(spec) for spec in modules.values()) + sum(
        math.prod(spec["shape"]) for spec in tensors.values())
    if elements > MAX_ELEMENTS:
        raise SpecError(f"the graph declares {elements} weight entries; at most {MAX_ELEMENTS} "
                        "are supported")
    owners = sorted([*modules, *tensors])
    for a, b in zip(owners, owners[1:], strict=False):
        if b.startswith(a + ".") or a == b:
            raise SpecError(f"{a!r} and {b!r} overlap: module and tensor names must not "
                            "contain one another (modules and tensors are leaves)")
    if not isinstance(nodes, list) or not nodes:
        raise SpecError("graph 'nodes' must be a non-empty list")
    if len(nodes) > MAX_NODES:
        raise SpecError(f"graph has {len(nodes)} nodes; at most {MAX_NODES} are supported")
    known = {inp["name"]}
    used: set[str] = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not {"name", "op", "args", "kwargs"} <= set(node) \
                or not set(node) <= {"name", "op", "target", "args", "kwargs"}:
            raise SpecError(f"node #{i} must be {{'name', 'op', ['target'], 'args', 'kwargs'}}, "
                            f"got {node!r}")
        name, op = node["name"], node["op"]
        if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name):
            raise SpecError(f"node #{i}: name {name!r} must be a Python identifier")
        if name in known:
            raise SpecError(f"node #{i}: name {name!r} is used twice")
        where = f"node {name!r}"
        if op in ("module", "get_attr"):
            target = node.get("target")
            pool = modules if op == "module" else tensors
            if target not in pool:
                kind = "module" if op == "module" else "tensor"
                raise SpecError(f"{where}: {op} target {target!r} is not a {kind} of the graph")
            used.add(target)
        elif not isinstance(op, str) or op not in ALLOWED_OPS:
            raise SpecError(f"{where}: op {op!r} is not supported; supported ops are 'module', "
                            "'get_attr' and the names in core.graph_ops.ALLOWED_OPS (rewrite the "
                            "model with supported operations and export it again)")
        elif "target" in node:
            raise SpecError(f"{where}: only 'module' and 'get_attr' nodes have a 'target'")
        if not isinstance(node["args"], list) or not isinstance(node["kwargs"], dict) \
                or not all(isinstance(k, str) and _IDENT.match(k) for k in node["kwargs"]):
            raise SpecError(f"{where}: 'args' must be a list and 'kwargs' an object keyed by "
                            "identifiers")
        if op == "get_attr" and (node["args"] or node["kwargs"]):
            raise SpecError(f"{where}: a get_attr node takes no arguments")
        _check_arg(where, node["args"], known)
        _check_arg(where, list(node["kwargs"].values()), known)
        known.add(name)
    _check_arg("graph output", ir["output"], known)
    refs: set[str] = set()
    _refs(ir["output"], refs)
    if not refs:
        raise SpecError("graph output must refer to a node (the logits)")
    unused = sorted(set(owners) - used)
    if unused:
        raise SpecError(f"graph has modules/tensors no node uses: {unused[:10]}; remove them")


# ---- building ----

class GraphModel(fx.GraphModule):
    """The module of an imported graph: a GraphModule whose `slimline_*` attributes (arch,
    masks) survive `copy.deepcopy` (methods copy a model before changing it)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphModel:
        new = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if key.startswith("slimline_"):
                setattr(new, key, copy.deepcopy(value, memo))
        return cast("GraphModel", new)


def make_module(spec: Mapping[str, Any]) -> nn.Module:
    """The nn module of a (validated) module spec, with PyTorch's default init."""
    kind = spec["type"]
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if kind == "Conv2d":
        padding = spec["padding"]
        return nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                         stride=tuple(spec["stride"]),
                         padding=padding if isinstance(padding, str) else tuple(padding),
                         dilation=tuple(spec["dilation"]), groups=spec["groups"],
                         bias=spec["bias"])
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        cls = nn.BatchNorm2d if kind == "BatchNorm2d" else nn.BatchNorm1d
        return cls(spec["num_features"], eps=spec["eps"], momentum=spec["momentum"],
                   affine=spec["affine"], track_running_stats=spec["track_running_stats"])
    return nn.LayerNorm(tuple(spec["normalized_shape"]), eps=spec["eps"],
                        elementwise_affine=spec["elementwise_affine"], bias=spec["bias"])


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The IR spec of an nn.Linear / nn.Conv2d / nn.BatchNorm2d / nn.BatchNorm1d / nn.LayerNorm
    (converters and tests; SpecError for other modules)."""
    if type(module) is nn.Linear:
        return {"type": "Linear", "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None}
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        padding = module.padding
        return {"type": "Conv2d", "in_channels": module.in_channels,
                "out_channels": module.out_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": padding if isinstance(padding, str) else list(padding),
                "dilation": list(module.dilation), "groups": module.groups,
                "bias": module.bias is not None}
    if type(module) in (nn.BatchNorm2d, nn.BatchNorm1d):
        bn: nn.BatchNorm2d | nn.BatchNorm1d = module  # type: ignore[assignment]
        return {"type": type(module).__name__, "num_features": bn.num_features, "eps": bn.eps,
                "momentum": bn.momentum, "affine": bn.affine,
                "track_running_stats": bn.track_running_stats}
    if type(module) is nn.LayerNorm:
        return {"type": "LayerNorm", "normalized_shape": list(module.normalized_shape),
                "eps": module.eps, "elementwise_affine": module.elementwise_affine,
                "bias": module.bias is not None}
    raise SpecError(f"{type(module).__name__} has no graph module spec; module types are "
                    f"{', '.join(MODULE_TYPES)}")


def encode_arg(value: Any) -> Any:
    """The IR encoding of an FX argument: fx.Node -> {"node": name}, non-finite float ->
    {"float": ...}, dtype -> {"dtype": ...}, tuples -> lists. SpecError for anything else."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (list, tuple)):
        return [encode_arg(v) for v in value]
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPES.items():
            if dtype == value:
                return {"dtype": name}
        raise SpecError(f"dtype {value} is not supported; use one of {', '.join(DTYPES)}")
    raise SpecError(f"argument {value!r} of type {type(value).__name__} cannot be stored in a "
                    "graph (supported: tensors from other nodes, numbers, strings, lists, dtypes)")


def _decode(arg: Any, env: Mapping[str, fx.Node]) -> Any:
    if isinstance(arg, list):
        return [_decode(a, env) for a in arg]
    if isinstance(arg, dict):
        (key, value), = arg.items()
        if key == "node":
            return env[value]
        if key == "float":
            return _NONFINITE[value]
        return DTYPES[value]
    return arg


def _attach(root: nn.Module, name: str, *, module: nn.Module | None = None,
            tensor: torch.Tensor | None = None, trainable: bool = False) -> None:
    """Put `module` or `tensor` at dotted `name`, creating plain container modules on the way."""
    *path, leaf = name.split(".")
    parent = root
    try:
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        if module is not None:
            parent.add_module(leaf, module)
        elif trainable:
            parent.register_parameter(leaf, nn.Parameter(tensor))
        else:
            parent.register_buffer(leaf, tensor)
    except (KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"cannot place {name!r} in the module tree ({exc}); rename it") from None


def build_graph_module(ir: Mapping[str, Any]) -> GraphModel:
    """The trainable GraphModule of a (valid) IR: modules with PyTorch's default init, tensors
    zero (the converter or a checkpoint fills them)."""
    validate_graph(ir)
    root = nn.Module()
    for name, spec in ir["modules"].items():
        _attach(root, name, module=make_module(spec))
    for name, spec in ir["tensors"].items():
        _attach(root, name, tensor=torch.zeros(spec["shape"], dtype=DTYPES[spec["dtype"]]),
                trainable=spec["trainable"])
    graph = fx.Graph()
    inp = ir["input"]["name"]
    env: dict[str, fx.Node] = {inp: graph.placeholder(inp)}
    for node in ir["nodes"]:
        op = node["op"]
        args = tuple(_decode(node["args"], env))
        kwargs = {k: _decode(v, env) for k, v in node["kwargs"].items()}
        if op == "module":
            kind, target = "call_module", node["target"]
        elif op == "get_attr":
            kind, target = "get_attr", node["target"]
        else:
            kind, target = "call_function", ALLOWED_OPS[op]
        env[node["name"]] = graph.create_node(kind, target, args, kwargs, name=node["name"])
    graph.output(_decode(ir["output"], env))
    try:
        graph.lint()
    except RuntimeError as exc:
        raise SpecError(f"the graph is not well formed: {exc}") from None
    module = GraphModel(root, graph, class_name="GraphModel")
    # the input shape, before `slimline_arch` is set (core.graph_deps runs during edit replay)
    module.slimline_input_shape = list(ir["input"]["shape"])  # type: ignore[assignment]
    return module
