"""/v1/jobs: submit, read, list, cancel; events (SSE or JSON) and curves."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import SessionDep, SettingsDep, TenantDep
from jobs import queue
from jobs.db import session_scope
from jobs.errors import SlimlineError
from jobs.events import event_dict, list_events
from jobs.orm import Job
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.states import TERMINAL
from jobs.submission import (
    cancel_job,
    create_job,
    fail_unqueued,
    get_job,
    job_document,
    list_jobs,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
SSE_MAX_S = 6 * 3600.0


@router.post("", status_code=202)
def submit(session: SessionDep, settings: SettingsDep, tenant_id: TenantDep,
           body: Annotated[dict[str, Any], Body()],
           idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Validate a JobSpec, commit the job, then enqueue it (202 + Location)."""
    spec = JobSpec.model_validate(body, context={"max_epochs": settings.max_epochs})
    job, created = create_job(session, tenant_id, spec, idempotency_key)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if not created:
        return JSONResponse(job_document(job), status_code=200, headers=headers)
    session.commit()  # the row exists before any worker can receive its id
    try:
        queue.enqueue_job(job.id, job.queue, settings)
    except SlimlineError as exc:
        fail_unqueued(session, job, exc.detail)
        session.commit()
        raise
    return JSONResponse(job_document(job), status_code=202, headers=headers)


@router.get("")
def list_all(session: SessionDep, tenant_id: TenantDep, status: str | None = None,
             limit: Annotated[int, Query(ge=1, le=100)] = 20,
             cursor: str | None = None) -> dict:
    """This tenant's jobs, newest first: `{items, next_cursor}`."""
    jobs, next_cursor = list_jobs(session, tenant_id, status=status, limit=limit, cursor=cursor)
    return {"items": [job_document(j) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}")
def read(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """A job's status, progress, error and result."""
    return job_document(get_job(session, tenant_id, job_id))


@router.post("/{job_id}/cancel", status_code=202)
def cancel(job_id: str, session: SessionDep, settings: SettingsDep,
           tenant_id: TenantDep) -> JSONResponse:
    """Cancel a queued job now, a running one cooperatively; 409 when already finished."""
    job, revoke = cancel_job(session, tenant_id, job_id)
    session.commit()
    if revoke:
        queue.revoke(job.id, settings)
    return JSONResponse(job_document(job), status_code=202)


def _sse(settings: Settings, job_id: str, after_id: int) -> Iterator[str]:
    """Server-sent events until the job is terminal and every event has been sent."""
    started = last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while time.monotonic() - started < SSE_MAX_S:
        with session_scope(settings) as session:
            events = list_events(session, job_id, after_id)
            job = session.get(Job, job_id)
            status = job.status if job else "failed"
        for event in events:
            after_id = event.id
            yield (f"id: {event.id}\nevent: {event.kind}\n"
                   f"data: {json.dumps(event_dict(event))}\n\n")
            last_sent = time.monotonic()
        if not events and status in TERMINAL:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if not events:
            if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            time.sleep(SSE_POLL_S)


@router.get("/{job_id}/events", response_model=None)
def events(job_id: str, session: SessionDep, settings: SettingsDep, tenant_id: TenantDep,
           format: str | None = None,
           last_event_id: Annotated[str | None, Header()] = None,
           after: Annotated[int, Query(ge=0)] = 0) -> dict | StreamingResponse:
    """Progress and per-epoch metrics: server-sent events, or `{items}` with `?format=json`."""
    get_job(session, tenant_id, job_id)
    if last_event_id and last_event_id.strip().isdigit():
        after = max(after, int(last_event_id.strip()))
    if format == "json":
        return {"items": [event_dict(e) for e in list_events(session, job_id, after, 10_000)]}
    return StreamingResponse(_sse(settings, job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


TRAINING_KEYS = ("epoch", "global_epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                 "wall_s")
WHERE_KEYS = ("step", "epoch", "global_epoch")


@router.get("/{job_id}/curves")
def curves(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """Curves from the job's events: training per epoch, effective dimensionality and spectra
    per layer, pcn transforms, pruning masks, low-rank cuts, DCTpS allocations and the analyze
    step's analyses per kind and layer (the worker's curves.json has the same shape)."""
    get_job(session, tenant_id, job_id)
    training: list[dict[str, Any]] = []
    effective_dim: dict[str, list[dict[str, Any]]] = {}
    spectra: dict[str, list[dict[str, Any]]] = {}
    transforms: list[dict[str, Any]] = []
    pruning: list[dict[str, Any]] = []
    lowrank: list[dict[str, Any]] = []
    dctps: list[dict[str, Any]] = []
    analysis: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for event in list_events(session, job_id, 0, 100_000):
        data = event.data or {}
        if event.kind == "epoch":
            training.append({"step": data.get("step")} | {k: data.get(k) for k in TRAINING_KEYS})
        elif event.kind == "effective_dim":
            where = {k: data.get(k) for k in WHERE_KEYS}
            for name, layer in (data.get("layers") or {}).items():
                effective_dim.setdefault(name, []).append(where | {
                    "in_dim": layer.get("in_dim"), "effective_dim": layer.get("effective_dim"),
                    "accuracy": data.get("accuracy"), "val_accuracy": data.get("val_accuracy")})
                spectra.setdefault(name, []).append(where | {
                    "source": "effective_dim", "in_dim": layer.get("in_dim"),
                    "eigvals": layer.get("eigvals")})
        elif event.kind == "spectrum":
            spectra.setdefault(str(data.get("layer")), []).append(
                {k: v for k, v in data.items() if k != "layer"} | {"epoch": data.get("epoch")})
        elif event.kind == "pcn":
            transforms.append(data)
        elif event.kind == "pruning":
            pruning.append(data)
        elif event.kind == "lowrank":
            lowrank.append(data)
        elif event.kind == "dctps":
            dctps.append(data)
        elif event.kind == "analysis":
            where = {"step": data.get("step"), "global_epoch": data.get("global_epoch")}
            kind = analysis.setdefault(str(data.get("kind")), {})
            for name, layer in (data.get("layers") or {}).items():
                kind.setdefault(name, []).append(where | layer)
    return {"training": training, "effective_dim": effective_dim, "spectra": spectra,
            "transforms": transforms, "pruning": pruning, "lowrank": lowrank, "dctps": dctps,
            "analysis": analysis}
