"""service.reconcile against SQLite and Celery's filesystem broker (real messages as files)."""
from __future__ import annotations

from datetime import timedelta

import pytest

from service.celery_config import filesystem_folders
from service.db import dispose_engines, session_scope, upgrade_db
from service.events import list_events
from service.orm import Job, Tenant, utcnow
from service.reconcile import Reconciler, reap_lost_workers, reconcile_once
from service.settings import Settings
from service.states import mark_running


@pytest.fixture
def settings(tmp_path):
    s = Settings(home=tmp_path, broker_url="filesystem://", dispatch_grace_s=60,
                 job_heartbeat_timeout_s=30, job_max_attempts=2)
    upgrade_db(s)
    yield s
    dispose_engines()


def messages(settings) -> int:
    folder = filesystem_folders(settings)["data_folder_out"]
    from pathlib import Path

    return len([p for p in Path(folder).iterdir() if p.is_file()])


def add_job(settings, **values) -> str:
    with session_scope(settings) as session:
        tenant = session.query(Tenant).first() or Tenant(name="t")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, spec={})
        session.add(job)
        session.flush()
        for name, value in values.items():  # after the insert: None must stay None
            setattr(job, name, value)
        return job.id


def row(settings, job_id) -> Job:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def test_sends_unsent_and_overdue_queued_jobs_with_doubling_grace(settings):
    unsent = add_job(settings, dispatched_at=None)
    fresh = add_job(settings)  # sent by the API just now
    overdue = add_job(settings, dispatched_at=utcnow() - timedelta(seconds=61))
    done = add_job(settings, status="succeeded", dispatched_at=None)
    first = reconcile_once(settings)
    assert sorted(first.sent) == sorted([unsent, overdue]) and messages(settings) == 2
    assert row(settings, overdue).dispatch_count == 1 and row(settings, done).dispatch_count == 0
    assert reconcile_once(settings).sent == []  # nothing is due again right away
    with session_scope(settings) as session:  # 90 s later: past the grace, not past 2x grace
        for job_id in (unsent, overdue):
            job = session.get(Job, job_id)
            job.dispatched_at, job.dispatch_count = utcnow() - timedelta(seconds=90), 2
    assert reconcile_once(settings).sent == []
    with session_scope(settings) as session:
        session.get(Job, unsent).dispatched_at = utcnow() - timedelta(seconds=121)
    assert reconcile_once(settings).sent == [unsent]
    assert row(settings, fresh).dispatch_count == 0


def test_lost_workers_requeued_then_sent_then_failed(settings):
    job_id = add_job(settings)
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        mark_running(job)
        job.heartbeat_at = utcnow() - timedelta(seconds=31)
    # a process that has just (re)gained the database does not judge heartbeats yet
    reconciler = Reconciler(settings)
    assert reconciler.run_pass().requeued == []
    reconciler.reachable_since -= 31
    passed = reconciler.run_pass()
    assert passed.requeued == [job_id] and passed.sent == [job_id]
    job = row(settings, job_id)
    assert job.status == "queued" and job.dispatch_count == 1 and job.attempts == 1
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        mark_running(job)  # attempt 2 of 2, lost as well
        job.heartbeat_at = utcnow() - timedelta(seconds=31)
    assert reconcile_once(settings).failed == [job_id]
    assert row(settings, job_id).error_code == "WorkerLost"


def test_stale_jobs_are_requeued_then_failed_after_max_attempts(settings):
    created = [add_job(settings) for _ in range(3)]
    with session_scope(settings) as session:
        stale, fresh, last = (session.get(Job, job_id) for job_id in created)
        for job in (stale, fresh, last):
            mark_running(job)
        last.attempts = 3
        stale.heartbeat_at = last.heartbeat_at = utcnow() - timedelta(seconds=600)
        ids = (stale.id, fresh.id, last.id)
    with session_scope(settings) as session:
        assert reap_lost_workers(session, 300, max_attempts=3) == ([ids[0]], [ids[2]])
    with session_scope(settings) as session:
        stale, fresh, last = (session.get(Job, i) for i in ids)
        assert stale.status == "queued" and stale.dispatched_at is None
        assert "stopped reporting" in stale.stage
        assert last.status == "failed" and last.error_code == "WorkerLost"
        assert "SLIMLINE_JOB_MAX_ATTEMPTS=3" in last.error_message and last.finished_at
        assert fresh.status == "running"
        statuses = [e.data for e in list_events(session, stale.id) if e.kind == "status"]
        assert [d["status"] for d in statuses] == ["running", "queued"]
        assert statuses[-1]["attempts"] == 1 and "checkpoint" in statuses[-1]["reason"]
        assert [e.data["status"] for e in list_events(session, last.id)] == ["running", "failed"]


def test_unreachable_database_resets_the_reachability_clock(tmp_path):
    s = Settings(home=tmp_path, database_url="postgresql+psycopg://u@127.0.0.1:1/x",
                 broker_url="filesystem://", db_pool_timeout_s=1)
    reconciler = Reconciler(s)
    with pytest.raises(Exception):  # noqa: B017 - the driver's connection error
        reconciler.run_pass()
    assert reconciler.reachable_since is None
    dispose_engines()
