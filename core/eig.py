"""Eigen-solvers for PCA that compute only what is kept (seed 000 §2, App. A; ALGORITHMS §1).

* `full_eigh(cov)`: every eigenpair of an (m, m) covariance (`torch.linalg.eigh`, O(m^3)).
* `top_eigh(cov, k)`: the k leading eigenpairs by randomized subspace iteration with a
  Rayleigh-Ritz step (float64, fixed `torch.Generator`), O(m^2 p) per iteration, p ~ 2k. It
  stops when every kept Ritz pair has residual `||C v - e v|| <= tol * e_max` and falls back to
  `full_eigh` when it has not converged in about the cost of one eigh (or when p >= m/2).
* `gram_eigh(h)`: the N x N Gram route for N < m samples: eigh of `Hc Hc^T / (N - 1)`, then
  `v = Hc^T u / sqrt((N - 1) e)`; at most N - 1 eigenvalues are non-zero, the rest are exactly 0.
* `leading_eigh(mat, enough)`: only as many leading eigenpairs as a selector needs (`enough`
  says when the computed ones suffice, e.g. the last is below the threshold); k doubles from
  `k0`, and a dense eigh takes over once it is the cheaper route.
* `SampleBuffer`: keeps the raw samples of one layer for the Gram route (bounded: refuses more
  than `max_rows` rows, and the caller only uses it when N < m, i.e. N*m < m^2 floats — never
  more memory than the covariance route).

Every function returns eigenvalues in descending order, float64, and eigenvectors as columns
with the sign convention of `core.pca.StreamingCovariance.finalize` (the entry with the largest
magnitude in each column is positive).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

SOLVERS = ("auto", "eigh", "subspace", "gram")

# enough(eigvals_so_far) -> True when the leading eigenvalues computed so far decide the selection
Enough = Callable[[torch.Tensor], bool]
# enough_for(trace of the covariance) -> the Enough predicate (energy selectors need the trace)
EnoughFor = Callable[[float], Enough]


def fix_signs(eigvecs: torch.Tensor) -> torch.Tensor:
    """Flip columns so the largest-magnitude entry of each is positive (deterministic output)."""
    if eigvecs.shape[1] == 0:
        return eigvecs
    pivot = eigvecs.abs().argmax(dim=0)
    signs = torch.sign(eigvecs[pivot, torch.arange(eigvecs.shape[1])])
    signs[signs == 0] = 1
    return eigvecs * signs


def full_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of a symmetric matrix, descending; eigvecs (m, m)."""
    cov = cov.to(torch.float64)
    cov = (cov + cov.T) / 2  # remove round-off asymmetry before eigh
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    return eigvals.flip(0), fix_signs(eigvecs.flip(1))


