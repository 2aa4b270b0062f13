"""Effective dimensionality of chosen layers over training (seed 000 Fig. 1, 3b; ALGORITHMS §1).

Call `effective_dim_curve` after every epoch (e.g. from `core.train.train`'s `on_epoch`) and
append the result: the full sorted spectrum per layer and m_e(tau) for every threshold tau.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from core.errors import SpecError
from core.pca import collect_input_stats, effective_dimensionality


def effective_dim_curve(model: nn.Module, layer_names: Sequence[str], dataset: Dataset,
                        thresholds: Sequence[float], samples: int = 5000, *,
                        batch_size: int = 256, device: str | torch.device = "cpu",
                        spectrum: int | None = None) -> dict[str, dict[str, Any]]:
    """`{layer: {"eigvals": [...descending...], "effective_dim": {tau: m_e(tau)}}}`.

    One forward pass over the first `samples` items of `dataset` (eval mode, no_grad; the
    model's mode is restored) — `core.pca.collect_input_stats`; m_e(tau) = number of
    eigenvalues > tau (at least 1). Keys of "effective_dim" are the thresholds as given.
    `spectrum=None`: the full spectrum (a dense eigh per layer: about a minute for Conv4's
    6,272-dim fc1 on 2 cores). `spectrum=k`: only the leading eigenvalues needed — every
    eigenvalue above the smallest threshold and at least k of them (`keep`, Gram route where
    the samples are fewer than the dims); m_e(tau) is the same.
    """
    taus = list(thresholds)
    if not taus:
        raise SpecError("thresholds must name at least one threshold, e.g. [0.1]")
    keep = None
    if spectrum is not None:
        need = [{"threshold": min(taus)}, {"dims": int(spectrum)}]
        keep = {name: need for name in layer_names}
    stats = collect_input_stats(model, list(layer_names), dataset, samples=samples,
                                batch_size=batch_size, device=device, keep=keep)
    return {name: {"eigvals": [float(v) for v in st.eigvals],
                   "effective_dim": {tau: effective_dimensionality(st.eigvals, threshold=tau)
                                     for tau in taus}}
            for name, st in stats.items()}
