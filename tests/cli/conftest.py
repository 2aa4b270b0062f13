"""CLI tests reuse the worker tests' temporary home (SQLite migrated with Alembic, local store)."""
from tests.worker.conftest import settings

__all__ = ["settings"]
