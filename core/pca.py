"""PCA of layer-input activations and effective dimensionality (seed 000 §2, App. A, D).

Sums are accumulated in float64 batch by batch; all activations are never held at once.
"""
from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from core.eig import SOLVERS, Enough, SampleBuffer, full_eigh, leading_eigh, top_eigh
from core.errors import SpecError
from core.layers import as_layer


class StreamingCovariance:
    """Running float64 sums of m-dimensional samples, shifted by the first batch's mean.

    Each batch's `sum (h - s)` and `(h - s)^T (h - s)` are computed in the samples' own dtype
    (float32 activations: float32 products, about twice the float64 speed) on their device, and
    accumulated in float64 on the CPU. The shift `s` (the first batch's mean) keeps the
    products centred, so `C = (S2 - n d d^T) / (n - 1)` with `d = S1 / n` does not lose
    precision to a large mean (the classic cancellation of the raw-moment formula).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.shift: torch.Tensor | None = None  # (dim,) float64
        self.sum = torch.zeros(dim, dtype=torch.float64)  # of (h - shift)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)  # of (h - shift)(h - shift)^T
        self.count = 0

    def update(self, h2d: torch.Tensor) -> None:
        """Add a batch of samples, shape (B, dim)."""
        if h2d.ndim != 2 or h2d.shape[1] != self.dim:
            raise ValueError(f"expected a (B, {self.dim}) batch, got {tuple(h2d.shape)}")
        h = h2d.detach()
        if h.dtype not in (torch.float32, torch.float64):
            h = h.to(torch.float64)
        if h.shape[0] == 0:
            return
        if self.shift is None:
            # representable in h's dtype, so `h - shift` below subtracts the exact shift
            self.shift = h.mean(dim=0).to(torch.float64).cpu()
        hs = h - self.shift.to(device=h.device, dtype=h.dtype)
        self.sum += hs.sum(dim=0).to(device="cpu", dtype=torch.float64)
        self.outer += (hs.T @ hs).to(device="cpu", dtype=torch.float64)  # (dim, dim)
        self.count += h.shape[0]

    def mean(self) -> torch.Tensor:
        assert self.shift is not None
        return self.shift + self.sum / self.count

    def finalize(self, top_k: int | None = None, *, solver: str = "auto",
                 generator: torch.Generator | None = None, enough: Enough | None = None,
                 k0: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu, eigvals in descending order, eigvecs as columns), all float64.

        Eigenvector signs are fixed so that the entry with the largest magnitude in each
        column is positive (deterministic output). `top_k=None` (default): all m eigenpairs.
        `top_k=k`: only the k leading ones (eigvals (k,), eigvecs (m, k)); `solver` 'eigh'
        (full eigh, truncated), 'subspace' (`core.eig.top_eigh`) or 'auto' (subspace when k is
        small against m). `enough` (instead of top_k; `core.eig.leading_eigh`): as many
        leading pairs as that predicate needs.
        """
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        if solver not in ("auto", "eigh", "subspace"):
            raise ValueError(f"solver must be 'auto', 'eigh' or 'subspace' for a covariance, "
                             f"got {solver!r}")
        cov = self.covariance()
        mu = self.mean()
        if enough is not None:
            eigvals, eigvecs = leading_eigh(cov, enough, k0=k0, generator=generator)
            return mu, eigvals, eigvecs
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
        d = self.sum / n
        cov = (self.outer - n * torch.outer(d, d)) / (n - 1)
        return (cov + cov.T) / 2  # remove round-off asymmetry before eigh

    def total_variance(self) -> float:
        """trace(C): the sum of all m eigenvalues, known without an eigen-decomposition."""
        n = self.count
        d = self.sum / n
        return float((torch.diagonal(self.outer) - n * d * d).sum() / (n - 1))


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
    # any weight layer (`core.layers`): a PCN layer's input is the original m-dim activation
    # (before its frozen projection), so its spectrum is tracked like the layer it replaced
    layer = as_layer(module)
    return layer.kind if layer is not None else None


def selector_enough(selectors: Sequence[dict[str, Any]], total_variance: float) -> Enough:
    """A `core.eig.Enough` predicate: True once the leading eigenvalues computed so far decide
    `effective_dimensionality` for every selector ({'threshold'|'dims'|'energy': value}) —
    threshold t: the last computed eigenvalue is <= t; dims d: d computed; energy f: the
    computed ones explain >= f of `total_variance`."""
    for sel in selectors:
        if len(sel) != 1 or next(iter(sel)) not in ("threshold", "dims", "energy"):
            raise SpecError(f"a selector is one of {{'threshold'|'dims'|'energy': value}}, "
                            f"got {sel!r}")

    def enough(e: torch.Tensor) -> bool:
        for sel in selectors:
            (kind, value), = sel.items()
            if kind == "threshold" and float(e[-1]) > value:
                return False
            if kind == "dims" and e.numel() < value:
                return False
            if (kind == "energy" and total_variance > 0
                    and float(e.clamp(min=0).sum()) / total_variance < value - 1e-12):
                return False
        return True
    return enough


