"""ONNX intake (worker.onnx_import): the three test architectures exported by both exporters
convert into modules that reproduce onnxruntime on the same file, small hand-built graphs cover
the other converters, and hostile or unsupported files are refused with the right status and a
detail that says what was found and what to do."""
from __future__ import annotations

import builtins
import contextlib
import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from core.graph import canonical
from core.models import import_graph
from tests.import_models import example_input, export_onnx, make
from worker.inspect import Rejected
from worker.onnx_import import MAX_OPSET, check_onnx, graph_from_onnx

MAX = 64 * 1024 * 1024
ATOL = 1e-4


# ---------------------------------------------------------------------------- helpers ----

def _quiet_export(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _embed(path: Path) -> Path:
    """The dynamo exporter writes the weights next to the model (`<file>.data`); a user
    uploads one file, so the tests (trusting their own export) put the weights inside it."""
    model = onnx.load(str(path))  # loads the external data: our own file
    onnx.save(model, str(path), save_as_external_data=False)
    for extra in path.parent.glob(path.name + ".data"):
        extra.unlink()
    return path


def _convert(path: Path) -> tuple[dict[str, Any], nn.Module]:
    ir, tensors = graph_from_onnx(check_onnx(path, max_bytes=MAX))
    return ir, import_graph(ir, tensors)


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _assert_matches_ort(path: Path, model: nn.Module, shape: list[int],
                        batches: tuple[int, ...] = (1, 5)) -> None:
    for batch in batches:
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got = model(x).numpy()
        want = _ort(path, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _graph_model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
                 shape: list[int | str], *, opset: int = 17, extra_opsets: tuple = (),
                 out_name: str = "y", inputs: list[onnx.ValueInfoProto] | None = None,
                 out_shape: list[int | str] | None = None) -> onnx.ModelProto:
    """A model of `nodes` with input x (`shape`) and output y: the logits (N, K) unless
    `out_shape` says otherwise (the checker wants the outputs' shapes, as exporters write)."""
    out_shape = ["N", "K"] if out_shape is None else out_shape
    graph = helper.make_graph(
        nodes, "g",
        inputs if inputs is not None else
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   *extra_opsets])


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _refused(path: Path, status: int, *needles: str, max_bytes: int = MAX) -> str:
    with pytest.raises(Rejected) as info:
        graph_from_onnx(check_onnx(path, max_bytes=max_bytes))
    assert info.value.status == status, info.value.detail
    for needle in needles:
        assert needle in info.value.detail, info.value.detail
    return info.value.detail


def _module_types(model: nn.Module) -> Counter[str]:
    return Counter(type(m).__name__ for m in model.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)))


# ------------------------------------------------------- the three test architectures ----

ARCHS = ("mobilenetv2", "resnet18", "vit")
# (exporter, opset): the TorchScript exporter's opset 13 cannot export the ViT's
# scaled_dot_product_attention (it needs 14), so the ViT takes 17 there
EXPORTS = {("mobilenetv2", False): 13, ("resnet18", False): 13, ("vit", False): 17}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for name in ARCHS:
        for dynamo in (True, False):
            path = root / f"{name}_{'dynamo' if dynamo else 'ts'}.onnx"
            _quiet_export(export_onnx, make(name), path, dynamo=dynamo,
                          opset=EXPORTS.get((name, dynamo), 18))
            files[(name, dynamo)] = _embed(path) if dynamo else path
    return files


# modules the torch model has, by type (BN is folded into the convs by both exporters)
EXPECTED_NAMES = {"mobilenetv2": ["features.0.0", "features.2.conv.1.0", "classifier"],
                  "resnet18": ["conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"],
                  "vit": ["patch_embed", "blocks.0.attn.qkv", "blocks.1.norm2", "head"]}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ARCHS)
