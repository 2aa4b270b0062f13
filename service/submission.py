"""Jobs as the API sees them: submit (with idempotency), get, list with keyset pagination, cancel.
Services only flush; the caller commits. What must reach the broker (a new job's message, a
canceled job's revoke) is registered with `service.db.after_commit`, so it is sent once the row is
committed and never for a row that was rolled back."""
from __future__ import annotations

import base64
import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import queue
from service.archcheck import check_arch, is_graph_arch
from service.datasets import check_dataset_ref
from service.db import after_commit, rows_changed, session_scope
from service.deletion import lock_job_inputs
from service.errors import (
    BadRequest,
    BrokerUnavailable,
    IdempotencyConflict,
    InvalidSpec,
    JobNotCancelable,
    NotFound,
    Unprocessable,
)
from service.events import eta_seconds, record_event
from service.model_registry import get_model
from service.orm import Job, Model
from service.quotas import check_job_quota
from service.registry import dense_weightless_edit_ops, dense_weights_refusal
from service.settings import Settings
from service.spec import JobSpec, control_character
from service.states import QUEUED, RUNNING, STATUSES, TERMINAL, request_cancel
from service.submitcheck import check_job_inputs

log = logging.getLogger(__name__)


def spec_document(spec: JobSpec) -> dict[str, Any]:
    """The stored form of a spec: JSON, defaults filled in, unset optionals left out."""
    return spec.model_dump(mode="json", exclude_none=True)


