"""Request dependencies: settings, one DB session per request (commit on success, rollback on
error), the object store and the caller's tenant."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from jobs.auth import get_or_create_tenant, resolve_key
from jobs.db import session_scope
from jobs.errors import Unauthorized
from jobs.settings import Settings
from jobs.store import ObjectStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One transaction per request: committed on success, rolled back (with undo) on error."""
    with session_scope(settings) as session:
        yield session


# scope="function": the commit happens before the response is sent, so a failed commit is an
# error response and never a 201 for a row that does not exist.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


StoreDep = Annotated[ObjectStore, Depends(get_store)]


def default_tenant_id(request: Request, settings: Settings) -> str:
    cached = getattr(request.app.state, "default_tenant_id", None)
    if cached is None:
        with session_scope(settings) as session:
            cached = get_or_create_tenant(session, settings.default_tenant).id
        request.app.state.default_tenant_id = cached
    return cached


def get_tenant_id(request: Request, settings: SettingsDep, session: SessionDep) -> str:
    """The tenant of the `Authorization: Bearer <key>` header (or the default tenant when auth
    is off)."""
    if settings.auth == "off":
        return default_tenant_id(request, settings)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>` (create one "
                           "with `slimline keys create --name N`)")
    return resolve_key(session, key.strip())


TenantDep = Annotated[str, Depends(get_tenant_id)]
