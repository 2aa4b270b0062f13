"""Unstructured pruning at initialization: score -> select -> apply (seed 004 ch. 3-4).

* score: `snip_scores` (connection sensitivity, Alg. 1 / Eq. 3.6), `magnitude_scores`,
  `random_scores`; `synflow_masks` (Tanaka et al. 2020; iterative, so it selects as it scores).
  Every score function returns `{layer: Tensor}` shaped like the layer's weight.
* select: `masks_from_scores` keeps exactly kappa = round((1 - sparsity) * n) weights, globally
  or per layer; `layer_report` / `collapsed_layers` describe the result.
* apply: `apply_masks` zeroes pruned weights in place; `core.train.train(..., masks=...)` keeps
  them at zero while training.
* storage: `pack_mask` / `unpack_mask` (1 bit per weight), `sparse_state` / `dense_from_sparse`
  (kept values + packed mask per layer instead of the dense weight).

Only the `weight` of Linear and Conv2d layers is pruned; biases, BatchNorm and PCN layers never.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import SpecError
from core.models import prunable_layers

Masks = dict[str, torch.Tensor]
Scores = dict[str, torch.Tensor]
SCOPES = ("global", "layerwise")
LABELS = ("true", "uniform")


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


# ---- scores ----

def _batch_xy(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise SpecError("snip_scores batches must be (x, y) pairs, or x tensors with labels='uniform'")


def snip_scores(model: nn.Module, batches: Iterable[object], *, labels: str = "true",
                device: str | torch.device = "cpu") -> Scores:
    """Connection sensitivity s = |sum_b g_b * w| / sum |.| (seed 004 Eq. 3.5-3.6, 4.3).

    `batches` yields `(x, y)` pairs (or bare `x` tensors for `labels="uniform"`). The loss is the
    *summed* cross-entropy of every batch, so several batches give exactly the scores of one big
    batch: the signed products g * w are accumulated and |.| is taken at the end. `labels=
    "uniform"` is unsupervised SNIP (seed 004 §4.5.2): cross-entropy against the uniform
    distribution over classes; labels are ignored.

    The model is moved to `device` and scored in eval mode (BatchNorm running statistics,
    dropout off), then its train/eval mode is restored. Gradients are taken with
    `torch.autograd.grad`, so no `.grad` is written and no parameter changes. Scores are float64,
    normalised by their global sum (left at zero when every product is zero).
    """
    if labels not in LABELS:
        raise SpecError(f"labels must be one of {LABELS}, got {labels!r}")
    device = torch.device(device)
    model.to(device)
    layers = prunable(model)
    weights = [m.weight for _, m in layers]
    param = next(model.parameters())
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    was_training = model.training
    needed = [w.requires_grad for w in weights]
    seen = 0
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                x, y = _batch_xy(batch)
                logits = model(x.to(device=device, dtype=param.dtype))
                if labels == "uniform":
                    target = torch.full_like(logits, 1.0 / logits.shape[1])
                    loss = F.cross_entropy(logits, target, reduction="sum")
                else:
                    if y is None:
                        raise SpecError("labels='true' needs (x, y) batches")
                    loss = F.cross_entropy(logits, y.to(device), reduction="sum")
                grads = torch.autograd.grad(loss, weights)
                for a, g, w in zip(acc, grads, weights):
                    a += (g.detach() * w.detach()).double()  # signed; |.| at the end
                seen += len(x)
    finally:
        for w, req in zip(weights, needed):
            w.requires_grad_(req)
        model.train(was_training)
    if seen == 0:
        raise SpecError("snip_scores needs at least one non-empty batch")
    return _normalised({name: a.abs() for (name, _), a in zip(layers, acc)})


def _normalised(scores: Scores) -> Scores:
    total = sum(float(s.sum()) for s in scores.values())
    if total > 0:
        scores = {name: s / total for name, s in scores.items()}
    return scores


def magnitude_scores(model: nn.Module) -> Scores:
    """|w| per prunable layer; meant for a *trained* model (seed 004 App. 4.B)."""
    return {name: m.weight.detach().abs().clone() for name, m in prunable(model)}


def random_scores(model: nn.Module, generator: torch.Generator) -> Scores:
    """I.i.d. uniform scores (drawn on the CPU from `generator`): global top-k of them is
    random global pruning, per-layer top-k random layerwise pruning."""
    return {name: torch.rand(m.weight.shape, generator=generator, dtype=torch.float64)
            for name, m in prunable(model)}


# ---- selection ----

def _check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise SpecError(f"sparsity must be in [0, 1) (the fraction of weights pruned), "
                        f"got {sparsity!r}")
    return s


def keep_count(total: int, sparsity: float) -> int:
    """kappa = round((1 - sparsity) * total), the number of weights kept."""
    return round((1.0 - _check_sparsity(sparsity)) * total)


def _top_mask(flat: torch.Tensor, kappa: int) -> torch.Tensor:
    """Boolean mask of the kappa largest entries; ties go to the lower index (stable sort)."""
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:kappa]] = True
    return mask


def masks_from_scores(scores: Mapping[str, torch.Tensor], sparsity: float, *,
                      scope: str = "global") -> Masks:
    """Keep the top-scored weights: `{layer: BoolTensor}` shaped like `scores`.

    `scope="global"` keeps exactly kappa = round((1 - sparsity) * n) of all n scored weights
    (seed 004 Eq. 3.7); `"layerwise"` keeps round((1 - sparsity) * n_l) in every layer.
    Ties are broken deterministically: the earlier layer (in `scores` order), then the lower
    flat index, wins. SpecError for a sparsity outside [0, 1), an unknown scope or NaN scores.
    """
    if scope not in SCOPES:
        raise SpecError(f"scope must be one of {SCOPES}, got {scope!r}")
    _check_sparsity(sparsity)
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise SpecError(f"scores of layer {name!r} contain NaN")
    if scope == "layerwise":
        return {name: _top_mask(s.flatten(), keep_count(s.numel(), sparsity)).view(s.shape)
                for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().double().cpu() for n in names])  # (n,)
    mask = _top_mask(flat, keep_count(flat.numel(), sparsity))
    out, begin = {}, 0
    for name in names:
        s = scores[name]
        out[name] = mask[begin:begin + s.numel()].view(s.shape).to(s.device)
        begin += s.numel()
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


# ---- apply ----

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


# ---- SynFlow (data-free, iterative) ----

def synflow_masks(model: nn.Module, sparsity: float, input_shape: Iterable[int], *,
                  rounds: int = 100, scope: str = "global") -> Masks:
    """SynFlow masks (Tanaka et al. 2020; seed 002 Table E.2: 100 rounds, exponential schedule).

    On a float64 copy in eval mode with every parameter and floating buffer replaced by its
    absolute value (the "linearised" network), round k = 1..rounds computes
    R = sum(f(1)) for an all-ones input of `input_shape`, scores |dR/dw * w| of the still-kept
    weights and keeps the top (1 - sparsity)^(k / rounds) fraction of them, so the final round
    keeps exactly kappa. Pruned weights are zeroed in the copy between rounds and never return.
    The model itself is not modified.
    """
    _check_sparsity(sparsity)
    if rounds < 1:
        raise SpecError(f"rounds must be >= 1, got {rounds}")
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    layers = prunable(net)
    weights = [m.weight for _, m in layers]
    names = [n for n, _ in layers]
    originals = [w.detach().clone() for w in weights]
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in zip(names, weights)}
    x = torch.ones(1, *input_shape, dtype=torch.float64, device=weights[0].device)
    for w in weights:
        w.requires_grad_(True)
    for k in range(1, rounds + 1):
        density = (1.0 - sparsity) ** (k / rounds)
        with torch.no_grad():
            for w, w0, n in zip(weights, originals, names):
                w.copy_(w0 * masks[n])
        grads = torch.autograd.grad(net(x).sum(), weights)
        # Pruned weights get -1 (< every real score) so they are never chosen again.
        scores = {n: torch.where(masks[n], (g * w).detach().abs(), -1.0)
                  for n, g, w in zip(names, grads, weights)}
        # The last round asks for `sparsity` itself, so exactly kappa survive.
        masks = masks_from_scores(scores, sparsity if k == rounds else 1.0 - density,
                                  scope=scope)
    return masks


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