def test_architectures_convert_and_match_onnxruntime(exported: dict[tuple[str, bool], Path],
                                                      name: str, dynamo: bool) -> None:
    path = exported[(name, dynamo)]
    ir, model = _convert(path)
    _assert_matches_ort(path, model, [1, 28, 28])
    # real modules, as many as the torch model has, named after it
    original = make(name)
    want = Counter(type(m).__name__ for m in original.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear, nn.LayerNorm)))
    assert _module_types(model) == want
    names = dict(model.named_modules())
    for expected in EXPECTED_NAMES[name]:
        assert expected in names, sorted(ir["modules"])
    assert ir["input"] == {"name": "x", "shape": [1, 28, 28]}
    assert model.slimline_arch["num_classes"] == 10
    if name == "vit":  # the class token and position embeddings stay trainable tensors
        assert ir["tensors"]["cls_token"] == {"shape": [1, 1, 32], "dtype": "float32",
                                              "trainable": True}
        assert {n for n, _ in model.named_parameters()} >= {"cls_token", "pos_embed"}
    if name == "vit":  # the class token expands to the input's batch size, read at run time
        assert '"aten.sym_size.int"' in canonical(ir)


def test_converted_model_matches_torch_and_trains(exported: dict[tuple[str, bool], Path]
                                                  ) -> None:
    """The ResNet exported by the TorchScript exporter (BN folded) computes the torch model's
    function, and its modules take gradient steps."""
    ir, model = _convert(exported[("resnet18", False)])
    x = example_input(4)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), make("resnet18")(x).numpy(), atol=ATOL)
    model.train()
    before = model.get_submodule("layer1.0.conv1").weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.get_submodule("layer1.0.conv1").weight)


def test_batchnorm_kept_by_the_exporter_becomes_batchnorm2d(tmp_path: Path) -> None:
    path = tmp_path / "bn.onnx"
    _quiet_export(torch.onnx.export, make("resnet18"), (example_input(),), str(path),
                  dynamo=False, do_constant_folding=False, opset_version=17,
                  input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    ir, model = _convert(path)
    _assert_matches_ort(path, model, [1, 28, 28])
    bn = model.get_submodule("layer2.0.downsample.1")
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 16
    torch.testing.assert_close(bn.running_var,
                               make("resnet18").layer2[0].downsample[1].running_var)
    assert ir["modules"]["bn1"]["eps"] == 1e-05 and ir["modules"]["bn1"]["momentum"] == 0.1
    assert _module_types(model)["BatchNorm2d"] == 20


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_static_batch_is_rewritten_and_verified(tmp_path: Path, dynamo: bool) -> None:
    """A ViT exported without a dynamic batch (batch 3 baked into its reshapes, and by the
    dynamo exporter into a folded class-token constant) runs at any batch size."""
    path = tmp_path / "static.onnx"
    kwargs = {"external_data": False} if dynamo else {}
    _quiet_export(torch.onnx.export, make("vit"), (example_input(3),), str(path),
                  dynamo=dynamo, opset_version=18 if dynamo else 17, input_names=["x"],
                  **kwargs)
    file_batch = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert file_batch.dim_value == 3
    ir, model = _convert(path)
    x = example_input(7, seed=5)
    want = _ort(path, x[:3])
    with torch.no_grad():
        np.testing.assert_allclose(model(x[:3]).numpy(), want, atol=ATOL)
        np.testing.assert_allclose(model(x)[:3].numpy(), want, atol=ATOL)
        np.testing.assert_allclose(model(x[:1]).numpy(), want[:1], atol=ATOL)
        np.testing.assert_allclose(model(x[2:7])[0].numpy(), want[2], atol=ATOL)


def test_static_batch_that_cannot_be_rewritten_is_refused(tmp_path: Path) -> None:
    """Batch 2 flattened into the features (the samples mix): no rewrite can hold at
    another batch size, and the refusal says how to export."""
    model = _graph_model(
        [helper.make_node("Reshape", ["x", "s"], ["h"]),
         helper.make_node("MatMul", ["h", "w"], ["y"])],
        {"s": _i(1, 8), "w": _w(8, 3)}, [2, 4])
    detail = _refused(_save(model, tmp_path / "m.onnx"), 422, "batch size (2) baked",
                      "dynamic_axes")
    assert "re-export" in detail and "Reshape node" in detail  # the node it fails at


# ---------------------------------------------------------- converters (small graphs) ----

def _case_gemm() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w", "c"], ["g"], alpha=0.5, beta=2.0),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    inits = {"w": _w(12, 5), "c": _w(1, 5, seed=1), "w2": _w(3, 5, seed=2)}
    return _graph_model(nodes, inits, ["N", 3, 4]), [3, 4], {}


def _case_matmul_add() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["m"]),
             helper.make_node("Add", ["fc1.bias", "m"], ["a"]),  # bias first, as TorchScript
             helper.make_node("Sigmoid", ["a"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["m2"]),
             helper.make_node("Tanh", ["m2"], ["t"]),
             helper.make_node("Reshape", ["t", "heads"], ["t3"]),
             helper.make_node("Transpose", ["t3"], ["t4"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t3", "t4"], ["mm"]),  # of two activations
             helper.make_node("Flatten", ["mm"], ["y"])]
    inits = {"fc1.weight": _w(6, 4), "fc1.bias": _w(4, seed=1), "w2": _w(4, 4, seed=2),
             "heads": _i(0, 2, 2)}
    return _graph_model(nodes, inits, ["N", 6]), [6], {"fc1": "Linear"}


def _case_conv_pools() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c1"], pads=[0, 1, 1, 2], strides=[2, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"],
                         epsilon=1e-3, momentum=0.8),
        helper.make_node("HardSwish", ["bn"], ["h"]),
        helper.make_node("MaxPool", ["h"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], ceil_mode=1),
        helper.make_node("AveragePool", ["p"], ["ap"], kernel_shape=[2, 2], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Conv", ["ap", "dw", "db"], ["dwc"], group=c, kernel_shape=[3, 3],
                         auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["dwc"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["y"])]
    inits = {"cw": _w(c, 2, 3, 3), "g": _w(c, seed=1) + 2, "b": _w(c, seed=2),
             "m": _w(c, seed=3), "v": np.abs(_w(c, seed=4)) + 0.5,
             "dw": _w(c, 1, 3, 3, seed=5), "db": _w(c, seed=6)}
    return _graph_model(nodes, inits, ["N", 2, 11, 9]), [2, 11, 9], {}


