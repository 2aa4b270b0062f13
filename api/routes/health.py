"""Liveness, readiness (DB, broker, store) and Prometheus metrics."""
from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from jobs.db import engine_from_settings
from jobs.queue import broker_ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


def _check(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports every failure as text
        return f"error: {type(exc).__name__}: {exc}"[:300]


@router.get("/readyz")
async def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """The database, the broker and the object store are reachable."""
    def db() -> None:
        with engine_from_settings(settings).connect() as conn:
            conn.execute(text("SELECT 1"))

    checks = {"database": await run_in_threadpool(_check, db),
              "broker": await run_in_threadpool(_check, lambda: broker_ping(settings)),
              "store": await run_in_threadpool(_check, store.ping)}
    failing = [name for name, state in checks.items() if state != "ok"]
    if failing:
        return JSONResponse({"error": "NotReady", "detail": f"not reachable: {', '.join(failing)}",
                             "checks": checks}, status_code=503)
    return JSONResponse({"status": "ok", "checks": checks})


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
