"""Keep the top-k of score tensors: the one selection every score-based method uses.

Deterministic ties: among equal scores the lower flat index wins (in a global selection over
several layers, the earlier layer in the mapping's order, then the lower index) — the result a
stable descending sort gives, found in O(n) with `torch.topk` for the k-th largest value (the
entries tied with it past k, if any, dropped from the highest index down). A stable sort of
every score made SNIP's selection cost several training steps (benchmarks/selection.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from core.errors import SpecError

SCOPES = ("global", "layerwise")


def check_sparsity(sparsity: float) -> float:
    """`sparsity` as a float, SpecError unless it is in [0, 1)."""
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise SpecError(f"sparsity must be in [0, 1) (the fraction of weights pruned), "
                        f"got {sparsity!r}")
    return s


def keep_count(total: int, sparsity: float) -> int:
    """kappa = round((1 - sparsity) * total), the number of weights kept."""
    return round((1.0 - check_sparsity(sparsity)) * total)


def top_k_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (like `flat`, 1-D) of the k largest entries; ties go to the lower index.

    Equal to marking `torch.sort(flat, descending=True, stable=True).indices[:k]`. NaN scores
    are the caller's to refuse (see `masks_from_scores`).
    """
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if k <= n - k + 1:  # the k-th largest value, from the smaller side
        kth = torch.topk(flat, k, sorted=False).values.min()
    else:  # = the (n - k + 1)-th smallest
        kth = torch.topk(flat, n - k + 1, largest=False, sorted=False).values.max()
    mask = flat >= kth
    extra = int(mask.sum()) - k  # entries tied with the k-th value beyond k
    if extra > 0:  # the tied entries with the highest indices go
        tied = torch.nonzero(flat == kth).flatten()
        mask[tied[tied.numel() - extra:]] = False
    return mask


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k largest entries of `scores` (ties: lower index)."""
    return torch.nonzero(top_k_mask(scores.flatten(), k)).flatten()


def masks_from_scores(scores: Mapping[str, torch.Tensor], sparsity: float, *,
                      scope: str = "global") -> dict[str, torch.Tensor]:
    """Keep the top-scored weights: `{layer: BoolTensor}` shaped like `scores`.

    `scope="global"` keeps exactly kappa = round((1 - sparsity) * n) of all n scored weights
    (seed 004 Eq. 3.7); `"layerwise"` keeps round((1 - sparsity) * n_l) in every layer.
    Ties are broken deterministically: the earlier layer (in `scores` order), then the lower
    flat index, wins. SpecError for a sparsity outside [0, 1), an unknown scope or NaN scores.
    """
    if scope not in SCOPES:
        raise SpecError(f"scope must be one of {SCOPES}, got {scope!r}")
    check_sparsity(sparsity)
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise SpecError(f"scores of layer {name!r} contain NaN")
    if scope == "layerwise":
        return {name: top_k_mask(s.detach().flatten(), keep_count(s.numel(), sparsity))
                .view(s.shape) for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().double().cpu() for n in names])  # (n,)
    mask = top_k_mask(flat, keep_count(flat.numel(), sparsity))
    out, begin = {}, 0
    for name in names:
        s = scores[name]
        out[name] = mask[begin:begin + s.numel()].view(s.shape).to(s.device)
        begin += s.numel()
    return out
