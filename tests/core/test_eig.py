import pytest
import torch

from core.data import ArrayDataset
from core.eig import SampleBuffer, full_eigh, gram_eigh, leading_eigh, top_eigh
from core.errors import SpecError
from core.models import build
from core.pca import (
    StreamingCovariance,
    collect_input_stats,
    effective_dimensionality,
    selector_enough,
)
from core.pcn import pcn_input_transform


def subspace_angle(a, b):
    """Largest principal angle (radians) between the column spaces of a and b."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    s = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return float(torch.arccos(s.min()))


def spiked_samples(n, m, k, seed=0):
    """n samples in m dims with k strong, well-separated directions plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    scales = torch.linspace(10.0, 3.0, k, dtype=torch.float64)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scales
    return z @ basis.T + 0.1 * torch.randn(n, m, generator=g, dtype=torch.float64) + 1.5


def test_top_eigh_matches_full_eigh():
    h = spiked_samples(1000, 200, 8)
    cov = torch.cov(h.T)
    e_full, v_full = full_eigh(cov)
    for k in (1, 5, 8):
        e, v = top_eigh(cov, k, generator=torch.Generator().manual_seed(3))
        assert e.shape == (k,) and v.shape == (200, k)
        assert torch.allclose(e, e_full[:k], rtol=1e-6, atol=0)
        assert subspace_angle(v, v_full[:, :k]) < 1e-5
        # same sign convention as the full route: columns equal, not only spans
        assert torch.allclose(v, v_full[:, :k], atol=1e-6)


def test_top_eigh_is_deterministic_and_falls_back_when_k_is_large():
    cov = torch.cov(spiked_samples(500, 40, 4).T)
    e1, v1 = top_eigh(cov, 3)
    e2, v2 = top_eigh(cov, 3)
    assert torch.equal(e1, e2) and torch.equal(v1, v2)
    e_big, _ = top_eigh(cov, 30)  # 2 * (k + 10) >= m -> dense eigh
    assert torch.allclose(e_big, full_eigh(cov)[0][:30], rtol=1e-12)


def test_gram_route_equals_covariance_route():
    h = spiked_samples(30, 200, 5)  # N < m
    mu, eigvals, eigvecs, trace = gram_eigh(h)
    cov_e, cov_v = full_eigh(torch.cov(h.T))
    assert eigvals.shape == (200,) and eigvecs.shape == (200, 29)  # rank N - 1
    assert torch.allclose(mu, h.mean(0), atol=1e-12)
    assert torch.allclose(eigvals[:29], cov_e[:29], rtol=1e-8)
    assert torch.all(eigvals[29:] == 0)
    assert trace == pytest.approx(float(torch.trace(torch.cov(h.T))), rel=1e-10)
    assert torch.allclose(eigvecs, cov_v[:, :29], atol=1e-7)  # same signs
    assert torch.allclose(eigvecs.T @ eigvecs, torch.eye(29, dtype=torch.float64), atol=1e-10)

    buf = SampleBuffer(200, 30)
    for chunk in torch.split(h, [7, 23]):
        buf.update(chunk)
    _mu2, _e2, v2, _t = buf.finalize(top_k=4)
    assert buf.total_variance() == pytest.approx(trace, rel=1e-10)
    assert v2.shape == (200, 4) and torch.allclose(v2, eigvecs[:, :4], atol=1e-12)
    with pytest.raises(ValueError, match="at most 30"):
        buf.update(h[:1])


def test_streaming_covariance_top_k():
    h = spiked_samples(1500, 120, 6)
    cov = StreamingCovariance(120)
    for chunk in torch.split(h, 500):
        cov.update(chunk)
    _mu, e_all, v_all = cov.finalize()
    _, e, v = cov.finalize(6, solver="subspace")
    assert torch.allclose(e, e_all[:6], rtol=1e-6) and torch.allclose(v, v_all[:, :6], atol=1e-6)
    assert cov.total_variance() == pytest.approx(float(e_all.sum()), rel=1e-10)
    with pytest.raises(ValueError, match="solver"):
        cov.finalize(3, solver="gram")


def wide_mlp_and_data(n):
    torch.manual_seed(0)
    model = build({"name": "mlp", "input_shape": [1, 1, 64], "widths": [48, 20]}).double()
    x = spiked_samples(n, 64, 5, seed=1).reshape(n, 1, 1, 64).float()
    return model, ArrayDataset(x, torch.zeros(n, dtype=torch.int64))