def _case_activations() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c", "cb"], ["cc"]),  # a bias after a bias-free conv
        helper.make_node("Pad", ["cc", "pads"], ["pd"], mode="reflect"),
        helper.make_node("Clip", ["pd", "zero"], ["r"]),
        helper.make_node("LeakyRelu", ["r"], ["l"], alpha=0.1),
        helper.make_node("HardSigmoid", ["l"], ["hs"]),
        helper.make_node("Clip", ["hs", "lo", "hi"], ["cl"]),
        helper.make_node("Sub", ["one", "cl"], ["s"]),
        helper.make_node("Pow", ["s", "two"], ["pw"]),
        helper.make_node("Sqrt", ["pw"], ["sq"]),
        helper.make_node("Div", ["sq", "three"], ["d"]),
        helper.make_node("ReduceMean", ["d", "axes"], ["y"], keepdims=0)]
    inits = {"w": _w(3, 2, 1, 1), "cb": _w(1, 3, 1, 1, seed=1), "pads": _i(0, 0, 1, 2, 0, 0, 1, 0),
             "zero": np.array(0, np.float32), "lo": np.array(0.1, np.float32),
             "hi": np.array(0.6, np.float32), "one": np.array(1.0, np.float32),
             "two": np.array(2.0, np.float32), "three": np.array(3.0, np.float32),
             "axes": _i(2, 3)}
    return _graph_model(nodes, inits, ["N", 2, 5, 5], opset=18), [2, 5, 5], {"conv": "Conv2d"}


