"""The worker's Celery app: `celery -A worker.celery_app worker -Q cpu,gpu`.

Configuration is shared with the API's queue client (`jobs.celery_config`): acks_late, prefetch 1,
queues `cpu` and `gpu`, reject on worker lost; the filesystem transport for the embedded default.
"""
from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from jobs.celery_config import celery_config
from jobs.settings import get_settings

app = Celery("slimline")
app.conf.update(celery_config(get_settings()))
app.conf.update(include=["worker.tasks"], worker_redirect_stdouts=False)


@worker_process_init.connect
def _fresh_connections(**_kwargs: object) -> None:
    """A forked pool process must not share the parent's database connections."""
    from jobs.db import dispose_engines

    dispose_engines()


logging.getLogger("worker").setLevel(logging.INFO)


@worker_ready.connect
def _start_reconciler(**_kwargs: object) -> None:
    """Every worker re-queues jobs of lost workers and re-sends queued jobs whose message may be
    lost (jobs.reconcile)."""
    from jobs.reconcile import start_reconciler

    start_reconciler(get_settings())
