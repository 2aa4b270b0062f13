"""Every non-structured method on imported models (bring your own model).

The three architectures of `tests/import_models.py` (MobileNetV2-, ResNet-18- and ViT-style)
are exported with `torch.export` (dynamic batch), converted by `core.import_pt2` and imported
with `core.models.import_graph`; then each method runs on synthetic Fashion-MNIST-shaped data
(1, 28, 28), 10 classes: training, the pruning ops, lowrank, the PCN input transform, DCTpS,
the weight analyses, checkpoints and the ONNX export. Full-basis PCN and full-rank lowrank
reproduce the model; layers a method cannot handle are left untouched with a reason.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import fx, nn

import core.models as cm
from core.applies import why_not
from core.configs import LowRankConfig, PruneConfig
from core.data import ArrayDataset, Splits, synthetic
from core.dctps import DCTpSLayer, dctps_transform
from core.errors import SpecError
from core.export import export_onnx, export_pt2
from core.import_pt2 import graph_from_program
from core.lowrank import (
    LowRankLayer,
    full_ranks,
    lowrank_layers,
    lowrank_plan,
    lowrank_transform,
    lowrank_untouched,
    output_scores,
    output_scores_naive,
)
from core.metrics import count_macs, param_counts
from core.pca import collect_input_stats
from core.pcn import PCNConv2d, PCNLinear, pcn_untouched
from core.pcn_output import apply_pcn, chosen_layers, plan_pcn
from core.prune import apply_masks, linearise_activations, prune_masks, synflow_masks
from core.sigprop import activation_of, init_ldi, jacobian_singular_values
from core.spectra import elbow_accuracy, spectrum
from core.surgery import get_layer, prunable_layers
from core.tail import TailRunner
from core.train import TrainConfig, evaluate, train
from tests.import_models import example_input, make

ARCHS = ("mobilenetv2", "resnet18", "vit")
SHAPE = [1, 28, 28]
TOL = 1e-4

_CACHE: dict[str, nn.Module] = {}


def imported(name: str) -> nn.Module:
    """A fresh copy of the imported architecture `name` (converted once per session)."""
    if name not in _CACHE:
        program = torch.export.export(
            make(name), (example_input(),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
        _CACHE[name] = cm.import_graph(*graph_from_program(program))
    return copy.deepcopy(_CACHE[name])


_BLOBS = synthetic("synthetic-blobs", 0)  # Gaussian clusters, (1, 28, 28), 10 classes


def data(n: int = 96, seed: int = 0) -> ArrayDataset:
    """n samples of the synthetic-blobs training split (a seeded random subset)."""
    train_set = _BLOBS[0]
    return train_set.subset(torch.randperm(len(train_set),
                                           generator=torch.Generator().manual_seed(seed))[:n])


def batch(n: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of b (logits)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def reloads(model: nn.Module, tmp_path: Path) -> nn.Module:
    """`core.models.save` + `load`: the reloaded model computes what `model` computes."""
    path = tmp_path / "model.safetensors"
    cm.save(model, path)
    again = cm.load(path)
    x = batch()
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    return again


# ---- training and evaluation ---------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_training_lowers_the_loss_and_evaluates(name: str) -> None:
    model = imported(name)
    train_set = data(256)
    splits = Splits(train_set, data(64, seed=1), data(64, seed=2))
    before = evaluate(model, train_set, device="cpu")
    history = train(model, splits, TrainConfig(epochs=2, batch_size=32, lr=3e-3),
                    generator=torch.Generator().manual_seed(0))
    assert len(history) == 2
    after = evaluate(model, train_set, device="cpu")
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]


# ---- pruning ops ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("op", ["snip", "random", "magnitude", "synflow"])
def test_pruning_ops_keep_kappa_of_every_layer_and_reload(name: str, op: str,
                                                          tmp_path: Path) -> None:
    model = imported(name)
    train_set = data(64)
    config = PruneConfig.from_dict({"op": op, "sparsity": 0.8, "rounds": 10,
                                    "batches": 2, "batch_size": 32})
    batches = [(train_set.x[i:i + 32], train_set.y[i:i + 32]) for i in (0, 32)]
    masks = prune_masks(model, config, batches=batches,
                        generator=torch.Generator().manual_seed(0), input_shape=SHAPE)
    layers = dict(prunable_layers(model))
    assert set(masks) == set(layers)  # every Linear/Conv2d, depthwise convs included
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert all(why_not(op, n, m) is None for n, m in layers.items())
    apply_masks(model, masks)
    cm.set_masks(model, masks)
    assert param_counts(model)["nonzero"] < param_counts(imported(name))["nonzero"]
    with torch.no_grad():
        assert torch.isfinite(model(batch())).all()
    again = reloads(model, tmp_path)
    assert set(again.slimline_masks) == set(masks)


def test_synflow_runs_relu6_as_relu_so_no_layer_collapses() -> None:
    model = imported("mobilenetv2")
    net = copy.deepcopy(model)
    replaced = linearise_activations(net)
    assert replaced == sum(str(n.target) == "aten.hardtanh.default"
                           for n in model.graph.nodes)
    assert replaced > 0 and not any("hardtanh" in str(n.target) for n in net.graph.nodes)
    assert linearise_activations(nn.Sequential(nn.ReLU6())) == 0  # zoo models: as they are
    masks = synflow_masks(model, 0.9, SHAPE, rounds=10)
    assert all(int(m.sum()) > 0 for m in masks.values()), \
        {n: int(m.sum()) for n, m in masks.items()}
    # the model itself is untouched
    assert any("hardtanh" in str(n.target) for n in model.graph.nodes)


@pytest.mark.parametrize("name", ARCHS)
def test_the_jacobian_of_an_imported_model(name: str) -> None:
    stats = jacobian_singular_values(imported(name), batch(2))
    assert stats["values"].shape == (2, 10) and stats["max"] > 0


# ---- low rank ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_full_rank_lowrank_reproduces_the_model(name: str, tmp_path: Path) -> None:
    model = imported(name)
    layers = lowrank_layers(model)
    plan = {n: {"blocking": "none", "ranks": full_ranks(get_layer(model, n), "none")}
            for n in layers}
    new, _ = lowrank_transform(model, plan)
    assert all(isinstance(get_layer(new, n), LowRankLayer) for n in layers)
    x = batch()
    with torch.no_grad():
        assert close(new(x), model(x)) < TOL
    reloads(new, tmp_path)


@pytest.mark.parametrize("name", ARCHS)
def test_lowrank_to_a_budget_is_smaller_and_reloads(name: str, tmp_path: Path) -> None:
    model = imported(name)
    config = LowRankConfig.from_dict({"target": {"param_ratio": 0.5}, "score": "magnitude",
                                      "blocking": "none"})
    new, report = lowrank_transform(model, lowrank_plan(model, config, input_shape=SHAPE))
    assert param_counts(new)["total"] < param_counts(model)["total"]
    assert count_macs(new, SHAPE) < count_macs(model, SHAPE)
    assert sum(r["weight_params_after"] for r in report.values()) < \
        sum(r["weight_params_before"] for r in report.values())
    with torch.no_grad():
        assert torch.isfinite(new(batch())).all()
    reloads(new, tmp_path)


def test_lowrank_leaves_depthwise_convs_untouched_with_the_reason() -> None:
    model = imported("mobilenetv2")
    untouched = lowrank_untouched(model)
    depthwise = {n for n, m in prunable_layers(model)
                 if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert depthwise and set(untouched) == depthwise
    name = sorted(depthwise)[0]
    groups = get_layer(model, name).groups
    assert untouched[name] == f"depthwise conv (groups={groups}): lowrank factorizes dense " \
                              "convs only"
    assert not set(lowrank_layers(model)) & depthwise
    with pytest.raises(SpecError, match=rf"{name}.*depthwise conv \(groups={groups}\)"):
        lowrank_layers(model, [name])
    assert lowrank_untouched(imported("resnet18")) == {}


def test_output_scores_of_a_vit_layer_equal_one_forward_per_vector() -> None:
    # the tail after blocks.0.attn.qkv reshapes with the batch size taken from the input
    # (aten.sym_size.int): the batched tail must recompute it for G*N samples
    model = imported("vit").double()
    x = batch(6).double()
    fast = output_scores(model, "blocks.0.attn.qkv", "alds", x, chunk=7)
    slow = output_scores_naive(model, "blocks.0.attn.qkv", "alds", x)
    for key in ("output_perturbation", "output_variance"):
        for a, b in zip(fast[key], slow[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_tail_runner_splits_an_imported_graph_as_it_is() -> None:
    model = imported("resnet18")
    runner = TailRunner(model, "layer2.0.conv1")
    assert runner.gm is model
    x = batch(4)
    with torch.no_grad():
        y, _, z = runner.prime(x)
        stack = torch.stack([z, 2 * z, -z])
        out = runner.tail(stack)
        layer = get_layer(model, "layer2.0.conv1")
        for g in range(3):
            handle = layer.register_forward_hook(lambda _m, _i, _o, g=g: stack[g])
            try:
                torch.testing.assert_close(out[g], model(x))
            finally:
                handle.remove()
    torch.testing.assert_close(out[0], y)


# ---- PCN (input-based) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_full_basis_pcn_on_every_applicable_layer_reproduces_the_model(name: str,
                                                                         tmp_path: Path) -> None:
    model = imported(name)
    untouched = pcn_untouched(model)
    layers = [n for n, m in prunable_layers(model)
              if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in untouched]
    stats = collect_input_stats(model, layers, data(64), samples=64)
    new, report = apply_pcn(model, plan_pcn(model, stats, {"dims": 10**6}, layers), stats)
    assert all(report["input"][n]["dims"] == report["input"][n]["in_dim"] for n in layers)
    assert all(isinstance(get_layer(new, n), (PCNLinear, PCNConv2d)) for n in layers)
    x = batch()
    with torch.no_grad():
        assert close(new(x), model(x)) < TOL
    reloads(new, tmp_path)


@pytest.mark.parametrize("name", ARCHS)
def test_pcn_auto_compresses_and_reloads(name: str, tmp_path: Path) -> None:
    model = imported(name)
    layers = chosen_layers(model, "auto")
    assert layers and not set(layers) & set(pcn_untouched(model))
    stats = collect_input_stats(model, layers, data(64), samples=64)
    new, report = apply_pcn(model, plan_pcn(model, stats, {"energy": 0.8}, layers), stats)
    assert any(r["dims"] < r["in_dim"] for r in report["input"].values())
    assert param_counts(new)["trainable"] < param_counts(model)["trainable"]
    with torch.no_grad():
        assert torch.isfinite(new(batch())).all()
    reloads(new, tmp_path)


def test_pcn_leaves_depthwise_convs_untouched_with_the_reason() -> None:
    model = imported("mobilenetv2")
    untouched = pcn_untouched(model)
    depthwise = {n for n, m in prunable_layers(model)
                 if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert depthwise and set(untouched) == depthwise
    assert all(r.startswith("depthwise conv (groups=") for r in untouched.values())
    name = sorted(depthwise)[0]
    with pytest.raises(SpecError, match=rf"cannot transform '{name}': depthwise conv"):
        chosen_layers(model, [name])
    assert pcn_untouched(imported("vit")) == {}


# ---- DCTpS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_dctps_replaces_every_layer_and_reloads(name: str, tmp_path: Path) -> None:
    model = imported(name)
    report = dctps_transform(model, 0.1, generator=torch.Generator().manual_seed(0))
    layers = [n for n, m in prunable_layers(imported(name))]
    assert set(report["layers"]) == set(layers)
    assert all(isinstance(get_layer(model, n), DCTpSLayer) for n in layers)
    assert report["total_nnz"] == round(0.1 * report["total_weights"])
    assert param_counts(model)["total"] < param_counts(imported(name))["total"]
    with torch.no_grad():
        assert torch.isfinite(model(batch())).all()
    reloads(model, tmp_path)


# ---- analyses ------------------------------------------------------------------------------

def test_weight_analyses_run_on_dense_layers_and_skip_grouped_convs() -> None:
    model = imported("mobilenetv2")
    conv = "features.2.conv.0.0"  # a 1x1 expansion conv
    assert why_not("analyze", conv, get_layer(model, conv)) is None
    result = spectrum(get_layer(model, conv))
    assert result["eigenvalues"].numel() == get_layer(model, conv).out_channels
    curve = elbow_accuracy(model, "classifier", [1, 4],
                           lambda m: evaluate(m, data(32), device="cpu")["accuracy"])
    assert [p["rank"] for p in curve] == [1, 4]
    depthwise = "features.2.conv.1.0"
    assert why_not("analyze", depthwise, get_layer(model, depthwise)).startswith(
        "depthwise conv (groups=")


# ---- export --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_onnx_of_a_compressed_imported_model_equals_torch(name: str, tmp_path: Path) -> None:
    model = imported(name)
    layers = chosen_layers(model, "auto")
    stats = collect_input_stats(model, layers, data(64), samples=64)
    model, _ = apply_pcn(model, plan_pcn(model, stats, {"energy": 0.95}, layers), stats)
    config = LowRankConfig.from_dict({"target": {"param_ratio": 0.6}, "score": "magnitude"})
    model, _ = lowrank_transform(model, lowrank_plan(model, config, input_shape=SHAPE))
    kinds = {type(m) for m in model.modules()}
    assert LowRankLayer in kinds and kinds & {PCNLinear, PCNConv2d}
    assert isinstance(model, fx.GraphModule)
    path = tmp_path / "model.onnx"
    record = export_onnx(model, SHAPE, path)
    assert record["bytes"] == path.stat().st_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = batch(5)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


@pytest.mark.parametrize("name", ["mobilenetv2", "vit"])
def test_implicit_dctps_onnx_equals_torch_grouped_convs_stay_dense(name: str,
                                                                     tmp_path: Path) -> None:
    model = imported(name)
    dctps_transform(model, 0.2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # S as after training (it starts at zero)
        for key, p in model.named_parameters():
            if key.endswith("values"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "model.onnx"
    record = export_onnx(model, SHAPE, path, dctps="implicit")
    grouped = {n for n, m in model.named_modules()
               if isinstance(m, DCTpSLayer) and getattr(m, "groups", 1) > 1}
    assert (name == "mobilenetv2") == bool(grouped)
    for layer, ops in record["layers"].items():
        assert ops.startswith("dctps dense" if layer in grouped else "dctps implicit"), ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = batch(5)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x).numpy()
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


class TanhPatches(nn.Module):
    """An MLP over 16 rows of 49 pixels: its first Linear does not read the flattened input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(49, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], 16, 49)
        return self.head(torch.tanh(self.embed(rows)).mean(1))


