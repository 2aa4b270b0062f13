"""The dependency graph of imported models (core.graph_deps) and what the structured methods do
with it: channel_prune, the output-based PCN transform, unit-pruning analyses, the prunability
report — on the three architectures outside the zoo (tests/import_models.py) imported through
torch.export, on a net with concatenations / a grouped conv / a gating multiply, and on zoo
models (unchanged)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.applies import APPLIES, why_not
from core.channel_prune import ChannelPruneConfig, channel_prune
from core.data import ArrayDataset
from core.errors import SpecError
from core.graph_deps import UnitGroup, graph_deps, graph_unit_groups
from core.import_pt2 import graph_from_program
from core.metrics import count_macs, param_counts
from core.models import build, import_graph, load, save
from core.pca import collect_input_stats
from core.pcn_graph import group_units, prune_units, unit_groups, untouched_units
from core.pcn_output import pcn_transform
from core.prunability import prunability_report
from core.redundancy import unit_pruning_curve
from tests.import_models import example_input, make, nontrivial_batchnorm

SHAPE = (1, 16, 16)  # small inputs keep the channel_prune bisection fast
ARCHS = {"resnet18": {"width": 4}, "mobilenetv2": {},
         "vit": {"image": 16, "patch": 4, "dim": 16, "heads": 4, "mlp": 32}}
_CACHE: dict[str, tuple[nn.Module, nn.Module]] = {}


def _export(model: nn.Module, x: torch.Tensor) -> nn.Module:
    program = torch.export.export(model.eval(), (x,), dynamic_shapes={
        "x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    return import_graph(*graph_from_program(program))


def imported(name: str) -> tuple[nn.Module, nn.Module]:
    """(the torch model, its import through torch.export), built once per test module."""
    if name not in _CACHE:
        model = make(name, **ARCHS[name])
        _CACHE[name] = model, _export(model, example_input(2, SHAPE))
    original, graph = _CACHE[name]
    return original, copy.deepcopy(graph)


def _x(batch: int = 4) -> torch.Tensor:
    return example_input(batch, SHAPE, seed=3)


class ConcatNet(nn.Module):
    """Two convs concatenated (BN + depthwise conv over the concatenation), a grouped conv, a
    squeeze-excitation gate (mul), a concatenation flattened into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.c = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.d = nn.Conv2d(8, 6, 1)
        self.se1, self.se2 = nn.Linear(6, 3), nn.Linear(3, 6)
        self.e = nn.Conv2d(8, 2, 1)
        self.fc = nn.Linear(8 * 7 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.b(x))], 1)
        h = F.relu(self.dw(F.relu(self.bn(h))))
        hc = F.relu(self.c(h))
        h = F.relu(self.d(self.g(hc)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(h.mean((2, 3))))))
        h = h * s[:, :, None, None]
        return self.fc(torch.flatten(torch.cat([h, self.e(hc)], 1), 1))


@pytest.fixture(scope="module")
def concat_net() -> nn.Module:
    torch.manual_seed(0)
    model = nontrivial_batchnorm(ConcatNet().eval())
    return _export(model, torch.randn(2, 1, 14, 14))


# ---- groups found --------------------------------------------------------------------------

def test_resnet18_stages_are_one_group_each() -> None:
    _, model = imported("resnet18")
    groups = unit_groups(model)
    # stage 1 has no projection shortcut: the stem joins the residual stream
    assert groups["conv1"] == UnitGroup(
        "conv1", ("conv1", "layer1.0.conv2", "layer1.1.conv2"),
        ("bn1", "layer1.0.bn2", "layer1.1.bn2"),
        (("layer1.0.conv1",), ("layer1.1.conv1",), ("layer2.0.conv1", "layer2.0.downsample.0")))
    for s in (2, 3, 4):
        stream = groups[f"layer{s}.0.conv2"]
        assert stream.producers == (f"layer{s}.0.conv2", f"layer{s}.0.downsample.0",
                                    f"layer{s}.1.conv2")
        assert stream.norms == (f"layer{s}.0.bn2", f"layer{s}.0.downsample.1", f"layer{s}.1.bn2")
        assert stream.readers[-1] == ((f"layer{s + 1}.0.conv1", f"layer{s + 1}.0.downsample.0")
                                      if s < 4 else ("fc",))
    for s in (1, 2, 3, 4):
        for b in (0, 1):
            p = f"layer{s}.{b}"
            assert groups[f"{p}.conv1"] == UnitGroup(f"{p}.conv1", (f"{p}.conv1",),
                                                     (f"{p}.bn1",), ((f"{p}.conv2",),))
    assert len(groups) == 12
    assert "logits" in untouched_units(model)["fc"]


