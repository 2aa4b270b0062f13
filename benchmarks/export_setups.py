"""The models and method settings of `benchmarks.export`: each method applied with core's
functions directly, at its BENCHMARKS.md setting where that section has one for the model.

Settings (the model's PCN dims are the kept input dims of the layer; ResNet dims scale with
the width: a quarter of the layer's input channels, as the width-4 `pcn1` / `pcn2` settings of
the wide ResNet-20 section, whose dims 16/32/64 are a quarter of 64/128/256):
* pcn (input-based): LeNet-300-100 `d128-64-32`; LeNet-5 conv2 10, fc1 64, fc2 32 (no
  BENCHMARKS setting: ours); Conv4 `all-32-32-64-64-64`; ResNet-20 `pcn1`.
* pcn-out (input- and output-based): LeNet-300-100 and LeNet-5 the pcn setting plus pruning each
  transformed hidden layer's producer to twice its reader's dims (ours); Conv4 `fc1-64-out`
  (fc1 64 + output-based pruning of conv4's channels, "auto"); ResNet-20 `pcn2`.
* lowrank: `{"mac_ratio": 0.3}`, output-perturbation scores (on `lowrank_samples` images), no
  blocking, every Linear/Conv2d.
* cp-0.5 / cp-0.25: `channel_prune` l1, global, `{"mac_ratio": 0.5}` / `0.25`, round_to 1 (the
  BENCHMARKS setting); cp-0.5-r16: the same at 0.5 with `round_to` 16 (kept widths multiples of
  16, the channel block of onnxruntime's NCHWc convolutions on AVX-512).
* snip: global SNIP at 90 % sparsity, one labelled batch of 100 (masks: dense weights with
  zeros).
* dctps: density 1 %, equal per layer, trainable alpha; exported dense-equivalent (`dctps`) and
  with D implicit (`dctps-implicit`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core import pca
from core.channel_prune import ChannelPruneConfig, channel_prune
from core.configs import LowRankConfig, PruneConfig
from core.data import ArrayDataset
from core.dctps import dctps_transform
from core.lowrank import lowrank_plan, lowrank_transform
from core.masks import apply_masks
from core.pcn_output import pcn_transform
from core.prune import prune_masks

INPUT_SHAPE = [1, 28, 28]
MODELS: dict[str, dict[str, Any]] = {
    "lenet300": {"name": "lenet300"},
    "lenet5": {"name": "lenet5"},
    "conv4": {"name": "conv4"},
    "resnet20": {"name": "resnet", "depth": 20, "width": 1},
    "resnet20x4": {"name": "resnet", "depth": 20, "width": 4},
}
LABELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "conv4": "Conv4",
          "resnet20": "ResNet-20", "resnet20x4": "ResNet-20 x4"}
METHODS = ("pcn", "pcn-out", "lowrank", "cp-0.5", "cp-0.5-r16", "cp-0.25", "snip", "dctps")
STRUCTURED = ("pcn", "pcn-out", "lowrank", "cp-0.5", "cp-0.5-r16", "cp-0.25")


def _per(dims: dict[str, int]) -> dict[str, Any]:
    return {"per_layer": {n: {"dims": k} for n, k in dims.items()}}


def _pcn(dims: dict[str, int], output: dict[str, Any] | str | None = None) -> dict[str, Any]:
    return {"layers": list(dims), "select": _per(dims), "output": output}


def _resnet_dims(width: int, first_stage: int) -> dict[str, int]:
    """pcn1's layers (every conv of every block from `first_stage`), dims = a quarter of the
    layer's input channels (`16 * width * 2**(s-1)` in stage s; block 0 reads stage s-1)."""
    dims: dict[str, int] = {}
    for s in range(first_stage, 4):
        rest = 4 * width * 2 ** (s - 1)
        first_in = rest if s == 1 else rest // 2
        dims |= {f"stage{s}.0.conv1": first_in, f"stage{s}.0.shortcut_conv": first_in,
                 f"stage{s}.0.conv2": rest}
        for b in (1, 2):
            dims |= {f"stage{s}.{b}.conv1": rest, f"stage{s}.{b}.conv2": rest}
    if first_stage == 1:  # stage 1 has no projection shortcut
        dims.pop("stage1.0.shortcut_conv")
    return dims


