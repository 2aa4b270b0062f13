"""Fixtures for the dashboard tests: an app on SQLite with auth on or off (TestClient), and for
the browser test the embedded stack (`slimline up`: SQLite, filesystem broker, local store, one
worker process) with auth on, driven by Playwright with Debian's chromium."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service import queue
from service.auth import create_api_key, forget_keys
from service.db import dispose_engines, session_scope, upgrade_db
from service.settings import Settings
from tests.stack.conftest import REPO, SLIMLINE, Stack, free_port, spawn, stop, wait_ready

CHROMIUM = os.environ.get("SLIMLINE_TEST_CHROMIUM", "/usr/bin/chromium")


def make_settings(tmp_path: Path, auth: str) -> Settings:
    s = Settings(home=tmp_path / f"home-{auth}", auth=auth, broker_url="filesystem://",
                 inspect_module="tests.api.fake_inspect")
    upgrade_db(s)
    return s


@pytest.fixture
def no_queue(monkeypatch) -> None:
    monkeypatch.setattr(queue, "enqueue_job", lambda job_id, q, settings=None: None)
    monkeypatch.setattr(queue, "revoke", lambda job_id, settings=None: None)


@pytest.fixture
def auth_on(tmp_path, no_queue) -> Iterator[tuple[TestClient, str]]:
    """A TestClient without credentials on an app with auth on, and a valid key."""
    settings = make_settings(tmp_path, "on")
    with session_scope(settings) as session:
        key = create_api_key(session, "ui-key", "ui")
    with TestClient(create_app(settings)) as client:
        yield client, key
    forget_keys()
    dispose_engines()


@pytest.fixture
def auth_off(tmp_path, no_queue) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, "off")
    with TestClient(create_app(settings)) as client:
        yield client
    dispose_engines()


@pytest.fixture(scope="session")
def ui_stack(tmp_path_factory) -> Iterator[tuple[Stack, str]]:
    """The embedded stack with auth ON, and an API key made with `slimline keys create`."""
    home = tmp_path_factory.mktemp("ui-stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
    env.update({"PYTHONUNBUFFERED": "1", "SLIMLINE_AUTH": "on", "SLIMLINE_HOME": str(home)})
    port = free_port()
    stack = Stack(url=f"http://127.0.0.1:{port}", env=env, home=home)
    stack.logs = [home / "up.log"]
    stack.procs.append(spawn([SLIMLINE, "up", "--home", str(home), "--host", "127.0.0.1",
                              "--port", str(port)], env, stack.logs[0]))
    try:
        wait_ready(stack.url, stack.procs, timeout=120)
        yield stack, stack.create_key("ui-browser", "ui-browser")
    except Exception:
        print(stack.dump_logs())
        raise
    finally:
        for p in stack.procs:
            stop(p)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; `make test` installs it (scripts/ensure-browser.sh). Missing, the
    browser test fails saying so rather than being skipped."""
    path = shutil.which(CHROMIUM) or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.fail(f"{CHROMIUM} not found: install it with `bash scripts/ensure-browser.sh` "
                    "(apt-get install chromium, as root) or set SLIMLINE_TEST_CHROMIUM")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                             cwd=REPO)
    assert version.returncode == 0, version.stderr
    return path


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    """Where the browser test saves its screenshots (overwritten on every run):
    $SLIMLINE_UI_SCREENSHOTS, else tests/ui/screenshots/ (ignored by git, see its .gitignore)."""
    chosen = os.environ.get("SLIMLINE_UI_SCREENSHOTS")
    path = Path(chosen) if chosen else Path(__file__).resolve().parent / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path
