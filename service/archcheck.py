"""`{"arch": {...}}` model specs checked at submission, without torch.

The zoo's architectures (core/models/zoo.py) are mirrored here as plain arithmetic: the name,
every kwarg's type and a sane range are checked (a 422 naming the field, `model.arch.widths[0]`
style), then the model's parameter count and MACs per sample are computed analytically — the
same totals as `core.metrics.param_counts(model)["total"]` and `core.metrics.count_macs(model,
input_shape)` of the built model (tests/service/test_archcheck.py holds both sides equal) — and
compared with `max_model_params` / `max_model_macs`. A model too big is refused before anything
is queued, so no worker ever allocates it.

An imported model's arch `{"name": "graph", "graph": <sha256>, "input_shape", "num_classes",
"init": "torch", "edits", ["preprocessing"]}` (what `GET /v1/models/{id}` shows for a .pt2/.onnx
upload or a job's output on one) is checked for its form only (`check_graph_arch`): its size was
checked when the graph was uploaded, and the submission checks that the tenant holds that graph
(`service.submission`). Its layer names are not in the arch: `service.submitcheck` takes them
from the report of one of the tenant's models on that graph (and the worker names the valid
ones when a step names an unknown layer). A zoo arch's layer and unit-group names are
`arch_layers` (the same arithmetic). Any arch may carry `preprocessing` (`{"layout", "mean",
"std"}`, checked like core does).

`edits` are kept as they are accepted today (a list of `{"op": <edit op>, ...}`; the worker
replays them), and their details are checked by core when the model is built. The only edit
that can make a model bigger than its architecture is `pcn_input` (a layer with m inputs gets
an m x dims basis, dims <= m): its size is added as an upper bound.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import service.methods  # noqa: F401 - registers every method (their edit ops)
from service.errors import InvalidSpec
from service.registry import edit_ops

_COMMON: dict[str, Any] = {"input_shape": [1, 28, 28], "num_classes": 10, "init": "glorot"}
# the zoo's names and default kwargs (core.models.zoo.ZOO; a test keeps them equal)
ZOO_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {**_COMMON, "widths": [300, 100], "activation": "relu"},
    "lenet300": dict(_COMMON),
    "lenet5": dict(_COMMON),
    "conv4": {**_COMMON, "channels": [64, 64, 128, 128], "fc": [256, 256]},
    "resnet": {**_COMMON, "init": "kaiming", "depth": 20, "width": 1},
}
ZOO_NAMES = tuple(sorted(ZOO_DEFAULTS))
INITS = ("glorot", "kaiming", "torch")
ACTIVATIONS = ("relu", "tanh", "linear")
# the edit ops the registered methods declare (`MethodSpec.edit_ops`; a test keeps them equal
# to core.edits.EDIT_OPS)
EDIT_OPS = edit_ops()

# sane ranges (the size limits then bound the product); well beyond any model this service
# trains, but small enough that nothing overflows or takes long to count
MAX_CHANNELS_IN = 4096
MAX_SIDE = 16384
MAX_CLASSES = 1_000_000
MAX_WIDTH = 1_000_000
MAX_LAYERS = 64
MAX_RESNET_DEPTH = 1202  # ResNet-1202, the deepest of He et al.
MAX_RESNET_WIDTH = 1024.0
MAX_EDITS = 4096
# imported graphs (core.arch / core.graph; a test keeps them equal)
GRAPH = "graph"
GRAPH_KWARGS = ("graph", "input_shape", "num_classes", "init")
GRAPH_INITS = ("torch",)
MAX_INPUT_DIMS = 8
MAX_INPUT_ELEMENTS = 1 << 31
LAYOUTS = ("NCHW", "NHWC", "flat")
MAX_PREPROCESSING_CHANNELS = 4096
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ArchSize:
    params: int  # every parameter (BatchNorm running statistics are buffers, not counted)
    macs: int  # multiply-accumulates of one forward pass of one sample


@dataclass
class _Net:
    """Totals of the layers added so far, and per layer what a pcn_input edit needs."""

    params: int = 0
    macs: int = 0
    # name -> (inputs m: in_features / in_channels, outputs, positions of the input)
    layers: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def linear(self, name: str, d_in: int, d_out: int) -> None:
        self.params += d_in * d_out + d_out
        self.macs += d_in * d_out
        self.layers[name] = (d_in, d_out, 1)

    def conv(self, name: str, c_in: int, c_out: int, kernel: int, size_in: tuple[int, int],
             size_out: tuple[int, int], *, bias: bool) -> None:
        self.params += c_in * c_out * kernel * kernel + (c_out if bias else 0)
        self.macs += size_out[0] * size_out[1] * c_out * c_in * kernel * kernel
        self.layers[name] = (c_in, c_out, size_in[0] * size_in[1])

    def batchnorm(self, channels: int) -> None:
        self.params += 2 * channels


def _bad(where: str, message: str) -> InvalidSpec:
    return InvalidSpec(f"{where}: {message}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, f"must be an integer in [{low}, {high}], got {_show(value)}")
    if not low <= value <= high:
        raise _bad(where, f"must be in [{low}, {high}], got {_show(value)}")
    return value


def _int_list(value: Any, where: str, high: int, *, allow_empty: bool) -> list[int]:
    if not isinstance(value, list):
        raise _bad(where, f"must be a list of integers in [1, {high}], got {_show(value)}")
    if not allow_empty and not value:
        raise _bad(where, "must not be empty")
    if len(value) > MAX_LAYERS:
        raise _bad(where, f"at most {MAX_LAYERS} layers, got {len(value)}")
    return [_int(v, f"{where}[{i}]", 1, high) for i, v in enumerate(value)]


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise _bad(where, f"must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def _input_shape(value: Any, where: str) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise _bad(where, f"must be [C, H, W]: 3 positive integers, got {_show(value)}")
    c = _int(value[0], f"{where}[0]", 1, MAX_CHANNELS_IN)
    h = _int(value[1], f"{where}[1]", 1, MAX_SIDE)
    w = _int(value[2], f"{where}[2]", 1, MAX_SIDE)
    return c, h, w


def _dense(net: _Net, names: str, d_in: int, widths: list[int], num_classes: int) -> None:
    dims = [d_in, *widths, num_classes]
    for i in range(len(dims) - 1):
        net.linear(f"{names}{i + 1}", dims[i], dims[i + 1])


def _mlp(a: dict[str, Any], where: str, net: _Net) -> None:
    c, h, w = a["input_shape"]
    widths = _int_list(a["widths"], f"{where}.widths", MAX_WIDTH, allow_empty=True)
    _choice(a["activation"], f"{where}.activation", ACTIVATIONS)
    _dense(net, "fc", c * h * w, widths, a["num_classes"])


def _lenet300(a: dict[str, Any], where: str, net: _Net) -> None:
    c, h, w = a["input_shape"]
    _dense(net, "fc", c * h * w, [300, 100], a["num_classes"])


def _lenet5(a: dict[str, Any], where: str, net: _Net) -> None:
    c, h, w = a["input_shape"]
    h1, w1 = h - 4, w - 4  # conv 5x5, no padding
    h2, w2 = h1 // 2 - 4, w1 // 2 - 4
    h3, w3 = h2 // 2, w2 // 2
    if h3 < 1 or w3 < 1:
        raise _bad(f"{where}.input_shape", f"lenet5 needs inputs of at least 16x16, got "
                                           f"{_show(a['input_shape'])}")
    net.conv("conv1", c, 20, 5, (h, w), (h1, w1), bias=True)
    net.conv("conv2", 20, 50, 5, (h1 // 2, w1 // 2), (h2, w2), bias=True)
    net.linear("fc1", 50 * h3 * w3, 500)
    net.linear("fc2", 500, a["num_classes"])


def _conv4(a: dict[str, Any], where: str, net: _Net) -> None:
    c, h, w = a["input_shape"]
    channels = _int_list(a["channels"], f"{where}.channels", MAX_WIDTH, allow_empty=False)
    fc = _int_list(a["fc"], f"{where}.fc", MAX_WIDTH, allow_empty=True)
    if h >> (len(channels) // 2) < 1 or w >> (len(channels) // 2) < 1:
        raise _bad(f"{where}.input_shape", f"{_show(a['input_shape'])} is too small for the "
                   f"{len(channels) // 2} 2x2 max-pools of {len(channels)} channels (one after "
                   "every second conv)")
    for i, out in enumerate(channels):
        net.conv(f"conv{i + 1}", c, out, 3, (h, w), (h, w), bias=True)  # 'same' padding
        c = out
        if i % 2 == 1:
            h, w = h // 2, w // 2
    _dense(net, "fc", c * h * w, fc, a["num_classes"])


def _resnet(a: dict[str, Any], where: str, net: _Net) -> None:
    c, h, w = a["input_shape"]
    depth = _int(a["depth"], f"{where}.depth", 8, MAX_RESNET_DEPTH)
    if (depth - 2) % 6:
        raise _bad(f"{where}.depth", f"must be 6n+2 (e.g. 20 or 56), got {depth}")
    width = a["width"]
    if isinstance(width, bool) or not isinstance(width, (int, float)) \
            or not math.isfinite(width) or not 0 < width <= MAX_RESNET_WIDTH:
        raise _bad(f"{where}.width", f"must be a number in (0, {MAX_RESNET_WIDTH:g}] (the "
                                     f"filters per stage are 16, 32, 64 times it), got "
                                     f"{_show(width)}")
    n = (depth - 2) // 6
    widths = [max(1, round(base * float(width))) for base in (16, 32, 64)]
    net.conv("conv1", c, widths[0], 3, (h, w), (h, w), bias=False)
    net.batchnorm(widths[0])
    c_in = widths[0]
    for s, c_out in enumerate(widths):
        for b in range(n):
            stride = 2 if (b == 0 and s > 0) else 1
            block_in = c_in if b == 0 else c_out
            h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1  # 3x3 pad 1, and 1x1
            name = f"stage{s + 1}.{b}"
            net.conv(f"{name}.conv1", block_in, c_out, 3, (h, w), (h_out, w_out), bias=False)
            net.batchnorm(c_out)
            net.conv(f"{name}.conv2", c_out, c_out, 3, (h_out, w_out), (h_out, w_out),
                     bias=False)
            net.batchnorm(c_out)
            if b == 0:
                net.conv(f"{name}.shortcut_conv", block_in, c_out, 1, (h, w), (h_out, w_out),
                         bias=False)
                net.batchnorm(c_out)
            h, w = h_out, w_out
        c_in = c_out
    net.linear("fc", c_in, a["num_classes"])


_BUILDERS = {"mlp": _mlp, "lenet300": _lenet300, "lenet5": _lenet5, "conv4": _conv4,
             "resnet": _resnet}


def _edits(value: Any, where: str, net: _Net) -> None:
    """The structure normalize_arch checks; pcn_input's basis added as an upper bound."""
    if not isinstance(value, list):
        raise _bad(where, "must be a list of {\"op\": ..., ...} edits")
    if len(value) > MAX_EDITS:
        raise _bad(where, f"at most {MAX_EDITS} edits, got {len(value)}")
    for i, edit in enumerate(value):
        if not isinstance(edit, dict) or edit.get("op") not in EDIT_OPS:
            raise _bad(f"{where}[{i}]", f"{_show(edit)} is not one of the known edit ops: "
                                        f"{', '.join(EDIT_OPS)}")
        if edit["op"] == "pcn_input" and edit.get("layer") in net.layers:
            m, out, positions = net.layers[edit["layer"]]
            dims = edit.get("dims")
            if isinstance(dims, int) and not isinstance(dims, bool) and dims >= 1:
                dims = min(dims, m)  # core refuses more than m
                net.params += m * dims + m + out  # U, mu and a bias
                net.macs += positions * m * dims


