"""Fixtures of the fault-injection suite: one stack (own PostgreSQL cluster, own Redis, an S3
endpoint, `slimline api`, Celery workers) per test module, since the tests break its servers.

A module sets `WORKERS = n` (default 1) and `STACK_ENV = {...}` to shape its stack. When a test
fails, the tails of every process log are printed with its report."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.servers import FaultStack, postgres_bin, redis_bin


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def fault_stack(request, tmp_path_factory) -> Iterator[FaultStack]:
    if postgres_bin() is None or redis_bin() is None:
        pytest.skip("the fault suite needs PostgreSQL server binaries (/usr/lib/postgresql/*/bin)"
                    " and redis-server")
    home = tmp_path_factory.mktemp("faults")
    stack = FaultStack.start(home, workers=getattr(request.module, "WORKERS", 1),
                             extra_env=getattr(request.module, "STACK_ENV", None))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def api_key(fault_stack) -> str:
    return fault_stack.create_key("faults", "faults")


@pytest.fixture(autouse=True)
def _logs_on_failure(request) -> Iterator[None]:
    yield
    if "fault_stack" not in request.fixturenames:
        return
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(request.getfixturevalue("fault_stack").dump_logs())
