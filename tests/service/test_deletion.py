"""service.deletion under races, on SQLite and PostgreSQL: a job submitted while its model or
dataset is being deleted ends either as a 404 for the submission or a 409 for the delete, never
as a queued job naming a deleted row."""
from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import select

from service.artifacts import add_artifact
from service.auth import get_or_create_tenant
from service.db import SessionFactory, dispose_engines, rollback, session_scope, upgrade_db
from service.deletion import InUse, delete_dataset, delete_job, delete_model, spec_models
from service.errors import NotFound
from service.model_files import export_key
from service.model_registry import register_model
from service.orm import Artifact, Dataset, Job, Model
from service.settings import Settings
from service.spec import JobSpec
from service.store import LocalStore, S3Store
from service.submission import create_job
from tests.api.conftest import safetensors_bytes
from tests.pg import temporary_database

BLOCKED_S = 0.6  # the second transaction must still be waiting after this long


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        s = Settings(home=tmp_path / "home", auth="off", broker_url="filesystem://")
        upgrade_db(s)
        yield s
        dispose_engines()
        return
    with temporary_database("slimline_del") as url:
        s = Settings(home=tmp_path / "home", auth="off", broker_url="filesystem://",
                     database_url=url)
        upgrade_db(s)
        yield s


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    return LocalStore(settings.home / "objects")


@pytest.fixture
def rows(settings: Settings, store: LocalStore, tmp_path: Path) -> dict[str, str]:
    """A tenant with one uploaded model and one uploaded dataset (ids)."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes())
    with session_scope(settings) as session:
        tenant = get_or_create_tenant(session, "racer").id
        model = register_model(session, store, tenant_id=tenant, name="m",
                               arch={"name": "lenet300"}, fmt="safetensors",
                               params={"total": 1}, path=path)
        dataset = Dataset(tenant_id=tenant, name="d", format="npz", size_bytes=1, sha256="0",
                          storage_key=f"datasets/{tenant}/d.npz",
                          meta={"input_shape": [1, 28, 28], "num_classes": 10})
        session.add(dataset)
        session.flush()
        return {"tenant": tenant, "model": model.id, "dataset": dataset.id}


def spec(model: str, dataset: str = "fashion-mnist") -> JobSpec:
    return JobSpec.model_validate({"model": model, "dataset": dataset,
                                   "steps": [{"op": "evaluate"}]})


def in_thread(settings: Settings, work: Callable[[Any], Any]) -> tuple[threading.Thread, dict]:
    """Run `work(session)` in its own transaction in a thread; `out` gets its result or error."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with session_scope(settings) as session:
                out["result"] = work(session)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def open_session(settings: Settings):
    return SessionFactory(settings)()


def queued_naming(settings: Settings, row_id: str) -> list[str]:
    with session_scope(settings) as session:
        return [j.id for j in session.scalars(select(Job).where(Job.status == "queued"))
                if row_id in spec_models(j.spec) or (j.spec or {}).get("dataset") == row_id]


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_a_delete_first_makes_the_submission_a_404(settings, store, rows, kind):
    deleting = open_session(settings)
    if kind == "model":
        delete_model(deleting, store, rows["tenant"], rows["model"])
        job_spec = spec(rows["model"])
    else:
        delete_dataset(deleting, store, rows["tenant"], rows["dataset"])
        job_spec = spec(rows["model"], rows["dataset"])
    thread, out = in_thread(settings, lambda s: create_job(s, rows["tenant"], job_spec))
    time.sleep(BLOCKED_S)
    assert thread.is_alive(), out  # waits for the delete's lock
    deleting.commit()
    deleting.close()
    thread.join(30)
    assert isinstance(out.get("error"), NotFound), out
    assert queued_naming(settings, rows[kind]) == []


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_a_submission_first_makes_the_delete_a_409(settings, store, rows, kind):
    submitting = open_session(settings)
    job_spec = spec(rows["model"], rows["dataset"])
    job, _ = create_job(submitting, rows["tenant"], job_spec)
    remove = delete_model if kind == "model" else delete_dataset
    thread, out = in_thread(settings, lambda s: remove(s, store, rows["tenant"], rows[kind]))
    time.sleep(BLOCKED_S)
    assert thread.is_alive(), out  # waits for the submission's lock
    submitting.commit()
    submitting.close()
    thread.join(30)
    assert isinstance(out.get("error"), InUse), out
    assert job.id in out["error"].detail
    with session_scope(settings) as session:
        assert session.get(Model if kind == "model" else Dataset, rows[kind]) is not None


def test_a_rolled_back_delete_leaves_the_objects(settings, store, rows):
    with session_scope(settings) as session:
        key = session.get(Model, rows["model"]).storage_key
    session = open_session(settings)
    delete_model(session, store, rows["tenant"], rows["model"])
    rollback(session)  # the commit failed: nothing after it runs
    session.close()
    assert store.exists(key)
    with session_scope(settings) as session:
        assert session.get(Model, rows["model"]) is not None


# ---- an S3 bucket ---------------------------------------------------------------------------

def test_deletes_remove_their_objects_from_an_s3_bucket(s3_endpoint, tmp_path, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    store = S3Store(bucket, "objects", s3_endpoint)

    def listing() -> set[str]:
        found = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {o["Key"].removeprefix("objects/") for o in found}

    settings = Settings(home=tmp_path / "home", auth="off", broker_url="filesystem://")
    upgrade_db(settings)
    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(safetensors_bytes())
    (tmp_path / "report.json").write_text("{}")
    try:
        with session_scope(settings) as session:
            tenant = get_or_create_tenant(session, "s3").id
            source = register_model(session, store, tenant_id=tenant, name="in",
                                    arch={"name": "lenet300"}, fmt="safetensors",
                                    params={"total": 1}, path=checkpoint)
            job, _ = create_job(session, tenant, spec(source.id))
            out = register_model(session, store, tenant_id=tenant, name="out",
                                 arch={"name": "lenet300"}, fmt="safetensors",
                                 params={"total": 1}, path=checkpoint, source_job_id=job.id)
            report = add_artifact(session, store, tenant_id=tenant, job_id=job.id,
                                  name="report.json", path=tmp_path / "report.json")
            session.add(Artifact(job_id=job.id, name="model.safetensors", kind="model",
                                 size_bytes=out.size_bytes, sha256=out.sha256,
                                 storage_key=out.storage_key))
            job.status, job.result = "succeeded", {"model_id": out.id}
            ids = {"job": job.id, "out": out.id}
            keys = {"in": source.storage_key, "out": out.storage_key,
                    "report": report.storage_key,
                    "export": export_key(tenant, out.id, "onnx")}
        store.put_stream(keys["export"], io.BytesIO(b"onnx"))
        assert listing() == set(keys.values())
        with session_scope(settings) as session:
            delete_job(session, store, tenant, ids["job"])
        assert listing() == {keys["in"], keys["out"], keys["export"]}
        with session_scope(settings) as session:
            delete_model(session, store, tenant, ids["out"])
        assert listing() == {keys["in"]}
    finally:
        dispose_engines()
