"""The real PostgreSQL for the storage tests: a private cluster, a fresh database per test.

The tests run against a PostgreSQL cluster of their own (scripts/postgres.sh):
its own data directory, port, Unix socket directory and log, on 127.0.0.1
only. They never touch another cluster, in particular not a developer's on
127.0.0.1:5432 or the one in /var/lib/postgresql: every helper here
(`restart`, `stop`, `start`, `fresh_database`, `drop_database`,
`postmaster_pid`) checks first that it addresses that private cluster (not
port 5432, a directory claimed by scripts/postgres.sh whose node.env names the
same port and the data directory DIR/data) and goes through
`scripts/postgres.sh ctl`, which drives pg_ctl on that data directory only.

- Under scripts/test.sh, the cluster is already running and the script exported
  its settings (KAIROI_TEST_POSTGRES_DIR, _PORT, _DSN, _DATA, _BIN, ...); the
  script stops it at the end.
- Under plain pytest (no KAIROI_TEST_POSTGRES_DIR), `ensure_cluster()` starts a
  cluster in a fresh temporary directory (`--owner` this process), and
  `stop_started_cluster()` (at session end, and at exit) stops it and removes
  the directory.

Each test gets a database of its own (`fresh_database`, the `postgres_dsn`
fixture of tests/conftest.py), dropped after it (`drop_database`). See
docs/testing.md.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "postgres.sh"
DEFAULT_PORT = 5432  # a developer's cluster, never ours
HOST = "127.0.0.1"
ADMIN_USER = "postgres"
MARKER = ".kairoi-private-node"  # scripts/private-node.sh's PRIVATE_MARKER
DATABASE_PREFIX = "kairoi_test_"
SHUTDOWN_MODES = ("smart", "fast", "immediate")
CONNECT_TIMEOUT_S = 10
READY_TIMEOUT_S = 60.0

_env = os.environ
#: Started by someone else (scripts/test.sh, or by hand): we use it, never stop it.
EXTERNAL = "KAIROI_TEST_POSTGRES_DIR" in _env


@dataclass(frozen=True)
class Cluster:
    """A cluster started by scripts/postgres.sh, as its node.env describes it."""

    directory: Path
    port: int
    data: Path
    bin: Path

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{ADMIN_USER}@{HOST}:{self.port}/{dbname}"


def read_node_env(directory: Path) -> dict[str, str]:
    """DIR/node.env (KEY=value lines) as a dict."""
    values = {}
    for line in (directory / "node.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def cluster_from(values: Mapping[str, str]) -> Cluster:
    """A cluster from KAIROI_TEST_POSTGRES_* values (node.env, or the environment)."""
    return Cluster(
        directory=Path(values["KAIROI_TEST_POSTGRES_DIR"]),
        port=int(values["KAIROI_TEST_POSTGRES_PORT"]),
        data=Path(values["KAIROI_TEST_POSTGRES_DATA"]),
        bin=Path(values["KAIROI_TEST_POSTGRES_BIN"]),
    )


def check_private(cluster: Cluster) -> Cluster:
    """The cluster, if it is one scripts/postgres.sh made: not on 5432, its
    directory claimed (the marker file), its node.env naming the same port, and
    its data directory DIR/data. Raises RuntimeError otherwise."""
    if cluster.port == DEFAULT_PORT:
        raise RuntimeError(
            f"refusing to act on the PostgreSQL on port {DEFAULT_PORT}: that is where a "
            "developer's own cluster lives (see docs/testing.md)"
        )
    if not (cluster.directory / MARKER).is_file():
        raise RuntimeError(f"refusing: {cluster.directory} is not a directory of {SCRIPT}")
    if cluster.data != cluster.directory / "data":
        raise RuntimeError(f"refusing: {cluster.data} is not {cluster.directory}/data")
    try:
        recorded = cluster_from(read_node_env(cluster.directory))
    except (OSError, KeyError, ValueError) as error:
        raise RuntimeError(f"refusing: no cluster recorded in {cluster.directory}") from error
    if (recorded.directory, recorded.port, recorded.data) != (
        cluster.directory,
        cluster.port,
        cluster.data,
    ):
        raise RuntimeError(f"refusing: {cluster} is not the cluster {recorded.directory} holds")
    return cluster


_cluster: Cluster | None = None
_own_directory: Path | None = None  # made by ensure_cluster(): stopped by us
_started: Exception | bool = False


def ensure_cluster() -> str:
    """Start the private cluster once per session (under scripts/test.sh: check
    that it runs, and start it again or wake it if an interrupted outage test
    left it stopped or frozen). Returns its admin DSN. A failed start fails
    every later call at once."""
    global _started, _cluster, _own_directory
    if isinstance(_started, BaseException):
        raise RuntimeError(f"the test PostgreSQL did not start: {_started}") from _started
    if _started:
        return cluster().dsn()
    try:
        if EXTERNAL:
            _cluster = check_private(cluster_from(_env))
            ensure_running()
        else:
            _own_directory = Path(tempfile.mkdtemp(prefix="kairoi-postgres."))
            atexit.register(stop_started_cluster)
            _script("start", str(_own_directory), "--owner", str(os.getpid()), timeout=600)
            _cluster = check_private(cluster_from(read_node_env(_own_directory)))
    except Exception as error:
        _started = error
        raise
    _started = True
    return cluster().dsn()


def admin_dsn() -> str:
    """The private cluster's DSN as its superuser `postgres`, database `postgres`."""
    return ensure_cluster()


