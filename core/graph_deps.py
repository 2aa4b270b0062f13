"""The dependency graph of an imported model: which output units must be pruned together, found
automatically from its `torch.fx` graph (models built from a slimline graph, `core.graph`).

Every node's output tensor is followed axis by axis: a *flow* says which producers' units an
axis carries, as segments `(producer, units)` (several after a concatenation) times `per`
entries per unit (a conv map flattened into a Linear's input: h*w entries per channel,
channel-major). The walk goes once through the graph in topological order:

* producers (start a flow on their output's unit axis): nn.Linear (last axis) and nn.Conv2d
  with groups == 1 (axis 1), and their PCN replacements (`core.pcn`), each called once;
* readers (end a flow): the same layers reading the flow on their input axis;
* channel-wise layers (the flow passes, the layer is sliced on both sides with the group): a
  BatchNorm2d, a depthwise nn.Conv2d (groups == in_channels == out_channels). A BatchNorm2d
  that is the only user of a producer's output is that producer's `norm` (the BN scale enters
  the l1 score, as in the zoo);
* channel-preserving ops pass the flow (activations, dropout, pooling over the spatial axes,
  means/sums over other axes, permutes, reshapes that keep the unit axis or merge it with the
  axes after it — flatten into a Linear: `per` = h*w —, select/slice on other axes, a Linear
  applied to another axis);
* elementwise ops with several tensor operands (residual adds, gating multiplies) merge the
  groups of the flows they combine (ResNet stages, MobileNetV2 inverted residuals); a
  concatenation along the unit axis joins flows as segments (a reader reads each group at its
  offset);
* everything else that reads a unit axis blocks the groups it carries, with the reason: a
  grouped conv, a reshape that splits the unit axis (attention heads), matmul/attention, a
  LayerNorm over the unit axis, a weight tensor (get_attr) or any other tensor combined with
  the flow on its unit axis (ViT position embeddings, class tokens), a reduction over it, the
  graph output (logits), an op slimline does not know.

LayerNorm blocks: it normalises each token over the unit axis, so removing a unit changes the
mean and variance every other unit is normalised with — the pruned network is not the old one
minus the removed units' contributions (as with BatchNorm, whose statistics are per channel),
and in a transformer the stream it normalises is tied to position embeddings, class tokens and
every block's projections anyway. A ViT's MLP hidden units (fc1 -> GELU -> fc2) are a group of
their own and prunable; its attention qkv is blocked by the reshape into heads, its residual
stream (patch embedding, attention projections, fc2s) by the LayerNorms and the embeddings.

Groups are named after their first producer in graph order, so the names (and `channel_prune`
/ `pcn_output` edits that use them) replay on a rebuilt model. Shapes come from one eval-mode,
no-grad forward of a zero batch of two samples of the model's input shape
(`model.slimline_arch["input_shape"]`, or `slimline_input_shape`, or the placeholder's
`meta["val"]`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from core.applies import conv_kind
from core.errors import SpecError
from core.layers import as_layer
from core.pcn import PCNConv2d, PCNLinear

# before: widths of the input segments in front of the group's units, each a layer whose current
# unit count is the width (it is pruned with another group) or a fixed count; per: input entries
# per unit (a flattened conv map: h*w).
Segment = tuple[str, tuple[str | int, ...], int]
# a literal size in a shape argument that counts a group's units (an ONNX Flatten imported as
# reshape(x, [-1, 64])): (node, argument index, entry or -1 for the argument itself, entries per
# unit); `core.pcn_graph.prune_units` lowers it by the removed units x entries per unit
Literal = tuple[str, int, int, int]


@dataclass(frozen=True)
class UnitGroup:
    """Units pruned together (`core.pcn_graph`). `norms[i]` is the BatchNorm right after
    `producers[i]` (or None); `readers` one tuple per tensor carrying the units (layers reading
    one tensor share their PCA basis); `channelwise` the layers the units pass through, sliced
    on both sides (BatchNorm2d, depthwise Conv2d); `segments` the readers/channel-wise layers
    that read the units at an offset of a wider input (a concatenation) as
    `(layer, before, per)` — `before` the widths of the segments in front, each a layer whose
    current unit count is the width, or a fixed count; `literals` the graph's literal sizes
    that count the units (`Literal`), lowered when units go."""

    name: str
    producers: tuple[str, ...]
    norms: tuple[str | None, ...]
    readers: tuple[tuple[str, ...], ...]
    channelwise: tuple[str, ...] = ()
    segments: tuple[Segment, ...] = ()
    literals: tuple[Literal, ...] = ()

    @property
    def reader_layers(self) -> tuple[str, ...]:
        return tuple(n for tensor in self.readers for n in tensor)

    def segment(self, layer: str) -> tuple[tuple[str | int, ...], int] | None:
        """`(before, per)` where `layer` reads the units at an offset, else None."""
        for name, before, per in self.segments:
            if name == layer:
                return before, per
        return None


@dataclass(frozen=True)
class GraphDeps:
    """`groups`: the prunable unit groups; `blocked`: the groups that cannot be pruned and why;
    `untouched`: weight layers that are in no group, and why (grouped convs, low-rank layers)."""

    groups: dict[str, UnitGroup]
    blocked: dict[str, tuple[UnitGroup, str]]
    untouched: dict[str, str]


@dataclass(frozen=True)
class _Flow:
    """Units along one axis: segments (producer id or None for fixed values, units) x per."""

    segs: tuple[tuple[int | None, int], ...]
    per: int = 1

    def pids(self) -> list[int]:
        return [p for p, _ in self.segs if p is not None]

    def layout(self) -> tuple[tuple[int, ...], int]:
        return tuple(w for _, w in self.segs), self.per


Flows = dict[int, _Flow]  # axis -> flow

_UNARY = frozenset({
    "relu", "relu6", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "dropout", "type_as",
    "zeros_like", "ones_like", "full_like", "empty_like", "logical_not", "bitwise_not",
    "alpha_dropout", "feature_dropout", "native_dropout", "clone", "contiguous", "detach",
    "alias", "lift_fresh_copy", "to", "_to_copy", "type", "float", "double", "half",
    "identity", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "reciprocal", "erf",
    "sin", "cos", "clamp", "clamp_min", "clamp_max", "sign", "floor", "ceil", "round",
    "log_sigmoid", "logit", "nan_to_num", "positive",
})
_ELEMENTWISE = frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "truediv", "floordiv", "maximum",
    "minimum", "where", "pow", "addcmul", "addcdiv", "lerp", "fmod", "remainder", "copysign",
    "eq", "ne", "gt", "ge", "lt", "le", "logical_and", "logical_or", "logical_xor",
    "masked_fill", "mod",
})
_POOL = frozenset({
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "interpolate",
    "_adaptive_avg_pool2d",
})
_REDUCE = frozenset({"mean", "sum", "amax", "amin", "var", "std", "prod", "logsumexp", "norm",
                     "max", "min", "argmax", "argmin", "var_mean", "std_mean", "any", "all"})
_AXIS_OPS = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax",
                       "cumsum", "cumprod", "flip", "roll"})
_RESHAPE = frozenset({"flatten", "reshape", "view", "_unsafe_view", "unflatten", "view_as",
                      "reshape_as"})
_MIXING = frozenset({"matmul", "bmm", "mm", "baddbmm", "addmm", "addbmm", "einsum",
                     "scaled_dot_product_attention", "linear", "conv2d", "convolution",
                     "layer_norm", "group_norm", "batch_norm", "instance_norm", "embedding",
                     "_native_batch_norm_legit_no_training", "native_layer_norm"})
_IGNORED = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_guards_fn",
                      "sym_constrain_range_for_size", "_assert_async"})
_MODULE_OPS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Hardtanh, "hardtanh"), (nn.GELU, "gelu"),
    (nn.SiLU, "silu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"),
    (nn.Mish, "mish"), (nn.Softplus, "softplus"), (nn.Dropout, "dropout"),
    (nn.Dropout2d, "dropout"), (nn.Identity, "identity"), (nn.Flatten, "flatten"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.MaxPool2d, "max_pool2d"), (nn.AvgPool2d, "avg_pool2d"), (nn.Softmax, "softmax"),
)
_PRODUCERS = (nn.Linear, nn.Conv2d, PCNLinear, PCNConv2d)
_REASONS = 3  # reasons listed per blocked group


def is_graph_model(model: nn.Module) -> bool:
    """A model whose structure is a torch.fx graph (an imported model), not a zoo class."""
    return isinstance(model, fx.GraphModule)


def op_label(node: fx.Node) -> str:
    """A node's op as users see it: `aten.add.Tensor`, `operator.add`, `torch.flatten`, or the
    module type of a call_module node."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.add.Tensor
    if callable(target):
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", str(target))
        prefix = "operator" if module in ("_operator", "operator") else module.split(".")[0]
        return f"{prefix}.{name}" if prefix else name
    return str(target)


