"""Per-tenant quotas (service.quotas) on SQLite and PostgreSQL: active jobs and epochs per job at
submission (through create_job), uploads per hour with the Retry-After of the window."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import pytest

from service.auth import get_or_create_tenant
from service.db import dispose_engines, session_scope, upgrade_db
from service.errors import InvalidSpec, QuotaExceeded
from service.orm import Dataset, Job, Model, utcnow
from service.quotas import check_job_quota, check_upload_quota, total_epochs
from service.settings import Settings
from service.spec import JobSpec
from service.states import mark_failed, mark_running, mark_succeeded
from service.submission import create_job
from tests.pg import temporary_database

SPEC = {"model": {"arch": {"name": "lenet300"}}, "dataset": "synthetic-tiny",
        "steps": [{"op": "evaluate"}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path) -> Iterator[Settings]:
    with contextlib.ExitStack() as stack:
        url = (stack.enter_context(temporary_database("slimline_quota"))
               if request.param == "postgresql" else "")
        s = Settings(home=tmp_path, database_url=url, max_active_jobs=2, max_total_epochs=5,
                     max_uploads_per_hour=3)
        upgrade_db(s)
        yield s
        dispose_engines()


@pytest.fixture
def tenants(settings) -> tuple[str, str]:
    with session_scope(settings) as session:
        return (get_or_create_tenant(session, "alice").id,
                get_or_create_tenant(session, "bob").id)


def spec(**patch) -> JobSpec:
    return JobSpec.model_validate(SPEC | patch)


def submit(settings: Settings, tenant: str, key: str | None = None, **patch) -> tuple[str, bool]:
    with session_scope(settings) as session:
        job, created = create_job(session, tenant, spec(**patch), key, settings)
        return job.id, created


def test_active_jobs(settings, tenants):
    alice, bob = tenants
    first, _ = submit(settings, alice, "k1")
    second, _ = submit(settings, alice, seed=1)
    with session_scope(settings) as session:
        mark_running(session.get(Job, second))
    with pytest.raises(QuotaExceeded) as info:
        submit(settings, alice, seed=2)
    assert info.value.status == 429 and info.value.retry_after == 30
    assert info.value.detail == (
        "you have 2 queued or running jobs, the limit is 2 (SLIMLINE_MAX_ACTIVE_JOBS); wait for "
        "some to finish or cancel some")
    # an idempotent replay of a job that exists is not refused, nor is another tenant
    assert submit(settings, alice, "k1") == (first, False)
    submit(settings, bob)
    # finished jobs do not count
    with session_scope(settings) as session:
        mark_succeeded(session.get(Job, second), {"model_id": None})
    third, created = submit(settings, alice, seed=2)
    assert created
    with session_scope(settings) as session:
        mark_failed(session.get(Job, third), "X", "x")
        assert session.query(Job).filter(Job.tenant_id == alice).count() == 3
    submit(settings, alice, seed=3)
    with pytest.raises(QuotaExceeded):
        submit(settings, alice, seed=4)


def test_total_epochs(settings, tenants):
    alice, _ = tenants
    steps = [{"op": "train", "epochs": 2}, {"op": "evaluate"}, {"op": "train", "epochs": 3},
             {"op": "pcn", "select": {"dims": 4}}]
    assert total_epochs(spec(steps=steps)) == 5
    submit(settings, alice, steps=steps)  # exactly the limit
    steps[2]["epochs"] = 4
    with pytest.raises(InvalidSpec) as info:
        submit(settings, alice, steps=steps)
    assert info.value.status == 422
    assert info.value.detail.startswith("steps: the train steps add up to 6 epochs, the limit "
                                        "is 5 per job (SLIMLINE_MAX_TOTAL_EPOCHS)")
    # the epoch limit is checked before the active-jobs count
    with session_scope(settings) as session, pytest.raises(InvalidSpec):
        check_job_quota(session, alice, spec(steps=steps), settings.model_copy(
            update={"max_active_jobs": 1}))


def add_upload(settings: Settings, tenant: str, minutes_ago: float, *, dataset: bool = False,
               source_job_id: str | None = None) -> None:
    created = utcnow() - timedelta(minutes=minutes_ago)
    with session_scope(settings) as session:
        if dataset:
            session.add(Dataset(tenant_id=tenant, name="d", format="npz", size_bytes=1,
                                sha256="0" * 64, storage_key="k", meta={}, created_at=created))
        else:
            session.add(Model(tenant_id=tenant, name="m", arch={}, format="safetensors",
                              size_bytes=1, sha256="0" * 64, params={}, storage_key="k",
                              source_job_id=source_job_id, created_at=created))


def check_uploads(settings: Settings, tenant: str) -> None:
    with session_scope(settings) as session:
        check_upload_quota(session, tenant, settings)


def test_uploads_per_hour(settings, tenants):
    alice, bob = tenants
    job_id, _ = submit(settings, alice)
    add_upload(settings, alice, 61)  # out of the window
    add_upload(settings, alice, 50)
    add_upload(settings, alice, 40, dataset=True)
    add_upload(settings, alice, 1, source_job_id=job_id)  # a job's output, not an upload
    for _ in range(3):
        add_upload(settings, bob, 5)  # another tenant's
    check_uploads(settings, alice)  # 2 of 3
    add_upload(settings, alice, 10, dataset=True)
    with pytest.raises(QuotaExceeded) as info:
        check_uploads(settings, alice)
    assert info.value.status == 429
    # room again when the upload of 50 minutes ago leaves the window: in about 10 minutes
    assert 595 <= info.value.retry_after <= 601, info.value.retry_after
    assert "you uploaded 3 models and datasets in the last hour, the limit is 3 per hour " \
           "(SLIMLINE_MAX_UPLOADS_PER_HOUR); the window has room again at " in info.value.detail
    # over the limit (uploads that raced past it): room once enough have left
    add_upload(settings, alice, 20)
    with pytest.raises(QuotaExceeded) as info:
        check_uploads(settings, alice)
    assert 1195 <= info.value.retry_after <= 1201, info.value.retry_after
