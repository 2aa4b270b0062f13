"""Fixtures of the fault-injection suite: one set of servers for the session (own PostgreSQL
cluster, own Redis, an S3 endpoint, `slimline api`) and fresh Celery workers per test module
(`WORKERS = n` in the module, default 1), each module under a tenant of its own. A module that
stops a server starts it again; the module teardown checks that every server is up again, so one
module's fault never leaks into the next. When a test fails, the tails of every process log are
printed with its report."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.servers import FaultStack, postgres_bin, redis_bin


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def fault_servers(tmp_path_factory) -> Iterator[FaultStack]:
    if postgres_bin() is None or redis_bin() is None:
        pytest.skip("the fault suite needs PostgreSQL server binaries (/usr/lib/postgresql/*/bin)"
                    " and redis-server")
    stack = FaultStack.start(tmp_path_factory.mktemp("faults"), workers=0)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def fault_stack(request, fault_servers: FaultStack) -> Iterator[FaultStack]:
    stack = fault_servers
    stack.heal()
    stack.stop_workers()
    for _ in range(getattr(request.module, "WORKERS", 1)):
        stack.start_worker()
    stack.wait_workers_ready()
    try:
        yield stack
    finally:
        stack.stop_workers()
        stack.heal()


@pytest.fixture(scope="module")
def api_key(request, fault_stack: FaultStack) -> str:
    tenant = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    return fault_stack.create_key(f"faults-{tenant}", tenant)


@pytest.fixture(autouse=True)
def _logs_on_failure(request) -> Iterator[None]:
    yield
    if "fault_stack" not in request.fixturenames:
        return
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(request.getfixturevalue("fault_stack").dump_logs())
