"""Fixtures shared by the unit and end-to-end suites."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import amqp_broker as broker
import hypothesis
import pytest
import structlog
from amqp_broker import Admin, Route
from support import summary

# Hypothesis fails an example slower than its deadline, 200 ms by default. An example
# of ~30 ms took 274 ms once, with the suite's other workers and more on both cores
# ("Unreliable test timings", FlakyFailure). 2 s still catches a runaway example.
hypothesis.settings.register_profile("kairoi", deadline=timedelta(seconds=2))
hypothesis.settings.load_profile("kairoi")


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the report lines to the controller
        workeroutput["kairoi_summary"] = summary.export()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    summary.merge(getattr(node, "workeroutput", {}).get("kairoi_summary", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in summary.rendered():
        terminalreporter.write_line(line)


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
