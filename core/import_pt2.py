"""torch.export programs -> slimline graph IR (`core.graph`): the FX pass of model import.

`graph_from_program(program) -> (ir, tensors)` reads a loaded `torch.export.ExportedProgram`
(the inspector checks and loads the `.pt2` archive; this module never touches files):

* the graph signature tells parameters, buffers and constants from the one floating user input;
  the program must return one tensor, the logits `(N, classes)`, and mutate nothing (a BatchNorm
  exported in train mode updates its buffers: export after `model.eval()`);
* every op must be on `core.graph_ops.ALLOWED_OPS`, else SpecError naming the ops;
* `aten.conv2d` / `convolution` (2-D), `linear`, `batch_norm` (and
  `_native_batch_norm_legit_no_training` read through `getitem 0`), `layer_norm` (and
  `native_layer_norm`) whose weights are plain parameters used by that call alone become real
  modules named after the weights' owner (`layer1.0.conv1.weight` -> module `layer1.0.conv1`);
  any other parameter, buffer or constant becomes an IR tensor read by a `get_attr` node and the
  call stays an aten call (a shared weight, a computed weight, ...);
* the input shape is the user input's shape without the batch dimension. A dynamic batch
  (`dynamic_shapes={'x': {0: Dim('batch')}}`) needs nothing else: size arithmetic stays in the
  graph (`aten.sym_size.int`, `operator.mul`). A static batch B baked into `view`/`reshape`/
  `expand` sizes is rewritten to the run-time batch where the size is at dim 0 of a tensor whose
  dim 0 is the batch; the result is verified (below) and refused with a re-export hint when the
  batch is baked in elsewhere (e.g. `nn.MultiheadAttention`'s `B * heads`).

The converted module is verified against the program (`verify=True`): equal outputs on a seeded
random batch, and per-sample equal outputs at a second batch size (the rows of a batch of
`2B + 1` that repeat the first batch).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

from core.errors import SpecError
from core.graph import GRAPH_FORMAT, build_graph_module, encode_arg, validate_graph
from core.graph_ops import ALLOWED_OPS, DTYPE_NAMES, op_name

REEXPORT = ("torch.export.export(model.eval(), (x,), dynamic_shapes={'x': {0: "
            "torch.export.Dim('batch')}})")

# nodes torch.export adds for run-time checks; dropped when nothing reads them
_ASSERTS = frozenset({
    "aten._assert_scalar.default", "aten._assert_tensor_metadata.default",
    "aten.sym_constrain_range.default", "aten.sym_constrain_range_for_size.default",
    "aten._assert_async.msg", "aten._assert_async.default",
})
# keyword arguments of no meaning to slimline (the model runs where slimline puts it)
_DROPPED_KWARGS = frozenset({"device", "layout", "pin_memory", "memory_format"})
# ops whose size-list argument (index 1) may carry a baked-in batch size
_SIZE_OPS = frozenset({"aten.view.default", "aten._unsafe_view.default",
                       "aten.reshape.default", "aten.expand.default"})
_WEIGHT_OPS = frozenset({
    "aten.conv2d.default", "aten.conv2d.padding", "aten.convolution.default",
    "aten.linear.default", "aten.batch_norm.default",
    "aten._native_batch_norm_legit_no_training.default", "aten.layer_norm.default",
    "aten.native_layer_norm.default", "aten.addmm.default", "aten.mm.default",
})
_COPY_OPS = frozenset({"aten.clone.default", "aten._to_copy.default"})
_TUPLE_OPS = frozenset({"aten._native_batch_norm_legit_no_training.default",
                        "aten.native_layer_norm.default"})


def _bind(node: fx.Node) -> dict[str, Any]:
    """The arguments of an aten call by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _pair(value: Any) -> list[int]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return values * 2 if len(values) == 1 else values


