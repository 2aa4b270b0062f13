"""The one place errors become JSON: `{"error": <CodeName>, "detail": <message>}`."""
from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from jobs.errors import SlimlineError
from jobs.spec import AVAILABLE_OPS

log = logging.getLogger(__name__)


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


def validation_detail(errors: list[dict[str, Any]]) -> str:
    messages = []
    for err in errors:
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not allowed here)"
        messages.append(f"{_path(tuple(err.get('loc', ())))}: {msg}")
    return "; ".join(messages)


async def slimline_error(_: Request, exc: SlimlineError) -> JSONResponse:
    response = error_response(exc.status, exc.code, exc.detail)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


async def request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "ValidationError", validation_detail(list(exc.errors())))


async def pydantic_validation_error(_: Request, exc: ValidationError) -> JSONResponse:
    return error_response(422, "ValidationError", validation_detail(list(exc.errors())))


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = HTTPStatus(exc.status_code).phrase.replace(" ", "").replace("-", "")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "InternalError",
                          "an unexpected error occurred; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SlimlineError, slimline_error)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(ValidationError, pydantic_validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unhandled_error)
