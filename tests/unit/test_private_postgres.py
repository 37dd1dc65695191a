"""The tests' PostgreSQL is a cluster of their own: a developer's is never touched.

Real clusters, real processes: scripts/postgres.sh starts each in a directory
of its own, on a free loopback port, and stops it by its data directory only.
These tests pin down that the suite's cluster is private and loopback-only,
that the helpers of tests/support/postgres.py reach it and nothing else, that
clusters started side by side stop one by one (by hand or, when their owner
died, by `reap`), and that a developer's cluster on 5432 comes through it all.
The session fixture in tests/conftest.py also checks, after every run, that
whatever listened on 5432 still does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import amqp_broker as broker
import psycopg
import pytest
import support.postgres as pg
from psycopg.conninfo import conninfo_to_dict

SCRIPT = pg.SCRIPT


def _script(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], check=True, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _start_clusters(*owners: int, cwd: Path) -> list[pg.Cluster]:
    """Start one private cluster per owner pid, side by side, from `cwd`."""
    directories = [Path(tempfile.mkdtemp(prefix="kairoi-postgres.")) for _ in owners]
    starts = [
        subprocess.Popen(
            [SCRIPT, "start", str(directory), "--owner", str(owner)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for directory, owner in zip(directories, owners, strict=True)
    ]
    failures = []
    for start in starts:
        output, _ = start.communicate(timeout=120)
        if start.returncode:
            failures.append(output)
    if failures:
        for directory in directories:
            subprocess.run([SCRIPT, "stop", str(directory)], timeout=60)
        pytest.fail("scripts/postgres.sh start failed:\n" + "\n".join(failures))
    return [pg.check_private(pg.cluster_from(pg.read_node_env(d))) for d in directories]


def _postmaster_pid(cluster: pg.Cluster) -> int:
    """The running cluster's postmaster pid (from its postmaster.pid; fails without one)."""
    return int((cluster.data / "postmaster.pid").read_text().split("\n", 1)[0])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def _listening_addresses(port: int) -> set[str]:
    """The local addresses (as /proc/net/tcp{,6} spell them) listening on `port`."""
    addresses = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                addresses.add(address)
    return addresses


def test_the_suite_cluster_is_private_and_loopback_only() -> None:
    dsn = pg.admin_dsn()
    cluster = pg.cluster()
    assert cluster.port != pg.DEFAULT_PORT
    assert dsn == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    if not pg.EXTERNAL:
        assert cluster.directory.is_relative_to(tempfile.gettempdir())
    with psycopg.connect(dsn) as conn:

        def show(name: str) -> str:
            row = conn.execute(f"SHOW {name}").fetchone()
            assert row is not None
            return row[0]

        assert show("port") == str(cluster.port)
        assert show("listen_addresses") == "127.0.0.1"
        assert show("unix_socket_directories") == str(cluster.directory)
        assert Path(show("data_directory")) == cluster.data == cluster.directory / "data"
        assert (show("fsync"), show("full_page_writes")) == ("off", "off")
        assert show("synchronous_commit") == "on"
        assert show("max_connections") == "300"
        rules = conn.execute("SELECT type, address FROM pg_hba_file_rules").fetchall()
        assert rules and all(kind == "local" or address == "127.0.0.1" for kind, address in rules)
    assert not cluster.data.is_relative_to("/var/lib/postgresql")
    # Served on 127.0.0.1 only (0100007F in /proc), by the checked postmaster.
    assert _listening_addresses(cluster.port) == {"0100007F"}
    serving = broker.listener(cluster.port)
    assert serving is not None and serving.pid in (pg.postmaster_pid(), None)
    for family, host in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as sock, pytest.raises(OSError):
            sock.settimeout(5)
            sock.connect((host, cluster.port))
    # `psql DIR` reaches that cluster.
    out = _script("psql", str(cluster.directory), "-XAtc", "SELECT current_setting('port')")
    assert out.stdout.strip() == str(cluster.port)


def test_a_fresh_database_is_empty_and_drop_database_removes_it() -> None:
    dsn = pg.fresh_database("probe")
    other = pg.fresh_database("probe")
    name = conninfo_to_dict(dsn)["dbname"]
    assert name != conninfo_to_dict(other)["dbname"]
    assert str(name).startswith("kairoi_test_probe_")
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        ).fetchone()
        assert row == (0,)
        conn.execute("CREATE TABLE t (n int)")
    lingering = psycopg.connect(dsn)  # drop_database ends it
    try:
        pg.drop_database(dsn)
        with pytest.raises(psycopg.OperationalError):
            lingering.execute("SELECT 1")
    finally:
        lingering.close()
    pg.drop_database(other)
    with pg.connect_admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'kairoi_test_probe_%%'"
            " AND datname IN (%s, %s)",
            (name, conninfo_to_dict(other)["dbname"]),
        ).fetchone()
        assert row == (0,)
    # Only databases fresh_database made, only on the private cluster.
    with pytest.raises(RuntimeError, match="not made by fresh_database"):
        pg.drop_database(pg.admin_dsn())
    with pytest.raises(RuntimeError, match="outside the private cluster"):
        pg.drop_database("postgresql://postgres@127.0.0.1:5432/kairoi_test_x")