def create_job(session: Session, tenant_id: str, spec: JobSpec,
               idempotency_key: str | None = None, settings: Settings | None = None,
               check_inputs: bool = False) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created). Same key + same spec → the existing job;
    same key + another spec → 409. A fresh `{"arch"}` model is checked torch-free (name,
    kwargs, size within `settings`' limits); with `check_inputs`, the layer names the steps
    give and the dataset's fit to the model too (`service.submitcheck`); with `settings`, the
    tenant's quotas are checked before the insert (an idempotent replay of an existing key is
    never refused)."""
    if idempotency_key is not None and (not 1 <= len(idempotency_key) <= 200
                                        or control_character(idempotency_key) is not None):
        raise BadRequest("Idempotency-Key must be 1..200 printable characters")
    model_row = None
    if spec.model_id is None:
        limits = settings or Settings.model_construct()
        arch = spec.model.arch  # type: ignore[union-attr]
        check_arch(arch, max_params=limits.max_model_params, max_macs=limits.max_model_macs)
        if is_graph_arch(arch):
            check_graph_known(session, tenant_id, arch["graph"])
    else:
        model_row = get_model(session, tenant_id, spec.model_id)
        check_model_fits_steps(model_row, spec)
    for other in spec.other_model_ids:
        try:
            get_model(session, tenant_id, other)
        except NotFound:
            raise NotFound(f"other_model {other!r} (analyze angles) not found: give the id of "
                           "one of your models (POST /v1/models, or a job's result.model_id)") \
                from None
    check_dataset_ref(session, tenant_id, spec.dataset)
    if check_inputs:
        check_job_inputs(session, tenant_id, spec, model_row)
    document = spec_document(spec)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, document), False
    if settings is not None:
        check_job_quota(session, tenant_id, spec, settings)
    kind = "auto" if any(step.op == "auto" for step in spec.steps) else "job"
    job = Job(tenant_id=tenant_id, status="queued", progress=0.0, stage="queued", spec=document,
              queue=spec.queue, idempotency_key=idempotency_key, cancel_requested=False,
              attempts=0, kind=kind)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # a concurrent request with the same Idempotency-Key won the race (nothing else is
        # pending in this session at this point, so rolling it all back is safe)
        session.rollback()
        existing = _by_idempotency_key(session, tenant_id, idempotency_key) \
            if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, document), False
    # a model or dataset deleted meanwhile is a 404 now, never a queued job naming it
    lock_job_inputs(session, tenant_id, spec)
    record_event(session, job.id, "status", {"status": "queued"})
    return job, True


def submit_job(session: Session, tenant_id: str, spec: JobSpec, idempotency_key: str | None,
               settings: Settings) -> tuple[Job, bool]:
    """`create_job` with every submission check, and a created job is sent to its queue
    after the caller commits."""
    job, created = create_job(session, tenant_id, spec, idempotency_key, settings,
                              check_inputs=True)
    if created:
        job_id, job_queue = job.id, job.queue
        after_commit(session, lambda: dispatch(job_id, job_queue, settings))
    return job, created


def dispatch(job_id: str, job_queue: str, settings: Settings) -> bool:
    """Send a committed queued job to the broker. When the broker refuses it the job stays
    queued and is marked never sent, so the reconciler sends it at its next pass (and if even
    that mark fails, once its dispatch grace has passed). True when sent."""
    try:
        queue.enqueue_job(job_id, job_queue, settings)
        return True
    except BrokerUnavailable as exc:
        log.warning("job %s is committed as queued but not sent (%s); the reconciler sends "
                    "it once the broker is back", job_id, exc.detail)
    try:
        with session_scope(settings) as session:
            mark_unsent(session, job_id)
    except Exception as err:  # noqa: BLE001 - the job is committed: the reconciler sends it
        log.warning("could not mark job %s unsent (%s); the reconciler sends it after the "
                    "dispatch grace", job_id, type(err).__name__)
    return False


def check_graph_known(session: Session, tenant_id: str, graph: str) -> None:
    """An imported graph's arch builds only from a graph the tenant uploaded (stored once per
    tenant, `service.model_registry.graph_key`): one of the tenant's models must be built on it
    (422 naming `model.arch.graph` otherwise)."""
    found = session.scalars(select(Model.id).where(
        Model.tenant_id == tenant_id, Model.arch["name"].as_string() == "graph",
        Model.arch["graph"].as_string() == graph).limit(1)).first()
    if found is None:
        raise InvalidSpec(f"model.arch.graph: none of your models is built on graph {graph}; "
                          "upload the model (.pt2 or .onnx, POST /v1/models) and use its id, or "
                          "the arch GET /v1/models/{id} shows for it")


def check_model_fits_steps(model: Model, spec: JobSpec) -> None:
    """A model whose arch has a dctps edit (any edit of a method that removes dense weights)
    has no dense weights: ops that need them are a 422 before anything is queued (the worker
    checks the same for models it builds)."""
    edits = (model.arch or {}).get("edits") or []
    weightless = dense_weightless_edit_ops()
    if not any(isinstance(e, dict) and e.get("op") in weightless for e in edits):
        return
    for i, step in enumerate(spec.steps):
        refusal = dense_weights_refusal(step.op, f"steps[{i}]",
                                        f"the DCTpS transform of model {model.id}")
        if refusal is not None:
            raise InvalidSpec(refusal)


def _by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id,
                                            Job.idempotency_key == key))


def _replay(existing: Job, document: dict[str, Any]) -> Job:
    if existing.spec != document:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different job "
                                  f"spec (job {existing.id}); use a new key for a new job")
    return existing


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id!r} not found")
    return job


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as exc:
        raise Unprocessable("cursor: not a cursor returned by GET /v1/jobs (pass next_cursor "
                            "as is)") from exc


def list_jobs(session: Session, tenant_id: str, *, status: str | None = None, limit: int = 20,
              cursor: str | None = None) -> tuple[list[Job], str | None]:
    """Newest first; keyset pagination on (created_at, id)."""
    if status is not None and status not in STATUSES:
        raise Unprocessable(f"status: must be one of {', '.join(STATUSES)}")
    # a search's trials are listed by GET /v1/jobs/{id}/trials, not here
    query = select(Job).where(Job.tenant_id == tenant_id, Job.parent_id.is_(None))
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created,
                                and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def cancel_job(session: Session, tenant_id: str, job_id: str, settings: Settings) -> Job:
    """Cancel a queued job now (its message is revoked after the commit), a running one
    cooperatively (the worker checks `cancel_requested`).

    One true answer under races: `cancel_requested` is set by a compare-and-set on the status
    (queued or running), which waits for the worker's final transaction when one holds the row
    (PostgreSQL row lock, SQLite write lock); that transaction in turn only marks the job
    succeeded while no cancel was requested. So a 202 for a running job means it ends
    `canceled`, and a job that finished first gets 409."""
    job = get_job(session, tenant_id, job_id)
    if job.status in TERMINAL:
        raise JobNotCancelable(f"job {job.id} is already {job.status}; only queued or running "
                               "jobs can be canceled")
    won = rows_changed(session, update(Job)
                       .where(Job.id == job.id, Job.status.in_((QUEUED, RUNNING)))
                       .values(cancel_requested=True))
    session.refresh(job)
    if not won:
        raise JobNotCancelable(f"job {job.id} is already {job.status}; only queued or running "
                               "jobs can be canceled")
    if request_cancel(job):
        canceled = job.id
        after_commit(session, lambda: queue.revoke(canceled, settings))
    if job.kind == "auto":  # a search: its trials are canceled with it
        from service.search import cancel_trials, request_tick

        cancel_trials(session, job.id)
        if job.status == RUNNING:  # the coordinator marks it canceled once its trials stopped
            request_tick(session, job.id, job.queue, settings)
    record_event(session, job.id, "cancel_requested", {"status": job.status})
    session.flush()
    return job


def mark_unsent(session: Session, job_id: str) -> None:
    """The broker refused the job after its row was committed: it stays queued, and the
    reconciler sends it at its next pass (dispatched_at NULL = never sent)."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED)
                    .values(dispatched_at=None).execution_options(synchronize_session=False))


def job_document(job: Job) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} returns it."""
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    error = ({"code": job.error_code, "message": job.error_message or ""}
             if job.error_code else None)
    return {"id": job.id, "status": job.status, "progress": job.progress, "stage": job.stage,
            "eta_s": eta_seconds(job), "spec": job.spec, "error": error, "result": job.result,
            "created_at": iso(job.created_at), "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at), "attempts": job.attempts or 0,
            "kind": job.kind or "job", "parent_id": job.parent_id}
