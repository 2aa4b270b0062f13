from __future__ import annotations

import json

import pytest

from service import queue
from service.errors import BrokerUnavailable
from tests.api.conftest import safetensors_bytes

SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-blobs",
        "steps": [{"op": "train", "epochs": 1}, {"op": "evaluate"}]}


def test_create_job_commits_then_enqueues(client, enqueued):
    r = client.post("/v1/jobs", json=SPEC)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert set(job) == {"id", "status", "progress", "stage", "eta_s", "spec", "error", "result",
                        "created_at", "started_at", "finished_at", "attempts", "kind",
                        "parent_id"}
    assert job["eta_s"] is None  # queued: nothing to estimate from
    assert job["kind"] == "job" and job["parent_id"] is None
    assert job["status"] == "queued" and job["error"] is None and job["progress"] == 0.0
    assert job["spec"]["steps"][0]["optimizer"] == "adam"  # defaults are filled in
    assert enqueued == [(job["id"], "cpu")]
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_a_pruning_job_is_accepted_with_defaults_filled_in(client, enqueued):
    r = client.post("/v1/jobs", json=SPEC | {"steps": [
        {"op": "snip", "sparsity": 0.95}, {"op": "train", "epochs": 1}]})
    assert r.status_code == 202, r.text
    step = r.json()["spec"]["steps"][0]
    assert step == {"op": "snip", "sparsity": 0.95, "scope": "global", "labels": "true",
                    "batches": 1, "batch_size": 100, "rounds": 100, "allow_collapse": False}


def test_dctps_and_analyze_jobs_are_accepted_with_defaults_filled_in(client, bob, enqueued):
    r = client.post("/v1/jobs", json=SPEC | {"steps": [
        {"op": "analyze"}, {"op": "dctps"}, {"op": "train", "weight_decay": 5e-4},
        {"op": "evaluate"}]})
    assert r.status_code == 202, r.text
    analyze, dctps = r.json()["spec"]["steps"][:2]
    assert dctps == {"op": "dctps", "density": 0.01, "allocation": "epl", "alpha": "trainable",
                     "layers": "all"}
    assert analyze == {"op": "analyze", "kinds": ["unit_pruning", "spectrum", "elbow"],
                       "layers": "auto", "k": 10, "seeds": 5, "init": "auto"}
    other = client.post("/v1/models", files={"file": ("o.safetensors", safetensors_bytes())},
                        data={"name": "other"}).json()
    angles = {"op": "analyze", "kinds": ["angles"], "other_model": other["id"], "k": 4}
    r = client.post("/v1/jobs", json=SPEC | {"steps": [angles]})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["steps"][0]["other_model"] == other["id"]
    # another tenant's model, or none at all: 404 naming the field
    for bad in (other["id"], "01nosuchmodel"):
        r = (bob if bad == other["id"] else client).post(
            "/v1/jobs", json=SPEC | {"steps": [angles | {"other_model": bad}]})
        assert r.status_code == 404 and "other_model" in r.json()["detail"], r.text
    assert len(enqueued) == 2


def test_dense_ops_on_a_dctps_model_are_422_at_submission(client, enqueued):
    arch = {"name": "lenet300", "edits": [{"op": "dctps", "allocation": "epl", "density": 0.01,
                                           "layers": {"fc1": {"nnz": 100}}}]}
    model = client.post("/v1/models", files={"file": ("d.safetensors", safetensors_bytes())},
                        data={"name": "d", "arch": json.dumps(arch)}).json()
    r = client.post("/v1/jobs", json=SPEC | {"model": model["id"], "steps": [
        {"op": "train"}, {"op": "pcn", "select": {"dims": 8}}]})
    assert r.status_code == 422 and r.json()["error"] == "InvalidSpec", r.text
    assert "steps[1]: op 'pcn' cannot run after the DCTpS transform" in r.json()["detail"]
    r = client.post("/v1/jobs", json=SPEC | {"model": model["id"], "steps": [
        {"op": "train"}, {"op": "analyze", "kinds": ["spectrum"]}, {"op": "evaluate"}]})
    assert r.status_code == 202, r.text
    assert len(enqueued) == 1


def test_cuda_jobs_go_to_the_gpu_queue(client, enqueued):
    client.post("/v1/jobs", json=SPEC | {"device": "cuda"})
    assert enqueued[-1][1] == "gpu"


