"""Submission checks on the real API: layer names, the dataset's shape and classes against the
model, label gaps at dataset upload, and plain-text upload errors (the real inspector)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from api.app import create_app
from service.settings import Settings
from tests.api.conftest import safetensors_bytes

TRAIN = {"op": "train", "epochs": 1}


def job(client, model, steps, dataset="synthetic-blobs"):
    return client.post("/v1/jobs", json={"model": model, "dataset": dataset, "steps": steps})


def refused(r, field: str) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "InvalidSpec" and body["detail"].startswith(f"{field}: "), body
    return body["detail"]


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload_dataset(client, data: bytes, **fields):
    return client.post("/v1/datasets", files={"file": ("d.npz", io.BytesIO(data))},
                       data={"name": "d", **fields})


def upload_model(client, arch: dict):
    """A model through the fake inspector: the arch as given, no prunability report."""
    r = client.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                    data={"arch": json.dumps(arch)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


LENET = {"arch": {"name": "lenet300"}}


# ---- layer names --------------------------------------------------------------------------------

def test_unknown_layer_of_a_zoo_model_names_the_field_and_lists_the_layers(client, enqueued):
    detail = refused(job(client, LENET, [TRAIN, {"op": "pcn", "layers": ["fc1", "fc9"],
                                                 "select": {"dims": 8}}]), "steps[1].layers")
    assert "'fc9' is not a layer of arch 'lenet300'" in detail
    assert "its layers: fc1, fc2, fc3" in detail
    # every field that names layers
    for step, field in (
            ({"op": "lowrank", "target": {"param_ratio": 0.5}, "layers": ["fc0"]}, "layers"),
            ({"op": "lowrank", "target": {"ranks": {"fcX": 4}}}, "target.ranks"),
            ({"op": "dctps", "layers": ["conv1"]}, "layers"),
            ({"op": "channel_prune", "target": {"param_ratio": 0.5}, "layers": ["x"]}, "layers"),
            ({"op": "analyze", "layers": ["fc4"]}, "layers"),
            ({"op": "pcn", "layers": ["fc1"], "per_layer": {"fc1": {"dims": 4}},
              "select": {"dims": 8}}, None)):
        r = job(client, LENET, [TRAIN, step])
        if field is None:
            assert r.status_code == 202, r.text
            accepted = r.json()["id"]
        else:
            assert "its layers: fc1, fc2, fc3" in refused(r, f"steps[1].{field}")
    r = job(client, LENET, [{"op": "train", "epochs": 1, "track": ["effective_dim"],
                             "track_layers": ["fc7"]}])
    refused(r, "steps[0].track_layers")
    assert enqueued == [(accepted, "cpu")]  # nothing refused was queued


def test_resnet_unit_groups_are_valid_where_groups_are_taken(client):
    resnet = {"arch": {"name": "resnet", "depth": 8, "width": 0.25}}
    prune = {"op": "channel_prune", "target": {"param_ratio": 0.5},
             "layers": ["stage2", "stage1.0.conv1"]}
    assert job(client, resnet, [prune]).status_code == 202
    detail = refused(job(client, resnet, [{"op": "pcn", "layers": ["stage2"],
                                           "select": {"dims": 4}}]), "steps[0].layers")
    assert "'stage2' is a unit group" in detail and "stage1.0.shortcut_conv" in detail
    analyze = {"op": "analyze", "kinds": ["unit_pruning"], "layers": ["stage3"]}
    assert job(client, resnet, [analyze]).status_code == 202
    refused(job(client, resnet, [{"op": "analyze", "kinds": ["spectrum"],
                                  "layers": ["stage3"]}]), "steps[0].layers")


def test_a_name_made_by_an_earlier_lowrank_step_is_accepted(client):
    lowrank = {"op": "lowrank", "target": {"param_ratio": 0.5}, "layers": ["fc1"]}
    later = {"op": "analyze", "kinds": ["spectrum"], "layers": ["fc1.blocks.0.0"]}
    assert job(client, LENET, [TRAIN, lowrank, later]).status_code == 202
    # not before the lowrank step, and never below a layer the model does not have
    refused(job(client, LENET, [TRAIN, later, lowrank]), "steps[1].layers")
    bad = {"op": "analyze", "kinds": ["spectrum"], "layers": ["fc9.blocks.0.0"]}
    refused(job(client, LENET, [TRAIN, lowrank, bad]), "steps[2].layers")


def test_unknown_layer_of_an_uploaded_model(client):
    model_id = upload_model(client, {"name": "mlp", "widths": [64, 32]})
    detail = refused(job(client, model_id, [{"op": "pcn", "layers": ["fc4"],
                                             "select": {"dims": 8}}]), "steps[0].layers")
    assert f"'fc4' is not a layer of model {model_id}" in detail
    assert "its layers: fc1, fc2, fc3" in detail and "GET /v1/models/{id}" in detail
    assert job(client, model_id, [{"op": "pcn", "layers": ["fc2"],
                                   "select": {"dims": 8}}]).status_code == 202


def test_a_layer_list_is_cut_after_twenty_names(client):
    arch = {"arch": {"name": "mlp", "widths": [8] * 30}}
    detail = refused(job(client, arch, [{"op": "pcn", "layers": ["nope"],
                                         "select": {"dims": 2}}]), "steps[0].layers")
    assert "fc1, fc2" in detail and "fc20 (and 11 more)" in detail and "fc21" not in detail


# ---- the dataset against the model ----------------------------------------------------------

def test_wrong_dataset_shape_is_refused_for_a_fresh_arch(client, enqueued):
    detail = refused(job(client, LENET, [TRAIN], dataset="synthetic-tiny"), "dataset")
    assert "1x8x8" in detail and "1x28x28" in detail and '"input_shape": [1, 8, 8]' in detail
    tiny = {"arch": {"name": "lenet300", "input_shape": [1, 8, 8]}}
    assert job(client, tiny, [TRAIN], dataset="synthetic-tiny").status_code == 202
    rgb = {"arch": {"name": "conv4", "input_shape": [3, 28, 28]}}
    refused(job(client, rgb, [TRAIN], dataset="fashion-mnist"), "dataset")
    assert len(enqueued) == 1


def test_a_stored_model_takes_data_the_worker_adapts_and_refuses_the_rest(client):
    model_id = upload_model(client, {"name": "conv4", "input_shape": [3, 16, 16]})
    # one channel replicated and resized: the worker adapts it (with a warning event)
    assert job(client, model_id, [TRAIN], dataset="fashion-mnist").status_code == 202
    two = upload_dataset(client, npz(x_train=np.zeros((6, 2, 16, 16), np.float32),
                                     y_train=np.arange(6) % 3)).json()["id"]
    detail = refused(job(client, model_id, [TRAIN], dataset=two), "dataset")
    assert "2x16x16" in detail and "3x16x16" in detail and "single channel" in detail
    flat = upload_dataset(client, npz(x_train=np.zeros((6, 768), np.float32),
                                      y_train=np.arange(6) % 3)).json()["id"]
    refused(job(client, model_id, [TRAIN], dataset=flat), "dataset")


def test_too_many_classes_are_refused_fewer_are_fine(client):
    small = {"arch": {"name": "lenet300", "num_classes": 5}}
    detail = refused(job(client, small, [TRAIN], dataset="fashion-mnist"), "dataset")
    assert "10 classes" in detail and "5 outputs" in detail and '"num_classes": 10' in detail
    big = {"arch": {"name": "lenet300", "num_classes": 12}}
    assert job(client, big, [TRAIN], dataset="fashion-mnist").status_code == 202
    twelve = upload_dataset(client, npz(x_train=np.zeros((12, 28, 28), np.uint8),
                                        y_train=np.arange(12))).json()["id"]
    refused(job(client, LENET, [TRAIN], dataset=twelve), "dataset")
    model_id = upload_model(client, {"name": "lenet300"})
    detail = refused(job(client, model_id, [TRAIN], dataset=twelve), "dataset")
    assert "at least 12 outputs" in detail


# ---- label gaps at dataset upload ---------------------------------------------------------

def test_labels_1_to_10_are_refused_unless_allowed(client):
    arrays = {"x_train": np.zeros((20, 28, 28), np.uint8), "y_train": np.arange(20) % 10 + 1}
    r = upload_dataset(client, npz(**arrays))
    assert r.status_code == 422 and r.json()["error"] == "InvalidDataset", r.text
    detail = r.json()["detail"]
    assert "1..10" in detail and "11 outputs" in detail and "subtract 1" in detail
    assert "allow_label_gaps=true" in detail
    assert client.get("/v1/datasets").json()["items"][-1]["builtin"]  # nothing stored
    r = upload_dataset(client, npz(**arrays), allow_label_gaps="true")
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["num_classes"] == 11 and doc["label_gaps"]["first_missing"] == [0]
    assert "subtract 1" in doc["warnings"][0]
    bad = upload_dataset(client, npz(**arrays), allow_label_gaps="maybe")
    assert bad.status_code == 422 and "true or false" in bad.json()["detail"]


def test_gaps_in_the_middle_are_refused_and_test_labels_count(client):
    x = np.zeros((8, 28, 28), np.uint8)
    r = upload_dataset(client, npz(x_train=x, y_train=np.array([0, 1, 3, 3, 0, 1, 5, 5])))
    assert r.status_code == 422 and "no sample has label 2, 4" in r.json()["detail"]
    # a class missing from the training split but present in the test split is no gap
    r = upload_dataset(client, npz(x_train=x, y_train=np.array([0, 1, 0, 1, 0, 1, 0, 1]),
                                   x_test=x[:2], y_test=np.array([2, 0])))
    assert r.status_code == 201 and "label_gaps" not in r.json(), r.text


# ---- upload errors through the real inspector ---------------------------------------------

@pytest.fixture
def real_client(settings, keys, enqueued):
    pytest.importorskip("torch")
    from fastapi.testclient import TestClient

    real = Settings(**settings.model_dump() | {"inspect_module": "worker.inspect",
                                               "max_upload_bytes": 8 * 1024 * 1024})
    with TestClient(create_app(real), headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        yield c


def test_ddp_prefix_upload_lists_missing_and_unexpected_keys_as_plain_text(real_client,
                                                                           tmp_path):
    import torch
    from safetensors.torch import save_file

    from core import models as zoo

    model = zoo.build({"name": "mlp", "widths": [16]})
    state = {f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "ddp.safetensors"
    save_file(state, str(path))
    r = real_client.post("/v1/models", files={"file": ("ddp.safetensors", path.read_bytes())},
                         data={"arch": '{"name": "mlp", "widths": [16]}'})
    assert r.status_code == 422 and r.json()["error"] == "InvalidCheckpoint", r.text
    detail = r.json()["detail"]
    assert "missing 4 key(s)" in detail and "'fc1.weight'" in detail
    assert "4 unexpected key(s)" in detail and "'module.fc1.weight'" in detail
    assert "Strip the prefix 'module.'" in detail
    assert "\x1b" not in detail
    # a .pt of the same keys says the same
    pt = tmp_path / "ddp.pt"
    torch.save(state, pt)
    r = real_client.post("/v1/models", files={"file": ("ddp.pt", pt.read_bytes())},
                         data={"arch": '{"name": "mlp", "widths": [16]}'})
    assert r.status_code == 422 and "Strip the prefix 'module.'" in r.json()["detail"]


class Thing:
    """A class torch's weights_only unpickler refuses."""


