"""Small models shared by the core tests."""
from __future__ import annotations

import torch

from core.models import build


def double_model(arch, seed=0):
    """A float64 zoo model in eval mode with non-zero biases (so b~ = b + W mu is exercised)."""
    torch.manual_seed(seed)
    model = build(arch).double().eval()
    for p in model.parameters():
        if p.ndim == 1:
            torch.nn.init.uniform_(p, -0.1, 0.1)
    return model
