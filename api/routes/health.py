"""Liveness, readiness (DB, broker, store) and Prometheus metrics."""
from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep, tenant_of_key
from api.metrics import tenant_registry
from api.openapi import NOT_READY_REF
from service.db import engine_from_settings
from service.errors import Unauthorized
from service.queue import broker_ping
from service.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


def _check(fn: Callable[[], object]) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports every failure
        return f"error: {type(exc).__name__}: {exc}"[:300]


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def is_operator(request: Request, settings: Settings) -> bool:
    """The caller sent the operator token (SLIMLINE_METRICS_TOKEN), or auth is off (then every
    caller is the operator)."""
    if settings.auth == "off":
        return True
    token = bearer_token(request)
    secret = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if not token or not secret:
        return False
    return hmac.compare_digest(token.encode(), secret.encode())


@router.get("/readyz", responses={503: {
    "description": "Not ready: `checks` names the unreachable dependencies.",
    "content": {"application/json": {"schema": {"$ref": NOT_READY_REF}}}}})
async def readyz(request: Request, settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """The database, the broker and the object store are reachable (200, else 503 naming the
    failing ones). The errors' text is shown to the operator token only."""
    def db() -> None:
        with engine_from_settings(settings).connect() as conn:
            conn.execute(text("SELECT 1"))

    checks = {"database": await run_in_threadpool(_check, db),
              "broker": await run_in_threadpool(_check, lambda: broker_ping(settings)),
              "store": await run_in_threadpool(_check, store.ping)}
    failing = [name for name, state in checks.items() if state != "ok"]
    if not is_operator(request, settings):
        checks = {name: "ok" if state == "ok" else "error" for name, state in checks.items()}
    if failing:
        return JSONResponse({"error": "NotReady", "detail": f"not reachable: {', '.join(failing)}",
                             "checks": checks}, status_code=503)
    return JSONResponse({"status": "ok", "checks": checks})


@router.get("/metrics", openapi_extra={"security": [{"bearerAuth": []}, {}]},
            responses={401: {"description": "Auth is on and no bearer token was sent."}})
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus metrics: everything for the operator token (`Authorization: Bearer
    <SLIMLINE_METRICS_TOKEN>`), only its own `slimline_jobs` for a tenant's API key."""
    if is_operator(request, settings):
        registry = request.app.state.metrics.registry
    else:
        key = bearer_token(request)
        if key is None:
            raise Unauthorized("/metrics needs `Authorization: Bearer <token>`: an API key (your "
                               "own jobs by status) or the operator token "
                               "(SLIMLINE_METRICS_TOKEN, everything)")
        registry = tenant_registry(settings, tenant_of_key(settings, key))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