def _base_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The op family of a node: `add` for aten.add.Tensor, operator.add, torch.add, x.add_."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        for cls, name in _MODULE_OPS:
            if isinstance(module, cls):
                return name
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.name().split("::", 1)[-1].split(".", 1)[0]
    elif node.op == "call_method":
        name = str(target)
    else:
        name = getattr(target, "__name__", "")
    if name.startswith("__") and name.endswith("__"):  # operator.__add__
        name = name[2:-2]
    if name.endswith("_") and not name.startswith("_") and name[:-1] in (
            _UNARY | _ELEMENTWISE):  # in-place variants
        name = name[:-1]
    if name.startswith("i") and name[1:] in _ELEMENTWISE:  # operator.iadd
        name = name[1:]
    return name


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` (position `index`, self included) of a call, or its schema default."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        for a in target._schema.arguments:
            if a.name == name and a.has_default_value():
                return a.default_value
    return default


def _ints(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    return None


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape_of(v) for v in value]
    return None


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.shapes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = _shape_of(out)
        return out


def graph_input_shape(model: nn.Module) -> list[int]:
    """The input shape (no batch dim) of a graph model (see the module docstring)."""
    arch = getattr(model, "slimline_arch", None)
    if isinstance(arch, dict) and arch.get("input_shape"):
        return [int(s) for s in arch["input_shape"]]
    shape = getattr(model, "slimline_input_shape", None)
    if shape:
        return [int(s) for s in shape]
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            val = node.meta.get("val") if node.op == "placeholder" else None
            if isinstance(val, torch.Tensor):
                return [int(s) for s in val.shape[1:]]
    raise SpecError("the graph model does not say its input shape; build it with "
                    "core.models.build / core.models.load")


def _shapes(model: fx.GraphModule) -> dict[fx.Node, Any]:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise SpecError(f"the graph has {len(placeholders)} inputs; slimline models take one")
    x = torch.zeros(2, *graph_input_shape(model), dtype=dtype, device=device)
    recorder = _ShapeRecorder(model)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            recorder.run(x)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise SpecError(f"the graph does not run on a zero input of shape {list(x.shape)}, "
                        f"so its unit groups cannot be found: {exc}") from None
    finally:
        model.train(was_training)
    return recorder.shapes


def _desc(node: Any, shapes: dict[fx.Node, Any]) -> str:
    """'name', or tensor 'cls_token' (via 'expand') for a weight reached through shape ops."""
    if not isinstance(node, fx.Node):
        return repr(node)
    source = node
    for _ in range(8):  # follow expand/reshape/... back to a get_attr
        if source.op == "get_attr":
            via = "" if source is node else f" (via {node.name!r})"
            return f"tensor {source.target!r}{via}"
        inputs = [a for a in _nodes_in((source.args, source.kwargs))
                  if isinstance(shapes.get(a), tuple)]
        if source.op not in ("call_function", "call_method") or len(inputs) != 1:
            break
        source = inputs[0]
    return f"{node.name!r}"


class _Walk:
    """One pass over the graph, collecting producers, readers, channel-wise layers, merges and
    blocks (see the module docstring)."""

    def __init__(self, model: fx.GraphModule) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.shapes = _shapes(model)
        self.state: dict[fx.Node, Any] = {}
        self.producers: list[str] = []  # pid -> layer name (graph order)
        self.producer_node: list[fx.Node] = []
        self.parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.readers: list[tuple[int, str, fx.Node, tuple[str | int, ...] | None, int]] = []
        self.channelwise: list[tuple[int, str, tuple[str | int, ...] | None, int]] = []
        self.literals: list[tuple[int, Literal]] = []
        self.untouched: dict[str, str] = {}
        calls: dict[str, int] = {}
        for node in model.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        self.calls = calls

    # ---- union-find and blocks ----
    def find(self, pid: int) -> int:
        while self.parent[pid] != pid:
            self.parent[pid] = self.parent[self.parent[pid]]
            pid = self.parent[pid]
        return pid

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, flows: Iterable[_Flow], reason: str) -> None:
        for flow in flows:
            for pid in flow.pids():
                self.reasons.setdefault(pid, []).append(reason)

    def flows(self, arg: Any) -> Flows:
        state = self.state.get(arg) if isinstance(arg, fx.Node) else None
        return state if isinstance(state, dict) else {}

    def all_flows(self, args: Any) -> Iterator[_Flow]:
        """Every flow of every node inside a (nested) argument structure."""
        for node in _nodes_in(args):
            state = self.state.get(node)
            for flows in (state if isinstance(state, list) else [state]):
                if isinstance(flows, dict):
                    yield from flows.values()

    def shape(self, node: Any) -> tuple[int, ...] | None:
        s = self.shapes.get(node) if isinstance(node, fx.Node) else None
        return s if isinstance(s, tuple) else None

    # ---- the walk ----
    def run(self) -> None:
        for node in self.model.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.state[node] = {}
            elif node.op == "output":
                self.block(self.all_flows(node.args),
                           "the graph output (logits) carries its units")
            else:
                try:
                    self.state[node] = self.call_module(node) if node.op == "call_module" \
                        else self.call_op(node)
                except (AttributeError, IndexError, KeyError, TypeError, ValueError,
                        ZeroDivisionError) as exc:  # arguments a handler did not expect
                    if isinstance(exc, SpecError):
                        raise
                    self.state[node] = self.unknown(node, f"{op_label(node)} (arguments not "
                                                          f"understood: {exc})")

    def call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        module = self.modules.get(name)
        inp = node.args[0] if node.args else None
        flows = self.flows(inp)
        in_shape = self.shape(inp)
        if module is None:
            return self.unknown(node, f"module {name!r}")
        if _base_name(node, self.modules):
            return self.call_op(node)
        if len(node.args) != 1 or node.kwargs or in_shape is None:
            return self.unknown(node, f"{type(module).__name__} {name!r} called with "
                                      f"{len(node.args)} arguments")
        if self.calls[name] > 1:
            self.untouched[name] = f"called {self.calls[name]} times (shared weights)"
            self.block(flows.values(), f"{name!r} is called {self.calls[name]} times")
            return {}
        if isinstance(module, nn.BatchNorm2d):
            return self.channelwise_layer(name, flows, in_shape, "BatchNorm2d")
        if isinstance(module, nn.LayerNorm):
            normed = range(len(in_shape) - len(module.normalized_shape), len(in_shape))
            hit = [f for a, f in flows.items() if a in normed]
            self.block(hit, f"LayerNorm {name!r} normalises over its units (every unit's "
                            "value depends on the others)")
            return dict(flows)  # blocked flows go on: what they meet joins the group
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            if module.groups == module.in_channels == module.out_channels:
                return self.channelwise_layer(name, flows, in_shape, "depthwise conv")
            kind = conv_kind(module)
            reason = f"{kind} {name!r} reads its units in groups"
            self.untouched[name] = (f"{kind}, {module.in_channels} -> {module.out_channels} "
                                    "channels: its units are not pruned")
            self.block(flows.values(), reason)
            return {}
        if isinstance(module, _PRODUCERS):
            return self.weight_layer(node, name, module, flows, in_shape)
        if as_layer(module) is not None:
            self.untouched[name] = (f"a {type(module).__name__}: unit surgery handles "
                                    "Linear/Conv2d/PCN layers only")
            self.block(flows.values(), f"{name!r} is a {type(module).__name__}, whose input "
                                       "units cannot be pruned")
            return {}
        return self.unknown(node, f"{type(module).__name__} {name!r}")

    def weight_layer(self, node: fx.Node, name: str, module: nn.Module, flows: Flows,
                     in_shape: tuple[int, ...]) -> Flows:
        conv = isinstance(module, (nn.Conv2d, PCNConv2d))
        axis = 1 if conv else len(in_shape) - 1
        out: Flows = {}
        for a, flow in flows.items():
            if a == axis:
                if conv and flow.per != 1:
                    self.block([flow], f"conv {name!r} reads its units merged with other axes")
                else:
                    self.read(flow, name, node.args[0])
            elif conv:
                self.block([flow], f"conv {name!r} mixes the axis its units are on")
            else:
                out[a] = flow  # a Linear maps only the last axis
        out_shape = self.shape(node)
        pid = len(self.producers)
        self.producers.append(name)
        self.producer_node.append(node)
        self.parent.append(pid)
        units = int(as_layer(module).out_dim)  # type: ignore[union-attr]
        out_axis = 1 if conv else (len(out_shape) - 1 if out_shape else axis)
        out[out_axis] = _Flow(((pid, units),))
        return out

    def read(self, flow: _Flow, layer: str, tensor: Any) -> None:
        for i, (pid, _) in enumerate(flow.segs):
            if pid is not None:
                self.readers.append((pid, layer, tensor, self.before(flow, i), flow.per))

    def before(self, flow: _Flow, index: int) -> tuple[str | int, ...] | None:
        """Widths of the segments in front of segment `index` (None: the flow is one segment)."""
        if len(flow.segs) == 1:
            return None
        return tuple(self.producers[p] if p is not None else w for p, w in flow.segs[:index])

    def channelwise_layer(self, name: str, flows: Flows, in_shape: tuple[int, ...],
                          kind: str) -> Flows:
        if len(in_shape) != 4:
            self.block(flows.values(), f"{kind} {name!r} on a {len(in_shape)}-d input")
            return {}
        out: Flows = {}
        for a, flow in flows.items():
            if a != 1 or flow.per != 1:
                self.block([flow], f"{kind} {name!r} does not read its units on the channel axis")
                continue
            for i, (pid, _) in enumerate(flow.segs):
                if pid is not None:
                    self.channelwise.append((pid, name, self.before(flow, i), flow.per))
            out[a] = flow
        if kind != "BatchNorm2d" and not any(f.pids() for f in out.values()):
            self.untouched[name] = (f"{kind} on channels no prunable layer produces: not "
                                    "pruned")
        return out

    def unknown(self, node: fx.Node, what: str) -> Any:
        flows = list(self.all_flows((node.args, node.kwargs)))
        self.block(flows, f"{what} ({node.name!r}) reads its units; slimline does not prune "
                          "through it")
        return {}

    def call_op(self, node: fx.Node) -> Any:
        name = _base_name(node, self.modules)
        if name in _IGNORED:
            return {}
        if name == "getitem" and isinstance(node.args[0], fx.Node) and \
                isinstance(self.state.get(node.args[0]), list):
            items = self.state[node.args[0]]
            index = node.args[1]
            return items[index] if isinstance(index, int) and -len(items) <= index < len(items) \
                else {}
        tensors = [a for a in _nodes_in((node.args, node.kwargs))
                   if self.shape(a) is not None or isinstance(self.state.get(a), list)]
        if not any(self.flows(t) or isinstance(self.state.get(t), list) for t in tensors):
            return [{} for _ in self.shapes.get(node) or []] \
                if isinstance(self.shapes.get(node), list) else {}
        label = op_label(node)
        if name in _UNARY or name in _ELEMENTWISE:
            return self.elementwise(node, label, unary=name in _UNARY)
        if name in _POOL:
            return self.pool(node, label)
        if name in _RESHAPE:
            return self.reshape(node, label)
        handler = {"permute": self.permute, "transpose": self.transpose, "t": self.transpose,
                   "swapaxes": self.transpose, "movedim": self.permute,
                   "unsqueeze": self.unsqueeze, "squeeze": self.squeeze,
                   "select": self.select, "slice": self.slice, "narrow": self.slice,
                   "getitem": self.getitem, "cat": self.cat, "concat": self.cat,
                   "concatenate": self.cat, "stack": self.stack, "expand": self.expand,
                   "expand_as": self.expand, "repeat": self.repeat,
                   "split": self.split, "split_with_sizes": self.split, "chunk": self.split,
                   "unbind": self.split, "tensor_split": self.split,
                   "sym_size": self.size, "size": self.size, "dim": self.size,
                   "constant_pad_nd": self.pad, "pad": self.pad}.get(name)
        if handler is not None:
            return handler(node, label)
        if name in _REDUCE:
            return self.reduce(node, label)
        if name in _AXIS_OPS:
            return self.axis_op(node, label)
        if name in _MIXING:
            flows = list(self.all_flows((node.args, node.kwargs)))
            self.block(flows, f"{label} ({node.name!r}) mixes its units with other values")
            return {}
        return self.unknown(node, label)

    # ---- op families ----
    def elementwise(self, node: fx.Node, label: str, unary: bool = False) -> Flows:
        """Broadcasting ops: the flows they combine on an axis are the same units (one group);
        a unary op (`x.type_as(y)`, `zeros_like(x)`) follows its first argument only."""
        out_shape = self.shape(node)
        if out_shape is None:
            return self.unknown(node, label)
        n = len(out_shape)
        operands = [a for a in _nodes_in((node.args[:1], {}) if unary else
                                         (node.args, node.kwargs))
                    if self.shape(a) is not None]
        out: Flows = {}
        for axis in range(n):
            found: list[_Flow] = []
            plain: list[fx.Node] = []
            for op in operands:
                s = self.shape(op)
                assert s is not None
                a = axis - (n - len(s))
                if a < 0:
                    continue
                flow = self.flows(op).get(a)
                if flow is not None:
                    found.append(flow)
                elif s[a] != 1:
                    plain.append(op)
            if not found:
                continue
            if plain:
                self.block(found, f"{label} ({node.name!r}) combines its units with "
                                  f"{_desc(plain[0], self.shapes)}, which is not pruned with them")
            if any(f.layout() != found[0].layout() for f in found):
                self.block(found, f"{label} ({node.name!r}) combines tensors whose units are "
                                  "laid out differently")
                continue
            merged = list(found[0].segs)
            for flow in found[1:]:  # the same units: one group
                for i, ((p, w), (q, _)) in enumerate(zip(merged, flow.segs, strict=True)):
                    if p is not None and q is not None:
                        self.union(p, q)
                    elif p is not None or q is not None:
                        self.block([_Flow(((p if p is not None else q, w),))],
                                   f"{label} ({node.name!r}) combines its units with values "
                                   "no prunable layer produces")
                        merged[i] = (None, w)
            out[axis] = _Flow(tuple(merged), found[0].per)
        return out

    def pool(self, node: fx.Node, label: str) -> Any:
        inp = node.args[0]
        flows, shape = self.flows(inp), self.shape(inp)
        if shape is None or len(shape) != 4:
            return self.unknown(node, label)
        out = {a: f for a, f in flows.items() if a == 1}
        self.block([f for a, f in flows.items() if a != 1],
                   f"{label} ({node.name!r}) pools over the axis its units are on")
        if isinstance(self.shapes.get(node), list):  # (values, indices)
            return [out, {}]
        return out

    def reshape(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        flows, s_in, s_out = self.flows(inp), self.shape(inp), self.shape(node)
        if s_in is None or s_out is None:
            return self.unknown(node, label)
        out: Flows = {}
        for a, flow in flows.items():
            mapped = _map_axis(s_in, s_out, a)
            if mapped is None:
                self.block([flow], f"{label} ({node.name!r}) splits the axis its units are on "
                                   "or merges it with the axes before it (e.g. into attention "
                                   "heads)")
                continue
            b, merge = mapped
            out[b] = _Flow(flow.segs, flow.per * merge)
            if _base_name(node, self.modules) == "unflatten":
                dim = _arg(node, 1, "dim")
                sizes = _arg(node, 2, "sizes")
                if isinstance(dim, int) and isinstance(sizes, (list, tuple)) and \
                        0 <= b - dim % len(s_in) < len(sizes):
                    self.literal(node, 2, b - dim % len(s_in), out[b])
            elif node.op == "call_method" and len(node.args) > 2:  # x.view(-1, 64)
                self.literal(node, 1 + b, -1, out[b])
            elif len(node.args) > 1:
                self.literal(node, 1, b, out[b])
        return out

    def literal(self, node: fx.Node, index: int, entry: int, flow: _Flow) -> None:
        """Record a literal size (not -1) at `node.args[index][entry]` (entry -1: the argument
        itself) that counts the units of `flow`, so pruning can lower it."""
        value = node.args[index] if index < len(node.args) else None
        if entry >= 0:
            value = value[entry] if isinstance(value, (list, tuple)) and \
                entry < len(value) else None
        if isinstance(value, int) and not isinstance(value, bool) and value != -1:
            for pid in flow.pids():
                self.literals.append((pid, (node.name, index, entry, flow.per)))

    def permute(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        shape = self.shape(inp)
        if shape is None:
            return self.unknown(node, label)
        n = len(shape)
        if _base_name(node, self.modules) == "movedim":
            src, dst = _ints(_arg(node, 1, "source")), _ints(_arg(node, 2, "destination"))
            if src is None or dst is None:
                return self.unknown(node, label)
            order = [d for d in range(n) if d not in [s % n for s in src]]
            for d, s in sorted(zip([x % n for x in dst], [x % n for x in src], strict=True)):
                order.insert(d, s)
        else:
            dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
            order_ = _ints(list(dims) if isinstance(dims, (list, tuple)) else dims)
            if order_ is None or len(order_) != n:
                return self.unknown(node, label)
            order = [d % n for d in order_]
        return {order.index(a): f for a, f in self.flows(inp).items()}

    def transpose(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        shape = self.shape(inp)
        if shape is None:
            return self.unknown(node, label)
        n = len(shape)
        if _base_name(node, self.modules) == "t":
            d0, d1 = 0, max(n - 1, 0)
        else:
            d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
            if not isinstance(d0, int) or not isinstance(d1, int):
                return self.unknown(node, label)
            d0, d1 = d0 % n, d1 % n
        swap = {d0: d1, d1: d0}
        return {swap.get(a, a): f for a, f in self.flows(inp).items()}

    def unsqueeze(self, node: fx.Node, label: str) -> Flows:
        inp, out_shape = node.args[0], self.shape(node)
        dim = _arg(node, 1, "dim")
        if out_shape is None or not isinstance(dim, int):
            return self.unknown(node, label)
        dim %= len(out_shape)
        return {(a + 1 if a >= dim else a): f for a, f in self.flows(inp).items()}

    def squeeze(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        shape = self.shape(inp)
        if shape is None:
            return self.unknown(node, label)
        n = len(shape)
        dims = _ints(_arg(node, 1, "dim"))
        gone = sorted({d % n for d in dims if shape[d % n] == 1} if dims is not None
                      else {d for d in range(n) if shape[d] == 1})
        out: Flows = {}
        for a, f in self.flows(inp).items():
            if a in gone:
                continue
            out[a - sum(1 for d in gone if d < a)] = f
        return out

    def select(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        shape = self.shape(inp)
        dim = _arg(node, 1, "dim")
        if shape is None or not isinstance(dim, int):
            return self.unknown(node, label)
        dim %= len(shape)
        flows = self.flows(inp)
        if dim in flows:
            self.block([flows[dim]], f"{label} ({node.name!r}) picks one of its units")
        return {(a - 1 if a > dim else a): f for a, f in flows.items() if a != dim}

    def slice(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        s_in, s_out = self.shape(inp), self.shape(node)
        dim = _arg(node, 1, "dim", 0)
        if s_in is None or s_out is None or not isinstance(dim, int):
            return self.unknown(node, label)
        dim %= len(s_in)
        flows = dict(self.flows(inp))
        if dim in flows and s_out[dim] != s_in[dim]:
            self.block([flows.pop(dim)], f"{label} ({node.name!r}) slices the axis its units "
                                         "are on")
        return flows

    def getitem(self, node: fx.Node, label: str) -> Flows:
        inp, index = node.args[0], node.args[1]
        shape = self.shape(inp)
        if shape is None:
            return self.unknown(node, label)
        items = list(index) if isinstance(index, tuple) else [index]
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            return self.unknown(node, label)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            fill = len(shape) - sum(1 for i in items if i is not None and i is not Ellipsis)
            items = items[:at] + [slice(None)] * fill + items[at + 1:]
        flows = self.flows(inp)
        out: Flows = {}
        a_in = a_out = 0
        for item in items:
            if item is None:
                a_out += 1
                continue
            flow = flows.get(a_in)
            if isinstance(item, int):
                if flow is not None:
                    self.block([flow], f"{label} ({node.name!r}) picks one of its units")
            elif flow is not None:
                if item != slice(None) and range(shape[a_in])[item] != range(shape[a_in]):
                    self.block([flow], f"{label} ({node.name!r}) slices the axis its units "
                                       "are on")
                else:
                    out[a_out] = flow
                a_out += 1
            else:
                a_out += 1
            a_in += 1
        for a in range(a_in, len(shape)):
            if a in flows:
                out[a_out + a - a_in] = flows[a]
        return out

    def cat(self, node: fx.Node, label: str) -> Flows:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        out_shape = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or \
                out_shape is None or not all(self.shape(t) for t in tensors):
            return self.unknown(node, label)
        dim %= len(out_shape)
        per_axis: dict[int, list[_Flow | None]] = {}
        for t in tensors:
            for a in self.flows(t):
                per_axis.setdefault(a, [])
        out: Flows = {}
        for a in sorted(per_axis):
            parts = [self.flows(t).get(a) for t in tensors]
            found = [f for f in parts if f is not None]
            if a != dim:  # every input must carry the same units on this axis
                plain = [t for t, f in zip(tensors, parts, strict=True) if f is None]
                if any(f.layout() != found[0].layout() for f in found):
                    self.block(found, f"{label} ({node.name!r}) concatenates units laid out "
                                      "differently along another axis")
                    continue
                if plain:
                    self.block(found, f"{label} ({node.name!r}) concatenates its units with "
                                      f"{_desc(plain[0], self.shapes)} along another axis "
                                      "(values that are not pruned with them)")
                for f in found[1:]:
                    for (p, _), (q, _) in zip(found[0].segs, f.segs, strict=True):
                        if p is not None and q is not None:
                            self.union(p, q)
                out[a] = found[0]
                continue
            per = found[0].per
            segs: list[tuple[int | None, int]] = []
            ok = all(f.per == per for f in found)
            for t, f in zip(tensors, parts, strict=True):
                if f is not None:
                    segs += list(f.segs)
                else:
                    width = self.shape(t)[a]  # type: ignore[index]
                    ok = ok and width % per == 0
                    segs.append((None, width // per))
            if not ok:
                self.block(found, f"{label} ({node.name!r}) concatenates unit axes of "
                                  "different layouts")
                continue
            out[a] = _Flow(tuple(segs), per)
        return out

    def stack(self, node: fx.Node, label: str) -> Flows:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        out_shape = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or \
                out_shape is None:
            return self.unknown(node, label)
        dim %= len(out_shape)
        flows = list(self.all_flows(tensors))
        layouts = [{a: f.layout() for a, f in self.flows(t).items()} for t in tensors]
        if any(lay != layouts[0] for lay in layouts):
            self.block(flows, f"{label} ({node.name!r}) stacks its units with other values")
            return {}
        first = self.flows(tensors[0])
        for t in tensors[1:]:
            for a, f in self.flows(t).items():
                for (p, _), (q, _) in zip(first[a].segs, f.segs, strict=True):
                    if p is not None and q is not None:
                        self.union(p, q)
        return {(a + 1 if a >= dim else a): f for a, f in first.items()}

    def expand(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        s_in, s_out = self.shape(inp), self.shape(node)
        if s_in is None or s_out is None:
            return self.unknown(node, label)
        shift = len(s_out) - len(s_in)
        out: Flows = {}
        name = _base_name(node, self.modules)
        for a, f in self.flows(inp).items():
            if s_out[a + shift] != s_in[a]:
                self.block([f], f"{label} ({node.name!r}) repeats its units")
            else:
                out[a + shift] = f
                if name == "expand" and node.op == "call_method" and len(node.args) > 2:
                    self.literal(node, 1 + a + shift, -1, f)
                elif name == "expand":
                    self.literal(node, 1, a + shift, f)
        return out

    def repeat(self, node: fx.Node, label: str) -> Flows:
        return self.expand(node, label)

    def split(self, node: fx.Node, label: str) -> Any:
        inp = node.args[0]
        shape, outs = self.shape(inp), self.shapes.get(node)
        name = _base_name(node, self.modules)
        default = 0
        dim = _arg(node, 1 if name == "unbind" else 2, "dim", default)
        if shape is None or not isinstance(outs, list) or not isinstance(dim, int):
            return self.unknown(node, label)
        dim %= len(shape)
        flows = dict(self.flows(inp))
        if dim in flows:
            self.block([flows.pop(dim)], f"{label} ({node.name!r}) splits the axis its units "
                                         "are on")
        if name == "unbind":
            flows = {(a - 1 if a > dim else a): f for a, f in flows.items()}
        return [dict(flows) for _ in outs]

    def size(self, node: fx.Node, label: str) -> Any:
        inp = node.args[0]
        shape = self.shape(inp)
        dim = _arg(node, 1, "dim")
        flows = self.flows(inp)
        if shape is not None and isinstance(dim, int):
            hit = [f for a, f in flows.items() if a == dim % len(shape)]
        else:
            hit = list(flows.values())
        self.block(hit, f"{label} ({node.name!r}) reads the number of its units")
        return None

    def pad(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        shape = self.shape(inp)
        pads = _ints(_arg(node, 1, "pad"))
        if shape is None or pads is None:
            return self.unknown(node, label)
        touched = {len(shape) - 1 - i // 2 for i, p in enumerate(pads) if p}
        return self.block_axes(inp, touched, f"{label} ({node.name!r}) pads the axis its "
                                             "units are on")

    def reduce(self, node: fx.Node, label: str) -> Any:
        inp = node.args[0]
        shape = self.shape(inp)
        if shape is None:
            return self.unknown(node, label)
        n = len(shape)
        dims = _ints(_arg(node, 1, "dim"))
        keepdim = bool(_arg(node, 2, "keepdim", False))
        flows = self.flows(inp)
        reduced = set(range(n)) if not dims else {d % n for d in dims}
        self.block([f for a, f in flows.items() if a in reduced],
                   f"{label} ({node.name!r}) reduces over its units")
        out = {(a if keepdim else a - sum(1 for d in reduced if d < a)): f
               for a, f in flows.items() if a not in reduced}
        if isinstance(self.shapes.get(node), list):  # (values, indices)
            return [out, {}]
        return out

    def axis_op(self, node: fx.Node, label: str) -> Flows:
        inp = node.args[0]
        shape = self.shape(inp)
        dims = _ints(_arg(node, 1, "dim"))
        if shape is None or dims is None:
            return self.unknown(node, label)
        along = {d % len(shape) for d in dims}
        return self.block_axes(inp, along, f"{label} ({node.name!r}) mixes its units")

    def block_axes(self, inp: Any, axes: set[int], reason: str) -> Flows:
        """`inp`'s flows with those on `axes` blocked (for `reason`) and dropped."""
        flows = dict(self.flows(inp))
        for a in sorted(axes & set(flows)):
            self.block([flows.pop(a)], reason)
        return flows

    # ---- result ----
    def result(self) -> GraphDeps:
        members: dict[int, list[int]] = {}
        for pid in range(len(self.producers)):
            members.setdefault(self.find(pid), []).append(pid)
        groups: dict[str, UnitGroup] = {}
        blocked: dict[str, tuple[UnitGroup, str]] = {}
        for root, pids in members.items():
            group = self.group(root, pids)
            reasons = list(dict.fromkeys(r for p in pids for r in self.reasons.get(p, [])))
            reasons += self.read_twice(group)
            if not group.reader_layers and not reasons:
                reasons = ["no layer reads its units"]
            if reasons:
                more = f" (and {len(reasons) - _REASONS} more)" if len(reasons) > _REASONS else ""
                blocked[group.name] = (group, "; ".join(reasons[:_REASONS]) + more)
            else:
                groups[group.name] = group
        return GraphDeps(groups, blocked, dict(self.untouched))

    def read_twice(self, group: UnitGroup) -> list[str]:
        """Reasons for layers that read the group's units twice (cat of the same units)."""
        layers = [name for name, _, _ in group.segments]
        return [f"{name!r} reads its units twice (a concatenation of the same units)"
                for name in dict.fromkeys(layers)
                if layers.count(name) > 1 or any(
                    b in group.producers for b in (group.segment(name) or ((), 1))[0])]

    def group(self, root: int, pids: list[int]) -> UnitGroup:
        producers = [self.producers[p] for p in sorted(pids)]
        norms: list[str | None] = []
        for p in sorted(pids):
            users = list(self.producer_node[p].users)
            bn = users[0] if len(users) == 1 and users[0].op == "call_module" else None
            module = self.modules.get(str(bn.target)) if bn is not None else None
            norms.append(str(bn.target) if isinstance(module, nn.BatchNorm2d) and
                         self.calls.get(str(bn.target)) == 1 else None)
        mine = set(pids)
        tensors: dict[Any, list[str]] = {}
        segments: list[Segment] = []
        for pid, layer, tensor, before, per in self.readers:
            if pid in mine:
                tensors.setdefault(tensor, [])
                if layer not in tensors[tensor]:
                    tensors[tensor].append(layer)
                if before is not None:
                    segments.append((layer, before, per))
        channelwise: list[str] = []
        for pid, layer, before, per in self.channelwise:
            if pid in mine and layer not in norms and layer not in channelwise:
                channelwise.append(layer)
                if before is not None:
                    segments.append((layer, before, per))
        literals = tuple(dict.fromkeys(lit for pid, lit in self.literals if pid in mine))
        return UnitGroup(name=producers[0], producers=tuple(producers), norms=tuple(norms),
                         readers=tuple(tuple(t) for t in tensors.values()),
                         channelwise=tuple(channelwise), segments=tuple(segments),
                         literals=literals)


def _nodes_in(args: Any) -> Iterator[fx.Node]:
    if isinstance(args, fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _nodes_in(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _nodes_in(a)
    elif isinstance(args, slice):
        yield from _nodes_in((args.start, args.stop, args.step))


def _map_axis(s_in: Sequence[int], s_out: Sequence[int], axis: int) -> tuple[int, int] | None:
    """Where axis `axis` of shape `s_in` lands in `s_out` after a reshape: (output axis, m) when
    it keeps its place as the outermost factor of an output axis that merges it with the m
    entries of the axes after it (m = 1: unchanged); None when it is split or merged with the
    axes before it."""
    outer = 1
    for s in s_in[:axis]:
        outer *= s
    width = s_in[axis]
    prefix = 1
    candidates = []
    for b, s in enumerate(s_out):
        if prefix == outer:
            candidates.append(b)
        prefix *= s
    for b in candidates:
        size = s_out[b]
        if size == 1 and width != 1:
            continue
        if size % width:
            return None
        merge = size // width
        inner = 1
        for s in s_in[axis + 1:]:
            if inner == merge:
                break
            inner *= s
        return (b, merge) if inner == merge else None
    return None


def graph_deps(model: nn.Module) -> GraphDeps:
    """The dependency graph of a graph model (see the module docstring)."""
    if not isinstance(model, fx.GraphModule):
        raise SpecError(f"{type(model).__name__} is not a graph model")
    walk = _Walk(model)
    walk.run()
    return walk.result()


def graph_unit_groups(model: nn.Module) -> dict[str, UnitGroup]:
    """The prunable unit groups of a graph model, by name (its first producer), graph order."""
    return graph_deps(model).groups


def graph_untouched(model: nn.Module) -> dict[str, str]:
    """{group or layer: reason} for the units of a graph model no method prunes: the blocked
    groups (named after their first producer) and weight layers in no group."""
    deps = graph_deps(model)
    return {**{name: reason for name, (_, reason) in deps.blocked.items()}, **deps.untouched}


__all__ = ["GraphDeps", "Literal", "Segment", "UnitGroup", "graph_deps", "graph_input_shape",
           "graph_unit_groups", "graph_untouched", "is_graph_model", "op_label"]