def cluster() -> Cluster:
    """The private cluster, checked again (see `check_private`)."""
    if _cluster is None:
        raise RuntimeError("the test PostgreSQL is not started: call ensure_cluster() first")
    return check_private(_cluster)


def port() -> int:
    return cluster().port


def stop_started_cluster() -> None:
    """Stop the cluster ensure_cluster() started (not one scripts/test.sh started)
    and remove its directory. Safe to call more than once."""
    if EXTERNAL or _own_directory is None or not _own_directory.exists():
        return
    _script("stop", str(_own_directory), timeout=120)


def _script(*args: str, timeout: float) -> str:
    result = subprocess.run(
        [SCRIPT, *args], check=True, stdout=subprocess.PIPE, text=True, timeout=timeout
    )
    return result.stdout


def _ctl(*args: str, of: Cluster | None = None) -> None:
    """pg_ctl on the private cluster, or on `of` (scripts/postgres.sh ctl: its data
    directory only, as the user it runs as)."""
    target = check_private(of) if of is not None else cluster()
    result = subprocess.run(
        [SCRIPT, "ctl", str(target.directory), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=READY_TIMEOUT_S + 30,
    )
    if result.returncode:
        raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {result.stdout.strip()}")


def postmaster_pid() -> int | None:
    """The private cluster's postmaster, or None when it is not running. Checked
    against /proc (a postgres process started with `-D <its data directory>`),
    so a stale or reused pid is never returned."""
    data = cluster().data
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    if comm != "postgres" or f" -D {data} " not in f" {cmdline}":
        return None
    return pid


def _frozen(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def ensure_running() -> None:
    """Undo what an interrupted outage test may have left: a frozen postmaster
    is woken, a stopped cluster started again."""
    pid = postmaster_pid()
    if pid is None:
        start()
    elif _frozen(pid):
        os.kill(pid, signal.SIGCONT)


def stop(mode: str = "fast", of: Cluster | None = None) -> None:
    """Stop the private cluster, or `of` (its directory stays): an outage.
    `start()` ends it."""
    _check_mode(mode)
    _ctl("stop", "-m", mode, "-w", "-t", str(int(READY_TIMEOUT_S)), of=of)


def start(of: Cluster | None = None) -> None:
    """Start the private cluster (or `of`) again after `stop()`; returns once it
    accepts connections."""
    _ctl("start", "-w", "-t", str(int(READY_TIMEOUT_S)), of=of)
    wait_ready(of=of)


def restart(mode: str = "fast", of: Cluster | None = None) -> None:
    """pg_ctl restart of the private cluster or `of` (mode "immediate": a crash
    of the server, with recovery at start); returns once it accepts connections."""
    _check_mode(mode)
    _ctl("restart", "-m", mode, "-w", "-t", str(int(READY_TIMEOUT_S)), of=of)
    wait_ready(of=of)


@contextlib.contextmanager
def own_cluster() -> Iterator[Cluster]:
    """A second private cluster for one test (an outage test stops its database
    and must not stop the one other tests use meanwhile), stopped and removed
    at the end whatever happened."""
    directory = Path(tempfile.mkdtemp(prefix="kairoi-postgres."))
    try:
        _script("start", str(directory), "--owner", str(os.getpid()), timeout=600)
        yield check_private(cluster_from(read_node_env(directory)))
    finally:
        _script("stop", str(directory), timeout=120)


def _check_mode(mode: str) -> None:
    if mode not in SHUTDOWN_MODES:
        raise ValueError(f"shutdown mode {mode!r}: one of {', '.join(SHUTDOWN_MODES)}")


def wait_ready(timeout: float = READY_TIMEOUT_S, of: Cluster | None = None) -> None:
    """Wait until the private cluster (or `of`) accepts a connection."""
    deadline = time.monotonic() + timeout
    dsn = (of or cluster()).dsn()
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connect_admin() -> psycopg.Connection:
    """An autocommit connection to the `postgres` database as superuser."""
    return psycopg.connect(admin_dsn(), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


def database_name(prefix: str) -> str:
    """A unique database name: kairoi_test_<prefix, as [a-z0-9_]>_<10 hex digits>."""
    cleaned = re.sub(r"[^a-z0-9]+", "_", prefix.lower()).strip("_")[:30]
    return f"{DATABASE_PREFIX}{cleaned or 'db'}_{uuid.uuid4().hex[:10]}"


def fresh_database(prefix: str = "db") -> str:
    """CREATE DATABASE with a unique name on the private cluster; returns its DSN."""
    ensure_cluster()
    name = database_name(prefix)
    with connect_admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return cluster().dsn(name)


def drop_database(dsn: str) -> None:
    """Drop a database `fresh_database` made: its remaining connections are
    terminated first. Refuses any other database or cluster. A cluster a test
    left stopped or frozen is brought back first."""
    params = conninfo_to_dict(dsn)
    name = str(params.get("dbname", ""))
    if (params.get("host"), str(params.get("port"))) != (HOST, str(port())):
        raise RuntimeError(f"refusing to drop a database outside the private cluster: {dsn}")
    if not name.startswith(DATABASE_PREFIX):
        raise RuntimeError(f"refusing to drop {name!r}: not made by fresh_database()")
    ensure_running()
    with connect_admin() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        # FORCE (PostgreSQL 13+) also ends a connection opened since.
        force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(sql.Identifier(name), force))