def _ndim(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


class _Converter:
    def __init__(self, program: ExportedProgram):
        self.program = program
        self.graph = program.graph
        # placeholder name -> (kind, state name, value)
        self.state: dict[str, tuple[InputKind, str, torch.Tensor]] = {}
        self.user_input: fx.Node | None = None
        self.output: fx.Node | None = None
        self.modules: dict[str, dict[str, Any]] = {}  # IR module specs
        self.tensors: dict[str, torch.Tensor] = {}  # the state dict of the built module
        self.tensor_specs: dict[str, dict[str, Any]] = {}
        self.module_of: dict[fx.Node, str] = {}  # weight call -> module name
        self.alias: dict[fx.Node, fx.Node] = {}  # getitem(module call, 0) -> module call
        self.absorbed: set[fx.Node] = set()  # placeholders that became module state
        self.module_input: dict[fx.Node, Any] = {}  # weight call -> what the module reads
        self.folded: set[fx.Node] = set()  # nodes a module replaces (t(w) of a decomposed linear)
        self.names: set[str] = {n.name for n in self.graph.nodes}  # IR node names in use

    # ---- the signature ----

    def read_signature(self) -> None:
        sig = self.program.graph_signature
        placeholders = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        state_dict, constants = self.program.state_dict, self.program.constants
        users: list[fx.Node] = []
        for spec in sig.input_specs:
            arg = spec.arg
            if spec.kind == InputKind.USER_INPUT:
                if not isinstance(arg, TensorArgument):
                    raise SpecError(f"the exported model takes a non-tensor input {arg}; export "
                                    "it with one floating input tensor x")
                users.append(placeholders[arg.name])
                continue
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER,
                                 InputKind.CONSTANT_TENSOR) or not isinstance(arg, TensorArgument):
                raise SpecError(f"the exported program has an input of kind {spec.kind.name} "
                                f"({spec.target}); custom objects and effect tokens are not "
                                "supported")
            target = str(spec.target)
            value = state_dict.get(target) if target in state_dict else constants.get(target)
            if not isinstance(value, torch.Tensor):
                raise SpecError(f"the exported program has no tensor for {spec.kind.name.lower()} "
                                f"{target!r}; save it with torch.export.save")
            self.state[arg.name] = (spec.kind, target, value.detach())
        if len(users) != 1:
            raise SpecError(f"the exported model takes {len(users)} input tensors; slimline "
                            "imports classifiers with exactly one input x (N, ...)")
        self.user_input = users[0]
        val = self.user_input.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dim() < 2:
            raise SpecError(f"the model's input {self.user_input.name!r} must be a floating tensor "
                            f"(N, ...) with a batch dimension, got {val!r}")
        outputs = list(sig.output_specs)
        mutations = [o for o in outputs if o.kind != OutputKind.USER_OUTPUT]
        if mutations:
            kinds = sorted({o.kind.name for o in mutations})
            targets = [o.target for o in mutations][:5]
            raise SpecError(f"the exported program mutates state ({', '.join(kinds)}: {targets}); "
                            "a BatchNorm exported in train mode updates its running stats: call "
                            "model.eval() before torch.export.export")
        if len(outputs) != 1 or not isinstance(outputs[0].arg, TensorArgument):
            raise SpecError(f"the exported model returns {len(outputs)} values; slimline imports "
                            "classifiers that return one tensor of logits (N, classes)")
        out_nodes = [n for n in self.graph.nodes if n.op == "output"]
        found = {n.name: n for n in self.graph.nodes}
        self.output = found.get(outputs[0].arg.name)
        if self.output is None or not out_nodes:
            raise SpecError("the exported program has no output node")

    # ---- ops ----

    def check_ops(self) -> None:
        unsupported: dict[str, str] = {}
        for node in self.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op != "call_function":
                raise SpecError(f"the exported graph has a {node.op} node {node.name!r} "
                                "(control flow such as torch.cond is not supported); export a "
                                "model without data-dependent control flow")
            name = op_name(node.target)
            if name in _ASSERTS or name in ALLOWED_OPS:
                continue
            namespace = getattr(node.target, "namespace", None)
            schema = getattr(node.target, "_schema", None)
            if namespace and namespace != "aten" and schema is not None:
                unsupported[name] = schema.name  # "my::foo"
            else:
                unsupported[name] = name
        if unsupported:
            listed = ", ".join(sorted(set(unsupported.values())))
            custom = any("::" in v for v in unsupported.values())
            raise SpecError(f"op {listed} is not supported; slimline imports graphs of the ops "
                            "in core.graph_ops.ALLOWED_OPS (convolutions, linears, norms, "
                            "activations, pooling, shape ops)"
                            + ("; custom ops are never imported" if custom else "")
                            + ": rewrite the model with standard layers and export it again")

    # ---- weight calls -> modules ----

    def _param(self, arg: Any, kinds: tuple[InputKind, ...], owner: str | None,
               suffix: str) -> tuple[bool, str | None]:
        """(ok, owner) for a weight-call argument: None is fine, else a placeholder of `kinds`
        named `<owner>.<suffix>`, read by this call only."""
        if arg is None:
            return True, owner
        if not isinstance(arg, fx.Node) or arg.name not in self.state or len(arg.users) != 1:
            return False, owner
        kind, target, value = self.state[arg.name]
        if kind not in kinds or not value.is_floating_point():
            return False, owner
        prefix, _, leaf = target.rpartition(".")
        if leaf != suffix or (owner is not None and prefix != owner):
            return False, owner
        return True, prefix

    def _transposed_weight(self, node: Any) -> fx.Node | None:
        """`w` when `node` is `t(w)` / `permute(w, [1, 0])` of a 2-D `w`, read only by one call
        (decomposed linears: `addmm(bias, x, t(w))`)."""
        if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.users) != 1:
            return None
        name = op_name(node.target)
        if name == "aten.t.default" or (name == "aten.permute.default"
                                        and list(node.args[1]) == [1, 0]):
            weight = node.args[0]
            return weight if isinstance(weight, fx.Node) and _ndim(weight) == 2 else None
        return None

    def _module_for(self, node: fx.Node
                    ) -> tuple[dict[str, Any], dict[str, Any], Any, list[fx.Node]] | None:
        """(spec, {attribute: placeholder}, input, nodes folded into it) when `node` can be a
        module, else None."""
        name = op_name(node.target)
        a = _bind(node)
        P, B = (InputKind.PARAMETER,), (InputKind.BUFFER,)
        attrs: dict[str, Any] = {}
        source = a.get("input")
        folded: list[fx.Node] = []
        if name in ("aten.addmm.default", "aten.mm.default"):
            transposed = a["mat2"]
            weight = self._transposed_weight(transposed)
            bias = a.get("self")
            if weight is None or _ndim(a["mat1"]) != 2 or (bias is not None and _ndim(bias) != 1) \
                    or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
                return None
            attrs = {"weight": weight, "bias": bias}
            source, folded = a["mat1"], [transposed]
            shape = weight.meta["val"].shape
            spec = {"type": "Linear", "in_features": int(shape[1]),
                    "out_features": int(shape[0]), "bias": bias is not None}
        elif name in ("aten.conv2d.default", "aten.conv2d.padding", "aten.convolution.default"):
            if name == "aten.convolution.default" and (a["transposed"] or
                                                       any(_pair(a["output_padding"]))):
                return None
            weight = a["weight"]
            if _ndim(a["input"]) != 4 or _ndim(weight) != 4:
                return None
            attrs = {"weight": weight, "bias": a["bias"]}
            shape = weight.meta["val"].shape
            padding = a["padding"]
            spec = {"type": "Conv2d", "in_channels": int(shape[1]) * int(a["groups"]),
                    "out_channels": int(shape[0]), "kernel_size": [int(shape[2]), int(shape[3])],
                    "stride": _pair(a["stride"]),
                    "padding": padding if isinstance(padding, str) else _pair(padding),
                    "dilation": _pair(a["dilation"]), "groups": int(a["groups"]),
                    "bias": a["bias"] is not None}
        elif name == "aten.linear.default":
            weight = a["weight"]
            if _ndim(weight) != 2:
                return None
            attrs = {"weight": weight, "bias": a["bias"]}
            shape = weight.meta["val"].shape
            spec = {"type": "Linear", "in_features": int(shape[1]),
                    "out_features": int(shape[0]), "bias": a["bias"] is not None}
        elif name in ("aten.batch_norm.default",
                      "aten._native_batch_norm_legit_no_training.default"):
            training = a.get("training", False)
            stats = a["running_mean"] is not None
            if (a["weight"] is None) != (a["bias"] is None) or stats == bool(training) \
                    or (a["running_var"] is None) == stats:
                return None
            ndim = _ndim(a["input"])
            if ndim not in (2, 3, 4):
                return None
            attrs = {"weight": a["weight"], "bias": a["bias"],
                     "running_mean": a["running_mean"], "running_var": a["running_var"]}
            ref = a["running_mean"] if stats else a["weight"]
            if ref is None:
                return None  # neither stats nor affine: nothing to hold, stays an aten call
            momentum = a["momentum"]
            spec = {"type": "BatchNorm2d" if ndim == 4 else "BatchNorm1d",
                    "num_features": int(ref.meta["val"].shape[0]), "eps": float(a["eps"]),
                    "momentum": None if momentum is None else float(momentum),
                    "affine": a["weight"] is not None, "track_running_stats": stats}
        else:  # layer_norm, native_layer_norm
            if a["weight"] is None:
                return None
            attrs = {"weight": a["weight"], "bias": a["bias"]}
            spec = {"type": "LayerNorm", "normalized_shape": [int(s) for s in
                                                              a["normalized_shape"]],
                    "eps": float(a["eps"]), "elementwise_affine": True,
                    "bias": a["bias"] is not None}
        owner: str | None = None
        for attr, arg in attrs.items():
            kinds = B if attr.startswith("running_") else P
            ok, owner = self._param(arg, kinds, owner, attr)
            if not ok:
                return None
        return spec, {k: v for k, v in attrs.items() if v is not None}, source, folded

    def find_modules(self) -> None:
        taken: set[str] = set()
        state_names = [target for _, target, _ in self.state.values()]
        for node in self.graph.nodes:
            if node.op != "call_function" or op_name(node.target) not in _WEIGHT_OPS:
                continue
            if op_name(node.target) in _TUPLE_OPS and not all(
                    u.target is operator.getitem and u.args[1] == 0 for u in node.users):
                continue
            found = self._module_for(node)
            if found is None:
                continue
            spec, attrs, source, folded = found
            owner = self.state[next(iter(attrs.values())).name][1].rpartition(".")[0]
            own = {f"{owner}.{attr}" if owner else attr for attr in attrs}
            if spec["type"].startswith("BatchNorm"):
                own.add(f"{owner}.num_batches_tracked" if owner else "num_batches_tracked")
            others = [s for s in state_names
                      if (not owner or s.startswith(owner + ".")) and s not in own]
            name = owner or node.name
            if others or name in taken:
                continue  # the owner holds more state than the layer: keep it an aten call
            taken.add(name)
            self.modules[name] = spec
            self.module_of[node] = name
            self.module_input[node] = source
            self.folded.update(folded)
            for attr, placeholder in attrs.items():
                self.absorbed.add(placeholder)
                self.tensors[f"{name}.{attr}"] = self.state[placeholder.name][2].clone()
            if spec["type"].startswith("BatchNorm") and spec["track_running_stats"]:
                counter = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
                value = self.program.state_dict.get(counter)
                self.tensors[f"{name}.num_batches_tracked"] = (
                    value.detach().clone() if isinstance(value, torch.Tensor)
                    else torch.zeros((), dtype=torch.long))
            for user in list(node.users):
                if user.target is operator.getitem:
                    self.alias[user] = node

    # ---- emit the IR ----

    def _tensor_name(self, target: str) -> str:
        parts = [p if p and (p.isdigit() or p.isidentifier()) else
                 "t_" + "".join(c if c.isalnum() else "_" for c in p) for p in target.split(".")]
        return ".".join(parts)

    def fresh(self, base: str) -> str:
        """An IR node name not used yet (and now taken)."""
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def emit(self, batch_rewrites: dict[fx.Node, list[int]], batch_name: str
             ) -> dict[str, Any]:
        assert self.user_input is not None and self.output is not None
        val = self.user_input.meta["val"]
        shape = []
        for s in val.shape[1:]:
            if not isinstance(s, int):
                raise SpecError(f"the model's input has a dynamic dimension besides the batch "
                                f"({list(val.shape)}); export it with a fixed input shape and a "
                                "dynamic batch only")
            shape.append(s)
        inp = self.user_input.name
        nodes: list[dict[str, Any]] = []
        ref: dict[fx.Node, str] = {self.user_input: inp}

        def enc(value: Any) -> Any:
            if isinstance(value, fx.Node):
                target = self.alias.get(value, value)
                if target not in ref:
                    raise SpecError(f"node {value.name!r} reads {target.name!r}, which the "
                                    "converter could not place")
                return {"node": ref[target]}
            if isinstance(value, (list, tuple)):
                return [enc(v) for v in value]
            if isinstance(value, (torch.device, torch.layout, torch.memory_format)):
                return None
            return encode_arg(value)

        if batch_rewrites:
            nodes.append({"name": batch_name, "op": "aten.sym_size.int",
                          "args": [{"node": inp}, 0], "kwargs": {}})
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if node is self.user_input or node in self.absorbed or not node.users:
                    continue
                kind, target, value = self.state[node.name]
                tname = self._tensor_name(target)
                if tname not in self.tensor_specs:
                    dtype = DTYPE_NAMES.get(value.dtype)
                    if dtype is None:
                        raise SpecError(f"tensor {target!r} has dtype {value.dtype}, which "
                                        "slimline does not store")
                    self.tensor_specs[tname] = {
                        "shape": list(value.shape), "dtype": dtype,
                        "trainable": kind == InputKind.PARAMETER and value.is_floating_point()}
                    self.tensors[tname] = value.clone().contiguous()
                nodes.append({"name": node.name, "op": "get_attr", "target": tname,
                              "args": [], "kwargs": {}})
                ref[node] = node.name
                continue
            if node.op != "call_function":
                continue
            name = op_name(node.target)
            if node in self.alias or node in self.folded:
                continue
            if name in _ASSERTS:
                if node.users:
                    raise SpecError(f"assertion node {node.name!r} has users; re-export the "
                                    "model")
                continue
            if node in self.module_of:
                module = self.module_of[node]
                nodes.append({"name": node.name, "op": "module", "target": module,
                              "args": [enc(self.module_input[node])], "kwargs": {}})
                ref[node] = node.name
                continue
            args = list(node.args)
            if node in batch_rewrites:
                sizes = list(args[1])
                for i in batch_rewrites[node]:
                    sizes[i] = _BatchRef
                args[1] = sizes
            kwargs = {k: v for k, v in node.kwargs.items() if k not in _DROPPED_KWARGS}
            encoded_args = [_sub_batch(enc, a, batch_name) for a in args]
            nodes.append({"name": node.name, "op": name, "args": encoded_args,
                          "kwargs": {k: enc(v) for k, v in kwargs.items()}})
            ref[node] = node.name
            if name in _COPY_OPS and node.kwargs.get("memory_format") == torch.contiguous_format:
                # a copy into a contiguous layout (views after it rely on it): the dropped
                # memory_format becomes an explicit contiguous()
                contiguous = self.fresh(f"{node.name}_contiguous")
                nodes.append({"name": contiguous, "op": "aten.contiguous.default",
                              "args": [{"node": node.name}], "kwargs": {}})
                ref[node] = contiguous
        return {"format": GRAPH_FORMAT, "input": {"name": inp, "shape": shape},
                "modules": self.modules, "tensors": self.tensor_specs, "nodes": nodes,
                "output": enc(self.output)}


