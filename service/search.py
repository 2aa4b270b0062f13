"""Auto-compress searches as the service sees them (torch-free): a search is a job of kind
`auto` whose trials are child jobs (`jobs.parent_id`), each an ordinary job any worker runs —
claimed, heart-beaten, checkpointed, re-queued when its worker is lost, exactly like a job a user
submitted. The coordinator (`worker.auto_search.tick`) holds no worker slot: it runs for a
moment whenever a trial ends (the runner runs it right there), when the search is submitted or
canceled, and when the reconciler finds it idle for `search_tick_s` (`stalled_searches`).

Here: creating trial rows, canceling a search with its trials, the trials as the API lists them
(`GET /v1/jobs/{id}/trials`), and the queue message that runs the coordinator.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import queue
from service.db import after_commit, rows_changed
from service.events import record_event
from service.orm import Job, utcnow
from service.settings import Settings
from service.states import QUEUED, RUNNING, mark_canceled
from service.submission import dispatch

log = logging.getLogger(__name__)

AUTO = "auto"
# a trial's phase: the starting model measured once, candidates scored right after the cut,
# the promising ones fine-tuned, the winner fine-tuned further
BASELINE, SCREEN, FINETUNE, FINAL = "baseline", "screen", "finetune", "final"
TRIAL_KINDS = (BASELINE, SCREEN, FINETUNE, FINAL)
# trials whose model is not kept (their result is all the search needs)
MODELLESS_KINDS = (BASELINE, SCREEN)
# trials measured only after their last step (the baseline trial measured the starting model)
LEAN_KINDS = (SCREEN, FINETUNE, FINAL)


def add_trial(session: Session, parent: Job, kind: str, spec: dict[str, Any],
              search: dict[str, Any], settings: Settings) -> Job:
    """Insert a queued child job of `parent` (same tenant and queue); it is sent to the broker
    after the caller commits (the reconciler re-sends it if that fails)."""
    if kind not in TRIAL_KINDS:
        raise ValueError(f"unknown trial kind {kind!r}")
    child = Job(tenant_id=parent.tenant_id, status=QUEUED, progress=0.0, stage="queued",
                spec=spec, queue=parent.queue, cancel_requested=False, attempts=0,
                parent_id=parent.id, kind=kind, search=search)
    session.add(child)
    session.flush()
    record_event(session, child.id, "status", {"status": QUEUED, "parent_id": parent.id})
    child_id, child_queue = child.id, child.queue
    # the same send-or-mark-unsent path as a job a user submitted
    after_commit(session, lambda: dispatch(child_id, child_queue, settings))
    return child


def cancel_trials(session: Session, parent_id: str) -> list[str]:
    """Cancel every unfinished trial of a search: a queued one now (its message is revoked after
    the commit), a running one cooperatively. Returns the ids of the queued ones canceled."""
    rows_changed(session, update(Job).where(Job.parent_id == parent_id,
                                            Job.status.in_((QUEUED, RUNNING)))
                 .values(cancel_requested=True))
    queued = list(session.scalars(select(Job).where(Job.parent_id == parent_id,
                                                    Job.status == QUEUED)
                                  .execution_options(populate_existing=True)))
    for child in queued:
        mark_canceled(child)
    ids = [c.id for c in queued]
    if ids:
        def revoke_all() -> None:
            for job_id in ids:
                queue.revoke(job_id)

        after_commit(session, revoke_all)
    session.flush()
    return ids


def request_tick(session: Session, job_id: str, job_queue: str, settings: Settings) -> None:
    """Run the search's coordinator once the caller commits (best effort: the reconciler runs an
    idle search's coordinator every `search_tick_s` anyway)."""
    after_commit(session, lambda: send_tick(job_id, job_queue, settings))


def send_tick(job_id: str, job_queue: str, settings: Settings | None = None) -> bool:
    try:
        queue.enqueue_tick(job_id, job_queue, settings)
        return True
    except Exception as exc:  # noqa: BLE001 - the reconciler ticks idle searches
        log.warning("could not send the coordinator of search %s: %s", job_id, exc)
        return False


def stalled_searches(session: Session, idle_s: float, limit: int = 200
                     ) -> list[tuple[str, str]]:
    """(id, queue) of running searches whose coordinator has not run for `idle_s` seconds."""
    cutoff = utcnow() - timedelta(seconds=idle_s)
    return [(job_id, job_queue) for job_id, job_queue in session.execute(
        select(Job.id, Job.queue).where(Job.kind == AUTO, Job.status == RUNNING,
                                        Job.heartbeat_at < cutoff).limit(limit))]


# ---- the API's view -------------------------------------------------------------------------

def trial_document(child: Job) -> dict[str, Any]:
    """One trial as `GET /v1/jobs/{id}/trials` lists it."""
    search = child.search or {}
    result = child.result or {}
    measured: dict[str, Any] = next((s for s in reversed(result.get("steps") or [])
                     if s.get("op") == "measure"), {})
    document = {"id": child.id, "trial": search.get("trial"), "phase": child.kind,
                "status": child.status, "progress": child.progress, "stage": child.stage,
                "method": search.get("method"), "params": search.get("params"),
                "targets": search.get("targets"), "from_trial": search.get("from_trial"),
                "cost": (measured.get("cost") or {}).get(search.get("budget_kind", "")),
                "costs": measured.get("cost"), "val_accuracy": measured.get("val_accuracy"),
                "accuracy": (result.get("after") or {}).get("accuracy"),
                "within_budget": search.get("within_budget"),
                "wall_s": search.get("wall_s"), "machine": measured.get("machine"),
                "model_id": result.get("model_id"), "attempts": child.attempts or 0,
                "error": ({"code": child.error_code, "message": child.error_message or ""}
                          if child.error_code else None)}
    return document


def list_trials(session: Session, parent: Job) -> list[dict[str, Any]]:
    """Every trial of a search, in creation order."""
    children = session.scalars(select(Job).where(Job.parent_id == parent.id)
                               .order_by(Job.created_at, Job.id))
    return [trial_document(c) for c in children]
