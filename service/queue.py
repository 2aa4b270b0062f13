"""The queue client: enqueue a job id by task name (the API never imports the worker)."""
from __future__ import annotations

import logging
import os
import threading
import uuid

from celery import Celery

from service.celery_config import TASK_NAME, TICK_TASK_NAME, celery_config
from service.errors import BrokerUnavailable
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)
_lock = threading.Lock()
_clients: dict[tuple[str, str], Celery] = {}


def celery_client(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    key = (settings.broker_url, str(settings.home))
    with _lock:
        if key not in _clients:
            client = Celery("slimline-client", set_as_current=False)
            client.conf.update(celery_config(settings))
            _clients[key] = client
        return _clients[key]


def enqueue_job(job_id: str, queue: str, settings: Settings | None = None) -> None:
    """Send `slimline.run_job(job_id)` to `queue`; the Celery task id is the job id."""
    try:
        celery_client(settings).send_task(TASK_NAME, args=[job_id], queue=queue, task_id=job_id,
                                          retry=True, retry_policy={"max_retries": 2,
                                                                    "interval_start": 0.2,
                                                                    "interval_step": 0.5})
    except Exception as exc:  # kombu raises many kinds of connection errors
        raise BrokerUnavailable(f"could not reach the broker to queue job {job_id}: {exc}") \
            from exc


def enqueue_tick(job_id: str, queue: str, settings: Settings | None = None) -> None:
    """Send `slimline.auto_tick(job_id)` (a search's coordinator) to `queue`. Ticks are
    idempotent; each message has its own task id."""
    try:
        celery_client(settings).send_task(TICK_TASK_NAME, args=[job_id], queue=queue,
                                          task_id=f"tick-{job_id}-{uuid.uuid4().hex[:12]}",
                                          retry=True, retry_policy={"max_retries": 2,
                                                                    "interval_start": 0.2,
                                                                    "interval_step": 0.5})
    except Exception as exc:  # kombu raises many kinds of connection errors
        raise BrokerUnavailable(f"could not reach the broker to run search {job_id}: {exc}") \
            from exc


def revoke(job_id: str, settings: Settings | None = None) -> None:
    """Best effort: a revoked task is dropped by workers that receive it (the task also re-reads
    the job row and does nothing for a terminal job)."""
    try:
        celery_client(settings).control.revoke(job_id)
    except Exception as exc:  # noqa: BLE001 - revoke is an optimisation; the row is the truth
        log.warning("could not revoke job %s: %s", job_id, exc)


def broker_ping(settings: Settings | None = None, timeout: float = 3.0) -> None:
    """Raise if the broker cannot be reached."""
    settings = settings or get_settings()
    if settings.uses_filesystem_broker:
        options = celery_config(settings)["broker_transport_options"]
        for name in ("data_folder_in", "data_folder_out", "control_folder"):
            folder = options[name]
            if not os.access(folder, os.W_OK):
                raise BrokerUnavailable(f"broker folder {folder} is not writable")
        return
    with celery_client(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
