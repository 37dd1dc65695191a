"""Fixtures shared by the unit and end-to-end suites."""

from __future__ import annotations

from collections.abc import Iterator

import amqp_broker as broker
import pytest
import structlog
import support.postgres as pg
from amqp_broker import Admin, Route


@pytest.fixture(autouse=True)
def _fresh_logging_configuration() -> Iterator[None]:
    """A test that runs a command in-process (e.g. import-kairoi, which sets the
    level to warning) must not change what later tests' capture_logs sees."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session", autouse=True)
def _leave_the_default_broker_alone() -> Iterator[None]:
    """Whatever broker listens on the default port 5672 (a developer's own) is
    still listening and not frozen after the run: the tests use a private node
    (tests/amqp_broker.py) and must never stop, freeze or reconfigure another.
    Read from /proc only: the default broker is never even connected to."""
    before = broker.listener(broker.DEFAULT_PORT)
    yield
    try:
        if before is None:
            return
        after = broker.listener(broker.DEFAULT_PORT)
        assert after is not None, "the broker on 127.0.0.1:5672 stopped listening during the tests"
        assert before.frozen or not after.frozen, (
            f"the broker on 127.0.0.1:5672 (pid {after.pid}) was left frozen (SIGSTOP)"
        )
    finally:
        broker.stop_started_node()


@pytest.fixture
def admin() -> Iterator[Admin]:
    """A management connection to the suite's private RabbitMQ node (started if needed)."""
    broker.ensure_broker()
    admin = Admin()
    yield admin
    admin.close()


@pytest.fixture
def route(admin: Admin, request: pytest.FixtureRequest) -> Iterator[Route]:
    """A uniquely named exchange and bound queue, deleted afterwards."""
    route = broker.make_route(admin, request.module.__name__.rsplit("_", 1)[-1])
    yield route
    broker.remove_route(route)


@pytest.fixture(scope="session", autouse=True)
def _leave_the_default_postgres_alone() -> Iterator[None]:
    """Whatever listens on PostgreSQL's default port 5432 (a developer's own
    cluster) is the same process, still listening and not frozen, after the run:
    the tests use a private cluster (tests/support/postgres.py) and must never
    stop, restart or freeze another. Read from /proc only: never connected to."""
    before = broker.listener(pg.DEFAULT_PORT)
    yield
    try:
        if before is None:
            return
        after = broker.listener(pg.DEFAULT_PORT)
        assert after is not None, "the server on 127.0.0.1:5432 stopped listening during the tests"
        assert None in (before.pid, after.pid) or before.pid == after.pid, (
            f"the server on 127.0.0.1:5432 was restarted (pid {before.pid}, now {after.pid})"
        )
        assert before.frozen or not after.frozen, (
            f"the server on 127.0.0.1:5432 (pid {after.pid}) was left frozen (SIGSTOP)"
        )
    finally:
        pg.stop_started_cluster()


@pytest.fixture
def postgres_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database of its own on the suite's private PostgreSQL
    cluster (started if needed), as superuser; dropped after the test."""
    dsn = pg.fresh_database(request.node.name)
    yield dsn
    pg.drop_database(dsn)
