"""Fixtures for end-to-end tests: a real `kairoi-trio serve` process per test,
or one per module shared by the tests that need no fresh one (`shared_server`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import support.postgres as pg
from support import summary
from support.kcp_client import KcpClient
from support.server import ServerProcess

BACKENDS = ("log", "postgres")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): run the module's or test's servers on each of these stores"
        " (log, postgres); without it, on the embedded log only",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on a module's shared server for one store form an xdist group:
    one worker runs them, so the server starts once per module and store, not once
    in each worker that happens to run one of them (docs/testing.md)."""
    for item in items:
        if "shared_server" not in getattr(item, "fixturenames", ()):
            continue
        assert isinstance(item, pytest.Function)  # (a test function: it has a module)
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend", "log") if callspec else "log"
        item.add_marker(pytest.mark.xdist_group(f"shared-{item.module.__name__}-{backend}"))


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


class SharedServers:
    """The servers the tests of one module share: one per store, started when
    the first test asks for it and killed when the module is done (in parallel,
    one worker runs a module's tests on one store: their xdist group, above)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: dict[str, ServerProcess] = {}
        self.databases: list[str] = []

    def get(self, backend: str) -> ServerProcess:
        server = self.servers.get(backend)
        if server is None or server.process is None or server.process.poll() is not None:
            dsn = None
            if backend == "postgres":
                dsn = pg.fresh_database("shared")
                self.databases.append(dsn)
            workdir = self.base / f"{backend}-{len(self.databases)}-{len(self.servers)}"
            server = ServerProcess(workdir, postgres_dsn=dsn)
            self.servers[backend] = server
            summary.count("servers", "{} of them shared (shared_server)")
            server.start()
        return server

    def close(self) -> None:
        for server in self.servers.values():
            server.kill()
        for dsn in self.databases:
            pg.drop_database(dsn)


@pytest.fixture(scope="module")
def _shared_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedServers]:
    shared = SharedServers(tmp_path_factory.mktemp(f"shared-{request.module.__name__}"))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def shared_server(_shared_servers: SharedServers, backend: str) -> Iterator[ServerProcess]:
    """The module's server on this test's store, on the default configuration,
    shared with the module's other tests: a test on it keeps to its own ids
    (`prefix`), and does not stop, restart or reconfigure it, nor read what is
    global (INFO counts, a LIST of everything, a rule matching every id,
    metrics totals, log lines not filtered by its own ids)."""
    server = _shared_servers.get(backend)
    yield server
    assert server.process is not None
    if server.process.poll() is not None:  # the next test gets a new one
        pytest.fail(
            f"the shared server exited ({server.process.returncode}) during this test:\n"
            + "\n".join(server.lines[-50:])
        )


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """This test's own start for job and rule ids on a shared server: its name
    without "test_", with a digest of its parameters other than the store, and
    a dot ("ping_and_version."). No test's prefix starts another's."""
    name = request.node.originalname.removeprefix("test_")
    callspec = getattr(request.node, "callspec", None)
    params = {k: v for k, v in (callspec.params if callspec else {}).items() if k != "backend"}
    if params:
        name += "-" + hashlib.sha1(repr(sorted(params.items())).encode()).hexdigest()[:8]
    return name + "."


@pytest.fixture
def shared_kcp(shared_server: ServerProcess) -> Iterator[KcpClient]:
    with KcpClient(shared_server.kcp_port) as client:
        yield client
