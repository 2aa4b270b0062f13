"""CLI tests reuse the worker tests' temporary home (SQLite migrated with Alembic, local store);
`api` is the real API app in-process with enqueued jobs run inline by the worker's runner."""
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from cli import app as cli_app
from service import queue
from service.settings import get_settings
from tests.worker.conftest import settings
from worker import runner

__all__ = ["settings"]


@pytest.fixture
def env(settings, monkeypatch):
    for name in ("SLIMLINE_DATABASE_URL", "SLIMLINE_BROKER_URL", "SLIMLINE_STORAGE_URL",
                 "SLIMLINE_API_KEY", "SLIMLINE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLIMLINE_HOME", str(settings.home))
    monkeypatch.setenv("SLIMLINE_AUTH", "off")
    yield
    get_settings.cache_clear()  # the CLI read this test's environment


@pytest.fixture
def api(settings, env, monkeypatch):
    """The CLI's HTTP client is the API app in-process; enqueued jobs run inline."""
    monkeypatch.setattr(cli_app, "client", lambda url, key: TestClient(create_app(settings)))
    monkeypatch.setattr(queue, "enqueue_job",
                        lambda job_id, q, s=None: runner.run_job(job_id, settings))
