"""Worker tests: the runner as plain Python against SQLite (migrated with Alembic) and a local
object store in a temporary home; no broker, no Celery."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.auth import get_or_create_tenant
from service.db import dispose_engines, session_scope, upgrade_db
from service.orm import Job
from service.settings import Settings
from service.spec import JobSpec
from service.store import LocalStore
from service.submission import create_job

TINY_MLP = {"name": "mlp", "input_shape": [1, 8, 8], "widths": [64, 32]}
TINY_CONV4 = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [4, 4, 8, 8],
              "fc": [16, 16]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = Settings(home=tmp_path / "home", auth="off", broker_url="filesystem://",
                 data_dir=tmp_path / "no-data")
    upgrade_db(s)
    yield s
    dispose_engines()


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    return LocalStore(settings.home / "objects")


@pytest.fixture
def tenant_id(settings: Settings) -> str:
    with session_scope(settings) as session:
        return get_or_create_tenant(session, "tester").id


@pytest.fixture
def submit(settings: Settings, tenant_id: str):
    """Insert a queued job as the API would (validated spec, defaults filled in)."""

    def _submit(spec: dict[str, Any]) -> str:
        with session_scope(settings) as session:
            job, _ = create_job(session, tenant_id, JobSpec.model_validate(spec))
            return job.id

    return _submit


def get_job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def stored_files(store: LocalStore) -> list[str]:
    if not store.root.exists():
        return []
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def spec(arch_or_id: dict[str, Any] | str, steps: list[dict[str, Any]], seed: int = 1
         ) -> dict[str, Any]:
    """A JobSpec on synthetic-tiny: `arch_or_id` an arch dict or a model id."""
    model = arch_or_id if isinstance(arch_or_id, str) else {"arch": arch_or_id}
    return {"model": model, "dataset": "synthetic-tiny", "steps": steps, "seed": seed}


def run_ok(settings: Settings, submit: Any, spec_: dict[str, Any]) -> tuple[str, dict]:
    """Submit and run a job in-process; assert it succeeded; (job id, result)."""
    from worker import runner

    job_id = submit(spec_)
    status = runner.run_job(job_id, settings)
    job = get_job(settings, job_id)
    assert status == "succeeded", (job.error_code, job.error_message)
    return job_id, job.result


def stored_model_path(settings: Settings, store: LocalStore, tmp_path: Path, model_id: str
                      ) -> Path:
    """Download a model's checkpoint from the store into tmp_path."""
    from service.orm import Model

    with session_scope(settings) as session:
        key = session.get(Model, model_id).storage_key
    path = tmp_path / f"{model_id}.safetensors"
    store.get_to_file(key, path)
    return path
