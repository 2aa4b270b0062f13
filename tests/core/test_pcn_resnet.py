"""Seed 000 App. D, Fig. 4: PCN transforms of a ResNet with BatchNorm and residual stages."""
import pytest
import torch

from core.data import ArrayDataset
from core.models import build, load, save
from core.pca import collect_input_stats
from core.pcn import PCNConv2d
from core.pcn_graph import shared_input_sets, unit_groups
from core.pcn_output import pcn_transform

ARCH = {"name": "resnet", "depth": 20, "width": 0.25, "input_shape": [1, 8, 8]}


@pytest.fixture(scope="module")
def trained_resnet():
    """A ResNet-20 after a few SGD steps, so BN statistics and affine params are non-trivial."""
    torch.manual_seed(0)
    model = build(ARCH).double()
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):  # plain SGD steps (train mode: BN running stats move too)
        x = torch.rand(16, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (16,), generator=g)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return model.eval()


def conv_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)] + ["fc"]


def data(n=48):
    g = torch.Generator().manual_seed(2)
    return ArrayDataset(torch.rand(n, 1, 8, 8, generator=g), torch.zeros(n, dtype=torch.int64))


def test_resnet_graph():
    model = build(ARCH)
    groups = unit_groups(model)
    assert groups["stage1"].producers == ("stage1.0.conv2", "stage1.0.shortcut_conv",
                                          "stage1.1.conv2", "stage1.2.conv2")
    assert groups["stage1"].norms == ("stage1.0.bn2", "stage1.0.shortcut_bn", "stage1.1.bn2",
                                      "stage1.2.bn2")
    assert groups["stage1"].readers == (("stage1.1.conv1",), ("stage1.2.conv1",),
                                        ("stage2.0.conv1", "stage2.0.shortcut_conv"))
    assert groups["stage3"].readers[-1] == ("fc",)
    assert groups["conv1"].norms == ("bn1",)
    assert len(groups) == 1 + 9 + 3
    assert shared_input_sets(model) == [(f"stage{s}.0.conv1", f"stage{s}.0.shortcut_conv")
                                        for s in (1, 2, 3)]


def test_full_basis_input_and_output_transform_with_bn_is_exact(trained_resnet):
    model = trained_resnet
    assert model.stage2[0].bn1.running_var.sub(1).abs().max() > 1e-3  # BN stats moved
    layers = conv_layers(model)
    stats = collect_input_stats(model, layers, data(), samples=48, batch_size=48)
    select = {"per_layer": {n: {"dims": stats[n].dim} for n in layers}}
    output = {g: {"fraction": 1.0} for g in unit_groups(model)}
    new, report = pcn_transform(model, stats, select, layers, output=output)
    assert all(isinstance(new.get_submodule(n), PCNConv2d) for n in layers[:-1])
    assert len(report["output"]) == 13
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    assert (new(x) - model(x)).abs().max() < 1e-4
    assert (new(x) - model(x)).abs().max() < 1e-9  # float64: exact up to round-off


def test_truncated_stage_prunes_the_same_filters_everywhere(trained_resnet, tmp_path):
    model = trained_resnet
    layers = conv_layers(model)
    # stats only for one of each pair sharing an input: the partner reuses them (shared U)
    stats = collect_input_stats(model, [n for n in layers if "shortcut" not in n], data(),
                                samples=48, batch_size=48)
    new, report = pcn_transform(model, stats, {"conv": {"dims": 3}, "linear": {"dims": 6}},
                                layers, output={"stage2": {"keep": 5}, "stage3": {"keep": 9}})
    a, b = new.get_submodule("stage3.0.conv1"), new.get_submodule("stage3.0.shortcut_conv")
    assert torch.equal(a.U, b.U) and torch.equal(a.mu, b.mu) and a.U.shape == (5, 3)

    for stage, keep in (("stage2", 5), ("stage3", 9)):
        kept = torch.tensor(report["output"][stage]["kept"])
        assert kept.numel() == keep
        for producer, norm in zip(unit_groups(model)[stage].producers,
                                  unit_groups(model)[stage].norms, strict=True):
            assert new.get_submodule(producer).out_channels == keep
            old_bn, new_bn = model.get_submodule(norm), new.get_submodule(norm)
            # identical filter indices in every layer whose output is added
            assert torch.equal(new_bn.running_mean, old_bn.running_mean[kept])
            assert torch.equal(new_bn.weight, old_bn.weight[kept])
    # every added tensor of a stage has the same shape: the forward pass runs
    shapes = []
    hooks = [new.get_submodule(f"stage2.{b}.bn2").register_forward_hook(
        lambda _m, _i, out: shapes.append(tuple(out.shape))) for b in range(3)]
    hooks.append(new.get_submodule("stage2.0.shortcut_bn").register_forward_hook(
        lambda _m, _i, out: shapes.append(tuple(out.shape))))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = new(x)
    for h in hooks:
        h.remove()
    assert y.shape == (3, 10) and set(shapes) == {(3, 5, 4, 4)}
    path = tmp_path / "r.safetensors"
    save(new, path)
    assert torch.allclose(load(path)(x), y, atol=1e-12)