def test_mobilenetv2_depthwise_convs_go_with_the_expand_conv() -> None:
    _, model = imported("mobilenetv2")
    groups = unit_groups(model)
    expand = groups["features.2.conv.0.0"]
    assert expand.norms == ("features.2.conv.0.1",)
    assert expand.channelwise == ("features.2.conv.1.0", "features.2.conv.1.1")
    assert expand.readers == (("features.2.conv.2.0",),)
    # the stem feeds the first block's depthwise conv directly
    assert groups["features.0.0"].channelwise == ("features.1.conv.0.0", "features.1.conv.0.1")
    # inverted residuals: the project convs added together are one group
    assert groups["features.2.conv.2.0"].producers == ("features.2.conv.2.0",
                                                       "features.3.conv.2.0")
    assert groups["features.2.conv.2.0"].readers == (("features.3.conv.0.0",),
                                                     ("features.4.conv.0.0",))
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1]
    placed = [n for g in groups.values() for n in g.channelwise if n in depthwise]
    assert sorted(placed) == sorted(depthwise)  # each in exactly one group
    assert list(untouched_units(model)) == ["classifier"]


def test_vit_mlp_hidden_units_prune_attention_and_stream_do_not() -> None:
    _, model = imported("vit")
    groups = unit_groups(model)
    assert list(groups) == ["blocks.0.fc1", "blocks.1.fc1"]
    assert groups["blocks.0.fc1"].readers == (("blocks.0.fc2",),)
    deps = graph_deps(model)
    stream, reason = deps.blocked["patch_embed"]
    assert set(stream.producers) == {"patch_embed", "blocks.0.attn.proj", "blocks.0.fc2",
                                     "blocks.1.attn.proj", "blocks.1.fc2"}
    assert "cls_token" in reason and "pos_embed" in reason and "LayerNorm" in reason
    untouched = untouched_units(model)
    assert "attention heads" in untouched["blocks.0.attn.qkv"]
    assert "logits" in untouched["head"]


def test_concatenation_segments_grouped_conv_and_gate(concat_net: nn.Module) -> None:
    deps = graph_deps(concat_net)
    a, b = deps.groups["a"], deps.groups["b"]
    assert a.norms == ("bn_a",) and b.norms == (None,)
    assert a.channelwise == b.channelwise == ("bn", "dw")
    assert b.segment("c") == (("a",), 1) and a.segment("c") == ((), 1)
    assert deps.groups["d"].producers == ("d", "se2")  # the gate multiplies d's units
    assert deps.groups["d"].segment("fc") == ((), 49)
    assert deps.groups["e"].segment("fc") == (("d",), 49)
    assert "grouped conv (groups=2) 'g'" in deps.blocked["c"][1]
    assert "groups=2" in deps.untouched["g"]
    assert set(deps.groups) == {"a", "b", "d", "se1", "e"}


def test_symbolic_trace_finds_the_same_groups() -> None:
    for name in ARCHS:
        original, model = imported(name)
        traced = torch.fx.symbolic_trace(original)
        traced.slimline_input_shape = list(SHAPE)
        assert list(graph_unit_groups(traced)) == list(unit_groups(model))


# ---- unit surgery --------------------------------------------------------------------------

