"""PCA of layer-input activations and effective dimensionality (seed 000 §2, App. A, D).

Sums are accumulated in float64 batch by batch; all activations are never held at once.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from core.eig import SOLVERS, SampleBuffer, full_eigh, top_eigh
from core.errors import SpecError


class StreamingCovariance:
    """Running float64 `sum h`, `sum h h^T` and `count` of m-dimensional samples."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, h2d: torch.Tensor) -> None:
        """Add a batch of samples, shape (B, dim)."""
        if h2d.ndim != 2 or h2d.shape[1] != self.dim:
            raise ValueError(f"expected a (B, {self.dim}) batch, got {tuple(h2d.shape)}")
        h = h2d.detach().to(device="cpu", dtype=torch.float64)
        self.sum += h.sum(dim=0)
        self.outer += h.T @ h  # (dim, dim)
        self.count += h.shape[0]

    def finalize(self, top_k: int | None = None, *, solver: str = "auto",
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu, eigvals in descending order, eigvecs as columns), all float64.

        C = (sum h h^T - n mu mu^T) / (n - 1). Eigenvector signs are fixed so that the entry
        with the largest magnitude in each column is positive (deterministic output).
        `top_k=None` (default): all m eigenpairs. `top_k=k`: only the k leading ones
        (eigvals (k,), eigvecs (m, k)); `solver` 'eigh' (full eigh, truncated), 'subspace'
        (`core.eig.top_eigh`) or 'auto' (subspace when k is small against m).
        """
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        if solver not in ("auto", "eigh", "subspace"):
            raise ValueError(f"solver must be 'auto', 'eigh' or 'subspace' for a covariance, "
                             f"got {solver!r}")
        cov = self.covariance()
        mu = self.sum / self.count
        if top_k is None:
            eigvals, eigvecs = full_eigh(cov)
            return mu, eigvals, eigvecs
        k = min(int(top_k), self.dim)
        if solver == "subspace" or (solver == "auto" and 4 * (k + 10) <= self.dim):
            eigvals, eigvecs = top_eigh(cov, k, generator=generator)
        else:
            eigvals, eigvecs = full_eigh(cov)
        return mu, eigvals[:k], eigvecs[:, :k]

    def covariance(self) -> torch.Tensor:
        """The (m, m) float64 sample covariance (divides by n - 1)."""
        n = self.count
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return (cov + cov.T) / 2  # remove round-off asymmetry before eigh

    def total_variance(self) -> float:
        """trace(C): the sum of all m eigenvalues, known without an eigen-decomposition."""
        n = self.count
        mu = self.sum / n
        return float((torch.diagonal(self.outer) - n * mu * mu).sum() / (n - 1))


@dataclass(frozen=True)
class LayerStats:
    """PCA of one layer's input: `eigvecs[:, i]` belongs to `eigvals[i]` (descending)."""

    mu: torch.Tensor  # (m,)
    eigvals: torch.Tensor  # (m,)
    eigvecs: torch.Tensor  # (m, m)
    count: int  # number of m-dimensional samples (N*h*w for conv)
    kind: str  # 'linear' | 'conv'
    # trace(C) when `eigvals` is only the leading part of the spectrum (top_k); None: complete
    total_variance: float | None = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _layer_kind(module: nn.Module) -> str | None:
    from core.pcn import PCNConv2d, PCNLinear  # core.pcn imports this module

    # a PCN layer's input is the original m-dim activation (before its frozen projection), so
    # its spectrum is tracked exactly like the layer it replaced
    if isinstance(module, (nn.Linear, PCNLinear)):
        return "linear"
    if isinstance(module, (nn.Conv2d, PCNConv2d)):
        return "conv"
    return None