def _case_shapes() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    """Shape arithmetic on the batch size (as the TorchScript exporter writes it) and the
    view/slice ops."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "target"], ["flat"]),          # (N, 24)
        helper.make_node("Split", ["flat", "sizes"], ["a", "b"], axis=1),  # 10 + 14
        helper.make_node("Slice", ["b", "st", "en", "ax1"], ["bs"]),        # 2..12 -> 10
        helper.make_node("Mul", ["a", "bs"], ["ab"]),
        helper.make_node("Unsqueeze", ["ab", "axis1"], ["u"]),            # (N, 1, 10)
        helper.make_node("Gather", ["u", "idx"], ["gi"], axis=2),         # (N, 1, 3)
        helper.make_node("Squeeze", ["gi", "axis1"], ["sq"]),             # (N, 3)
        helper.make_node("Softmax", ["sq"], ["sm"], axis=-1),
        helper.make_node("Concat", ["sm", "ab"], ["y"], axis=1)]
    inits = {"zero": np.array(0, np.int64), "axis0": _i(0), "minus1": _i(-1),
             "sizes": _i(10, 14), "st": _i(2), "en": _i(12), "ax1": _i(1), "axis1": _i(1),
             "idx": _i(4, 0, 7)}
    return _graph_model(nodes, inits, ["N", 4, 6], opset=13), [4, 6], {}


def _case_layernorm_gelu() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["ln"],
                         epsilon=1e-6),
        helper.make_node("Gelu", ["ln"], ["g"], approximate="tanh"),
        helper.make_node("Expand", ["tok", "shape"], ["e"]),  # a shape of 1s: broadcast
        helper.make_node("Add", ["g", "e"], ["a"]),
        helper.make_node("Flatten", ["a"], ["y"])]  # logits (N, classes)
    inits = {"ln.weight": _w(8) + 1, "ln.bias": _w(8, seed=1), "tok": _w(1, 1, 8, seed=2),
             "shape": _i(1, 5, 1)}
    return _graph_model(nodes, inits, ["N", 5, 8], opset=20), [5, 8], {"ln": "LayerNorm"}


def _case_attention() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    """Opset 23's Attention on (N, heads, seq, d), as the dynamo exporter writes it."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["q"]),
             helper.make_node("Mul", ["q", "k_scale"], ["k"]),
             helper.make_node("Attention", ["q", "k", "q"], ["a"], is_causal=1),
             helper.make_node("Flatten", ["a"], ["y"])]
    inits = {"s": _i(0, 2, 3, 4), "k_scale": _w(1, 2, 1, 4)}
    return _graph_model(nodes, inits, ["N", 6, 4], opset=23), [6, 4], {}