def _reference(model: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    """`model` with the input columns of `removed[reader]` zeroed: what removing the units
    must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for reader, rows in removed.items():
            ref.get_submodule(reader).weight[:, rows] = 0
    return ref


def _every_other(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    keep, removed = {}, {}
    for name, group in unit_groups(model).items():
        units = group_units(model, group)
        keep[name] = torch.arange(0, units, 2)
        gone = [u for u in range(units) if u % 2]
        for reader in group.reader_layers:
            in_dim = model.get_submodule(reader).weight.shape[1]
            per = in_dim // units
            removed[reader] = [u * per + i for u in gone for i in range(per)]
    return keep, removed


@pytest.mark.parametrize("name", list(ARCHS))
def test_prune_units_keep_all_is_identity_and_a_subset_removes_the_units(name: str) -> None:
    _, model = imported(name)
    x = _x()
    same = copy.deepcopy(model)
    for group in unit_groups(same).values():
        prune_units(same, group, torch.arange(group_units(same, group)))
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=1e-5)

    keep, removed = _every_other(model)
    pruned = copy.deepcopy(model)
    for g, group in unit_groups(pruned).items():
        prune_units(pruned, group, keep[g])
    assert param_counts(pruned)["total"] < param_counts(model)["total"]
    torch.testing.assert_close(pruned(x), _reference(model, removed)(x), rtol=1e-5, atol=1e-5)


def test_concat_subset_keeps_every_other_segment(concat_net: nn.Module) -> None:
    x = torch.randn(3, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    keep = {"a": [0, 2, 5], "b": [1, 2], "d": [0, 3, 4], "se1": [1], "e": [1]}
    pruned = copy.deepcopy(concat_net)
    groups = unit_groups(pruned)
    for g, k in keep.items():  # the offsets move as groups before them shrink
        prune_units(pruned, groups[g], torch.tensor(k))
    removed = {"c": [1, 3, 4, 6 + 0, 6 + 3], "se1": [1, 2, 5], "se2": [0, 2],
               "fc": [u * 49 + i for u in (1, 2, 5, 6 + 0) for i in range(49)]}
    assert pruned.get_submodule("dw").groups == 5 and pruned.get_submodule("bn").num_features == 5
    assert pruned.get_submodule("fc").in_features == 4 * 49
    torch.testing.assert_close(pruned(x), _reference(concat_net, removed)(x), rtol=1e-5,
                               atol=1e-5)


# ---- channel_prune -------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "ratio"), [("resnet18", 0.5), ("mobilenetv2", 0.5),
                                             # only the MLP hidden units are prunable in a ViT
                                             ("vit", 0.75)])
def test_channel_prune_shrinks_runs_and_replays(name: str, ratio: float, tmp_path) -> None:
    _, model = imported(name)
    x = _x()
    new, report = channel_prune(model, ChannelPruneConfig(target={"mac_ratio": ratio}))
    shape = model.slimline_arch["input_shape"]
    assert report["ratio"] <= ratio and count_macs(new, shape) < count_macs(model, shape)
    assert new(x).shape == model(x).shape
    assert any(g["kept"] < g["total"] for g in report["groups"].values())
    save(new, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors")
    torch.testing.assert_close(back(x), new(x), rtol=0, atol=0)
    rebuilt = build(new.slimline_arch)  # the edit replays by group name on the bare graph
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in new.state_dict().items()}
    full, _ = channel_prune(model, ChannelPruneConfig(target={"mac_ratio": 1.0}))
    torch.testing.assert_close(full(x), model(x), rtol=0, atol=1e-5)


def test_onnx_imports_prune_like_pt2_ones(tmp_path) -> None:
    """The ONNX converter writes a Flatten as reshape(x, [-1, C]): the literal C is lowered
    with the units (and again when the edit replays)."""
    pytest.importorskip("onnx")
    import onnx

    from tests.import_models import export_onnx
    from worker.onnx_import import graph_from_onnx
    original, pt2 = imported("resnet18")
    path = export_onnx(original, tmp_path / "m.onnx", example_input(2, SHAPE))
    model = import_graph(*graph_from_onnx(onnx.load(str(path))))
    assert list(unit_groups(model)) == list(unit_groups(pt2))
    assert unit_groups(model)["layer4.0.conv2"].literals  # reshape(x, [-1, 32])
    x = _x()
    keep, removed = _every_other(model)
    pruned = copy.deepcopy(model)
    for g, group in unit_groups(pruned).items():
        prune_units(pruned, group, keep[g])
    torch.testing.assert_close(pruned(x), _reference(model, removed)(x), rtol=1e-5, atol=1e-5)
    new, _ = channel_prune(model, ChannelPruneConfig(target={"param_ratio": 0.6}))
    save(new, tmp_path / "m.safetensors")
    torch.testing.assert_close(load(tmp_path / "m.safetensors")(x), new(x), rtol=0, atol=0)


def test_channel_prune_cuts_masks_through_concatenations(concat_net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(m.weight.shape, generator=gen) > 0.3
             for n, m in concat_net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    data = ArrayDataset(torch.randn(32, 1, 14, 14, generator=gen),
                        torch.randint(0, 5, (32,), generator=gen))
    new, report = channel_prune(concat_net, ChannelPruneConfig(
        target={"param_ratio": 0.7}, criterion="taylor", samples=32), data=data, masks=masks)
    assert new(data.x[:2]).shape == (2, 5)
    for name, mask in new.slimline_masks.items():
        assert mask.shape == new.get_submodule(name).weight.shape, name
    kept = torch.tensor(report["groups"]["a"]["keep"])
    assert torch.equal(new.slimline_masks["a"], masks["a"][kept])
    assert torch.equal(new.slimline_masks["dw"][:len(kept)], masks["dw"][kept])


def test_channel_prune_on_a_blocked_group_names_the_reason() -> None:
    _, model = imported("vit")
    with pytest.raises(SpecError, match="attention heads"):
        channel_prune(model, ChannelPruneConfig(target={"mac_ratio": 0.9},
                                                layers=("blocks.0.attn.qkv",)))


# ---- output-based PCN, redundancy ----------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCHS))
def test_pcn_output_full_basis_reproduces_the_model(name: str, tmp_path) -> None:
    _, model = imported(name)
    model = model.double()
    x = _x(64).double()
    data = ArrayDataset(x.float(), torch.zeros(64, dtype=torch.int64))
    groups = unit_groups(model)
    readers = sorted({r for g in groups.values() for r in g.reader_layers})
    stats = collect_input_stats(model, readers, data, samples=64)
    select = {"per_layer": {r: {"dims": stats[r].dim} for r in readers}}
    new, report = pcn_transform(model, stats, select, layers=readers,
                                output={g: {"fraction": 1.0} for g in groups})
    assert set(report["output"]) == set(groups)
    torch.testing.assert_close(new(x), model(x), rtol=0, atol=1e-4)
    half, report = pcn_transform(model, stats, {"dims": 2}, layers=readers,
                                 output={g: {"fraction": 0.5} for g in groups})
    assert half(x).shape == model(x).shape
    assert all(o["keep"] < o["units"] for o in report["output"].values())
    save(half, tmp_path / "p.safetensors")
    torch.testing.assert_close(load(tmp_path / "p.safetensors")(x), half(x), rtol=0, atol=0)


def test_pcn_output_refuses_a_concatenation_reader(concat_net: nn.Module) -> None:
    data = ArrayDataset(torch.randn(16, 1, 14, 14), torch.zeros(16, dtype=torch.int64))
    stats = collect_input_stats(concat_net, ["c"], data, samples=16)
    with pytest.raises(SpecError, match="concatenation"):
        pcn_transform(concat_net, stats, {"dims": 4}, layers=["c"], output={"b": {"keep": 2}})


def test_unit_pruning_curve_on_an_imported_group() -> None:
    _, model = imported("mobilenetv2")
    x = _x()
    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(m(x).square().mean())

    curve = unit_pruning_curve(model, "features.2.conv.0.0", list(range(32)), [0, 16], evaluate)
    assert curve[0]["accuracy"] == pytest.approx(evaluate(model))
    assert curve[1]["units_left"] == 16 and curve[1]["accuracy"] != curve[0]["accuracy"]


# ---- prunability report --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARCHS))
def test_prunability_report_is_json_and_lists_what_stays(name: str) -> None:
    _, model = imported(name)
    report = prunability_report(model)
    assert json.loads(json.dumps(report)) == report == prunability_report(model)
    shape = model.slimline_arch["input_shape"]
    assert report["totals"]["macs"] == count_macs(model, shape)
    assert report["totals"]["params"] == param_counts(model)["total"]
    assert [g["name"] for g in report["groups"]] == list(unit_groups(model))
    layers = {row["name"]: row for row in report["layers"]}
    untouched = {g["name"]: g for g in report["untouched_groups"]}
    for row in layers.values():
        assert set(row["methods"]) | set(row["untouched"]) == set(
            ["snip", "random", "magnitude", "synflow", "lowrank", "pcn", "pcn_output",
             "dctps", "channel_prune", "analyze"])
    if name == "vit":
        assert {"patch_embed", "blocks.0.attn.qkv", "head"} <= set(untouched)
        assert "channel_prune" in layers["blocks.0.fc1"]["methods"]
        assert "attention heads" in layers["blocks.1.attn.qkv"]["untouched"]["channel_prune"]
    if name == "mobilenetv2":
        dw = layers["features.2.conv.1.0"]
        assert dw["kind"] == "depthwise_conv" and dw["group"] == "features.2.conv.0.0"
        assert "channel_prune" in dw["methods"] and "pcn_output" in dw["untouched"]
        assert "classifier" in untouched
    if name == "resnet18":
        assert layers["layer2.0.downsample.0"]["group"] == "layer2.0.conv2"
        assert layers["conv1"]["macs"] == 4 * 1 * 9 * 16 * 16


def test_prunability_report_of_a_zoo_model() -> None:
    model = build({"name": "resnet", "depth": 8})
    report = prunability_report(model)
    assert json.loads(json.dumps(report)) == report
    assert [g["name"] for g in report["groups"]] == list(unit_groups(model))
    assert [g["name"] for g in report["untouched_groups"]] == ["fc"]
    assert report["totals"]["macs"] == count_macs(model, [1, 28, 28])


def test_applies_rules_of_the_group_methods() -> None:
    assert {"channel_prune", "pcn_output"} <= set(APPLIES)
    depthwise, grouped = nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2)
    assert why_not("channel_prune", "dw", depthwise) is None  # sliced with its group
    assert "grouped conv" in why_not("channel_prune", "g", grouped)
    assert "depthwise conv" in why_not("pcn_output", "dw", depthwise)
    assert why_not("pcn_output", "fc", nn.Linear(3, 4)) is None


def test_zoo_groups_have_no_graph_fields() -> None:
    for arch in ({"name": "resnet", "depth": 8}, {"name": "conv4"}, {"name": "lenet300"}):
        groups = unit_groups(build(arch))
        assert all(g.channelwise == () and g.segments == () for g in groups.values())
    assert list(unit_groups(build({"name": "lenet300"}))) == ["fc1", "fc2"]