def collect_input_stats(model: nn.Module, layer_names: Sequence[str], dataset: Dataset, *,
                        samples: int = 5000, batch_size: int = 256,
                        device: str | torch.device = "cpu", top_k: int | None = None,
                        solver: str = "auto",
                        generator: torch.Generator | None = None,
                        keep: Mapping[str, Sequence[dict[str, Any]]] | None = None,
                        max_rows: int | None = None,
                        timings: dict[str, float] | None = None) -> dict[str, LayerStats]:
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

    `keep` (solver 'auto' only; the fast path of a transform): for each named layer, the
    selectors its dims will be chosen by (`selector_enough`); only the leading eigenpairs
    they need are computed (`core.eig.leading_eigh`; Gram route when N' < m), with
    `total_variance` set. Layers not in `keep` follow `top_k`.

    `max_rows` (optional): at most about this many samples per conv layer — a uniformly random
    subset of the N*h*w positions, drawn batch by batch (seeded; an unbiased estimate of the
    same covariance, for a fraction of the cost). Linear layers always use every sample.

    `timings` (optional dict): filled with `pass_s` (the forward pass with the hooks'
    accumulation) and `solve_s` (the eigensolvers).
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
        kinds[name] = kind
        dims[name] = as_layer(modules[name]).in_dim  # type: ignore[union-attr]
    if samples < 2:
        raise SpecError(f"samples must be >= 2, got {samples}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < 2):
        raise SpecError(f"max_rows must be an integer >= 2 or None, got {max_rows!r}")
    keep = dict(keep or {})
    if keep and solver != "auto":
        raise SpecError(f"keep (compute only the kept components) needs solver 'auto', "
                        f"got {solver!r}")
    unknown = sorted(set(keep) - set(dims))
    if unknown:
        raise SpecError(f"keep names layers whose statistics are not collected: {unknown}")
    total = min(samples, len(dataset))  # type: ignore[arg-type]
    # accumulators are created on a layer's first batch, when its rows per item are known
    accs: dict[str, StreamingCovariance | SampleBuffer] = {}
    batch_items = [0]
    # one stream per layer: a layer's subsample does not depend on which others are collected
    base_seed = generator.initial_seed() if generator is not None else 0
    rows_gen = {n: torch.Generator().manual_seed((base_seed + zlib.crc32(n.encode())) % 2**63)
                for n in dims}

    def planned_rows(name: str, rows_per_item: int) -> int:
        rows = total * rows_per_item
        if kinds[name] == "conv" and max_rows is not None and rows > max_rows:
            batches = -(-total // batch_size)
            rows = max_rows + batches  # per-batch quotas are rounded up
        return rows

    def new_accumulator(name: str, rows_per_item: int) -> StreamingCovariance | SampleBuffer:
        rows, m = planned_rows(name, rows_per_item), dims[name]
        if solver == "gram" and rows >= m:
            raise SpecError(f"layer {name!r}: the Gram route needs fewer samples than dims, "
                            f"got {rows} samples of {m} dims; use solver 'auto' or 'subspace'")
        if solver == "gram" or (solver == "auto" and (top_k is not None or name in keep)
                                and rows < m):
            return SampleBuffer(m, rows)
        return StreamingCovariance(m)

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            h = inputs[0]
            items = batch_items[0]
            if kinds[name] == "conv":
                h = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (N,C,H,W) -> (N*H*W, C)
                if max_rows is not None and h.shape[0] * total > max_rows * items:
                    quota = -(-max_rows * items // total)  # this batch's share, rounded up
                    pick = torch.randperm(h.shape[0], generator=rows_gen[name])[:quota]
                    h = h[pick.to(h.device)]
            else:
                h = h.reshape(-1, h.shape[-1])  # (N, m)
            if name not in accs:
                rows_per_item = (inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
                                 if kinds[name] == "conv" else h.shape[0]) // items
                accs[name] = new_accumulator(name, rows_per_item)
            accs[name].update(h)
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in dims]
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    started = time.perf_counter()
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
    solve_started = time.perf_counter()
    stats = {}
    for name in dims:
        acc = accs.get(name)
        if acc is None:
            raise SpecError(f"layer {name!r} was not reached by the forward pass")
        stats[name] = _finalize(acc, kinds[name], top_k=top_k, solver=solver,
                                generator=generator, selectors=keep.get(name))
    if timings is not None:
        timings["pass_s"] = solve_started - started
        timings["solve_s"] = time.perf_counter() - solve_started
    return stats


def _finalize(acc: StreamingCovariance | SampleBuffer, kind: str, *, top_k: int | None,
              solver: str, generator: torch.Generator | None,
              selectors: Sequence[dict[str, Any]] | None) -> LayerStats:
    if isinstance(acc, SampleBuffer):
        if selectors:
            mu, eigvals, eigvecs, trace = acc.finalize(
                enough_for=lambda trace: selector_enough(selectors, trace),
                k0=_first_k(selectors), generator=generator)
            total_variance = trace if eigvals.numel() < acc.dim else None
        else:
            mu, eigvals, eigvecs, _trace = acc.finalize(top_k)
            total_variance = None  # eigvals is the complete spectrum (zeros past the rank)
    elif selectors:
        trace = acc.total_variance()
        mu, eigvals, eigvecs = acc.finalize(enough=selector_enough(selectors, trace),
                                            k0=_first_k(selectors), generator=generator)
        total_variance = trace if eigvals.numel() < acc.dim else None
    elif top_k is None:
        mu, eigvals, eigvecs = acc.finalize()
        total_variance = None
    else:
        mu, eigvals, eigvecs = acc.finalize(top_k, solver=solver, generator=generator)
        total_variance = acc.total_variance() if eigvals.numel() < acc.dim else None
    return LayerStats(mu, eigvals, eigvecs, acc.count, kind, total_variance)


def _first_k(selectors: Sequence[dict[str, Any]]) -> int:
    """Where `leading_eigh` starts: the largest `dims` asked for; 32 when a threshold or an
    energy fraction is asked for too (their k is unknown until computed)."""
    dims = [int(s["dims"]) for s in selectors if "dims" in s]
    if len(dims) == len(selectors):
        return max(dims)
    return max([32, *dims])


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
