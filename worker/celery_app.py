"""The worker's Celery app: `celery -A worker.celery_app worker -Q cpu,gpu`.

Configuration is shared with the API's queue client (`service.celery_config`): acks_late,
prefetch 1, queues `cpu` and `gpu`, reject on worker lost; the filesystem transport for the
embedded default. Every worker runs the reconciler (`service.reconcile`) and pins torch to its
share of the CPUs.
"""
from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready

from service.celery_config import celery_config
from service.settings import get_settings

app = Celery("slimline")
app.conf.update(celery_config(get_settings()))
app.conf.update(include=["worker.tasks"], worker_redirect_stdouts=False)


@worker_init.connect
def _remember_concurrency(sender: object = None, **_kwargs: object) -> None:
    """Pool processes (forked after this) read how many jobs share this worker's CPUs."""
    concurrency = getattr(sender, "concurrency", None)
    solo = "solo" in str(getattr(sender, "pool_cls", "")).lower()
    os.environ["SLIMLINE_WORKER_JOBS"] = "1" if solo or not concurrency else str(concurrency)


def torch_threads(settings_threads: int | None, jobs: int) -> int:
    """Threads for one job: `SLIMLINE_WORKER_THREADS`, else this process's CPUs shared by the
    `jobs` that run at once (two workers on two cores each using both cores get 0.3-0.5x of
    one worker's throughput; one thread each gives 1.05-1.2x)."""
    if settings_threads:
        return settings_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, jobs))


@worker_process_init.connect
def _init_process(**_kwargs: object) -> None:
    """A forked pool process must not share the parent's database connections; torch gets its
    share of the CPUs."""
    import torch

    from service.db import dispose_engines

    dispose_engines()
    threads = torch_threads(get_settings().worker_threads,
                            int(os.environ.get("SLIMLINE_WORKER_JOBS", "1")))
    torch.set_num_threads(threads)
    logging.getLogger("worker").info("torch uses %d thread(s) per job", threads)


logging.getLogger("worker").setLevel(logging.INFO)


@worker_ready.connect
def _start_reconciler(**_kwargs: object) -> None:
    """Every worker re-queues jobs of lost workers and re-sends queued jobs whose message may be
    lost (service.reconcile)."""
    from service.reconcile import start_reconciler
    from service.tmpfiles import sweep
    from worker.runner import work_root

    settings = get_settings()

    def sweep_work() -> None:
        removed = sweep(work_root(settings), settings.temp_max_age_s)
        if removed:
            logging.getLogger("worker").warning(
                "removed %d temp dir(s) of dead workers: %s", len(removed), removed[:5])

    sweep_work()  # at start-up, then with every reconciler pass
    start_reconciler(settings, also=sweep_work)
