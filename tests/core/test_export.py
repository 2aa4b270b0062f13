"""core.export: every layer kind exports to ONNX (onnxruntime equals torch, compressed layers
stay compressed after ORT's optimisation) and to .pt2 (plain `torch.export.load`); failures
leave no file and name the layer."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from core.dctps import dctps_transform
from core.errors import ExportError
from core.export import export_onnx, export_pt2, prepare_for_export
from core.export_layers import PCNConv2dExport, PCNLinearExport
from core.lowrank import lowrank_transform
from core.lowrank_layer import full_ranks
from core.masks import apply_masks
from core.models import build, get_layer
from core.pca import collect_input_stats
from core.pcn import pcn_input_transform
from core.pcn_graph import unit_groups
from core.pcn_output import pcn_transform
from tests.import_models import nontrivial_batchnorm

SHAPE = [1, 8, 8]
TINY_CONV4 = {"name": "conv4", "input_shape": SHAPE, "channels": [4, 6, 8, 8], "fc": [24, 16]}
PCN_CONV4 = {"name": "conv4", "input_shape": SHAPE, "channels": [8, 16, 16, 16], "fc": [64, 32]}
TINY_RESNET = {"name": "resnet", "depth": 8, "width": 0.5, "input_shape": SHAPE}
SAMPLES = 256


def _inputs(shape, n=SAMPLES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g)


def _model(arch, seed=0):
    torch.manual_seed(seed)
    model = build(arch, generator=torch.Generator().manual_seed(seed))
    return nontrivial_batchnorm(model, shift=0.2).eval()


def _dataset(shape, n=200):
    from core.data import ArrayDataset
    return ArrayDataset(_inputs(shape, n, seed=5), torch.zeros(n, dtype=torch.int64))


def _ort_logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _initializer_bytes(path):
    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _optimized_initializer_bytes(path, tmp_path):
    """Initializer bytes of the graph onnxruntime runs after its basic optimisations (constant
    folding included): a factor product folded back into one matrix shows up here."""
    out = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _initializer_bytes(out)


def _torch_bytes(model):
    """Parameters + frozen floating buffers (PCN's U, mu) of the model as slimline holds it."""
    from core.layers import as_layer
    frozen = [t for m in model.modules() if (layer := as_layer(m)) is not None
              for t in layer.frozen_tensors()]
    tensors = list(model.parameters()) + frozen
    return sum(t.numel() * t.element_size() for t in tensors)


def _assert_ort_equals_torch(model, path, shape):
    x = _inputs(shape)
    with torch.no_grad():
        expected = model(x).numpy()
    got = _ort_logits(path, x)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale, np.abs(got - expected).max() / scale
    one = _ort_logits(path, x[:1])  # the batch axis is dynamic, batch 1 included
    assert np.abs(one - expected[:1]).max() <= 1e-4 * scale


# ---- models of every kind ----

def pcn_input_model():
    model = _model(PCN_CONV4)
    layers = ["conv2", "conv3", "fc1", "fc2"]
    stats = collect_input_stats(model, layers, _dataset(SHAPE), samples=200, batch_size=100)
    new, _ = pcn_input_transform(model, stats, {"conv": {"dims": 3}, "linear": {"dims": 8}},
                                 layers)
    return new


def pcn_output_resnet():
    model = _model(TINY_RESNET)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:] + ["fc"]
    stats = collect_input_stats(model, [n for n in layers if "shortcut" not in n],
                                _dataset(SHAPE), samples=200, batch_size=100)
    new, _ = pcn_transform(model, stats, {"conv": {"dims": 4}, "linear": {"dims": 8}}, layers,
                           output={"stage2": {"keep": 12}, "stage3": {"keep": 24}})
    return new


def lowrank_model():
    model = _model(TINY_CONV4)
    blockings = {"conv2": "none", "conv3": "alds", "conv4": "square", "fc1": "none",
                 "fc2": "square"}
    plan = {n: {"blocking": b, "ranks": [max(1, f // 4) for f in full_ranks(
        get_layer(model, n), b)]} for n, b in blockings.items()}
    new, _ = lowrank_transform(model, plan)
    return new


def masked_model():
    model = _model({"name": "lenet5", "input_shape": [1, 16, 16]})
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(m.weight.shape, generator=g) > 0.8
             for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    apply_masks(model, masks)
    model.slimline_masks = masks
    return model


