"""Signal propagation for pruning at initialization (seed 004 ch. 4).

* inits: `init_variance_scaling` (VS-L/G/H), `init_scaled_gaussian` (SG(gamma), §4.3.1,
  Table 4.1), `init_ldi` (layerwise dynamical isometry, §4.3.3: orthogonal / delta-orthogonal).
* `orthogonality_score` (OS, §4.5.1) and `approximate_isometry` (AI, Eq. 4.8): data-free repair
  of a pruned network's layerwise orthogonality with the masks fixed.
* diagnostics: `jacobian_singular_values` (input-output Jacobian, Table 4.1 / Fig. 4.2) and
  `retained_input_heatmap` (seed 004 §3.5.4).

Weights are seen as in the thesis' code: a layer's matrix M is (fan_in, fan_out) — Linear
`W.T`, Conv2d kernels reshaped to (C_in*kh*kw, C_out) — and its Gram matrix M^T M is
(fan_out, fan_out). Masks are `{layer: BoolTensor}` from `core.prune`; a layer without a mask is
dense.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from core.errors import SpecError
from core.masks import prunable
from core.zoo import init_weights

VS_MODES = ("lecun", "glorot", "kaiming")
# Critical weight scale (edge of chaos with zero biases; Pennington et al. 2017, Xiao et al.
# 2018) for orthogonal weights: tanh is linear around 0, so its gain is 1, not torch's 5/3.
LDI_GAINS = {"linear": 1.0, "tanh": 1.0, "relu": math.sqrt(2.0)}


def _reset_biases_and_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# ---- initialisations ----

@torch.no_grad()
def init_variance_scaling(model: nn.Module, generator: torch.Generator, *,
                          mode: str = "glorot") -> None:
    """Variance-scaling init of every Linear/Conv2d weight (biases 0, BatchNorm (1, 0)).

    `glorot` (VS-G, Xavier-uniform) and `kaiming` (VS-H, He-normal fan_out) are exactly the
    zoo's `init` schemes; `lecun` (VS-L) is N(0, 1/fan_in).
    """
    if mode not in VS_MODES:
        raise SpecError(f"mode must be one of {VS_MODES}, got {mode!r}")
    if mode != "lecun":
        init_weights(model, mode, generator)
        return
    for _, layer in prunable(model):
        fan_in = layer.weight[0].numel()
        layer.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
    _reset_biases_and_norms(model)


@torch.no_grad()
def init_scaled_gaussian(model: nn.Module, gamma: float, generator: torch.Generator) -> None:
    """SG(gamma): every Linear/Conv2d weight ~ N(0, gamma) — variance gamma, not gamma/fan_in.

    Seed 004 §4.3.1 writes the variance as sigma -> (alpha / psi_l) sigma with sigma = 1 and
    gamma = alpha / psi for networks of one width, i.e. gamma already contains the 1/fan_in
    factor: Table 4.1 calls SG(1e-2) on the width-100 MLP "equivalent to variance scaling"
    (1/fan_in = 1e-2). Biases 0, BatchNorm (1, 0).
    """
    if not (gamma > 0 and math.isfinite(gamma)):
        raise SpecError(f"gamma must be a positive number, got {gamma!r}")
    for _, layer in prunable(model):
        layer.weight.normal_(0.0, math.sqrt(gamma), generator=generator)
    _reset_biases_and_norms(model)


# an imported graph's activation ops -> the LDI gain they take (GELU/SiLU/ReLU6 behave as ReLU
# around the edge of chaos' scale; sigmoid-like squashing as tanh)
_GRAPH_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "relu6": "relu", "hardtanh": "relu",
                      "hardtanh_": "relu", "gelu": "relu", "silu": "relu", "silu_": "relu",
                      "leaky_relu": "relu", "leaky_relu_": "relu", "elu": "relu",
                      "hardswish": "relu", "hardswish_": "relu", "mish": "relu",
                      "tanh": "tanh", "sigmoid": "tanh", "hardsigmoid": "tanh"}


def activation_of(model: nn.Module) -> str:
    """The nonlinearity between layers: a zoo model's `activation` kwarg (zoo models other than
    `mlp` use ReLU); an imported graph's first activation op (`_GRAPH_ACTIVATIONS`: ReLU-like
    ones count as "relu", squashing ones as "tanh"); otherwise the first Tanh/ReLU module found;
    otherwise "linear"."""
    arch = getattr(model, "slimline_arch", None)
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            parts = str(node.target).split(".") if node.op == "call_function" else []
            if len(parts) == 3 and parts[0] == "aten" and parts[1] in _GRAPH_ACTIVATIONS:
                return _GRAPH_ACTIVATIONS[parts[1]]
        return "linear"
    if arch is not None:
        return str(arch.get("activation", "relu"))
    for module in model.modules():
        if isinstance(module, nn.Tanh):
            return "tanh"
        if isinstance(module, nn.ReLU):
            return "relu"
    return "linear"


def orthogonal_matrix(rows: int, cols: int, generator: torch.Generator,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-random (rows, cols) matrix with orthonormal columns (rows >= cols) or rows:
    QR of a Gaussian matrix with the signs of diag(R) folded into Q (Mezzadri 2007)."""
    tall = rows >= cols
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # (max, min), (min, min)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
    return (q if tall else q.T).to(dtype)


