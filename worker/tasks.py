"""The Celery task: receives only a job id and hands it to the plain-Python runner, which
re-reads the row and does nothing for a terminal or already-running job (safe with acks_late).

A worker that cannot reach the database does not consume the queue: the runner waits for the
database (backoff, up to `db_outage_tolerance_s`) while holding this one message — prefetch is
1, so no other message is taken meanwhile — and then gives the message back to the broker
(`Reject(requeue=True)`) instead of acknowledging a job it never claimed. The reconciler re-sends
queued jobs whose message is lost anyway."""
from __future__ import annotations

import logging

from celery.exceptions import Reject

from service.celery_config import TICK_TASK_NAME
from service.dbretry import is_unavailable
from worker import runner
from worker.celery_app import app

log = logging.getLogger(__name__)


@app.task(name="slimline.run_job", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Run job `job_id`; returns its final status (None when there was nothing to do)."""
    try:
        return runner.run_job(str(job_id))
    except Exception as exc:
        if is_unavailable(exc):
            log.warning("job %s: the database is unreachable; giving the message back",
                        job_id)
            raise Reject(f"database unreachable: {type(exc).__name__}", requeue=True) from exc
        raise


@app.task(name=TICK_TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def auto_tick(job_id: str) -> str | None:
    """Run an auto-compress search's coordinator once (`worker.auto_search.tick`): a moment of
    bookkeeping, never waiting for its trials. Lost or failed ticks are re-sent by the
    reconciler (`service.reconcile`, idle searches)."""
    from worker.auto_search import tick

    try:
        return tick(str(job_id))
    except Exception as exc:
        if is_unavailable(exc):
            raise Reject(f"database unreachable: {type(exc).__name__}", requeue=True) from exc
        raise