def _preprocessing(value: Any, where: str) -> None:
    """Torch-free mirror of `core.arch.normalize_preprocessing`."""
    if not isinstance(value, dict):
        raise _bad(where, f'must be an object {{"layout", "mean", "std"}}, got {_show(value)}')
    unknown = sorted(str(k) for k in set(value) - {"layout", "mean", "std"})
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", "unknown key; valid keys: layout, mean, std")
    _choice(value.get("layout", "NCHW"), f"{where}.layout", LAYOUTS)
    lengths = {}
    for key in ("mean", "std"):
        values = value.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_PREPROCESSING_CHANNELS \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in values):
            raise _bad(f"{where}.{key}", f"must be a list of 1..{MAX_PREPROCESSING_CHANNELS} "
                                         f"finite numbers (one per channel) or null, got "
                                         f"{_show(values)}")
        if key == "std" and any(v <= 0 for v in values):
            raise _bad(f"{where}.std", f"must be > 0, got {_show(values)}")
        lengths[key] = len(values)
    if len(set(lengths.values())) > 1:
        raise _bad(where, f"mean ({lengths['mean']} values) and std ({lengths['std']} values) "
                          "must have the same length")


def check_graph_arch(arch: dict[str, Any], where: str = "model.arch") -> str:
    """The form of an imported model's arch (like `core.arch.normalize_arch`); returns its
    graph id. InvalidSpec (422) naming the field."""
    unknown = sorted(str(k) for k in set(arch) - {"name", "edits", "preprocessing",
                                                  *GRAPH_KWARGS})
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", f"unknown kwarg for an imported graph (unknown: "
                   f"{', '.join(unknown)}); valid kwargs: {', '.join(GRAPH_KWARGS)}, "
                   "preprocessing")
    missing = [k for k in ("graph", "input_shape", "num_classes") if k not in arch]
    if missing:
        raise _bad(where, f"an imported graph's arch needs {', '.join(missing)}; copy the arch "
                          "of your imported model (GET /v1/models/{id}), or pass its model id")
    graph = arch["graph"]
    if not isinstance(graph, str) or not _SHA.fullmatch(graph):
        raise _bad(f"{where}.graph", f"must be a graph id (64 lowercase hex digits), got "
                                     f"{_show(graph)}")
    shape = arch["input_shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_INPUT_DIMS:
        raise _bad(f"{where}.input_shape", f"must be a list of 1..{MAX_INPUT_DIMS} positive "
                                           f"integers (without the batch), got {_show(shape)}")
    dims = [_int(v, f"{where}.input_shape[{i}]", 1, MAX_SIDE) for i, v in enumerate(shape)]
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise _bad(f"{where}.input_shape", f"{dims} has more than {MAX_INPUT_ELEMENTS:,} values")
    _int(arch["num_classes"], f"{where}.num_classes", 1, MAX_CLASSES)
    _choice(arch.get("init", "torch"), f"{where}.init", GRAPH_INITS)
    if "preprocessing" in arch:
        _preprocessing(arch["preprocessing"], f"{where}.preprocessing")
    if "edits" in arch:
        _edits(arch["edits"], f"{where}.edits", _Net())
    return graph


def is_graph_arch(arch: Any) -> bool:
    return isinstance(arch, dict) and arch.get("name") == GRAPH


def arch_size(arch: Any, where: str = "model.arch") -> ArchSize:
    """Check an architecture dict like `core.models.build` would (type and range of every
    kwarg, with `num_classes` >= 2), then count its parameters and MACs. InvalidSpec (422)
    naming the field on any problem."""
    net = _net(arch, where)
    return ArchSize(params=net.params, macs=net.macs)


@dataclass(frozen=True)
class ArchLayers:
    """A zoo model's names as `core.prunability.prunability_report` lists them: its
    Linear/Conv2d layers in forward order, and its unit groups (what channel_prune and the
    unit-pruning analysis name: a producing layer, or a ResNet stage's residual stream)."""

    layers: tuple[str, ...]
    groups: tuple[str, ...]


def arch_layers(arch: Any, where: str = "model.arch") -> ArchLayers:
    """The layer and unit-group names of a zoo arch (checked like `arch_size`); edits never
    rename a layer (a factored or transformed layer keeps its name). tests/service/
    test_submit_checks.py holds them equal to the built model's prunability report."""
    net = _net(arch, where)
    layers = tuple(net.layers)
    if arch["name"] != "resnet":  # a chain: every layer but the logits feeds the next one
        return ArchLayers(layers, layers[:-1])
    groups = ["conv1"]
    for stage in range(1, 4):
        blocks = sorted({int(n.split(".")[1]) for n in layers
                         if n.startswith(f"stage{stage}.")})
        groups += [f"stage{stage}.{b}.conv1" for b in blocks] + [f"stage{stage}"]
    return ArchLayers(layers, tuple(groups))


def _net(arch: Any, where: str) -> _Net:
    if not isinstance(arch, dict):
        raise _bad(where, f'must be an object like {{"name": "lenet300"}}, got {_show(arch)}')
    name = arch.get("name")
    if name == GRAPH:
        raise _bad(f"{where}.name", "an imported graph's size is known from the stored graph, "
                                    "not from its arch (check_arch checks its form)")
    if not isinstance(name, str) or name not in ZOO_DEFAULTS:
        raise _bad(f"{where}.name", f"unknown architecture {_show(name)}; the zoo has: "
                                    f"{', '.join(ZOO_NAMES)} (and 'graph' for an imported model)")
    defaults = ZOO_DEFAULTS[name]
    unknown = sorted(str(k) for k in set(arch) - set(defaults) - {"name", "edits",
                                                                   "preprocessing"})
    if unknown:
        raise _bad(f"{where}.{unknown[0]}", f"unknown kwarg for architecture {name!r} "
                   f"(unknown: {', '.join(unknown)}); valid kwargs: {', '.join(sorted(defaults))}")
    full = {**defaults, **arch}
    full["input_shape"] = _input_shape(full["input_shape"], f"{where}.input_shape")
    full["num_classes"] = _int(full["num_classes"], f"{where}.num_classes", 2, MAX_CLASSES)
    _choice(full["init"], f"{where}.init", INITS)
    if "preprocessing" in arch:
        _preprocessing(arch["preprocessing"], f"{where}.preprocessing")
    net = _Net()
    _BUILDERS[name](full, where, net)
    if "edits" in arch:
        _edits(arch["edits"], f"{where}.edits", net)
    return net


def check_arch(arch: Any, *, max_params: int, max_macs: int,
               where: str = "model.arch") -> ArchSize | None:
    """`arch_size`, then the size limits (SLIMLINE_MAX_MODEL_PARAMS / _MACS). An imported
    graph's arch: its form only (`check_graph_arch`; None: its size was checked at upload)."""
    if is_graph_arch(arch):
        check_graph_arch(arch, where)
        return None
    size = arch_size(arch, where)
    if size.params > max_params:
        raise _bad(where, f"the model has {size.params:,} parameters, the limit is "
                          f"{max_params:,} (SLIMLINE_MAX_MODEL_PARAMS); use fewer or narrower "
                          "layers")
    if size.macs > max_macs:
        raise _bad(where, f"the model needs {size.macs:,} multiply-accumulates per sample, the "
                          f"limit is {max_macs:,} (SLIMLINE_MAX_MODEL_MACS); use a smaller "
                          "input_shape or fewer or narrower layers")
    return size
