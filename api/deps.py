"""Request dependencies: settings, one DB session per request (commit when the route returns,
rollback when it raises; routes never commit), the object store and the caller's tenant."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import cached_tenant_id, get_or_create_tenant, resolve_key
from service.db import SessionFactory, rollback, session_scope
from service.errors import NotFound, Unauthorized, Unprocessable
from service.settings import Settings
from service.spec import control_character
from service.store import ObjectStore

MAX_ID_CHARS = 32  # the id columns are String(32); a longer id cannot exist
MAX_NAME_CHARS = 200  # artifact names
MAX_QUERY_VALUE_CHARS = 4096
_PATH_NOUNS = {"job_id": "job", "model_id": "model", "dataset_id": "dataset", "name": "artifact"}


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the
# thread pool, and every such hop costs a context switch and a GIL hand-off.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def end_request_transaction(session: Session, ok: bool) -> None:
    """Commit (`ok`) or roll back the request's transaction, then close the session. Actions
    registered with `service.db.after_commit` (sending a new job to its queue) run inside the
    commit; a commit that fails is rolled back with undo (objects stored for its rows are
    deleted) and raised."""
    try:
        if ok:
            try:
                session.commit()
            except BaseException:
                rollback(session)
                raise
        else:
            rollback(session)
    finally:
        session.close()


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """One transaction per request: committed when the route returned, rolled back (with undo)
    when it raised; routes never commit. Creating the session does no I/O (a connection is
    checked out by its first query, in the route's thread, so a route that streams a body
    before its first query holds none meanwhile); commit or rollback and close run in one
    thread hop, shielded so that a cancelled request still gives its connection back."""
    session = SessionFactory(settings)()
    try:
        yield session
    except BaseException:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(end_request_transaction, session, False)
        raise
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(end_request_transaction, session, True)


# scope="function": the dependency's exit (the commit, and the dispatch after it) runs when the
# route returns and before the response is sent, so a client that got 201/202 reads the row at
# once, and a failed commit is an error response, never a 201 for a row that does not exist.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


StoreDep = Annotated[ObjectStore, Depends(get_store)]


def default_tenant_id(request: Request, settings: Settings) -> str:
    cached = getattr(request.app.state, "default_tenant_id", None)
    if cached is None:
        with session_scope(settings) as session:
            cached = get_or_create_tenant(session, settings.default_tenant).id
        request.app.state.default_tenant_id = cached
    return cached


def tenant_of_key(settings: Settings, key: str) -> str:
    """The tenant of an API key not in this process's cache, read in a short transaction of its
    own: the request's session stays unopened until the route's first query (an upload route
    receives its body before that)."""
    with session_scope(settings) as session:
        return resolve_key(session, key)


def check_request_values(request: Request) -> None:
    """Path and query values that no row can match or no column can hold, refused before any
    database work: a path id with a control character (a NUL byte, `%00`) or longer than its
    column is a 404; a query value with a control character or over 4096 characters a 422."""
    for key, value in request.path_params.items():
        if not isinstance(value, str):
            continue
        limit = MAX_ID_CHARS if key.endswith("_id") else MAX_NAME_CHARS
        if control_character(value) is not None or len(value) > limit:
            noun = _PATH_NOUNS.get(key, key)
            shown = repr(value) if len(value) <= 80 else repr(value[:77] + "...")
            raise NotFound(f"{noun} {shown} not found ({noun} ids are at most {limit} printable "
                           "characters, as the API returns them)" if key.endswith("_id") else
                           f"{noun} {shown} not found (names are at most {limit} printable "
                           "characters)")
    for key, value in request.query_params.multi_items():
        bad = control_character(key) or control_character(value)
        if bad is not None:
            name = key if control_character(key) is None else repr(key)
            raise Unprocessable(f"{name}: contains the control character {bad!r}; query "
                                "parameters are printable text")
        if len(value) > MAX_QUERY_VALUE_CHARS:
            raise Unprocessable(f"{key}: at most {MAX_QUERY_VALUE_CHARS} characters, got "
                                f"{len(value)}")


# The dashboard's sign-in (api/ui) stores the key in this HttpOnly, SameSite=Strict cookie so that
# plain links (downloads, plot images, the SSE stream) work in a browser. It is accepted for
# GET/HEAD only: a cross-site form can never make a POST or DELETE count as the user's (CSRF).
UI_KEY_COOKIE = "slimline_key"
COOKIE_METHODS = ("GET", "HEAD")


def request_key(request: Request) -> str | None:
    """The API key of a request: the `Authorization: Bearer` header's, or for GET/HEAD without
    that header the dashboard's cookie; None when neither is there (or the header is not a
    bearer key)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, key = header.partition(" ")
        return key.strip() if scheme.lower() == "bearer" and key.strip() else None
    if request.method in COOKIE_METHODS:
        return request.cookies.get(UI_KEY_COOKIE, "").strip() or None
    return None


async def get_tenant_id(request: Request, settings: SettingsDep) -> str:
    """The tenant of the `Authorization: Bearer <key>` header (or, for GET/HEAD, of the
    dashboard's cookie; the default tenant when auth is off). Every tenant route depends on it,
    so it first refuses path and query values that cannot match anything
    (`check_request_values`)."""
    check_request_values(request)
    if settings.auth == "off":
        cached: str | None = getattr(request.app.state, "default_tenant_id", None)
        if cached:
            return cached
        return await run_in_threadpool(default_tenant_id, request, settings)
    key = request_key(request)
    if key is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` (create one "
                           "with `slimline keys create --name N`)")
    tenant_id = cached_tenant_id(key)
    if tenant_id:
        return tenant_id
    return await run_in_threadpool(tenant_of_key, settings, key)


TenantDep = Annotated[str, Depends(get_tenant_id)]
