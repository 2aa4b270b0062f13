"""Which layers produce and read which units: the structure the output-based transform needs
(seed 000 App. C, D, Fig. 4).

A `UnitGroup` is a set of output units (rows of a Linear, filters of a Conv2d) that must be
pruned together: the units of one producer layer in a plain network, or the residual stream of a
ResNet stage, whose producers' outputs are *added* (block conv2s and the projection shortcut).
`readers` lists, per tensor that carries these units, the layers reading that tensor; layers
reading the same tensor share their input PCA basis U (a block's conv1 and its shortcut_conv).

Zoo graphs (module names from `core.models.zoo`):
* mlp / lenet300 / lenet5 / conv4: group `<layer>` for every layer but the last, read by the next
  layer in forward order (a conv feeding a flattened dense layer: h'*w' reader rows per filter).
* resnet: `conv1` (stem + bn1) read by stage1.0.conv1 and stage1.0.shortcut_conv (the first block
  of every stage has a projection shortcut, so the stem is not added to the stage-1 stream);
  `stage{s}.{b}.conv1` (+ bn1) read by `stage{s}.{b}.conv2`; `stage{s}` = the residual stream:
  producers `stage{s}.{b}.conv2` (+ bn2) of every block and `stage{s}.0.shortcut_conv`
  (+ shortcut_bn), read by `stage{s}.{b}.conv1` (b >= 1) and by the next stage's block 0
  (conv1 + shortcut_conv) or by `fc` after the global average pool.

Imported models (`torch.fx` graphs, `core.graph`): the groups are found from the graph by
`core.graph_deps` (residual adds, concatenations, depthwise convs, flatten into linear; a group
is named after its first producer); `unit_groups` lists the prunable ones and `untouched_units`
the rest with their reasons. Their groups may have `channelwise` layers (BatchNorm2d, depthwise
convs between producers and readers: sliced on both sides) and `segments` (a reader reading the
units at an offset of a concatenation); `layer_rows` gives the input rows a layer keeps.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import fx, nn

from core.errors import SpecError
from core.graph_deps import UnitGroup, graph_unit_groups, graph_untouched, is_graph_model
from core.layers import as_layer, weight_layers
from core.pcn import PCNConv2d, PCNLinear
from core.surgery import get_layer, set_layer
from core.zoo import MLP, ConvNet, LeNet5, ResNet

__all__ = ["UnitGroup", "group_units", "is_graph_model", "layer_rows", "prune_units",
           "shared_input_sets", "unit_groups", "unit_rows", "untouched_units"]


def _sequential_names(model: nn.Module) -> list[str]:
    if isinstance(model, MLP):
        return list(model.layer_names)
    if isinstance(model, ConvNet):
        return [*model.conv_names, *model.fc_names]
    if isinstance(model, LeNet5):
        return ["conv1", "conv2", "fc1", "fc2"]
    raise SpecError(f"the output-based transform knows the zoo models mlp, lenet300, lenet5, "
                    f"conv4 and resnet, not {type(model).__name__}")


def _resnet_groups(model: ResNet) -> list[UnitGroup]:
    stages = [list(getattr(model, f"stage{s}")) for s in (1, 2, 3)]
    if not all(blocks[0].project for blocks in stages):
        raise SpecError("resnet output transform needs a projection shortcut in the first block "
                        "of every stage")

    def block_input_readers(s: int) -> tuple[str, ...]:
        return (f"stage{s}.0.conv1", f"stage{s}.0.shortcut_conv")

    groups = [UnitGroup("conv1", ("conv1",), ("bn1",), (block_input_readers(1),))]
    for s, blocks in enumerate(stages, start=1):
        producers: list[str] = []
        norms: list[str | None] = []
        readers: list[tuple[str, ...]] = []
        for b, block in enumerate(blocks):
            prefix = f"stage{s}.{b}"
            groups.append(UnitGroup(f"{prefix}.conv1", (f"{prefix}.conv1",), (f"{prefix}.bn1",),
                                    ((f"{prefix}.conv2",),)))
            producers.append(f"{prefix}.conv2")
            norms.append(f"{prefix}.bn2")
            if block.project:
                producers.append(f"{prefix}.shortcut_conv")
                norms.append(f"{prefix}.shortcut_bn")
            if b >= 1:
                readers.append((f"{prefix}.conv1",))
        readers.append(block_input_readers(s + 1) if s < 3 else ("fc",))
        groups.append(UnitGroup(f"stage{s}", tuple(producers), tuple(norms), tuple(readers)))
    return groups


def unit_groups(model: nn.Module) -> dict[str, UnitGroup]:
    """Every prunable unit group of a zoo or imported model, by name (module docstring)."""
    if is_graph_model(model):
        return graph_unit_groups(model)
    if isinstance(model, ResNet):
        groups = _resnet_groups(model)
    else:
        names = _sequential_names(model)
        groups = [UnitGroup(a, (a,), (None,), ((b,),)) for a, b in itertools.pairwise(names)]
    return {g.name: g for g in groups}


def untouched_units(model: nn.Module) -> dict[str, str]:
    """{group or layer: reason} for the output units no unit method prunes: an imported
    model's blocked groups and ungrouped layers (`core.graph_deps.graph_untouched`); a zoo
    model's weight layers that produce no group (the last layer: its outputs are the logits)."""
    if is_graph_model(model):
        return graph_untouched(model)
    try:
        producers = {p for g in unit_groups(model).values() for p in g.producers}
    except SpecError as exc:
        return {name: str(exc) for name, _, _ in weight_layers(model)}
    return {name: "its outputs are the logits (the model's output)"
            for name, _, _ in weight_layers(model) if name not in producers}


