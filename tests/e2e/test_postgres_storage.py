"""The PostgreSQL store's schema and moving data between stores, from the
command line a user runs: `db migrate`, `storage copy`, and a server that
refuses a schema newer than it knows."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import support.postgres as pg
from support.kcp_client import KcpClient
from support.server import ServerProcess

from kairoi_trio.storage.postgres.schema import MIGRATIONS, SCHEMA_VERSION

pytestmark = pytest.mark.backends("log")  # the servers' stores are given explicitly

FUTURE = "2099-01-01 00:00:00"


def kairoi(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture
def database() -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(pg.fresh_database("storage"))
        return made[-1]

    yield make
    for dsn in made:
        pg.drop_database(dsn)


def test_db_migrate_creates_the_schema_once(database: Callable[[], str]) -> None:
    dsn = database()
    first = kairoi("db", "migrate", "--dsn", dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"schema 'kairoi' migrated from version 0 to {SCHEMA_VERSION}"
    again = kairoi("db", "migrate", "--dsn", dsn)
    assert again.stdout.strip() == f"schema 'kairoi' is up to date (version {SCHEMA_VERSION})"
    with psycopg.connect(dsn) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'kairoi'"
            )
        }
    assert {"jobs", "rules", "job_counts", "instances", "settings", "schema_version"} <= tables


def test_a_database_of_an_earlier_version_is_migrated_keeping_its_jobs(
    database: Callable[[], str], tmp_path: Path
) -> None:
    """Each migration applies on the schema the one before left, with data in it:
    version 1 as the first release wrote it, then the server's own start-up."""
    dsn = database()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE SCHEMA kairoi")
        conn.execute("SET search_path TO kairoi")
        conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version, description, statements = MIGRATIONS[0]
        conn.execute(statements)
        conn.execute("INSERT INTO schema_version VALUES (%s, %s)", (version, description))
        conn.execute(
            "INSERT INTO jobs VALUES ('old.1', 4070908800000000, 'planned', true, '', 0, '',"
            " 0, NULL, NULL)"
        )
        conn.execute(
            "INSERT INTO instances (id, host, pid, lease_until)"
            " VALUES (gen_random_uuid(), 'gone', 1, now() - interval '1 hour')"
        )
    server = ServerProcess(tmp_path / "s", postgres_dsn=dsn)
    server.start()
    try:
        with KcpClient(server.kcp_port) as kcp:
            assert kcp.request("GET", "old.1")[:2] == ["OK", "planned"]
    finally:
        server.stop()
    assert any(
        e.get("version") == SCHEMA_VERSION and e.get("was") == 1
        for e in server.events("database schema migrated")
    )


def test_a_schema_newer_than_the_server_is_refused(database: Callable[[], str], tmp_path) -> None:
    dsn = database()
    assert kairoi("db", "migrate", "--dsn", dsn).returncode == 0
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO kairoi.schema_version (version, description) VALUES (99, 'x')")
    migrate = kairoi("db", "migrate", "--dsn", dsn)
    assert migrate.returncode == 1
    assert f"version 99, newer than this server knows ({SCHEMA_VERSION})" in migrate.stderr
    server = ServerProcess(tmp_path / "s", postgres_dsn=dsn)
    server.config_path.parent.mkdir(parents=True, exist_ok=True)
    server.config_path.write_text(server.config_text())
    start = kairoi("serve", "-c", str(server.config_path), cwd=server.workdir)
    assert start.returncode == 1
    lines = [line for line in start.stderr.splitlines() if line.startswith("kairoi-trio:")]
    assert lines == [
        "kairoi-trio: cannot start: the database schema 'kairoi' is at version 99, newer than"
        f" this server knows ({SCHEMA_VERSION}): upgrade kairoi-trio, or use another schema"
    ]


def test_an_unreachable_database_is_a_one_line_start_error(tmp_path) -> None:
    server = ServerProcess(tmp_path / "s", postgres_dsn="postgresql://postgres@127.0.0.1:1/x")
    server.config_path.parent.mkdir(parents=True, exist_ok=True)
    text = server.config_text() + "connect_timeout_s = 1.0\n"  # (the last table: storage.postgres)
    server.config_path.write_text(text)
    start = kairoi("serve", "-c", str(server.config_path), cwd=server.workdir)
    assert start.returncode == 1
    last = start.stderr.strip().splitlines()[-1]
    assert last.startswith("kairoi-trio: cannot start: PostgreSQL: connection failed"), last
    assert "(waited 1 s)" in last


def listing(port: int) -> list[list[str]]:
    """Every job (GET, in id order) and rule of a server, as KCP answers them."""
    with KcpClient(port) as kcp:
        rules = kcp.request("RULE", "LIST")
        ids = [f"copy.{i}" for i in range(6)] + ["every.1", "gone"]
        return [rules] + [kcp.request("GET", job_id) for job_id in ids]


