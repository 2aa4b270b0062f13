"""ONNX intake: the safety checks on an uploaded `.onnx` file and its conversion to the slimline
graph IR (`core.graph`), the same IR `core.import_pt2` makes of a torch.export program.

`check_onnx(path, max_bytes=...)` runs before anything else looks at the model: a size cap,
`onnx.load` WITHOUT external data (a tensor whose data lives in another file is refused, whatever
its location says, and that file is never opened), `onnx.checker`, the default-domain opset
(13 up to the newest this onnx knows), no custom domains, model-local functions inlined (after
a check that they do not recurse or blow up), every op on the converter's table, exactly one
float32 graph input with a batch dimension and fixed other dimensions, one output.

`graph_from_onnx(model)` converts a checked model with a table of small converters, one per
ONNX op (`@converter("Relu")`): Conv / Gemm / MatMul+Add with constant weights / BatchNormalization
/ LayerNormalization become real `nn.Conv2d` / `nn.Linear` / `nn.BatchNorm*d` / `nn.LayerNorm`
modules named after their weights (`layer1.0.conv1.weight` -> `layer1.0.conv1`), the exporter's
name scopes or the TorchScript exporter's node paths (`/layer1/layer1.0/conv1/Conv`); every other
op becomes an allow-listed aten op (`core.graph_ops.ALLOWED_OPS`). Constants fold (onnx's
reference evaluator, size-capped); shape arithmetic on the batch size (Shape / Gather / Concat
/ Unsqueeze / Mul ... as the TorchScript exporter writes it) stays symbolic as
`aten.sym_size.int` + `operator.*` nodes. A batch size baked into the file (an export without
`dynamic_axes`) is rewritten where the reshape / expand that holds it can be shown to act on
the batch, and the converted module is then checked at two batch sizes.

Every refusal is a `worker.inspect.Rejected` (413 / 415 / 422) whose detail names what was
found and what to do about it.
"""
from __future__ import annotations

import ast
import keyword
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx.reference
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from core.errors import SpecError
from core.graph import GRAPH_FORMAT, MAX_NODES, build_graph_module, validate_graph
from core.graph_ops import ALLOWED_OPS
from worker.inspect import Rejected

MiB = 1024 * 1024
MIN_OPSET = 13
MAX_OPSET = onnx.defs.onnx_opset_version()
DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_FOLD_ELEMENTS = 1 << 26  # a constant the converter computes (256 MiB of float32)
MAX_GATHER_INDICES = 64  # a Gather of a constant index list becomes a stack of selects
INT64_MAX = (1 << 63) - 1
REEXPORT = ("re-export the model with torch.onnx.export (opset_version 13 or newer) and "
            "upload it again")
TRAINING_OUTPUTS_HINT = "export the model in eval mode (model.eval()) so only the output is used"


def _invalid(detail: str) -> Rejected:
    return Rejected(422, "InvalidCheckpoint", detail)


def _clip(text: str, limit: int = 120) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ================================================================================== checks ==

def check_onnx(path: str | Path, *, max_bytes: int, max_nodes: int = MAX_NODES
               ) -> onnx.ModelProto:
    """The model in `path` after the safety checks (functions inlined), or `Rejected`:
    413 over `max_bytes`; 415 not an ONNX file; 422 for everything the converter cannot take
    (external data, checker errors, opset, custom domains, unsupported ops, inputs/outputs)."""
    path = Path(path)
    if not path.is_file():
        raise _invalid(f"input file {path} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise Rejected(413, "UploadTooLarge",
                       f"the ONNX file is {size / MiB:.1f} MiB; the limit is "
                       f"{max_bytes / MiB:.1f} MiB. Upload a smaller model")
    model = _load(path)
    _check_no_external_data(model)
    if len(model.graph.sparse_initializer):
        raise _invalid("the model has sparse initializers, which slimline does not import; "
                       "save the weights dense (onnx.save with the dense initializers)")
    _check_opset(model)
    if len(model.graph.node) > max_nodes:
        raise _invalid(f"the graph has {len(model.graph.node)} nodes; at most {max_nodes} are "
                       "supported")
    _check_domains(model)  # before the checker: name a custom op rather than a schema error
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or ["invalid model"])[0]
        raise _invalid(f"onnx.checker refused the model: {_clip(first, 300)}; {REEXPORT}") \
            from None
    if model.functions:
        model = _inline_functions(model, max_nodes)
        _check_domains(model)
    _check_ops(model.graph)
    _check_signature(model.graph)
    return model


def _load(path: Path) -> onnx.ModelProto:
    with path.open("rb") as f:
        head = f.read(8)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, RuntimeWarning-as-error, ... for a garbled file
        if isinstance(exc, MemoryError):
            raise
        if head.startswith(b"PK\x03\x04"):
            raise Rejected(415, "UnsupportedFormat",
                           "the file is a zip archive, not an ONNX model (a .pt or .pt2 "
                           "file?); upload .pt2 files with the .pt2 extension, or export to "
                           "ONNX with torch.onnx.export") from None
        raise _invalid("the file is truncated or not an ONNX model (it does not parse as an "
                       f"ONNX protobuf); {REEXPORT}") from None
    if not model.graph.node or model.ir_version <= 0:
        raise Rejected(415, "UnsupportedFormat",
                       "the file is not an ONNX model (no IR version or no graph nodes); "
                       f"{REEXPORT}")
    return model


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(where, tensor) for every tensor a graph holds: initializers, sparse initializers,
    node attributes, and those of subgraphs, at any depth."""
    for t in graph.initializer:
        yield f"initializer {_clip(t.name)}", t
    for s in graph.sparse_initializer:
        yield f"sparse initializer {_clip(s.values.name)}", s.values
        yield f"sparse initializer {_clip(s.values.name)}", s.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[tuple[str, onnx.TensorProto]]:
    for node in nodes:
        where = f"node {_clip(node.name or node.op_type)} ({node.op_type})"
        for attr in node.attribute:
            if attr.HasField("t"):
                yield where, attr.t
            yield from ((where, t) for t in attr.tensors)
            if attr.HasField("sparse_tensor"):
                yield where, attr.sparse_tensor.values
                yield where, attr.sparse_tensor.indices
            for s in attr.sparse_tensors:
                yield where, s.values
                yield where, s.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for g in attr.graphs:
                yield from _graph_tensors(g)


def _check_no_external_data(model: onnx.ModelProto) -> None:
    """Refuse any tensor whose data lives outside the uploaded file (never opened)."""
    found = list(_graph_tensors(model.graph))
    for function in model.functions:
        found += list(_node_tensors(function.node))
    for where, tensor in found:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            raise _invalid(
                f"tensor {_clip(tensor.name)} ({where}) keeps its data in an external file "
                f"(location {_clip(location)}); slimline reads only the uploaded file and never "
                "follows such references. Re-export with the weights inside the file: "
                "torch.onnx.export(..., external_data=False), or onnx.save_model(model, path, "
                "save_as_external_data=False) (the file must stay under 2 GB)")


def default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _check_opset(model: onnx.ModelProto) -> None:
    version = default_opset(model)
    if version is None:
        raise _invalid("the model imports no version of the default ONNX domain (opset_import); "
                       f"{REEXPORT}")
    if version < MIN_OPSET:
        raise _invalid(f"the model uses ONNX opset {version}; slimline imports opset "
                       f"{MIN_OPSET} to {MAX_OPSET}: re-export with torch.onnx.export(..., "
                       "opset_version=17) or convert the file with "
                       "onnx.version_converter.convert_version(model, 17)")
    if version > MAX_OPSET:
        raise _invalid(f"the model uses ONNX opset {version}, newer than the newest this "
                       f"server knows ({MAX_OPSET}, onnx {onnx.__version__}); re-export with "
                       f"opset_version={MAX_OPSET} or lower")


def _check_domains(model: onnx.ModelProto) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    custom = sorted({(n.domain, n.op_type) for n in _all_nodes(model.graph)
                     if n.domain not in DEFAULT_DOMAINS and (n.domain, n.op_type) not in local})
    if custom:
        names = ", ".join(f"{d}::{op}" for d, op in custom[:5])
        more = f" (and {len(custom) - 5} more)" if len(custom) > 5 else ""
        raise _invalid(f"custom op {names}{more} is not supported: slimline imports graphs of "
                       "standard ONNX ops only; replace the custom operation with standard "
                       "PyTorch operations and export again")


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _inline_functions(model: onnx.ModelProto, max_nodes: int) -> onnx.ModelProto:
    """`onnx.inliner.inline_local_functions`, after checking that the local functions do not
    call each other in a cycle and do not expand beyond `max_nodes` nodes."""
    functions = {(f.domain, f.name): f for f in model.functions}
    expanded: dict[tuple[str, str], int] = {}
    visiting: set[tuple[str, str]] = set()

    def size(key: tuple[str, str]) -> int:
        if key in expanded:
            return expanded[key]
        if key in visiting:
            raise _invalid(f"model-local function {key[0]}::{key[1]} calls itself; {REEXPORT}")
        visiting.add(key)
        total = 0
        for node in functions[key].node:
            call = (node.domain, node.op_type)
            total += size(call) if call in functions else 1
            if total > max_nodes:
                raise _invalid(f"the model's functions expand to more than {max_nodes} nodes")
        visiting.discard(key)
        expanded[key] = total
        return total

    total = 0
    for node in model.graph.node:
        call = (node.domain, node.op_type)
        total += size(call) if call in functions else 1
    if total > max_nodes:
        raise _invalid(f"the model's functions expand to {total} nodes; at most {max_nodes} "
                       "are supported")
    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # noqa: BLE001 - the inliner's C++ errors have no common type
        raise _invalid(f"the model's local functions could not be inlined ({_clip(str(exc))});"
                       f" {REEXPORT}") from None
    del inlined.functions[:]
    return inlined


def _check_ops(graph: onnx.GraphProto) -> None:
    unknown: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in CONVERTERS:
            unknown.setdefault(node.op_type, node.name)
    if unknown:
        first = ", ".join(f"{op} (node {_clip(name, 60)})"
                          for op, name in list(unknown.items())[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise _invalid(f"ONNX op {first}{more} is not supported by slimline's ONNX import; "
                       f"supported ops: {', '.join(sorted(CONVERTERS))}. Replace the operation "
                       "in the model (or export it with torch.export as a .pt2 file)")


def _value_type(value: onnx.ValueInfoProto) -> tuple[int, list[int | str | None] | None]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return -1, None
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return tensor.elem_type, None
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tensor.elem_type, dims


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's real inputs (older files list the initializers as inputs too)."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _check_signature(graph: onnx.GraphProto) -> None:
    inputs = graph_inputs(graph)
    if not inputs:
        raise _invalid("the graph has no input (only constants), so it computes nothing from "
                       "data; export the model with an input tensor, e.g. "
                       "torch.onnx.export(model, (x,), path, input_names=['x'])")
    if len(inputs) > 1:
        names = ", ".join(_clip(i.name, 40) for i in inputs[:5])
        raise _invalid(f"the graph has {len(inputs)} inputs ({names}); slimline imports "
                       "networks with one input tensor (the images or features); export a "
                       "wrapper whose forward takes one tensor")
    inp = inputs[0]
    elem, dims = _value_type(inp)
    if elem != TensorProto.FLOAT:
        kind = (helper.tensor_dtype_to_string(elem).removeprefix("TensorProto.").lower()
                if elem > 0 else "not a tensor")
        raise _invalid(f"the graph input {_clip(inp.name)} is {kind}; slimline imports networks "
                       "whose one input is a float32 tensor: export the model in float32 with "
                       "a floating example input")
    if dims is None or len(dims) < 2:
        raise _invalid(f"the graph input {_clip(inp.name)} has shape {dims}; it needs a batch "
                       "dimension and at least one more (e.g. (N, 1, 28, 28)); export with an "
                       "example input of that shape")
    bad = [i for i, d in enumerate(dims[1:], 1) if not isinstance(d, int) or d <= 0]
    if bad:
        raise _invalid(f"dimension {bad[0]} of the graph input {_clip(inp.name)} is dynamic "
                       f"({dims[bad[0]]!r}); only the batch (dimension 0) may be: export with a "
                       "fixed input size (dynamic_axes={'x': {0: 'batch'}} only)")
    if isinstance(dims[0], int) and dims[0] <= 0:
        raise _invalid(f"the graph input {_clip(inp.name)} has batch size {dims[0]}; {REEXPORT}")
    if len(graph.output) != 1:
        names = ", ".join(_clip(o.name, 40) for o in graph.output[:5])
        raise _invalid(f"the graph has {len(graph.output)} outputs ({names}); slimline needs "
                       "one output, the logits (N, classes): export a wrapper that returns "
                       "only the logits")


# ================================================================ conversion: the values ==

@dataclass(frozen=True)
class Sym:
    """An int known at run time only (a batch size): the IR node that computes it."""
    node: str


Item = int | Sym


@dataclass(frozen=True)
class Act:
    """A tensor computed at run time: the IR node that computes it, its static dims (None
    for a dynamic one; `dims` None when even the rank is unknown) and dtype."""
    node: str
    dims: tuple[int | None, ...] | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class Const:
    """A tensor known at conversion time; `weight`: it came from an initializer (a model
    parameter, trainable when it must be kept as a tensor)."""
    array: np.ndarray
    name: str
    weight: bool = False


@dataclass(frozen=True)
class ShapeVal:
    """A 1-D int64 tensor (0-D when `scalar`) whose entries may be run-time ints: the shape
    arithmetic of a graph with a dynamic batch."""
    items: tuple[Item, ...]
    scalar: bool = False


Value = Act | Const | ShapeVal
ConverterFn = Callable[["Converter", onnx.NodeProto, list[Value | None]],
                       Value | Sequence[Value | None]]
CONVERTERS: dict[str, ConverterFn] = {}
FOLDABLE: set[str] = set()  # ops folded (onnx's reference evaluator) on constant inputs


def converter(*ops: str, fold: bool = True) -> Callable[[ConverterFn], ConverterFn]:
    """Register a converter for ONNX `ops` (constant inputs fold first when `fold`)."""
    def register(fn: ConverterFn) -> ConverterFn:
        for op in ops:
            CONVERTERS[op] = fn
            if fold:
                FOLDABLE.add(op)
        return fn
    return register


_PART_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z|[0-9]+\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_WEIGHT_NAME = re.compile(rf"{_PART}(?:\.{_PART})*\.(weight|bias)\Z")
_NP_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64",
              np.dtype(np.bool_): "bool"}


def _dotted_name(raw: str) -> str:
    """A dotted module/tensor name from an ONNX name: TorchScript paths
    (`/layer1/layer1.0/conv1/Conv` -> `layer1.0.conv1.Conv`), `onnx::Conv_12` -> `onnx_Conv_12`;
    each part an identifier or an index."""
    if raw.startswith("/"):  # each segment repeats its parent's: /features/features.1/conv
        path: list[str] = []
        previous = ""
        for seg in (s for s in raw.split("/") if s):
            path.append(seg[len(previous) + 1:] if previous and seg.startswith(previous + ".")
                        else seg)
            previous = seg
        raw = ".".join(path)
    parts = []
    for part in raw.replace("::", "_").split("."):
        part = re.sub(r"[^A-Za-z0-9_]", "_", part).strip("_") or ""
        if not part:
            continue
        if not _PART_OK.match(part):
            part = "_" + part
        parts.append(part)
    return ".".join(parts)


def _ts_scope(node: onnx.NodeProto) -> str | None:
    """The module path in a TorchScript-exporter node name (`/layer1/layer1.0/conv1/Conv` ->
    `layer1.0.conv1`)."""
    if not node.name.startswith("/"):
        return None
    segments = [s for s in node.name.split("/") if s][:-1]
    return _dotted_name("/" + "/".join(segments)) if segments else None


def _dynamo_scope(node: onnx.NodeProto) -> str | None:
    """The module path the dynamo exporter records (`pkg.torch.onnx.name_scopes`)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes" and len(prop.value) < 4096:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return _dotted_name(scopes[-2]) or None
    return None


