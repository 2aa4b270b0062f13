"""worker.runner: a job runs to a terminal state as plain Python; repeated deliveries, cancels
and failures leave the database and the store consistent."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from core import models as zoo
from core.data import synthetic
from core.metrics import param_counts
from core.train import evaluate
from service.db import session_scope
from service.orm import Artifact, Dataset, Job, JobEvent, Model, utcnow
from service.states import request_cancel
from tests.worker.conftest import TINY_MLP, get_job, stored_files
from worker import finish, runner, steps
from worker.reporter import json_safe

PIPELINE = [
    {"op": "train", "epochs": 3, "batch_size": 32, "lr": 0.003, "track": ["effective_dim"]},
    {"op": "pcn", "layers": ["fc1", "fc2"], "select": {"dims": 8}, "samples": 200},
    {"op": "train", "epochs": 2, "batch_size": 32},
    {"op": "evaluate"},
]


def tiny_spec(steps_=PIPELINE, **extra):
    return {"model": {"arch": TINY_MLP}, "dataset": "synthetic-tiny", "steps": steps_,
            "seed": 1, **extra}


def count(settings, model) -> int:
    with session_scope(settings) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_pipeline_succeeds_with_design_result_shape(settings, store, submit, tmp_path):
    job_id = submit(tiny_spec())
    assert runner.run_job(job_id, settings) == "succeeded"

    job = get_job(settings, job_id)
    assert job.status == "succeeded" and job.progress == 1.0 and job.error_code is None
    assert job.started_at and job.finished_at and job.attempts == 1
    result = job.result
    assert set(result) >= {"model_id", "before", "after", "steps"}
    assert result["after"]["checkpoint_bytes"] > 0  # the stored model file's size
    for side in (result["before"], result["after"]):
        assert set(side) - {"checkpoint_bytes"} == {"params", "macs", "accuracy"}
        assert set(side["params"]) == {"total", "trainable", "nonzero"}
        assert side["macs"] > 0 and 0.0 <= side["accuracy"] <= 1.0
    assert [s["op"] for s in result["steps"]] == ["train", "pcn", "train", "evaluate"]
    for step in result["steps"]:
        assert {"op", "wall_s", "params", "macs", "accuracy"} <= set(step)
    train1, pcn = result["steps"][0], result["steps"][1]
    assert {"train_accuracy", "val_accuracy"} <= set(train1) and len(train1["history"]) == 3
    assert pcn["layers"]["fc1"] == {"in_dim": 64, "dims": 8,
                                    "explained_variance": pytest.approx(
                                        pcn["layers"]["fc1"]["explained_variance"])}
    assert pcn["transform_wall_s"] >= 0 and pcn["params"]["trainable"] < train1["params"][
        "trainable"]
    before, after = result["before"], result["after"]
    assert after["params"]["trainable"] < before["params"]["trainable"] / 2
    assert {k: v for k, v in after.items() if k != "checkpoint_bytes"} == \
        {k: result["steps"][-1][k] for k in ("params", "macs", "accuracy")}
    assert after["accuracy"] > 0.5  # synthetic-tiny is easy; a broken pipeline gives ~0.1

    with session_scope(settings) as session:
        out = session.get(Model, result["model_id"])
        assert out.source_job_id == job_id and out.format == "safetensors"
        assert out.params == after["params"] and out.name == f"mlp-{job_id[-8:]}"
        assert [e["op"] for e in out.arch["edits"]] == ["pcn_input", "pcn_input"]
        artifacts = {a.name: a for a in session.scalars(
            select(Artifact).where(Artifact.job_id == job_id))}
        kinds = {a.name: a.kind for a in artifacts.values()}
        epochs = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                        JobEvent.kind == "epoch")).all()
        tracked = session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == "effective_dim")).all()
        model_key = out.storage_key
    assert kinds == {"model.safetensors": "model", "report.json": "report",
                     "curves.json": "curves", "training.png": "plot", "effective_dim.png": "plot"}
    assert artifacts["model.safetensors"].storage_key == model_key
    assert len(epochs) == 5 and {"epoch", "loss", "val_accuracy"} <= set(epochs[0].data)
    assert [e.data["epoch"] for e in tracked] == [1, 2, 3]  # track: first train step only

    path = tmp_path / "out.safetensors"
    store.get_to_file(model_key, path)
    model = zoo.load(path)
    assert param_counts(model) == after["params"]
    _, test = synthetic("synthetic-tiny", 1)
    acc = evaluate(model, test, device=torch.device("cpu"))["accuracy"]
    assert acc == pytest.approx(after["accuracy"], abs=1e-6)

    import json
    report = json.loads(b"".join(store.open_stream(artifacts["report.json"].storage_key)))
    assert report["model_id"] == result["model_id"] and report["spec"]["seed"] == 1
    curves = json.loads(b"".join(store.open_stream(artifacts["curves.json"].storage_key)))
    assert len(curves["training"]) == 5
    # fc1 is tracked (auto: the widest layers of the input model) and then transformed
    assert [s["source"] for s in curves["spectra"]["fc1"]] == ["effective_dim"] * 3 + ["pcn"]
    assert set(curves["effective_dim"]) == {"fc1", "fc2"}
    assert len(curves["effective_dim"]["fc2"]) == 3


def test_redelivered_terminal_job_is_a_no_op(settings, store, submit):
    job_id = submit(tiny_spec([{"op": "evaluate"}]))
    assert runner.run_job(job_id, settings) == "succeeded"
    first = get_job(settings, job_id)
    files = stored_files(store)
    models = count(settings, Model)

    assert runner.run_job(job_id, settings) is None  # acks_late redelivery
    again = get_job(settings, job_id)
    assert (again.status, again.finished_at, again.result, again.attempts) == (
        first.status, first.finished_at, first.result, first.attempts)
    assert stored_files(store) == files and count(settings, Model) == models


def test_job_running_elsewhere_is_not_run_twice(settings, submit):
    job_id = submit(tiny_spec([{"op": "evaluate"}]))
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        job.status, job.attempts, job.heartbeat_at = "running", 1, utcnow()
    assert runner.run_job(job_id, settings) is None
    assert get_job(settings, job_id).attempts == 1

    # a stale heartbeat means its worker died: the redelivered job is taken over
    with session_scope(settings) as session:
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(hours=1)
    assert runner.run_job(job_id, settings) == "succeeded"
    assert get_job(settings, job_id).attempts == 2


def test_concurrent_claims_run_a_job_once(settings, submit):
    job_id = submit(tiny_spec([{"op": "evaluate"}]))
    claims = []
    barrier = threading.Barrier(4)

    def claim():
        barrier.wait()
        claims.append(runner.claim(job_id, settings))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims, key=str) == [1, None, None, None]


def test_cancel_mid_train(settings, store, submit):
    job_id = submit(tiny_spec([{"op": "train", "epochs": 200, "batch_size": 4}]))
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(runner.run_job(job_id, settings)))
    worker.start()
    deadline = time.monotonic() + 60
    while not get_job(settings, job_id).stage.startswith("train"):
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.05)
    with session_scope(settings) as session:
        request_cancel(session.get(Job, job_id))
    worker.join(timeout=60)
    assert outcome == ["canceled"]
    job = get_job(settings, job_id)
    assert job.status == "canceled" and job.finished_at is not None and job.result is None
    assert job.progress < 0.5
    assert count(settings, Model) == 0 and count(settings, Artifact) == 0
    assert stored_files(store) == []


def test_queued_job_with_cancel_requested_never_runs(settings, submit):
    job_id = submit(tiny_spec([{"op": "evaluate"}]))
    with session_scope(settings) as session:
        session.get(Job, job_id).cancel_requested = True
    assert runner.run_job(job_id, settings) is None
    assert get_job(settings, job_id).status == "canceled"


def test_bad_layer_fails_with_code_and_message(settings, store, submit):
    job_id = submit(tiny_spec([{"op": "pcn", "layers": ["nope"], "select": {"dims": 4}}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "SpecError"
    assert "nope" in job.error_message and "Traceback" not in job.error_message
    assert job.finished_at is not None and job.result is None
    assert stored_files(store) == []


def test_crashing_step_fails_as_internal_error(settings, store, submit, monkeypatch):
    def boom(ctx, step):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setitem(steps.HANDLERS, "evaluate", boom)
    job_id = submit(tiny_spec([{"op": "evaluate"}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "InternalError"
    assert "RuntimeError" in job.error_message and "passwd" not in job.error_message


def test_failure_while_storing_outputs_leaves_nothing_behind(settings, store, submit,
                                                             monkeypatch):
    def broken_add_artifact(session, store_, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(finish, "add_artifact", broken_add_artifact)
    job_id = submit(tiny_spec([{"op": "train", "epochs": 1}]))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.status == "failed" and job.error_code == "InternalError"
    # the model object was stored, then removed again when the transaction rolled back
    assert stored_files(store) == []
    assert count(settings, Model) == 0 and count(settings, Artifact) == 0


def test_cuda_on_a_cpu_worker_fails_clearly(settings, submit, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job_id = submit(tiny_spec([{"op": "evaluate"}], device="cuda"))
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "DeviceUnavailable" and "gpu queue" in job.error_message


def test_uploaded_dataset_and_model_chain(settings, store, submit, tenant_id, tmp_path):
    """A job on an uploaded .npz dataset, then a second job on the first job's output model."""
    rng = np.random.default_rng(0)
    train, test = synthetic("synthetic-tiny", 5)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=train.x.numpy()[:, 0], y_train=train.y.numpy(),
             x_test=test.x.numpy()[:, 0], y_test=test.y.numpy())
    del rng
    from service.datasets import register_dataset
    with session_scope(settings) as session:
        ds = register_dataset(session, store, tenant_id=tenant_id, name="tiny", fmt="npz",
                              meta={}, path=path)
        dataset_id = ds.id
    first = submit({"model": {"arch": TINY_MLP}, "dataset": dataset_id,
                    "steps": [{"op": "train", "epochs": 2, "batch_size": 32}]})
    assert runner.run_job(first, settings) == "succeeded"
    model_id = get_job(settings, first).result["model_id"]

    second = submit({"model": model_id, "dataset": dataset_id,
                     "steps": [{"op": "pcn", "select": {"threshold": 0.01}}, {"op": "evaluate"}]})
    assert runner.run_job(second, settings) == "succeeded", get_job(settings, second).error_message
    result = get_job(settings, second).result
    assert result["before"]["accuracy"] == pytest.approx(
        get_job(settings, first).result["after"]["accuracy"])
    # "auto": the widest layers; an MLP's first layer (64 input dims) is one of them
    assert result["steps"][0]["layers"].keys() == {"fc1", "fc2"}
    with session_scope(settings) as session:
        assert session.get(Model, result["model_id"]).name == f"mlp-{first[-8:]}-{second[-8:]}"
        assert session.get(Dataset, dataset_id) is not None