@pytest.mark.parametrize(("patch", "needle"), [
    ({"steps": [{"op": "train", "epochs": 51}]}, "steps[0].epochs"),
    ({"steps": [{"op": "train", "epochs": 1, "lr": -1}]}, "steps[0].lr"),
    ({"steps": [{"op": "train", "epochs": 1, "momentum": 1}]}, "momentum"),
    ({"steps": [{"op": "frobnicate"}]}, "frobnicate"),
    ({"steps": [{"op": "export", "formats": []}]}, "steps[0].formats"),
    ({"steps": [{"op": "evaluate", "bogus": 1}]}, "steps[0].bogus"),
    ({"surprise": 1}, "surprise"),
    ({"steps": []}, "steps"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu"}, "device"),
    ({"steps": [{"op": "pcn", "select": {"target": {"trainable_params": 0}}}]},
     "steps[0].select.target.trainable_params"),
    ({"steps": [{"op": "pcn", "select": {"dims": 3}, "when": "plateau"}]},
     "put a train step before it"),
    ({"steps": [{"op": "train", "track_layers": ["fc1"]}]}, "only used with track"),
    ({"steps": [{"op": "pcn", "select": {"dims": 3, "threshold": 0.1}}]}, "exactly one"),
    ({"steps": [{"op": "snip", "sparsity": 1}]}, "steps[0].sparsity"),
    ({"steps": [{"op": "snip"}]}, "steps[0].sparsity"),
    ({"steps": [{"op": "random", "sparsity": 0.9, "labels": "uniform"}]}, "only used by op"),
    ({"steps": [{"op": "lowrank", "target": {}}]}, "exactly one of param_ratio, mac_ratio, ranks"),
    ({"steps": [{"op": "lowrank", "target": {"param_ratio": 1.5}}]},
     "steps[0].target.param_ratio"),
    ({"steps": [{"op": "lowrank", "target": {"param_ratio": 0.1}, "blocking": "diag"}]},
     "steps[0].blocking"),
    ({"steps": [{"op": "dctps", "density": 0}]}, ("steps[0].density: density must be a number "
                                                 "in (0, 1]")),
    ({"steps": [{"op": "dctps", "density": 2}]}, "e.g. 0.01 for 1%"),
    ({"steps": [{"op": "dctps", "allocation": "equal"}]},
     "steps[0].allocation: Input should be 'epl', 'epf', 'uniform' or 'erk'"),
    ({"steps": [{"op": "dctps", "alpha": "yes"}]}, "steps[0].alpha"),
    ({"steps": [{"op": "dctps", "sparsity": 0.9}]}, "steps[0].sparsity: unknown field"),
    ({"steps": [{"op": "dctps"}, {"op": "train"}, {"op": "snip", "sparsity": 0.5}]},
     "steps[2]: op 'snip' cannot run after the dctps step steps[0]"),
    ({"steps": [{"op": "dctps"}, {"op": "lowrank", "target": {"param_ratio": 0.5}}]},
     "run 'lowrank' before dctps"),
    ({"steps": [{"op": "analyze", "kinds": ["angles"]}]}, "give other_model"),
    ({"steps": [{"op": "analyze", "density": 0.1}]}, "steps[0].density: unknown field"),
    ({"steps": [{"op": "analyze", "kinds": ["spectrum"], "seeds": 2}]},
     "seeds: only used with kinds containing \"unit_pruning\""),
    ({"steps": [{"op": "analyze", "kinds": ["entropy"]}]}, "steps[0].kinds[0]"),
])
def test_invalid_specs_are_422_naming_the_field(client, enqueued, patch, needle):
    r = client.post("/v1/jobs", json=SPEC | patch)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "ValidationError" and needle in body["detail"], body
    assert enqueued == [] and client.get("/v1/jobs").json()["items"] == []


def test_not_json_is_422(client):
    r = client.post("/v1/jobs", content=b"nope", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "ValidationError"


def test_unknown_model_and_dataset_are_404(client):
    r = client.post("/v1/jobs", json=SPEC | {"model": "01nosuchmodel"})
    assert r.status_code == 404 and "01nosuchmodel" in r.json()["detail"]
    r = client.post("/v1/jobs", json=SPEC | {"dataset": "no-such-dataset"})
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    r = client.post("/v1/jobs", json=SPEC | {"dataset": "synthetic-nope"})
    assert r.status_code == 404


def test_job_on_an_uploaded_model(client, enqueued):
    model = client.post("/v1/models", files={"file": ("m.safetensors", safetensors_bytes())},
                        data={"name": "m"}).json()
    r = client.post("/v1/jobs", json=SPEC | {"model": model["id"]})
    assert r.status_code == 202 and r.json()["spec"]["model"] == model["id"]


def test_idempotency_key(client, enqueued):
    headers = {"Idempotency-Key": "k1"}
    first = client.post("/v1/jobs", json=SPEC, headers=headers)
    again = client.post("/v1/jobs", json=SPEC, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and len(enqueued) == 1
    other = client.post("/v1/jobs", json=SPEC | {"seed": 9}, headers=headers)
    assert other.status_code == 409 and other.json()["error"] == "IdempotencyConflict"


def test_broker_down_keeps_the_job_queued_with_202(client, monkeypatch):
    """The committed row is the truth: the reconciler sends the job once the broker is back."""
    def down(job_id, q, settings=None):
        raise BrokerUnavailable("could not reach the broker: connection refused")

    monkeypatch.setattr(queue, "enqueue_job", down)
    r = client.post("/v1/jobs", json=SPEC)
    assert r.status_code == 202, r.text
    [job] = client.get("/v1/jobs").json()["items"]
    assert job["id"] == r.json()["id"] and job["status"] == "queued" and job["error"] is None


def test_list_pagination_and_status_filter(client):
    ids = [client.post("/v1/jobs", json=SPEC | {"seed": i}).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2} | ({"cursor": cursor} if cursor
                                                               else {})).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    client.post(f"/v1/jobs/{ids[1]}/cancel")
    canceled = client.get("/v1/jobs", params={"status": "canceled"}).json()["items"]
    assert [j["id"] for j in canceled] == [ids[1]]
    assert client.get("/v1/jobs", params={"status": "weird"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 101}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "garbage!"}).status_code == 422


def test_cancel_queued_then_409(client):
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert r.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"] == "JobNotCancelable"


def test_cancel_running_sets_flag(client, settings):
    from service.db import session_scope
    from service.orm import Job
    from service.states import mark_running

    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    with session_scope(settings) as s:
        mark_running(s.get(Job, job_id))
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "running"
    with session_scope(settings) as s:
        assert s.get(Job, job_id).cancel_requested


def test_events_json_sse_and_curves(client, settings):
    from service.db import session_scope
    from service.events import record_event, set_progress
    from service.orm import Job
    from service.states import mark_running, mark_succeeded

    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    with session_scope(settings) as s:
        mark_running(s.get(Job, job_id))
        record_event(s, job_id, "epoch", {"step": 0, "epoch": 1, "loss": 0.5, "accuracy": 0.8,
                                          "val_loss": 0.6, "val_accuracy": 0.7})
        set_progress(s, job_id, 0.5, "train 1/1")
    with session_scope(settings) as s:
        mark_succeeded(s.get(Job, job_id), {"model_id": None})
    items = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}).json()["items"]
    assert [(e["kind"], e["data"].get("status")) for e in items] == [
        ("status", "queued"), ("status", "running"), ("epoch", None), ("progress", None),
        ("status", "succeeded")]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert "event: epoch" in text and text.rstrip().endswith('{"status": "succeeded"}')
    last = items[2]["id"]  # the epoch
    with client.stream("GET", f"/v1/jobs/{job_id}/events",
                       headers={"Last-Event-ID": str(last)}) as r:
        text = "".join(r.iter_text())
    assert "event: epoch" not in text and "event: progress" in text
    curves = client.get(f"/v1/jobs/{job_id}/curves").json()
    assert curves["training"] == [{"step": 0, "epoch": 1, "global_epoch": None, "loss": 0.5,
                                   "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7,
                                   "lr": None, "wall_s": None}]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0


