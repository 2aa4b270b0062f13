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
    recover_stale_jobs,
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


def test_stale_jobs_are_requeued_then_failed_after_max_attempts(settings):
    with session_scope(settings) as session:
        stale, fresh = new_job(session), Job(tenant_id=None, spec={})
        fresh.tenant_id = stale.tenant_id
        last = Job(tenant_id=stale.tenant_id, spec={})
        session.add_all([fresh, last])
        session.flush()
        for job in (stale, fresh, last):
            mark_running(job)
        last.attempts = 3
        stale.heartbeat_at = last.heartbeat_at = utcnow() - timedelta(seconds=600)
        ids = (stale.id, fresh.id, last.id)
    with session_scope(settings) as session:
        assert recover_stale_jobs(session, 300, max_attempts=3) == ([ids[0]], [ids[2]])
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


def test_every_transition_records_a_status_event(settings):
    with session_scope(settings) as session:
        a, b = new_job(session), None
        b = Job(tenant_id=a.tenant_id, spec={})
        session.add(b)
        session.flush()
        mark_running(a)
        mark_succeeded(a, {})
        mark_running(b)
        request_cancel(b)
        mark_canceled(b)
        ids = (a.id, b.id)
    with session_scope(settings) as session:
        kinds = [[e.data["status"] for e in list_events(session, i) if e.kind == "status"]
                 for i in ids]
    assert kinds == [["running", "succeeded"], ["running", "canceled"]]


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
