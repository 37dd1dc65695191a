"""Fixtures shared by the unit and end-to-end suites."""

from __future__ import annotations

from collections.abc import Iterator

import amqp_broker as broker
import pytest
from amqp_broker import Admin, Route


@pytest.fixture
def admin() -> Iterator[Admin]:
    """A management connection to the real local RabbitMQ (started if it is not running)."""
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
