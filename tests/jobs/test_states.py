from __future__ import annotations

from datetime import timedelta

import pytest

from jobs.db import dispose_engines, session_scope, upgrade_db
from jobs.errors import InvalidTransition, JobNotCancelable
from jobs.events import list_events, record_event, set_progress
from jobs.orm import Job, Tenant, utcnow
from jobs.settings import Settings
from jobs.states import (
    mark_canceled,
    mark_failed,
    mark_running,
    mark_succeeded,
    reap_stale_jobs,
    request_cancel,
)


@pytest.fixture
def settings(tmp_path):
    s = Settings(home=tmp_path)
    upgrade_db(s)
    yield s
    dispose_engines()


def new_job(session) -> Job:
    tenant = Tenant(name="t")
    session.add(tenant)
    session.flush()
    job = Job(tenant_id=tenant.id, spec={})
    session.add(job)
    session.flush()
    return job


def test_happy_path_and_terminal_states(settings):
    with session_scope(settings) as session:
        job = new_job(session)
        assert job.status == "queued" and job.attempts == 0
        mark_running(job)
        assert job.started_at and job.heartbeat_at and job.attempts == 1
        mark_succeeded(job, {"model_id": "m"})
        assert job.progress == 1.0 and job.finished_at and job.result == {"model_id": "m"}
        for move in (mark_running, mark_canceled, lambda j: mark_failed(j, "X", "y")):
            with pytest.raises(InvalidTransition):
                move(job)
        with pytest.raises(JobNotCancelable):
            request_cancel(job)


def test_cancel_queued_and_running(settings):
    with session_scope(settings) as session:
        queued = new_job(session)
        assert request_cancel(queued) is True and queued.status == "canceled"
        running = Job(tenant_id=queued.tenant_id, spec={})
        session.add(running)
        session.flush()
        mark_running(running)
        assert request_cancel(running) is False
        assert running.status == "running" and running.cancel_requested


def test_reaper_fails_jobs_without_heartbeat(settings):
    with session_scope(settings) as session:
        stale, fresh = new_job(session), Job(tenant_id=None, spec={})
        fresh.tenant_id = stale.tenant_id
        session.add(fresh)
        session.flush()
        mark_running(stale)
        mark_running(fresh)
        stale.heartbeat_at = utcnow() - timedelta(seconds=600)
        ids = (stale.id, fresh.id)
    with session_scope(settings) as session:
        assert reap_stale_jobs(session, 300) == [ids[0]]
    with session_scope(settings) as session:
        stale, fresh = session.get(Job, ids[0]), session.get(Job, ids[1])
        assert stale.status == "failed" and stale.error_code == "WorkerLost"
        assert "stopped reporting" in stale.error_message and stale.finished_at
        assert fresh.status == "running"


def test_events_and_progress(settings):
    with session_scope(settings) as session:
        job = new_job(session)
        job_id = job.id
    with session_scope(settings) as session:
        record_event(session, job_id, "epoch", {"epoch": 1, "loss": 0.3})
        set_progress(session, job_id, 1.7, "train")
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        assert job.progress == 1.0 and job.stage == "train" and job.heartbeat_at
        events = list_events(session, job_id)
        assert [e.kind for e in events] == ["epoch", "progress"]
        assert list_events(session, job_id, after_id=events[0].id) == events[1:]


def test_session_scope_rolls_back_and_undoes(settings):
    undone = []
    with pytest.raises(RuntimeError), session_scope(settings) as session:
        new_job(session)
        session.info.setdefault("on_rollback", []).append(lambda: undone.append(1))
        raise RuntimeError("boom")
    assert undone == [1]
    with session_scope(settings) as session:
        assert session.query(Job).count() == 0