class _BatchMarker:
    """Stands for the run-time batch size in a rewritten size list."""


_BatchRef = _BatchMarker()


def _sub_batch(enc: Callable[[Any], Any], value: Any, batch_name: str) -> Any:
    if isinstance(value, list) and any(v is _BatchRef for v in value):
        return [{"node": batch_name} if v is _BatchRef else enc(v) for v in value]
    return enc(value)


# ---- static batch ----

def _batch_rewrites(graph: fx.Graph, user_input: fx.Node, batch: int) -> dict[fx.Node, list[int]]:
    """Size lists of view/reshape/expand whose dim 0 is the baked-in batch: the output's dim 0
    is `batch`, and the node reads the input (through any ops) or expands a size-1 dim 0."""
    derived = {user_input}
    found: dict[fx.Node, list[int]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        from_input = any(n in derived for n in inputs)
        if from_input:
            derived.add(node)
        if op_name(node.target) not in _SIZE_OPS or len(node.args) < 2:
            continue
        sizes = node.args[1]
        val = node.meta.get("val")
        if not isinstance(sizes, (list, tuple)) or not sizes or not isinstance(val, torch.Tensor):
            continue
        first = sizes[0]
        if not isinstance(first, int) or isinstance(first, bool) or first != batch \
                or val.dim() == 0 or val.shape[0] != batch:
            continue
        source = node.args[0]
        src_val = source.meta.get("val") if isinstance(source, fx.Node) else None
        expands_one = (op_name(node.target) == "aten.expand.default"
                       and isinstance(src_val, torch.Tensor) and src_val.dim() == len(sizes)
                       and src_val.shape[0] == 1)
        if from_input or expands_one:
            found[node] = [0]
            derived.add(node)
    return found


def _baked(graph: fx.Graph, batch: int, rewritten: dict[fx.Node, list[int]]) -> list[str]:
    """view/reshape/expand nodes whose size list holds a multiple of the batch size at a place
    that was not rewritten (where the batch is probably baked in)."""
    names = []
    for node in graph.nodes:
        if node.op != "call_function" or op_name(node.target) not in _SIZE_OPS \
                or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)):
            continue
        done = rewritten.get(node, [])
        if any(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % batch == 0
               and i not in done for i, v in enumerate(node.args[1])):
            names.append(node.name)
    return names