def _case_misc() -> tuple[onnx.ModelProto, list[int], dict[str, str]]:
    """Resizing (PyTorch's nearest, bilinear), instance and group norms, einsum, a
    softplus-style threshold mask (Greater + Where, as the dynamo exporter writes it)."""
    nodes = [
        helper.make_node("Resize", ["x", "", "sc"], ["up"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("InstanceNormalization", ["up", "in_s", "in_b"], ["inn"]),
        helper.make_node("Shape", ["inn"], ["shp"], end=2),  # (N, C) then the new H, W
        helper.make_node("Concat", ["shp", "hw"], ["sz"], axis=0),
        helper.make_node("Resize", ["inn", "", "", "sz"], ["bl"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("GroupNormalization", ["bl", "gn_s", "gn_b"], ["gn"], num_groups=2,
                         epsilon=1e-4),
        helper.make_node("Greater", ["gn", "thr"], ["mask"]),
        helper.make_node("Exp", ["gn"], ["ex"]),
        helper.make_node("Where", ["mask", "gn", "ex"], ["wh"]),
        helper.make_node("Einsum", ["wh", "ew"], ["y"], equation="bchw,wk->bk")]
    inits = {"sc": np.array([1, 1, 2, 2], np.float32), "in_s": _w(4) + 1, "in_b": _w(4, seed=1),
             "hw": _i(7, 9), "gn_s": _w(4, seed=2) + 1, "gn_b": _w(4, seed=3),
             "thr": np.array(0.5, np.float32), "ew": _w(9, 3, seed=4)}
    return _graph_model(nodes, inits, ["N", 4, 3, 3], opset=21), [4, 3, 3], {}


CASES = {"gemm": _case_gemm, "matmul_add": _case_matmul_add, "conv_pools": _case_conv_pools,
         "activations": _case_activations, "shapes": _case_shapes,
         "layernorm_gelu": _case_layernorm_gelu, "attention": _case_attention,
         "misc": _case_misc}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converters_match_onnxruntime(tmp_path: Path, case: str) -> None:
    model, shape, modules = CASES[case]()
    path = _save(model, tmp_path / f"{case}.onnx")
    ir, converted = _convert(path)
    _assert_matches_ort(path, converted, shape)
    for name, kind in modules.items():
        assert ir["modules"][name]["type"] == kind


def test_linear_modules_fold_gemm_attributes_and_biases(tmp_path: Path) -> None:
    ir, model = _convert(_save(_case_gemm()[0], tmp_path / "g.onnx"))
    assert {s["type"] for s in ir["modules"].values()} == {"Linear"}
    first = next(m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == 12)
    w = _w(12, 5)
    torch.testing.assert_close(first.weight, torch.from_numpy(0.5 * w.T))  # alpha, transB 0
    torch.testing.assert_close(first.bias, torch.from_numpy(2.0 * _w(1, 5, seed=1)[0]))
    ir, model = _convert(_save(_case_matmul_add()[0], tmp_path / "m.onnx"))
    fc1 = model.get_submodule("fc1")
    assert type(fc1) is nn.Linear and fc1.bias is not None  # the Add became its bias
    assert not any(n["op"] == "aten.add.Tensor" for n in ir["nodes"])
    assert [n["op"] for n in ir["nodes"]].count("aten.matmul.default") == 1


def test_conv_bias_add_and_asymmetric_pads(tmp_path: Path) -> None:
    ir, model = _convert(_save(_case_activations()[0], tmp_path / "a.onnx"))
    conv = model.get_submodule("conv")  # no name in the file: numbered by kind
    assert type(conv) is nn.Conv2d and conv.bias is not None
    ir, _ = _convert(_save(_case_conv_pools()[0], tmp_path / "c.onnx"))
    ops = [n["op"] for n in ir["nodes"]]
    assert "aten.constant_pad_nd.default" in ops  # pads [0, 1, 1, 2] before the conv
    assert sorted(s["type"] for s in ir["modules"].values()) == \
        ["BatchNorm2d", "Conv2d", "Conv2d"]
    bn = next(s for s in ir["modules"].values() if s["type"] == "BatchNorm2d")
    assert bn["eps"] == 1e-3 and bn["momentum"] == pytest.approx(0.2)


def test_a_wrong_conversion_is_caught_by_onnxruntime(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The intake runs the file in onnxruntime and refuses a converted module that differs
    (here a Sigmoid converter that is off by a constant)."""
    import worker.onnx_import as onnx_import

    def off_by_one(conv: Any, node: Any, inputs: list[Any]) -> Any:
        return conv.call("aten.add.Tensor", conv.call("aten.sigmoid.default", inputs[0]), 1.0)

    path = _save(_case_matmul_add()[0], tmp_path / "m.onnx")
    graph_from_onnx(check_onnx(path, max_bytes=MAX))  # the real converter passes
    monkeypatch.setitem(onnx_import.CONVERTERS, "Sigmoid", off_by_one)
    _refused(path, 422, "does not reproduce onnxruntime", ".pt2")
    ir, _ = graph_from_onnx(check_onnx(path, max_bytes=MAX), verify=False)
    assert "aten.add.Tensor" in canonical(ir)


def test_model_local_functions_are_inlined(tmp_path: Path) -> None:
    fn = helper.make_function("local", "Act", ["a"], ["b"],
                              [helper.make_node("Relu", ["a"], ["r"]),
                               helper.make_node("Neg", ["r"], ["b"])],
                              [helper.make_opsetid("", 17)])
    model = _graph_model([helper.make_node("Act", ["x"], ["y"], domain="local")], {},
                         ["N", 4], extra_opsets=(helper.make_opsetid("local", 1),))
    model.functions.append(fn)
    path = _save(model, tmp_path / "f.onnx")
    ir, converted = _convert(path)
    assert [n["op"] for n in ir["nodes"]] == ["aten.relu.default", "aten.neg.default"]
    _assert_matches_ort(path, converted, [4])


# ---------------------------------------------------------------------- refusals ----

def test_external_data_outside_the_upload_is_refused_unread(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A weight whose data `location` points outside the upload (`../../etc/passwd`, an
    absolute path, a sibling file that exists) is refused; no file but the upload is opened."""
    upload = tmp_path / "upload"
    upload.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    opened: list[str] = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def no_external(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("external data loaded")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", no_external)
    for location in ("../../etc/passwd", str(secret), "../secret.bin"):
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 1])
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        model = _graph_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {}, ["N", 4])
        model.graph.initializer.append(weight)
        path = upload / "model.onnx"
        path.write_bytes(model.SerializeToString())
        opened.clear()
        monkeypatch.setattr(builtins, "open", spy)
        monkeypatch.setattr(io, "open", spy)
        try:
            detail = _refused(path, 422, "external file", location, "external_data=False")
        finally:
            monkeypatch.setattr(builtins, "open", real_open)
            monkeypatch.setattr(io, "open", real_io_open)
        assert "'w'" in detail
        assert opened and all(Path(p).resolve() == path.resolve() for p in opened), opened


def test_custom_domain_op_is_refused_by_name(tmp_path: Path) -> None:
    model = _graph_model([helper.make_node("Foo", ["x"], ["y"], domain="my.domain")], {},
                         ["N", 4], extra_opsets=(helper.make_opsetid("my.domain", 1),))
    _refused(_save(model, tmp_path / "c.onnx"), 422, "custom op my.domain::Foo",
             "standard ONNX ops")


def test_unsupported_op_is_refused_by_name(tmp_path: Path) -> None:
    model = _graph_model([helper.make_node("Relu", ["x"], ["r"], name="act"),
                          helper.make_node("Det", ["r"], ["d"], name="my_det"),
                          helper.make_node("Unsqueeze", ["d", "ax"], ["y"])],
                         {"ax": _i(1)}, ["N", 3, 3], out_shape=["N", 1])
    detail = _refused(_save(model, tmp_path / "u.onnx"), 422, "ONNX op Det", "'my_det'",
                      "supported ops:")
    assert "Conv" in detail and "Gemm" in detail


@pytest.mark.parametrize("kind", ["no_input", "int_input", "two_inputs", "dynamic_image"])
def test_graph_without_one_floating_input_is_refused(tmp_path: Path, kind: str) -> None:
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    if kind == "no_input":
        model = _graph_model(relu, {"x": _w(2, 4)}, [], inputs=[])
        needles: tuple[str, ...] = ("no input",)
    elif kind == "int_input":
        model = _graph_model(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], {}, [],
            inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])])
        needles = ("'x' is int64", "float32")
    elif kind == "two_inputs":
        model = _graph_model(
            [helper.make_node("Add", ["x", "z"], ["y"])], {}, [],
            inputs=[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4])
                    for n in ("x", "z")])
        needles = ("2 inputs", "'z'")
    else:
        model = _graph_model(relu, {}, ["N", 3, "height", 5], out_shape=["N", 3, "height", 5])
        needles = ("dimension 2", "'height'", "fixed input size")
    _refused(_save(model, tmp_path / f"{kind}.onnx"), 422, *needles)


