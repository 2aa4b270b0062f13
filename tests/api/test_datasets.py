from __future__ import annotations

import io

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from tests.api.conftest import stored_objects


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_arrays():
    rng = np.random.default_rng(0)
    return {"x_train": rng.random((20, 1, 4, 4), dtype=np.float32),
            "y_train": rng.integers(0, 3, 20), "x_test": rng.random((6, 1, 4, 4),
                                                                    dtype=np.float32),
            "y_test": np.array([0, 1, 2, 3, 0, 1])}


def upload(client, data: bytes, filename="d.npz"):
    return client.post("/v1/datasets", files={"file": (filename, io.BytesIO(data))},
                       data={"name": "toy"})


def test_upload_npz_and_list(client, settings):
    r = upload(client, npz_bytes(**good_arrays()))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_classes"] == 4 and ds["input_shape"] == [1, 4, 4]
    assert ds["counts"] == {"train": 20, "test": 6} and ds["format"] == "npz"
    items = client.get("/v1/datasets").json()["items"]
    assert {"fashion-mnist", "synthetic-blobs", "synthetic-tiny"} <= {i["id"] for i in items}
    assert any(i["id"] == ds["id"] and not i["builtin"] for i in items)
    assert client.get(f"/v1/datasets/{ds['id']}").json()["id"] == ds["id"]
    assert len(stored_objects(settings)) == 1
    fitting = {"arch": {"name": "mlp", "input_shape": [1, 4, 4]}}
    job = client.post("/v1/jobs", json={"model": fitting, "dataset": ds["id"],
                                        "steps": [{"op": "evaluate"}]})
    assert job.status_code == 202, job.text
    # a fresh arch reads 1x28x28 by default: the 1x4x4 samples do not fit it
    job = client.post("/v1/jobs", json={"model": {"arch": {"name": "mlp"}}, "dataset": ds["id"],
                                        "steps": [{"op": "evaluate"}]})
    assert job.status_code == 422 and job.json()["detail"].startswith("dataset: "), job.text


def test_upload_safetensors(client):
    arrays = {k: np.ascontiguousarray(v) for k, v in good_arrays().items()}
    r = upload(client, st_save(arrays), "d.safetensors")
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "safetensors"


@pytest.mark.parametrize(("change", "needle"), [
    ({"y_train": np.zeros(19, dtype=np.int64)}, "samples"),
    ({"x_test": np.zeros((6, 1, 5, 5), dtype=np.float32)}, "shape"),
    ({"x_train": np.full((20, 1, 4, 4), np.nan, dtype=np.float32)}, "NaN"),
    ({"y_train": -np.ones(20, dtype=np.int64)}, "negative"),
    ({"y_train": np.zeros(20, dtype=np.float32)}, "integer"),
    ({"x_train": np.zeros(20, dtype=np.float32)}, "shape"),
    ({"extra": np.zeros(3)}, "unexpected"),
])
def test_bad_arrays_are_422(client, settings, change, needle):
    r = upload(client, npz_bytes(**(good_arrays() | change)))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InvalidDataset" and needle in r.json()["detail"]
    assert stored_objects(settings) == []


def test_missing_arrays_is_422(client):
    r = upload(client, npz_bytes(x_train=np.zeros((2, 3))))
    assert r.status_code == 422 and "y_train" in r.json()["detail"]


def test_pickle_in_npz_is_refused(client, settings):
    arrays = good_arrays() | {"x_train": np.array([{"evil": 1}] * 20, dtype=object)}
    r = upload(client, npz_bytes(**arrays))
    assert r.status_code == 422 and "pickle" in r.json()["detail"]
    assert stored_objects(settings) == []


def test_truncated_npz_and_wrong_format(client):
    data = npz_bytes(**good_arrays())
    assert upload(client, data[: len(data) // 2]).status_code == 422
    assert upload(client, b"csv,data", "d.csv").status_code == 415
