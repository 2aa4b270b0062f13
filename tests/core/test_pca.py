import pytest
import torch

from core.data import ArrayDataset
from core.errors import SpecError
from core.models import build
from core.pca import StreamingCovariance, collect_input_stats, effective_dimensionality


def assert_same_eigvecs(a, b, atol=1e-8):
    for i in range(a.shape[1]):
        sign = torch.sign(a[:, i] @ b[:, i])
        assert torch.allclose(a[:, i], sign * b[:, i], atol=atol), f"column {i}"


def test_streaming_matches_one_shot_eigh():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = torch.randn(1000, 6, generator=g, dtype=torch.float64) @ mix + 3.0
    cov = StreamingCovariance(6)
    for chunk in torch.split(h, [1, 99, 400, 500]):
        cov.update(chunk)
    mu, eigvals, eigvecs = cov.finalize()
    assert cov.count == 1000

    full = torch.cov(h.T)  # (6, 6), divides by N-1
    e_ref, v_ref = torch.linalg.eigh(full)
    e_ref, v_ref = e_ref.flip(0), v_ref.flip(1)
    assert torch.allclose(mu, h.mean(0), atol=1e-12)
    assert torch.allclose(eigvals, e_ref, atol=1e-10)
    assert torch.all(eigvals[:-1] >= eigvals[1:])
    assert_same_eigvecs(eigvecs, v_ref)
    # the decomposition reconstructs the covariance
    assert torch.allclose(eigvecs @ torch.diag(eigvals) @ eigvecs.T, full, atol=1e-10)


def test_streaming_rejects_bad_batches():
    cov = StreamingCovariance(3)
    with pytest.raises(ValueError):
        cov.update(torch.zeros(4, 2))
    cov.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        cov.finalize()


def test_collect_input_stats_conv_and_linear_match_direct_pca():
    torch.manual_seed(0)
    model = build({"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 4, 4, 4],
                   "fc": [5]}).double()
    model.train()
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    data = ArrayDataset(x.float(), torch.zeros(40, dtype=torch.int64))
    stats = collect_input_stats(model, ["conv2", "fc1"], data, samples=30, batch_size=7)
    assert model.training  # mode restored

    captured = {}
    hooks = [getattr(model, n).register_forward_pre_hook(
        lambda m, inp, n=n: captured.__setitem__(n, inp[0])) for n in ("conv2", "fc1")]
    with torch.no_grad():
        model.eval()(x[:30].float().double())
    for hk in hooks:
        hk.remove()
    h_conv = captured["conv2"].permute(0, 2, 3, 1).reshape(-1, 3)  # (N*H*W, C)
    for name, h, kind in (("conv2", h_conv, "conv"), ("fc1", captured["fc1"], "linear")):
        st = stats[name]
        assert st.kind == kind and st.count == h.shape[0]
        e_ref, v_ref = torch.linalg.eigh(torch.cov(h.T))
        assert torch.allclose(st.mu, h.mean(0), atol=1e-10)
        assert torch.allclose(st.eigvals, e_ref.flip(0), atol=1e-9)
        assert_same_eigvecs(st.eigvecs, v_ref.flip(1), atol=1e-6)
    assert stats["conv2"].count == 30 * 8 * 8


def test_collect_input_stats_unknown_layer():
    model = build({"name": "mlp", "widths": [4]})
    data = ArrayDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(SpecError, match="valid layers: fc1, fc2"):
        collect_input_stats(model, ["fc3"], data, samples=4, batch_size=2)


E = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.25, 0.25])  # sum 10


@pytest.mark.parametrize("kwargs, expected", [
    ({"threshold": 0.4}, 4),
    ({"threshold": 0.25}, 4),  # strictly greater
    ({"threshold": 100.0}, 1),  # at least one
    ({"threshold": 0.0}, 6),
    ({"dims": 2}, 2),
    ({"dims": 50}, 6),  # capped at m
    ({"energy": 0.5}, 1),
    ({"energy": 0.51}, 2),
    ({"energy": 0.8}, 2),
    ({"energy": 0.9}, 3),
    ({"energy": 1.0}, 6),
])
def test_effective_dimensionality(kwargs, expected):
    assert effective_dimensionality(E, **kwargs) == expected


