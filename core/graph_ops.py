"""The allow-list of operations an imported graph may call (slimline graph IR, `core.graph`).

An IR node's `op` is `"module"`, `"get_attr"` or a name in `ALLOWED_OPS`: aten overloads as
`"aten.<op>.<overload>"` (what `str(torch.ops.aten.relu.default)` prints) and Python operators
as `"operator.<fn>"` (symbolic batch-size arithmetic, `getitem` on multi-output ops). Anything
else is refused by name. Both importers (`core.import_pt2` for torch.export programs, the ONNX
converter in the worker) name the ops they emit from this table.

To allow another op, add its name to `ATEN_OPS` (or `OPERATOR_OPS`); it must be a pure
function of its arguments that creates no tensor on a fixed device (constructors such as
`aten.zeros` take a device and are left out on purpose; `aten.full_like` and friends follow
their input's device once the importers drop the device argument). Names whose op does not
exist in the installed torch are skipped.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

# aten overloads, grouped by what they do; "<op>.<overload>"
ATEN_OPS: tuple[str, ...] = (
    # weight layers (imported as modules when their weights are plain parameters)
    "conv2d.default", "conv2d.padding", "convolution.default", "linear.default",
    "batch_norm.default", "_native_batch_norm_legit_no_training.default",
    "layer_norm.default", "native_layer_norm.default", "group_norm.default",
    "native_group_norm.default",
    "addmm.default", "mm.default", "matmul.default", "bmm.default", "baddbmm.default",
    "einsum.default", "scaled_dot_product_attention.default",
    # activations
    "relu.default", "relu_.default", "relu6.default", "hardtanh.default", "hardtanh_.default",
    "gelu.default", "silu.default", "silu_.default", "sigmoid.default", "tanh.default",
    "hardswish.default", "hardswish_.default", "hardsigmoid.default", "hardsigmoid_.default",
    "leaky_relu.default", "leaky_relu_.default", "elu.default", "softplus.default",
    "mish.default", "prelu.default", "clamp.default", "clamp_min.default", "clamp_max.default",
    "softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default",
    "dropout.default", "dropout_.default",
    # elementwise arithmetic
    "add.Tensor", "add.Scalar", "add_.Tensor", "sub.Tensor", "sub.Scalar", "rsub.Tensor",
    "rsub.Scalar", "mul.Tensor", "mul.Scalar", "mul_.Tensor", "div.Tensor", "div.Scalar",
    "div.Tensor_mode", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "sqrt.default", "rsqrt.default", "erf.default", "exp.default", "log.default",
    "neg.default", "abs.default", "reciprocal.default", "maximum.default", "minimum.default",
    "where.self",
    # comparisons and masks (attention decompositions); `*_like` constructors follow their
    # input's device
    "eq.Scalar", "eq.Tensor", "ne.Scalar", "ne.Tensor", "lt.Scalar", "lt.Tensor", "gt.Scalar",
    "gt.Tensor", "le.Scalar", "ge.Scalar", "logical_not.default", "logical_and.default",
    "logical_or.default", "any.dim", "any.default", "masked_fill.Scalar", "masked_fill.Tensor",
    "full_like.default", "zeros_like.default", "ones_like.default", "_safe_softmax.default",
    # reductions and pooling
    "mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default",
    "var.correction", "std.correction", "amin.default", "adaptive_avg_pool2d.default",
    "_adaptive_avg_pool2d.default",
    "avg_pool2d.default", "max_pool2d.default", "max_pool2d_with_indices.default",
    "adaptive_max_pool2d.default", "upsample_nearest2d.vec", "upsample_bilinear2d.vec",
    # shapes and views
    "flatten.using_ints", "unflatten.int", "view.default", "_unsafe_view.default",
    "reshape.default", "permute.default", "transpose.int", "t.default", "contiguous.default",
    "clone.default",
    "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default", "select.int",
    "slice.Tensor", "narrow.default", "cat.default", "stack.default", "unbind.int",
    "chunk.default", "split.Tensor", "split_with_sizes.default", "expand.default",
    "repeat.default", "pad.default", "constant_pad_nd.default", "sym_size.int",
    "sym_numel.default",
    # dtype changes (device/layout/memory_format arguments are dropped by the importers)
    "_to_copy.default", "to.dtype", "type_as.default",
    # identities
    "alias.default", "detach.default", "detach_.default", "lift_fresh_copy.default",
)

# Python operators torch.export emits for symbolic sizes and multi-output ops
OPERATOR_OPS: tuple[str, ...] = ("getitem", "add", "sub", "mul", "floordiv", "truediv", "neg",
                                 "mod")


def _resolve_aten(name: str) -> Callable[..., Any] | None:
    packet_name, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, packet_name, None)
    if packet is None:
        return None
    try:
        return getattr(packet, overload)  # type: ignore[no-any-return]
    except AttributeError:
        return None


def _table() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for name in ATEN_OPS:
        fn = _resolve_aten(name)
        if fn is not None:
            table[f"aten.{name}"] = fn
    for name in OPERATOR_OPS:
        table[f"operator.{name}"] = getattr(operator, name)
    return table


# name -> callable (read it, never write it)
ALLOWED_OPS: dict[str, Callable[..., Any]] = _table()

# the callables' names (for `op_name`)
_NAMES: dict[int, str] = {id(fn): name for name, fn in ALLOWED_OPS.items()}

# dtypes an IR may name ({"dtype": "<name>"}) and tensors may have
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def op_name(target: Any) -> str:
    """The IR name of an FX call target: `"aten.relu.default"`, `"operator.getitem"`, or for
    anything off the list a readable name (`"my.foo.default"` for a custom op `my::foo`), so a
    refusal can say what was found."""
    known = _NAMES.get(id(target))
    if known is not None:
        return known
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "<namespace>.<op>.<overload>"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    module = getattr(target, "__module__", None) or ""
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if module in ("_operator", "operator") and qualname:
        return f"operator.{qualname}"
    if qualname:
        return f"{module}.{qualname}" if module else str(qualname)
    return repr(target)


def is_allowed(name: str) -> bool:
    """Whether `name` is on the allow-list."""
    return name in ALLOWED_OPS
