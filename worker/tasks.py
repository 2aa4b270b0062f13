"""The Celery task: receives only a job id and hands it to the plain-Python runner, which
re-reads the row and does nothing for a terminal or already-running job (safe with acks_late)."""
from __future__ import annotations

from worker import runner
from worker.celery_app import app


@app.task(name="slimline.run_job", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str | None:
    """Run job `job_id`; returns its final status (None when there was nothing to do)."""
    return runner.run_job(str(job_id))
