from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from service.db import dispose_engines, upgrade_db
from service.settings import Settings
from tests.pg import temporary_database

TABLES = {"tenants", "api_keys", "models", "datasets", "jobs", "job_events", "artifacts",
          "alembic_version"}


def check_schema(url: str) -> None:
    engine = create_engine(url)
    try:
        insp = inspect(engine)
        assert set(insp.get_table_names()) >= TABLES
        uniques = {u["name"] for u in insp.get_unique_constraints("jobs")}
        assert "uq_jobs_tenant_idempotency" in uniques
        assert "ix_jobs_tenant_created" in {i["name"] for i in insp.get_indexes("jobs")}
    finally:
        engine.dispose()


def test_upgrade_on_sqlite_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings(home=tmp_path / "home")
    upgrade_db(s)
    upgrade_db(s)  # idempotent
    check_schema(s.database_url)
    dispose_engines()


@pytest.fixture
def pg_url():
    with temporary_database("slimline_mig") as url:
        yield url


def test_upgrade_on_postgresql_and_basic_use(pg_url, tmp_path):
    from service.auth import create_api_key, resolve_key
    from service.db import session_scope
    from service.orm import Job
    from service.reconcile import reap_lost_workers
    from service.states import mark_running

    s = Settings(home=tmp_path, database_url=pg_url)
    upgrade_db(s)
    check_schema(pg_url)
    with session_scope(s) as session:
        key = create_api_key(session, "k", "t")
        tenant = resolve_key(session, key)
        job = Job(tenant_id=tenant, spec={"x": 1})
        session.add(job)
        session.flush()
        mark_running(job)
        assert reap_lost_workers(session, 3600, 3) == ([], [])
    with session_scope(s) as session:
        assert session.get(Job, job.id).started_at.tzinfo is not None
