"""Imported graphs are stored once per tenant, content-addressed (`graphs/<tenant>/<sha>.json`);
a graph put by a transaction that rolls back is deleted again, one that was there already is
left alone (service.model_registry.register_model / store_graph)."""
from __future__ import annotations

import hashlib

import pytest

from service.db import dispose_engines, session_scope, upgrade_db
from service.model_registry import graph_key, register_model
from service.orm import Model, Tenant
from service.settings import Settings
from service.store import LocalStore


@pytest.fixture
def env(tmp_path):
    settings = Settings(home=tmp_path / "home")
    upgrade_db(settings)
    with session_scope(settings) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        tenant_id = tenant.id
    yield settings, LocalStore(tmp_path / "objects"), tenant_id
    dispose_engines()


def _graph(tmp_path, text: str):
    path = tmp_path / f"{len(text)}.json"
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest(), path


def _register(session, store, tenant_id, tmp_path, graph):
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"weights")
    return register_model(session, store, tenant_id=tenant_id, name="m",
                          arch={"name": "graph", "graph": graph[0]}, fmt="pt2",
                          params={"total": 1}, path=ckpt, report={"layers": []}, graph=graph)


def test_graph_stored_once_and_undone_only_by_its_putter(env, tmp_path):
    settings, store, tenant_id = env
    first = _graph(tmp_path, '{"format":"slimline-graph/1","a":1}')
    with session_scope(settings) as session:
        model = _register(session, store, tenant_id, tmp_path, first)
        model_id = model.id
    key = graph_key(tenant_id, first[0])
    assert store.exists(key)
    with session_scope(settings) as session:
        assert session.get(Model, model_id).report == {"layers": []}

    second = _graph(tmp_path, '{"format":"slimline-graph/1","b":22}')
    with pytest.raises(RuntimeError), session_scope(settings) as session:
        _register(session, store, tenant_id, tmp_path, first)  # already there: not put
        _register(session, store, tenant_id, tmp_path, second)  # put by this transaction
        assert store.exists(graph_key(tenant_id, second[0]))
        raise RuntimeError("the insert fails")
    assert store.exists(key), "a graph other models use was deleted"
    assert not store.exists(graph_key(tenant_id, second[0])), "half-written graph left"
    with session_scope(settings) as session:
        assert [m.id for m in session.query(Model)] == [model_id]


def test_a_graph_file_must_hash_to_its_sha(env, tmp_path):
    settings, store, tenant_id = env
    sha, path = _graph(tmp_path, "{}")
    with pytest.raises(ValueError, match="hashes to"), session_scope(settings) as session:
        _register(session, store, tenant_id, tmp_path, ("0" * 64, path))
    assert not store.exists(graph_key(tenant_id, "0" * 64))
    assert not store.exists(graph_key(tenant_id, sha))
