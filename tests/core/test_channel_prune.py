"""core.channel_prune: structured pruning of whole units on LeNet-300-100, Conv4 and ResNet-20."""
import pytest
import torch
from torch import nn

from core.channel_prune import ChannelPruneConfig, channel_prune, prunable_groups
from core.data import ArrayDataset
from core.errors import SpecError
from core.metrics import count_macs, param_counts
from core.models import build, load, save

LENET = {"name": "lenet300"}
CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [16, 16, 32, 32], "fc": [64, 64]}
RESNET = {"name": "resnet", "depth": 20, "width": 0.5, "input_shape": [1, 8, 8]}
ARCHS = {"lenet300": LENET, "conv4": CONV4, "resnet20": RESNET}


def model_of(arch, seed=0):
    return build(arch, generator=torch.Generator().manual_seed(seed)).double().eval()


def inputs(arch, n=16, seed=1):
    shape = arch.get("input_shape", [1, 28, 28])
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


def dataset(arch, n=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(inputs(arch, n, seed).float(), torch.randint(0, 10, (n,), generator=g))


def config(**kw):
    return ChannelPruneConfig.from_dict({"target": {"mac_ratio": 0.5}, **kw})


def train_steps(model, arch, steps=3):
    """A few SGD steps in train mode, so BatchNorm statistics and affine parameters move."""
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(steps):
        x = inputs(arch, 16, int(torch.randint(0, 1000, (1,), generator=g)))
        y = torch.randint(0, 10, (16,), generator=g)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return model.eval()


def silence(model, group, units):
    """Make `units` of `group` contribute exactly nothing: their producers' rows (and biases,
    or their BatchNorm's gamma and beta) become zero."""
    for producer, norm in zip(group.producers, group.norms, strict=True):
        layer = model.get_submodule(producer)
        with torch.no_grad():
            if norm is None:
                layer.weight[units] = 0
                if layer.bias is not None:
                    layer.bias[units] = 0
            else:
                bn = model.get_submodule(norm)
                bn.weight[units] = 0
                bn.bias[units] = 0


def size_without(model, arch, silenced, kind):
    """Params or MACs of `model` with the silenced units removed (by the edit's replay)."""
    keep = {g: _units(model, g) - len(u) for g, u in silenced.items()}
    shaped = build({**arch, "edits": [{"op": "channel_prune", "keep": keep}]})
    shape = arch.get("input_shape", [1, 28, 28])
    return param_counts(shaped)["total"] if kind == "param_ratio" else count_macs(shaped, shape)


def _units(model, group):
    return model.get_submodule(prunable_groups(model)[group].producers[0]).weight.shape[0]


SILENCED = {
    "lenet300": {"fc1": list(range(0, 300, 3)), "fc2": list(range(1, 100, 4))},
    "conv4": {"conv2": [0, 3, 5], "conv4": [1, 2, 7, 8, 31], "fc1": list(range(0, 64, 2))},
    "resnet20": {"stage1.1.conv1": [0, 4], "stage2": [1, 2, 3, 9, 10], "stage3": [0, 31],
                 "conv1": [5]},
}


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("kind", ["mac_ratio", "param_ratio"])
def test_pruning_silent_units_keeps_the_outputs(name, kind):
    arch = ARCHS[name]
    model = model_of(arch)
    if name == "resnet20":
        train_steps(model, arch)
    groups = prunable_groups(model)
    for group, units in SILENCED[name].items():
        silence(model, groups[group], units)
    x = inputs(arch)
    before = model(x)
    base = param_counts(model)["total"] if kind == "param_ratio" else \
        count_macs(model, arch.get("input_shape", [1, 28, 28]))
    ratio = size_without(model, arch, SILENCED[name], kind) / base
    new, report = channel_prune(model, config(target={kind: ratio + 1e-9}))
    for group, units in SILENCED[name].items():  # exactly the silent units went
        kept = report["groups"][group]["keep"]
        assert sorted(set(kept) | set(units)) == list(range(report["groups"][group]["total"]))
        assert report["groups"][group]["kept"] == report["groups"][group]["total"] - len(units)
    assert report["ratio"] == pytest.approx(ratio)
    torch.testing.assert_close(new(x), before, rtol=1e-9, atol=1e-10)


def test_residual_streams_are_pruned_consistently():
    model = model_of(RESNET)
    new, report = channel_prune(model, config(target={"mac_ratio": 0.6}, round_to=8))
    for s in (1, 2, 3):
        width = report["groups"][f"stage{s}"]["kept"]
        blocks = getattr(new, f"stage{s}")
        assert blocks[0].shortcut_conv.out_channels == blocks[0].shortcut_bn.num_features == width
        for b, block in enumerate(blocks):
            assert block.conv2.out_channels == block.bn2.num_features == width
            assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
            if b:
                assert block.conv1.in_channels == width
        if s < 3:
            nxt = getattr(new, f"stage{s + 1}")[0]
            assert nxt.conv1.in_channels == nxt.shortcut_conv.in_channels == width
    assert new.fc.in_features == report["groups"]["stage3"]["kept"]
    assert new(inputs(RESNET)).shape == (16, 10)
    assert report["macs"]["after"] < report["macs"]["before"]


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("target", [{"mac_ratio": 0.5}, {"param_ratio": 0.3}])
def test_target_is_met_from_below(name, scope, target):
    arch = ARCHS[name]
    model = model_of(arch)
    new, report = channel_prune(model, config(target=target, scope=scope))
    (kind, ratio), = target.items()
    shape = arch.get("input_shape", [1, 28, 28])
    size = (lambda m: param_counts(m)["total"]) if kind == "param_ratio" else \
        (lambda m: count_macs(m, shape))
    achieved = size(new) / size(model)
    assert achieved == pytest.approx(report["ratio"])
    assert ratio - 0.03 <= achieved <= ratio
    quantity = "params" if kind == "param_ratio" else "macs"
    assert report[quantity] == {"before": size(model), "after": size(new)}


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("round_to", [8, 16])
def test_round_to_is_respected(name, round_to):
    arch = {**ARCHS[name], "width": 1} if name == "resnet20" else ARCHS[name]
    new, report = channel_prune(model_of(arch), config(target={"mac_ratio": 0.6},
                                                       round_to=round_to))
    for group, r in report["groups"].items():
        assert r["kept"] == r["total"] or r["kept"] % round_to == 0, group
        assert r["kept"] >= min(r["total"], round_to)
        assert len(r["keep"]) == r["kept"]
    assert report["ratio"] <= 0.6


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_checkpoint_round_trip(name, criterion, tmp_path):
    arch = ARCHS[name]
    model = model_of(arch).float()
    new, _ = channel_prune(model, config(criterion=criterion, round_to=8),
                           data=dataset(arch))
    assert new.slimline_arch["edits"][-1]["op"] == "channel_prune"
    save(new, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    x = inputs(arch).float()
    torch.testing.assert_close(loaded(x), new.eval()(x))
    assert param_counts(loaded) == param_counts(new)


def test_l1_and_taylor_disagree_on_units_that_read_dead_inputs():
    """fc1 units 0..49 have the largest weights but read only pixels that are always zero in
    the data: L1 keeps them, Taylor (activation x gradient) removes them first."""
    model = model_of(LENET).float()
    with torch.no_grad():
        model.fc1.weight[:50] = 0
        model.fc1.weight[:50, :392] = 1.0  # large weights on the dead first half
        model.fc1.bias[:50] = 0
    data = dataset(LENET, 128)
    data.x.view(len(data), -1)[:, :392] = 0
    cfg = dict(target={"param_ratio": 0.6}, layers=["fc1"])
    _, l1 = channel_prune(model, config(**cfg))
    _, taylor = channel_prune(model, config(criterion="taylor", samples=128, **cfg), data=data)
    assert set(range(50)) <= set(l1["groups"]["fc1"]["keep"])
    assert not set(range(50)) & set(taylor["groups"]["fc1"]["keep"])
    assert l1["groups"]["fc1"]["kept"] == taylor["groups"]["fc1"]["kept"]


def test_layers_limit_the_groups_and_accept_a_producer_name():
    model = model_of(RESNET)
    new, report = channel_prune(model, config(target={"param_ratio": 0.8},
                                              layers=["stage3.1.conv2", "stage2.0.conv1"]))
    assert set(report["groups"]) == {"stage3", "stage2.0.conv1"}
    assert new.stage1[0].conv1.out_channels == model.stage1[0].conv1.out_channels
    assert new.stage3[2].conv2.out_channels < model.stage3[2].conv2.out_channels


def test_masks_are_cut_like_their_weights():
    model = model_of(CONV4)
    model.slimline_masks = {n: torch.rand_like(model.get_submodule(n).weight) > 0.5
                            for n in ("conv2", "conv3", "fc1")}
    new, _ = channel_prune(model, config(round_to=8))
    for name, mask in new.slimline_masks.items():
        assert mask.shape == new.get_submodule(name).weight.shape


def test_errors():
    model = model_of(LENET)
    with pytest.raises(SpecError, match="needs calibration data"):
        channel_prune(model, config(criterion="taylor"))
    with pytest.raises(SpecError, match="out of reach"):
        channel_prune(model, config(target={"param_ratio": 0.01}, layers=["fc2"]))
    with pytest.raises(SpecError, match="no prunable unit group.*fc1, fc2"):
        channel_prune(model, config(layers=["fc3"]))


@pytest.mark.parametrize("spec, match", [
    ({}, "needs a target"),
    ({"target": {"sparsity": 0.5}}, "target must be"),
    ({"target": {"mac_ratio": 0}}, r"must be in \(0, 1\]"),
    ({"target": {"mac_ratio": 1.5}}, r"must be in \(0, 1\]"),
    ({"target": {"mac_ratio": 0.5, "param_ratio": 0.5}}, "target must be"),
    ({"target": {"mac_ratio": 0.5}, "criterion": "l2"}, "criterion must be one of l1, taylor"),
    ({"target": {"mac_ratio": 0.5}, "scope": "local"}, "scope must be one of"),
    ({"target": {"mac_ratio": 0.5}, "round_to": 4}, "round_to must be one of 1, 8, 16"),
    ({"target": {"mac_ratio": 0.5}, "samples": 0}, "samples must be a positive integer"),
    ({"target": {"mac_ratio": 0.5}, "layers": []}, "layers must be null"),
    ({"target": {"mac_ratio": 0.5}, "layers": "fc1"}, "layers must be null"),
    ({"target": {"mac_ratio": 0.5}, "sparsity": 0.5}, "unknown channel_prune fields"),
])
def test_config_refuses_bad_fields(spec, match):
    with pytest.raises(SpecError, match=match):
        ChannelPruneConfig.from_dict(spec)


def test_config_round_trips_through_a_dict():
    cfg = ChannelPruneConfig.from_dict({"op": "channel_prune", "criterion": "taylor",
                                        "target": {"param_ratio": 1}, "layers": ["fc1"],
                                        "round_to": 16, "samples": 64, "scope": "layerwise"})
    assert cfg.layers == ("fc1",) and cfg.target == {"param_ratio": 1.0}
    assert ChannelPruneConfig.from_dict(cfg.to_dict()) == cfg
