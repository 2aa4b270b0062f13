import pytest
import torch

from core.data import ArrayDataset
from core.errors import SpecError
from core.models import build, load, save
from core.pca import LayerStats, collect_input_stats
from core.pcn import PCNConv2d, PCNLinear
from core.pcn_graph import unit_groups
from core.pcn_output import pcn_transform, select_units, unit_scores
from tests.tiny_models import double_model

TINY_CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 5, 6, 4],
              "fc": [12, 9]}
CONV4_LAYERS = ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]


def calibration(shape, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.zeros(n, dtype=torch.int64))


def test_select_units_rules_and_ties():
    s = torch.tensor([0.5, 2.0, 0.5, 3.0, 0.1], dtype=torch.float64)
    assert select_units(s, {"keep": 2}).tolist() == [1, 3]
    assert select_units(s, {"keep": 3}).tolist() == [0, 1, 3]  # tie 0 vs 2: lower index
    assert select_units(s, {"keep": 99}).tolist() == [0, 1, 2, 3, 4]
    assert select_units(s, {"fraction": 0.4}).tolist() == [1, 3]
    assert select_units(s, {"score_mass": 5.0 / 6.1}).tolist() == [1, 3]
    assert select_units(s, {"score_mass": 0.83}).tolist() == [0, 1, 3]
    for bad in ({"keep": 0}, {"fraction": 1.5}, {"rank": 2}, {"keep": 1, "fraction": 0.5}):
        with pytest.raises(SpecError):
            select_units(s, bad)


def test_unit_scores_sum_rows_per_unit():
    U = torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 0.25], [-2.0, 0.0]], dtype=torch.float64)
    assert unit_scores([U], 4).tolist() == [2.0, 0.5, 0.25, 2.0]
    assert unit_scores([U], 2).tolist() == [2.5, 2.25]  # 2 rows per unit (flattened conv)
    assert unit_scores([U, 2 * U], 2).tolist() == [3.75, 3.375]  # averaged over readers


def test_output_pruning_removes_lowest_score_units_hand_computed():
    model = double_model({"name": "mlp", "input_shape": [1, 1, 6], "widths": [5, 4]})
    g = torch.Generator().manual_seed(3)
    V, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    mu = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    eigvals = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    stats = {"fc2": LayerStats(mu, eigvals, V, 100, "linear")}
    new, report = pcn_transform(model, stats, {"dims": 2}, ["fc2"],
                                output={"fc1": {"keep": 3}})
    scores = [abs(float(V[u, 0])) + abs(float(V[u, 1])) for u in range(5)]
    kept = sorted(sorted(range(5), key=lambda u: -scores[u])[:3])
    assert report["output"]["fc1"]["kept"] == kept
    assert report["output"]["fc1"]["scores"] == pytest.approx(scores)
    k = torch.tensor(kept)
    assert torch.equal(new.fc1.weight, model.fc1.weight[k])
    assert torch.equal(new.fc1.bias, model.fc1.bias[k])
    assert isinstance(new.fc2, PCNLinear) and new.fc2.U.shape == (3, 2)
    assert torch.equal(new.fc2.U, V[k, :2]) and torch.equal(new.fc2.mu, mu[k])
    W2, b2 = model.fc2.weight, model.fc2.bias
    assert torch.allclose(new.fc2.weight, W2[:, k] @ V[k, :2])
    assert torch.allclose(new.fc2.bias, b2 + W2[:, k] @ mu[k])
    assert new.slimline_arch["edits"] == [{"op": "pcn_output", "layer": "fc1", "keep": 3},
                                          {"op": "pcn_input", "layer": "fc2", "dims": 2}]


def full_stats(model, layers, data):
    return collect_input_stats(model, layers, data, samples=len(data), batch_size=100)