def test_dataset_that_does_not_fit_the_model_fails(settings, submit):
    job_id = submit({"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-tiny",
                     "steps": [{"op": "evaluate"}]})
    assert runner.run_job(job_id, settings) == "failed"
    job = get_job(settings, job_id)
    assert job.error_code == "DatasetError" and "input_shape" in job.error_message


def test_missing_fashion_mnist_fails_with_dataset_error(settings, submit, monkeypatch):
    from core.errors import DatasetError
    from worker import inputs

    def nowhere(settings_):
        raise DatasetError("Fashion-MNIST not found (searched …)")

    monkeypatch.setattr(inputs, "locate_fashion_mnist", nowhere)
    job_id = submit({"model": {"arch": {"name": "lenet300"}}, "dataset": "fashion-mnist",
                     "steps": [{"op": "evaluate"}]})
    assert runner.run_job(job_id, settings) == "failed"
    assert get_job(settings, job_id).error_code == "DatasetError"


def test_unknown_op_is_refused_by_the_registry():
    from core.errors import SpecError

    with pytest.raises(SpecError, match="frobnicate"):
        steps.handler_for("frobnicate")


def test_json_safe_drops_non_finite_floats():
    value = {"loss": float("nan"), "h": [1.0, float("inf"), {"x": -float("inf")}], "n": 3}
    assert json_safe(value) == {"loss": None, "h": [1.0, None, {"x": None}], "n": 3}
