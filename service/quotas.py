"""Per-tenant quotas (issue 11): active jobs and epochs per job at submission, uploads per hour.
Each refusal is a 429 `QuotaExceeded` with a Retry-After (or a 422 for a spec that can never
fit) whose detail names the limit and its `SLIMLINE_*` setting. The caller passes the settings."""
from __future__ import annotations

import math
from datetime import UTC, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select, union_all
from sqlalchemy.orm import Session

from service.errors import InvalidSpec, QuotaExceeded
from service.orm import Dataset, Job, Model, utcnow
from service.states import QUEUED, RUNNING

if TYPE_CHECKING:
    from service.settings import Settings
    from service.spec import JobSpec

UPLOAD_WINDOW = timedelta(hours=1)
ACTIVE_JOBS_RETRY_S = 30.0


def total_epochs(spec: JobSpec) -> int:
    """Epochs the job trains for, summed over its steps (only train steps train; a pcn step
    with when: "plateau" runs inside the train step before it and adds none)."""
    return sum(int(getattr(step, "epochs", 0) or 0) for step in spec.steps)


def check_job_quota(session: Session, tenant_id: str, spec: JobSpec, settings: Settings) -> None:
    """Before a job is inserted: its epochs within max_total_epochs (422), and the tenant's
    queued + running jobs below max_active_jobs (429)."""
    epochs = total_epochs(spec)
    if epochs > settings.max_total_epochs:
        raise InvalidSpec(f"steps: the train steps add up to {epochs} epochs, the limit is "
                          f"{settings.max_total_epochs} per job (SLIMLINE_MAX_TOTAL_EPOCHS); "
                          "use fewer epochs or split the work into several jobs")
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_((QUEUED, RUNNING)),
        Job.parent_id.is_(None))) or 0  # a search's trials count as the search
    if active >= settings.max_active_jobs:
        raise QuotaExceeded(f"you have {active} queued or running jobs, the limit is "
                            f"{settings.max_active_jobs} (SLIMLINE_MAX_ACTIVE_JOBS); wait for "
                            "some to finish or cancel some", retry_after=ACTIVE_JOBS_RETRY_S)


def check_upload_quota(session: Session, tenant_id: str, settings: Settings) -> None:
    """Before an upload is stored: models uploaded (not produced by a job) plus datasets created
    by the tenant in the last hour must be below max_uploads_per_hour (429 otherwise, with
    Retry-After = seconds until enough uploads leave the window)."""
    limit = settings.max_uploads_per_hour
    now = utcnow()
    since = now - UPLOAD_WINDOW
    models = select(Model.created_at.label("created_at")).where(
        Model.tenant_id == tenant_id, Model.source_job_id.is_(None), Model.created_at >= since)
    datasets = select(Dataset.created_at.label("created_at")).where(
        Dataset.tenant_id == tenant_id, Dataset.created_at >= since)
    uploads = union_all(models, datasets).subquery()
    count = session.scalar(select(func.count()).select_from(uploads)) or 0
    if count < limit:
        return
    # the count drops below the limit once the (count - limit + 1) oldest have left the window
    oldest = session.scalar(select(uploads.c.created_at).order_by(uploads.c.created_at)
                            .offset(count - limit).limit(1))
    if oldest is None:  # removed meanwhile: the window has room again
        return
    if oldest.tzinfo is None:  # SQLite through a union: the naive UTC value
        oldest = oldest.replace(tzinfo=UTC)
    resets = oldest + UPLOAD_WINDOW
    wait = max(1, math.ceil((resets - now).total_seconds()))
    raise QuotaExceeded(f"you uploaded {count} models and datasets in the last hour, the limit "
                        f"is {limit} per hour (SLIMLINE_MAX_UPLOADS_PER_HOUR); the window has "
                        f"room again at {resets.replace(microsecond=0).isoformat()} (in {wait} s)",
                        retry_after=float(wait))