def pcn_settings(model: str) -> dict[str, dict[str, Any]]:
    """`pcn` and `pcn-out` as `core.pcn_output.pcn_transform` arguments."""
    if model == "lenet300":
        dims = {"fc1": 128, "fc2": 64, "fc3": 32}
        return {"pcn": _pcn(dims), "pcn-out": _pcn(dims, {"fc1": {"keep": 128},
                                                          "fc2": {"keep": 64}})}
    if model == "lenet5":
        dims = {"conv2": 10, "fc1": 64, "fc2": 32}
        return {"pcn": _pcn(dims), "pcn-out": _pcn(dims, {"fc1": {"keep": 64}})}
    if model == "conv4":
        return {"pcn": _pcn({"conv2": 32, "conv3": 32, "conv4": 64, "fc1": 64, "fc2": 64}),
                "pcn-out": _pcn({"fc1": 64}, "auto")}
    width = int(MODELS[model]["width"])
    dims = _resnet_dims(width, 1)
    keep = 16 * width  # a quarter of stage 3's 64 * width channels
    out = {"stage3": {"keep": keep}, **{f"stage3.{b}.conv1": {"keep": keep} for b in range(3)}}
    return {"pcn": _pcn(dims), "pcn-out": _pcn({**dims, "fc": 16 * width}, out)}


def nnz_macs(model: nn.Module) -> int:
    """MACs of one sample counting only the non-zero weights of every Linear/Conv2d (a masked
    model's nominal cost on a sparse runtime)."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        nnz = int(torch.count_nonzero(module.weight))  # type: ignore[arg-type]
        positions = output[0].numel() // output.shape[1] if output.dim() == 4 else 1
        total += nnz * positions

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(torch.zeros(1, *INPUT_SHAPE))
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    return total


def build_method(method: str, model_name: str, dense: nn.Module, calib: ArrayDataset, *,
                 lowrank_samples: int = 32) -> tuple[nn.Module, dict[str, Any]]:
    """(compressed copy, what was done) for one method; `dense` is left as it is."""
    makers: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
        "pcn": lambda: _pcn_model(pcn_settings(model_name)["pcn"], dense, calib),
        "pcn-out": lambda: _pcn_model(pcn_settings(model_name)["pcn-out"], dense, calib),
        "lowrank": lambda: _lowrank(dense, calib.x[:lowrank_samples], 0.3),
        "cp-0.5": lambda: _channel_prune(dense, 0.5),
        "cp-0.5-r16": lambda: _channel_prune(dense, 0.5, round_to=16),
        "cp-0.25": lambda: _channel_prune(dense, 0.25),
        "snip": lambda: _snip(dense, calib, 0.9),
        "dctps": lambda: _dctps(dense, 0.01),
    }
    return makers[method]()


def _pcn_model(setting: dict[str, Any], dense: nn.Module, calib: ArrayDataset
               ) -> tuple[nn.Module, dict[str, Any]]:
    layers = setting["layers"]
    stats = pca.collect_input_stats(dense, layers, calib, samples=len(calib),
                                    top_k=max(d["dims"] for d in
                                              setting["select"]["per_layer"].values()))
    net, report = pcn_transform(dense, stats, setting["select"], layers,
                                output=setting["output"])
    return net, {"dims": {n: r["dims"] for n, r in report["input"].items()},
                 "output_keep": {g: r["keep"] for g, r in report["output"].items()}}


def _lowrank(dense: nn.Module, inputs: torch.Tensor, ratio: float
             ) -> tuple[nn.Module, dict[str, Any]]:
    plan = lowrank_plan(dense, LowRankConfig(target={"mac_ratio": ratio}),
                        input_shape=INPUT_SHAPE, inputs=inputs)
    net, _ = lowrank_transform(dense, plan)
    return net, {"ranks": {n: sum(p["ranks"]) for n, p in plan.items()}}


def _channel_prune(dense: nn.Module, ratio: float, round_to: int = 1
                   ) -> tuple[nn.Module, dict[str, Any]]:
    net, report = channel_prune(dense, ChannelPruneConfig(target={"mac_ratio": ratio},
                                                          round_to=round_to))
    return net, {"kept": {g: r["kept"] for g, r in report["groups"].items()}}


def _snip(dense: nn.Module, calib: ArrayDataset, sparsity: float
          ) -> tuple[nn.Module, dict[str, Any]]:
    import copy

    net = copy.deepcopy(dense)
    batch = [(calib.x[:100], calib.y[:100])]
    masks = prune_masks(net, PruneConfig(op="snip", sparsity=sparsity), batches=batch)
    apply_masks(net, masks)
    return net, {"sparsity": sparsity}


def _dctps(dense: nn.Module, density: float) -> tuple[nn.Module, dict[str, Any]]:
    import copy

    net = copy.deepcopy(dense)
    report = dctps_transform(net, density, "epl", "trainable",
                             generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # S starts at zero: give it values so the export is not trivial
        for module in net.modules():
            values: Any = getattr(module, "values", None)
            if hasattr(module, "alpha_mode") and isinstance(values, torch.Tensor):
                values.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    return net, {"density": density, "nnz": sum(r["nnz"] for r in report["layers"].values())}
