"""The model zoo: every architecture is built from a plain kwargs dict.

Module names are stable (they are state-dict keys and layer names in job specs):
`fc1..fcL` for dense layers, `conv1..convK` for conv layers, and for the ResNet
`conv1`, `bn1`, `stage{s}.{b}.conv1|bn1|conv2|bn2|shortcut_conv|shortcut_bn`, `fc`.
Modules are registered in forward order.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import SpecError

INITS = ("glorot", "kaiming", "torch")


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise SpecError("input_shape must be [C, H, W] with positive entries, "
                        f"got {list(input_shape)}")
    c, h, w = shape
    return c, h, w


def _positive_ints(name: str, values: Sequence[int], *, allow_empty: bool = True) -> list[int]:
    out = [int(v) for v in values]
    if (not allow_empty and not out) or any(v < 1 for v in out):
        raise SpecError(f"{name} must be a list of positive integers, got {list(values)}")
    return out


def init_weights(model: nn.Module, scheme: str, generator: torch.Generator | None = None) -> None:
    """Variance-scaling init of every Linear/Conv2d weight; biases to zero; BN to (1, 0).

    glorot: Xavier-uniform (fan_in + fan_out); kaiming: He-normal, fan_out, ReLU gain;
    torch: keep PyTorch's default `reset_parameters` init.
    """
    if scheme not in INITS:
        raise SpecError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "torch":
        return
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if scheme == "glorot":
                nn.init.xavier_uniform_(module.weight, generator=generator)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu",
                                        generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# Elementwise nonlinearities an `mlp` may use between its layers (seed 004 ch. 4 studies linear
# and tanh MLPs); the name doubles as the `nn.init.calculate_gain` key.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


class MLP(nn.Module):
    """Flatten, then `fc1..fc{L}` with `activation` (ReLU by default) between; the last layer
    gives logits."""

    def __init__(self, input_shape: Sequence[int], widths: Sequence[int], num_classes: int,
                 activation: str = "relu"):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        if activation not in ACTIVATIONS:
            raise SpecError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        dims = [c * h * w, *widths, num_classes]
        self.layer_names = [f"fc{i + 1}" for i in range(len(dims) - 1)]
        for name, (d_in, d_out) in zip(self.layer_names, itertools.pairwise(dims), strict=True):
            setattr(self, name, nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = ACTIVATIONS[self.activation]
        x = x.flatten(1)  # (N, C*H*W)
        for name in self.layer_names[:-1]:
            x = phi(getattr(self, name)(x))
        return getattr(self, self.layer_names[-1])(x)


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv1 20@5x5, pool, conv2 50@5x5, pool, fc1 500, fc2 classes (no padding)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        for _ in range(2):
            h, w = _conv_out(h, 5) // 2, _conv_out(w, 5) // 2
        if h < 1 or w < 1:
            raise SpecError(f"lenet5 needs inputs of at least 16x16, got {list(input_shape)}")
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))  # (N, 50*h*w)
        return self.fc2(x)


class ConvNet(nn.Module):
    """Conv4 (seed 000 Table 4): 3x3 'same' convs, 2x2 max-pool after every second conv,
    then dense layers. Default: conv 64,64,M,128,128,M; fc 256,256,classes."""

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], fc: Sequence[int],
                 num_classes: int):
        super().__init__()
        c, h, w = _check_input_shape(input_shape)
        self.conv_names = [f"conv{i + 1}" for i in range(len(channels))]
        for i, (name, out) in enumerate(zip(self.conv_names, channels, strict=True)):
            setattr(self, name, nn.Conv2d(c, out, 3, padding=1))
            c = out
            if i % 2 == 1:
                h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise SpecError(f"input_shape {list(input_shape)} is too small for "
                            f"{len(channels) // 2} max-pools")
        dims = [c * h * w, *fc, num_classes]
        self.fc_names = [f"fc{i + 1}" for i in range(len(dims) - 1)]
        for name, (d_in, d_out) in zip(self.fc_names, itertools.pairwise(dims), strict=True):
            setattr(self, name, nn.Linear(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, name in enumerate(self.conv_names):
            x = F.relu(getattr(self, name)(x))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = x.flatten(1)  # (N, C*h*w)
        for name in self.fc_names[:-1]:
            x = F.relu(getattr(self, name)(x))
        return getattr(self, self.fc_names[-1])(x)


class BasicBlock(nn.Module):
    """He et al. (2016) basic block; `shortcut_conv` is a 1x1 projection when `project`."""

    def __init__(self, c_in: int, c_out: int, stride: int, project: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.project = project
        if project:
            self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = self.shortcut_bn(self.shortcut_conv(x)) if self.project else x
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2): three stages of n blocks with 16w, 32w, 64w filters.

    Projection shortcut in the first block of every stage (seed 000 App. E), stride-2 in the
    first block of stages 2 and 3, global average pool, `fc`.
    """

    def __init__(self, input_shape: Sequence[int], depth: int, width: float, num_classes: int):
        super().__init__()
        c, _, _ = _check_input_shape(input_shape)
        n = (depth - 2) // 6
        widths = [max(1, round(base * width)) for base in (16, 32, 64)]
        self.conv1 = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        for s, c_out in enumerate(widths):
            blocks = [BasicBlock(c_in if b == 0 else c_out, c_out,
                                 stride=2 if (b == 0 and s > 0) else 1, project=(b == 0))
                      for b in range(n)]
            setattr(self, f"stage{s + 1}", nn.ModuleList(blocks))
            c_in = c_out
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for s in (1, 2, 3):
            for block in getattr(self, f"stage{s}"):
                x = block(x)
        x = x.mean(dim=(2, 3))  # (N, C) global average pool
        return self.fc(x)


# ---- registry: name -> (defaults, constructor from normalized kwargs) ----

def _mlp(a: dict) -> nn.Module:
    return MLP(a["input_shape"], _positive_ints("widths", a["widths"]), int(a["num_classes"]),
               activation=a["activation"])


def _lenet300(a: dict) -> nn.Module:
    return MLP(a["input_shape"], [300, 100], int(a["num_classes"]))


def _lenet5(a: dict) -> nn.Module:
    return LeNet5(a["input_shape"], int(a["num_classes"]))


def _conv4(a: dict) -> nn.Module:
    channels = _positive_ints("channels", a["channels"], allow_empty=False)
    return ConvNet(a["input_shape"], channels, _positive_ints("fc", a["fc"]), int(a["num_classes"]))


def _resnet(a: dict) -> nn.Module:
    depth, width = int(a["depth"]), float(a["width"])
    if depth < 8 or (depth - 2) % 6:
        raise SpecError(f"resnet depth must be 6n+2 (e.g. 20 or 56), got {a['depth']}")
    if not math.isfinite(width) or width <= 0:
        raise SpecError(f"resnet width must be a positive number, got {a['width']}")
    return ResNet(a["input_shape"], depth, width, int(a["num_classes"]))


_COMMON = {"input_shape": [1, 28, 28], "num_classes": 10, "init": "glorot"}

ZOO: dict[str, tuple[dict, Callable[[dict], nn.Module]]] = {
    "mlp": ({**_COMMON, "widths": [300, 100], "activation": "relu"}, _mlp),
    "lenet300": (dict(_COMMON), _lenet300),
    "lenet5": (dict(_COMMON), _lenet5),
    "conv4": ({**_COMMON, "channels": [64, 64, 128, 128], "fc": [256, 256]}, _conv4),
    "resnet": ({**_COMMON, "init": "kaiming", "depth": 20, "width": 1}, _resnet),
}