def top_eigh(cov: torch.Tensor, k: int, *, oversample: int | None = None,
             max_iters: int | None = None, tol: float = 1e-9,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k leading eigenpairs of a symmetric PSD matrix: eigvals (k,), eigvecs (m, k).

    Randomized subspace iteration (Halko et al. 2011, Alg. 4.4) on p = k + oversample vectors
    (default oversample max(10, k): the convergence ratio per step is e_{p+1} / e_k),
    re-orthonormalised every step, with a Rayleigh-Ritz check every other step that reuses
    `C Q` (no extra m x m product). Stops when every kept Ritz pair has residual
    `||C v - e v|| <= tol * e_max`. Deterministic: the start block comes from `generator` (a
    fixed seed when None). Falls back to `full_eigh` when p >= m/2, or when it has not
    converged within `max_iters` (default: about the cost of one dense eigh, 3m/p steps), so
    the result is always right.
    """
    m = cov.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}], got {k}")
    cov = cov.to(torch.float64)
    cov = (cov + cov.T) / 2
    p = min(m, k + (max(10, k) if oversample is None else oversample))
    if 2 * p >= m:  # a dense eigh is cheaper than iterating on half the space
        e, v = full_eigh(cov)
        return e[:k], v[:, :k]
    if max_iters is None:
        max_iters = max(20, 3 * m // p)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    start = torch.randn(m, p, generator=generator, dtype=torch.float64).to(cov.device)
    q, _ = torch.linalg.qr(cov @ start)  # (m, p)
    for it in range(1, max_iters + 1):
        z = cov @ q  # (m, p)
        if it % 2 == 0:
            ritz_vals, s = torch.linalg.eigh(q.T @ z)  # (p,), (p, p); Rayleigh-Ritz
            ritz_vals, s = ritz_vals.flip(0)[:k], s.flip(1)[:, :k]
            vecs = q @ s  # (m, k)
            residual = torch.linalg.vector_norm(z @ s - vecs * ritz_vals, dim=0)  # C v - e v
            scale = max(float(ritz_vals[0].abs()), torch.finfo(torch.float64).tiny)
            if float(residual.max()) <= tol * scale:
                return ritz_vals, fix_signs(vecs)
        q, _ = torch.linalg.qr(z)
    e, v = full_eigh(cov)
    return e[:k], v[:, :k]


def _dense_is_cheaper(k: int, m: int) -> bool:
    """Subspace iteration on p ~ 2k vectors stops paying off against a dense eigh at p ~ m/2."""
    return 4 * (k + 10) > m


def leading_eigh(mat: torch.Tensor, enough: Enough, *, k0: int = 32, tol: float = 1e-6,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """As few leading eigenpairs of a symmetric PSD matrix as `enough` needs, descending.

    Computes k = k0 pairs (`top_eigh`), and doubles k until `enough(eigvals)` is True; once
    a dense eigh is the cheaper route (or k reaches m) it returns the whole spectrum instead.
    The result may hold more pairs than strictly needed, never fewer. `tol` is `top_eigh`'s
    residual tolerance (relative to the largest eigenvalue): 1e-6 leaves eigenvalue errors
    around 1e-12 relative (they are quadratic in the residual) and eigenvector errors around
    1e-6 — far below the sampling error of any PCA — at a third less work than 1e-9.
    """
    m = mat.shape[0]
    k = max(1, min(int(k0), m))
    while True:
        if _dense_is_cheaper(k, m):
            return full_eigh(mat)
        e, v = top_eigh(mat, k, tol=tol, generator=generator)
        if enough(e):
            return e, v
        k *= 2


def gram_eigh(h: torch.Tensor, k: int | None = None, *, enough_for: EnoughFor | None = None,
              k0: int = 32, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """PCA of N samples (rows of h, N < m typical) through the N x N Gram matrix.

    Returns (mu (m,), eigvals descending, eigvecs (m, r), total variance trace(C)). Default
    (k and enough_for None): the complete spectrum — eigvals (m,) whose entries past the rank
    (<= N - 1) are exactly 0 — and r = rank. With `k`: r = min(k, rank) vectors. With
    `enough_for` (trace(C) -> an `Enough` predicate, see `leading_eigh`): only the leading pairs
    it needs, by subspace iteration on the Gram matrix when that is cheaper than its dense
    eigh; eigvals then hold r values. The Gram product runs in h's dtype (float32 activations
    stay float32 there, centred in float64 first); everything else is float64. Equal to the
    covariance route on the non-zero part of the spectrum.
    """
    n, m = h.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    work = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float64
    hc64 = h.to(torch.float64)
    mu = hc64.mean(dim=0)
    hc64 = hc64 - mu  # (N, m)
    hc = hc64.to(work)
    gram = (hc @ hc.T).to(torch.float64) / (n - 1)  # (N, N); same non-zero spectrum as C
    del hc
    gram = (gram + gram.T) / 2
    total = float(torch.diagonal(gram).sum())
    if enough_for is not None:
        e, u = leading_eigh(gram, enough_for(total), k0=k0, generator=generator)
    else:
        e, u = torch.linalg.eigh(gram)
        e, u = e.flip(0), u.flip(1)
    # centring removes one dimension: rank <= N - 1; drop round-off eigenvalues
    cutoff = max(float(e[0]), 0.0) * max(n, m) * torch.finfo(torch.float64).eps
    rank = min(int((e > cutoff).sum()), n - 1)
    r = rank if k is None else min(k, rank)
    vecs = (hc64.T @ u[:, :r]) / torch.sqrt((n - 1) * e[:r])  # (m, r), unit columns
    if enough_for is not None:
        eigvals = e[:r].clone()
    else:
        eigvals = torch.zeros(m, dtype=torch.float64, device=h.device)
        eigvals[:rank] = e[:rank]
    return mu, eigvals, fix_signs(vecs), total


class SampleBuffer:
    """Keeps up to `max_rows` raw m-dimensional samples for `gram_eigh` (float32 samples stay
    float32: half the memory, and the Gram product runs at float32 speed)."""

    def __init__(self, dim: int, max_rows: int):
        if dim < 1 or max_rows < 1:
            raise ValueError(f"dim and max_rows must be >= 1, got {dim}, {max_rows}")
        self.dim, self.max_rows = dim, max_rows
        self.chunks: list[torch.Tensor] = []
        self.count = 0

    def update(self, h2d: torch.Tensor) -> None:
        """Add a batch of samples, shape (B, dim); ValueError past `max_rows` rows."""
        if h2d.ndim != 2 or h2d.shape[1] != self.dim:
            raise ValueError(f"expected a (B, {self.dim}) batch, got {tuple(h2d.shape)}")
        if self.count + h2d.shape[0] > self.max_rows:
            raise ValueError(f"SampleBuffer holds at most {self.max_rows} rows; use the "
                             "covariance route for more samples")
        keep = torch.float32 if h2d.dtype == torch.float32 else torch.float64
        self.chunks.append(h2d.detach().to(device="cpu", dtype=keep))
        self.count += h2d.shape[0]

    def total_variance(self) -> float:
        """trace(C) of the buffered samples, without an eigen-decomposition."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        h = torch.cat(self.chunks).to(torch.float64)
        return float(((h - h.mean(dim=0)) ** 2).sum() / (self.count - 1))

    def finalize(self, top_k: int | None = None, *, enough_for: EnoughFor | None = None,
                 k0: int = 32, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(mu, eigvals descending, eigvecs (m, r), trace(C)) via `gram_eigh`."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        return gram_eigh(torch.cat(self.chunks), top_k, enough_for=enough_for, k0=k0,
                         generator=generator)