def dctps_model():
    model = _model({"name": "lenet5", "input_shape": [1, 16, 16]})
    dctps_transform(model, 0.1, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("values"):
                p.normal_(0, 0.1)
            if name.endswith("alpha"):
                p.fill_(0.7)
    return model.eval()


def channel_pruned_model():
    keep = {g: max(1, len(get_layer(_model(TINY_RESNET), grp.producers[0]).weight) // 2)
            for g, grp in unit_groups(_model(TINY_RESNET)).items()}
    return _model({**TINY_RESNET, "edits": [{"op": "channel_prune", "keep": keep}]})


ZOO = {"mlp": {"name": "mlp", "input_shape": SHAPE, "widths": [16, 12]},
       "lenet300": {"name": "lenet300", "input_shape": SHAPE},
       "lenet5": {"name": "lenet5", "input_shape": [1, 16, 16]},
       "conv4": TINY_CONV4, "resnet": TINY_RESNET}

KINDS = {"pcn_input": (pcn_input_model, SHAPE), "pcn_output_resnet": (pcn_output_resnet, SHAPE),
         "lowrank": (lowrank_model, SHAPE), "masked": (masked_model, [1, 16, 16]),
         "dctps": (dctps_model, [1, 16, 16]), "channel_pruned": (channel_pruned_model, SHAPE)}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_export_and_ort_equals_torch(name, tmp_path):
    arch = ZOO[name]
    model = _model(arch)
    info = export_onnx(model, arch["input_shape"], tmp_path / "m.onnx")
    assert info["exporter"] == "torch.onnx (dynamo)" and info["opset"] == 18
    assert info["bytes"] == os.path.getsize(tmp_path / "m.onnx")
    _assert_ort_equals_torch(model, tmp_path / "m.onnx", arch["input_shape"])
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temp file left


@pytest.mark.parametrize("kind", list(KINDS))
def test_compressed_models_export_and_ort_equals_torch(kind, tmp_path):
    build_model, shape = KINDS[kind]
    model = build_model()
    info = export_onnx(model, shape, tmp_path / "m.onnx")
    _assert_ort_equals_torch(model, tmp_path / "m.onnx", shape)
    if kind in ("pcn_input", "pcn_output_resnet", "lowrank", "dctps"):
        assert info["layers"], info  # every slimline layer is listed with its ops


@pytest.mark.parametrize("kind", ["pcn_input", "lowrank"])
def test_factor_pairs_and_pcn_stay_compressed_after_ort_optimisation(kind, tmp_path):
    model = KINDS[kind][0]()
    info = export_onnx(model, SHAPE, tmp_path / "m.onnx")
    torch_bytes = _torch_bytes(model)
    dense = PCN_CONV4 if kind == "pcn_input" else TINY_CONV4
    dense_bytes = sum(p.numel() * 4 for p in _model(dense).parameters())
    assert torch_bytes < 0.8 * dense_bytes  # the test means something: really compressed
    in_file = _initializer_bytes(tmp_path / "m.onnx")  # the exporter's optimiser folds nothing
    optimized = _optimized_initializer_bytes(tmp_path / "m.onnx", tmp_path)
    # PCN's mu may fold into the bias (the file then holds up to mu's bytes less)
    mu_bytes = sum(b.numel() * 4 for n, b in model.named_buffers() if n.endswith(".mu"))
    for got in (in_file, optimized, info["param_bytes"]):
        assert 0.95 * (torch_bytes - mu_bytes) <= got <= 1.05 * torch_bytes, (got, torch_bytes)


def test_pcn_export_forms_are_two_ops_and_exact():
    model = pcn_input_model()
    prepared = prepare_for_export(model)
    assert isinstance(prepared.conv2, PCNConv2dExport) and isinstance(prepared.fc1,
                                                                       PCNLinearExport)
    assert set(prepared.slimline_export_layers) == {"conv2", "conv3", "fc1", "fc2"}
    x = _inputs(SHAPE, 32)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
    assert type(model.conv2).__name__ == "PCNConv2d"  # the model itself is untouched


@pytest.mark.parametrize("mode", ["dense", "implicit"])
def test_dctps_both_modes_equal_torch(mode, tmp_path):
    model = dctps_model()
    prepared = prepare_for_export(model, dctps=mode)
    x = _inputs([1, 16, 16], 32)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)
    info = export_onnx(model, [1, 16, 16], tmp_path / "m.onnx", dctps=mode)
    assert info["dctps"] == mode
    _assert_ort_equals_torch(model, tmp_path / "m.onnx", [1, 16, 16])


def test_implicit_dctps_is_deterministic_on_several_threads(tmp_path):
    """S's per-row sums are a segment sum (CumSum), not a scatter-add: onnxruntime's
    multi-threaded ScatterND with reduction add lost updates of rows with several entries."""
    model = dctps_model()
    export_onnx(model, [1, 16, 16], tmp_path / "m.onnx", dctps="implicit")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert not ops & {"ScatterND", "ScatterElements"}, ops
    x = _inputs([1, 16, 16])
    with torch.no_grad():
        expected = model(x).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    for _ in range(5):
        got = session.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("kind", ["lowrank", "pcn_output_resnet"])
def test_pt2_loads_with_plain_torch_export(kind, tmp_path):
    model = KINDS[kind][0]()
    info = export_pt2(model, SHAPE, tmp_path / "m.pt2")
    assert info["bytes"] == os.path.getsize(tmp_path / "m.pt2")
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    for n in (SAMPLES, 1):
        x = _inputs(SHAPE, n)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_unexportable_layer_raises_export_error_naming_it_and_leaves_no_file(tmp_path):
    arch = ZOO["mlp"]
    model = _model(arch)
    model.fc1 = nn.Sequential(model.fc1, DataDependent())
    for export, name in ((export_onnx, "m.onnx"), (export_pt2, "m.pt2")):
        with pytest.raises(ExportError, match=r"fc1\.1.*DataDependent"):
            export(model, arch["input_shape"], tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_interrupted_export_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    arch = ZOO["mlp"]
    (tmp_path / "m.onnx").write_bytes(b"old")

    def save_half_then_stop(self, destination, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(_model(arch), arch["input_shape"], tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_export_is_quiet(tmp_path, capfd):
    arch = ZOO["mlp"]
    export_onnx(_model(arch), arch["input_shape"], tmp_path / "m.onnx")
    export_pt2(_model(arch), arch["input_shape"], tmp_path / "m.pt2")
    out, err = capfd.readouterr()
    assert "[torch.onnx]" not in out + err
    assert out == ""


def test_bad_arguments_raise_export_error(tmp_path):
    with pytest.raises(ExportError, match="dctps"):
        export_onnx(_model(ZOO["mlp"]), SHAPE, tmp_path / "m.onnx", dctps="sparse")
    with pytest.raises(ExportError, match="input_shape"):
        export_onnx(_model(ZOO["mlp"]), [], tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
