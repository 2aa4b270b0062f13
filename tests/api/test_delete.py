"""DELETE /v1/models/{id}, /v1/datasets/{id} and /v1/jobs/{id}: tenant-scoped, 409 while a
queued or running job uses the thing, and every stored object the rows owned gone from the
store afterwards (service.deletion)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from sqlalchemy import func, select

from service.artifacts import add_artifact
from service.auth import resolve_key
from service.db import session_scope
from service.model_files import export_key
from service.model_registry import graph_key, register_model
from service.orm import Artifact, Job, JobEvent, Model
from service.store import LocalStore
from tests.api.conftest import safetensors_bytes, stored_objects
from tests.api.test_datasets import good_arrays, npz_bytes

JOB = {"dataset": "fashion-mnist", "steps": [{"op": "train", "epochs": 1}, {"op": "evaluate"}]}


def store_of(settings) -> LocalStore:
    return LocalStore(settings.home / "objects")


def keys(settings) -> set[str]:
    root = settings.home / "objects"
    return {str(p.relative_to(root)) for p in stored_objects(settings)}


def upload_model(client, name: str = "m") -> dict:
    r = client.post("/v1/models", files={"file": (f"{name}.safetensors", safetensors_bytes())},
                    data={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def upload_dataset(client) -> dict:
    r = client.post("/v1/datasets", files={"file": ("d.npz", io.BytesIO(npz_bytes(
        **good_arrays())))}, data={"name": "toy"})
    assert r.status_code == 201, r.text
    return r.json()


def submit(client, **spec) -> dict:
    r = client.post("/v1/jobs", json=JOB | spec)
    assert r.status_code == 202, r.text
    return r.json()


def set_status(settings, job_id: str, status: str, result: dict | None = None) -> None:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        job.status = status
        if result is not None:
            job.result = result


def finish_with_outputs(settings, tmp_path: Path, job_id: str) -> tuple[str, list[str]]:
    """Mark the job succeeded as the worker would: a new model it produced, its artifacts
    (report, plot, an export) and the model artifact that is the model's own object. Returns
    (the model's id, the artifacts' own keys)."""
    store = store_of(settings)
    files = {"report.json": b"{}", "training.png": b"\x89PNG", "model.onnx": b"onnx"}
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        checkpoint = tmp_path / f"{job_id}.safetensors"
        checkpoint.write_bytes(safetensors_bytes(b"\1" * 64))
        model = register_model(session, store, tenant_id=job.tenant_id, name="out",
                               arch={"name": "lenet300"}, fmt="safetensors",
                               params={"total": 1}, path=checkpoint, source_job_id=job_id)
        own = []
        for name, data in files.items():
            path = tmp_path / name
            path.write_bytes(data)
            own.append(add_artifact(session, store, tenant_id=job.tenant_id, job_id=job_id,
                                    name=name, path=path).storage_key)
        session.add(Artifact(job_id=job_id, name="model.safetensors", kind="model",
                             size_bytes=model.size_bytes, sha256=model.sha256,
                             storage_key=model.storage_key))
        job.status, job.result = "succeeded", {"model_id": model.id, "steps": []}
        return model.id, own


# ---- models ---------------------------------------------------------------------------------

def test_delete_model_removes_its_file_and_exports_and_marks_jobs(client, bob, settings,
                                                                  tmp_path):
    model = upload_model(client)
    job = submit(client, model=model["id"])
    out_id, _ = finish_with_outputs(settings, tmp_path, job["id"])
    with session_scope(settings) as session:
        row = session.get(Model, out_id)
        key, tenant = row.storage_key, row.tenant_id
    exported = export_key(tenant, out_id, "onnx")  # an on-demand export kept in the store
    (settings.home / "objects" / exported).write_bytes(b"onnx")
    assert {key, exported} <= keys(settings)

    assert bob.delete(f"/v1/models/{out_id}").status_code == 404  # another tenant's
    assert client.get(f"/v1/models/{out_id}").status_code == 200
    r = client.delete(f"/v1/models/{out_id}")
    assert r.status_code == 204 and r.content == b""
    assert client.get(f"/v1/models/{out_id}").status_code == 404
    assert client.delete(f"/v1/models/{out_id}").status_code == 404
    assert not {key, exported} & keys(settings)
    # the job stays; its reference is nulled and says what it was
    after = client.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "succeeded"
    assert after["result"]["model_id"] is None
    assert after["result"]["deleted_model_id"] == out_id
    names = [a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]]
    assert "model.safetensors" not in names and "report.json" in names
    # the input model is untouched
    assert client.get(f"/v1/models/{model['id']}").status_code == 200


def test_a_model_used_by_a_queued_or_running_job_is_409_naming_it(client, settings):
    model = upload_model(client)
    other = upload_model(client, "other")
    job = submit(client, model=model["id"])
    angles = submit(client, model={"arch": {"name": "lenet300"}}, steps=[
        {"op": "analyze", "kinds": ["angles"], "other_model": other["id"], "k": 4}])
    for status in ("queued", "running"):
        set_status(settings, job["id"], status)
        r = client.delete(f"/v1/models/{model['id']}")
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "InUse" and job["id"] in r.json()["detail"]
        assert "cancel" in r.json()["detail"]
    r = client.delete(f"/v1/models/{other['id']}")  # read by an analyze step
    assert r.status_code == 409 and angles["id"] in r.json()["detail"]
    assert client.get(f"/v1/models/{model['id']}").status_code == 200
    assert len([k for k in keys(settings) if k.startswith("models/")]) == 2

    set_status(settings, job["id"], "running")
    client.post(f"/v1/jobs/{job['id']}/cancel")  # running: cooperative, still running
    assert client.delete(f"/v1/models/{model['id']}").status_code == 409
    set_status(settings, job["id"], "canceled")
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    # a finished job that read it keeps its spec; a new job cannot name it
    assert client.get(f"/v1/jobs/{job['id']}").json()["spec"]["model"] == model["id"]
    assert client.post("/v1/jobs", json=JOB | {"model": model["id"]}).status_code == 404


def test_a_graph_object_goes_with_the_last_model_built_on_it(client, settings, tmp_path):
    ir = tmp_path / "graph.json"
    ir.write_text(json.dumps({"nodes": []}))
    sha = hashlib.sha256(ir.read_bytes()).hexdigest()
    ids = []
    with session_scope(settings) as session:
        tenant = resolve_key(session, client.headers["authorization"].split()[1])
        for name in ("a", "b"):
            ckpt = tmp_path / f"{name}.safetensors"
            ckpt.write_bytes(safetensors_bytes())
            ids.append(register_model(
                session, store_of(settings), tenant_id=tenant, name=name,
                arch={"name": "graph", "graph": sha, "input_shape": [1, 28, 28],
                      "num_classes": 10}, fmt="onnx", params={"total": 1}, path=ckpt,
                graph=(sha, ir)).id)
    graph = graph_key(tenant, sha)
    assert graph in keys(settings)
    assert client.delete(f"/v1/models/{ids[0]}").status_code == 204
    assert graph in keys(settings)  # model b is still built on it
    # a queued job building a fresh model of the graph needs it: the last model is in use
    arch = {"name": "graph", "graph": sha, "input_shape": [1, 28, 28], "num_classes": 10}
    job = submit(client, model={"arch": arch}, steps=[{"op": "evaluate"}])
    r = client.delete(f"/v1/models/{ids[1]}")
    assert r.status_code == 409 and job["id"] in r.json()["detail"]
    set_status(settings, job["id"], "failed")
    assert client.delete(f"/v1/models/{ids[1]}").status_code == 204
    assert graph not in keys(settings)
    assert not [k for k in keys(settings) if k.startswith("models/")]


# ---- datasets -------------------------------------------------------------------------------

def test_delete_dataset_removes_its_file(client, bob, settings):
    dataset = upload_dataset(client)
    assert [k for k in keys(settings) if k.startswith("datasets/")]
    assert bob.delete(f"/v1/datasets/{dataset['id']}").status_code == 404
    job = submit(client, model={"arch": {"name": "mlp", "input_shape": [1, 4, 4],
                                         "widths": [8], "num_classes": 4}},
                 dataset=dataset["id"])
    r = client.delete(f"/v1/datasets/{dataset['id']}")
    assert r.status_code == 409 and r.json()["error"] == "InUse"
    assert job["id"] in r.json()["detail"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # queued: at once
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert not [k for k in keys(settings) if k.startswith("datasets/")]
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert dataset["id"] not in [d["id"] for d in client.get("/v1/datasets").json()["items"]]


def test_a_builtin_dataset_cannot_be_deleted(client):
    for name in ("fashion-mnist", "synthetic-tiny", "synthetic-blobs"):
        r = client.delete(f"/v1/datasets/{name}")
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "BuiltinDataset" and "built in" in r.json()["detail"]
    assert client.delete("/v1/datasets/synthetic-nope").status_code == 404


# ---- jobs -----------------------------------------------------------------------------------

def test_delete_job_removes_its_rows_and_objects_and_keeps_its_model(client, bob, settings,
                                                                     tmp_path):
    model = upload_model(client)
    job = submit(client, model=model["id"])
    for status in ("queued", "running"):
        set_status(settings, job["id"], status)
        r = client.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 409 and r.json()["error"] == "JobNotFinished"
        assert "cancel it first" in r.json()["detail"]
    out_id, own = finish_with_outputs(settings, tmp_path, job["id"])
    with session_scope(settings) as session:
        out_key = session.get(Model, out_id).storage_key
    assert set(own) | {out_key} <= keys(settings)
    assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404

    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not set(own) & keys(settings)
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(JobEvent)
                              .where(JobEvent.job_id == job["id"])) == 0
        assert session.scalar(select(func.count()).select_from(Artifact)
                              .where(Artifact.job_id == job["id"])) == 0
        kept = session.get(Model, out_id)
        assert kept is not None and kept.source_job_id is None
    # the model it produced is the user's: still there and downloadable
    assert out_key in keys(settings)
    blob = client.get(f"/v1/models/{out_id}/file")
    assert blob.status_code == 200 and blob.content == safetensors_bytes(b"\1" * 64)
    assert client.get(f"/v1/models/{model['id']}").status_code == 200


def test_delete_search_removes_its_trials_and_their_models_but_the_chosen_one(
        client, settings, tmp_path):
    parent = submit(client, model={"arch": {"name": "lenet300"}})
    trials = []
    with session_scope(settings) as session:
        search = session.get(Job, parent["id"])
        search.kind = "auto"
        for kind in ("screen", "finetune", "final"):
            child = Job(tenant_id=search.tenant_id, status="succeeded", spec=search.spec,
                        queue="cpu", parent_id=search.id, kind=kind)
            session.add(child)
            session.flush()
            trials.append(child.id)
    models = {trial: finish_with_outputs(settings, tmp_path, trial) for trial in trials[1:]}
    finetuned, chosen = models[trials[1]][0], models[trials[2]][0]
    set_status(settings, parent["id"], "running")
    r = client.delete(f"/v1/jobs/{trials[0]}")
    assert r.status_code == 409 and r.json()["error"] == "JobIsTrial"
    r = client.delete(f"/v1/models/{finetuned}")  # its search still runs
    assert r.status_code == 409 and parent["id"] in r.json()["detail"]
    set_status(settings, trials[0], "running")
    set_status(settings, parent["id"], "canceled")
    r = client.delete(f"/v1/jobs/{parent['id']}")
    assert r.status_code == 409 and trials[0] in r.json()["detail"]  # a trial still runs
    set_status(settings, trials[0], "succeeded")
    set_status(settings, parent["id"], "succeeded", {"model_id": chosen})
    with session_scope(settings) as session:
        finetuned_key = session.get(Model, finetuned).storage_key
        chosen_key = session.get(Model, chosen).storage_key
    assert client.delete(f"/v1/jobs/{parent['id']}").status_code == 204
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Job)
                              .where(Job.id.in_([parent["id"], *trials]))) == 0
        assert session.get(Model, finetuned) is None
        assert session.get(Model, chosen).source_job_id is None
    left = keys(settings)
    assert finetuned_key not in left and chosen_key in left
    assert not [k for k in left if k.startswith("jobs/")]


def test_a_failed_job_that_still_points_at_a_checkpoint_loses_its_objects(client, settings):
    from service.deletion import CHECKPOINT_OBJECTS
    from worker.checkpoint import OBJECTS

    assert CHECKPOINT_OBJECTS == OBJECTS  # the worker's names, known torch-free
    job = submit(client, model={"arch": {"name": "lenet300"}})
    with session_scope(settings) as session:
        row = session.get(Job, job["id"])
        prefix = f"checkpoints/{row.tenant_id}/{row.id}/000002"
        row.status, row.checkpoint = "failed", {"seq": 2, "prefix": prefix}
    for name in OBJECTS:
        store_of(settings).put_stream(f"{prefix}/{name}", io.BytesIO(b"x"))
    assert len([k for k in keys(settings) if k.startswith("checkpoints/")]) == 3
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not [k for k in keys(settings) if k.startswith("checkpoints/")]


def test_a_running_job_with_a_cancel_requested_says_to_wait(client, settings):
    job = submit(client, model={"arch": {"name": "lenet300"}})
    set_status(settings, job["id"], "running")
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409 and "once it is canceled" in r.json()["detail"]
    set_status(settings, job["id"], "canceled")
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204


def test_an_object_that_cannot_be_deleted_leaves_no_row_behind(client, app, settings,
                                                               monkeypatch, caplog):
    model = upload_model(client)
    with session_scope(settings) as session:
        key = session.get(Model, model["id"]).storage_key

    def broken(_key: str) -> None:
        raise OSError("the store is read-only")

    monkeypatch.setattr(app.state.store, "delete", broken)
    r = client.delete(f"/v1/models/{model['id']}")
    # the rows are committed first: the answer is 204 and nothing names the leftover object
    assert r.status_code == 204
    assert client.get(f"/v1/models/{model['id']}").status_code == 404
    assert key in keys(settings)
    assert f"could not delete object {key}" in caplog.text
