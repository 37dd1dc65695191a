"""Fixtures for end-to-end tests: a real `kairoi-trio serve` process per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.server import ServerProcess


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra TOML config; all are killed at the end of the test."""
    started: list[ServerProcess] = []

    def make(extra_config: str = "", name: str = "server") -> ServerProcess:
        server = ServerProcess(tmp_path / name, extra_config)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server()


@pytest.fixture
def kcp(server: ServerProcess) -> Iterator[KcpClient]:
    with KcpClient(server.kcp_port) as client:
        yield client
