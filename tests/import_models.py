"""Architectures that are NOT in slimline's zoo, built in the tests (bring-your-own-model intake).

* `MobileNetV2ish`: inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project, BN,
  ReLU6, residual add when the shape allows), global average pooling, a linear classifier.
* `ResNet18ish`: BasicBlocks (two 3x3 convs + BN), stride-2 projection shortcuts (1x1 conv + BN).
* `TinyViT`: a patch-embedding conv, a class token, learned position embeddings, pre-norm
  blocks (LayerNorm, multi-head self-attention written as in common ViT code: one qkv Linear,
  `scaled_dot_product_attention`, an output projection), GELU MLPs, a linear head.

All take Fashion-MNIST-shaped input `(N, 1, 28, 28)` by default and are small enough to train a
few batches in seconds. `export_pt2` / `export_onnx` write the files a user would upload.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out)]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(c_in, hidden, 1))
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   ConvBNAct(hidden, c_out, 1, act=False)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    # (expand, channels, blocks, stride)
    SETTING = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1))

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNAct(in_channels, 16, 3, 1)]
        c = 16
        for t, out, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        features.append(ConvBNAct(c, 64, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18ish(nn.Module):
    """ResNet-18's layout (2 BasicBlocks per stage, 4 stages) at a small width."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c, out, stride), BasicBlock(out, out, 1)))
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image: int = 28,
                 patch: int = 7, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp: int = 64) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


ARCHITECTURES = {"mobilenetv2": MobileNetV2ish, "resnet18": ResNet18ish, "vit": TinyViT}


def make(name: str, seed: int = 0, **kwargs: object) -> nn.Module:
    """A test architecture with deterministic random weights (BN statistics made non-trivial),
    in eval mode."""
    torch.manual_seed(seed)
    return nontrivial_batchnorm(ARCHITECTURES[name](**kwargs)).eval()  # type: ignore[arg-type]


def nontrivial_batchnorm(model: nn.Module, shift: float = 0.1) -> nn.Module:
    """In place (torch's global generator): every BatchNorm2d gets running means and biases in
    [-shift, shift], running variances and weights in [0.5, 1.5] (not the identity a fresh
    BatchNorm is, so a wrong slice or fold shows). Returns `model`."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-shift, shift)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-shift, shift)
    return model


def example_input(batch: int = 2, shape: tuple[int, ...] = (1, 28, 28), seed: int = 1
                  ) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def export_pt2(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
               *, dynamic_batch: bool = True) -> Path:
    """`torch.export.save(torch.export.export(model, (x,)), path)`, with a dynamic batch
    dimension by default (what `slimline import` does)."""
    x = example_input() if example is None else example
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    program = torch.export.export(model.eval(), (x,), dynamic_shapes=dynamic)
    torch.export.save(program, str(path))
    return Path(path)


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
                *, dynamo: bool = True, opset: int = 18, keep_batchnorm: bool = False) -> Path:
    """`torch.onnx.export` with a dynamic batch dimension, by the dynamo exporter (default) or
    the TorchScript one (`dynamo=False`); the weights inside the one file (the dynamo exporter
    writes them to a separate `.data` file unless `external_data=False`). Both fold each
    BatchNorm into the conv before it, except the TorchScript one with `keep_batchnorm`
    (`do_constant_folding=False`)."""
    x = example_input() if example is None else example
    if dynamo:
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, opset_version=opset,
                          input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          external_data=False, verbose=False)
    else:
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["logits"],
                          do_constant_folding=not keep_batchnorm,
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return Path(path)
