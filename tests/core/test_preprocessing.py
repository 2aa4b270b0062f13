"""core.data preprocessing: per-channel statistics, standardisation, single-channel replication
and bilinear resizing, NHWC / flat layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.data import ArrayDataset, adapt, channel_stats, standardize, to_layout
from core.errors import DatasetError


def data(n: int = 50, c: int = 3, h: int = 4, w: int = 5, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0][:c]).view(1, c, 1, 1)
    shift = torch.tensor([0.0, -2.0, 5.0, 1.0][:c]).view(1, c, 1, 1)
    x = torch.randn(n, c, h, w, generator=g) * scale + shift
    return ArrayDataset(x, torch.randint(0, 10, (n,), generator=g))


def test_channel_stats_match_torch_and_standardize_centres_every_channel():
    ds = data()
    mean, std = channel_stats(ds)
    x = ds.x.double()
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-9)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), rel=1e-9)
    assert std[1] > 2 and mean[2] > 4  # the channels really differ
    out = standardize(ds, mean, std)
    assert out.x.dtype == torch.float32 and out.x.shape == ds.x.shape and out.y is ds.y
    assert out.x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (out.x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-5
    assert torch.equal(ds.x, data().x)  # the input is left as it was


def test_a_constant_channel_gets_std_one():
    ds = data(c=2)
    ds.x[:, 1] = 0.25
    mean, std = channel_stats(ds)
    assert mean[1] == pytest.approx(0.25) and std[1] == 1.0


def test_standardize_refuses_a_wrong_channel_count():
    with pytest.raises(DatasetError, match="3 channel"):
        standardize(data(), [0.0], [1.0])


def test_nhwc_permutes_and_flat_flattens_in_nchw_order():
    ds = data(n=3, c=3, h=2, w=4)
    nhwc = to_layout(ds, "NHWC")
    assert nhwc.input_shape == [2, 4, 3]
    for n, c, h, w in [(0, 0, 0, 0), (1, 2, 1, 3), (2, 1, 0, 2)]:
        assert nhwc.x[n, h, w, c] == ds.x[n, c, h, w]
    assert nhwc.x.is_contiguous()
    flat = to_layout(ds, "flat")
    assert flat.input_shape == [24] and torch.equal(flat.x, ds.x.flatten(1))
    assert to_layout(ds, "NCHW") is ds
    assert len(flat.subset(torch.tensor([0, 2]))) == 2  # 2-D datasets still subset
    with pytest.raises(DatasetError, match="unknown layout"):
        to_layout(ds, "HWCN")


def test_adapt_replicates_one_channel_and_resizes_bilinearly():
    ds = data(n=4, c=1, h=28, w=28)
    out = adapt(ds, [3, 32, 32])
    assert out.input_shape == [3, 32, 32] and out.y is ds.y
    expected = F.interpolate(ds.x, size=(32, 32), mode="bilinear", align_corners=False,
                             antialias=False)
    for c in range(3):
        assert torch.equal(out.x[:, c:c + 1], expected)
    assert adapt(ds, [1, 28, 28]) is ds
    same_size = adapt(ds, [3, 28, 28])
    assert torch.equal(same_size.x[:, 2], ds.x[:, 0])
    with pytest.raises(DatasetError, match="3 channels into 4"):
        adapt(data(c=3), [4, 4, 5])