def collect_input_stats(model: nn.Module, layer_names: Sequence[str], dataset: Dataset, *,
                        samples: int = 5000, batch_size: int = 256,
                        device: str | torch.device = "cpu", top_k: int | None = None,
                        solver: str = "auto",
                        generator: torch.Generator | None = None) -> dict[str, LayerStats]:
    """PCA of the inputs of the named Linear/Conv2d layers from ONE forward pass.

    Uses the first `samples` items of `dataset` (pass a shuffled subset for a random sample).
    Runs in eval mode under no_grad and restores the model's train/eval mode afterwards.
    For conv layers every spatial position is a sample; zero padding is not included.

    Wide inputs (optional): `top_k=k` computes only the k leading eigenpairs per layer
    (`eigvals` (k,), `eigvecs` (m, k), `LayerStats.total_variance` = trace(C)). `solver`:
    'auto' (default; with `top_k=None` this is exactly the full `eigh`; with `top_k` it takes
    the Gram route when a layer sees fewer samples N' than dims m, else subspace iteration when
    k is small against m, else eigh), 'eigh', 'subspace' (`core.eig.top_eigh`, seeded by
    `generator`) or 'gram' (`core.eig.gram_eigh`; keeps the N' x m samples, only allowed when
    N' < m — SpecError otherwise). Gram-route stats have `eigvals` (m,) whose entries past the
    rank (<= N' - 1) are 0 and `eigvecs` (m, r) with r = min(top_k, rank).
    """
    if solver not in SOLVERS:
        raise SpecError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise SpecError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    modules = dict(model.named_modules())
    dims: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for name in layer_names:
        kind = _layer_kind(modules[name]) if name in modules else None
        if kind is None:
            valid = [n for n, m in modules.items() if _layer_kind(m)]
            raise SpecError(f"layer {name!r} is not a Linear/Conv2d layer of the model; "
                            f"valid layers: {', '.join(valid)}")
        m = modules[name]
        kinds[name] = kind
        dims[name] = m.in_features if kind == "linear" else m.in_channels
    if samples < 2:
        raise SpecError(f"samples must be >= 2, got {samples}")
    total = min(samples, len(dataset))  # type: ignore[arg-type]
    # accumulators are created on a layer's first batch, when its rows per item are known
    accs: dict[str, StreamingCovariance | SampleBuffer] = {}
    batch_items = [0]

    def new_accumulator(name: str, rows_per_item: int) -> StreamingCovariance | SampleBuffer:
        rows, m = total * rows_per_item, dims[name]
        if solver == "gram" and rows >= m:
            raise SpecError(f"layer {name!r}: the Gram route needs fewer samples than dims, "
                            f"got {rows} samples of {m} dims; use solver 'auto' or 'subspace'")
        if solver == "gram" or (solver == "auto" and top_k is not None and rows < m):
            return SampleBuffer(m, rows)
        return StreamingCovariance(m)

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            h = inputs[0]
            if kinds[name] == "conv":
                h = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (N,C,H,W) -> (N*H*W, C)
            else:
                h = h.reshape(-1, h.shape[-1])  # (N, m)
            if name not in accs:
                accs[name] = new_accumulator(name, h.shape[0] // batch_items[0])
            accs[name].update(h)
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in dims]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                batch_items[0] = stop - start
                x = _batch_inputs(dataset, start, stop)
                model(x.to(device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    stats = {}
    for name in dims:
        acc = accs.get(name)
        if acc is None:
            raise SpecError(f"layer {name!r} was not reached by the forward pass")
        if isinstance(acc, SampleBuffer):
            mu, eigvals, eigvecs = acc.finalize(top_k)
            total_variance = None  # eigvals is the complete spectrum (zeros past the rank)
        elif top_k is None:
            mu, eigvals, eigvecs = acc.finalize()
            total_variance = None
        else:
            mu, eigvals, eigvecs = acc.finalize(top_k, solver=solver, generator=generator)
            total_variance = acc.total_variance() if eigvals.numel() < acc.dim else None
        stats[name] = LayerStats(mu, eigvals, eigvecs, acc.count, kinds[name], total_variance)
    return stats


def _batch_inputs(dataset: Dataset, start: int, stop: int) -> torch.Tensor:
    x = getattr(dataset, "x", None)
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return torch.stack([dataset[i][0] for i in range(start, stop)])


def effective_dimensionality(eigvals: torch.Tensor | Sequence[float], *,
                             threshold: float | None = None, dims: int | None = None,
                             energy: float | None = None,
                             total_variance: float | None = None) -> int:
    """Number of principal components to keep; exactly one selector must be given.

    threshold t: count of eigenvalues > t (at least 1; seed 000's m_e(tau));
    dims d: d capped at m; energy f in (0, 1]: smallest k whose cumulative variance fraction >= f.
    `total_variance` (optional): trace(C) when `eigvals` holds only the leading eigenvalues
    (`collect_input_stats(top_k=...)`); energy fractions are then taken of it, and the result is
    capped at len(eigvals).
    """
    e = torch.as_tensor(eigvals, dtype=torch.float64).flatten()
    m = e.numel()
    chosen = [k for k, v in (("threshold", threshold), ("dims", dims), ("energy", energy))
              if v is not None]
    if len(chosen) != 1:
        raise SpecError(f"give exactly one of threshold, dims, energy; got {chosen or 'none'}")
    if m == 0:
        raise SpecError("eigvals is empty")
    if threshold is not None:
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise SpecError(f"threshold must be a finite number >= 0, got {threshold!r}")
        return max(1, int((e > threshold).sum()))
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise SpecError(f"dims must be an integer >= 1, got {dims!r}")
        return min(dims, m)
    assert energy is not None
    if not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise SpecError(f"energy must be a fraction in (0, 1], got {energy!r}")
    e = e.clamp(min=0)
    total = float(e.sum()) if total_variance is None else max(float(total_variance),
                                                               float(e.sum()))
    if total <= 0:
        return 1
    fractions = torch.cumsum(e, 0) / total
    # tolerance: cumulative sums can miss 1.0 by round-off
    k = int((fractions < energy - 1e-12).sum()) + 1
    return min(k, m)
