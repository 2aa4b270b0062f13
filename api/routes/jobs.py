"""/v1/jobs: submit, read, list, cancel; events (SSE or JSON) and curves."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from api.deps import MAX_ID_CHARS, SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import is_database_down
from api.openapi import json_body
from service.curves import fold as fold_curves
from service.db import session_scope
from service.deletion import delete_job
from service.errors import JobNotSearch, QuotaExceeded, Unprocessable
from service.events import event_dict, list_events
from service.orm import Job
from service.search import list_trials
from service.settings import Settings
from service.spec import JOB_SPEC_EXAMPLES, JobSpec, control_character
from service.states import TERMINAL
from service.submission import (
    cancel_job,
    decode_cursor,
    get_job,
    job_document,
    list_jobs,
    submit_job,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
SSE_POLL_S = 0.5  # while events arrive (or arrived in the last SSE_IDLE_AFTER_S)
SSE_IDLE_POLL_S = 2.0
SSE_IDLE_AFTER_S = 30.0
SSE_KEEPALIVE_S = 15.0
SSE_MAX_S = 6 * 3600.0
EVENT_STREAMS_RETRY_S = 10.0
MAX_EVENT_ID = 2**63 - 1  # job_events.id is a BIGINT


@router.post("", status_code=202, openapi_extra=json_body(JobSpec, JOB_SPEC_EXAMPLES),
             responses={200: {"description": "The job an earlier request with the same "
                                             "Idempotency-Key made."},
                        400: {"description": "A malformed Idempotency-Key."},
                        404: {"description": "The model, dataset or other_model id is not "
                                             "one of yours."},
                        409: {"description": "The Idempotency-Key was used with another "
                                             "spec."},
                        429: {"description": "Too many queued or running jobs (quota)."}})
def submit(session: SessionDep, settings: SettingsDep, tenant_id: TenantDep,
           body: Annotated[dict[str, Any], Body()],
           idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    """Validate a JobSpec and queue the job (202 + Location); it is sent to a worker once the
    request's transaction has committed (a broker that is down leaves it to the reconciler)."""
    spec = JobSpec.model_validate(body, context={"max_epochs": settings.max_epochs})
    job, created = submit_job(session, tenant_id, spec, idempotency_key, settings)
    return JSONResponse(job_document(job), status_code=202 if created else 200,
                        headers={"Location": f"/v1/jobs/{job.id}"})


def _check_cursor(cursor: str) -> None:
    """A cursor whose content no row can match is a 422 (not a database error)."""
    created, job_id = decode_cursor(cursor)
    try:
        (created if created.tzinfo else created.replace(tzinfo=UTC)).astimezone(UTC)
    except (OverflowError, ValueError):
        raise Unprocessable("cursor: not a cursor returned by GET /v1/jobs (pass next_cursor "
                            "as is)") from None
    if len(job_id) > MAX_ID_CHARS or control_character(job_id) is not None:
        raise Unprocessable("cursor: not a cursor returned by GET /v1/jobs (pass next_cursor "
                            "as is)")


