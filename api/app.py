"""The FastAPI application: `create_app(settings)`; `uvicorn api.app:app` uses the environment."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.errors import install_error_handlers
from api.metrics import Metrics, MetricsMiddleware
from api.routes import artifacts, datasets, health, jobs, models
from jobs.db import session_scope
from jobs.settings import Settings, get_settings
from jobs.states import reap_stale_jobs
from jobs.store import store_from_settings

log = logging.getLogger(__name__)


def _reap(settings: Settings) -> None:
    with session_scope(settings) as session:
        reaped = reap_stale_jobs(session, settings.job_heartbeat_timeout_s)
    if reaped:
        log.warning("marked %d stale running jobs failed (WorkerLost): %s", len(reaped), reaped)


async def _reaper_loop(settings: Settings) -> None:
    """A safety net for workers that died mid-job (the worker may run its own reaper too)."""
    interval = min(60.0, settings.job_heartbeat_timeout_s / 2)
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(_reap, settings)
        except Exception:  # keep reaping; the next round may succeed
            log.warning("stale-job reaper failed", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_reaper_loop(settings))
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="slimline", version="1", lifespan=lifespan,
                  description="Compress PyTorch models: upload, submit a job, download.")
    app.state.settings = settings
    app.state.store = store_from_settings(settings)
    app.state.metrics = Metrics(settings)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    for module in (health, models, datasets, jobs, artifacts):
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.app:app` builds the app from the environment on first access only, so that
    # importing this module (tests, create_app) never reads settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