def test_storage_copy_moves_every_job_and_rule_both_ways(
    database: Callable[[], str], tmp_path: Path
) -> None:
    source = ServerProcess(tmp_path / "source").start()
    try:
        with KcpClient(source.kcp_port) as kcp:
            requests: list[tuple[str, ...]] = [("RULE", "SET", "r1", "copy.", "shell", "/bin/true")]
            requests += [("SET", f"copy.{i}", FUTURE, f"payload {i} é") for i in range(6)]
            requests += [("SCHEDULE", "every.1", "every 1h", "tz=Europe/Paris")]
            requests += [("SET", "gone", FUTURE), ("UNSET", "gone")]
            assert all(a[0] == "OK" for a in kcp.pipeline(requests))
        before = listing(source.kcp_port)
        assert source.stop() == 0
    finally:
        source.kill()
    dsn = database()
    # a log in use is refused (the source server must be stopped): checked via its lock
    copy = kairoi("storage", "copy", "--from", f"log:{source.data_dir}", "--to", f"postgres:{dsn}")
    assert copy.returncode == 0, copy.stderr
    assert copy.stdout.startswith("copied 7 jobs and 1 rules from log to postgres")
    again = kairoi("storage", "copy", "--from", f"log:{source.data_dir}", "--to", f"postgres:{dsn}")
    assert again.returncode == 1 and "already holds jobs or rules" in again.stderr

    on_postgres = ServerProcess(tmp_path / "pg", postgres_dsn=dsn).start()
    try:
        assert listing(on_postgres.kcp_port) == before
    finally:
        on_postgres.kill()

    back = tmp_path / "back"
    copy_back = kairoi("storage", "copy", "--from", f"postgres:{dsn}", "--to", f"log:{back}")
    assert copy_back.returncode == 0, copy_back.stderr
    on_log = ServerProcess(tmp_path / "log2")
    on_log.data_dir = back
    on_log.start()
    try:
        assert listing(on_log.kcp_port) == before
    finally:
        on_log.kill()


def test_storage_copy_refuses_a_log_in_use_and_bad_endpoints(
    database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = database()
    running = ServerProcess(tmp_path / "running").start()
    try:
        copy = kairoi(
            "storage", "copy", "--from", f"log:{running.data_dir}", "--to", f"postgres:{dsn}"
        )
        assert copy.returncode == 1
        assert "already in use by another kairoi-trio server" in copy.stderr
    finally:
        running.kill()
    with psycopg.connect(dsn) as conn:  # the failed copy left the target empty
        assert conn.execute("SELECT count(*) FROM kairoi.jobs").fetchone() == (0,)
    unknown = kairoi("storage", "copy", "--from", "mysql:x", "--to", "log:/tmp/y")
    assert unknown.returncode == 2
    assert "expected log:DIRECTORY or postgres:DSN" in unknown.stderr
    same = kairoi("storage", "copy", "--from", "log:/tmp/a", "--to", "log:/tmp/b")
    assert same.returncode == 2 and "kairoi-trio backup" in same.stderr


async def test_the_store_hears_other_instances_as_soon_as_it_has_started(
    postgres_dsn: str,
) -> None:
    """`run` reports started only once its listener LISTENs: a change another
    instance makes right after (a watcher subscribed as soon as the instance was
    ready, a SET through another instance) is never missed. It was, under load,
    when the listener connected in the background after the instance was ready."""
    import json

    import trio

    from kairoi_trio.config import PostgresConfig
    from kairoi_trio.storage.postgres.store import JOBS_CHANNEL, PostgresStore

    store = PostgresStore(PostgresConfig(dsn=postgres_dsn))
    await trio.to_thread.run_sync(store.open)
    store.has_watchers = lambda: True
    heard: list[str] = []
    got = trio.Event()

    async def changed(ids: list[str]) -> None:
        heard.extend(ids)
        got.set()

    async def probe() -> None:
        pass

    other = psycopg.connect(postgres_dsn, autocommit=True)  # connected beforehand: at once

    def notify_from_another_instance() -> None:
        payload = json.dumps(["another-instance", ["shared.1"]])
        other.execute("SELECT pg_notify(%s, %s)", (JOBS_CHANNEL, payload))

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run, lambda due: None, changed, probe)
            await trio.to_thread.run_sync(notify_from_another_instance)
            with trio.move_on_after(5):
                await got.wait()
            nursery.cancel_scope.cancel()
    finally:
        other.close()
        await trio.to_thread.run_sync(store.close)
    assert heard == ["shared.1"]
