"""The FastAPI application: `create_app(settings)`; `uvicorn api.app:app` uses the environment."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.errors import install_error_handlers
from api.limits import install_limits, size_thread_pool
from api.metrics import Metrics, MetricsMiddleware
from api.openapi import install_docs
from api.routes import artifacts, datasets, health, jobs, models, reports
from api.ui import install as install_ui
from api.uploads import sweep_temp_loop, sweep_temp_once
from service.reconcile import Reconciler
from service.settings import Settings, get_settings
from service.store import store_from_settings

log = logging.getLogger(__name__)


async def _reconciler_loop(settings: Settings) -> None:
    """Re-queue jobs of lost workers and re-send queued jobs whose message may be lost
    (`service.reconcile`; every worker runs the same pass, so this is a safety net when no worker
    is up)."""
    reconciler = Reconciler(settings)
    while True:
        await asyncio.sleep(settings.reconcile_interval_s)
        try:
            await run_in_threadpool(reconciler.run_pass)
        except Exception as exc:  # noqa: BLE001 - the database or broker may be down; retried
            log.warning("reconciler pass failed: %s", type(exc).__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        size_thread_pool(settings)  # before any request: see api/limits.py
        await sweep_temp_once(settings)  # temp files of killed processes (api/uploads.py)
        sweeper = asyncio.create_task(sweep_temp_loop(settings))
        task = asyncio.create_task(_reconciler_loop(settings))
        try:
            yield
        finally:
            task.cancel()
            sweeper.cancel()

    app = FastAPI(title="slimline", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Compress PyTorch models: upload, submit a job, download.")
    app.state.settings = settings
    app.state.store = store_from_settings(settings)
    app.state.metrics = Metrics(settings)
    install_limits(app, settings)  # load shedding, the JSON body limit
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost
    install_error_handlers(app)
    for module in (health, models, datasets, jobs, artifacts, reports):
        app.include_router(module.router)
    install_ui(app)  # the dashboard at /ui (api/ui)
    install_docs(app)  # /docs, /redoc and the refined OpenAPI document
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.app:app` builds the app from the environment on first access only, so that
    # importing this module (tests, create_app) never reads settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)
