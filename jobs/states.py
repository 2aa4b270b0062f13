"""The job state machine: queued → running → succeeded | failed | canceled (and queued → canceled,
queued → failed when the broker is down, running → queued when a lost job is re-queued)."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from jobs.errors import InvalidTransition, JobNotCancelable
from jobs.orm import Job, JobEvent, utcnow

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


def heartbeat(job: Job) -> None:
    job.heartbeat_at = utcnow()


def requeue(job: Job, reason: str) -> None:
    """A running job whose worker was lost goes back to the queue; the reconciler sends it
    (dispatched_at = None means "send now") and the next attempt resumes from its checkpoint."""
    _move(job, QUEUED, reason=reason, attempts=job.attempts)
    job.stage = "queued: " + reason
    job.dispatched_at = None
    job.dispatch_count = 0


def recover_stale_jobs(session: Session, timeout_s: float, max_attempts: int
                       ) -> tuple[list[str], list[str]]:
    """Running jobs whose worker stopped heart-beating for `timeout_s` seconds: re-queued while
    they have attempts left, else failed. Returns (requeued ids, failed ids)."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.scalars(
        select(Job).where(Job.status == RUNNING, Job.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)).all()
    requeued, failed = [], []
    for job in stale:
        if (job.attempts or 0) < max_attempts:
            requeue(job, f"its worker stopped reporting for over {int(timeout_s)} s (attempt "
                         f"{job.attempts} of {max_attempts}); it resumes from its last "
                         "checkpoint")
            requeued.append(job.id)
        else:
            mark_failed(job, "WorkerLost",
                        f"the worker running this job stopped reporting for over "
                        f"{int(timeout_s)} s in each of its {job.attempts} attempts (crashed or "
                        "killed, e.g. out of memory); the limit is SLIMLINE_JOB_MAX_ATTEMPTS="
                        f"{max_attempts}. Submit it again, with a smaller model or batch size "
                        "if the worker ran out of memory")
            failed.append(job.id)
    session.flush()
    return requeued, failed
