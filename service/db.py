"""Database engine and sessions. `session_scope()` (and the API's request session) commits on
success and rolls back on error; service functions only `flush()`, and register what must happen
once their rows are committed with `after_commit` (sending a job to its queue) or undone if they
never are with `on_rollback` (deleting an object already written to the store)."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, Engine, Update, create_engine, event
from sqlalchemy.exc import DisconnectionError, InvalidatePoolError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from service.settings import Settings, get_settings

log = logging.getLogger(__name__)
_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    """A new engine; SQLite gets foreign keys, WAL and a busy timeout (API and worker share it).
    With `settings`, the pool holds `db_pool_size` (+ `db_max_overflow`) connections and a
    checkout waits at most `db_pool_timeout_s` (then `sqlalchemy.exc.TimeoutError`: a 503)."""
    pool: dict[str, Any] = {}
    if settings is not None and not _memory_sqlite(url):
        pool = {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow,
                "pool_timeout": settings.db_pool_timeout_s}
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(url, **pool)
    _ping_after_idle(engine)
    return engine


PING_AFTER_IDLE_S = 10.0


def _ping_after_idle(engine: Engine) -> None:
    """Check a pooled connection with a round trip only when it sat idle for PING_AFTER_IDLE_S
    (`pool_pre_ping` would add one to every request: a busy API keeps its connections in use,
    and a connection that just worked needs no ping). A dead one is replaced, and so are the
    other connections of its age (the server restarted); one that broke during use is an
    error the API answers with 503, and SQLAlchemy replaces the pool's connections too."""
    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # unusable either way: the pool reconnects (or raises)
            lost = isinstance(exc, engine.dialect.loaded_dbapi.Error) and \
                engine.dialect.is_disconnect(exc, dbapi_conn, None)
            error = InvalidatePoolError if lost else DisconnectionError  # server restarted?
            raise error(f"pooled connection failed its ping: {exc}") from exc


def _memory_sqlite(url: str) -> bool:
    return url.startswith("sqlite") and url.split(":///", 1)[-1] in ("", ":memory:")


def engine_from_settings(settings: Settings | None = None) -> Engine:
    """The process-wide engine for `settings.database_url` (one per URL)."""
    url = (settings or get_settings()).database_url
    with _lock:
        if url not in _engines:
            _engines[url] = make_engine(url, settings or get_settings())
        return _engines[url]


def SessionFactory(settings: Settings | None = None) -> sessionmaker[Session]:
    """The sessionmaker bound to the engine of `settings` (objects stay usable after commit)."""
    url = (settings or get_settings()).database_url
    engine = engine_from_settings(settings)
    with _lock:
        if url not in _factories:
            _factories[url] = sessionmaker(engine, expire_on_commit=False)
        return _factories[url]


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on any error."""
    session = SessionFactory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        rollback(session)
        raise
    finally:
        session.close()


def rollback(session: Session) -> None:
    """Roll back, then undo side effects registered with `on_rollback` (such as objects already
    written to the store for rows that now never exist)."""
    session.rollback()
    for undo in session.info.pop(ON_ROLLBACK, []):
        try:
            undo()
        except Exception:  # best effort; the original error matters more
            log.warning("undo after rollback failed", exc_info=True)


AFTER_COMMIT = "after_commit"
ON_ROLLBACK = "on_rollback"


def rows_changed(session: Session, statement: Update | Delete) -> int:
    """Rows an UPDATE or DELETE changed; the session's objects are not synchronised (callers
    re-read what they need)."""
    result = session.execute(statement.execution_options(synchronize_session=False))
    return cast("CursorResult[Any]", result).rowcount  # DML answers with a CursorResult


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run `action()` right after the session's current transaction commits, in the committing
    thread, once; dropped if the transaction rolls back or the session closes without a commit.
    For side effects that must not be seen before the rows they refer to (a job id sent to a
    worker). `action` runs outside any transaction and must not use `session`; an error it
    raises is logged, not raised (the commit happened), so it must leave a way to recover (the
    reconciler re-sends a queued job that was never sent)."""
    session.info.setdefault(AFTER_COMMIT, []).append(action)


def on_rollback(session: Session, undo: Callable[[], object]) -> None:
    """Run `undo()` if the session's current transaction is rolled back with `rollback`."""
    session.info.setdefault(ON_ROLLBACK, []).append(undo)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    session.info.pop(ON_ROLLBACK, None)  # the rows exist now: nothing to undo
    for action in session.info.pop(AFTER_COMMIT, []):
        try:
            action()
        except Exception:  # the transaction is committed; the action's owner recovers
            log.warning("action after commit failed", exc_info=True)


@event.listens_for(Session, "after_transaction_end")
def _forget_uncommitted(session: Session, transaction: SessionTransaction) -> None:
    # after_commit has already taken the actions of a committed transaction; what is left
    # belongs to one that rolled back or was closed
    if transaction.parent is None:
        session.info.pop(AFTER_COMMIT, None)


def dispose_engines() -> None:
    """Close every pooled connection (tests, and after fork in workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()


def alembic_config(url: str):
    """An Alembic config that finds the migrations next to the package, from any cwd."""
    from alembic.config import Config

    root = Path(__file__).resolve().parents[1]
    ini = root / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade_db(settings: Settings | None = None, revision: str = "head") -> None:
    """`alembic upgrade head` on the configured database."""
    from alembic import command

    settings = settings or get_settings()
    if settings.database_url.startswith("sqlite"):
        engine_from_settings(settings)  # creates the parent directory
    command.upgrade(alembic_config(settings.database_url), revision)