@pytest.mark.parametrize("kwargs", [
    {}, {"threshold": 0.1, "dims": 2}, {"dims": 0}, {"dims": 2.5}, {"dims": True},
    {"energy": 0.0}, {"energy": 1.2}, {"threshold": -1.0}, {"threshold": float("nan")},
])
def test_effective_dimensionality_bad_selectors(kwargs):
    with pytest.raises(SpecError):
        effective_dimensionality(E, **kwargs)


def test_stats_of_a_pcn_layer_are_those_of_its_original_input():
    """After a transform, tracking a PCN layer sees the m-dim input of the layer it replaced."""
    from core.models import build
    from core.pcn import PCNLinear, pcn_input_transform

    torch.manual_seed(0)
    model = build({"name": "mlp", "widths": [16], "input_shape": [1, 4, 4]})
    data = ArrayDataset(torch.randn(64, 1, 4, 4), torch.zeros(64, dtype=torch.long))
    before = collect_input_stats(model, ["fc2"], data, samples=64)
    pcn_model, _ = pcn_input_transform(model, before, {"dims": 4}, ["fc2"])
    assert isinstance(pcn_model.get_submodule("fc2"), PCNLinear)
    after = collect_input_stats(pcn_model, ["fc2"], data, samples=64)
    assert torch.allclose(after["fc2"].eigvals, before["fc2"].eigvals, rtol=1e-6, atol=1e-8)


def _conv_net_and_data(n=64):
    g = torch.Generator().manual_seed(0)
    model = build({"name": "conv4", "input_shape": [1, 12, 12], "channels": [8, 8, 16, 16],
                   "fc": [32, 32]}, generator=g).double()
    x = torch.randn(n, 1, 12, 12, generator=g)
    return model, ArrayDataset(x, torch.zeros(n, dtype=torch.long))


def test_max_rows_subsamples_conv_positions_only_and_estimates_the_same_covariance():
    model, ds = _conv_net_and_data()
    full = collect_input_stats(model, ["conv2", "conv4", "fc1"], ds, samples=64, batch_size=16)
    sub = collect_input_stats(model, ["conv2", "conv4", "fc1"], ds, samples=64, batch_size=16,
                              max_rows=2000, generator=torch.Generator().manual_seed(3))
    assert full["conv2"].count == 64 * 144 and 2000 <= sub["conv2"].count <= 2000 + 4
    assert sub["fc1"].count == full["fc1"].count == 64  # dense layers keep every sample
    # a random quarter of 9216 positions: the leading variance is estimated within ~10%
    assert float(sub["conv2"].eigvals[0]) == pytest.approx(float(full["conv2"].eigvals[0]),
                                                           rel=0.1)
    again = collect_input_stats(model, ["conv2"], ds, samples=64, batch_size=16,
                                max_rows=2000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["conv2"].eigvals, sub["conv2"].eigvals)  # seeded
    with pytest.raises(SpecError, match="max_rows"):
        collect_input_stats(model, ["conv2"], ds, max_rows=1)


def test_keep_computes_only_what_the_selectors_need():
    model, ds = _conv_net_and_data(48)  # fc1 reads 16*3*3 = 144 dims from 48 samples: Gram
    full = collect_input_stats(model, ["conv4", "fc1"], ds, samples=48)
    t = float(full["fc1"].eigvals[5] + full["fc1"].eigvals[6]) / 2  # 6 above t
    keep = {"fc1": [{"threshold": t}], "conv4": [{"dims": 3}]}
    fast = collect_input_stats(model, ["conv4", "fc1"], ds, samples=48, keep=keep)
    for name, sel in (("fc1", {"threshold": t}), ("conv4", {"dims": 3})):
        st, ref = fast[name], full[name]
        d = effective_dimensionality(st.eigvals, total_variance=st.total_variance, **sel)
        assert d == effective_dimensionality(ref.eigvals, **sel)
        assert_same_eigvecs(st.eigvecs[:, :d], ref.eigvecs[:, :d], atol=1e-6)
        total = st.total_variance if st.total_variance is not None else float(st.eigvals.sum())
        assert total == pytest.approx(float(ref.eigvals.sum()), rel=1e-9)
    with pytest.raises(SpecError, match="not collected"):
        collect_input_stats(model, ["fc1"], ds, keep={"fc2": [{"dims": 2}]})
    with pytest.raises(SpecError, match="solver 'auto'"):
        collect_input_stats(model, ["fc1"], ds, keep={"fc1": [{"dims": 2}]}, solver="eigh")
