from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import (
    FASHION_MNIST_SHA256,
    ArrayDataset,
    fashion_mnist,
    from_arrays,
    read_idx,
    split,
    synthetic,
    write_idx,
)
from core.errors import DatasetError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) * 7 % 251).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == dtype and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_idx_hand_written_header(tmp_path):
    raw = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    (tmp_path / "l").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), [1, 2, 3])


@pytest.mark.parametrize("raw, match", [
    (b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
    (bytes([0, 0, 0x08, 1]) + (4).to_bytes(4, "big") + b"abc", "needs 4"),
    (bytes([0, 0, 0x08, 2]) + (4).to_bytes(4, "big"), "truncated"),
    (b"\x1f\x8bgarbage", "gzip"),
])
def test_idx_rejects_bad_files(tmp_path, raw, match):
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(DatasetError, match=match):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(not (FMNIST / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed")
def test_fashion_mnist_loads():
    train, test = fashion_mnist(FMNIST)
    assert train.x.shape == (60000, 1, 28, 28) and train.y.shape == (60000,)
    assert test.x.shape == (10000, 1, 28, 28) and test.y.shape == (10000,)
    assert train.x.dtype == torch.float32 and 0 <= float(train.x.min()) < float(train.x.max()) <= 1
    assert sorted(torch.unique(test.y).tolist()) == list(range(10))
    assert len(FASHION_MNIST_SHA256) == 4


def test_fashion_mnist_small_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8))
    train, test = fashion_mnist(tmp_path)
    assert train.x.shape == (6, 1, 28, 28) and test.y.tolist() == [0, 1, 2, 3]
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels"):
        fashion_mnist(tmp_path)


def test_from_arrays_shapes_and_scaling():
    x = np.full((5, 6, 6), 255, dtype=np.uint8)
    train, test = from_arrays({"x_train": x, "y_train": np.arange(5)})
    assert test is None and train.x.shape == (5, 1, 6, 6) and float(train.x.max()) == 1.0
    train, test = from_arrays({"x_train": torch.randn(4, 3, 2, 2), "y_train": torch.arange(4),
                               "x_test": np.zeros((2, 3, 2, 2)), "y_test": np.array([0, 1])})
    assert train.x.shape == (4, 3, 2, 2) and test.x.shape == (2, 3, 2, 2)
    assert test.x.dtype == torch.float32 and test.y.dtype == torch.int64
    flat, _ = from_arrays({"x_train": np.ones((3, 7), dtype=np.float64),
                           "y_train": np.array([0, 1, 2])})
    assert flat.x.shape == (3, 1, 1, 7)


@pytest.mark.parametrize("mapping, match", [
    ({"x_train": np.zeros((3, 4, 4))}, "y_train"),
    ({"x_train": np.zeros(3), "y_train": np.zeros(3, dtype=int)}, "shape"),
    ({"x_train": np.zeros((3, 4), dtype=object), "y_train": np.zeros(3, dtype=int)}, "numeric"),
    ({"x_train": np.array([[np.nan, 1.0]] * 2), "y_train": np.zeros(2, dtype=int)}, "NaN"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.zeros(3)}, "integer"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.array([0, -1, 2])}, "labels"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.array([0, 1, 10])}, r"\[0, 10\)"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.zeros(2, dtype=int)}, "shape"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.zeros(3, dtype=int), "x_test": np.zeros((1, 4))},
     "both"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.zeros(3, dtype=int),
      "x_test": np.zeros((1, 5)), "y_test": np.zeros(1, dtype=int)}, "x_test"),
    ({"x_train": np.zeros((3, 4)), "y_train": np.zeros(3, dtype=int), "x_val": 1}, "unexpected"),
])
def test_from_arrays_rejects(mapping, match):
    with pytest.raises(DatasetError, match=match):
        from_arrays(mapping, num_classes=10)


def test_synthetic_deterministic_and_shaped():
    a, at = synthetic("synthetic-blobs", 3)
    b, _ = synthetic("synthetic-blobs", 3)
    c, _ = synthetic("synthetic-blobs", 4)
    assert a.x.shape == (2000, 1, 28, 28) and at.x.shape == (500, 1, 28, 28)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert set(a.y.tolist()) == set(range(10))
    tiny, tiny_test = synthetic("synthetic-tiny", 0)
    assert tiny.x.shape == (256, 1, 8, 8) and tiny_test.x.shape == (128, 1, 8, 8)
    with pytest.raises(DatasetError, match="synthetic-blobs"):
        synthetic("synthetic-huge", 0)


def test_split_deterministic_in_seed():
    train, test = synthetic("synthetic-tiny", 0)
    s1, s2, s3 = split(train, test, 7), split(train, test, 7), split(train, test, 8)
    assert torch.equal(s1.val.x, s2.val.x) and torch.equal(s1.train.y, s2.train.y)
    assert not torch.equal(s1.val.x, s3.val.x)
    assert len(s1.val) == round(0.1 * 256) and len(s1.train) == 256 - len(s1.val)
    assert s1.test is test


def test_split_carves_test_when_missing():
    x = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    data = ArrayDataset(x, torch.zeros(20, dtype=torch.int64))
    s = split(data, None, 0, val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 5, 5)
    values = torch.cat([s.train.x, s.val.x, s.test.x]).flatten().sort().values
    assert torch.equal(values, x.flatten())  # a partition: nothing lost or duplicated
    with pytest.raises(DatasetError):
        split(data, None, 0, val_fraction=0.5)
