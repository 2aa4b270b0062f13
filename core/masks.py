"""Weight masks: which weights of the Linear/Conv2d layers are pruned, and their storage.

Masks are `{layer: BoolTensor}` shaped like the layer's `weight` (True = kept). Only the weights
of plain Linear/Conv2d layers are masked (`prunable`); biases, BatchNorm and PCN layers never.

* apply: `masked_parameters` (validated `(weight, mask)` pairs, what `core.train.train(masks=
  ...)` enforces), `apply_masks` (zero the pruned weights in place);
* describe: `layer_report`, `collapsed_layers`;
* storage: `pack_mask` / `unpack_mask` (1 bit per weight), `sparse_state` / `dense_from_sparse`
  (kept values + packed mask per layer instead of the dense weight; what checkpoint I/O uses).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from core.errors import SpecError
from core.surgery import prunable_layers

Masks = dict[str, torch.Tensor]


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv2d layers whose `weight` is pruned, in forward order (names are module
    paths, e.g. `fc1`, `stage1.0.conv2`). PCN layers are not pruned."""
    return [(n, m) for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))]


def _checked_layers(model: nn.Module, masks: Mapping[str, torch.Tensor]
                    ) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, layer, mask) for every masked layer; SpecError on unknown names or bad shapes."""
    layers = dict(prunable(model))
    out = []
    for name, mask in masks.items():
        if name not in layers:
            raise SpecError(f"mask for unknown layer {name!r}; prunable layers: "
                            f"{', '.join(layers)}")
        weight = layers[name].weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise SpecError(f"mask for {name!r} has shape {list(mask.shape)}, its weight "
                            f"{list(weight.shape)}")
        out.append((name, layers[name], mask.to(device=weight.device, dtype=torch.bool)))
    return out


def layer_report(masks: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    """Per layer `{"kept", "total", "fraction"}` (fraction = kept / total)."""
    report: dict[str, dict[str, float | int]] = {}
    for name, mask in masks.items():
        kept, total = int(mask.sum()), mask.numel()
        report[name] = {"kept": kept, "total": total, "fraction": kept / max(total, 1)}
    return report


def collapsed_layers(masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Layers with no weight left ("layer collapse": the signal path is cut)."""
    return [name for name, mask in masks.items() if not bool(mask.any())]


def masked_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor]
                      ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, bool mask on the weight's device) per masked layer, validated: SpecError on
    unknown layer names or shape mismatches. What `core.train.train(masks=...)` enforces."""
    return [(layer.weight, mask) for _, layer, mask in _checked_layers(model, masks)]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place. SpecError on unknown layers or shape mismatches."""
    for weight, mask in masked_parameters(model, masks):
        weight.mul_(mask)



# ---- storage ----

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
SPARSE_SUFFIXES = (".sparse_values", ".sparse_mask", ".sparse_shape")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask (row-major, most significant bit first, like numpy.packbits):
    a uint8 tensor of ceil(numel / 8) bytes."""
    flat = mask.detach().flatten().to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    bits = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)  # (bytes, 8)
    return (bits * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of `pack_mask`: the boolean mask of `shape`. ValueError on a size mismatch."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"a packed mask of shape {list(shape)} is a 1-D uint8 tensor of "
                         f"{(numel + 7) // 8} bytes, got {packed.dtype} {list(packed.shape)}")
    bits = (packed.cpu().unsqueeze(1) & _BITS) != 0  # (bytes, 8)
    return bits.flatten()[:numel].view(shape)


def sparse_state(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with every masked `<layer>.weight` replaced by
    `<layer>.weight.sparse_values` (the kept values, row-major, in the weight's dtype),
    `<layer>.weight.sparse_mask` (`pack_mask`) and `<layer>.weight.sparse_shape` (int64).
    Pruned positions are not stored (their values are taken as zero). CPU tensors."""
    masked = {f"{name}.weight": mask.cpu() for name, _, mask in _checked_layers(model, masks)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if key in masked:
            mask = masked[key]
            out[key + ".sparse_values"] = tensor[mask].contiguous()  # (kept,)
            out[key + ".sparse_mask"] = pack_mask(mask)
            out[key + ".sparse_shape"] = torch.tensor(tensor.shape, dtype=torch.int64)
        else:
            out[key] = tensor.clone()
    return out


def dense_from_sparse(sparse: Mapping[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], Masks]:
    """Inverse of `sparse_state`: `(state_dict, masks)` with dense weights (zeros where pruned)
    and `{layer: BoolTensor}`. ValueError when a sparse entry is incomplete or inconsistent."""
    state: dict[str, torch.Tensor] = {}
    masks: Masks = {}
    bases = {k[:-len(".sparse_values")] for k in sparse if k.endswith(".sparse_values")}
    for key, tensor in sparse.items():
        if not key.endswith(SPARSE_SUFFIXES):
            state[key] = tensor
    for base in sorted(bases):
        try:
            values = sparse[base + ".sparse_values"]
            shape = [int(s) for s in sparse[base + ".sparse_shape"].tolist()]
            mask = unpack_mask(sparse[base + ".sparse_mask"], shape)
        except KeyError as exc:
            raise ValueError(f"sparse entry {base!r} lacks {exc.args[0]!r}") from None
        if int(mask.sum()) != values.numel():
            raise ValueError(f"sparse entry {base!r}: the mask keeps {int(mask.sum())} weights "
                             f"but {values.numel()} values are stored")
        dense = values.new_zeros(shape)
        dense[mask] = values
        state[base] = dense
        masks[base.removesuffix(".weight")] = mask
    return state, masks