def test_a_pickled_object_is_refused_without_terminal_escapes(real_client, tmp_path):
    import torch

    path = tmp_path / "obj.pt"
    torch.save({"w": torch.zeros(2), "c": Thing()}, path)
    r = real_client.post("/v1/models", files={"file": ("obj.pt", path.read_bytes())},
                         data={"arch": '{"name": "lenet300"}'})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "\x1b" not in detail and "[1m" not in detail
    assert "Unsupported global" in detail and "Thing" in detail
    assert "weights_only=False" not in detail and "add_safe_globals" not in detail


def test_an_uploaded_model_with_a_report_is_checked_by_its_names(real_client, tmp_path):
    from core import models as zoo

    path = tmp_path / "m.safetensors"
    zoo.save(zoo.build({"name": "conv4", "input_shape": [1, 8, 8], "channels": [4, 4],
                        "fc": [8]}), path)
    r = real_client.post("/v1/models", files={"file": ("m.safetensors", path.read_bytes())})
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    detail = refused(job(real_client, model_id, [{"op": "lowrank", "layers": ["conv3"],
                                                  "target": {"param_ratio": 0.5}}],
                         dataset="synthetic-tiny"), "steps[0].layers")
    assert "its layers: conv1, conv2, fc1, fc2" in detail
    assert job(real_client, model_id, [{"op": "lowrank", "layers": ["conv2"],
                                        "target": {"param_ratio": 0.5}}],
               dataset="synthetic-tiny").status_code == 202


