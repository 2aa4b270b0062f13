"""The job state machine: queued → running → succeeded | failed | canceled (and queued → canceled,
queued → failed when the broker is down, running → queued when a lost job is re-queued)."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.errors import InvalidTransition, JobNotCancelable
from jobs.orm import Job, utcnow

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


def _move(job: Job, status: str) -> None:
    if status not in TRANSITIONS[job.status]:
        raise InvalidTransition(f"job {job.id} cannot go from {job.status} to {status}")
    job.status = status


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
    _move(job, FAILED)
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


def heartbeat(job: Job) -> None:
    job.heartbeat_at = utcnow()


def reap_stale_jobs(session: Session, timeout_s: float) -> list[str]:
    """Fail running jobs whose worker stopped heart-beating for `timeout_s` seconds."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.scalars(
        select(Job).where(Job.status == RUNNING, Job.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)).all()
    for job in stale:
        mark_failed(job, "WorkerLost",
                    f"the worker running this job stopped reporting for over {int(timeout_s)} s "
                    "(it crashed or was killed); submit the job again")
    session.flush()
    return [job.id for job in stale]