# =========================================================== conversion: the converter ==

@dataclass
class Converter:
    model: onnx.ModelProto
    opset: int
    info: dict[str, tuple[int, list[int | str | None] | None]]
    values: dict[str, Value] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensor_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    node_names: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)  # module/tensor names and their parents
    leaves: set[str] = field(default_factory=set)
    consts_as_attr: dict[str, Act] = field(default_factory=dict)
    sym_sizes: dict[tuple[str, int], Sym] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    absorbed: set[int] = field(default_factory=set)  # id() of nodes another converter did
    raw_consts: dict[str, onnx.TensorProto] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # Identity: output -> input
    origin: dict[str, str] = field(default_factory=dict)  # IR node -> the ONNX node it is from
    current: str = ""  # the ONNX node being converted

    # ---- names ----
    def node_name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", base).strip("_") or "v"
        if not _IDENT.match(base):
            base = "v_" + base
        name, i = base, 1
        while name in self.node_names:
            name, i = f"{base}_{i}", i + 1
        self.node_names.add(name)
        return name

    def _free(self, name: str) -> bool:
        if not name or name in self.owners or name in self.leaves:
            return False
        parts = name.split(".")
        return not any(".".join(parts[:i]) in self.leaves for i in range(1, len(parts)))

    def _claim(self, name: str) -> str:
        parts = name.split(".")
        self.owners.update(".".join(parts[:i]) for i in range(1, len(parts)))
        self.leaves.add(name)
        return name

    def owner_name(self, candidates: Iterable[str | None], fallback: str) -> str:
        """The first free dotted name among `candidates`, else `fallback` numbered."""
        for cand in candidates:
            if cand and self._free(cand):
                return self._claim(cand)
        base = _dotted_name(fallback) or "layer"
        name, i = base, 1
        while not self._free(name):
            name, i = f"{base}_{i}", i + 1
        return self._claim(name)

    def layer_name(self, node: onnx.NodeProto, weight: str | None, bias: str | None,
                   kind: str) -> str:
        """A module's name: its weight's (`fc.weight` -> `fc`), the exporter's module scope,
        the TorchScript node path, its bias's, then a numbered `kind`."""
        cands: list[str | None] = []
        for raw in (weight, bias):
            m = _WEIGHT_NAME.match(raw or "")
            cands.append(raw.rsplit(".", 1)[0] if m and raw else None)
        cands = [cands[0], _dynamo_scope(node), _ts_scope(node), cands[1]]
        return self.owner_name(cands, kind)

    # ---- IR nodes ----
    def call(self, op: str, *args: Any, base: str | None = None,
             _dims: Sequence[int | None] | None = None, **kwargs: Any) -> Act:
        """Append an allow-listed op; its result as an Act with dims `_dims` (when the
        converter knows them: onnx's shape inference loses some behind shape arithmetic)."""
        if op not in ALLOWED_OPS:
            raise _invalid(f"the converter needs op {op}, which this server does not allow; "
                           "report it with the model")
        name = self.node_name(base or op.split(".")[1])
        self.origin[name] = self.current
        self.nodes.append({"name": name, "op": op, "args": [_enc(a) for a in args],
                           "kwargs": {k: _enc(v) for k, v in kwargs.items()}})
        return Act(name, None if _dims is None else tuple(_dims))

    def call_module(self, target: str, spec: dict[str, Any], x: Act,
                    state: dict[str, np.ndarray | torch.Tensor],
                    dims: Sequence[int | None] | None = None) -> Act:
        self.modules[target] = spec
        for key, value in state.items():
            self.tensors[f"{target}.{key}"] = _torch(value)
        name = self.node_name(target.replace(".", "_"))
        self.origin[name] = self.current
        self.nodes.append({"name": name, "op": "module", "target": target,
                           "args": [_enc(x)], "kwargs": {}})
        return Act(name, None if dims is None else tuple(dims))

    def attr(self, const: Const) -> Act:
        """A constant the graph needs as a tensor: a get_attr of an IR tensor (trainable
        when it is a floating initializer)."""
        cached = self.consts_as_attr.get(const.name)
        if cached is not None:
            return cached
        array = const.array
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        elif array.dtype.kind in "iu":
            array = array.astype(np.int64)
        elif array.dtype.kind != "b":
            raise _invalid(f"constant {_clip(const.name)} has dtype {array.dtype}, which an "
                           "imported graph cannot hold; export the model in float32")
        name = self.owner_name([_dotted_name(const.name)], "const")
        dtype = _NP_DTYPES[np.dtype(array.dtype)]
        trainable = const.weight and dtype == "float32" and array.size > 1  # not a threshold
        self.tensor_specs[name] = {"shape": list(array.shape), "dtype": dtype,
                                   "trainable": trainable}
        self.tensors[name] = _torch(array)
        node = self.node_name(name.replace(".", "_"))
        self.nodes.append({"name": node, "op": "get_attr", "target": name, "args": [],
                           "kwargs": {}})
        act = Act(node, tuple(array.shape), dtype)
        self.consts_as_attr[const.name] = act
        return act

    def tensor(self, value: Value | None, what: str) -> Act:
        """`value` as a run-time tensor (a constant becomes a get_attr)."""
        if isinstance(value, Act):
            return value
        if isinstance(value, Const):
            return self.attr(value)
        if isinstance(value, ShapeVal):
            raise _invalid(f"{what} uses a shape computed from the batch size as a tensor; "
                           f"{_STATIC_HINT}")
        raise _invalid(f"{what} is missing an input")

    # ---- shapes ----
    def dims(self, act: Act, what: str) -> tuple[int | None, ...]:
        if act.dims is None:
            raise _invalid(f"the shape of the input of {what} could not be inferred; export "
                           "the model with onnx shape information (torch.onnx.export writes it)")
        return act.dims

    def rank(self, act: Act, what: str) -> int:
        return len(self.dims(act, what))

    def dim(self, act: Act, axis: int) -> Item:
        """Dim `axis` of `act`: an int when static, else an `aten.sym_size.int` node."""
        dims = act.dims
        if dims is not None and dims[axis] is not None:
            return int(dims[axis])  # type: ignore[arg-type]
        key = (act.node, axis)
        if key not in self.sym_sizes:
            self.sym_sizes[key] = Sym(self.call("aten.sym_size.int", act, axis,
                                                base="sym_size").node)
        return self.sym_sizes[key]

    def arith(self, op: str, a: Item, b: Item) -> Item:
        """`a <op> b` for shape entries (ints fold; run-time ints become operator nodes)."""
        if isinstance(a, int) and isinstance(b, int):
            if op == "floordiv":
                return a // b
            return {"add": a + b, "sub": a - b, "mul": a * b}[op]
        return Sym(self.call(f"operator.{op}", a, b, base=op).node)

    # ---- inputs of ONNX nodes ----
    def const_of(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is a constant (also before its node is converted:
        initializers, Constant nodes, Identity of either)."""
        for _ in range(64):
            value = self.values.get(name)
            if isinstance(value, Const):
                return value.array
            if name in self.raw_consts:
                return _array(self.raw_consts[name])
            if name not in self.aliases:
                break
            name = self.aliases[name]
        return None

    def set_shape(self, name: str, value: Value) -> Value:
        """`value` with the dims onnx's shape inference found for the ONNX value `name`."""
        if not isinstance(value, Act):
            return value
        _, dims = self.info.get(name, (0, None))
        inferred = (None if dims is None else
                    tuple(d if isinstance(d, int) and d >= 0 else None for d in dims))
        own = value.dims
        if own is None or (inferred is not None and len(inferred) != len(own)):
            merged = inferred if own is None else own
        elif inferred is None:
            merged = own
        else:  # the converter's own dims first, onnx's where the converter does not know
            merged = tuple(a if a is not None else b for a, b in zip(own, inferred, strict=True))
        return Act(value.node, merged, value.dtype)


def _enc(value: Any) -> Any:
    """IR encoding of an argument."""
    if isinstance(value, (Act, Sym)):
        return {"node": value.node}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if math.isfinite(f):
            return f
        return {"float": "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):  # an already-encoded {"dtype": ...}
        return value
    raise TypeError(f"cannot encode {value!r}")


def _torch(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.ascontiguousarray(value)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    if not array.flags.writeable:  # a view of the protobuf's bytes
        array = array.copy()
    return torch.from_numpy(array)


_STATIC_HINT = ("slimline keeps only the batch size dynamic: export with a fixed input size "
                "and dynamic_axes={'x': {0: 'batch'}}")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise _invalid(f"op {node.op_type} with a subgraph is not supported")
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, TensorProto):
            value = numpy_helper.to_array(value)
        out[a.name] = value
    return out


def _what(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {_clip(node.name or (node.output[0] if node.output else ''), 80)}"


def _scalar(value: Value | None) -> float | int | None:
    """A constant holding one number, as a Python number; else None."""
    if isinstance(value, Const) and value.array.size == 1:
        array = value.array.reshape(())
        if array.dtype == np.float32:
            return _f32(array)
        item = array.item()
        return item if isinstance(item, (int, float)) else float(item)
    return None


def _f32(value: Any) -> float:
    """A float32 number as the shortest Python float that rounds to it (`1e-05`, not
    `9.999999747378752e-06`): the same float32 when the graph uses it, readable in the IR."""
    as32 = np.float32(value)
    return float(str(as32)) if np.isfinite(as32) else float(as32)


def _need_const(value: Value | None, node: onnx.NodeProto, what: str) -> np.ndarray:
    if isinstance(value, Const):
        return value.array
    if isinstance(value, ShapeVal) and all(isinstance(i, int) for i in value.items):
        return np.array(value.items, dtype=np.int64)
    raise _invalid(f"{_what(node)}: its {what} is computed at run time; slimline needs it "
                   f"constant ({_STATIC_HINT})")


def _items(value: Value | None, node: onnx.NodeProto, what: str) -> list[Item]:
    """A 1-D int tensor (a shape) as entries (ints or run-time ints)."""
    if isinstance(value, ShapeVal):
        return list(value.items)
    if isinstance(value, Const) and value.array.dtype.kind in "iu" and value.array.ndim <= 1:
        return [int(v) for v in value.array.reshape(-1)]
    raise _invalid(f"{_what(node)}: its {what} is not a constant or a shape; "
                   f"{_STATIC_HINT}")


def _shape_value(items: Sequence[Item], scalar: bool = False, name: str = "shape") -> Value:
    if all(isinstance(i, int) for i in items):
        array = np.array(items, dtype=np.int64)
        return Const(array.reshape(()) if scalar else array, name)
    return ShapeVal(tuple(items), scalar)


def _axis(axis: int, rank: int, node: onnx.NodeProto) -> int:
    if not -rank <= axis < rank:
        raise _invalid(f"{_what(node)}: axis {axis} is out of range for rank {rank}")
    return axis % rank


# ================================================================== conversion: driver ==

def graph_from_onnx(model: onnx.ModelProto, *, verify: bool = True
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The slimline graph IR of a model `check_onnx` accepted and its tensors (module weights
    as `<module>.weight` ..., plus every IR tensor). `Rejected` (422) for what cannot be
    converted, naming the node. With `verify`, the converted module must reproduce
    onnxruntime on the same file (`verify_with_onnxruntime`)."""
    original = model
    _check_ops(model.graph)
    _check_signature(model.graph)
    inp = graph_inputs(model.graph)[0]
    _, in_dims = _value_type(inp)
    assert in_dims is not None
    baked = in_dims[0] if isinstance(in_dims[0], int) else None
    if baked is not None:
        model = _unbake_batch(model, baked)
    opset = default_opset(model) or MIN_OPSET
    info = _infer_shapes(model)
    conv = Converter(model=model, opset=opset, info=info)
    input_name = _identifier(inp.name)
    conv.node_names.add(input_name)
    conv.values[inp.name] = Act(input_name, (None, *(int(d) for d in in_dims[1:])))  # type: ignore[arg-type]
    for t in model.graph.initializer:
        conv.raw_consts[t.name] = t
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input and node.output:
            conv.aliases[node.output[0]] = node.input[0]
        if node.op_type == "Constant" and node.output:
            value = _constant_attr(node)
            if value is not None:
                conv.raw_consts[node.output[0]] = numpy_helper.from_array(value, node.output[0])
        for name in node.input:
            conv.consumers.setdefault(name, []).append(node)
    for name, t in list(conv.raw_consts.items()):
        if name in {i.name for i in model.graph.initializer}:
            conv.values[name] = Const(_array(t), name, weight=True)
    for node in model.graph.node:
        if id(node) in conv.absorbed:
            continue
        _convert_node(conv, node)
    out = conv.values.get(model.graph.output[0].name)
    if not isinstance(out, Act):
        raise _invalid("the graph output does not depend on the input; export the model with "
                       "its input")
    ir = _finish(conv, input_name, [int(d) for d in in_dims[1:]], out)  # type: ignore[arg-type]
    try:
        validate_graph(ir)
    except SpecError as exc:
        raise _invalid(f"the converted graph is not valid ({exc}); report it with the model") \
            from None
    tensors = {k: v for k, v in conv.tensors.items()
               if k.rsplit(".", 1)[0] in ir["modules"] or k in ir["tensors"]}
    if baked is not None:
        verify_batch(ir, tensors, baked, conv.origin)
    if verify:
        verify_with_onnxruntime(original, ir, tensors)
    return ir, tensors


def _identifier(name: str) -> str:
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "x"
    return ident if _IDENT.match(ident) and not keyword.iskeyword(ident) else f"x_{ident}"


def _array(t: onnx.TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:  # noqa: BLE001 - malformed raw data, unsupported dtype
        if isinstance(exc, MemoryError):
            raise
        raise _invalid(f"tensor {_clip(t.name)} cannot be read ({_clip(str(exc))}); "
                       f"{REEXPORT}") from None


def _constant_attr(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return _array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


SKELETON_ELEMENTS = 4096  # larger floating initializers become typed inputs for inference


def _infer_shapes(model: onnx.ModelProto
                  ) -> dict[str, tuple[int, list[int | str | None] | None]]:
    """onnx's shape inference (with data propagation) on a skeleton of `model`: its large
    floating initializers replaced by inputs of the same type and shape, so the weights are
    not copied (inference needs their shapes only)."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    g = skeleton.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        big = t.data_type in _FLOAT_TYPES and math.prod(t.dims) > SKELETON_ELEMENTS
        if not big:
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False,
                                                     data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help; converters refuse what needs it
        inferred = skeleton
    g = inferred.graph
    return {v.name: _value_type(v) for v in [*g.input, *g.value_info, *g.output]}


def _convert_node(conv: Converter, node: onnx.NodeProto) -> None:
    conv.current = _what(node)
    fn = CONVERTERS.get(node.op_type)
    if fn is None:
        raise _invalid(f"ONNX op {node.op_type} is not supported ({_what(node)})")
    inputs: list[Value | None] = []
    for name in node.input:
        if not name:
            inputs.append(None)
            continue
        if name not in conv.values:
            raise _invalid(f"{_what(node)} reads {_clip(name)}, which no earlier node computes "
                           "(the graph is not in topological order)")
        inputs.append(conv.values[name])
    present = [v for v in inputs if v is not None]
    try:
        if node.op_type in FOLDABLE and present and all(isinstance(v, Const) for v in present):
            outputs: Sequence[Value | None] = _fold(conv, node, inputs)
        else:
            result = fn(conv, node, inputs)
            outputs = [result] if isinstance(result, (Act, Const, ShapeVal)) else result
    except (Rejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed node must not become a 500
        raise _invalid(f"{_what(node)} could not be converted ({type(exc).__name__}: "
                       f"{_clip(str(exc), 200)}); check the node's inputs and attributes "
                       "against the ONNX specification, or report it with the model") from None
    for name, value in zip(node.output, outputs, strict=False):
        if name and value is not None:
            conv.values[name] = conv.set_shape(name, value)
    for name in node.output[len(outputs):]:
        if name and conv.consumers.get(name):
            raise _invalid(f"{_what(node)}: its output {_clip(name)} is used but not supported "
                           f"({TRAINING_OUTPUTS_HINT})")


def _fold(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> list[Value]:
    """A node of constants, evaluated."""
    arrays = [v.array if isinstance(v, Const) else None for v in inputs]
    _, dims = conv.info.get(node.output[0], (0, None)) if node.output else (0, None)
    results = _evaluate(node, arrays, conv.opset, dims)
    weight = node.op_type == "Identity" and isinstance(inputs[0], Const) and inputs[0].weight
    return [Const(r, name, weight=weight)
            for name, r in zip(node.output, results, strict=False)]


def _evaluate(node: onnx.NodeProto, arrays: list[np.ndarray | None], opset: int,
              out_dims: list[int | str | None] | None = None) -> list[np.ndarray]:
    """Run one node on constant inputs with onnx's reference implementation, refusing
    results over MAX_FOLD_ELEMENTS elements (checked up front where the inputs tell)."""
    def too_big(count: float) -> Rejected:
        return _invalid(f"{_what(node)} computes a constant of {count:.0f} elements (at most "
                        f"{MAX_FOLD_ELEMENTS})")

    if out_dims is not None and all(isinstance(d, int) for d in out_dims) \
            and math.prod(out_dims) > MAX_FOLD_ELEMENTS:  # type: ignore[arg-type]
        raise too_big(math.prod(out_dims))  # type: ignore[arg-type]
    if node.op_type in ("ConstantOfShape", "Expand", "Tile") and arrays:
        shape = arrays[1] if node.op_type != "ConstantOfShape" and len(arrays) > 1 else arrays[0]
        base = arrays[0] if node.op_type != "ConstantOfShape" else None
        if shape is not None and shape.size:
            count = float(np.prod(np.maximum(shape.astype(np.float64), 1)))
            count *= 1.0 if base is None else float(max(base.size, 1))
            if count > MAX_FOLD_ELEMENTS:
                raise too_big(count)
    if node.op_type == "Range" and len(arrays) == 3 and all(a is not None for a in arrays):
        start, limit, delta = (float(a.reshape(-1)[0]) for a in arrays)  # type: ignore[union-attr]
        if delta == 0 or abs((limit - start) / delta) > MAX_FOLD_ELEMENTS:
            raise too_big(math.inf if delta == 0 else abs((limit - start) / delta))
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    outs = [f"out{i}" for i in range(len(node.output))]
    single = helper.make_node(node.op_type, names, outs)
    single.attribute.extend(node.attribute)
    # small integer inputs (shapes, axes, pads, sizes) are initializers, so shape inference
    # sees their values and the output's size is known before anything is computed
    small = {n: a for n, a in zip(names, arrays, strict=True)
             if a is not None and a.dtype.kind in "iu" and a.size <= 1024}
    feeds = {n: a for n, a in zip(names, arrays, strict=True) if a is not None and n not in small}
    graph = helper.make_graph(
        [single], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in feeds.items()],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs],
        initializer=[numpy_helper.from_array(a, n) for n, a in small.items()])
    fold_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(fold_model, data_prop=True)
        for value in inferred.graph.output:
            _, dims = _value_type(value)
            if dims is not None and all(isinstance(d, int) for d in dims) \
                    and math.prod(dims) > MAX_FOLD_ELEMENTS:  # type: ignore[arg-type]
                raise too_big(math.prod(dims))  # type: ignore[arg-type]
    except onnx.shape_inference.InferenceError:
        pass  # the evaluator reports what is wrong with the inputs
    try:
        results = onnx.reference.ReferenceEvaluator(fold_model).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - whatever the reference op raises on bad input
        if isinstance(exc, MemoryError):
            raise
        raise _invalid(f"{_what(node)} cannot be evaluated on its constant inputs "
                       f"({_clip(str(exc))}); {REEXPORT}") from None
    out = [np.asarray(r) for r in results]
    for array in out:
        if array.size > MAX_FOLD_ELEMENTS:
            raise too_big(array.size)
    return out


def _finish(conv: Converter, input_name: str, shape: list[int], out: Act) -> dict[str, Any]:
    """The IR: nodes the output needs (dead ones dropped), the modules/tensors they use."""
    by_name = {n["name"]: n for n in conv.nodes}
    live: set[str] = set()
    stack = [out.node]
    while stack:
        name = stack.pop()
        if name in live or name not in by_name:
            continue
        live.add(name)
        refs: set[str] = set()
        _collect_refs([by_name[name]["args"], list(by_name[name]["kwargs"].values())], refs)
        stack.extend(refs)
    nodes = [n for n in conv.nodes if n["name"] in live]
    modules = {n["target"] for n in nodes if n["op"] == "module"}
    tensors = {n["target"] for n in nodes if n["op"] == "get_attr"}
    return {"format": GRAPH_FORMAT,
            "input": {"name": input_name, "shape": shape},
            "modules": {k: v for k, v in conv.modules.items() if k in modules},
            "tensors": {k: v for k, v in conv.tensor_specs.items() if k in tensors},
            "nodes": nodes,
            "output": {"node": out.node}}


def _collect_refs(arg: Any, found: set[str]) -> None:
    if isinstance(arg, list):
        for item in arg:
            _collect_refs(item, found)
    elif isinstance(arg, dict) and "node" in arg:
        found.add(arg["node"])


# ===================================================================== static batch size ==

def _unbake_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of `model` whose input batch is symbolic and whose constants holding the export
    batch are rewritten where they act on the batch: after folding constant subgraphs, a
    Reshape to a constant shape starting with `batch` of a tensor whose dim 0 is the batch
    copies that dim (`0`); an Expand to such a shape of a tensor whose leading dim is the
    batch keeps it (`1`), of one whose leading dim is 1 (a class token) expands to the input's
    batch size; a constant with `batch` rows (all equal) concatenated with batch tensors
    becomes its first row expanded to the input's batch size. `verify_batch` checks the
    result at two batch sizes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    opset = default_opset(model) or MIN_OPSET
    inp = graph_inputs(g)[0]
    for value in (inp, *g.output):
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and shape.dim \
                and (value is inp or shape.dim[0].dim_value == batch):
            shape.dim[0].Clear()
            shape.dim[0].dim_param = "batch"
    del g.value_info[:]
    consts = _fold_graph(g, opset)
    rewriter = _BatchRewriter(g, consts, batch, inp.name)
    for _ in range(64):  # each pass may make sites downstream provable
        if not rewriter.step(_infer_shapes(model)):
            break
    return model


def _fold_graph(g: onnx.GraphProto, opset: int) -> dict[str, np.ndarray]:
    """Replace the nodes of `g` whose inputs are all constant by initializers; returns the
    constants (initializers and Constant nodes included) by name."""
    consts: dict[str, np.ndarray] = {t.name: _array(t) for t in g.initializer}
    kept: list[onnx.NodeProto] = []
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            value = _constant_attr(node)
            if value is not None:
                consts[node.output[0]] = value
            kept.append(node)
            continue
        present = [n for n in node.input if n]
        if node.op_type in FOLDABLE and node.op_type not in ("Expand", "Tile") and present \
                and all(n in consts for n in present) \
                and not any(o in outputs for o in node.output):
            results = _evaluate(node, [consts[n] if n else None for n in node.input], opset)
            for name, array in zip(node.output, results, strict=False):
                consts[name] = array
                g.initializer.append(numpy_helper.from_array(array, name))
            continue
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    return consts


@dataclass
class _BatchRewriter:
    g: onnx.GraphProto
    consts: dict[str, np.ndarray]
    batch: int
    input_name: str
    done: set[str] = field(default_factory=set)
    batch_shape: str | None = None

    def constant(self, array: np.ndarray, base: str) -> str:
        name, i = f"{base}__batch", 1
        while name in self.consts:
            name, i = f"{base}__batch{i}", i + 1
        self.consts[name] = array
        self.g.initializer.append(numpy_helper.from_array(array, name))
        return name

    def batch_size(self) -> None:
        """Prepend `Shape(input)[0:1]` (once)."""
        if self.batch_shape is not None:
            return
        start = self.constant(np.array([0], np.int64), "start")
        end = self.constant(np.array([1], np.int64), "end")
        self.g.node.insert(0, helper.make_node("Slice", ["__input_shape__", start, end],
                                               ["__batch__"]))
        self.g.node.insert(0, helper.make_node("Shape", [self.input_name], ["__input_shape__"]))
        self.batch_shape = "__batch__"

    def insert_before(self, output: str, nodes: list[onnx.NodeProto]) -> None:
        index = next(i for i, n in enumerate(self.g.node) if output in n.output)
        for k, new in enumerate(nodes):
            self.g.node.insert(index + k, new)

    def batch_shape_node(self, rest: np.ndarray) -> tuple[onnx.NodeProto, str]:
        """A Concat(batch size, rest) node and its output name."""
        tail = self.constant(rest.astype(np.int64), "shape")
        out = tail + "_full"
        return helper.make_node("Concat", [str(self.batch_shape), tail], [out], axis=0), out

    def step(self, info: dict[str, tuple[int, list[int | str | None] | None]]) -> bool:
        """Rewrite every site provable with `info` (what onnx infers now); False when there
        was none. A rewrite only makes more dims symbolic, so the others stay provable."""
        def dynamic(name: str) -> bool:
            _, dims = info.get(name, (0, None))
            return name not in self.consts and bool(dims) and not isinstance(dims[0], int)  # type: ignore[index]

        actions: list[Callable[[], None]] = []
        for node in self.g.node:
            key = node.output[0] if node.output else ""
            if key in self.done:
                continue
            if node.op_type in ("Reshape", "Expand"):
                action = self._shape_site(node, key, info, dynamic)
            elif node.op_type == "Concat":
                action = self._concat_site(node, key, dynamic)
            else:
                continue
            if action is not None:
                self.done.add(key)
                actions.append(action)
        if actions and self.batch_shape is None:
            self.batch_size()
        for action in actions:
            action()
        return bool(actions)

    def _node(self, key: str) -> onnx.NodeProto:
        return next(n for n in self.g.node if key in n.output)

    def _shape_site(self, node: onnx.NodeProto, key: str,
                    info: dict[str, tuple[int, list[int | str | None] | None]],
                    dynamic: Callable[[str], bool]) -> Callable[[], None] | None:
        """A Reshape / Expand to a constant shape that leads with (a multiple of) the batch."""
        if len(node.input) < 2 or node.input[1] not in self.consts:
            return None
        shape = self.consts[node.input[1]].reshape(-1).astype(np.int64)
        if not shape.size or int(shape[0]) <= 0 or int(shape[0]) % self.batch \
                or (node.op_type == "Expand" and int(shape[0]) != self.batch):
            return None
        _, dims = info.get(node.input[0], (0, None))
        if node.input[0] in self.consts:
            dims = list(self.consts[node.input[0]].shape)
        if not dims:
            return None
        data = node.input[0]
        if node.op_type == "Reshape":
            # the batch (or batch x heads) leads: -1 completes it at any batch size; with
            # another -1 in the shape, copy dim 0 when it is the input's batch itself
            allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
            if not dynamic(data) or (allowzero and 0 in shape):
                return None
            new = shape.copy()
            if -1 not in shape[1:]:
                new[0] = -1
            elif int(shape[0]) == self.batch and dims[0] == "batch":
                new[0] = 0
            else:
                return None

            def reshape() -> None:
                target = self._node(key)
                target.input[1] = self.constant(new, target.input[1])
                for a in target.attribute:
                    if a.name == "allowzero":
                        a.i = 0
            return reshape
        if len(shape) == len(dims) and dynamic(data):  # Expand of a batch tensor: keep it
            keep = shape.copy()
            keep[0] = 1

            def expand_keep() -> None:
                target = self._node(key)
                target.input[1] = self.constant(keep, target.input[1])
            return expand_keep
        if len(shape) > len(dims) or dims[0] == 1:  # a broadcast token: to the input's batch

            def expand_batch() -> None:
                cat, out = self.batch_shape_node(shape[1:])
                self._node(key).input[1] = out
                self.insert_before(key, [cat])
            return expand_batch
        return None

    def _concat_site(self, node: onnx.NodeProto, key: str, dynamic: Callable[[str], bool]
                     ) -> Callable[[], None] | None:
        """A constant with `batch` equal rows concatenated (not along dim 0) with batch
        tensors: an expand the exporter folded."""
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        runtime = [n for n in node.input if n and n not in self.consts]
        if not runtime or not all(dynamic(n) for n in runtime):
            return None
        slots = []
        for slot, name in enumerate(node.input):
            array = self.consts.get(name)
            if array is not None and array.ndim >= 2 and axis % array.ndim != 0 \
                    and array.shape[0] == self.batch and bool((array == array[:1]).all()):
                slots.append((slot, name, array))
        if not slots:
            return None

        def concat() -> None:
            for slot, name, array in slots:
                row = self.constant(np.ascontiguousarray(array[:1]), name)
                cat, shape_name = self.batch_shape_node(np.array(array.shape[1:]))
                expand = helper.make_node("Expand", [row, shape_name], [row + "_expanded"])
                self._node(key).input[slot] = expand.output[0]
                self.insert_before(key, [cat, expand])
        return concat


class _Tracing(torch.fx.Interpreter):
    """Runs a GraphModule remembering the node in progress (to name the one that fails)."""

    current = ""

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n.name
        return super().run_node(n)


def verify_batch(ir: dict[str, Any], tensors: dict[str, torch.Tensor], batch: int,
                 origin: dict[str, str] | None = None) -> None:
    """The converted module of a file exported with batch size `batch` must give each sample
    the same output at batch `batch` and at another size; else a clear refusal naming the
    ONNX node that fails (`origin`: IR node -> ONNX node)."""
    def fix(where: str) -> str:
        return (f"the graph has its batch size ({batch}) baked into {where}; re-export with a "
                "dynamic batch: torch.onnx.export(model, (x,), path, input_names=['x'], "
                "dynamic_axes={'x': {0: 'batch'}}) (or dynamo=True with dynamic_shapes)")

    module = build_module(ir, tensors)
    other = 2 * batch + 1  # every sample is also run in a batch of the export size
    x = torch.randn(other, *ir["input"]["shape"], generator=torch.Generator().manual_seed(0))
    tracer = _Tracing(module)
    try:
        with torch.no_grad():
            out = tracer.run(x)
            chunks = [(s, module(x[s:s + batch])) for s in (0, batch, batch + 1)]
    except Exception as exc:  # noqa: BLE001 - any shape error means the batch is baked in
        if isinstance(exc, MemoryError):
            raise
        where = (origin or {}).get(tracer.current) or f"node {tracer.current!r}"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _invalid(f"{fix(where)} (at batch {other}: {_clip(first, 200)})") from None
    if not isinstance(out, torch.Tensor) or out.shape[:1] != (other,) or not all(
            torch.allclose(out[s:s + batch], ref, rtol=1e-4, atol=1e-5) for s, ref in chunks):
        raise _invalid(fix("it (each sample's output depends on the batch)"))


def verify_with_onnxruntime(model: onnx.ModelProto, ir: dict[str, Any],
                            tensors: dict[str, torch.Tensor], *, tolerance: float = 1e-2
                            ) -> None:
    """The converted module must give onnxruntime's output on the same file for a random
    input (the file's batch size, or 2), within `tolerance` of the output's scale; a converter
    that got an op wrong is refused here rather than trained on. A file onnxruntime cannot run
    is not judged (its conversion stands)."""
    _, dims = _value_type(graph_inputs(model.graph)[0])
    batch = dims[0] if dims and isinstance(dims[0], int) else 2
    x = torch.randn(batch, *ir["input"]["shape"], generator=torch.Generator().manual_seed(1))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        want = np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common base
        if isinstance(exc, MemoryError) or "alloc" in str(exc).lower():
            raise MemoryError(str(exc)) from None
        return
    with torch.no_grad():
        got = build_module(ir, tensors)(x).numpy()
    finite = np.isfinite(want)
    scale = max(1.0, float(np.abs(want[finite]).max())) if finite.any() else 1.0
    if got.shape != want.shape or not np.array_equal(finite, np.isfinite(got)) \
            or float(np.abs(got[finite] - want[finite]).max(initial=0.0)) > tolerance * scale:
        diff = (float(np.abs(got[finite] - want[finite]).max(initial=0.0))
                if got.shape == want.shape else math.inf)
        raise _invalid(f"the converted graph does not reproduce onnxruntime on this file "
                       f"(outputs {list(got.shape)} vs {list(want.shape)}, largest difference "
                       f"{diff:.3g} at output scale {scale:.3g}); this is a gap in slimline's "
                       "ONNX import: upload the model as a torch.export .pt2 file instead, "
                       "and report it")


def build_module(ir: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The GraphModule of `ir` holding `tensors` (eval mode)."""
    module = build_graph_module(ir)
    module.load_state_dict(tensors, strict=True)
    return module.eval()


# ========================================================================== converters ==

Dims = tuple[int | None, ...] | None


def _dims_of(value: Value | None) -> Dims:
    if isinstance(value, Act):
        return value.dims
    if isinstance(value, Const):
        return tuple(int(d) for d in value.array.shape)
    return None


def _broadcast(*shapes: Dims) -> Dims:
    """Numpy broadcasting of static dims (None: dynamic)."""
    known_shapes = [s for s in shapes if s is not None]
    if len(known_shapes) < len(shapes):
        return None
    rank = max(len(s) for s in known_shapes)
    out: list[int | None] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in known_shapes if len(s) - rank + i >= 0]
        known = [d for d in dims if d is not None and d != 1]
        if known:
            out.append(known[0])
        elif any(d is None for d in dims):
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def _window(size: int | None, kernel: int, stride: int, pad: int, dilation: int = 1,
            ceil: bool = False) -> int | None:
    """Output length of a convolution / pooling window along one dim."""
    if size is None:
        return None
    span = size + pad - dilation * (kernel - 1) - 1
    return (-(-span // stride) if ceil else span // stride) + 1

# Each takes (converter, node, inputs) and returns the node's output value(s). Inputs are Act
# (run time), Const (known) or ShapeVal (shape arithmetic); ops whose inputs are all constant
# were folded before (unless registered with fold=False).

@converter("Constant")
def _constant(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    value = _constant_attr(node)
    if value is None:
        raise _invalid(f"{_what(node)}: sparse or string constants are not supported")
    return Const(value, node.output[0])


@converter("Identity", "Dropout")
def _identity(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]
              ) -> list[Value | None]:
    if node.op_type == "Dropout" and len(inputs) > 2 and isinstance(inputs[2], Const) \
            and bool(inputs[2].array):
        raise _invalid(f"{_what(node)} runs in training mode; {TRAINING_OUTPUTS_HINT}")
    return [inputs[0]]


_UNARY = {"Relu": "aten.relu.default", "Sigmoid": "aten.sigmoid.default",
          "Tanh": "aten.tanh.default", "Erf": "aten.erf.default", "Sqrt": "aten.sqrt.default",
          "Exp": "aten.exp.default", "Log": "aten.log.default", "Neg": "aten.neg.default",
          "Abs": "aten.abs.default", "Reciprocal": "aten.reciprocal.default",
          "HardSwish": "aten.hardswish.default", "Softplus": "aten.softplus.default",
          "Mish": "aten.mish.default"}


@converter(*_UNARY)
def _unary(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    return conv.call(_UNARY[node.op_type], x, _dims=x.dims)


@converter("LeakyRelu", "Elu")
def _alpha_activation(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]
                      ) -> Value:
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    if node.op_type == "LeakyRelu":
        return conv.call("aten.leaky_relu.default", x, _f32(a.get("alpha", 0.01)),
                         _dims=x.dims)
    return conv.call("aten.elu.default", x, _f32(a.get("alpha", 1.0)), _dims=x.dims)


@converter("Gelu")
def _gelu(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    approximate = _attrs(node).get("approximate", "none")
    x = conv.tensor(inputs[0], _what(node))
    if approximate == "none":
        return conv.call("aten.gelu.default", x, _dims=x.dims)
    return conv.call("aten.gelu.default", x, approximate=approximate, _dims=x.dims)


@converter("HardSigmoid")
def _hardsigmoid(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    alpha, beta = _f32(a.get("alpha", 0.2)), _f32(a.get("beta", 0.5))
    x = conv.tensor(inputs[0], _what(node))
    if abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6:
        return conv.call("aten.hardsigmoid.default", x, _dims=x.dims)
    scaled = conv.call("aten.add.Tensor", conv.call("aten.mul.Tensor", x, alpha), beta)
    return conv.call("aten.hardtanh.default", scaled, 0.0, 1.0, _dims=x.dims)


@converter("Clip")
def _clip_op(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    bounds = []
    for i, what in ((1, "min"), (2, "max")):
        v = inputs[i] if len(inputs) > i else None
        if v is not None and _scalar(v) is None:
            raise _invalid(f"{_what(node)}: its {what} is not a constant number")
        bounds.append(None if v is None else float(_scalar(v)))  # type: ignore[arg-type]
    lo, hi = bounds
    if lo is not None and hi is not None:
        return conv.call("aten.hardtanh.default", x, lo, hi, _dims=x.dims)
    if lo == 0.0:
        return conv.call("aten.relu.default", x, _dims=x.dims)
    if lo is not None:
        return conv.call("aten.clamp_min.default", x, lo, _dims=x.dims)
    if hi is not None:
        return conv.call("aten.clamp_max.default", x, hi, _dims=x.dims)
    return x


@converter("PRelu")
def _prelu(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    slope = _need_const(inputs[1], node, "slope")
    flat = slope.reshape(-1)
    if slope.size != 1 and sorted(slope.shape, reverse=True)[1:] != [1] * (slope.ndim - 1):
        raise _invalid(f"{_what(node)}: a slope of shape {list(slope.shape)} is not per "
                       "channel; slimline supports one slope or one per channel")
    name = node.input[1] if slope.ndim == 1 else f"{node.input[1]}_per_channel"
    weight = Const(flat.astype(np.float32), name, weight=True)
    return conv.call("aten.prelu.default", x, conv.attr(weight), _dims=x.dims)


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@converter("Add", "Sub", "Mul", "Div")
def _binary(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a, b = inputs[0], inputs[1]
    kind = _BINARY[node.op_type]
    if isinstance(a, ShapeVal) or isinstance(b, ShapeVal):
        return _shape_binary(conv, node, kind, a, b)
    sa, sb = _scalar(a), _scalar(b)
    if isinstance(a, Act) and sb is not None and _fits(b, a):
        return conv.call(f"aten.{kind}.Tensor", a, sb, _dims=a.dims)
    if isinstance(b, Act) and sa is not None and _fits(a, b):
        if kind in ("add", "mul"):
            return conv.call(f"aten.{kind}.Tensor", b, sa, _dims=b.dims)
        if kind == "sub":
            return conv.call("aten.rsub.Scalar", b, sa, _dims=b.dims)
        return conv.call("aten.mul.Tensor", conv.call("aten.reciprocal.default", b), sa,
                         _dims=b.dims)
    ta, tb = conv.tensor(a, _what(node)), conv.tensor(b, _what(node))
    dims = _broadcast(ta.dims, tb.dims)
    if kind == "div" and ta.dtype == "int64" and tb.dtype == "int64":
        return conv.call("aten.div.Tensor_mode", ta, tb, rounding_mode="trunc", _dims=dims)
    return conv.call(f"aten.{kind}.Tensor", ta, tb, _dims=dims)


def _fits(const: Value | None, act: Act) -> bool:
    """Whether a one-element constant broadcast against `act` keeps `act`'s shape (so it can
    be passed as a number)."""
    if not isinstance(const, Const):
        return False
    if const.array.ndim == 0:
        return True
    return act.dims is not None and const.array.ndim <= len(act.dims)


def _shape_binary(conv: Converter, node: onnx.NodeProto, kind: str, a: Value | None,
                  b: Value | None) -> Value:
    xs, ys = _items(a, node, "first input"), _items(b, node, "second input")
    scalar = all(isinstance(v, ShapeVal) and v.scalar or isinstance(v, Const)
                 and v.array.ndim == 0 for v in (a, b))
    if len(xs) != len(ys):
        if len(xs) == 1:
            xs = xs * len(ys)
        elif len(ys) == 1:
            ys = ys * len(xs)
        else:
            raise _invalid(f"{_what(node)}: shapes of lengths {len(xs)} and {len(ys)} do not "
                           "broadcast")
    out: list[Item] = []
    for x, y in zip(xs, ys, strict=True):
        if kind == "div":
            if isinstance(y, int) and y > 0 and (isinstance(x, Sym) or x >= 0):
                out.append(conv.arith("floordiv", x, y))
                continue
            if isinstance(x, int) and isinstance(y, int) and y != 0:
                out.append(int(x / y))
                continue
            raise _invalid(f"{_what(node)}: divides a run-time size by a run-time or "
                           f"non-positive value; {_STATIC_HINT}")
        out.append(conv.arith(kind, x, y))
    return _shape_value(out, scalar, node.output[0])


@converter("Pow")
def _pow(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    base, exponent = inputs[0], inputs[1]
    e = _scalar(exponent)
    if isinstance(base, Act) and e is not None and _fits(exponent, base):
        return conv.call("aten.pow.Tensor_Scalar", base, e, _dims=base.dims)
    b = _scalar(base)
    if isinstance(exponent, Act) and b is not None and _fits(base, exponent):
        return conv.call("aten.pow.Scalar", b, exponent, _dims=exponent.dims)
    tb, te = conv.tensor(base, _what(node)), conv.tensor(exponent, _what(node))
    return conv.call("aten.pow.Tensor_Tensor", tb, te, _dims=_broadcast(tb.dims, te.dims))


@converter("Max", "Min")
def _max_min(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    present = [v for v in inputs if v is not None]
    acts = [v for v in present if isinstance(v, Act)]
    scalars = [_scalar(v) for v in present if not isinstance(v, Act)]
    if not acts or any(s is None for s in scalars) or any(isinstance(v, ShapeVal)
                                                          for v in present):
        raise _invalid(f"{_what(node)}: only maxima/minima of tensors and constant numbers "
                       "are supported")
    out = acts[0]
    pair = "aten.maximum.default" if node.op_type == "Max" else "aten.minimum.default"
    for other in acts[1:]:
        out = conv.call(pair, out, other, _dims=_broadcast(out.dims, other.dims))
    if scalars:
        numbers = [float(v) for v in scalars if v is not None]
        bound = max(numbers) if node.op_type == "Max" else min(numbers)
        clamp = "aten.clamp_min.default" if node.op_type == "Max" else "aten.clamp_max.default"
        out = conv.call(clamp, out, bound, _dims=out.dims)
    return out


@converter("Softmax", "LogSoftmax")
def _softmax(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    axis = int(_attrs(node).get("axis", -1))
    op = "aten.softmax.int" if node.op_type == "Softmax" else "aten.log_softmax.int"
    return conv.call(op, x, axis, _dims=x.dims)


@converter("MatMul")
def _matmul(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a, b = inputs[0], inputs[1]
    if isinstance(a, Act) and isinstance(b, Const) and b.array.ndim == 2 \
            and b.array.dtype.kind == "f":
        weight = np.ascontiguousarray(b.array.T)
        return _linear(conv, node, a, weight, node.input[1])
    ta, tb = conv.tensor(a, _what(node)), conv.tensor(b, _what(node))
    dims: Dims = None
    if ta.dims is not None and tb.dims is not None and len(ta.dims) >= 2 and len(tb.dims) >= 2:
        batch = _broadcast(ta.dims[:-2], tb.dims[:-2])
        dims = None if batch is None else (*batch, ta.dims[-2], tb.dims[-1])
    return conv.call("aten.matmul.default", ta, tb, _dims=dims)


@converter("Gemm")
def _gemm(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    at = _attrs(node)
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    trans_a, trans_b = int(at.get("transA", 0)), int(at.get("transB", 0))
    a, b = conv.tensor(inputs[0], _what(node)), inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if trans_a:
        a = conv.call("aten.permute.default", a, [1, 0],
                      _dims=None if a.dims is None else tuple(reversed(a.dims)))
    if isinstance(b, Const) and b.array.ndim == 2 and (c is None or isinstance(c, Const)):
        weight = alpha * (b.array if trans_b else b.array.T)
        out_features = weight.shape[0]
        bias = None
        if c is not None:
            carr = c.array
            if carr.size in (1, out_features) and (carr.ndim < 2 or carr.shape[0] == 1):
                bias = beta * np.broadcast_to(carr.reshape(-1), (out_features,))
            else:
                raise _invalid(f"{_what(node)}: a C of shape {list(carr.shape)} is not a bias")
        return _make_linear(conv, node, a, weight.astype(np.float32), bias, node.input[1],
                            node.input[2] if c is not None else None)
    bt = conv.tensor(b, _what(node))
    if trans_b:
        bt = conv.call("aten.permute.default", bt, [1, 0])
    out = conv.call("aten.matmul.default", a, bt)
    if alpha != 1.0:
        out = conv.call("aten.mul.Tensor", out, alpha)
    if c is not None:
        sc = _scalar(c)
        ct = sc * beta if sc is not None else conv.tensor(c, _what(node))
        if sc is None and beta != 1.0:
            ct = conv.call("aten.mul.Tensor", ct, beta)
        out = conv.call("aten.add.Tensor", out, ct)
    return out


def _bias_add(conv: Converter, output: str, features: int, channel_axis: int
              ) -> tuple[onnx.NodeProto, np.ndarray, str] | None:
    """The Add right after a layer (its only consumer) of a constant that is a per-feature
    bias on `channel_axis` (-1 for linear, 1 for conv): (node, bias, its name)."""
    users = conv.consumers.get(output, [])
    if len(users) != 1 or users[0].op_type != "Add" or output in _graph_outputs(conv):
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == output else add.input[0]
    array = conv.const_of(other)
    if array is None or array.dtype.kind != "f" or array.size != features:
        return None
    shape = list(array.shape)
    _, out_dims = conv.info.get(output, (0, None))
    if len(shape) > (len(out_dims) if out_dims is not None else 1):
        return None  # the add would broadcast the output to a higher rank
    if channel_axis == -1:  # (..., features): the bias is (features,) or (1, ..., features)
        ok = not shape or shape[-1] == features
    else:  # conv output (N, C, H, W): the bias is (C, 1, 1) or (1, C, 1, 1)
        ok = len(shape) >= 3 and shape[-3] == features
    return (add, array.reshape(-1), other) if ok else None


def _graph_outputs(conv: Converter) -> set[str]:
    return {o.name for o in conv.model.graph.output}


def _linear(conv: Converter, node: onnx.NodeProto, x: Act, weight: np.ndarray,
            weight_name: str) -> Value:
    bias_name = None
    bias = None
    fused = _bias_add(conv, node.output[0], weight.shape[0], -1)
    if fused is not None:
        add, bias, bias_name = fused
        conv.absorbed.add(id(add))
    out = _make_linear(conv, node, x, weight.astype(np.float32), bias, weight_name, bias_name)
    if fused is not None:
        conv.values[fused[0].output[0]] = conv.set_shape(fused[0].output[0], out)
    return out


def _make_linear(conv: Converter, node: onnx.NodeProto, x: Act, weight: np.ndarray,
                 bias: np.ndarray | None, weight_name: str, bias_name: str | None) -> Act:
    out_f, in_f = weight.shape
    name = conv.layer_name(node, weight_name, bias_name, "linear")
    spec = {"type": "Linear", "in_features": int(in_f), "out_features": int(out_f),
            "bias": bias is not None}
    state: dict[str, np.ndarray | torch.Tensor] = {"weight": weight}
    if bias is not None:
        state["bias"] = np.asarray(bias, dtype=np.float32)
    dims = None if x.dims is None else (*x.dims[:-1], int(out_f))
    return conv.call_module(name, spec, x, state, dims)


@converter("Conv")
def _conv(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    w = inputs[1]
    if not isinstance(w, Const) or w.array.dtype.kind != "f":
        raise _invalid(f"{_what(node)}: its weight is computed at run time; slimline imports "
                       "convolutions with constant weights")
    weight = w.array.astype(np.float32)
    if weight.ndim != 4:
        raise _invalid(f"{_what(node)}: a {weight.ndim - 2}-d convolution is not supported "
                       "(2-d only: nn.Conv2d)")
    b = inputs[2] if len(inputs) > 2 else None
    if b is not None and not isinstance(b, Const):
        raise _invalid(f"{_what(node)}: its bias is computed at run time")
    out_c, in_per_group, kh, kw = weight.shape
    group = int(a.get("group", 1))
    strides = [int(s) for s in a.get("strides", [1, 1])]
    dilations = [int(d) for d in a.get("dilations", [1, 1])]
    kernel = [int(k) for k in a.get("kernel_shape", [kh, kw])]
    if kernel != [kh, kw]:
        raise _invalid(f"{_what(node)}: kernel_shape {kernel} does not match its weight")
    pads = _pads(conv, node, x, a, kernel, strides, dilations)
    if pads[0] != pads[2] or pads[1] != pads[3]:
        x = conv.call("aten.constant_pad_nd.default", x, [pads[1], pads[3], pads[0], pads[2]],
                      0.0, _dims=_padded(x.dims, pads))
        pads = [0, 0, 0, 0]
    bias = None if b is None else b.array.astype(np.float32).reshape(-1)
    bias_name = node.input[2] if b is not None else None
    fused = None
    if bias is None:
        fused = _bias_add(conv, node.output[0], out_c, 1)
        if fused is not None:
            conv.absorbed.add(id(fused[0]))
            bias, bias_name = fused[1].astype(np.float32), fused[2]
    name = conv.layer_name(node, node.input[1], bias_name, "conv")
    spec = {"type": "Conv2d", "in_channels": int(in_per_group * group),
            "out_channels": int(out_c), "kernel_size": [kh, kw], "stride": strides,
            "padding": [int(pads[0]), int(pads[1])], "dilation": dilations, "groups": group,
            "bias": bias is not None}
    state: dict[str, np.ndarray | torch.Tensor] = {"weight": weight}
    if bias is not None:
        state["bias"] = bias
    dims = None
    if x.dims is not None and len(x.dims) == 4:
        dims = (x.dims[0], int(out_c),
                *(_window(x.dims[2 + i], kernel[i], strides[i], 2 * pads[i], dilations[i])
                  for i in range(2)))
    out = conv.call_module(name, spec, x, state, dims)
    if fused is not None:
        conv.values[fused[0].output[0]] = conv.set_shape(fused[0].output[0], out)
    return out


def _padded(dims: Dims, pads: list[int]) -> Dims:
    """Dims of (N, C, H, W) after padding [top, left, bottom, right]."""
    if dims is None or len(dims) != 4:
        return None
    h, w = dims[2], dims[3]
    return (dims[0], dims[1], None if h is None else h + pads[0] + pads[2],
            None if w is None else w + pads[1] + pads[3])


def _pads(conv: Converter, node: onnx.NodeProto, x: Act, a: dict[str, Any],
          kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """[top, left, bottom, right] of a 2-d Conv / pool, `auto_pad` resolved."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
        if len(pads) != 4:
            raise _invalid(f"{_what(node)}: pads {pads} are not 2-d")
        return pads
    if auto == "VALID":
        return [0, 0, 0, 0]
    dims = conv.dims(x, _what(node))
    begin, end = [], []
    for i in range(2):
        size = dims[2 + i]
        if size is None:
            raise _invalid(f"{_what(node)}: auto_pad {auto} needs a fixed input size")
        out = -(-size // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return [begin[0], begin[1], end[0], end[1]]


@converter("BatchNormalization")
def _batchnorm(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    if int(a.get("training_mode", 0)):
        raise _invalid(f"{_what(node)} runs in training mode; {TRAINING_OUTPUTS_HINT}")
    x = conv.tensor(inputs[0], _what(node))
    params = [_need_const(v, node, what).astype(np.float32).reshape(-1)
              for v, what in zip(inputs[1:5], ("scale", "bias", "mean", "variance"), strict=True)]
    rank = conv.rank(x, _what(node))
    if rank not in (2, 3, 4):
        raise _invalid(f"{_what(node)}: batch norm of a rank-{rank} tensor is not supported")
    scale, shift, mean, var = params
    features = scale.size
    kind = "BatchNorm2d" if rank == 4 else "BatchNorm1d"
    name = conv.layer_name(node, node.input[1], node.input[2], "bn")
    momentum = round(1.0 - float(a.get("momentum", 0.9)), 6)  # ONNX keeps 1 - torch's
    spec = {"type": kind, "num_features": int(features), "eps": _f32(a.get("epsilon", 1e-5)),
            "momentum": min(max(momentum, 0.0), 1.0), "affine": True,
            "track_running_stats": True}
    state: dict[str, np.ndarray | torch.Tensor] = {
        "weight": scale, "bias": shift, "running_mean": mean, "running_var": var,
        "num_batches_tracked": torch.tensor(0, dtype=torch.int64)}
    return conv.call_module(name, spec, x, state, x.dims)


@converter("LayerNormalization")
def _layernorm(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    rank = conv.rank(x, _what(node))
    axis = _axis(int(a.get("axis", -1)), rank, node)
    dims = conv.dims(x, _what(node))[axis:]
    if any(d is None for d in dims):
        raise _invalid(f"{_what(node)}: normalizes over dynamic dims; {_STATIC_HINT}")
    shape = [int(d) for d in dims]  # type: ignore[arg-type]
    scale = _need_const(inputs[1], node, "scale").astype(np.float32)
    b = inputs[2] if len(inputs) > 2 else None
    bias = None if b is None else _need_const(b, node, "bias").astype(np.float32)
    try:
        scale = np.broadcast_to(scale, shape).copy()
        bias = None if bias is None else np.broadcast_to(bias, shape).copy()
    except ValueError:
        raise _invalid(f"{_what(node)}: scale/bias do not match the normalized shape "
                       f"{shape}") from None
    name = conv.layer_name(node, node.input[1], node.input[2] if b is not None else None,
                           "norm")
    spec = {"type": "LayerNorm", "normalized_shape": shape,
            "eps": _f32(a.get("epsilon", 1e-5)), "elementwise_affine": True,
            "bias": bias is not None}
    state: dict[str, np.ndarray | torch.Tensor] = {"weight": scale}
    if bias is not None:
        state["bias"] = bias
    return conv.call_module(name, spec, x, state, x.dims)


@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    dims = conv.dims(x, _what(node))
    rank = len(dims)
    out = (*dims[:2], *([1] * (rank - 2)))
    if node.op_type == "GlobalAveragePool" and rank == 4:
        return conv.call("aten.adaptive_avg_pool2d.default", x, [1, 1], _dims=out)
    axes = list(range(2, rank))
    if node.op_type == "GlobalAveragePool":
        return conv.call("aten.mean.dim", x, axes, True, _dims=out)
    return conv.call("aten.amax.default", x, axes, True, _dims=out)


@converter("AveragePool", "MaxPool")
def _pool(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    if conv.rank(x, _what(node)) != 4:
        raise _invalid(f"{_what(node)}: only 2-d pooling is supported")
    kernel = [int(k) for k in a["kernel_shape"]]
    strides = [int(s) for s in a.get("strides", [1, 1])]
    dilations = [int(d) for d in a.get("dilations", [1, 1])]
    pads = _pads(conv, node, x, a, kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    dims = x.dims
    out: Dims = None
    if dims is not None:
        out = (dims[0], dims[1], *(_window(dims[2 + i], kernel[i], strides[i],
                                           pads[i] + pads[i + 2], dilations[i], ceil)
                                   for i in range(2)))
    if node.op_type == "MaxPool":
        if int(a.get("storage_order", 0)):
            raise _invalid(f"{_what(node)}: storage_order 1 is not supported")
        if pads[0] != pads[2] or pads[1] != pads[3]:
            x = conv.call("aten.constant_pad_nd.default", x,
                          [pads[1], pads[3], pads[0], pads[2]], -math.inf)
            pads = [0, 0, 0, 0]
        return conv.call("aten.max_pool2d.default", x, kernel, strides, pads[:2], dilations,
                         ceil, _dims=out)
    if dilations != [1, 1]:
        raise _invalid(f"{_what(node)}: dilated average pooling is not supported")
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise _invalid(f"{_what(node)}: asymmetric padding {pads} is not supported")
    return conv.call("aten.avg_pool2d.default", x, kernel, strides, pads[:2], ceil,
                     bool(a.get("count_include_pad", 0)), _dims=out)


_REDUCE = {"ReduceMean": "aten.mean.dim", "ReduceSum": "aten.sum.dim_IntList",
           "ReduceMax": "aten.amax.default"}


@converter(*_REDUCE)
def _reduce(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    rank = conv.rank(x, _what(node))
    if len(inputs) > 1 and inputs[1] is not None:
        axes = [int(v) for v in _need_const(inputs[1], node, "axes").reshape(-1)]
    else:
        axes = [int(v) for v in a.get("axes", [])]
    if not axes:
        if int(a.get("noop_with_empty_axes", 0)):
            return x
        axes = list(range(rank))
    axes = sorted(_axis(v, rank, node) for v in axes)
    keep = bool(a.get("keepdims", 1))
    dims = conv.dims(x, _what(node))
    out = tuple(1 if i in axes else d for i, d in enumerate(dims) if keep or i not in axes)
    return conv.call(_REDUCE[node.op_type], x, axes, keep, _dims=out)


@converter("Transpose")
def _transpose(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    perm = _attrs(node).get("perm")
    if perm is None:
        perm = list(reversed(range(conv.rank(x, _what(node)))))
    perm = [int(p) for p in perm]
    dims = None if x.dims is None else tuple(x.dims[p] for p in perm)
    return conv.call("aten.permute.default", x, perm, _dims=dims)


@converter("Reshape")
def _reshape(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    data, shape = inputs[0], inputs[1]
    items = _items(shape, node, "shape")
    allowzero = int(_attrs(node).get("allowzero", 0))
    if isinstance(data, ShapeVal):  # reshaping a shape vector (to [-1] or a scalar)
        if len(items) == 1 and items[0] in (-1, len(data.items)):
            return ShapeVal(data.items)
        if not items and len(data.items) == 1:
            return ShapeVal(data.items, scalar=True)
        raise _invalid(f"{_what(node)}: unsupported reshape of a shape to {items}")
    x = conv.tensor(data, _what(node))
    target: list[Item] = []
    for i, item in enumerate(items):
        if isinstance(item, int) and item == 0 and not allowzero:
            target.append(conv.dim(x, i))
        else:
            target.append(item)
    dims: list[int | None] = [t if isinstance(t, int) and t >= 0 else None for t in target]
    if target.count(-1) == 1 and x.dims is not None and None not in x.dims \
            and None not in [d for t, d in zip(target, dims, strict=True) if t != -1]:
        known = math.prod(d for t, d in zip(target, dims, strict=True) if t != -1)  # type: ignore[misc]
        total = math.prod(x.dims)  # type: ignore[arg-type]
        dims[target.index(-1)] = total // known if known else None
    return conv.call("aten.reshape.default", x, target, _dims=dims)


@converter("Flatten")
def _flatten(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    rank = conv.rank(x, _what(node))
    axis = int(_attrs(node).get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    dims = conv.dims(x, _what(node))
    lead, rest = dims[:axis], dims[axis:]
    out_dims = (None if None in lead else math.prod(lead),  # type: ignore[arg-type]
                None if None in rest else math.prod(rest))  # type: ignore[arg-type]
    if axis == 0:
        return conv.call("aten.reshape.default", x, [1, -1], _dims=out_dims)
    out = x
    if axis < rank:
        out = conv.call("aten.flatten.using_ints", out, axis, -1)
    else:
        out = conv.call("aten.unsqueeze.default", out, -1)
    if axis > 1:
        out = conv.call("aten.flatten.using_ints", out, 0, axis - 1)
    return Act(out.node, out_dims)


def _axes_input(node: onnx.NodeProto, inputs: list[Value | None]) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(v) for v in _need_const(inputs[1], node, "axes").reshape(-1)]
    axes = _attrs(node).get("axes")
    return None if axes is None else [int(v) for v in axes]


@converter("Unsqueeze")
def _unsqueeze(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    axes = _axes_input(node, inputs) or []
    data = inputs[0]
    if isinstance(data, ShapeVal):
        if data.scalar and axes in ([0], [-1]):
            return ShapeVal(data.items)
        raise _invalid(f"{_what(node)}: unsupported unsqueeze of a shape")
    x = conv.tensor(data, _what(node))
    rank = conv.rank(x, _what(node)) + len(axes)
    out = x
    dims = list(conv.dims(x, _what(node)))
    for axis in sorted(_axis(a, rank, node) for a in axes):
        dims.insert(axis, 1)
        out = conv.call("aten.unsqueeze.default", out, axis, _dims=dims)
    return out


@converter("Squeeze")
def _squeeze(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    axes = _axes_input(node, inputs)
    data = inputs[0]
    if isinstance(data, ShapeVal):
        if len(data.items) == 1 and not data.scalar and (axes is None or axes in ([0], [-1])):
            return ShapeVal(data.items, scalar=True)
        raise _invalid(f"{_what(node)}: unsupported squeeze of a shape")
    x = conv.tensor(data, _what(node))
    dims = conv.dims(x, _what(node))
    if axes is None:
        axes = [i for i, d in enumerate(dims) if d == 1]
    axes = sorted(_axis(a, len(dims), node) for a in axes)
    if not axes:
        return x
    kept = tuple(d for i, d in enumerate(dims) if i not in axes)
    return conv.call("aten.squeeze.dims", x, axes, _dims=kept)


@converter("Concat")
def _concat(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    axis = int(_attrs(node)["axis"])
    present = [v for v in inputs if v is not None]
    if any(isinstance(v, ShapeVal) for v in present) and all(
            isinstance(v, ShapeVal) or isinstance(v, Const) and v.array.ndim == 1
            and v.array.dtype.kind in "iu" for v in present):
        items: list[Item] = []
        for v in present:
            items += _items(v, node, "input")
        return _shape_value(items, name=node.output[0])
    tensors = [conv.tensor(v, _what(node)) for v in present
               if not (isinstance(v, Const) and v.array.size == 0)]
    if len(tensors) == 1:
        return tensors[0]
    dims: Dims = None
    if all(t.dims is not None for t in tensors):
        first = list(tensors[0].dims)  # type: ignore[arg-type]
        ax = axis % len(first)
        sizes = [t.dims[ax] for t in tensors]  # type: ignore[index]
        first[ax] = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
        dims = tuple(first)
    return conv.call("aten.cat.default", tensors, axis, _dims=dims)


@converter("Split")
def _split(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]
           ) -> list[Value | None]:
    a = _attrs(node)
    axis = int(a.get("axis", 0))
    n_out = len(node.output)
    data = inputs[0]
    sizes: list[int] | None = None
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = [int(v) for v in _need_const(inputs[1], node, "split").reshape(-1)]
    elif "split" in a:
        sizes = [int(v) for v in a["split"]]
    if isinstance(data, ShapeVal):
        sizes = sizes or [len(data.items) // n_out] * n_out
        out: list[Value | None] = []
        start = 0
        for size in sizes:
            out.append(_shape_value(data.items[start:start + size]))
            start += size
        return out
    x = conv.tensor(data, _what(node))
    dims = conv.dims(x, _what(node))
    axis = _axis(axis, len(dims), node)
    if sizes is None:
        total = dims[axis]
        if total is None:
            raise _invalid(f"{_what(node)}: splits a dynamic dim; {_STATIC_HINT}")
        n = int(a.get("num_outputs", n_out))
        chunk = -(-total // n)
        sizes = [chunk] * (n - 1) + [total - chunk * (n - 1)]
    parts = conv.call("aten.split_with_sizes.default", x, sizes, axis)
    return [conv.call("operator.getitem", parts, i, base="split",
                      _dims=(*dims[:axis], size, *dims[axis + 1:]))
            for i, size in enumerate(sizes)]


@converter("Slice")
def _slice(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    data = inputs[0]
    starts = _items(inputs[1], node, "starts")
    ends = _items(inputs[2], node, "ends")
    axes = ([int(v) for v in _need_const(inputs[3], node, "axes").reshape(-1)]
            if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts))))
    steps = ([int(v) for v in _need_const(inputs[4], node, "steps").reshape(-1)]
             if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts))
    if any(s <= 0 for s in steps):
        raise _invalid(f"{_what(node)}: a slice with step {steps} (reversing) is not supported")
    if isinstance(data, ShapeVal):
        if axes not in ([0], [-1]) or not all(isinstance(v, int) for v in starts + ends):
            raise _invalid(f"{_what(node)}: unsupported slice of a shape")
        picked = data.items[int(starts[0]):int(ends[0]):steps[0]]  # type: ignore[arg-type]
        return _shape_value(picked, name=node.output[0])
    x = conv.tensor(data, _what(node))
    dims = list(conv.dims(x, _what(node)))
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, len(dims), node)
        size = dims[axis]
        if isinstance(start, int) and isinstance(end, int) and size is not None:
            start = max(0, min(start + size if start < 0 else start, size))
            end = max(0, min(end + size if end < 0 else end, size))
            if start == 0 and end == size and step == 1:
                continue
            dims[axis] = max(0, -(-(end - start) // step))
        else:
            dims[axis] = None
            if isinstance(end, int) and end >= INT64_MAX // 2:
                end = INT64_MAX
        out = conv.call("aten.slice.Tensor", out, axis, start, end, step, _dims=dims)
    return out


@converter("Gather")
def _gather(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    axis = int(_attrs(node).get("axis", 0))
    data, indices = inputs[0], inputs[1]
    idx = _need_const(indices, node, "indices")
    if idx.dtype.kind not in "iu":
        raise _invalid(f"{_what(node)}: indices must be integers")
    if isinstance(data, ShapeVal):
        n = len(data.items)
        picked = [data.items[int(i) + n if int(i) < 0 else int(i)] for i in idx.reshape(-1)]
        return _shape_value(picked, scalar=idx.ndim == 0, name=node.output[0])
    x = conv.tensor(data, _what(node))
    dims = conv.dims(x, _what(node))
    axis = _axis(axis, len(dims), node)
    size = dims[axis]
    flat = [int(i) for i in idx.reshape(-1)]
    if any(i < 0 for i in flat):
        if size is None:
            raise _invalid(f"{_what(node)}: negative indices on a dynamic dim")
        flat = [i + size if i < 0 else i for i in flat]
    if idx.ndim == 0:
        return conv.call("aten.select.int", x, axis, flat[0],
                         _dims=(*dims[:axis], *dims[axis + 1:]))
    listed = (*dims[:axis], len(flat), *dims[axis + 1:])
    if idx.ndim == 1 and flat and flat == list(range(flat[0], flat[0] + len(flat))):
        return conv.call("aten.slice.Tensor", x, axis, flat[0], flat[0] + len(flat), 1,
                         _dims=listed)
    if idx.ndim == 1 and 0 < len(flat) <= MAX_GATHER_INDICES:
        picks = [conv.call("aten.select.int", x, axis, i) for i in flat]
        return conv.call("aten.stack.default", picks, axis, _dims=listed)
    raise _invalid(f"{_what(node)}: a gather of {idx.size} indices of shape "
                   f"{list(idx.shape)} is not supported (one index or up to "
                   f"{MAX_GATHER_INDICES} in a list)")


@converter("Expand")
def _expand(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    x = conv.tensor(inputs[0], _what(node))
    items = _items(inputs[1], node, "shape")
    rank = conv.rank(x, _what(node))
    target: list[Item] = []
    lead = len(items) - rank
    for i, item in enumerate(items):
        keep = i >= lead and isinstance(item, int) and item == 1
        target.append(-1 if keep else item)
    if lead < 0:
        target = [*([-1] * (-lead)), *target]
    wanted: Dims = tuple(i if isinstance(i, int) else None for i in items)
    return conv.call("aten.expand.default", x, target, _dims=_broadcast(x.dims, wanted))


@converter("Shape", fold=False)
def _shape(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    data = inputs[0]
    if isinstance(data, ShapeVal):
        dims_items: list[Item] = [] if data.scalar else [len(data.items)]
    elif isinstance(data, Const):
        dims_items = [int(d) for d in data.array.shape]
    else:
        x = conv.tensor(data, _what(node))
        dims_items = [conv.dim(x, i) for i in range(conv.rank(x, _what(node)))]
    start, end = a.get("start", 0), a.get("end")
    return _shape_value(dims_items[slice(int(start), None if end is None else int(end))],
                        name=node.output[0])


@converter("Size", fold=False)
def _size(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    data = inputs[0]
    if isinstance(data, Const):
        return Const(np.array(data.array.size, dtype=np.int64), node.output[0])
    x = conv.tensor(data, _what(node))
    total: Item = 1
    for i in range(conv.rank(x, _what(node))):
        total = conv.arith("mul", total, conv.dim(x, i))
    return _shape_value([total], scalar=True, name=node.output[0])


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
_INT_TYPES = (TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
              TensorProto.UINT8)


@converter("Cast", "CastLike")
def _cast(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    data = inputs[0]
    if node.op_type == "CastLike":
        like = inputs[1]
        to: int = (TensorProto.FLOAT if isinstance(like, Act) and like.dtype == "float32" else
                   int(helper.np_dtype_to_tensor_dtype(like.array.dtype))
                   if isinstance(like, Const) else TensorProto.INT64)
    else:
        to = int(_attrs(node)["to"])
    if isinstance(data, ShapeVal):
        if to in _INT_TYPES:
            return data
        raise _invalid(f"{_what(node)}: casts a size known only at run time to floating "
                       f"point; {_STATIC_HINT}")
    x = conv.tensor(data, _what(node))
    if to in _FLOAT_TYPES:
        if x.dtype == "float32":
            return x  # the imported graph computes in float32
        return conv.call("aten._to_copy.default", x, dtype={"dtype": "float32"}, _dims=x.dims)
    if to in _INT_TYPES or to == TensorProto.BOOL:
        dtype = "bool" if to == TensorProto.BOOL else "int64"
        out = conv.call("aten._to_copy.default", x, dtype={"dtype": dtype})
        return Act(out.node, x.dims, dtype)
    raise _invalid(f"{_what(node)}: a cast to {helper.tensor_dtype_to_string(to)} is not "
                   "supported")


@converter("ConstantOfShape", fold=True)
def _constant_of_shape(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]
                       ) -> Value:
    raise _invalid(f"{_what(node)}: builds a tensor whose shape depends on the batch size; "
                   f"{_STATIC_HINT}")


@converter("Range", "Tile", fold=True)
def _const_only(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    raise _invalid(f"{_what(node)} is supported on constant inputs only; {_STATIC_HINT}")


# ONNX comparison -> (aten op against a number, aten op between tensors, the op with the
# operands swapped, negate the tensor-tensor result)
_COMPARE = {"Greater": ("gt", "gt", "Less", False), "Less": ("lt", "lt", "Greater", False),
            "GreaterOrEqual": ("ge", "lt", "LessOrEqual", True),
            "LessOrEqual": ("le", "gt", "GreaterOrEqual", True),
            "Equal": ("eq", "eq", "Equal", False)}


def _compare(conv: Converter, node: onnx.NodeProto, op: str, a: Value | None,
             b: Value | None) -> Value:
    """A comparison of run-time tensors (masks of decomposed activations and attention)."""
    scalar_op, tensor_op, swapped, negate = _COMPARE[op]
    sa, sb = _scalar(a), _scalar(b)
    if isinstance(a, Act) and sb is not None and _fits(b, a):
        return Act(conv.call(f"aten.{scalar_op}.Scalar", a, sb).node, a.dims, "bool")
    if isinstance(b, Act) and sa is not None and _fits(a, b):
        return _compare(conv, node, swapped, b, a)
    ta, tb = conv.tensor(a, _what(node)), conv.tensor(b, _what(node))
    dims = _broadcast(ta.dims, tb.dims)
    out = conv.call(f"aten.{tensor_op}.Tensor", ta, tb, _dims=dims)
    if negate:
        out = conv.call("aten.logical_not.default", out, _dims=dims)
    return Act(out.node, dims, "bool")


@converter("Greater", "Less", "GreaterOrEqual", "LessOrEqual")
def _comparison(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    if any(isinstance(v, ShapeVal) for v in inputs):
        raise _invalid(f"{_what(node)}: compares a size known only at run time; "
                       f"{_STATIC_HINT}")
    return _compare(conv, node, node.op_type, inputs[0], inputs[1])


@converter("Not", "And", "Or")
def _logical(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    ts = [conv.tensor(v, _what(node)) for v in inputs]
    op = {"Not": "logical_not", "And": "logical_and", "Or": "logical_or"}[node.op_type]
    out = conv.call(f"aten.{op}.default", *ts, _dims=_broadcast(*(t.dims for t in ts)))
    return Act(out.node, out.dims, "bool")


@converter("Equal", fold=True)
def _equal(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a, b = inputs[0], inputs[1]
    if any(isinstance(v, Act) for v in (a, b)):
        return _compare(conv, node, "Equal", a, b)
    xs, ys = _items(a, node, "first input"), _items(b, node, "second input")
    if len(xs) == 1:
        xs = xs * len(ys)
    if len(ys) == 1:
        ys = ys * len(xs)
    out = []
    for x, y in zip(xs, ys, strict=True):
        if isinstance(x, int) and isinstance(y, int):
            out.append(x == y)
        elif isinstance(x, int) and x < 0 or isinstance(y, int) and y < 0:
            out.append(False)  # a size is never negative
        elif x == y:
            out.append(True)
        else:
            raise _invalid(f"{_what(node)}: compares a size known only at run time; "
                           f"{_STATIC_HINT}")
    return Const(np.array(out, dtype=np.bool_), node.output[0])


@converter("Where", fold=True)
def _where(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    cond, a, b = inputs
    if isinstance(cond, Const) and all(isinstance(v, (ShapeVal, Const)) for v in (a, b)):
        flags = [bool(c) for c in cond.array.reshape(-1)]
        xs, ys = _items(a, node, "X"), _items(b, node, "Y")
        n = max(len(flags), len(xs), len(ys))
        flags, xs, ys = (v * n if len(v) == 1 else v for v in (flags, xs, ys))  # type: ignore[assignment]
        return _shape_value([x if f else y for f, x, y in zip(flags, xs, ys, strict=True)],
                            name=node.output[0])
    if isinstance(cond, Act):
        ta, tb = conv.tensor(a, _what(node)), conv.tensor(b, _what(node))
        return conv.call("aten.where.self", cond, ta, tb,
                         _dims=_broadcast(cond.dims, ta.dims, tb.dims))
    raise _invalid(f"{_what(node)}: unsupported select on a constant condition")


@converter("Pad")
def _pad(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    rank = conv.rank(x, _what(node))
    pads = [int(v) for v in _need_const(inputs[1], node, "pads").reshape(-1)]
    value = 0.0
    if len(inputs) > 2 and inputs[2] is not None:
        v = _scalar(inputs[2])
        if v is None:
            raise _invalid(f"{_what(node)}: its constant_value is not a constant number")
        value = float(v)
    axes = ([_axis(int(v), rank, node) for v in _need_const(inputs[3], node, "axes").reshape(-1)]
            if len(inputs) > 3 and inputs[3] is not None else list(range(rank)))
    if len(pads) != 2 * len(axes):
        raise _invalid(f"{_what(node)}: {len(pads)} pads for {len(axes)} axes")
    per_axis = {axis: (pads[i], pads[i + len(axes)]) for i, axis in enumerate(axes)}
    torch_pad: list[int] = []
    for axis in range(rank - 1, -1, -1):
        torch_pad += list(per_axis.get(axis, (0, 0)))
    while torch_pad and torch_pad[-2:] == [0, 0]:
        torch_pad = torch_pad[:-2]
    if not torch_pad:
        return x
    mode = a.get("mode", "constant")
    dims = list(conv.dims(x, _what(node)))
    for axis, (before, after) in per_axis.items():
        size = dims[axis]
        dims[axis] = None if size is None else size + before + after
    if mode == "constant":
        return conv.call("aten.constant_pad_nd.default", x, torch_pad, value, _dims=dims)
    modes = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise _invalid(f"{_what(node)}: pad mode {mode!r} is not supported")
    return conv.call("aten.pad.default", x, torch_pad, modes[mode], None, _dims=dims)


@converter("Attention")
def _attention(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    """Opset 23's Attention on (batch, heads, seq, head_dim) inputs: scaled dot-product
    attention (an optional constant or run-time mask, causal, a scale; no KV cache)."""
    a = _attrs(node)
    q, k, v = (conv.tensor(inputs[i], _what(node)) for i in range(3))
    if any(conv.rank(t, _what(node)) != 4 for t in (q, k, v)):
        raise _invalid(f"{_what(node)}: only 4-d (batch, heads, sequence, head size) inputs "
                       "are supported")
    if len(inputs) > 4 and any(i is not None for i in inputs[4:]):
        raise _invalid(f"{_what(node)}: a key/value cache (past_key, past_value) is not "
                       "supported")
    if float(a.get("softcap", 0.0)) != 0.0:
        raise _invalid(f"{_what(node)}: softcap is not supported")
    mask = inputs[3] if len(inputs) > 3 else None
    kwargs: dict[str, Any] = {}
    if "scale" in a:
        kwargs["scale"] = float(a["scale"])
    q_heads, kv_heads = q.dims[1], k.dims[1]  # type: ignore[index]
    if q_heads != kv_heads:
        kwargs["enable_gqa"] = True
    attn_mask = None if mask is None else conv.tensor(mask, _what(node))
    return conv.call("aten.scaled_dot_product_attention.default", q, k, v, attn_mask, 0.0,
                     bool(a.get("is_causal", 0)), _dims=(*q.dims[:3], v.dims[3]),  # type: ignore[index]
                     **kwargs)


@converter("Einsum")
def _einsum(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    equation = str(_attrs(node)["equation"])
    operands = [conv.tensor(v, _what(node)) for v in inputs]
    return conv.call("aten.einsum.default", equation, operands)


@converter("InstanceNormalization", "GroupNormalization")
def _group_norm(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    """InstanceNormalization (per channel) and GroupNormalization as `aten.group_norm` with
    per-channel scale and bias tensors."""
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    dims = conv.dims(x, _what(node))
    channels = dims[1] if len(dims) >= 3 else None
    if channels is None:
        raise _invalid(f"{_what(node)}: needs a (N, C, ...) input with a fixed channel count")
    groups = channels if node.op_type == "InstanceNormalization" else int(a["num_groups"])
    if groups <= 0 or channels % groups:
        raise _invalid(f"{_what(node)}: {channels} channels do not split into {groups} groups")
    params = []
    for value, what in ((inputs[1], "scale"), (inputs[2], "bias")):
        array = _need_const(value, node, what).astype(np.float32).reshape(-1)
        name = node.input[1] if what == "scale" else node.input[2]
        if array.size == groups and groups != channels:  # opset 18: one per group
            array, name = np.repeat(array, channels // groups), f"{name}_per_channel"
        if array.size != channels:
            raise _invalid(f"{_what(node)}: its {what} has {array.size} values for "
                           f"{channels} channels")
        params.append(conv.attr(Const(array, name, weight=True)))
    eps = _f32(a.get("epsilon", 1e-5))
    return conv.call("aten.group_norm.default", x, groups, params[0], params[1], eps, False,
                     _dims=dims)


@converter("Resize")
def _resize(conv: Converter, node: onnx.NodeProto, inputs: list[Value | None]) -> Value:
    """2-d nearest (PyTorch's: asymmetric coordinates, floor) and bilinear (half_pixel or
    align_corners) resizing by constant scales or sizes."""
    a = _attrs(node)
    x = conv.tensor(inputs[0], _what(node))
    dims = conv.dims(x, _what(node))
    if len(dims) != 4:
        raise _invalid(f"{_what(node)}: only 2-d (N, C, H, W) resizing is supported")
    mode = a.get("mode", "nearest")
    coords = a.get("coordinate_transformation_mode", "half_pixel")
    if a.get("axes") is not None or int(a.get("antialias", 0)):
        raise _invalid(f"{_what(node)}: axes / antialias are not supported")
    scales = inputs[2] if len(inputs) > 2 else None
    sizes = inputs[3] if len(inputs) > 3 else None
    factors: list[float] | None = None
    size: list[Item] | None = None
    if scales is not None and not (isinstance(scales, Const) and scales.array.size == 0):
        values = [float(v) for v in _need_const(scales, node, "scales").reshape(-1)]
        if len(values) != 4 or values[:2] != [1.0, 1.0]:
            raise _invalid(f"{_what(node)}: scales {values} resize more than H and W")
        factors = values[2:]
    elif sizes is not None:
        items = _items(sizes, node, "sizes")
        if len(items) != 4 or not all(isinstance(i, int) for i in items[2:]) \
                or items[1] != dims[1] or isinstance(items[0], int) and items[0] != dims[0]:
            raise _invalid(f"{_what(node)}: sizes {items} are not the input's batch and "
                           "channels and a fixed 2-d size")
        size = items[2:]
    else:
        raise _invalid(f"{_what(node)}: neither scales nor sizes are given")
    out_hw = (size if size is not None else
              [None if d is None else int(math.floor(d * f))
               for d, f in zip(dims[2:], factors or [], strict=True)])
    out_dims = (dims[0], dims[1], *(d if isinstance(d, int) else None for d in out_hw))
    if mode == "nearest":
        if coords != "asymmetric" or a.get("nearest_mode", "round_prefer_floor") != "floor":
            raise _invalid(f"{_what(node)}: nearest resizing with {coords} coordinates is "
                           "not supported (PyTorch's nearest: asymmetric, floor)")
        return conv.call("aten.upsample_nearest2d.vec", x, size, factors, _dims=out_dims)
    if mode == "linear" and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        align = coords == "align_corners"
        return conv.call("aten.upsample_bilinear2d.vec", x, size, align, factors,
                         _dims=out_dims)
    raise _invalid(f"{_what(node)}: {mode} resizing with {coords} coordinates is not "
                   "supported")
