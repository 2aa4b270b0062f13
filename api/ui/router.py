"""The dashboard's pages and its sign-in. The pages carry no tenant data: their JS
(`static/*.js`) reads everything from the JSON API, so the only server-side work is rendering a
template and, with auth on, checking the sign-in cookie (`api.deps.UI_KEY_COOKIE`).

Sign-in (`POST /ui/signin`, JSON `{"key": ...}`) checks the key as the API does and sets it as an
HttpOnly, SameSite=Strict cookie; `api.deps` accepts that cookie as the key for GET/HEAD
requests only, so links (artifact and model downloads, plot images, the SSE stream) work in the
browser while a POST or DELETE always needs `Authorization: Bearer` (the JS keeps the key in
localStorage for those). `POST /ui/signout` clears the cookie."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Body, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from api.deps import UI_KEY_COOKIE, SettingsDep, check_request_values, tenant_of_key
from service.auth import cached_tenant_id
from service.errors import Unauthorized, Unprocessable
from service.spec import JobSpec

from .examples import op_templates

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)

COOKIE_MAX_AGE_S = 7 * 24 * 3600
MAX_KEY_CHARS = 200
# everything the pages load comes from this origin: no CDN, nothing inline
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}


async def _key_is_valid(settings: Any, key: str) -> bool:
    if cached_tenant_id(key):
        return True
    try:
        await run_in_threadpool(tenant_of_key, settings, key)
    except Unauthorized:
        return False
    return True


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this dashboard only (never another host)."""
    if not target:
        return "/ui"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui") or "\\" in target:
        return "/ui"
    return target


async def _page(request: Request, settings: Any, template: str, page: str,
                **context: Any) -> Response:
    """Render one page; with auth on and no valid sign-in cookie, a redirect to the sign-in."""
    check_request_values(request)
    if settings.auth == "on":
        key = request.cookies.get(UI_KEY_COOKIE, "").strip()
        if not key or not await _key_is_valid(settings, key):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/ui/signin?next={quote(target, safe='')}", status_code=303,
                                    headers=SECURITY_HEADERS)
    return templates.TemplateResponse(
        request, template, {"page": page, "auth": settings.auth, **context},
        headers=SECURITY_HEADERS)


@router.get("", response_class=HTMLResponse)
async def jobs_page(request: Request, settings: SettingsDep) -> Response:
    """The jobs: live status, filter, pick some to compare."""
    return await _page(request, settings, "jobs.html", "jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(job_id: str, request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "job.html", "job", job_id=job_id)


@router.get("/models", response_class=HTMLResponse)
async def models_page(request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "models.html", "models")


@router.get("/models/{model_id}", response_class=HTMLResponse)
async def model_page(model_id: str, request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "model.html", "model", model_id=model_id)


@router.get("/new", response_class=HTMLResponse)
async def new_job_page(request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "new_job.html", "new")


@router.get("/compare", response_class=HTMLResponse)
async def compare_page(request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "compare.html", "compare")


@router.get("/signin", response_class=HTMLResponse)
async def signin_page(request: Request, settings: SettingsDep,
                      next: str | None = None) -> Response:  # noqa: A002 - the query name
    return templates.TemplateResponse(
        request, "signin.html",
        {"page": "signin", "auth": settings.auth, "next": _safe_next(next)},
        headers=SECURITY_HEADERS)


@router.post("/signin")
async def signin(request: Request, settings: SettingsDep,
                 body: Annotated[dict[str, Any], Body()]) -> Response:
    """Check an API key and keep it in the sign-in cookie (204). A JSON body only: a form of
    another site cannot post one without the browser asking first, so nobody can sign a
    visitor in with their own key."""
    if settings.auth == "off":
        return JSONResponse({"auth": "off"}, headers={"Cache-Control": "no-store"})
    key = body.get("key")
    if not isinstance(key, str) or not key.strip():
        raise Unprocessable("key: the API key to sign in with (create one with `slimline keys "
                            "create --name N`)")
    key = key.strip()
    if len(key) > MAX_KEY_CHARS or any(ch < "!" or ch > "~" for ch in key):
        raise Unauthorized("invalid API key; create one with `slimline keys create --name N`")
    if not await _key_is_valid(settings, key):
        raise Unauthorized("invalid API key; create one with `slimline keys create --name N`")
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.set_cookie(UI_KEY_COOKIE, key, max_age=COOKIE_MAX_AGE_S, path="/",
                        httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/signout")
async def signout(request: Request) -> Response:
    """Forget the sign-in cookie (204)."""
    response = Response(status_code=204, headers={"Cache-Control": "no-store"})
    response.delete_cookie(UI_KEY_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


@router.get("/jobspec.json")
def jobspec_schema() -> Response:
    """What the new-job form validates against: the JobSpec JSON schema (the model POST
    /v1/jobs validates with) and a template job per step op."""
    body = {"schema": JobSpec.model_json_schema(), "templates": op_templates()}
    return Response(json.dumps(body), media_type="application/json",
                    headers={"Cache-Control": "no-cache"})
