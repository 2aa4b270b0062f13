"""The reaper: a daemon thread in every worker that fails jobs whose heartbeat went stale (their
worker crashed or was killed), so no job stays `running` forever. Idempotent across workers
(`jobs.states.reap_stale_jobs` locks rows with SKIP LOCKED)."""
from __future__ import annotations

import logging
import threading

from jobs.db import session_scope
from jobs.settings import Settings
from jobs.states import reap_stale_jobs

log = logging.getLogger(__name__)


def reap_once(settings: Settings) -> list[str]:
    with session_scope(settings) as session:
        reaped = reap_stale_jobs(session, settings.job_heartbeat_timeout_s)
    for job_id in reaped:
        log.warning("job %s: heartbeat stale for %.0f s; marked failed (WorkerLost)",
                    job_id, settings.job_heartbeat_timeout_s)
    return reaped


def start_reaper(settings: Settings) -> threading.Event:
    """Reap every half heartbeat timeout (at most once a minute); set the event to stop."""
    stop = threading.Event()
    period = min(60.0, settings.job_heartbeat_timeout_s / 2)

    def loop() -> None:
        while not stop.wait(period):
            try:
                reap_once(settings)
            except Exception:  # the database may be briefly unreachable; try next period
                log.warning("reaper pass failed", exc_info=True)

    threading.Thread(target=loop, name="slimline-reaper", daemon=True).start()
    return stop
