"""API keys: `sl_<random>` shown once; only its sha256 and a short display prefix are stored."""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.errors import Unauthorized
from jobs.orm import ApiKey, Tenant


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


def resolve_key(session: Session, key: str) -> str:
    """The tenant id of an API key, or Unauthorized."""
    tenant_id = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
    if tenant_id is None:
        raise Unauthorized("invalid API key; create one with `slimline keys create --name N`")
    return tenant_id