def test_collect_input_stats_top_k_and_gram_match_default():
    model, data = wide_mlp_and_data(40)  # fc1 sees 40 < 64 samples -> Gram route with top_k
    full = collect_input_stats(model, ["fc1", "fc2"], data, samples=40, batch_size=16)
    fast = collect_input_stats(model, ["fc1", "fc2"], data, samples=40, batch_size=16, top_k=4)
    # fc1: Gram route: complete spectrum (zeros past rank 39), 4 eigenvectors
    assert fast["fc1"].eigvals.shape == (64,) and fast["fc1"].eigvecs.shape == (64, 4)
    assert fast["fc1"].total_variance is None
    assert torch.allclose(fast["fc1"].eigvals[:39], full["fc1"].eigvals[:39], rtol=1e-8)
    assert torch.allclose(fast["fc1"].eigvecs, full["fc1"].eigvecs[:, :4], atol=1e-6)
    # fc2: 40 samples of 48 dims -> also Gram; fc3 input 20 < 40 -> covariance route
    stats = collect_input_stats(model, ["fc3"], data, samples=40, batch_size=16, top_k=3)
    ref = collect_input_stats(model, ["fc3"], data, samples=40, batch_size=16)
    assert stats["fc3"].eigvals.shape == (3,)
    assert stats["fc3"].total_variance == pytest.approx(float(ref["fc3"].eigvals.sum()))
    assert torch.allclose(stats["fc3"].eigvals, ref["fc3"].eigvals[:3], rtol=1e-6)
    # energy selection on a partial spectrum uses the trace, not the partial sum
    e = ref["fc3"].eigvals
    want = effective_dimensionality(e, energy=0.5)
    got = effective_dimensionality(stats["fc3"].eigvals, energy=0.5,
                                   total_variance=stats["fc3"].total_variance)
    assert got == min(want, 3)


def test_gram_solver_refuses_many_samples_and_transform_caps_dims():
    model, data = wide_mlp_and_data(100)
    with pytest.raises(SpecError, match="fewer samples than dims"):
        collect_input_stats(model, ["fc1"], data, samples=100, solver="gram")
    stats = collect_input_stats(model, ["fc1"], data, samples=100, top_k=6, solver="subspace")
    new, report = pcn_input_transform(model, stats, {"dims": 10}, ["fc1"])
    assert report["fc1"]["dims"] == 6 and new.fc1.U.shape == (64, 6)
    assert 0 < report["fc1"]["explained_variance"] < 1


def test_leading_eigh_grows_until_the_selector_is_decided():
    h = spiked_samples(3000, 400, 40)  # 40 strong directions, then a flat floor
    cov = torch.cov(h.T)
    e_all, v_all = full_eigh(cov)
    t = float(e_all[50])  # 50 eigenvalues above t: k0 = 32 is not enough, 64 is
    calls = []

    def enough(e):
        calls.append(e.numel())
        return float(e[-1]) <= t

    e, v = leading_eigh(cov, enough, k0=32)
    assert calls == [32, 64] and e.numel() == 64
    # the 40 strong pairs are exact; those in the flat noise floor only to tol * e_max = 1e-6
    assert torch.allclose(e[:40], e_all[:40], rtol=1e-9)
    assert torch.allclose(e, e_all[:64], atol=1e-6 * float(e_all[0]))
    assert torch.allclose(v[:, :40].abs(), v_all[:, :40].abs(), atol=1e-5)
    assert effective_dimensionality(e, threshold=t) == effective_dimensionality(e_all,
                                                                                threshold=t)
    # once a dense eigh is cheaper it returns the whole spectrum
    e, _ = leading_eigh(cov, lambda e: False, k0=32)
    assert e.numel() == 400


def test_selector_enough_matches_effective_dimensionality():
    e_all = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.05], dtype=torch.float64)
    total = float(e_all.sum())
    for sel in ({"threshold": 0.3}, {"dims": 3}, {"energy": 0.9}):
        enough = selector_enough([sel], total)
        first = next(k for k in range(1, 9) if enough(e_all[:k]))
        # the first prefix that is "enough" already decides the selection exactly
        assert effective_dimensionality(e_all[:first], total_variance=total, **sel) == \
            effective_dimensionality(e_all, **sel)
    both = selector_enough([{"dims": 2}, {"threshold": 0.3}], total)
    assert not both(e_all[:3]) and both(e_all[:5])
    with pytest.raises(Exception, match="selector"):
        selector_enough([{"bogus": 1}], total)


def test_gram_route_with_enough_returns_only_the_needed_pairs():
    h = spiked_samples(600, 2000, 10)  # N < m, and the N x N Gram is big enough to iterate
    mu, e_all, v_all, trace = gram_eigh(h)
    t = float(e_all[20])
    mu2, e, v, trace2 = gram_eigh(h, enough_for=lambda _trace: lambda e: float(e[-1]) <= t)
    assert 21 <= e.numel() < 600 and v.shape == (2000, e.numel())
    assert trace2 == pytest.approx(trace, rel=1e-12) and torch.equal(mu, mu2)
    assert torch.allclose(e, e_all[:e.numel()], rtol=1e-6)
    assert torch.allclose(v[:, :21], v_all[:, :21], atol=1e-5)


def test_streaming_covariance_float32_batches_keep_precision_under_a_large_mean():
    # a mean 1e3 times the spread: the raw-moment formula in float32 would lose everything
    g = torch.Generator().manual_seed(0)
    h = 1000.0 + torch.randn(4000, 16, generator=g, dtype=torch.float64) @ torch.diag(
        torch.linspace(0.1, 2.0, 16, dtype=torch.float64))
    cov = StreamingCovariance(16)
    for chunk in torch.split(h.float(), 256):
        cov.update(chunk)
    ref = torch.cov(h.float().double().T)
    assert torch.allclose(cov.covariance(), ref, atol=1e-4 * float(ref.abs().max()))
    assert torch.allclose(cov.mean(), h.float().double().mean(0), rtol=1e-9)
