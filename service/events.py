"""Job events (progress, per-epoch metrics) and progress updates, written by the worker in short
transactions of their own."""
from __future__ import annotations

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


def set_progress(session: Session, job_id: str, progress: float, stage: str | None = None,
                 *, event: bool = True) -> None:
    """Update progress (clamped to 0..1) and stage, refresh the heartbeat, and by default record a
    `progress` event."""
    job = session.get(Job, job_id)
    if job is None:
        return
    job.progress = min(1.0, max(0.0, float(progress)))
    if stage is not None:
        job.stage = stage
    job.heartbeat_at = utcnow()
    if event:
        record_event(session, job_id, "progress", {"progress": job.progress, "stage": job.stage})
    session.flush()


def list_events(session: Session, job_id: str, after_id: int = 0, limit: int = 1000
                ) -> list[JobEvent]:
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id).limit(limit)))


def event_dict(event: JobEvent) -> dict[str, Any]:
    return {"id": event.id, "kind": event.kind, "created_at": event.created_at.isoformat(),
            "data": event.data}