# ---- verification ----

def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + scale)))


class _Tracking(fx.Interpreter):
    """Runs a GraphModule node by node, remembering the node being run (to name the one that
    fails)."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _verify(program: ExportedProgram, ir: dict[str, Any], tensors: dict[str, torch.Tensor],
            batch: int, dtype: torch.dtype, static: bool, baked: list[str]) -> None:
    module = build_graph_module(ir)
    module.load_state_dict(tensors, strict=True)
    module.eval()
    gen = torch.Generator().manual_seed(0)
    shape = ir["input"]["shape"]
    x = torch.randn(batch, *shape, generator=gen).to(dtype)
    extra = torch.randn(1, *shape, generator=gen).to(dtype)
    with torch.no_grad():
        reference = program.module()(x)
        if not isinstance(reference, torch.Tensor) or reference.dim() != 2 \
                or reference.shape[0] != batch:
            got = tuple(reference.shape) if isinstance(reference, torch.Tensor) else reference
            raise SpecError(f"the model must return one tensor of logits (N, classes); it "
                            f"returns {got} for a batch of {batch}")
        got = module(x)
        if not _close(got, reference):
            raise SpecError("the converted graph does not reproduce the exported program's "
                            "outputs; please report this model")
        runner = _Tracking(module)
        try:
            twice = runner.run(torch.cat([x, x, extra]))
            ok = _close(twice[:batch], reference) and _close(twice[batch:2 * batch], reference)
            failed = None
        except RuntimeError:
            ok, failed = False, runner.current
    if not ok:
        if static:
            if failed is not None:
                sizes = f" {list(failed.args[1])}" if len(failed.args) > 1 and isinstance(
                    failed.args[1], (list, tuple)) else ""
                baked = [f"{failed.name} ({op_name(failed.target)}{sizes})"]
            where = ", ".join(baked[:5]) if baked else "a shape argument"
            raise SpecError(f"the graph has its batch size ({batch}) baked into {where}; "
                            f"re-export with a dynamic batch: {REEXPORT}")
        raise SpecError("the converted graph's outputs depend on the batch size (samples are "
                        "mixed); slimline imports classifiers whose outputs are per sample")


def _dynamic_batch(program: ExportedProgram, size: torch.SymInt) -> int:
    """A batch size the program accepts: 2, or its range's end nearest to 2."""
    ranges = program.range_constraints.get(size.node.expr)
    lower, upper = 1, 2
    if ranges is not None:
        try:
            lower = max(1, int(ranges.lower))
        except (TypeError, ValueError, OverflowError):
            lower = 1
        if getattr(ranges.upper, "is_Integer", False) is True:  # not infinite
            upper = int(ranges.upper)
    return max(lower, min(2, upper))


def graph_from_program(program: ExportedProgram, *, verify: bool = True
                       ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert an ExportedProgram to `(ir, tensors)` (see the module doc); SpecError names
    what cannot be imported and how to fix it."""
    if not isinstance(program, ExportedProgram):
        raise SpecError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")
    conv = _Converter(program)
    conv.read_signature()
    conv.check_ops()
    conv.find_modules()
    assert conv.user_input is not None
    val = conv.user_input.meta["val"]
    first = val.shape[0]
    static = isinstance(first, int)
    rewrites: dict[fx.Node, list[int]] = {}
    batch_name = conv.fresh("batch_size")
    if static:
        rewrites = _batch_rewrites(conv.graph, conv.user_input, int(first))
    ir = conv.emit(rewrites, batch_name)
    validate_graph(ir)
    if verify:
        batch = int(first) if static else _dynamic_batch(program, first)
        baked = _baked(conv.graph, int(first), rewrites) if static and int(first) > 1 else []
        _verify(program, ir, conv.tensors, batch, val.dtype, static, baked)
    return ir, conv.tensors