@router.get("")
def list_all(session: SessionDep, tenant_id: TenantDep, status: str | None = None,
             limit: Annotated[int, Query(ge=1, le=100)] = 20,
             cursor: str | None = None) -> dict:
    """This tenant's jobs, newest first: `{items, next_cursor}`."""
    if cursor:
        _check_cursor(cursor)
    jobs, next_cursor = list_jobs(session, tenant_id, status=status, limit=limit, cursor=cursor)
    return {"items": [job_document(j) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}")
def read(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """A job's status, progress, error and result."""
    return job_document(get_job(session, tenant_id, job_id))


@router.post("/{job_id}/cancel", status_code=202,
             responses={409: {"description": "The job has already finished."}})
def cancel(job_id: str, session: SessionDep, settings: SettingsDep,
           tenant_id: TenantDep) -> JSONResponse:
    """Cancel a queued job now, a running one cooperatively; 409 when already finished."""
    return JSONResponse(job_document(cancel_job(session, tenant_id, job_id, settings)),
                        status_code=202)


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={204: {"description": "Deleted, with its stored objects."},
                          409: {"description": "Queued or running (JobNotFinished: cancel it "
                                               "first), or a trial (JobIsTrial)."}})
def delete(job_id: str, session: SessionDep, store: StoreDep, tenant_id: TenantDep) -> Response:
    """Delete a finished job with its events, artifacts and (auto-compress) trials; the model
    it produced stays. 409 while it is queued or running: cancel it first."""
    delete_job(session, store, tenant_id, job_id)
    return Response(status_code=204)


# ---- events: server-sent events, async ----------------------------------------------------

class EventStreams:
    """Open SSE streams per tenant in this API process, capped at max_event_streams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open: dict[str, int] = {}

    def acquire(self, tenant_id: str, limit: int) -> Callable[[], None]:
        """Count one more stream of the tenant (429 past the limit); returns its release,
        which may be called any number of times."""
        with self._lock:
            count = self.open.get(tenant_id, 0)
            if count >= limit:
                raise QuotaExceeded(
                    f"you have {count} open event streams, the limit is {limit} per API process "
                    "(SLIMLINE_MAX_EVENT_STREAMS); close one, or poll "
                    "GET /v1/jobs/{id}/events?format=json&after=<last id> instead",
                    retry_after=EVENT_STREAMS_RETRY_S)
            self.open[tenant_id] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self.open.get(tenant_id, 1) - 1
                if left > 0:
                    self.open[tenant_id] = left
                else:
                    self.open.pop(tenant_id, None)

        return release


def event_streams(app: FastAPI) -> EventStreams:
    streams = getattr(app.state, "event_streams", None)
    if streams is None:
        with _streams_lock:
            streams = getattr(app.state, "event_streams", None)
            if streams is None:
                streams = app.state.event_streams = EventStreams()
    return streams


_streams_lock = threading.Lock()


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that releases its stream slot however it ends (finished, client
    gone, cancelled, failed)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _poll(settings: Settings, job_id: str, after_id: int
          ) -> tuple[list[tuple[int, str, str]], str]:
    """One short read (in a worker thread): new events as (id, kind, JSON) and the status."""
    with session_scope(settings) as session:
        events = [(e.id, e.kind, json.dumps(event_dict(e)))
                  for e in list_events(session, job_id, after_id)]
        job = session.get(Job, job_id)
        return events, (job.status if job else "failed")


async def sse_stream(request: Request, settings: Settings, job_id: str, after_id: int
                     ) -> AsyncIterator[str]:
    """Server-sent events until the job is terminal and every event has been sent, the client
    disconnects, or SSE_MAX_S. Holds no thread and no database connection between polls."""
    started = last_sent = last_event = time.monotonic()
    yield "retry: 2000\n\n"
    while time.monotonic() - started < SSE_MAX_S:
        if await request.is_disconnected():
            return
        try:
            events, status = await run_in_threadpool(_poll, settings, job_id, after_id)
        except Exception as exc:
            if not is_database_down(exc):
                raise
            log.info("event stream of job %s: database unreachable, retrying", job_id)
            events, status = [], ""
        for event_id, kind, data in events:
            after_id = event_id
            yield f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n"
        now = time.monotonic()
        if events:
            last_sent = last_event = now
            continue  # more may be waiting (a poll reads at most 1000)
        if status in TERMINAL:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if now - last_sent > SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = now
        await asyncio.sleep(SSE_POLL_S if now - last_event < SSE_IDLE_AFTER_S
                            else SSE_IDLE_POLL_S)


def _last_event_id(header: str | None) -> int:
    """The `Last-Event-ID` an SSE client sends back: ASCII digits (`"²".isdigit()` is true,
    so isdigit alone is not enough) within a BIGINT; anything else is ignored."""
    value = (header or "").strip()
    if value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= MAX_EVENT_ID:
        return int(value)
    return 0


def _json_events(session: Any, tenant_id: str, job_id: str, after: int) -> dict:
    get_job(session, tenant_id, job_id)
    return {"items": [event_dict(e) for e in list_events(session, job_id, after, 10_000)]}


@router.get("/{job_id}/events", response_model=None,
            responses={429: {"description": "Too many open event streams "
                                            "(SLIMLINE_MAX_EVENT_STREAMS)."}})
async def events(request: Request, job_id: str, session: SessionDep, settings: SettingsDep,
                 tenant_id: TenantDep, format: str | None = None,
                 last_event_id: Annotated[str | None, Header()] = None,
                 after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID)] = 0
                 ) -> dict | StreamingResponse:
    """Progress and per-epoch metrics: server-sent events, or `{items}` with `?format=json`.
    A stream counts against SLIMLINE_MAX_EVENT_STREAMS per tenant and API process."""
    after = max(after, _last_event_id(last_event_id))
    if format == "json":
        return await run_in_threadpool(_json_events, session, tenant_id, job_id, after)
    # the job is checked with the request's session, which is closed when this returns; the
    # stream reads in short sessions of its own
    await run_in_threadpool(get_job, session, tenant_id, job_id)
    release = event_streams(request.app).acquire(tenant_id, settings.max_event_streams)
    try:
        return EventStreamResponse(sse_stream(request, settings, job_id, after), release)
    except BaseException:
        release()
        raise


@router.get("/{job_id}/trials",
            responses={409: {"description": "The job is not an auto-compress job."}})
def trials(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """An auto-compress job's trials, live: phase, method and knobs, status and progress, and
    once finished the measured cost, validation and test accuracy and the machine
    (`{items, budget}`; 409 for a job that is not a search)."""
    job = get_job(session, tenant_id, job_id)
    if job.kind != "auto":
        raise JobNotSearch(f"job {job_id} is not an auto-compress job (its steps have no "
                           "'auto' step), so it has no trials")
    return {"items": list_trials(session, job), "budget": (job.search or {}).get("budget")}


@router.get("/{job_id}/curves")
def curves(job_id: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """Curves from the job's events (`service.curves.fold`, which also builds the worker's
    curves.json): training per epoch, effective dimensionality and spectra per layer, and each
    method's records (pcn transforms, pruning masks, low-rank cuts, DCTpS allocations, the
    analyze step's analyses per kind and layer)."""
    get_job(session, tenant_id, job_id)
    return fold_curves((event.kind, event.data or {})
                       for event in list_events(session, job_id, 0, 100_000))