def test_artifacts_list_and_download(client, settings, tmp_path):
    from service.artifacts import add_artifact
    from service.db import session_scope
    from service.orm import Job
    from service.store import store_from_settings

    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}')
    with session_scope(settings) as s:
        tenant = s.get(Job, job_id).tenant_id
        add_artifact(s, store_from_settings(settings), tenant_id=tenant, job_id=job_id,
                     name="report.json", path=report)
    [item] = client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert item["name"] == "report.json" and item["kind"] == "report" and item["size_bytes"] == 12
    assert item["url"] == f"/v1/jobs/{job_id}/artifacts/report.json"
    r = client.get(item["url"])
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert client.get(f"/v1/jobs/{job_id}/artifacts/nope.png").status_code == 404


def test_curves_per_layer_from_tracking_and_transform_events(client, settings):
    from service.db import session_scope
    from service.events import record_event

    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    with session_scope(settings) as s:
        for epoch in (1, 2):
            record_event(s, job_id, "effective_dim", {
                "step": 0, "epoch": epoch, "global_epoch": epoch, "accuracy": 0.5 + epoch / 10,
                "val_accuracy": 0.4 + epoch / 10, "samples": 100, "thresholds": [0.1],
                "layers": {"fc2": {"in_dim": 300, "effective_dim": {"0.1": 40 + epoch},
                                   "eigvals": [3.0, 1.0]}}, "skipped": []})
        record_event(s, job_id, "spectrum", {"step": 1, "layer": "fc2", "global_epoch": 2,
                                             "source": "pcn", "in_dim": 300, "dims": 42,
                                             "samples": 5000, "eigvals": [3.0, 1.0]})
        record_event(s, job_id, "pcn", {"step": 1, "global_epoch": 2, "when": "now",
                                        "fired_at_epoch": None, "layers": {"fc2": 42},
                                        "output": {}})
    curves = client.get(f"/v1/jobs/{job_id}/curves").json()
    assert set(curves) == {"training", "effective_dim", "spectra", "transforms", "pruning",
                           "lowrank", "dctps", "analysis", "channel_pruning", "auto"}
    assert curves["effective_dim"] == {"fc2": [
        {"step": 0, "epoch": e, "global_epoch": e, "in_dim": 300,
         "effective_dim": {"0.1": 40 + e}, "accuracy": 0.5 + e / 10,
         "val_accuracy": 0.4 + e / 10} for e in (1, 2)]}
    assert [(s["source"], s["epoch"]) for s in curves["spectra"]["fc2"]] == [
        ("effective_dim", 1), ("effective_dim", 2), ("pcn", None)]
    assert curves["spectra"]["fc2"][2]["dims"] == 42
    assert curves["transforms"] == [{"step": 1, "global_epoch": 2, "when": "now",
                                     "fired_at_epoch": None, "layers": {"fc2": 42},
                                     "output": {}}]


