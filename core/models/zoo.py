"""Moved to `core.zoo` (the zoo sits at the bottom of core's layering); kept for old imports."""
from __future__ import annotations

from core.zoo import (
    ACTIVATIONS,
    INITS,
    MLP,
    ZOO,
    BasicBlock,
    ConvNet,
    LeNet5,
    ResNet,
    init_weights,
)

__all__ = ["ACTIVATIONS", "INITS", "MLP", "ZOO", "BasicBlock", "ConvNet", "LeNet5", "ResNet",
           "init_weights"]