@torch.no_grad()
def init_ldi(model: nn.Module, generator: torch.Generator, *, gain: float | None = None) -> None:
    """Layerwise dynamical isometry init (seed 004 §4.3.3; Saxe et al. 2014, Xiao et al. 2018).

    Linear: W = gain * (semi-)orthogonal matrix (W W^T = gain^2 I when out <= in, else
    W^T W = gain^2 I). Conv2d: delta-orthogonal — every tap zero except the kernel centre
    (kh // 2, kw // 2), which is such a (C_out, C_in) matrix. `gain=None` takes
    `LDI_GAINS[activation_of(model)]`. Biases 0, BatchNorm (1, 0).
    """
    if gain is None:
        activation = activation_of(model)
        if activation not in LDI_GAINS:
            raise SpecError(f"no LDI gain known for activation {activation!r}; pass gain=")
        gain = LDI_GAINS[activation]
    for _, layer in prunable(model):
        w = layer.weight
        q = gain * orthogonal_matrix(w.shape[0], w.shape[1], generator, w.dtype).to(w.device)
        if isinstance(layer, nn.Linear):
            w.copy_(q)
        else:
            w.zero_()
            w[:, :, w.shape[2] // 2, w.shape[3] // 2] = q
    _reset_biases_and_norms(model)


# ---- orthogonality score and approximate isometry ----

def _layer_matrices(model: nn.Module, masks: Mapping[str, torch.Tensor] | None
                    ) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, layer, M, C): M = (fan_in, fan_out) float64 weight matrix, C its mask."""
    masks = masks or {}
    layers = prunable(model)
    unknown = sorted(set(masks) - {n for n, _ in layers})
    if unknown:
        raise SpecError(f"masks for unknown layers {unknown}")
    out = []
    for name, layer in layers:
        w = layer.weight.detach()
        mask = masks.get(name)
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        if mask.shape != w.shape:
            raise SpecError(f"mask for {name!r} has shape {list(mask.shape)}, its weight "
                            f"{list(w.shape)}")
        m = w.reshape(w.shape[0], -1).T.double()  # (C_in*kh*kw, C_out)
        c = mask.to(w.device).reshape(w.shape[0], -1).T.double()
        out.append((name, layer, m, c))
    return out


def _isometry_gap(m: torch.Tensor) -> torch.Tensor:
    """||M^T M - I||_F for a (..., fan_in, fan_out) stack."""
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return torch.linalg.matrix_norm(m.mT @ m - eye)


def orthogonality_score(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
                        ) -> float:
    """OS = mean over prunable layers of ||(C*W)^T (C*W) - I||_F (seed 004 §4.5.1).

    A layer with fan_in < fan_out cannot reach 0 (its Gram matrix has rank <= fan_in)."""
    gaps = [float(_isometry_gap(m * c)) for _, _, m, c in _layer_matrices(model, masks)]
    return sum(gaps) / len(gaps)


@torch.no_grad()
def approximate_isometry(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, *,
                         lr: float = 0.1, steps: int = 10_000, tol: float = 1e-6
                         ) -> dict[str, Any]:
    """Enforce approximate isometry (AI, seed 004 Eq. 4.8), data-free, in place.

    Per layer, gradient descent on ||(C*W)^T (C*W) - I||_F over the kept weights with the mask
    C fixed (lr 0.1, up to 10k steps as in App. 4.B). Layers with equal matrix shapes are
    optimised together as one batched float64 stack (the objectives are independent). A stack
    stops when no layer's objective fell by more than `tol` in a step. C * W is written back,
    so pruned weights are zero afterwards.

    Returns `{"os_before", "os_after", "steps" (the most any stack took), "layers": {name:
    {"before", "after"}}}`.
    """
    if not (lr > 0 and steps >= 0 and tol >= 0):
        raise SpecError("approximate_isometry needs lr > 0, steps >= 0 and tol >= 0")
    entries = _layer_matrices(model, masks)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, m, _) in enumerate(entries):
        groups.setdefault(tuple(m.shape), []).append(i)
    report: dict[str, dict[str, float]] = {}
    steps_used = 0
    for indices in groups.values():
        c = torch.stack([entries[i][3] for i in indices])  # (B, fan_in, fan_out)
        m = torch.stack([entries[i][2] for i in indices]) * c
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        gap = torch.linalg.matrix_norm(m.mT @ m - eye)  # (B,)
        before = gap.clone()
        step = 0
        while step < steps:
            e = m.mT @ m - eye  # (B, fan_out, fan_out), symmetric
            # d||E||_F / dM = 2 M E / ||E||_F; only kept weights move.
            grad = 2 * (m @ e) / gap.clamp_min(1e-12)[:, None, None]
            m = m - lr * grad * c
            new_gap = torch.linalg.matrix_norm(m.mT @ m - eye)
            step += 1
            done = bool(((gap - new_gap) <= tol).all())
            gap = new_gap
            if done:
                break
        steps_used = max(steps_used, step)
        for k, i in enumerate(indices):
            name, layer, _, _ = entries[i]
            w = layer.weight
            w.copy_(m[k].T.reshape(w.shape).to(w.dtype))
            report[name] = {"before": float(before[k]), "after": float(gap[k])}
    names = [e[0] for e in entries]
    return {
        "os_before": sum(report[n]["before"] for n in names) / len(names),
        "os_after": sum(report[n]["after"] for n in names) / len(names),
        "steps": steps_used,
        "layers": {n: report[n] for n in names},
    }


# ---- diagnostics ----

def jacobian_singular_values(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Singular values of the input-output Jacobian d logits / d x (seed 004 Eq. 4.4, Table 4.1).

    One (num_classes, C*H*W) Jacobian per sample of the batch `x`, computed on a float64 copy
    of the model in eval mode (one backward pass per output; samples are independent in eval
    mode). The statistics pool the singular values of every sample: `mean`, `std`, `min`, `max`,
    `condition_number` = max / min (inf when min is 0); `values` is (N, min(classes, C*H*W)).
    Apply the masks first to measure a pruned network.
    """
    net = copy.deepcopy(model).double().eval()
    x = x.detach().double().to(next(net.parameters()).device).requires_grad_(True)
    with torch.enable_grad():
        out = net(x)  # (N, K)
        rows = [torch.autograd.grad(out[:, k].sum(), x, retain_graph=k + 1 < out.shape[1])[0]
                for k in range(out.shape[1])]
    jac = torch.stack([r.flatten(1) for r in rows], dim=1)  # (N, K, C*H*W)
    values = torch.linalg.svdvals(jac)  # (N, min(K, C*H*W))
    lo, hi = float(values.min()), float(values.max())
    return {
        "mean": float(values.mean()),
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        "min": lo,
        "max": hi,
        "condition_number": hi / lo if lo > 0 else math.inf,
        "values": values,
    }


def retained_input_heatmap(mask: torch.Tensor, input_shape: Iterable[int]) -> torch.Tensor:
    """Fraction of output units (channels) that still read each input (seed 004 Fig. 3.2).

    Linear first layer, mask (out, C*H*W): mean over outputs reshaped to `input_shape`
    (C, H, W). Conv2d first layer, mask (C_out, C_in, kh, kw): every tap slides over the whole
    image, so there is no per-pixel map; the result is the mean over output channels,
    (C_in, kh, kw) — the retained fraction of each kernel tap.
    """
    shape = tuple(int(s) for s in input_shape)
    fraction = mask.float().mean(dim=0)
    if mask.dim() == 4:
        return fraction  # (C_in, kh, kw)
    if mask.dim() != 2 or fraction.numel() != math.prod(shape):
        raise SpecError(f"a first-layer mask {list(mask.shape)} does not read inputs of shape "
                        f"{list(shape)}")
    return fraction.reshape(shape)  # (C, H, W)