def test_curves_of_dctps_and_analysis_events(client, settings):
    from service.db import session_scope
    from service.events import record_event

    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    dctps = {"step": 0, "global_epoch": 0, "density": 0.01, "allocation": "epl",
             "alpha": "trainable", "total_weights": 1000, "total_nnz": 10,
             "layers": {"fc1": {"shape": [10, 100], "weights": 1000, "nnz": 10,
                                "density": 0.01}}}
    with session_scope(settings) as s:
        record_event(s, job_id, "dctps", dctps)
        for step in (1, 3):
            record_event(s, job_id, "analysis", {
                "step": step, "global_epoch": step, "kind": "elbow",
                "layers": {"fc1": {"knee": 3 + step, "residual": [1.0, 0.5, 0.0]},
                           "fc2": {"knee": 1, "residual": [1.0, 0.0]}}})
        record_event(s, job_id, "analysis", {"step": 3, "global_epoch": 3, "kind": "angles",
                                             "layers": {"fc1": {"k": 2, "angles": [1.0, 2.0]}}})
    curves = client.get(f"/v1/jobs/{job_id}/curves").json()
    assert curves["dctps"] == [dctps]
    assert curves["analysis"] == {
        "elbow": {"fc1": [{"step": s, "global_epoch": s, "knee": 3 + s,
                           "residual": [1.0, 0.5, 0.0]} for s in (1, 3)],
                  "fc2": [{"step": s, "global_epoch": s, "knee": 1, "residual": [1.0, 0.0]}
                          for s in (1, 3)]},
        "angles": {"fc1": [{"step": 3, "global_epoch": 3, "k": 2, "angles": [1.0, 2.0]}]}}