def import_module(module: nn.Module) -> nn.Module:
    program = torch.export.export(
        module.eval(), (example_input(),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    return cm.import_graph(*graph_from_program(program))


def test_ldi_takes_the_gain_of_an_imported_graphs_activation() -> None:
    assert activation_of(imported("mobilenetv2")) == "relu"  # ReLU6 (aten.hardtanh)
    assert activation_of(imported("vit")) == "relu"  # GELU
    torch.manual_seed(0)
    patches = import_module(TanhPatches())
    assert activation_of(patches) == "tanh"
    init_ldi(patches, torch.Generator().manual_seed(0))
    w = get_layer(patches, "head").weight  # (10, 16): orthonormal rows, tanh gain 1
    torch.testing.assert_close(w @ w.T, torch.eye(10), atol=1e-5, rtol=0)


@pytest.mark.parametrize("blocking", ["alds", "square"])
def test_blocked_full_rank_lowrank_of_vit_linears_on_tokens(blocking: str) -> None:
    # a ViT's Linears read (N, tokens, features): blocks slice and concatenate the last dim
    model = imported("vit")
    layers = [n for n in lowrank_layers(model) if isinstance(get_layer(model, n), nn.Linear)]
    plan = {n: {"blocking": blocking, "ranks": full_ranks(get_layer(model, n), blocking)}
            for n in layers}
    assert any(len(p["ranks"]) > 1 for p in plan.values())
    new, _ = lowrank_transform(model, plan)
    x = batch()
    with torch.no_grad():
        assert close(new(x), model(x)) < TOL


def test_pt2_of_a_compressed_imported_model_runs_without_slimline(tmp_path: Path) -> None:
    model = imported("resnet18")
    config = LowRankConfig.from_dict({"target": {"param_ratio": 0.5}, "score": "magnitude"})
    model, _ = lowrank_transform(model, lowrank_plan(model, config, input_shape=SHAPE))
    path = tmp_path / "model.pt2"
    export_pt2(model, SHAPE, path)
    program = torch.export.load(str(path))
    x = batch(3)
    with torch.no_grad():
        assert close(program.module()(x), model.eval()(x)) < TOL


class InputNorm(nn.Module):
    """A LayerNorm of the flattened input before the first Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(784), nn.Linear(784, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(x.flatten(1)))))


def test_synflow_through_a_layernorm_of_the_all_ones_input_is_finite_and_says_so() -> None:
    torch.manual_seed(0)
    model = import_module(InputNorm())
    report: dict[str, object] = {}
    # the all-ones input has variance 0: LayerNorm gives 0 * |weight| + |bias| = 0 (eps keeps
    # it finite), so nothing reaches fc1's weights
    masks = synflow_masks(model, 0.5, SHAPE, rounds=5, report=report)
    assert report["zero_score_layers"] == ["fc1"]
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * (784 * 32 + 320))
    with torch.no_grad():
        model.norm.bias.normal_(generator=torch.Generator().manual_seed(0))
    report = {}
    synflow_masks(model, 0.5, SHAPE, rounds=5, report=report)
    assert report["zero_score_layers"] == []