def test_keep_all_units_with_full_basis_is_exact():
    model = double_model(TINY_CONV4)
    stats = full_stats(model, CONV4_LAYERS, calibration([1, 8, 8]))
    select = {"per_layer": {n: {"dims": stats[n].dim} for n in CONV4_LAYERS}}
    output = {g: {"fraction": 1.0} for g in unit_groups(model)}
    new, report = pcn_transform(model, stats, select, CONV4_LAYERS, output=output)
    assert set(report["output"]) == {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2"}
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    assert (new(x) - model(x)).abs().max() < 1e-10


def test_pruning_dead_units_is_exact():
    """Units that never fire have zero rows in U (zero variance): pruning them changes nothing."""
    model = double_model({"name": "mlp", "input_shape": [1, 1, 6], "widths": [8, 5]})
    with torch.no_grad():
        model.fc1.bias.fill_(2.0)  # the other units are always active
        model.fc1.weight[[2, 5]] = 0.0
        model.fc1.bias[[2, 5]] = -1.0  # ReLU(-1) = 0 always
    data = calibration([1, 1, 6])
    stats = full_stats(model, ["fc2"], data)
    new, report = pcn_transform(model, stats, {"threshold": 1e-12}, ["fc2"],
                                output={"fc1": {"keep": 6}})
    assert report["input"]["fc2"]["dims"] == 6
    assert report["output"]["fc1"]["kept"] == [0, 1, 3, 4, 6, 7]
    x = torch.randn(30, 1, 1, 6, dtype=torch.float64) * 3
    assert (new(x) - model(x)).abs().max() < 1e-10


def test_conv_feeding_flattened_dense_layer():
    model = double_model(TINY_CONV4)
    data = calibration([1, 8, 8])
    stats = full_stats(model, ["fc1"], data)  # conv4: 4 filters of 2x2 -> fc1 reads 16 dims
    new, report = pcn_transform(model, stats, {"dims": 5}, ["fc1"],
                                output={"conv4": {"keep": 2}})
    V, mu = stats["fc1"].eigvecs, stats["fc1"].mu
    scores = V[:, :5].abs().sum(1).reshape(4, 4).sum(1)  # 4 rows (2x2 positions) per filter
    kept = sorted(torch.argsort(scores, descending=True)[:2].tolist())
    assert report["output"]["conv4"]["kept"] == kept
    rows = torch.tensor([f * 4 + p for f in kept for p in range(4)])
    assert new.conv4.out_channels == 2 and new.fc1.in_features == 8
    assert torch.equal(new.conv4.weight, model.conv4.weight[kept])
    assert torch.equal(new.fc1.U, V[rows, :5]) and torch.equal(new.fc1.mu, mu[rows])
    assert torch.allclose(new.fc1.weight, model.fc1.weight[:, rows] @ V[rows, :5])

    seen = {}
    hooks = [m.fc1.register_forward_pre_hook(lambda _m, inp, key=key: seen.__setitem__(key, inp[0]))
             for key, m in (("old", model), ("new", new))]
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    new(x), model(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(seen["new"], seen["old"][:, rows], atol=1e-12, rtol=0)  # kept: same


def test_round_trip_with_output_edits(tmp_path):
    torch.manual_seed(0)
    model = build(TINY_CONV4).eval()
    data = calibration([1, 8, 8])
    stats = full_stats(model, ["conv3", "conv4", "fc1", "fc2"], data)
    new, _ = pcn_transform(model, stats, {"dims": 3}, ["conv3", "conv4", "fc1", "fc2"],
                           output={"conv3": {"keep": 4}, "conv4": {"keep": 3},
                                   "fc1": {"fraction": 0.5}})
    edits = new.slimline_arch["edits"]
    assert [e["op"] for e in edits] == ["pcn_output"] * 3 + ["pcn_input"] * 4
    assert isinstance(new.conv4, PCNConv2d) and new.conv4.U.shape == (4, 3)
    assert new.conv4.out_channels == 3 and new.fc1.U.shape == (12, 3)
    assert new.fc2.U.shape == (6, 3) and new.fc1.out_features == 6
    path = tmp_path / "m.safetensors"
    save(new, path)
    loaded = load(path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), new(x))
    rebuilt = build(new.slimline_arch)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in new.state_dict().items()}


@pytest.mark.parametrize("output, layers, match", [
    ({"fc9": {"keep": 1}}, ["fc1", "fc2"], "unknown output groups"),
    ({"fc1": {"keep": 1}}, ["fc1"], "readers .*fc2"),
    ({"fc1": {"top": 1}}, ["fc1", "fc2"], "output rule"),
    ("all", ["fc1", "fc2"], "output must be"),
])
def test_bad_output_requests(output, layers, match):
    model = build(TINY_CONV4).eval()
    stats = full_stats(model, ["fc1", "fc2"], calibration([1, 8, 8], n=32))
    with pytest.raises(SpecError, match=match):
        pcn_transform(model, stats, {"dims": 2}, layers, output=output)


def test_bad_pcn_output_edit_replay():
    with pytest.raises(SpecError, match="keep must be in"):
        build({**TINY_CONV4, "edits": [{"op": "pcn_output", "layer": "conv4", "keep": 9}]})
    with pytest.raises(SpecError, match="unknown unit group"):
        build({**TINY_CONV4, "edits": [{"op": "pcn_output", "layer": "fc3", "keep": 2}]})