def test_old_and_future_opsets_are_refused(tmp_path: Path) -> None:
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    model = _graph_model(relu, {}, ["N", 4], opset=11)
    model.ir_version = 7
    _refused(_save(model, tmp_path / "o11.onnx"), 422, "opset 11", "opset_version=17",
             "convert_version")
    model = _graph_model(relu, {}, ["N", 4], opset=MAX_OPSET + 1)
    _refused(_save(model, tmp_path / "future.onnx"), 422, f"opset {MAX_OPSET + 1}")


def test_truncated_garbage_and_wrong_files_are_refused(tmp_path: Path) -> None:
    good = _graph_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                        {"w": _w(64, 64)}, ["N", 64]).SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(good[:len(good) // 2])
    _refused(tmp_path / "trunc.onnx", 422, "truncated or not an ONNX model")
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(Rejected) as info:
        check_onnx(tmp_path / "garbage.onnx", max_bytes=MAX)
    assert info.value.status in (415, 422) and "ONNX" in info.value.detail
    (tmp_path / "zip.onnx").write_bytes(b"PK\x03\x04" + bytes(200))
    _refused(tmp_path / "zip.onnx", 415, "zip archive", ".pt2")
    (tmp_path / "empty.onnx").write_bytes(b"")
    _refused(tmp_path / "empty.onnx", 415, "not an ONNX model")


def test_checker_errors_are_refused(tmp_path: Path) -> None:
    model = _graph_model([helper.make_node("Add", ["x", "missing"], ["y"])], {}, ["N", 4])
    _refused(_save(model, tmp_path / "bad.onnx"), 422, "onnx.checker refused")


def test_oversize_file_is_refused_before_reading(tmp_path: Path) -> None:
    model = _graph_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         {"w": _w(256, 256)}, ["N", 256])
    path = _save(model, tmp_path / "big.onnx")
    _refused(path, 413, "MiB; the limit is", max_bytes=64 * 1024)


def test_recursive_local_function_is_refused(tmp_path: Path) -> None:
    fn = helper.make_function("local", "Loop1", ["a"], ["b"],
                              [helper.make_node("Loop1", ["a"], ["b"], domain="local")],
                              [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model = _graph_model([helper.make_node("Loop1", ["x"], ["y"], domain="local")], {},
                         ["N", 4], extra_opsets=(helper.make_opsetid("local", 1),))
    model.functions.append(fn)
    path = tmp_path / "rec.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(Rejected) as info:
        check_onnx(path, max_bytes=MAX)
    assert info.value.status == 422 and ("calls itself" in info.value.detail
                                         or "checker" in info.value.detail)


def test_constant_bomb_is_refused(tmp_path: Path) -> None:
    """A ConstantOfShape of 2^40 elements is refused before anything is allocated."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    model = _graph_model(nodes, {"shape": _i(1 << 20, 1 << 20)}, ["N", 4])
    _refused(_save(model, tmp_path / "bomb.onnx"), 422, "ConstantOfShape", "elements")


def test_broadcast_bomb_of_constants_is_refused(tmp_path: Path) -> None:
    """Two constant vectors whose sum broadcasts to 2^40 elements: refused from the inferred
    output shape, before numpy allocates it."""
    nodes = [helper.make_node("Add", ["col", "row"], ["big"]),
             helper.make_node("ReduceMax", ["big"], ["m"], keepdims=0),
             helper.make_node("Mul", ["x", "m"], ["y"])]
    inits = {"col": np.zeros((1 << 20, 1), np.float32), "row": np.zeros((1, 1 << 20), np.float32)}
    _refused(_save(_graph_model(nodes, inits, ["N", 4]), tmp_path / "b.onnx"), 422,
             "Add", "elements")


def test_training_mode_and_unsupported_attributes_are_refused(tmp_path: Path) -> None:
    model = _graph_model([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
                         {"s": _i(-1), "e": _i(-100), "a": _i(1), "st": _i(-1)}, ["N", 4])
    _refused(_save(model, tmp_path / "rev.onnx"), 422, "Slice", "step")
    model = _graph_model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3])],
                         {"w": _w(2, 1, 3)}, ["N", 1, 8])
    _refused(_save(model, tmp_path / "c1.onnx"), 422, "1-d convolution", "Conv2d")
