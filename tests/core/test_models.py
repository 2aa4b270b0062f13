import json

import pytest
import torch
from torch import nn

from core.data import synthetic
from core.errors import CheckpointError, SpecError
from core.models import (
    ZOO,
    build,
    from_state_dict,
    get_layer,
    input_shape,
    load,
    normalize_arch,
    prunable_layers,
    read_arch,
    save,
)
from core.pca import collect_input_stats
from core.pcn import PCNConv2d, PCNLinear, pcn_input_transform


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", [
    {"name": "mlp", "widths": [32, 16]},
    {"name": "mlp", "widths": []},
    {"name": "lenet300"},
    {"name": "lenet5"},
    {"name": "conv4", "channels": [4, 4, 8, 8], "fc": [16, 16]},
    {"name": "conv4", "input_shape": [3, 32, 32], "channels": [4, 4, 8, 8], "fc": [16, 16]},
    {"name": "resnet", "depth": 20, "width": 1},
    {"name": "resnet", "depth": 20, "width": 0.5, "input_shape": [3, 32, 32], "num_classes": 7},
])
def test_zoo_models_build_and_forward(arch):
    torch.manual_seed(0)
    model = build(arch).eval()
    shape = input_shape(arch)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, normalize_arch(arch)["num_classes"])
    assert torch.isfinite(out).all()
    assert model.slimline_arch == normalize_arch(arch)


def test_resnet56_builds_with_expected_layer_count():
    model = build({"name": "resnet", "depth": 56, "width": 0.25})
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    # stem + 27 blocks * 2 convs + 3 projection shortcuts
    assert len(convs) == 1 + 27 * 2 + 3
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_lenet300_param_count():
    assert n_params(build({"name": "lenet300"})) == 266_610


def test_lenet5_param_count():
    expected = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (50 * 4 * 4 * 500 + 500) + (500 * 10 + 10)
    assert n_params(build({"name": "lenet5"})) == expected == 431_080


