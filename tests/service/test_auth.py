from __future__ import annotations

import pytest

from service.auth import create_api_key, hash_key, resolve_key
from service.db import dispose_engines, session_scope, upgrade_db
from service.errors import Unauthorized
from service.orm import ApiKey
from service.settings import Settings


def test_keys_are_stored_hashed(tmp_path):
    s = Settings(home=tmp_path)
    upgrade_db(s)
    with session_scope(s) as session:
        key = create_api_key(session, "ci", "acme")
        other = create_api_key(session, "ci2", "acme")
    assert key.startswith("sl_") and len(key) > 30
    with session_scope(s) as session:
        rows = session.query(ApiKey).all()
        assert {r.key_hash for r in rows} == {hash_key(key), hash_key(other)}
        assert all(key not in (r.key_hash, r.prefix) for r in rows)
        assert resolve_key(session, key) == resolve_key(session, other)
        with pytest.raises(Unauthorized):
            resolve_key(session, "sl_wrong")
    dispose_engines()
