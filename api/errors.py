"""The one place errors become JSON: `{"error": <CodeName>, "detail": <message>}`."""
from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException

from service.dbretry import UNAVAILABLE, is_unavailable
from service.errors import DatabaseUnavailable, SlimlineError, Unprocessable
from service.spec import AVAILABLE_OPS

log = logging.getLogger(__name__)

DB_RETRY_AFTER_S = 2.0
DB_DOWN_DETAIL = "the database is unreachable; retry shortly"

# errors that mean "the database cannot be reached now" (and not "this request is wrong"):
# SQLAlchemy's wrappers of the driver's connection errors, the pool's checkout timeout
# (service.dbretry), and the driver's own classes where one escapes unwrapped
_DB_DOWN: tuple[type[Exception], ...] = UNAVAILABLE
# a value the database refuses (PostgreSQL: a NUL byte in text, a number out of range)
_DB_BAD_VALUE: tuple[type[Exception], ...] = (sa_exc.DataError,)
try:
    import psycopg

    _DB_DOWN += (psycopg.OperationalError, psycopg.InterfaceError)
    _DB_BAD_VALUE += (psycopg.DataError,)
except ImportError:  # pragma: no cover - SQLite-only installs
    pass


def is_database_down(exc: BaseException) -> bool:
    """True for an error that says the database is unreachable (503, retry), not a bad query."""
    return is_unavailable(exc) or isinstance(exc, _DB_DOWN)


def database_unavailable() -> DatabaseUnavailable:
    return DatabaseUnavailable(DB_DOWN_DETAIL, retry_after=DB_RETRY_AFTER_S)


def error_response(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if len(parts) > 1 else parts
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and isinstance(parts[i - 1], int) and part in AVAILABLE_OPS:
            continue  # the discriminated-union tag (steps[0].train.epochs → steps[0].epochs)
        else:
            out += f".{part}" if out else str(part)
    return out or "request"


def validation_detail(errors: Iterable[Mapping[str, Any]]) -> str:
    messages = []
    for err in errors:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not allowed here)"
        loc = tuple(err.get("loc", ()))
        # a spec-wide check names the field in its message (`model: contains ...`)
        messages.append(f"{_path(loc)}: {msg}" if loc and loc != ("body",) else msg)
    return "; ".join(messages)


async def slimline_error(_: Request, exc: SlimlineError) -> JSONResponse:
    response = error_response(exc.status, exc.code, exc.detail)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


async def request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "ValidationError", validation_detail(exc.errors()))


async def pydantic_validation_error(_: Request, exc: ValidationError) -> JSONResponse:
    return error_response(422, "ValidationError", validation_detail(exc.errors()))


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = HTTPStatus(exc.status_code).phrase.replace(" ", "").replace("-", "")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """Database errors: unreachable → 503 + Retry-After; a value the database refuses (a NUL
    byte in a PostgreSQL text column, a number out of range) → 422; anything else is a bug."""
    if is_database_down(exc):
        log.warning("database unreachable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return await slimline_error(request, database_unavailable())
    if isinstance(exc, _DB_BAD_VALUE):
        log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        return await slimline_error(request, Unprocessable(
            "a value in this request cannot be stored or compared (e.g. a NUL or other control "
            "character, or a number out of range); remove it and retry"))
    return await unhandled_error(request, exc)


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "InternalError",
                          "an unexpected error occurred; it has been logged")


# each handler takes the exception class it is registered for (Starlette types the argument as
# any Exception)
_Handler = Callable[[Request, Any], Awaitable[Response]]


def install_error_handlers(app: FastAPI) -> None:
    handlers: dict[type[Exception], _Handler] = {
        SlimlineError: slimline_error,
        RequestValidationError: request_validation_error,
        ValidationError: pydantic_validation_error,
        HTTPException: http_error,
    }
    db_errors: tuple[type[Exception], ...] = (sa_exc.DBAPIError, *_DB_DOWN, *_DB_BAD_VALUE)
    for cls in db_errors:
        handlers[cls] = database_error
    handlers[Exception] = unhandled_error
    for cls, handler in handlers.items():
        app.add_exception_handler(cls, handler)