def test_conv4_param_count_by_formula():
    c = [64, 64, 128, 128]
    convs = sum(c_in * c_out * 9 + c_out for c_in, c_out in zip([1, *c[:-1]], c, strict=True))
    flat = 128 * 7 * 7  # 28 -> 14 -> 7 after two 2x2 pools ("same" convs keep the size)
    fcs = (flat * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    model = build({"name": "conv4"})
    assert n_params(model) == convs + fcs
    assert [n for n, _ in prunable_layers(model)] == [
        "conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]


def test_prunable_layers_forward_order_resnet():
    names = [n for n, _ in prunable_layers(build({"name": "resnet", "width": 0.25}))]
    assert names[0] == "conv1" and names[-1] == "fc"
    assert names.index("stage1.0.conv1") < names.index("stage2.0.conv1")
    assert len(names) == 1 + 9 * 2 + 3 + 1


def test_glorot_init_statistics():
    torch.manual_seed(0)
    model = build({"name": "lenet300"})
    w = model.fc1.weight
    bound = (6 / (784 + 300)) ** 0.5
    assert w.abs().max() <= bound
    assert abs(w.std().item() - bound / 3 ** 0.5) < 0.01 * bound
    assert torch.all(model.fc1.bias == 0)


def test_init_is_reproducible_with_generator():
    a = build({"name": "mlp", "widths": [8]}, generator=torch.Generator().manual_seed(1))
    b = build({"name": "mlp", "widths": [8]}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.fc1.weight, b.fc1.weight)


@pytest.mark.parametrize("arch, match", [
    ({"name": "vgg"}, "valid names"),
    ({"name": "mlp", "depth": 3}, "unknown kwargs"),
    ({"name": "resnet", "depth": 21}, "6n\\+2"),
    ({"name": "lenet5", "input_shape": [1, 8, 8]}, "16x16"),
    ({"name": "mlp", "init": "zeros"}, "unknown init"),
    ({"name": "mlp", "num_classes": 0}, "num_classes"),
    ({"name": "mlp", "widths": "abc"}, "widths"),
    ({"name": "conv4", "input_shape": [1, 28]}, "input_shape"),
    ({"name": "mlp", "edits": [{"op": "prune"}]}, "known ops"),
])
def test_bad_arch_raises_spec_error(arch, match):
    with pytest.raises(SpecError, match=match):
        build(arch)


def test_zoo_names():
    assert set(ZOO) == {"mlp", "lenet300", "lenet5", "conv4", "resnet"}


def test_save_load_round_trip(tmp_path):
    model = build({"name": "conv4", "channels": [4, 4, 8, 8], "fc": [16, 16]}).eval()
    path = tmp_path / "m.safetensors"
    save(model, path)
    assert read_arch(path) == model.slimline_arch
    loaded = load(path)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


def test_resnet_round_trip_keeps_bn_buffers(tmp_path):
    model = build({"name": "resnet", "width": 0.25})
    model.train()
    model(torch.randn(8, 1, 28, 28))  # move BN running stats away from their init
    model.eval()
    save(model, tmp_path / "r.safetensors")
    loaded = load(tmp_path / "r.safetensors")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


def test_pcn_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build({"name": "conv4", "input_shape": [1, 8, 8], "channels": [4, 4, 6, 6],
                   "fc": [12]}).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["conv2", "fc1", "fc2"], train, samples=128, batch_size=64)
    new, _ = pcn_input_transform(model, stats, {"dims": 3}, ["conv2", "fc1", "fc2"])
    path = tmp_path / "pcn.safetensors"
    save(new, path)
    arch = read_arch(path)
    assert [e["layer"] for e in arch["edits"]] == ["conv2", "fc1", "fc2"]
    loaded = load(path)
    assert isinstance(loaded.conv2, PCNConv2d) and isinstance(loaded.fc1, PCNLinear)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(new(x), loaded(x))


def test_float64_checkpoint_loads_as_float64(tmp_path):
    model = build({"name": "mlp", "widths": [8]}).double()
    save(model, tmp_path / "d.safetensors")
    assert load(tmp_path / "d.safetensors").fc1.weight.dtype == torch.float64


ARCH = {"name": "mlp", "widths": [8]}


def good_tensors():
    return {k: v.clone() for k, v in build(ARCH).state_dict().items()}


def test_from_state_dict_accepts_good_tensors():
    model = from_state_dict(ARCH, good_tensors())
    assert model.fc1.weight.shape == (8, 784)


def test_from_state_dict_missing_key():
    tensors = good_tensors()
    del tensors["fc2.bias"]
    with pytest.raises(CheckpointError, match="missing.*fc2.bias"):
        from_state_dict(ARCH, tensors)


def test_from_state_dict_unexpected_key():
    tensors = good_tensors()
    tensors["fc9.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected.*fc9.weight"):
        from_state_dict(ARCH, tensors)


def test_from_state_dict_shape_mismatch():
    tensors = good_tensors()
    tensors["fc1.weight"] = torch.zeros(9, 784)
    with pytest.raises(CheckpointError, match=r"fc1.weight.*\(8, 784\).*\(9, 784\)"):
        from_state_dict(ARCH, tensors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_state_dict_non_finite(bad):
    tensors = good_tensors()
    tensors["fc2.weight"][0, 0] = bad
    with pytest.raises(CheckpointError, match="fc2.weight.*non-finite"):
        from_state_dict(ARCH, tensors)


def test_from_state_dict_integer_dtype():
    tensors = good_tensors()
    tensors["fc1.bias"] = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(CheckpointError, match="fc1.bias.*floating"):
        from_state_dict(ARCH, tensors)


def test_from_state_dict_unknown_arch_lists_valid_names():
    with pytest.raises(CheckpointError, match="valid names: conv4, lenet300, lenet5, mlp, resnet"):
        from_state_dict({"name": "vgg19"}, good_tensors())


def test_from_state_dict_bad_kwargs():
    with pytest.raises(CheckpointError, match="unknown kwargs"):
        from_state_dict({**ARCH, "dropout": 0.5}, good_tensors())


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="format"):
        load(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load(tmp_path / "junk.safetensors")


def test_edits_replayed_structurally():
    arch = {**ARCH, "edits": [{"op": "pcn_input", "layer": "fc2", "dims": 3}]}
    model = build(arch)
    assert isinstance(model.fc2, PCNLinear)
    assert model.fc2.weight.shape == (10, 3) and model.fc2.U.shape == (8, 3)
    json.dumps(model.slimline_arch)
    with pytest.raises(SpecError, match="dims"):
        build({**ARCH, "edits": [{"op": "pcn_input", "layer": "fc2", "dims": 9}]})
    with pytest.raises(SpecError, match="valid layers"):
        build({**ARCH, "edits": [{"op": "pcn_input", "layer": "fc7", "dims": 2}]})


def test_sparse_checkpoint_round_trip_and_tampering(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from core.prune import apply_masks, magnitude_scores, masks_from_scores

    model = build({"name": "lenet300"}, generator=torch.Generator().manual_seed(0))
    masks = masks_from_scores(magnitude_scores(model), 0.95)
    apply_masks(model, masks)
    model.slimline_masks = masks
    path = tmp_path / "sparse.safetensors"
    save(model, path)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < 0.2 * dense_bytes  # values + 1 bit per weight, no dense copy
    again = load(path)
    for name, mask in masks.items():
        assert torch.equal(again.slimline_masks[name], mask)
        assert torch.equal(get_layer(again, name).weight, get_layer(model, name).weight)
    # a file whose mask keeps more weights than it stores values for is refused
    tensors = load_file(str(path))
    tensors["fc1.weight.sparse_values"] = tensors["fc1.weight.sparse_values"][:-1].clone()
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match="sparse"):
        load(bad)
