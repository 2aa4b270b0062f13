"""The job state machine: queued → running → succeeded | failed | canceled (and queued → canceled,
queued → failed when a job used all its attempts, running → queued when a lost job is re-queued).

Every change of a job's status goes through this module: the API's cancel (`request_cancel`), the
worker's `claim`, `heartbeat`, `finish`, `fail` and `cancel_attempt`, and the reconciler's
`requeue`/`mark_failed`. Functions take the caller's session and only flush; the caller commits.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, object_session

from service.db import rows_changed
from service.errors import InvalidTransition, JobNotCancelable
from service.orm import Job, JobEvent, utcnow

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = (
    "queued", "running", "succeeded", "failed", "canceled")
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, FAILED, CANCELED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELED: frozenset(),
}


def status_event(session: Session | None, job_id: str, status: str, **data: Any) -> None:
    """Record a `status` event `{"status": ..., **data}` in `session` (every transition has one,
    and so has a resume)."""
    if session is not None:
        session.add(JobEvent(job_id=job_id, kind="status", data={"status": status, **data}))


def _move(job: Job, status: str, **data: Any) -> None:
    if status not in TRANSITIONS[job.status]:
        raise InvalidTransition(f"job {job.id} cannot go from {job.status} to {status}")
    job.status = status
    status_event(object_session(job), job.id, status, **data)


def mark_running(job: Job) -> None:
    now = utcnow()
    _move(job, RUNNING)
    job.started_at = job.started_at or now
    job.heartbeat_at = now
    job.attempts = (job.attempts or 0) + 1
    job.stage = "starting"


def mark_succeeded(job: Job, result: dict | None = None) -> None:
    _move(job, SUCCEEDED)
    job.finished_at = utcnow()
    job.progress = 1.0
    job.stage = "done"
    if result is not None:
        job.result = result


def mark_failed(job: Job, code: str, message: str) -> None:
    _move(job, FAILED, code=code)
    job.finished_at = utcnow()
    job.error_code = code
    job.error_message = message
    job.stage = "failed"


def mark_canceled(job: Job) -> None:
    _move(job, CANCELED)
    job.finished_at = utcnow()
    job.stage = "canceled"


def request_cancel(job: Job) -> bool:
    """Cancel a job: a queued one right away (returns True: revoke it too), a running one
    cooperatively (the worker checks `cancel_requested` between batches)."""
    if job.status in TERMINAL:
        raise JobNotCancelable(f"job {job.id} is already {job.status}; only queued or running "
                               "jobs can be canceled")
    job.cancel_requested = True
    if job.status == QUEUED:
        mark_canceled(job)
        return True
    return False


def requeue(job: Job, reason: str) -> None:
    """A running job whose worker was lost goes back to the queue; the reconciler sends it
    (dispatched_at = None means "send now") and the next attempt resumes from its checkpoint."""
    _move(job, QUEUED, reason=reason, attempts=job.attempts)
    job.stage = "queued: " + reason
    job.dispatched_at = None
    job.dispatch_count = 0


# ---- the worker's side: one attempt owns a running job ----

class LostOwnership(Exception):
    """The job row is no longer this attempt's (reaped, re-claimed by another worker, or gone)."""


def owned(session: Session, job_id: str, attempt: int, *, lock: bool = False) -> Job:
    """The job, if attempt `attempt` still runs it (`lock`: take its row lock and re-read it);
    else LostOwnership."""
    job = session.get(Job, job_id, with_for_update=lock, populate_existing=lock)
    if job is None or job.status != RUNNING or job.attempts != attempt:
        raise LostOwnership(f"job {job_id} is no longer run by this attempt ({attempt})")
    return job


