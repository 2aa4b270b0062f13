"""Migration 0003_model_report: `models.report` (nullable JSON) on SQLite and PostgreSQL; it
round-trips a report, and downgrading to 0002 and upgrading again works."""
from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, inspect

from service.db import alembic_config, dispose_engines, session_scope, upgrade_db
from service.orm import Model, Tenant
from service.settings import Settings
from tests.pg import temporary_database

REPORT = {"layers": [{"name": "fc1", "kind": "linear", "methods": ["snip"]}],
          "totals": {"params": 10, "macs": 10}}


def _columns(url: str) -> dict[str, dict]:
    engine = create_engine(url)
    try:
        return {c["name"]: c for c in inspect(engine).get_columns("models")}
    finally:
        engine.dispose()


def _round_trip(settings: Settings) -> None:
    with session_scope(settings) as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        for report in (REPORT, None):
            session.add(Model(tenant_id=tenant.id, name="m", arch={"name": "graph"},
                              format="pt2", size_bytes=1, sha256="0" * 64, params={},
                              storage_key="k", report=report))
    with session_scope(settings) as session:
        got = sorted((m.report is None, m.report) for m in session.query(Model))
    assert got == [(False, REPORT), (True, None)]


def _down_and_up(settings: Settings) -> None:
    dispose_engines()
    config = alembic_config(settings.database_url)
    command.downgrade(config, "0002_job_recovery")
    assert "report" not in _columns(settings.database_url)
    command.upgrade(config, "head")
    assert _columns(settings.database_url)["report"]["nullable"]


def test_report_column_on_sqlite(tmp_path):
    settings = Settings(home=tmp_path / "home")
    upgrade_db(settings)
    assert _columns(settings.database_url)["report"]["nullable"]
    _round_trip(settings)
    _down_and_up(settings)
    dispose_engines()


def test_report_column_on_postgresql(tmp_path):
    with temporary_database("slimline_report") as url:
        settings = Settings(home=tmp_path, database_url=url)
        upgrade_db(settings)
        _round_trip(settings)
        _down_and_up(settings)
