"""Spectral redundancy analyses of one layer's weight (seed 001 §3.3; ALGORITHMS.md §6).

Matrix view: rows are units; a Linear weight is `(m, n) = (out, in)`, a Conv2d weight
`(C_out, C_in, kh, kw)` is viewed as `(C_out, C_in*kh*kw)`. Everything runs in float64 under
`torch.no_grad()`.

* `spectrum`: the eigenvalues of the correlation matrix `X = W W^T` against the Marchenko–Pastur
  law for iid entries of the layer's init variance (seed 001 §3.3 "Random Matrix Theory").
* `elbow`: residual energy of the best rank-k approximation vs k and its knee; `rank_k_projection`
  / `elbow_accuracy` put the rank-k weight back into the network (seed 001 §3.3 "Orthogonal
  Projections", Fig. 8).
* `principal_angles`: angles between the top-k row spaces of two weights of the same shape
  (seed 001 §3.2 "Additional observations": the learned subspaces of two runs are compared).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from core.applies import conv_kind, register_applies
from core.errors import SpecError
from core.surgery import get_layer, set_layer

INIT_SCHEMES = ("torch", "glorot", "kaiming")


def weight_matrix(w: torch.Tensor | nn.Module) -> torch.Tensor:
    """The float64 `(m, n)` matrix view of a weight tensor or of a Linear/Conv2d layer's weight."""
    if isinstance(w, nn.Module):
        if not isinstance(w, (nn.Linear, nn.Conv2d)):
            raise SpecError(f"a {type(w).__name__} has no unit weight matrix; "
                            "only nn.Linear and nn.Conv2d")
        w = w.weight
    if not isinstance(w, torch.Tensor) or w.ndim < 2:
        raise SpecError(f"a weight must be a tensor with >= 2 dims, got "
                        f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    w = w.detach().to(torch.float64)
    return w.reshape(w.shape[0], -1)  # (m, n) = (C_out, C_in*kh*kw)


@register_applies("analyze")
def analyze_applies(name: str, module: nn.Module) -> str | None:
    """Why the weight analyses (spectrum, elbow, angles) cannot read `module` (None: they can):
    they read one (units, inputs) matrix; the rows of a grouped conv read different inputs.
    (Unit pruning reads unit groups, `core.redundancy`.)"""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return (f"a {type(module).__name__}: the weight analyses read nn.Linear/nn.Conv2d "
                "weights only")
    if module.groups != 1:
        return (f"{conv_kind(module)}: the weight analyses read a dense layer's (C_out, "
                "C_in*kh*kw) matrix; the rows of a grouped conv read different input channels")
    return None


# ---- Marchenko–Pastur ---------------------------------------------------------------------

def init_variance(layer: nn.Module, scheme: str = "torch") -> float:
    """Per-entry variance of the weight of `layer` at initialisation under `scheme`.

    "torch": PyTorch's default `reset_parameters` (kaiming_uniform, a=sqrt(5)): U(-b, b) with
    b = 1/sqrt(fan_in), variance 1/(3 fan_in). "glorot": xavier_uniform, 2/(fan_in + fan_out).
    "kaiming": He-normal on fan_out with ReLU gain, 2/fan_out (the zoo's `init` schemes; note the
    zoo's default is glorot, the paper's models used Gaussian Glorot).
    """
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise SpecError(f"init_variance: a {type(layer).__name__} is not a Linear/Conv2d")
    w = layer.weight
    receptive = w[0][0].numel()  # kh*kw (1 for a Linear)
    fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
    if scheme == "torch":
        return 1.0 / (3.0 * fan_in)
    if scheme == "glorot":
        return 2.0 / (fan_in + fan_out)
    if scheme == "kaiming":
        return 2.0 / fan_out
    raise SpecError(f"unknown init scheme {scheme!r}; valid: {', '.join(INIT_SCHEMES)}")


def marchenko_pastur(m: int, n: int, variance: float, grid: torch.Tensor | None = None,
                     points: int = 400) -> dict:
    """Marchenko–Pastur law of the eigenvalues of `X = W W^T`, W `(m, n)` iid, entry variance σ².

    Normalisation (seed 001 §3.3): X = (1/n) (√n W)(√n W)^T, so X follows MP with scale nσ² and
    Q = n/m. Edges (either aspect): λ± = σ² (√n ± √m)² = nσ² (1 ± √(m/n))². The density is per
    eigenvalue of X (all m of them): ρ(λ) = √((λ+ - λ)(λ - λ-)) / (2π σ² m λ) on [λ-, λ+]; it
    integrates to min(1, n/m), and for m > n the rest, 1 - n/m, is an atom at 0 (`zero_mass`).
    Returns {"lambda_minus", "lambda_plus", "zero_mass", "grid" (P,), "density" (P,)}; the
    default grid is `points` points over [0, 1.1 λ+].
    """
    if m < 1 or n < 1 or not variance > 0 or not math.isfinite(variance):
        raise SpecError(f"marchenko_pastur needs m, n >= 1 and a positive variance, got "
                        f"m={m}, n={n}, variance={variance}")
    lo = variance * (math.sqrt(n) - math.sqrt(m)) ** 2
    hi = variance * (math.sqrt(n) + math.sqrt(m)) ** 2
    if grid is None:
        grid = torch.linspace(0.0, 1.1 * hi, points, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    inside = (grid > lo) & (grid < hi) & (grid > 0)
    safe = torch.where(inside, grid, torch.ones_like(grid))
    density = torch.sqrt(((hi - safe) * (safe - lo)).clamp(min=0)) / (
        2 * math.pi * variance * m * safe)
    return {"lambda_minus": lo, "lambda_plus": hi, "zero_mass": max(0.0, 1.0 - n / m),
            "grid": grid, "density": torch.where(inside, density, torch.zeros_like(density))}


def spectrum(w: torch.Tensor | nn.Module, variance: float | None = None,
             points: int = 400) -> dict:
    """Eigenvalues of `X = W W^T` (float64, descending, (m,)) against the MP law.

    `variance` defaults to PyTorch's default-init variance 1/(3n) (`init_variance(layer)`; n is
    the fan-in). `outside_fraction`: the fraction of the min(m, n) structurally non-zero
    eigenvalues that fall outside [λ-, λ+] (for m > n the m - n structural zeros belong to the
    MP atom at 0 and are not counted). Returns {"eigenvalues", "shape", "variance",
    "lambda_minus", "lambda_plus", "zero_mass", "grid", "density", "outside", "outside_fraction"}.
    """
    with torch.no_grad():
        mat = weight_matrix(w)  # (m, n)
        m, n = mat.shape
        if variance is None:
            variance = 1.0 / (3.0 * n)
        # eig(W W^T) = eig(W^T W) plus m - n zeros when m > n: decompose the smaller Gram
        gram = mat @ mat.T if m <= n else mat.T @ mat  # (min(m, n), min(m, n))
        bulk_eig = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)  # descending
        eig = torch.cat([bulk_eig, bulk_eig.new_zeros(m - bulk_eig.numel())])  # (m,)
    hi_grid = max(float(eig[0]), variance * (math.sqrt(n) + math.sqrt(m)) ** 2) * 1.05
    mp = marchenko_pastur(m, n, variance, torch.linspace(0.0, hi_grid, points,
                                                         dtype=torch.float64))
    bulk = eig[:min(m, n)]
    outside = int(((bulk < mp["lambda_minus"]) | (bulk > mp["lambda_plus"])).sum())
    return {"eigenvalues": eig, "shape": (m, n), "variance": float(variance), **mp,
            "outside": outside, "outside_fraction": outside / bulk.numel()}


# ---- elbow rank ---------------------------------------------------------------------------

def elbow(w: torch.Tensor | nn.Module) -> dict:
    """Residual energy of the rank-k approximation vs k, and its knee.

    r_k = sum_{i>k} s_i² / sum_i s_i² for k = 0..r, r = min(m, n) (Eckart–Young: the residual of
    the best rank-k approximation, seed 001 §3.3). The paper applies "the elbow method" without
    naming one; the knee here is the k whose point (k/r, r_k) lies farthest below the chord from
    (0, 1) to (1, 0) of the normalised curve (ties: smallest k; a zero matrix gives 0).
    Returns {"singular_values" (r,), "residual" (r+1,), "knee"}.
    """
    with torch.no_grad():
        s = torch.linalg.svdvals(weight_matrix(w))  # (r,) descending
    energy = s.square()
    total = float(energy.sum())
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # (r+1,)
    if total <= 0:
        return {"singular_values": s, "residual": torch.zeros_like(tail), "knee": 0}
    residual = tail / total
    r = s.numel()
    x = torch.arange(r + 1, dtype=torch.float64, device=residual.device) / r
    distance = 1.0 - x - residual  # ∝ distance below the chord x + y = 1
    return {"singular_values": s, "residual": residual, "knee": int(torch.argmax(distance))}


def rank_k_projection(layer: nn.Module, k: int) -> nn.Module:
    """A copy of `layer` whose weight is the best rank-k approximation U_k S_k V_k^T (same shape,
    dtype and bias); k in [0, min(m, n)]."""
    with torch.no_grad():
        mat = weight_matrix(layer)  # (m, n); also validates the layer type
        r = min(mat.shape)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= r:
            raise SpecError(f"rank_k_projection: k must be an int in [0, {r}], got {k!r}")
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        approx = (u[:, :k] * s[:k]) @ vh[:k]  # (m, n)
        new = copy.deepcopy(layer)
        new.weight.copy_(approx.reshape(layer.weight.shape).to(layer.weight.dtype))
    return new


def elbow_accuracy(model: nn.Module, layer: str, ks: Iterable[int],
                   evaluate: Callable[[nn.Module], float]) -> list[dict]:
    """[{"rank": k, "accuracy": evaluate(model with `layer` replaced by its rank-k projection)}],
    each on a copy in eval mode under no_grad (the model itself is left as it is)."""
    original = get_layer(model, layer)
    curve = []
    for k in ks:
        pruned = copy.deepcopy(model)
        set_layer(pruned, layer, rank_k_projection(original, k))
        pruned.eval()
        with torch.no_grad():
            curve.append({"rank": int(k), "accuracy": float(evaluate(pruned))})
    return curve


# ---- principal angles ---------------------------------------------------------------------

def principal_angles(w1: torch.Tensor | nn.Module, w2: torch.Tensor | nn.Module,
                     k: int) -> torch.Tensor:
    """Principal angles (k,), degrees, ascending, between the spans of the top-k right-singular
    vectors (the top-k row spaces, in R^n) of two weights of the same shape.

    cos θ_i are the singular values of Q1^T Q2, Q = V[:, :k] (n, k), clamped to [-1, 1].
    Independent random k-dim subspaces of R^n (k << n) give angles near 90°.
    """
    a, b = weight_matrix(w1), weight_matrix(w2)
    if a.shape != b.shape:
        raise SpecError(f"principal_angles needs weights of the same shape, got "
                        f"{tuple(a.shape)} and {tuple(b.shape)}")
    rank = min(int(torch.linalg.matrix_rank(a)), int(torch.linalg.matrix_rank(b)))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rank:
        raise SpecError(f"principal_angles: k must be an int in [1, {rank}] (the smaller "
                        f"numerical rank of the two weights), got {k!r}")
    with torch.no_grad():
        q1 = torch.linalg.svd(a, full_matrices=False).Vh[:k].T  # (n, k)
        q2 = torch.linalg.svd(b, full_matrices=False).Vh[:k].T  # (n, k)
        cos = torch.linalg.svdvals(q1.T @ q2).clamp(-1.0, 1.0)  # (k,) descending
    return torch.rad2deg(torch.arccos(cos))