def claim(session: Session, job_id: str, *, now: datetime, heartbeat_timeout_s: float,
          max_attempts: int) -> int | None:
    """Mark the job running for a new attempt and return its number, or None when there is
    nothing to run: gone, terminal, running elsewhere with a heartbeat fresher than
    `heartbeat_timeout_s` (a running job with a stale one is taken over), canceled while
    queued (marked canceled here), or out of attempts (a queued one is marked failed).

    A compare-and-set on (status, attempts): of two workers claiming the same row at once
    exactly one updates it (also on SQLite, where SELECT takes no row lock), so a repeated
    delivery never runs a job twice concurrently nor re-runs a terminal one."""
    job = session.get(Job, job_id)
    if job is None:
        log.warning("job %s does not exist; dropping the message", job_id)
        return None
    if job.terminal:
        log.info("job %s is already %s; nothing to do", job_id, job.status)
        return None
    if job.status == RUNNING:
        fresh = now - timedelta(seconds=heartbeat_timeout_s)
        if job.heartbeat_at is not None and job.heartbeat_at > fresh:
            log.info("job %s is running elsewhere (heartbeat %s); not running it twice",
                     job_id, job.heartbeat_at.isoformat())
            return None
        log.warning("job %s was running with a stale heartbeat; taking it over", job_id)
    elif job.cancel_requested:
        mark_canceled(job)
        session.flush()
        return None
    if (job.attempts or 0) >= max_attempts:
        if job.status == QUEUED:
            mark_failed(job, "WorkerLost",
                        f"the job was started {job.attempts} times and its worker was lost each "
                        f"time; the limit is SLIMLINE_JOB_MAX_ATTEMPTS={max_attempts}")
            session.flush()
        return None
    seen_status, seen_attempts = job.status, job.attempts or 0
    claimed = rows_changed(session, update(Job).where(
        Job.id == job_id, Job.status == seen_status, Job.attempts == seen_attempts)
        .values(status=RUNNING, attempts=seen_attempts + 1, heartbeat_at=now,
                started_at=job.started_at or now, stage="starting"))
    if claimed != 1:
        log.info("job %s was claimed by another worker", job_id)
        return None
    session.refresh(job)
    if seen_status == RUNNING:  # the lost attempt goes back to the queue, as the reaper says it
        status_event(session, job_id, QUEUED, attempts=seen_attempts,
                     reason=f"its worker stopped reporting for over {int(heartbeat_timeout_s)} s "
                            f"(attempt {seen_attempts}); a redelivered message takes it over")
    status_event(session, job_id, RUNNING, attempt=seen_attempts + 1)
    session.flush()
    return seen_attempts + 1


def heartbeat(session: Session, job_id: str, attempt: int, now: datetime) -> None:
    """The attempt is alive (LostOwnership when the job is no longer its)."""
    owned(session, job_id, attempt).heartbeat_at = now
    session.flush()


def finish(session: Session, job_id: str, attempt: int,
           produce: Callable[[Job], dict[str, Any]]) -> str:
    """End a successful attempt in the caller's transaction: `succeeded` with the result that
    `produce(job)` returns (it adds the job's new rows to the same session), or `canceled` when
    a cancel was requested first (`produce` is not called).

    It starts with a compare-and-set on the row (running, this attempt, no cancel requested),
    which takes the row lock (PostgreSQL) or the write lock (SQLite) before anything else, so a
    concurrent `request_cancel` (a compare-and-set on the status) either lands first (the job
    ends canceled) or waits and finds the job succeeded (the cancel gets 409)."""
    won = rows_changed(session, update(Job).where(
        Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt,
        Job.cancel_requested.is_(False)).values(stage="storing results"))
    job = owned(session, job_id, attempt, lock=True)
    if not won:  # ours, so a cancel was requested first
        mark_canceled(job)
        job.checkpoint = None
        session.flush()
        return CANCELED
    mark_succeeded(job, produce(job))
    job.checkpoint = None
    session.flush()
    return SUCCEEDED


def fail(session: Session, job_id: str, attempt: int, code: str, message: str) -> None:
    """The attempt failed: the job is failed (LostOwnership when it is no longer the
    attempt's)."""
    job = owned(session, job_id, attempt, lock=True)
    mark_failed(job, code, message)
    job.checkpoint = None
    session.flush()


def cancel_attempt(session: Session, job_id: str, attempt: int) -> None:
    """The attempt stopped at a requested cancel: the job is canceled (LostOwnership when it is
    no longer the attempt's)."""
    job = owned(session, job_id, attempt, lock=True)
    mark_canceled(job)
    job.checkpoint = None
    session.flush()