def test_the_postgres_dsn_fixture_gives_a_database_of_the_private_cluster(
    postgres_dsn: str,
) -> None:
    params = conninfo_to_dict(postgres_dsn)
    port = params["port"]
    assert port is not None
    assert (params["host"], int(port)) == ("127.0.0.1", pg.port())
    assert str(params["dbname"]).startswith("kairoi_test_")
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (params["dbname"],)


def test_the_helpers_refuse_anything_but_the_private_cluster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pg.ensure_cluster()
    real = pg.cluster()
    default = pg.Cluster(real.directory, pg.DEFAULT_PORT, real.data, real.bin)
    for cluster in (
        default,
        pg.Cluster(tmp_path, 25000, tmp_path / "data", real.bin),  # no marker
        pg.Cluster(real.directory, real.port, Path("/var/lib/postgresql/15/main"), real.bin),
        pg.Cluster(real.directory, real.port + 1, real.data, real.bin),  # not its node.env
    ):
        with pytest.raises(RuntimeError, match="refusing"):
            pg.check_private(cluster)
    pid = pg.postmaster_pid()
    monkeypatch.setattr(pg, "_cluster", default)
    for action in (pg.restart, pg.stop, pg.start, pg.postmaster_pid):
        with pytest.raises(RuntimeError, match="port 5432"):
            action()
    monkeypatch.undo()
    assert pg.postmaster_pid() == pid


def test_a_second_cluster_gets_another_port_and_stops_alone(tmp_path: Path) -> None:
    """Also: started from a directory the postgres user cannot read (tmp_path)."""
    pg.ensure_cluster()
    suite = pg.cluster()
    suite_pid = pg.postmaster_pid()
    (other,) = _start_clusters(os.getpid(), cwd=tmp_path)
    try:
        assert other.port not in (suite.port, pg.DEFAULT_PORT)
        assert other.directory != suite.directory
        assert _answers(other.dsn()) and _answers(suite.dsn())
        other_pid = _postmaster_pid(other)
        assert _script("status", str(other.directory)).returncode == 0
    finally:
        _script("stop", str(other.directory))
    assert not other.directory.exists()
    assert not _alive(other_pid)
    assert not _answers(other.dsn())
    assert _answers(suite.dsn()) and pg.postmaster_pid() == suite_pid


def test_reap_stops_the_clusters_whose_owner_died_only(tmp_path: Path) -> None:
    owner = subprocess.Popen(["sleep", "60"])
    orphan, living = _start_clusters(owner.pid, os.getpid(), cwd=tmp_path)
    try:
        orphan_pid, living_pid = _postmaster_pid(orphan), _postmaster_pid(living)
        owner.kill()
        owner.wait()
        _script("reap")
        assert not orphan.directory.exists() and not _alive(orphan_pid)
        assert living.directory.exists() and _postmaster(living) == living_pid
        assert _answers(living.dsn())
    finally:
        owner.kill()
        owner.wait()
        _script("stop", str(orphan.directory))
        _script("stop", str(living.directory))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_committed_data(mode: str) -> None:
    # a cluster of its own: the suite's is shared with tests running beside this one
    with pg.own_cluster() as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        before = _postmaster_pid(cluster)
        pg.restart(mode, of=cluster)
        after = _postmaster(cluster)
        assert after is not None and after != before
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("SELECT count(*), sum(n) FROM t").fetchone() == (1000, 500500)


def test_stop_and_start_make_an_outage() -> None:
    with pg.own_cluster() as cluster:
        pg.stop(of=cluster)
        try:
            assert _postmaster(cluster) is None
            assert not _answers(cluster.dsn())
        finally:
            pg.start(of=cluster)
        assert _answers(cluster.dsn())


def _postmaster(cluster: pg.Cluster) -> int | None:
    """The cluster's postmaster pid, or None when it is not running."""
    try:
        pid = int((cluster.data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _port_free(port: int) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_a_developers_cluster_on_5432_survives_reap_and_a_private_cluster(
    tmp_path: Path,
) -> None:
    """A stand-in for a developer's cluster: started and stopped by this test
    itself, on 5432 with its socket in a directory of its own."""
    if broker.listener(pg.DEFAULT_PORT) is not None or not _port_free(pg.DEFAULT_PORT):
        pytest.skip("port 5432 is taken: no developer's cluster to stand in for")
    pg.ensure_cluster()
    bin_dir = pg.cluster().bin
    home = Path(tempfile.mkdtemp(prefix="developer-postgres."))
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if as_user:
        shutil.chown(home, "postgres", "postgres")

    def run(*args: str | Path) -> None:
        subprocess.run(
            [*as_user, *map(str, args)], check=True, capture_output=True, timeout=60, cwd=home
        )

    data = home / "data"
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-N", "--locale=C")
        options = f"-p {pg.DEFAULT_PORT} -k {home} -c listen_addresses=127.0.0.1"
        run(bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", home / "log", "-w", "start")
        developer = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        developer_dsn = f"postgresql://postgres@127.0.0.1:{pg.DEFAULT_PORT}/postgres"
        assert _answers(developer_dsn)

        _script("reap")
        (private,) = _start_clusters(os.getpid(), cwd=tmp_path)
        _script("stop", str(private.directory))

        serving = broker.listener(pg.DEFAULT_PORT)
        assert serving is not None and serving.pid in (developer, None)
        assert _alive(developer) and _answers(developer_dsn)
    finally:
        if (data / "postmaster.pid").exists():
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(home)
    assert broker.listener(pg.DEFAULT_PORT) is None
