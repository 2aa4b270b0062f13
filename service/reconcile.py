"""The reconciler: PostgreSQL is the source of truth for what must run. It is the service's one
reaper: nothing else recovers the jobs of lost workers.

One pass (`reconcile_once`), run every `reconcile_interval_s` by every worker and API process
(passes are idempotent and cheap; rows are locked with SKIP LOCKED where the database can):

1. **Lost workers.** A running job whose heartbeat is older than `job_heartbeat_timeout_s` is
   re-queued (attempts left: it resumes from its last checkpoint) or failed (`WorkerLost`,
   after `job_max_attempts` runs).
2. **Lost messages.** A queued job is (re-)sent to the broker when it was never sent
   (`dispatched_at` NULL: just re-queued, or the API could not reach the broker) or when its
   last send is older than `dispatch_grace_s * 2**(dispatch_count - 1)` (capped at 64x): the
   broker may have lost it (Redis restarted without persistence, a message acked by a worker
   that then could not claim it). A duplicate message is harmless — the worker's claim is a
   compare-and-set on (status, attempts), so a second delivery finds the job running or done
   and drops it — and the doubling bounds how many duplicates a long queue accumulates.
3. **Idle searches.** A running auto-compress search (`service.search`) whose coordinator has
   not run for `search_tick_s` gets a coordinator message: it normally runs whenever a trial
   ends, and this covers a message the broker lost or a worker that died mid-tick. Its trials
   are ordinary jobs, recovered by steps 1 and 2.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service import queue
from service.db import session_scope
from service.dbretry import is_unavailable
from service.errors import BrokerUnavailable
from service.orm import Job, utcnow
from service.search import send_tick, stalled_searches
from service.settings import Settings
from service.states import QUEUED, RUNNING, mark_failed, requeue

log = logging.getLogger(__name__)
MAX_BACKOFF_EXPONENT = 6
BATCH = 200


@dataclass
class Pass:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    ticked: list[str] = field(default_factory=list)  # searches whose coordinator was sent


def reap_lost_workers(session: Session, timeout_s: float, max_attempts: int
                      ) -> tuple[list[str], list[str]]:
    """Running jobs whose worker stopped heart-beating for `timeout_s` seconds: re-queued while
    they have attempts left, else failed. Returns (requeued ids, failed ids); the caller
    commits."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.scalars(
        # a search's coordinator holds no worker (it is not heart-beaten while its trials run);
        # step 3 runs it instead
        select(Job).where(Job.status == RUNNING, Job.heartbeat_at < cutoff, Job.kind != "auto")
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


def _due(settings: Settings) -> list[tuple[str, str, int]]:
    """(id, queue, dispatch_count) of queued jobs whose message should be (re-)sent now."""
    now = utcnow()
    grace = settings.dispatch_grace_s
    with session_scope(settings) as session:
        rows = session.execute(
            select(Job.id, Job.queue, Job.dispatch_count, Job.dispatched_at)
            .where(Job.status == QUEUED,
                   or_(Job.dispatched_at.is_(None),
                       Job.dispatched_at < now - timedelta(seconds=grace)))
            .order_by(Job.created_at).limit(BATCH)).all()
    due = []
    for job_id, job_queue, count, sent_at in rows:
        wait = grace * 2 ** min(max((count or 0) - 1, 0), MAX_BACKOFF_EXPONENT)
        if sent_at is None or sent_at < now - timedelta(seconds=wait):
            due.append((job_id, job_queue, count or 0))
    return due


def reconcile_once(settings: Settings, *, recover: bool = True) -> Pass:
    """One reconciler pass (see the module docstring); `recover=False` skips step 1."""
    result = Pass()
    if recover:
        with session_scope(settings) as session:
            result.requeued, result.failed = reap_lost_workers(
                session, settings.job_heartbeat_timeout_s, settings.job_max_attempts)
    for job_id in result.requeued:
        log.warning("job %s: its worker was lost; re-queued to resume from its checkpoint",
                    job_id)
    for job_id in result.failed:
        log.warning("job %s: its worker was lost in every attempt; marked failed", job_id)
    for job_id, job_queue, count in _due(settings):
        try:
            queue.enqueue_job(job_id, job_queue, settings)
        except BrokerUnavailable as exc:
            log.warning("reconciler: %s; retrying next pass", exc.detail)
            break
        with session_scope(settings) as session:
            # only while still queued; a worker may have claimed it meanwhile
            session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED)
                            .values(dispatched_at=utcnow(), dispatch_count=count + 1)
                            .execution_options(synchronize_session=False))
        result.sent.append(job_id)
    if result.sent:
        log.info("reconciler: sent %d queued job(s) whose message may be lost: %s",
                 len(result.sent), result.sent[:10])
    with session_scope(settings) as session:
        stalled = stalled_searches(session, settings.search_tick_s)
    for job_id, job_queue in stalled:
        if not send_tick(job_id, job_queue, settings):
            break
        result.ticked.append(job_id)
    return result


class Reconciler:
    """`reconcile_once` with memory of database outages: while the database was unreachable no
    worker could heartbeat, so stale heartbeats only mean a lost worker once this process has
    reached the database continuously for a whole heartbeat timeout again."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reachable_since: float | None = time.monotonic()

    def run_pass(self) -> Pass:
        now = time.monotonic()
        if self.reachable_since is None:
            self.reachable_since = now
        recover = now - self.reachable_since >= self.settings.job_heartbeat_timeout_s
        try:
            return reconcile_once(self.settings, recover=recover)
        except Exception as exc:
            if is_unavailable(exc):
                self.reachable_since = None
            raise


def start_reconciler(settings: Settings, name: str = "slimline-reconciler",
                     also: Callable[[], object] | None = None) -> threading.Event:
    """Run `Reconciler.run_pass` (then `also()`, e.g. a temp-file sweep) every
    `reconcile_interval_s` in a daemon thread; set the returned event to stop it. Errors
    (database or broker down) are logged and retried."""
    stop = threading.Event()
    reconciler = Reconciler(settings)

    def loop() -> None:
        while not stop.wait(settings.reconcile_interval_s):
            try:
                reconciler.run_pass()
                if also is not None:
                    also()
            except Exception as exc:  # noqa: BLE001 - the database may be briefly unreachable
                log.warning("reconciler pass failed: %s: %s", type(exc).__name__,
                            (str(exc).splitlines() or [""])[0][:200])

    threading.Thread(target=loop, name=name, daemon=True).start()
    return stop
