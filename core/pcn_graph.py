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
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from core.errors import SpecError
from core.models.zoo import MLP, ConvNet, LeNet5, ResNet


@dataclass(frozen=True)
class UnitGroup:
    """Units pruned together; `norms[i]` is the BatchNorm right after `producers[i]` (or None)."""

    name: str
    producers: tuple[str, ...]
    norms: tuple[str | None, ...]
    readers: tuple[tuple[str, ...], ...]

    @property
    def reader_layers(self) -> tuple[str, ...]:
        return tuple(n for tensor in self.readers for n in tensor)


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
    """Every prunable unit group of a zoo model, by name (see the module docstring)."""
    if isinstance(model, ResNet):
        groups = _resnet_groups(model)
    else:
        names = _sequential_names(model)
        groups = [UnitGroup(a, (a,), (None,), ((b,),)) for a, b in itertools.pairwise(names)]
    return {g.name: g for g in groups}


def shared_input_sets(model: nn.Module) -> list[tuple[str, ...]]:
    """Sets of >= 2 layers that read the same tensor (they share U; seed 000 App. D, Fig. 4)."""
    try:
        groups = unit_groups(model)
    except SpecError:
        return []
    return [tensor for g in groups.values() for tensor in g.readers if len(tensor) > 1]
