from __future__ import annotations

import pytest

from service.db import dispose_engines, session_scope, upgrade_db
from service.errors import InvalidTransition, JobNotCancelable
from service.events import list_events, record_event, set_progress
from service.orm import Job, Tenant
from service.settings import Settings
from service.states import (
    mark_canceled,
    mark_failed,
    mark_running,
    mark_succeeded,
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


def test_claim_finish_and_fail_are_compare_and_sets_on_the_attempt(settings):
    from datetime import timedelta

    from service.orm import utcnow
    from service.states import LostOwnership, claim, fail, finish

    limits = {"heartbeat_timeout_s": 30, "max_attempts": 2}
    with session_scope(settings) as session:
        job = new_job(session)
        job_id = job.id
    with session_scope(settings) as session:
        assert claim(session, job_id, now=utcnow(), **limits) == 1
        # a second delivery while the first attempt heart-beats runs nothing
        assert claim(session, job_id, now=utcnow(), **limits) is None
        # once its heartbeat is stale, the job is taken over by attempt 2
        later = utcnow() + timedelta(seconds=31)
        assert claim(session, job_id, now=later, **limits) == 2
        statuses = [e.data for e in list_events(session, job_id) if e.kind == "status"]
        # the lost attempt is said to go back to the queue before the new one runs
        assert [d["status"] for d in statuses[-2:]] == ["queued", "running"]
        assert "attempt 1" in statuses[-2]["reason"] and statuses[-1]["attempt"] == 2
    with session_scope(settings) as session, pytest.raises(LostOwnership):
        fail(session, job_id, 1, "X", "attempt 1 no longer owns the job")
    with session_scope(settings) as session:
        session.get(Job, job_id).cancel_requested = True
    with session_scope(settings) as session:  # a cancel requested first wins over the finish
        assert finish(session, job_id, 2, lambda job: pytest.fail("not produced")) == "canceled"
    with session_scope(settings) as session:
        tenant = session.get(Job, job_id).tenant_id
        second, third = Job(tenant_id=tenant, spec={}, attempts=2), Job(tenant_id=tenant, spec={})
        session.add_all([second, third])
        session.flush()
        second, third = second.id, third.id
    with session_scope(settings) as session:  # out of attempts while queued: failed
        assert claim(session, second, now=utcnow(), **limits) is None
        assert session.get(Job, second).status == "failed"
    with session_scope(settings) as session:
        assert claim(session, third, now=utcnow(), **limits) == 1
        assert finish(session, third, 1, lambda job: {"ok": True}) == "succeeded"
    with session_scope(settings) as session:
        assert session.get(Job, third).result == {"ok": True}
        kinds = [e.data["status"] for e in list_events(session, job_id) if e.kind == "status"]
    assert kinds == ["running", "queued", "running", "canceled"]