def shared_input_sets(model: nn.Module) -> list[tuple[str, ...]]:
    """Sets of >= 2 layers that read the same tensor (they share U; seed 000 App. D, Fig. 4)."""
    try:
        groups = unit_groups(model)
    except SpecError:
        return []
    return [tensor for g in groups.values() for tensor in g.readers if len(tensor) > 1]


# ---- unit surgery (the output transform's and the redundancy analyses' apply step) ----

def _out_units(name: str, layer: nn.Module) -> int:
    if isinstance(layer, (nn.Linear, PCNLinear)):
        return layer.out_features
    if isinstance(layer, (nn.Conv2d, PCNConv2d)):
        return layer.out_channels
    raise SpecError(f"layer {name!r} is a {type(layer).__name__}; output units can only be "
                    "pruned from Linear/Conv2d/PCN layers")


def _in_dim(layer: nn.Module) -> int:
    if isinstance(layer, (nn.Linear, PCNLinear)):
        return layer.in_features
    if isinstance(layer, (nn.Conv2d, PCNConv2d)):
        return layer.in_channels
    if isinstance(layer, nn.BatchNorm2d):
        return layer.num_features
    raise SpecError(f"a {type(layer).__name__} cannot read pruned units")


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels == \
        layer.out_channels


def _new_like(layer: nn.Module, tensors: dict[str, torch.Tensor], **shape: Any) -> nn.Module:
    """A layer of the same type and geometry as `layer` with new sizes, filled from `tensors`."""
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(shape["in_dim"], shape["out_dim"], bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(shape["in_dim"], shape["out_dim"], layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                        bias=layer.bias is not None, padding_mode=layer.padding_mode)
    elif isinstance(layer, PCNLinear):
        new = PCNLinear(shape["in_dim"], layer.dims, shape["out_dim"])
    else:
        new = PCNConv2d(shape["in_dim"], layer.dims, shape["out_dim"], layer.kernel_size,
                        layer.stride, layer.padding)
    new = new.to(dtype=layer.weight.dtype, device=layer.weight.device)
    state = new.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(value)
    new.train(layer.training)
    return new


def _slice_output(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    """Keep output units `keep` of a Linear/Conv2d/PCN layer (rows of W, entries of b)."""
    tensors = {k: v for k, v in layer.state_dict().items()}
    tensors["weight"] = tensors["weight"][keep]
    if "bias" in tensors:
        tensors["bias"] = tensors["bias"][keep]
    return _new_like(layer, tensors, in_dim=_in_dim(layer), out_dim=int(keep.numel()))


def _slice_input(layer: nn.Module, rows: torch.Tensor) -> nn.Module:
    """Keep input dims `rows` of a reader: W columns (plain) or U rows / mu entries (PCN)."""
    tensors = {k: v for k, v in layer.state_dict().items()}
    if isinstance(layer, (PCNLinear, PCNConv2d)):
        tensors["U"], tensors["mu"] = tensors["U"][rows], tensors["mu"][rows]
    else:
        tensors["weight"] = tensors["weight"][:, rows]
    return _new_like(layer, tensors, in_dim=int(rows.numel()), out_dim=_out_units("", layer))


def _slice_norm(norm: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(int(keep.numel()), eps=norm.eps, momentum=norm.momentum,
                         affine=norm.affine, track_running_stats=norm.track_running_stats)
    new = new.to(device=norm.weight.device if norm.affine else None,
                 dtype=norm.weight.dtype if norm.affine else None)
    state = {k: (v if v.ndim == 0 else v[keep]) for k, v in norm.state_dict().items()}
    new.load_state_dict(state)
    new.train(norm.training)
    return new


def _slice_depthwise(conv: nn.Conv2d, rows: torch.Tensor) -> nn.Conv2d:
    """Keep channels `rows` of a depthwise conv (in = out = groups)."""
    n = int(rows.numel())
    new = nn.Conv2d(n, n, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=n, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    new = new.to(dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(conv.weight[rows])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[rows])  # type: ignore[union-attr]
    new.train(conv.training)
    return new


def group_units(model: nn.Module, group: UnitGroup) -> int:
    """The number of units of `group` (all producers must agree)."""
    counts = {p: _out_units(p, get_layer(model, p)) for p in group.producers}
    if len(set(counts.values())) != 1:
        raise SpecError(f"group {group.name!r}: producers disagree on the unit count: {counts}")
    return next(iter(counts.values()))


def unit_rows(keep: torch.Tensor, units: int, in_dim: int, layer: str) -> torch.Tensor:
    """Reader input rows of the kept units (h'*w' rows per unit for a flattened conv output)."""
    if in_dim % units:
        raise SpecError(f"layer {layer!r} reads {in_dim} dims, not a multiple of {units} units")
    per_unit = in_dim // units
    return (keep[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)  # (|S|*h'*w',)


def _width(model: nn.Module, segment: str | int) -> int:
    """A segment's current width: a fixed count, or the unit count of the layer named."""
    if isinstance(segment, int):
        return segment
    layer = as_layer(get_layer(model, segment))
    if layer is None:
        raise SpecError(f"{segment!r} is not a weight layer")
    return int(layer.out_dim)


def layer_rows(model: nn.Module, group: UnitGroup, layer: str, keep: torch.Tensor,
               units: int | None = None) -> torch.Tensor:
    """The input rows (ascending) that `layer`, a reader or channel-wise layer of `group`,
    keeps when the group keeps units `keep`: `unit_rows` when it reads the group alone; where
    it reads the group at an offset of a concatenation (`group.segments`), every other
    segment's rows too."""
    units = group_units(model, group) if units is None else units
    keep = torch.as_tensor(keep, dtype=torch.int64).flatten()
    in_dim = _in_dim(get_layer(model, layer))
    segment = group.segment(layer)
    if segment is None:
        return unit_rows(keep, units, in_dim, layer)
    before, per = segment
    offset = sum(_width(model, b) for b in before)
    channels = in_dim // per
    if in_dim % per or offset + units > channels:
        raise SpecError(f"layer {layer!r} reads {in_dim} dims, which do not hold group "
                        f"{group.name!r} ({units} units x {per}) at offset {offset}")
    kept = torch.cat([torch.arange(offset), offset + keep, torch.arange(offset + units, channels)])
    return (kept[:, None] * per + torch.arange(per)).reshape(-1)


def prune_units(model: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
    """In place: keep units `keep` of `group` in its producers, their BatchNorms, its
    channel-wise layers (BatchNorm2d, depthwise convs) and its readers."""
    units = group_units(model, group)
    keep = torch.as_tensor(keep, dtype=torch.int64).flatten()
    if keep.numel() < 1 or int(keep.min()) < 0 or int(keep.max()) >= units or \
            torch.unique(keep).numel() != keep.numel():
        raise SpecError(f"group {group.name!r}: keep must be distinct unit indices in "
                        f"[0, {units}), got {keep.tolist()[:20]}")
    for producer, norm in zip(group.producers, group.norms, strict=True):
        set_layer(model, producer, _slice_output(get_layer(model, producer), keep))
        if norm is not None:
            bn = get_layer(model, norm)
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != units:
                raise SpecError(f"group {group.name!r}: {norm!r} is not a BatchNorm2d over "
                                f"{units} channels")
            set_layer(model, norm, _slice_norm(bn, keep))
    for name in group.channelwise:
        layer = get_layer(model, name)
        rows = layer_rows(model, group, name, keep, units)
        if isinstance(layer, nn.BatchNorm2d):
            set_layer(model, name, _slice_norm(layer, rows))
        elif _is_depthwise(layer):
            set_layer(model, name, _slice_depthwise(layer, rows))  # type: ignore[arg-type]
        else:
            raise SpecError(f"group {group.name!r}: {name!r} is a {type(layer).__name__}, not "
                            "a BatchNorm2d or depthwise conv")
    for reader in group.reader_layers:
        rows = layer_rows(model, group, reader, keep, units)
        set_layer(model, reader, _slice_input(get_layer(model, reader), rows))
    if group.literals:
        _lower_literals(model, group, units - int(keep.numel()))


def _lower_literals(model: nn.Module, group: UnitGroup, removed: int) -> None:
    """Lower the graph's literal sizes that count the group's units (`UnitGroup.literals`)."""
    if not isinstance(model, fx.GraphModule):
        raise SpecError(f"group {group.name!r} rewrites graph literals; the model is no graph")
    nodes = {n.name: n for n in model.graph.nodes}
    for name, index, entry, per in group.literals:
        node = nodes.get(name)
        if node is None or index >= len(node.args):
            raise SpecError(f"group {group.name!r}: graph node {name!r} is gone")
        args = list(node.args)
        if entry < 0:
            args[index] = int(args[index]) - removed * per
        else:
            sizes = list(args[index])
            sizes[entry] = int(sizes[entry]) - removed * per
            args[index] = sizes
        node.args = tuple(args)
    model.recompile()
