"""API keys: `sl_<random>` shown once; only its sha256 and a short display prefix are stored.
A key that resolved is remembered by each process for KEY_CACHE_TTL_S, so most requests spend
no database round trip on authentication (a deleted key stops working within that time)."""
from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Unauthorized
from service.orm import ApiKey, Tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, name: str, tenant_name: str | None = None) -> str:
    """Create a key for tenant `tenant_name` (default: a tenant named like the key) and return
    the plaintext key, which is never stored."""
    tenant = get_or_create_tenant(session, tenant_name or name)
    key = "sl_" + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, name=name, prefix=key[:10], key_hash=hash_key(key)))
    session.flush()
    return key


KEY_CACHE_TTL_S = 60.0
KEY_CACHE_SIZE = 10_000  # keys remembered at most (the cache is emptied when full)
_key_cache: dict[str, tuple[str, float]] = {}  # key hash -> (tenant id, expiry)
_key_cache_lock = threading.Lock()


def cached_tenant_id(key: str) -> str | None:
    """The tenant id of `key` if this process resolved it within KEY_CACHE_TTL_S (no I/O: an
    async caller can use it before deciding to look the key up in a thread)."""
    cached = _key_cache.get(hash_key(key))
    return cached[0] if cached is not None and cached[1] > time.monotonic() else None


def resolve_key(session: Session, key: str) -> str:
    """The tenant id of an API key, or Unauthorized. Valid keys are cached (KEY_CACHE_TTL_S);
    invalid ones are looked up every time."""
    digest = hash_key(key)
    now = time.monotonic()
    cached = _key_cache.get(digest)
    if cached is not None and cached[1] > now:
        return cached[0]
    tenant_id = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == digest))
    if tenant_id is None:
        raise Unauthorized("invalid API key; create one with `slimline keys create --name N`")
    with _key_cache_lock:
        if len(_key_cache) >= KEY_CACHE_SIZE:
            _key_cache.clear()
        _key_cache[digest] = (tenant_id, now + KEY_CACHE_TTL_S)
    return tenant_id


def forget_keys() -> None:
    """Empty this process's key cache (tests; after deleting keys)."""
    with _key_cache_lock:
        _key_cache.clear()
