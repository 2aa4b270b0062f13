"""channel_prune through the service (the embedded default: API + worker processes): jobs on
LeNet-300-100, a small Conv4 and a small ResNet-20 succeed, the narrower models download and
reload from their checkpoints alone, and a bad field is a 422 naming it."""
from __future__ import annotations

import pytest
import torch

from core import models as zoo
from core.data import synthetic
from core.metrics import count_macs, param_counts
from core.train import evaluate
from tests.stack.flows import run_job_ok

pytestmark = pytest.mark.service

CASES = [
    ({"name": "lenet300"}, "synthetic-blobs", {"criterion": "l1", "target": {"mac_ratio": 0.5}}),
    ({"name": "conv4", "input_shape": [1, 8, 8], "channels": [16, 16, 32, 32], "fc": [32, 32]},
     "synthetic-tiny", {"criterion": "taylor", "target": {"mac_ratio": 0.5}, "round_to": 8,
                        "samples": 64}),
    ({"name": "resnet", "depth": 20, "width": 0.5, "input_shape": [1, 8, 8]}, "synthetic-tiny",
     {"criterion": "l1", "target": {"param_ratio": 0.5}}),
]


@pytest.mark.parametrize(("arch", "dataset", "prune"), CASES,
                         ids=["lenet300", "conv4", "resnet20"])
def test_channel_prune_job_and_its_checkpoint(embedded_stack, tmp_path, arch, dataset, prune):
    steps = [{"op": "train", "epochs": 1, "batch_size": 64},
             {"op": "channel_prune", **prune},
             {"op": "evaluate"}]
    with embedded_stack.client() as client:
        job = run_job_ok(client, {"model": {"arch": arch}, "dataset": dataset, "steps": steps,
                                  "seed": 2})
        blob = client.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors")
        assert blob.status_code == 200
        curves = client.get(f"/v1/jobs/{job['id']}/curves").json()
    result = job["result"]
    step = result["steps"][1]
    (kind, ratio), = prune["target"].items()
    assert ratio - 0.05 <= step["ratio"] <= ratio
    assert [r["ratio"] for r in curves["channel_pruning"]] == [step["ratio"]]
    path = tmp_path / "pruned.safetensors"
    path.write_bytes(blob.content)
    model = zoo.load(path)  # the narrower structure comes from the arch's edit alone
    assert model.slimline_arch["edits"][-1]["op"] == "channel_prune"
    assert param_counts(model) == result["after"]["params"]
    assert count_macs(model, zoo.input_shape(arch)) == result["after"]["macs"]
    if arch["name"] == "resnet":
        for s in (1, 2, 3):
            assert {b.conv2.out_channels for b in getattr(model, f"stage{s}")} == \
                {step["groups"][f"stage{s}"]["kept"]}
    _, test = synthetic(dataset, 2)
    assert evaluate(model, test, device=torch.device("cpu"))["accuracy"] == \
        pytest.approx(result["after"]["accuracy"], abs=1e-9)


def test_a_bad_channel_prune_field_is_422(embedded_stack):
    spec = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
            "steps": [{"op": "channel_prune", "target": {"mac_ratio": 0.5}, "round_to": 4}]}
    with embedded_stack.client() as client:
        r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert "steps[0].round_to" in r.json()["detail"], r.text
