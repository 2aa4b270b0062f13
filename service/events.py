"""Job events (progress, per-epoch metrics) and progress updates, written by the worker in short
transactions of their own."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.orm import Job, JobEvent, utcnow


def record_event(session: Session, job_id: str, kind: str, data: dict[str, Any] | None = None
                 ) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind, data=data or {})
    session.add(event)
    session.flush()
    return event


ETA_MIN_PROGRESS = 0.01  # below this, an ETA from the elapsed time is mostly noise


def eta_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Seconds left for a running job: elapsed since it started x (1 - progress) / progress;
    None when it is not running or has not progressed enough to tell."""
    progress = job.progress or 0.0
    if job.status != "running" or job.started_at is None or not \
            ETA_MIN_PROGRESS <= progress < 1.0:
        return None
    started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=UTC)
    elapsed = max(0.0, ((now or utcnow()) - started).total_seconds())
    return round(elapsed * (1.0 - progress) / progress, 1)


def set_progress(session: Session, job_id: str, progress: float | None,
                 stage: str | None = None, *, event: bool = True) -> None:
    """Update progress (clamped to 0..1; None keeps it) and stage, refresh the heartbeat, and by
    default record a `progress` event `{progress, stage, eta_s}`."""
    job = session.get(Job, job_id)
    if job is None:
        return
    if progress is not None:
        job.progress = min(1.0, max(0.0, float(progress)))
    if stage is not None:
        job.stage = stage
    job.heartbeat_at = utcnow()
    if event:
        record_event(session, job_id, "progress", {"progress": job.progress, "stage": job.stage,
                                                   "eta_s": eta_seconds(job)})
    session.flush()


def list_events(session: Session, job_id: str, after_id: int = 0, limit: int = 1000
                ) -> list[JobEvent]:
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id).limit(limit)))


def event_dict(event: JobEvent) -> dict[str, Any]:
    return {"id": event.id, "kind": event.kind, "created_at": event.created_at.isoformat(),
            "data": event.data}
