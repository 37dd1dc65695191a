"""Fixtures for end-to-end tests: a real `kairoi-trio serve` process per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import support.postgres as pg
from support.kcp_client import KcpClient
from support.server import ServerProcess

BACKENDS = ("log", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): run the module's or test's servers on each of these stores"
        " (log, postgres); without it, on the embedded log only",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `backends(...)` run once per store their servers use."""
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", marker.args or BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The store this test's servers run on: "log" unless the test is marked."""
    return getattr(request, "param", "log")


@pytest.fixture
def make_server(tmp_path: Path, backend: str) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra TOML config; all are killed at the end of the test.

    A server's data is its name's, as a data directory is: a server made again
    under the same name finds it (a restart). On the postgres backend each name
    gets a fresh database, dropped after the test; servers given the same
    `database` share one (several instances of one scheduler).
    """
    started: list[ServerProcess] = []
    databases: dict[str, str] = {}

    def make(extra_config: str = "", name: str = "server", database: str = "") -> ServerProcess:
        dsn = None
        if backend == "postgres":
            key = database or name
            if key not in databases:
                databases[key] = pg.fresh_database("e2e")
            dsn = databases[key]
        server = ServerProcess(tmp_path / name, extra_config, postgres_dsn=dsn)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.kill()
        for dsn in databases.values():
            pg.drop_database(dsn)


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server()


@pytest.fixture
def kcp(server: ServerProcess) -> Iterator[KcpClient]:
    with KcpClient(server.kcp_port) as client:
        yield client