def test_an_imported_graphs_names_come_from_its_report(real_client, tmp_path):
    """A .pt2 upload: its model id and a fresh model of its arch are checked by the names of
    its report (the graph's modules), its input shape and classes by its arch."""
    import torch
    from torch import nn

    from tests.import_models import export_pt2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(64, 16)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x.flatten(1))))

    path = export_pt2(Net(), tmp_path / "net.pt2", torch.randn(2, 1, 8, 8))
    r = real_client.post("/v1/models", files={"file": ("net.pt2", path.read_bytes())})
    assert r.status_code == 201, r.text
    model_id, arch = r.json()["id"], r.json()["arch"]
    four = upload_dataset(real_client, npz(x_train=np.zeros((8, 1, 8, 8), np.float32),
                                           y_train=np.arange(8) % 4)).json()["id"]
    step = {"op": "pcn", "layers": ["fc1"], "select": {"dims": 4}}
    for model in (model_id, {"arch": arch}):
        detail = refused(job(real_client, model, [step], dataset=four), "steps[0].layers")
        assert "its layers: body, head" in detail
        good = {**step, "layers": ["body"]}
        assert job(real_client, model, [good], dataset=four).status_code == 202, model
    # synthetic-tiny has 10 classes, the model 4 outputs
    assert "4 outputs" in refused(job(real_client, {"arch": arch}, [{"op": "evaluate"}],
                                      dataset="synthetic-tiny"), "dataset")


def test_the_api_passes_any_inspectors_detail_on_as_plain_text(settings, keys, enqueued):
    from fastapi.testclient import TestClient

    ansi = Settings(**settings.model_dump() | {"inspect_module": "tests.api.ansi_inspect"})
    with TestClient(create_app(ansi), headers={"Authorization": f"Bearer {keys['a']}"}) as c:
        r = c.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                   data={"arch": '{"name": "lenet300"}'})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == ("Weights only load failed, do those steps only if you trust "
                                  "the source. red")
