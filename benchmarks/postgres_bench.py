"""The PostgreSQL store (issue 10): several instances on one database, measured beside the floor.

    .venv/bin/python -m benchmarks.postgres_bench [--quick] [--only PARTS] [--profile]
                                                  [--json FILE] [--keep]

A private PostgreSQL cluster (scripts/postgres.sh, a free port on 127.0.0.1,
stopped and removed at the end whatever happens) is started for the run and
made durable: `ALTER SYSTEM SET fsync = on, full_page_writes = on,
synchronous_commit = on` (the script's test settings turn fsync off), then a
restart, and the settings are read back. A private RabbitMQ node
(tests/amqp_broker.py, as benchmarks/amqp_bench.py) receives the AMQP runs.
Every server is a real `kairoi-trio serve` process (port 0 everywhere, JSON
log on stderr); every PostgreSQL case gets a fresh database.

Parts (`--only fsync,floor,...`; all by default, in this order):
  fsync     fdatasync rate of the data directory's disk: one 8 kB write at
            offset 0 + fdatasync, in a loop (pg_test_fsync's "fdatasync" line)
  explain   1,000,000 planned jobs (and 5,000 due) in a database: EXPLAIN
            ANALYZE of the claim and of every per-batch statement (1,000 ids),
            each also timed from the client; NOTIFY's cost per commit
  set       durable SET/s through one instance: KCP pipelined (benchmarks/loadgen.py,
            1 and 4 connections), gRPC SetJobs (batches of 1,000, 1 and 4 callers);
            with the server's CPU, PostgreSQL's CPU, WAL bytes and group commits
  floor     the database alone, the same rows: serial 1-row commits, then batches
            (1,000 rows, and the mean group commit of the KCP run) one transaction
            each: the server's multi-row INSERT, COPY, and the server's whole
            statement sequence of a batch
  dispatch  N jobs due at one instant, an AMQP rule: 1, 2 and 3 instances, and
            the embedded log; time from the due time to the last "job run",
            every job run exactly once (runs counted from every instance's log,
            the queue's message count, the jobs' statuses)
  lateness  jobs due 10 ms apart (AMQP): run start - due time, p50/p99/max;
            the embedded log before the seam (181fe32) and at HEAD, PostgreSQL
            with one and two instances
  failover  two instances; the victim holds runs in flight (its shell runs
            sleep, by an environment variable only it has) and is SIGKILLed:
            time from the kill to the other instance's re-run of every job the
            victim had triggered, for lease_s 2, 5, 15 (heartbeat_s = lease/4)
  seam      the embedded log before the seam (181fe32) and at HEAD, alternating:
            pipelined SET/s (1 connection, fsync on) and restart to ready with
            1,000,000 jobs (the lateness part has their lateness)
Only when named (`--only ...,locks`, `--profile`):
  locks     two instances, each SET by 4 pipelined connections at once, on the
            cluster restarted with PostgreSQL's default max_connections (100)
            and max_locks_per_transaction (64): SETs refused for want of lock
            table room? (Before 7886177 a batch took an advisory lock per new
            id, up to 8,192, and most of these SETs were refused.)
  set_ab    the KCP SET case (1 connection) alternating the code at --ab
            (default 626bac4, the advisory locks before 7886177) and HEAD
  profile   py-spy (100 Hz) on one more KCP SET run and one more dispatch run
            of a single instance; self and inclusive shares

Both code versions are exported with `git archive` and run with
PYTHONPATH=<export>/src (the shared working tree's uncommitted edits are not
measured). Only 127.0.0.1 is contacted; every wait is bounded.
"""

# ruff: noqa: E501  (the report is long markdown lines)
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.__main__ import loadgen, machine
from benchmarks.amqp_bench import Kcp
from benchmarks.fsync_floor import fdatasync_rate
from benchmarks.grpc_bench import Client, aggregate_stacks
from benchmarks.lateness import fmt_time
from benchmarks.profile import Profiler
from benchmarks.server import (
    cpu_seconds,
    events_named,
    load_average,
    loop_cpu_seconds,
    machine_cpu,
    proc_status_kib,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "postgres.sh"
BEFORE_SEAM = "181fe32"
TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 90.0
CHUNK = 10_000
SCHEMA = "kairoi"

TARGET_SET_PER_S = 10_000
TARGET_DISPATCH_PER_S = 5_000
TARGET_FAILOVER_LEASES = 2.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load1() -> float:
    return load_average()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p99": pct(values, 0.99),
        "max": max(values),
        "min": min(values),
    }


def stamp(event: dict) -> float:
    """A structlog ISO timestamp (UTC) as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


# -- the private PostgreSQL ---------------------------------------------------------------


class Cluster:
    """A private cluster of scripts/postgres.sh, made durable for the benchmark."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="kairoi-postgres."))
        self.port = 0
        self.started = False
        self.settings: dict[str, str] = {}

    def start(self) -> Cluster:
        atexit.register(self.stop)
        self.started = True
        self._script("start", str(self.directory), "--owner", str(os.getpid()))
        for line in (self.directory / "node.env").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "KAIROI_TEST_POSTGRES_PORT":
                self.port = int(value)
        # The script's cluster is a test cluster (fsync off): make it durable.
        durable = {
            "fsync": "on",
            "full_page_writes": "on",
            "synchronous_commit": "on",
            "track_wal_io_timing": "on",
        }
        with self.admin() as conn:
            for name, value in durable.items():
                conn.execute(f"ALTER SYSTEM SET {name} = {value}")
        self._script("ctl", str(self.directory), "restart", "-w", "-m", "fast", "-t", "60")
        with self.admin() as conn:
            names = [
                *durable,
                "wal_sync_method",
                "shared_buffers",
                "max_wal_size",
                "server_version",
            ]
            for name in names:
                (self.settings[name],) = conn.execute(f"SHOW {name}").fetchone()
        for name, value in durable.items():
            if self.settings[name] != value:
                raise RuntimeError(f"{name} is {self.settings[name]}, not {value}")
        return self

    def stop(self) -> None:
        if self.started and self.directory.exists():
            self.started = False
            try:
                self._script("stop", str(self.directory))
            except Exception as error:  # noqa: BLE001 - at exit, say it and go on
                log(f"could not stop the PostgreSQL in {self.directory}: {error}")

    def _script(self, *args: str) -> None:
        subprocess.run([str(SCRIPT), *args], check=True, timeout=300, stdout=subprocess.DEVNULL)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def admin(self, db: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.dsn(db), autocommit=True)

    def fresh(self, name: str) -> str:
        """A new empty database; its DSN. Then a CHECKPOINT: the earlier cases' dirty
        pages are written out before this case starts, not by the checkpointer
        during it (measured: up to 1.6 s of other CPU in a dispatch case that
        followed the SET cases)."""
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
            conn.execute("CHECKPOINT")
        return self.dsn(name)

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def postmaster(self) -> int:
        return int((self.directory / "data" / "postmaster.pid").read_text().split()[0])

    def cpu(self) -> float:
        """CPU-seconds of the whole cluster: the postmaster, its live children and
        the children it reaped (cutime, cstime)."""
        pm = self.postmaster()
        with open(f"/proc/{pm}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = sum(int(v) for v in fields[11:15]) / TICKS
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(rest[1]) == pm:
                total += (int(rest[11]) + int(rest[12])) / TICKS
        return total

    def wal(self) -> dict[str, float]:
        """WAL bytes written since the cluster started (the insert position: exact,
        unlike pg_stat_wal, which backends report up to seconds late)."""
        with self.admin() as conn:
            (lsn,) = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
        return {"bytes": float(lsn)}


def wal_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before}


# -- a kairoi-trio instance --------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


class Instance:
    """`kairoi-trio serve` (of `src`, or the installed code), its JSON log kept with receipt times."""

    def __init__(
        self,
        workdir: Path,
        *,
        dsn: str = "",
        fsync: bool = True,
        tables: dict[str, dict[str, object]] | None = None,
        env: dict[str, str] | None = None,
        src: Path | None = None,
        data: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.dsn = dsn
        self.data = data or workdir / "data"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if src is not None:
            self.env["PYTHONPATH"] = str(src)
        config: dict[str, dict[str, object]] = {
            "log": {"level": "info", "format": "json"},
            "controller": {"listen": "127.0.0.1:0"},
            "grpc": {"listen": "127.0.0.1:0"},
            "metrics": {"listen": "127.0.0.1:0"},
            "database": {"fsync_on_persist": fsync},
            "storage": {"directory": str(self.data)},
            "shutdown": {"grace_period_s": 5.0},
        }
        if dsn:
            config["storage"]["backend"] = "postgres"
            config["storage.postgres"] = {"dsn": dsn}
        for name, values in (tables or {}).items():
            config.setdefault(name, {}).update(values)
        self.config_text = "".join(
            f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"
            for name, values in config.items()
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.lines: list[tuple[float, str]] = []
        self.runs = 0  # "job run" lines so far
        self.kcp_port = self.grpc_port = self.metrics_port = 0
        self.ready_seconds = 0.0
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Instance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "configuration.toml"
        config.write_text(self.config_text)
        started = time.monotonic()
        # The log goes to a file, read as it grows: through a pipe, a reader of this
        # (loaded) process that falls behind would fill it, and the server would wait
        # in write() with its event loop stopped: the benchmark would throttle it.
        log_path = self.workdir / "server.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(config)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=self.env,
            )
        self._log_path = log_path
        self._reader = threading.Thread(target=self._read, args=(started,), daemon=True)
        self._reader.start()
        deadline = started + READY_TIMEOUT_S
        while not self._ready.wait(0.02):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = "\n".join(line for _, line in self.lines[-30:])
                raise RuntimeError(f"server did not start ({self.workdir}):\n{tail}")
        return self

    def _lines(self) -> Any:
        """The log's lines as the server writes them, until it has exited."""
        assert self.process is not None
        with open(self._log_path, "rb") as log_file:
            partial = b""
            while True:
                chunk = log_file.readline()
                if chunk.endswith(b"\n"):
                    yield partial + chunk
                    partial = b""
                elif chunk:
                    partial += chunk
                elif self.process.poll() is not None:  # exited: what is left, and stop
                    rest = partial + log_file.read()
                    yield from (line + b"\n" for line in rest.splitlines())
                    return
                else:
                    time.sleep(0.002)

    def _read(self, started: float) -> None:
        for raw in self._lines():
            now = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append((now, line))
            if '"job run"' in line:
                self.runs += 1
            elif not self._ready.is_set() and '"ready"' in line:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "ready":
                    self.kcp_port = event["kcp_port"]
                    self.grpc_port = event.get("grpc_port") or 0
                    self.metrics_port = event.get("metrics_port") or 0
                    self.ready_seconds = now - started
                    self._ready.set()

    def events(self, name: str) -> list[dict]:
        return events_named((line for _, line in list(self.lines)), name)

    def metrics(self) -> dict[str, float]:
        """The actor's counters from /metrics: commands and group commits."""
        if not self.metrics_port:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        out = {}
        for line in text.splitlines():
            for key in ("kairoi_group_commits_total", "kairoi_commands_total"):
                if line.startswith(key + " "):
                    out[key] = float(line.split()[1])
        return out

    def cpu(self) -> float:
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def loop_cpu(self) -> float:
        try:
            return loop_cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._reader is not None:
            self._reader.join(5)

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)


class Instances:
    """Servers started in a `with` block, stopped (or killed) when it ends."""

    def __init__(self, *servers: Instance) -> None:
        self.servers = list(servers)

    def __enter__(self) -> list[Instance]:
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.__exit__()
            raise
        return self.servers

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            try:
                server.stop()
            finally:
                server.kill()


class Usage:
    """CPU of the instances, the cluster, the broker and the whole machine over a window."""

    def __init__(
        self, servers: list[Instance], cluster: Cluster | None, beam: int | None = None
    ) -> None:
        self.servers, self.cluster, self.beam = servers, cluster, beam
        self.t0 = time.monotonic()
        self.load = load1()
        self.server0 = [s.cpu() for s in servers]
        self.loop0 = [s.loop_cpu() for s in servers]
        self.pg0 = cluster.cpu() if cluster else 0.0
        self.beam0 = cpu_seconds(beam) if beam else 0.0
        self.busy0, _ = machine_cpu()

    def done(self, client_cpu_s: float = 0.0) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        servers = [s.cpu() - c for s, c in zip(self.servers, self.server0, strict=True)]
        loops = [s.loop_cpu() - c for s, c in zip(self.servers, self.loop0, strict=True)]
        pg = (self.cluster.cpu() - self.pg0) if self.cluster else 0.0
        beam = (cpu_seconds(self.beam) - self.beam0) if self.beam else 0.0
        busy, _ = machine_cpu()
        other = (busy - self.busy0) - sum(servers) - pg - beam - client_cpu_s
        return {
            "wall_s": wall,
            "server_cpu_s": servers,
            "loop_cpu_s": loops,  # each server's main thread: busy share = loop / wall
            "postgres_cpu_s": pg,
            "broker_cpu_s": beam,
            "other_cpu_s": max(0.0, other),
            "loadavg_1m": self.load,
        }


# -- helpers over KCP and the database ------------------------------------------------


def kcp_set(port: int, ids: list[str], due_us: list[int]) -> float:
    """SET each id at its due time over one pipelined connection; seconds it took."""
    kcp = Kcp(port)
    started = time.monotonic()
    try:
        for start in range(0, len(ids), CHUNK):
            part = range(start, min(start + CHUNK, len(ids)))
            answers = kcp.pipeline([["SET", ids[i], fmt_time(due_us[i])] for i in part])
            bad = [a for a in answers if a != ["OK"]]
            if bad:
                raise RuntimeError(f"SET failed: {bad[:3]}")
    finally:
        kcp.close()
    return time.monotonic() - started


def kcp_request(port: int, *args: str) -> list[str]:
    kcp = Kcp(port)
    try:
        return kcp.pipeline([list(args)])[0]
    finally:
        kcp.close()


def round_trips(port: int, n: int) -> dict[str, dict[str, float]]:
    """SET then GET one request at a time (each its own batch): ms per answer."""
    kcp = Kcp(port)
    out = {}
    try:
        for verb in ("SET", "GET"):
            times = []
            for i in range(n):
                args = (
                    ["SET", f"rt.{i}", "2031-01-01 00:00:00"]
                    if verb == "SET"
                    else ["GET", f"rt.{i}"]
                )
                t0 = time.perf_counter()
                answer = kcp.pipeline([args])[0]
                times.append((time.perf_counter() - t0) * 1000)
                if answer[0] != "OK":
                    raise RuntimeError(f"{verb}: {answer}")
            out[verb] = spread(times)
    finally:
        kcp.close()
    return out


def group_commits(server: Instance) -> int:
    """The batches the instance's actor applied so far (one transaction each on
    PostgreSQL), from /metrics."""
    return int(server.metrics().get("kairoi_group_commits_total", 0))


def statuses_log(port: int, ids: list[str]) -> Counter[str]:
    kcp = Kcp(port)
    found: Counter[str] = Counter()
    try:
        for start in range(0, len(ids), CHUNK):
            for answer in kcp.pipeline([["GET", i] for i in ids[start : start + CHUNK]]):
                found[answer[1] if answer[0] == "OK" else "error"] += 1
    finally:
        kcp.close()
    return found


def statuses_pg(dsn: str) -> Counter[str]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(f"SELECT status, count(*) FROM {SCHEMA}.jobs GROUP BY 1").fetchall()
    return Counter({status: int(n) for status, n in rows})


def wait_until(test: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def export_source(commit: str, into: Path) -> Path:
    """`git archive <commit> src` unpacked into `into`; its src directory."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "src"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def short_commit(ref: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


class Background:
    """A function run in a thread; join() re-raises what it raised."""

    def __init__(self, function: Any) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                function()
            except BaseException as error:  # noqa: BLE001 - re-raised by join()
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 900.0) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("a background set-up step did not finish")
        if self.error is not None:
            raise self.error


# -- the parts ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.cluster: Cluster | None = None
        self.results: dict[str, Any] = {}
        self.sources: dict[str, Path] = {}
        self.broker_started = False
        self.kcp_rate = 0.0  # SET/s through one instance, for the lead of later parts

    # the broker and code versions

    def broker(self) -> Any:
        sys.path.insert(0, str(ROOT / "tests"))
        import amqp_broker

        if not self.broker_started:
            amqp_broker.ensure_broker()
            self.broker_started = True
        return amqp_broker

    def source(self, name: str) -> Path:
        """The src directory of a code version: "before" (the seam's parent),
        "after" (HEAD) or a commit."""
        if name not in self.sources:
            commit = {"before": BEFORE_SEAM, "after": "HEAD"}.get(name, name)
            self.sources[name] = export_source(commit, self.work / f"code-{name}")
        return self.sources[name]

    # fsync

    def fsync(self) -> dict[str, Any]:
        assert self.cluster is not None
        out = fdatasync_rate(self.cluster.directory, self.args.fsync_seconds)
        log(f"fdatasync: {out['fdatasync_per_s']:,.0f}/s ({out['us_per_sync']:.0f} us each)")
        return dict(out)

    # explain

    def build_explain_db(self) -> None:
        """1,000,000 planned jobs (a day to 31 days ahead) and 5,000 due, vacuumed, analysed."""
        assert self.cluster is not None
        import psycopg

        from kairoi_trio.storage.postgres.schema import migrate

        n = self.args.explain_jobs
        log(f"explain: writing {n:,} planned jobs and 5,000 due ones into a database")
        dsn = self.cluster.fresh("bench_explain")
        now = time.time_ns() // 1000
        t0 = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, SCHEMA)
            conn.execute(f"SET search_path TO {SCHEMA}")
            # The secondary indexes are built after the rows (faster), as the schema defines them.
            indexes = [
                row[0]
                for row in conn.execute(
                    "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'jobs'"
                    " AND indexname <> 'jobs_pkey'",
                    (SCHEMA,),
                )
            ]
            for (name,) in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'jobs'"
                " AND indexname <> 'jobs_pkey'",
                (SCHEMA,),
            ).fetchall():
                conn.execute(f'DROP INDEX "{SCHEMA}"."{name}"')
            conn.execute(
                "INSERT INTO jobs (id, execute_at, status, waits, payload, attempts, last_outcome,"
                " updated_at, recurrence, owner)"
                " SELECT 'job.' || lpad(i::text, 7, '0'),"
                " %s + (hashint4(i)::bigint & 2147483647) %% (30::bigint * 86400000000),"
                " 'planned', true, ''::bytea, 0, '', %s, NULL, NULL"
                " FROM generate_series(0, %s - 1) AS i",
                (now + 86_400_000_000, now, n),
            )
            conn.execute(
                "INSERT INTO jobs (id, execute_at, status, waits, payload, attempts, last_outcome,"
                " updated_at, recurrence, owner)"
                " SELECT 'due.' || lpad(i::text, 5, '0'), %s - 5000 + i, 'planned', true,"
                " ''::bytea, 0, '', %s, NULL, NULL FROM generate_series(0, 4999) AS i",
                (now - 1_000_000, now),
            )
            conn.execute(
                "INSERT INTO job_counts VALUES (0, 'planned', %s)",
                (n + 5000,),
            )
            for definition in indexes:
                conn.execute(definition)
            conn.execute("VACUUM ANALYZE jobs")
            conn.execute("CHECKPOINT")
            row = conn.execute("SELECT pg_total_relation_size('jobs')").fetchone()
            assert row is not None
            (size,) = row
        self.explain_db = {"dsn": dsn, "jobs": n, "due": 5000, "now": now}
        log(f"explain database ready in {time.monotonic() - t0:.1f} s ({size / 2**20:.0f} MiB)")
        self.explain_db["table_mib"] = size / 2**20

    def explain(self) -> dict[str, Any]:
        import psycopg

        from kairoi_trio.model import Status, new_job
        from kairoi_trio.storage.postgres import store as pgstore
        from kairoi_trio.storage.postgres.rows import JOB_SELECT

        if not hasattr(self, "explain_db"):
            self.build_explain_db()
        db = self.explain_db
        now = time.time_ns() // 1000
        owner = "00000000-0000-0000-0000-000000000001"
        existing = [f"job.{i:07d}" for i in range(0, db["jobs"], max(1, db["jobs"] // 1000))][:1000]
        fresh = [f"new.{i:06d}" for i in range(1000)]
        new_jobs = [
            new_job(i, now + 86_400_000_000 + k, Status.PLANNED, b"", 0, "", now)
            for k, i in enumerate(fresh)
        ]
        triggered = [
            new_job(i, now + 86_400_000_000, Status.TRIGGERED, b"", 0, "", now) for i in existing
        ]
        payload = json.dumps([owner, [f"job.{i:07d}" for i in range(480)]], separators=(",", ":"))
        claim = (
            f"SELECT {JOB_SELECT} FROM jobs WHERE waits AND execute_at <= %s"
            " ORDER BY execute_at LIMIT %s FOR UPDATE SKIP LOCKED"
        )
        # (what, SQL, parameters[, statements run first in the same transaction])
        statements: list[tuple] = [
            ("claim 4,096 of 5,000 due (FOR UPDATE SKIP LOCKED)", claim, (now, 4096)),
            (
                "lock 1,000 existing ids (SELECT ... FOR UPDATE)",
                f"SELECT {JOB_SELECT} FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (sorted(existing),),
            ),
            (
                "INSERT 1,000 new jobs at once (unnest)",
                pgstore._INSERT_JOBS,
                pgstore._job_arrays(new_jobs, owner),
            ),
            (
                "bucket locks for 1,000 new ids (hash modulo 256, as the server takes them)",
                "SELECT pg_advisory_xact_lock(%s, b) FROM (SELECT DISTINCT"
                " hashtext(i) & %s AS b FROM unnest(%s::text[]) AS i ORDER BY 1) AS s",
                (pgstore.CREATE_LOCK, pgstore.CREATE_BUCKETS - 1, sorted(fresh)),
            ),
            (
                "advisory locks on 1,000 new ids, one per id (626bac4)",
                "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT"
                " hashtextextended(i, 0) AS h FROM unnest(%s::text[]) AS i ORDER BY 1) AS s",
                (sorted(fresh),),
            ),
            (
                "UPDATE 1,000 jobs to triggered (unnest)",
                pgstore._UPDATE_JOBS,
                pgstore._job_arrays(triggered, owner),
            ),
            ("DELETE 1,000 jobs", "DELETE FROM jobs WHERE id = ANY(%s)", (existing,)),
            ("move the counts", pgstore._MOVE_COUNTS, (3, ["planned", "triggered"], [-5, 5])),
            (
                "next due (LIMIT 1 FOR UPDATE SKIP LOCKED)",
                "SELECT execute_at FROM jobs WHERE waits ORDER BY execute_at LIMIT 1"
                " FOR UPDATE SKIP LOCKED",
                (),
            ),
            ("earliest due (poll: min)", "SELECT min(execute_at) FROM jobs WHERE waits", ()),
            (
                "counts (poll: sum of 16 shards)",
                "SELECT status, sum(n)::bigint FROM job_counts GROUP BY status",
                (),
            ),
            (
                "list a prefix, 100 (ids job.01...)",
                f"SELECT {JOB_SELECT} FROM jobs WHERE id >= %s AND id < %s ORDER BY id LIMIT %s",
                ("job.01", "job.02", 101),
            ),
            (
                "lease sweep: triggered jobs of dead instances",
                pgstore._FREE_TRIGGERED.strip(),
                ([owner],),
            ),
            (
                "NOTIFY of 480 job ids (6.9 kB payload)",
                "SELECT pg_notify(%s, %s)",
                ("kairoi_bench", payload),
            ),
        ]
        out: list[dict[str, Any]] = []
        load = load1()
        with psycopg.connect(db["dsn"]) as conn:
            conn.execute(f"SET search_path TO {SCHEMA}")
            conn.commit()
            for name, sql, params, *first in statements:
                setup = first[0] if first else []
                times = []
                for _ in range(self.args.explain_repeat):
                    for before, args in setup:
                        conn.execute(before, args)
                    t0 = time.perf_counter()
                    conn.execute(sql, params or None)
                    times.append((time.perf_counter() - t0) * 1000)
                    conn.rollback()
                for before, args in setup:
                    conn.execute(before, args)
                row = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params or None
                ).fetchone()
                assert row is not None
                (plan,) = row
                conn.rollback()
                top = plan[0]
                out.append(
                    {
                        "statement": name,
                        "client_ms_median": statistics.median(times),
                        "client_ms_min": min(times),
                        "execution_ms": top["Execution Time"],
                        "planning_ms": top["Planning Time"],
                        "plan": plan_summary(top["Plan"]),
                    }
                )
                log(
                    f"explain: {name}: {out[-1]['client_ms_median']:.2f} ms from the client,"
                    f" {top['Execution Time']:.2f} ms executing; {out[-1]['plan']}"
                )
            # the claim while another transaction holds the oldest 4,096 due jobs
            with psycopg.connect(db["dsn"]) as other:
                other.execute(f"SET search_path TO {SCHEMA}")
                other.execute(claim, (now, 4096)).fetchall()
                times = []
                for _ in range(self.args.explain_repeat):
                    t0 = time.perf_counter()
                    got = len(conn.execute(claim, (now, 4096)).fetchall())
                    times.append((time.perf_counter() - t0) * 1000)
                    conn.rollback()
                row = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claim, (now, 4096)
                ).fetchone()
                assert row is not None
                (plan,) = row
                conn.rollback()
                other.rollback()
            out.append(
                {
                    "statement": f"claim behind another instance's 4,096 locked rows ({got} left)",
                    "client_ms_median": statistics.median(times),
                    "client_ms_min": min(times),
                    "execution_ms": plan[0]["Execution Time"],
                    "planning_ms": plan[0]["Planning Time"],
                    "plan": plan_summary(plan[0]["Plan"]),
                }
            )
            log(f"explain: claim behind locks: {out[-1]['client_ms_median']:.2f} ms")
        return {
            "jobs": db["jobs"],
            "due": db["due"],
            "table_mib": db["table_mib"],
            "loadavg_1m": load,
            "statements": out,
            "notify": self.notify_cost(db["dsn"]),
        }

    def notify_cost(self, dsn: str) -> dict[str, Any]:
        """Commits/s of 1-row INSERT transactions, without and with a 6.9 kB NOTIFY,
        from 1 and 4 connections at once (one LISTENer reads meanwhile); and the
        CPU cost of a NOTIFY alone (synchronous_commit off for that session)."""
        import psycopg

        payload = "x" * 6900
        seconds = self.args.notify_seconds
        stop = threading.Event()
        heard = [0]

        def listen() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("LISTEN kairoi_bench")
                while not stop.is_set():
                    heard[0] += sum(1 for _ in conn.notifies(timeout=0.2))

        def loop(notify: bool, sync: bool, counts: list[int], k: int, until: float) -> None:
            with psycopg.connect(dsn, application_name="kairoi-notify-bench") as conn:
                if not sync:
                    conn.execute("SET synchronous_commit = off")
                conn.commit()
                while time.perf_counter() < until:
                    conn.execute("INSERT INTO public.notify_bench VALUES (%s)", (k,))
                    if notify:
                        conn.execute("SELECT pg_notify('kairoi_bench', %s)", (payload,))
                    conn.commit()
                    counts[k] += 1

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS public.notify_bench (n int)")
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        time.sleep(0.3)
        out: dict[str, Any] = {"seconds": seconds, "loadavg_1m": load1(), "cases": []}
        cases = [(1, False, True), (1, True, True), (4, False, True), (4, True, True)]
        cases += [(1, False, False), (1, True, False)]
        for conns, notify, sync in cases:
            counts = [0] * conns
            until = time.perf_counter() + seconds
            threads = [
                threading.Thread(target=loop, args=(notify, sync, counts, k, until))
                for k in range(conns)
            ]
            for thread in threads:
                thread.start()
            waits = self.wait_events(dsn, until)
            for thread in threads:
                thread.join(seconds + 30)
            rate = sum(counts) / seconds
            out["cases"].append(
                {
                    "conns": conns,
                    "notify": notify,
                    "synchronous_commit": sync,
                    "commits_per_s": rate,
                    "wait_events": waits,
                }
            )
            log(
                f"NOTIFY: {conns} connection(s), {'with' if notify else 'without'} NOTIFY,"
                f" synchronous_commit {'on' if sync else 'off'}: {rate:,.0f} commits/s;"
                f" the connections' states: {waits}"
            )
        time.sleep(0.5)
        stop.set()
        listener.join(5)
        out["heard"] = heard[0]
        return out

    @staticmethod
    def wait_events(dsn: str, until: float) -> dict[str, float]:
        """What the benchmark's connections are doing, sampled every 2 ms until
        `until`: shares of "running", "Lock:object" (waiting for the NOTIFY commit
        lock on "database 0"), "IO:WALSync", "idle in transaction" and the like."""
        import psycopg

        seen: Counter[str] = Counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.perf_counter() < until:
                for state, kind, event in conn.execute(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                    " WHERE application_name = 'kairoi-notify-bench'"
                ):
                    if state == "active":
                        seen[f"{kind}:{event}" if kind else "running"] += 1
                    else:
                        seen[state or "?"] += 1
                time.sleep(0.002)
        total = sum(seen.values()) or 1
        return {name: round(n / total, 3) for name, n in seen.most_common(4)}

    # set

    def set_cases(self) -> list[dict[str, Any]]:
        assert self.cluster is not None
        count = self.args.count
        cases = [("kcp", 1), ("kcp", 4), ("grpc", 1), ("grpc", 4)]
        out = []
        for via, conns in cases:
            name = f"set_{via}_{conns}"
            dsn = self.cluster.fresh(f"bench_{name}")
            server = Instance(self.work / name, dsn=dsn)
            with Instances(server):
                out.append(self.set_once(server, via, conns, count, name))
            self.cluster.drop(f"bench_{name}")
            shutil.rmtree(self.work / name, ignore_errors=True)
        kcp1 = out[0]
        self.kcp_rate = kcp1["sets_per_s"]
        return out

    def set_once(self, server: Instance, via: str, conns: int, count: int, name: str) -> dict:
        assert self.cluster is not None
        m0, wal0 = server.metrics(), self.cluster.wal()
        usage = Usage([server], self.cluster)
        if via == "kcp":
            result = loadgen(server, count, conns, 10_000, f"{name}.")  # type: ignore[arg-type]
            rate, client_cpu = result["sets_per_s"], result["client_cpu_s"]
            extra = {"seconds": result["seconds"]}
        else:
            client = Client(
                "batches",
                port=server.grpc_port,
                callers=conns,
                batches=max(1, count // 1000),
                size=1000,
                prefix=f"{name}.",
            )
            try:
                client.expect("READY", timeout=120)
                usage = Usage([server], self.cluster)
                m0, wal0 = server.metrics(), self.cluster.wal()
                client.go()
                client.expect("DONE", timeout=300)
                result = client.result()
            finally:
                client.kill()
            rate, client_cpu = result["jobs_per_s"], result["client_cpu_s"]
            extra = {
                "seconds": result["seconds"],
                "batch_p50_ms": result.get("p50_ms"),
                "batch_p99_ms": result.get("p99_ms"),
            }
        used = usage.done(client_cpu)
        m1, wal1 = server.metrics(), self.cluster.wal()
        commits = m1.get("kairoi_group_commits_total", 0) - m0.get("kairoi_group_commits_total", 0)
        commands = m1.get("kairoi_commands_total", 0) - m0.get("kairoi_commands_total", 0)
        wal = wal_delta(wal0, wal1)
        out = {
            "case": f"{via} {conns}",
            "via": via,
            "conns": conns,
            "count": count,
            "sets_per_s": rate,
            "group_commits": commits,
            "commands_per_commit": commands / commits if commits else None,
            "ms_per_commit": extra["seconds"] / commits * 1000 if commits else None,
            "server_cpu_us_per_set": used["server_cpu_s"][0] / count * 1e6,
            "postgres_cpu_us_per_set": used["postgres_cpu_s"] / count * 1e6,
            "wal": wal,
            "wal_bytes_per_set": wal["bytes"] / count,
            **used,
            **extra,
        }
        log(
            f"SET {via} x{conns}: {rate:,.0f}/s; {commits:.0f} group commits"
            f" ({out['commands_per_commit'] or 0:,.0f} commands each); server"
            f" {out['server_cpu_us_per_set']:.0f} us CPU/SET, PostgreSQL"
            f" {out['postgres_cpu_us_per_set']:.0f} us; {out['ms_per_commit'] or 0:.0f} ms a commit,"
            f" {out['wal_bytes_per_set']:.0f} B/SET; other CPU {used['other_cpu_s']:.1f} s;"
            f" load {used['loadavg_1m']}"
        )
        return out

    # floor

    def floor(self, batch_sizes: list[int]) -> dict[str, Any]:
        assert self.cluster is not None
        import psycopg

        from kairoi_trio.model import Status, new_job
        from kairoi_trio.storage.postgres import store as pgstore
        from kairoi_trio.storage.postgres.rows import JOB_SELECT, job_row
        from kairoi_trio.storage.postgres.schema import migrate

        dsn = self.cluster.fresh("bench_floor")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn, SCHEMA)
        owner = "00000000-0000-0000-0000-000000000002"
        base = 1_893_456_000 * 1_000_000
        now = time.time_ns() // 1000
        serial = [0]

        def rows(size: int) -> list:
            start = serial[0]
            serial[0] += size
            return [
                new_job(
                    f"floor.{i}",
                    base + (i * 2_654_435_761) % (10 * 365 * 86400) * 1_000_000,
                    Status.PLANNED,
                    b"",
                    0,
                    "",
                    now,
                )
                for i in range(start, start + size)
            ]

        def server_like(conn: Any, jobs: list) -> None:
            ids = sorted(job.id for job in jobs)
            with conn.pipeline():  # the load: the new ids' bucket locks, then the locked read
                conn.execute("SELECT value FROM settings WHERE key = 'rules_version'")
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, b) FROM (SELECT DISTINCT"
                    " hashtext(i) & %s AS b FROM unnest(%s::text[]) AS i ORDER BY 1) AS s",
                    (pgstore.CREATE_LOCK, pgstore.CREATE_BUCKETS - 1, ids),
                )
                conn.execute(
                    f"SELECT {JOB_SELECT} FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                    (ids,),
                )
            with conn.pipeline():  # the write: the new rows
                conn.execute(pgstore._INSERT_JOBS, pgstore._job_arrays(jobs, owner))
                conn.execute(pgstore._MOVE_COUNTS, (1, ["planned"], [len(jobs)]))
                chunk: list[str] = []
                for job_id in ids:
                    chunk.append(job_id)
                    if len(chunk) == 400:
                        conn.execute(
                            "SELECT pg_notify(%s, %s)", ("kairoi_jobs", json.dumps([owner, chunk]))
                        )
                        chunk = []
                if chunk:
                    conn.execute(
                        "SELECT pg_notify(%s, %s)", ("kairoi_jobs", json.dumps([owner, chunk]))
                    )

        def copy(conn: Any, jobs: list) -> None:
            with conn.cursor().copy(f"COPY jobs ({JOB_SELECT}, owner) FROM STDIN") as writer:
                for job in jobs:
                    writer.write_row((*job_row(job), None))

        def unnest(conn: Any, jobs: list) -> None:
            conn.execute(pgstore._INSERT_JOBS, pgstore._job_arrays(jobs, owner))

        out: dict[str, Any] = {"cases": []}
        with psycopg.connect(dsn) as conn:
            conn.execute(f"SET search_path TO {SCHEMA}")
            conn.commit()
            # serial 1-row commits: the database's commit rate, one client
            wal0, usage = self.cluster.wal(), Usage([], self.cluster)
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < self.args.fsync_seconds:
                unnest(conn, rows(1))
                conn.commit()
                n += 1
            elapsed = time.perf_counter() - t0
            used, wal = usage.done(), wal_delta(wal0, self.cluster.wal())
            out["single_row_commits_per_s"] = n / elapsed
            out["single_row"] = {"commits": n, "wal_bytes": wal["bytes"], **used}
            log(f"floor: 1-row commits {n / elapsed:,.0f}/s (load {used['loadavg_1m']})")
            for size in batch_sizes:
                batches = max(5, min(60, self.args.floor_rows // size))
                kinds = [("INSERT ... unnest (the rows alone)", unnest)]
                if size == 1000:
                    kinds += [
                        ("COPY", copy),
                        (
                            "the server's statements of a SET batch (bucket locks, locked read, insert, counts, NOTIFY)",
                            server_like,
                        ),
                    ]
                for label, write in kinds:
                    prepared = [rows(size) for _ in range(batches)]
                    usage = Usage([], self.cluster)
                    wal0 = self.cluster.wal()
                    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                    t0 = time.perf_counter()
                    for jobs in prepared:
                        write(conn, jobs)
                        conn.commit()
                    elapsed = time.perf_counter() - t0
                    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                    client = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                    used, wal = usage.done(client), wal_delta(wal0, self.cluster.wal())
                    total = size * batches
                    case = {
                        "write": label,
                        "batch": size,
                        "batches": batches,
                        "rows_per_s": total / elapsed,
                        "ms_per_batch": elapsed / batches * 1000,
                        "client_cpu_us_per_row": client / total * 1e6,
                        "postgres_cpu_us_per_row": used["postgres_cpu_s"] / total * 1e6,
                        "wal_bytes_per_row": wal["bytes"] / total,
                        **used,
                    }
                    out["cases"].append(case)
                    log(
                        f"floor: {label}, batches of {size}: {case['rows_per_s']:,.0f} rows/s,"
                        f" {case['ms_per_batch']:.1f} ms a batch; client"
                        f" {case['client_cpu_us_per_row']:.1f} us CPU/row, PostgreSQL"
                        f" {case['postgres_cpu_us_per_row']:.1f} us/row (load {used['loadavg_1m']})"
                    )
        self.cluster.drop("bench_floor")
        return out

    # dispatch and lateness: jobs set on the first instance, run by every instance

    def run_jobs(
        self,
        servers: list[Instance],
        dsn: str,
        prefix: str,
        due_us: list[int],
        timeout: float,
    ) -> dict[str, Any]:
        """Rule + jobs on servers[0]; wait for every run; what each instance logged."""
        broker = self.broker()
        admin = broker.Admin()
        route = broker.make_route(admin, prefix.rstrip("."))
        admin.close()
        try:
            rule = [
                "RULE",
                "SET",
                f"r-{prefix}",
                prefix,
                "amqp",
                broker.URL,
                route.exchange,
                route.routing_key,
            ]
            answer = kcp_request(servers[0].kcp_port, *rule)
            assert answer == ["OK"], answer
            ids = [f"{prefix}{i:06d}" for i in range(len(due_us))]
            runs0 = [s.runs for s in servers]
            set_s = kcp_set(servers[0].kcp_port, ids, due_us)
            first_due = min(due_us) / 1e6
            if time.time() > first_due - 0.2:
                raise RuntimeError(
                    f"setting {len(ids)} jobs took {set_s:.1f} s, past their due time: more lead"
                )
            time.sleep(max(0.0, first_due - 0.2 - time.time()))
            usage = Usage(servers, self.cluster if dsn else None, broker.beam_pid())
            commits0 = [group_commits(s) for s in servers]
            wal0 = self.cluster.wal() if dsn and self.cluster else None
            want = sum(runs0) + len(ids)
            wait_until(
                lambda: sum(s.runs for s in servers) >= want or any(not s.alive() for s in servers),
                timeout,
                f"{len(ids)} runs",
            )
            if any(not s.alive() for s in servers):
                raise RuntimeError("an instance died")
            runs_seen = time.time()

            def executed() -> bool:
                found = statuses_pg(dsn) if dsn else statuses_log(servers[0].kcp_port, ids)
                return found.get("executed", 0) >= len(ids)

            wait_until(executed, 60, "every job executed", interval=0.2)
            executed_seen = time.time()
            used = usage.done()
            commits = sum(group_commits(s) for s in servers) - sum(commits0)
            wal_bytes = (
                (self.cluster.wal()["bytes"] - wal0["bytes"]) if wal0 and self.cluster else 0.0
            )
            time.sleep(0.3)  # a second run of anything would show by now
            admin = broker.Admin()
            queued = admin.message_count(route.queue)
            admin.close()
        finally:
            broker.remove_route(route)
        wanted = set(ids)
        due_of = dict(zip(ids, due_us, strict=True))
        ran: Counter[str] = Counter()
        per_instance = []
        start_late, confirm_late, confirms = [], [], []
        for server in servers:
            mine = 0
            for event in server.events("job run"):
                job = event.get("job")
                if job not in wanted:
                    continue
                mine += 1
                ran[job] += 1
                end = stamp(event)
                confirms.append(end)
                confirm_late.append((end - due_of[job] / 1e6) * 1000)
                start_late.append((end - event["seconds"] - due_of[job] / 1e6) * 1000)
            per_instance.append(mine)
        twice = sum(1 for n in ran.values() if n > 1)
        last = max(confirms)
        return {
            "jobs": len(ids),
            "set_s": set_s,
            "runs": sum(ran.values()),
            "distinct_run": len(ran),
            "ran_twice": twice,
            "never_ran": len(wanted - set(ran)),
            "exactly_once": twice == 0 and set(ran) == wanted,
            "queue_messages": queued,
            "per_instance": per_instance,
            "first_run_s": min(confirms) - first_due,
            "last_run_s": last - first_due,
            "runs_seen_s": runs_seen - first_due,
            "executed_s": executed_seen - first_due,
            "run_start_ms": spread(start_late),
            "confirm_ms": spread(confirm_late),
            "wal_bytes_per_job": wal_bytes / len(ids),
            "group_commits": commits,
            **used,
        }

    def variant(
        self, kind: str, instances: int, name: str, tables: dict | None = None
    ) -> tuple[list[Instance], str]:
        """(servers, dsn): `kind` log@before, log, or postgres (fresh database)."""
        assert self.cluster is not None
        if kind == "postgres":
            dsn = self.cluster.fresh(f"bench_{name}")
            servers = [
                Instance(self.work / f"{name}-{n}", dsn=dsn, tables=tables)
                for n in range(instances)
            ]
            return servers, dsn
        src = self.source("before" if kind == "log@before" else "after")
        return [Instance(self.work / name, src=src, tables=tables)], ""

    def discard(self, name: str, dsn: str, servers: list[Instance]) -> None:
        """Drop a case's database (if any) and its servers' directories."""
        if dsn:
            self.cluster.drop(f"bench_{name}")  # type: ignore[union-attr]
        for server in servers:
            shutil.rmtree(server.workdir, ignore_errors=True)

    def dispatch(self) -> list[dict[str, Any]]:
        n = self.args.jobs
        out = []
        for kind, instances in self.args.dispatch_cases:
            name = f"dispatch_{kind.replace('@', '_')}_{instances}"
            servers, dsn = self.variant(kind, instances, name)
            rate = self.kcp_rate or 3000.0
            lead = 1.5 + 1.5 * n / (rate if dsn else max(rate, 15_000.0))
            with Instances(*servers):
                due = int((time.time() + lead) * 1e6)
                log(f"dispatch {kind} x{instances}: {n:,} jobs due in {lead:.1f} s")
                result = self.run_jobs(
                    servers, dsn, "d.", [due] * n, timeout=self.args.dispatch_timeout
                )
            result.update(
                backend=kind,
                instances=instances,
                jobs_per_s=n / result["last_run_s"],
                server_cpu_us_per_job=sum(result["server_cpu_s"]) / n * 1e6,
                postgres_cpu_us_per_job=result["postgres_cpu_s"] / n * 1e6,
                broker_cpu_us_per_job=result["broker_cpu_s"] / n * 1e6,
                loop_busy=[round(c / result["wall_s"], 2) for c in result["loop_cpu_s"]],
            )
            out.append(result)
            log(
                f"dispatch {kind} x{instances}: {result['jobs_per_s']:,.0f} jobs/s (last run"
                f" {result['last_run_s']:.2f} s after the due time), exactly once:"
                f" {result['exactly_once']} (twice {result['ran_twice']}, never {result['never_ran']},"
                f" queue {result['queue_messages']}), per instance {result['per_instance']};"
                f" {result['group_commits']} group commits; server"
                f" {result['server_cpu_us_per_job']:.0f} us CPU/job, PostgreSQL"
                f" {result['postgres_cpu_us_per_job']:.0f}, broker {result['broker_cpu_us_per_job']:.0f};"
                f" other CPU {result['other_cpu_s']:.1f} s; event loops busy {result['loop_busy']}"
                f" of the wall time; load {result['loadavg_1m']}"
            )
            self.discard(name, dsn, servers)
        return out

    def lateness(self) -> list[dict[str, Any]]:
        count, gap_ms = self.args.lateness_jobs, 10
        out = []
        for kind, instances in (("log@before", 1), ("log", 1), ("postgres", 1), ("postgres", 2)):
            name = f"lateness_{kind.replace('@', '_')}_{instances}"
            servers, dsn = self.variant(kind, instances, name)
            with Instances(*servers):
                time.sleep(0.5)  # idle first
                trips = round_trips(servers[0].kcp_port, self.args.round_trips)
                time.sleep(0.5)
                first = int((time.time() + 1.5) * 1e6)
                due = [first + i * gap_ms * 1000 for i in range(count)]
                log(f"lateness {kind} x{instances}: {count} jobs {gap_ms} ms apart")
                result = self.run_jobs(servers, dsn, "l.", due, timeout=count * gap_ms / 1000 + 60)
            result.update(backend=kind, instances=instances, gap_ms=gap_ms, round_trips=trips)
            out.append(result)
            s, c = result["run_start_ms"], result["confirm_ms"]
            log(
                f"lateness {kind}: one request at a time, SET p50 {trips['SET']['p50']:.2f}"
                f" p99 {trips['SET']['p99']:.2f} ms, GET p50 {trips['GET']['p50']:.2f}"
                f" p99 {trips['GET']['p99']:.2f} ms"
            )
            log(
                f"lateness {kind} x{instances}: run start p50 {s['p50']:.2f} p99 {s['p99']:.2f}"
                f" max {s['max']:.2f} ms; confirmed p50 {c['p50']:.2f} p99 {c['p99']:.2f} ms;"
                f" exactly once {result['exactly_once']}; per instance {result['per_instance']};"
                f" other CPU {result['other_cpu_s']:.1f} s; load {result['loadavg_1m']}"
            )
            self.discard(name, dsn, servers)
        return out

    # failover

    def failover(self) -> list[dict[str, Any]]:
        script = self.work / "hold.sh"
        # The victim's runs hang (it alone has KAIROI_BENCH_HOLD); the shell
        # runner's guard kills them when their server dies.
        script.write_text('#!/bin/sh\n[ -n "$KAIROI_BENCH_HOLD" ] && exec sleep 600\nexit 0\n')
        script.chmod(0o755)
        return [self.failover_once(lease, script) for lease in self.args.leases]

    def failover_once(self, lease: float, script: Path) -> dict[str, Any]:
        assert self.cluster is not None
        import psycopg

        heartbeat = lease / 4
        name = f"failover_{str(lease).replace('.', '_')}"
        dsn = self.cluster.fresh(f"bench_{name}")
        tables: dict[str, dict[str, object]] = {
            "storage.postgres": {
                "lease_s": float(lease),
                "heartbeat_s": heartbeat,
                "poll_interval_s": 1.0,
            }
        }
        victim = Instance(
            self.work / f"{name}-victim", dsn=dsn, tables=tables, env={"KAIROI_BENCH_HOLD": "1"}
        )
        survivor = Instance(self.work / f"{name}-survivor", dsn=dsn, tables=tables)
        held = self.args.failover_jobs
        owned = (
            f"SELECT id FROM {SCHEMA}.jobs WHERE status = 'triggered' AND owner = %s ORDER BY id"
        )
        with Instances(victim), psycopg.connect(dsn, autocommit=True) as conn:
            answer = kcp_request(victim.kcp_port, "RULE", "SET", "hold", "f.", "shell", str(script))
            assert answer == ["OK"], answer
            ids = [f"f.{i:04d}" for i in range(held)]
            kcp_set(victim.kcp_port, ids, [int((time.time() + 0.3) * 1e6)] * held)
            row = conn.execute(
                f"SELECT id FROM {SCHEMA}.instances WHERE pid = %s", (victim.pid,)
            ).fetchone()
            assert row is not None
            (victim_id,) = row
            wait_until(
                lambda: len(conn.execute(owned, (victim_id,)).fetchall()) == held,
                30,
                "the victim triggering its jobs",
            )
            with Instances(survivor):
                time.sleep(0.5 + heartbeat)  # the survivor at work, its lease kept
                load = load1()
                victim.kill()
                killed = time.time()
                wanted = {row[0] for row in conn.execute(owned, (victim_id,))}
                wait_until(
                    lambda: {e.get("job") for e in survivor.events("job run")} >= wanted,
                    2 * lease + 30,
                    "the re-runs",
                    interval=0.02,
                )
                time.sleep(0.3)
                runs = [e for e in survivor.events("job run") if e.get("job") in wanted]
                freed = survivor.events("runs of dead instances planned again")
                victim_runs = sum(1 for e in victim.events("job run") if e.get("job") in wanted)
        starts = [stamp(e) - e["seconds"] - killed for e in runs]
        per_job = Counter(e["job"] for e in runs)
        result = {
            "lease_s": lease,
            "heartbeat_s": heartbeat,
            "in_flight": len(wanted),
            "reruns": len(runs),
            "victim_finished": victim_runs,
            "planned_again_jobs": freed[0].get("jobs") if freed else None,
            "rerun_once": all(n == 1 for n in per_job.values()) and set(per_job) == wanted,
            "planned_again_s": (stamp(freed[0]) - killed) if freed else None,
            "first_rerun_s": min(starts),
            "last_rerun_s": max(starts),
            "ratio_to_lease": max(starts) / lease,
            "loadavg_1m": load,
        }
        log(
            f"failover, lease {lease:g} s (heartbeat {heartbeat:g} s): {len(wanted)} runs in"
            f" flight; planned again after {result['planned_again_s'] or -1:.2f} s; re-run"
            f" {result['first_rerun_s']:.2f}-{result['last_rerun_s']:.2f} s after the kill"
            f" ({result['ratio_to_lease']:.2f} x lease); once each: {result['rerun_once']}; load {load}"
        )
        self.cluster.drop(f"bench_{name}")
        for server in (victim, survivor):
            shutil.rmtree(server.workdir, ignore_errors=True)
        return result

    # seam

    def build_log_store(self) -> Path:
        from benchmarks.recurring_bench import write_store

        directory = self.work / "store-1m"
        directory.mkdir(parents=True, exist_ok=True)
        log(f"seam: writing a data directory of {self.args.restart_jobs:,} planned jobs")
        write_store(directory, recurring=False, jobs=self.args.restart_jobs)
        self.log_store = directory
        return directory

    def seam(self) -> dict[str, Any]:
        if not hasattr(self, "log_store"):
            self.build_log_store()
        versions = {"before": self.source("before"), "after": self.source("after")}
        sets: dict[str, list[dict]] = {"before": [], "after": []}
        restarts: dict[str, list[dict]] = {"before": [], "after": []}
        for rep in range(self.args.seam_repeat):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")
            for version in order:
                name = f"seam-set-{version}-{rep}"
                server = Instance(self.work / name, src=versions[version])
                with Instances(server):
                    usage = Usage([server], None)
                    result = loadgen(server, self.args.seam_count, 1, 10_000, f"{name}.")  # type: ignore[arg-type]
                    used = usage.done(result["client_cpu_s"])
                sets[version].append(
                    {
                        "sets_per_s": result["sets_per_s"],
                        "server_cpu_us_per_set": result["server_cpu_s"]
                        / self.args.seam_count
                        * 1e6,
                        "other_cpu_s": used["other_cpu_s"],
                        "loadavg_1m": used["loadavg_1m"],
                    }
                )
                log(
                    f"seam SET {version} ({short_commit(BEFORE_SEAM) if version == 'before' else 'HEAD'}):"
                    f" {result['sets_per_s']:,.0f}/s, load {used['loadavg_1m']}"
                )
                shutil.rmtree(self.work / name, ignore_errors=True)
        copies = {}
        for version in versions:
            copies[version] = self.work / f"restart-{version}" / "data"
            shutil.copytree(self.log_store, copies[version])
        for rep in range(self.args.seam_repeat):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")
            for version in order:
                server = Instance(
                    self.work / f"restart-{version}", src=versions[version], data=copies[version]
                )
                load = load1()
                with Instances(server):
                    hwm = proc_status_kib(server.pid, "VmHWM") / 1024
                    replayed = server.events("log replayed")
                restarts[version].append(
                    {
                        "ready_s": server.ready_seconds,
                        "jobs": replayed[-1].get("jobs") if replayed else None,
                        "replay_s": replayed[-1].get("seconds") if replayed else None,
                        "vmhwm_mib": hwm,
                        "loadavg_1m": load,
                    }
                )
                log(
                    f"seam restart {version}: ready in {server.ready_seconds:.2f} s with"
                    f" {restarts[version][-1]['jobs']} jobs, VmHWM {hwm:.0f} MiB, load {load}"
                )
        for version in versions:
            shutil.rmtree(self.work / f"restart-{version}", ignore_errors=True)
        return {
            "before": short_commit(BEFORE_SEAM),
            "after": short_commit("HEAD"),
            "set_count": self.args.seam_count,
            "set": sets,
            "restart_jobs": self.args.restart_jobs,
            "restart": restarts,
        }

    # set_ab (only when named): the SET case on another version of the code and on HEAD

    def set_ab(self) -> dict[str, Any]:
        """KCP pipelined SET, 1 connection, alternating the code at --ab and HEAD
        (each on a fresh database), --ab-repeat times each."""
        assert self.cluster is not None
        versions = {self.args.ab: self.source(self.args.ab), "HEAD": self.source("after")}
        runs: dict[str, list[dict]] = {name: [] for name in versions}
        for rep in range(self.args.ab_repeat):
            order = list(versions) if rep % 2 == 0 else list(reversed(versions))
            for version in order:
                name = f"ab_{rep}_{'head' if version == 'HEAD' else 'other'}"
                dsn = self.cluster.fresh(f"bench_{name}")
                server = Instance(self.work / name, dsn=dsn, src=versions[version])
                with Instances(server):
                    result = self.set_once(server, "kcp", 1, self.args.count, name)
                runs[version].append(result)
                self.cluster.drop(f"bench_{name}")
                shutil.rmtree(self.work / name, ignore_errors=True)
        return {
            "versions": {name: short_commit(name) for name in versions},
            "count": self.args.count,
            "runs": runs,
        }

    # locks (only when named): PostgreSQL's default lock table against two busy instances

    def locks(self) -> dict[str, Any]:
        """Two instances, each SET by 4 pipelined connections at once, on a cluster
        restarted with PostgreSQL's default max_connections (100) and
        max_locks_per_transaction (64): the shared lock table holds about
        64 x (100 + the background processes) entries for every transaction
        together, and a batch of new ids once took one advisory lock per id
        (up to 8,192; replaced by empty rows in 7886177). The cluster is put
        back (max_connections 300) afterwards."""
        assert self.cluster is not None
        cluster = self.cluster
        with cluster.admin() as conn:
            conn.execute("ALTER SYSTEM SET max_connections = 100")
        cluster._script("ctl", str(cluster.directory), "restart", "-w", "-m", "fast", "-t", "60")
        try:
            with cluster.admin() as conn:
                settings = {
                    name: conn.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("max_connections", "max_locks_per_transaction")
                }
            dsn = cluster.fresh("bench_locks")
            src = self.source(self.args.locks_code) if self.args.locks_code else None
            servers = [Instance(self.work / f"locks-{n}", dsn=dsn, src=src) for n in range(2)]
            count = self.args.locks_count
            results: dict[int, dict] = {}
            load = load1()
            with Instances(*servers):

                def drive(n: int) -> None:
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "benchmarks.loadgen",
                            "--port",
                            str(servers[n].kcp_port),
                            "--count",
                            str(count),
                            "--conns",
                            "4",
                            "--prefix",
                            f"locks{n}.",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=300,
                        cwd=ROOT,
                    )
                    results[n] = json.loads(done.stdout.strip().splitlines()[-1])

                drivers = [Background(lambda n=n: drive(n)) for n in range(2)]
                for driver in drivers:
                    driver.join()
                failures = [
                    e.get("error") for s in servers for e in s.events("storage write failed")
                ]
            cluster.drop("bench_locks")
        finally:
            with cluster.admin() as conn:
                conn.execute("ALTER SYSTEM SET max_connections = 300")
            cluster._script(
                "ctl", str(cluster.directory), "restart", "-w", "-m", "fast", "-t", "60"
            )
        errors = sum(r["errors"] for r in results.values())
        out = {
            **settings,
            "sets": 2 * count,
            "errors": errors,
            "first_error": next(
                (r["first_error"] for r in results.values() if r["first_error"]), ""
            ),
            "outages_logged": len(failures),
            "failure": Counter(failures).most_common(1)[0][0] if failures else "",
            "sets_per_s": [r["sets_per_s"] for r in results.values()],
            "loadavg_1m": load,
            "code": short_commit(self.args.locks_code or "HEAD"),
        }
        log(
            f"locks: {errors:,} of {2 * count:,} SETs refused, {len(failures)} outages logged"
            f" ({out['failure'] or 'none'})"
        )
        return out

    # profiles (--profile): one more run of a case, py-spy attached

    def profile(self) -> dict[str, Any]:
        assert self.cluster is not None
        out: dict[str, Any] = {}
        directory = self.work / "profiles"
        directory.mkdir(exist_ok=True)
        dsn = self.cluster.fresh("bench_profile_set")
        server = Instance(self.work / "profile-set", dsn=dsn)
        with Instances(server):
            spy = Profiler(server.pid, directory / "set.txt", rate=100)
            result = loadgen(server, self.args.count, 1, 10_000, "p.")  # type: ignore[arg-type]
            path = spy.stop()
        out["set_kcp_1"] = {"sets_per_s": result["sets_per_s"], **_stacks(path)}
        log(f"profiled SET: {result['sets_per_s']:,.0f}/s under py-spy")
        servers, dsn = self.variant("postgres", 1, "profile_dispatch")
        n = self.args.jobs
        with Instances(*servers):
            lead = 2.0 + 2.0 * n / (self.kcp_rate or 3000.0)
            due = int((time.time() + lead) * 1e6)
            spy = Profiler(servers[0].pid, directory / "dispatch.txt", rate=100)
            result = self.run_jobs(
                servers, dsn, "p.", [due] * n, timeout=self.args.dispatch_timeout
            )
            path = spy.stop()
        out["dispatch_1"] = {"jobs_per_s": n / result["last_run_s"], **_stacks(path)}
        log(f"profiled dispatch: {n / result['last_run_s']:,.0f} jobs/s under py-spy")
        return out


def _stacks(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {"error": "no profile"}
    found = aggregate_stacks(path.read_text(), top=20)
    found["file"] = str(path)
    return found


def plan_summary(node: dict, depth: int = 0) -> str:
    """'Limit <- LockRows <- Index Scan using jobs_due (rows 4096, hit 4150 read 0)' and so on."""
    label = node["Node Type"]
    if "Index Name" in node:
        label += f" using {node['Index Name']}"
    elif "Relation Name" in node and "Scan" in label:
        label += f" on {node['Relation Name']}"
    label += f" (rows {node.get('Actual Rows', 0):,.0f}"
    hit, read = node.get("Shared Hit Blocks", 0), node.get("Shared Read Blocks", 0)
    if hit or read:
        label += f", buffers hit {hit:,} read {read:,}"
    label += ")"
    children = node.get("Plans") or []
    if children and depth < 4:
        label += " <- " + " + ".join(plan_summary(c, depth + 1) for c in children[:2])
    return label


# -- the report ---------------------------------------------------------------------------


def f0(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def f2(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    add(
        f"Date {m['date']}; {m['nproc']} CPUs, {m['cpu']}; Python {m['python']}; kernel {m['kernel']}; "
        f"PostgreSQL {results['postgres']['server_version']}"
    )
    add(f"Command: {results['command']}")
    add(
        f"Code: commit {m['commit']} ({m['src_modified_files']} uncommitted files under src/); "
        f"load average at start {' '.join(m['loadavg'])}, at end {' '.join(results['loadavg_end'])}"
    )
    s = results["postgres"]
    add(
        f"PostgreSQL: fsync {s['fsync']}, synchronous_commit {s['synchronous_commit']}, full_page_writes "
        f"{s['full_page_writes']}, wal_sync_method {s['wal_sync_method']}, shared_buffers "
        f"{s['shared_buffers']}, max_wal_size {s['max_wal_size']}"
    )
    if "fsync" in results:
        r = results["fsync"]
        add("")
        add(
            f"fdatasync of the data directory's disk (8 kB write + fdatasync, one thread): "
            f"{r['fdatasync_per_s']:,.0f}/s ({r['us_per_sync']:.0f} µs each; load {r['loadavg_1m']})"
        )
    if "set" in results:
        add("")
        add("### Durable SET/s through one instance (fresh database per case)")
        add("")
        add(
            "| case | SET/s | group commits | commands per commit | server CPU µs/SET | PostgreSQL CPU µs/SET "
            "| ms per group commit | WAL B/SET | other CPU s | load 1m |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["set"]:
            label = (
                f"KCP pipelined, {r['conns']} conn"
                if r["via"] == "kcp"
                else f"gRPC SetJobs ×1,000, {r['conns']} caller"
            )
            add(
                f"| {label}{'s' if r['conns'] > 1 else ''} | {f0(r['sets_per_s'])} | {f0(r['group_commits'])} | "
                f"{f0(r['commands_per_commit'])} | {f0(r['server_cpu_us_per_set'])} | "
                f"{f0(r['postgres_cpu_us_per_set'])} | {f0(r['ms_per_commit'])} | {f0(r['wal_bytes_per_set'])} | "
                f"{r['other_cpu_s']:.1f} | {r['loadavg_1m']} |"
            )
    if "floor" in results:
        r = results["floor"]
        add("")
        add(
            f"Floor, the database alone (one psycopg connection, same rows): serial 1-row commits "
            f"{r['single_row_commits_per_s']:,.0f}/s"
        )
        add("")
        add(
            "| write, one transaction per batch | batch | rows/s | ms per batch | client CPU µs/row | PostgreSQL CPU µs/row | WAL B/row | load 1m |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in r["cases"]:
            add(
                f"| {c['write']} | {c['batch']:,} | {f0(c['rows_per_s'])} | {f2(c['ms_per_batch'])} | "
                f"{c['client_cpu_us_per_row']:.1f} | {c['postgres_cpu_us_per_row']:.1f} | "
                f"{f0(c['wal_bytes_per_row'])} | {c['loadavg_1m']} |"
            )
    if "dispatch" in results:
        add("")
        add(f"### Jobs due at one instant, AMQP runner ({results['dispatch'][0]['jobs']:,} jobs)")
        add("")
        add(
            "| store | instances | jobs/s (due → last run) | last run s | all executed s | exactly once | runs per instance "
            "| server CPU µs/job | PostgreSQL µs/job | broker µs/job | WAL B/job | other CPU s | load 1m |"
        )
        add("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for r in results["dispatch"]:
            once = (
                "yes"
                if r["exactly_once"] and r["queue_messages"] == r["jobs"]
                else (
                    f"NO (twice {r['ran_twice']}, never {r['never_ran']}, queue {r['queue_messages']})"
                )
            )
            add(
                f"| {r['backend']} | {r['instances']} | {f0(r['jobs_per_s'])} | {f2(r['last_run_s'])} | "
                f"{f2(r['executed_s'])} | {once} | {' / '.join(f'{n:,}' for n in r['per_instance'])} | "
                f"{f0(r['server_cpu_us_per_job'])} | {f0(r['postgres_cpu_us_per_job'])} | "
                f"{f0(r['broker_cpu_us_per_job'])} | {f0(r['wal_bytes_per_job'])} | {r['other_cpu_s']:.1f} | {r['loadavg_1m']} |"
            )
    if "lateness" in results:
        r0 = results["lateness"][0]
        add("")
        add(f"### Lateness, {r0['jobs']:,} jobs {r0['gap_ms']} ms apart, AMQP runner (ms)")
        add("")
        add(
            "| store | instances | run start p50 / p99 / max | confirmed p50 / p99 | exactly once | runs per instance | one SET alone p50 / p99 | one GET alone p50 / p99 | other CPU s | load 1m |"
        )
        add("|---|---:|---|---|---|---|---|---|---:|---:|")
        for r in results["lateness"]:
            a, c = r["run_start_ms"], r["confirm_ms"]
            t_set, t_get = r["round_trips"]["SET"], r["round_trips"]["GET"]
            add(
                f"| {r['backend']} | {r['instances']} | {a['p50']:.2f} / {a['p99']:.2f} / {a['max']:.2f} | "
                f"{c['p50']:.2f} / {c['p99']:.2f} | {'yes' if r['exactly_once'] else 'NO'} | "
                f"{' / '.join(str(n) for n in r['per_instance'])} | {t_set['p50']:.2f} / {t_set['p99']:.2f} | "
                f"{t_get['p50']:.2f} / {t_get['p99']:.2f} | {r['other_cpu_s']:.1f} | {r['loadavg_1m']} |"
            )
    if "failover" in results:
        add("")
        add("### Failover: SIGKILL of an instance with runs in flight")
        add("")
        add(
            "| lease_s | heartbeat_s | runs in flight | planned again s | re-run s (first – last) | last / lease | target ≤ 2 × lease | re-run once | load 1m |"
        )
        add("|---:|---:|---:|---:|---|---:|---|---|---:|")
        for r in results["failover"]:
            add(
                f"| {r['lease_s']:g} | {r['heartbeat_s']:g} | {r['in_flight']} | {f2(r['planned_again_s'])} | "
                f"{r['first_rerun_s']:.2f} – {r['last_rerun_s']:.2f} | {r['ratio_to_lease']:.2f} | "
                f"{'met' if r['ratio_to_lease'] <= TARGET_FAILOVER_LEASES else 'MISSED'} | "
                f"{'yes' if r['rerun_once'] else 'NO'} | {r['loadavg_1m']} |"
            )
    if "seam" in results:
        r = results["seam"]
        add("")
        add(
            f"### The embedded log before the seam ({r['before']}) and at HEAD ({r['after']}), alternating"
        )
        add("")
        add("| figure | before | after |")
        add("|---|---|---|")
        add(
            f"| SET/s, KCP pipelined, 1 conn, fsync on ({r['set_count']:,} per run) | "
            + " | ".join(
                ", ".join(f"{x['sets_per_s']:,.0f} (load {x['loadavg_1m']})" for x in r["set"][v])
                for v in ("before", "after")
            )
            + " |"
        )
        add(
            f"| restart to ready with {r['restart_jobs']:,} jobs, s | "
            + " | ".join(
                ", ".join(f"{x['ready_s']:.2f} (load {x['loadavg_1m']})" for x in r["restart"][v])
                for v in ("before", "after")
            )
            + " |"
        )
        add(
            "| VmHWM at ready, MiB | "
            + " | ".join(
                ", ".join(f"{x['vmhwm_mib']:.0f}" for x in r["restart"][v])
                for v in ("before", "after")
            )
            + " |"
        )
    if "explain" in results:
        r = results["explain"]
        add("")
        add(
            f"### Statements with {r['jobs']:,} planned jobs and {r['due']:,} due in the table "
            f"({r['table_mib']:.0f} MiB with indexes; load {r['loadavg_1m']})"
        )
        add("")
        add("| statement | client ms (median) | executing ms (EXPLAIN ANALYZE) | plan |")
        add("|---|---:|---:|---|")
        for st in r["statements"]:
            add(
                f"| {st['statement']} | {st['client_ms_median']:.2f} | {st['execution_ms']:.2f} | {st['plan']} |"
            )
        nt = r["notify"]
        add("")
        add(
            f"NOTIFY: commits/s of 1-row INSERT transactions, {nt['seconds']:g} s each, one LISTENer "
            f"(load {nt['loadavg_1m']})"
        )
        add("")
        add("| connections | synchronous_commit | without NOTIFY | with a 6.9 kB NOTIFY |")
        add("|---:|---|---:|---:|")
        by = {
            (c["conns"], c["synchronous_commit"], c["notify"]): c["commits_per_s"]
            for c in nt["cases"]
        }
        for conns, sync in sorted({(c, s) for c, s, _ in by}, key=lambda x: (not x[1], x[0])):
            add(
                f"| {conns} | {'on' if sync else 'off'} | {f0(by.get((conns, sync, False)))} | "
                f"{f0(by.get((conns, sync, True)))} |"
            )
        add("")
        add("What the connections were doing (sampled every 2 ms):")
        add("")
        for c in nt["cases"]:
            states = ", ".join(f"{k} {v * 100:.0f}%" for k, v in c.get("wait_events", {}).items())
            add(
                f"- {c['conns']} connection(s), {'with' if c['notify'] else 'without'} NOTIFY, "
                f"synchronous_commit {'on' if c['synchronous_commit'] else 'off'}: {states}"
            )
    if "set_ab" in results:
        r = results["set_ab"]
        add("")
        add(
            f"KCP pipelined SET, 1 connection, {r['count']:,} per run, alternating (SET/s; server / "
            "PostgreSQL CPU µs per SET; WAL B per SET; load):"
        )
        add("")
        add("| code | runs |")
        add("|---|---|")
        for name, runs in r["runs"].items():
            add(
                f"| {r['versions'][name]} | "
                + "; ".join(
                    f"{x['sets_per_s']:,.0f} ({x['server_cpu_us_per_set']:.0f} / "
                    f"{x['postgres_cpu_us_per_set']:.0f} µs, {x['wal_bytes_per_set']:.0f} B, load {x['loadavg_1m']})"
                    for x in runs
                )
                + " |"
            )
    if "locks" in results:
        r = results["locks"]
        add("")
        add(
            f"Code {r['code']}: two instances × 4 pipelined KCP connections at once, PostgreSQL max_connections "
            f"{r['max_connections']}, max_locks_per_transaction {r['max_locks_per_transaction']}: "
            f"{r['errors']:,} of {r['sets']:,} SETs answered ERROR ({r['outages_logged']} storage outages logged: "
            f"{r['failure'] or 'none'}; load {r['loadavg_1m']})"
        )
    if "profile" in results:
        for name, p in results["profile"].items():
            if "self" not in p:
                continue
            add("")
            rate = p.get("sets_per_s") or p.get("jobs_per_s")
            add(f"py-spy, {name} ({f0(rate)}/s under the profiler; {p['samples']} samples): self")
            for frame, share in p["self"][:12]:
                add(f"  {share * 100:5.1f}%  {frame}")
            add("  inclusive:")
            for frame, share in p["inclusive"][:12]:
                add(f"  {share * 100:5.1f}%  {frame}")
    add("")
    add("Targets:")
    for line in targets(results):
        add(f"- {line}")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[str]:
    out = []
    if "set" in results:
        best = max(results["set"], key=lambda r: r["sets_per_s"])
        ok = best["sets_per_s"] >= TARGET_SET_PER_S
        out.append(
            f"≥ {TARGET_SET_PER_S:,} durable SET/s through one instance: best {best['sets_per_s']:,.0f} "
            f"({best['case']}): {'met' if ok else 'MISSED'}"
        )
    if "dispatch" in results:
        pg = [r for r in results["dispatch"] if r["backend"] == "postgres"]
        if pg:
            best = max(pg, key=lambda r: r["jobs_per_s"])
            ok = best["jobs_per_s"] >= TARGET_DISPATCH_PER_S
            out.append(
                f"≥ {TARGET_DISPATCH_PER_S:,} jobs/s dispatched across instances: best {best['jobs_per_s']:,.0f} "
                f"({best['instances']} instances): {'met' if ok else 'MISSED'}; exactly once in every run: "
                f"{all(r['exactly_once'] and r['queue_messages'] == r['jobs'] for r in pg)}"
            )
    if "failover" in results:
        worst = max(results["failover"], key=lambda r: r["ratio_to_lease"])
        ok = worst["ratio_to_lease"] <= TARGET_FAILOVER_LEASES
        out.append(
            f"failover ≤ 2 × lease: worst {worst['ratio_to_lease']:.2f} × lease (lease {worst['lease_s']:g} s): "
            f"{'met' if ok else 'MISSED'}"
        )
    return out


# -- main ---------------------------------------------------------------------------------

PARTS = (
    "fsync",
    "explain",
    "set",
    "floor",
    "dispatch",
    "lateness",
    "failover",
    "seam",
    "set_ab",
    "locks",
    "profile",
)
OPTIONAL = ("set_ab", "locks", "profile")  # only when named (--only, --profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.postgres_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test (~1.5 min)")
    parser.add_argument("--only", help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy one more SET and dispatch run"
    )
    parser.add_argument("--count", type=int, default=30_000, help="SETs per SET case")
    parser.add_argument("--jobs", type=int, default=15_000, help="jobs due at one instant")
    parser.add_argument(
        "--dispatch-cases",
        default="log:1,postgres:1,postgres:2,postgres:3",
        help="dispatch: store:instances cases",
    )
    parser.add_argument("--lateness-jobs", type=int, default=1000, help="jobs due 10 ms apart")
    parser.add_argument("--leases", default="2,5,15", help="lease_s values of the failover part")
    parser.add_argument(
        "--failover-jobs", type=int, default=40, help="runs in flight on the victim"
    )
    parser.add_argument("--restart-jobs", type=int, default=1_000_000)
    parser.add_argument("--explain-jobs", type=int, default=1_000_000)
    parser.add_argument("--seam-count", type=int, default=50_000, help="SETs per seam SET run")
    parser.add_argument("--seam-repeat", type=int, default=2)
    parser.add_argument(
        "--ab", default="626bac4", help="set_ab: the other code version (default: before 7886177)"
    )
    parser.add_argument("--ab-repeat", type=int, default=3, help="set_ab: runs of each version")
    parser.add_argument("--locks-code", default="", help="locks: run this commit (default HEAD)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    args.fsync_seconds = 2.0
    args.floor_rows = 40_000
    args.explain_repeat = 5
    args.notify_seconds = 1.0
    args.locks_count = 60_000
    args.round_trips = 60
    args.dispatch_timeout = 180.0
    if args.quick:
        args.count, args.jobs, args.lateness_jobs = 10_000, 3_000, 200
        args.leases, args.restart_jobs, args.explain_jobs = "2", 100_000, 100_000
        args.seam_count, args.seam_repeat, args.failover_jobs = 20_000, 1, 20
        args.fsync_seconds, args.floor_rows, args.notify_seconds = 1.0, 10_000, 1.0
        args.round_trips, args.locks_count = 30, 30_000
    args.leases = [float(x) for x in args.leases.split(",")]
    args.dispatch_cases = [
        (kind, int(n)) for kind, n in (case.split(":") for case in args.dispatch_cases.split(","))
    ]
    parts = args.only.split(",") if args.only else [p for p in PARTS if p not in OPTIONAL]
    if args.profile and "profile" not in parts:
        parts.append("profile")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    # SIGTERM/SIGHUP end the run through the finally blocks (servers, cluster, broker)
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)

    work = Path(tempfile.mkdtemp(prefix="kairoi-pg-bench-"))
    bench = Bench(args, work)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(
            [
                ".venv/bin/python -m benchmarks.postgres_bench",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
    }
    started = time.monotonic()
    try:
        log(f"machine: {results['machine']['cpu']}, load {results['machine']['loadavg']}")
        bench.cluster = Cluster().start()
        results["postgres"] = bench.cluster.settings
        log(f"PostgreSQL on 127.0.0.1:{bench.cluster.port}: {bench.cluster.settings}")
        # Unmeasured set-up, side by side: the broker starts while the big stores are written.
        needs_broker = {"dispatch", "lateness", "profile"} & set(parts)
        starter = None
        if needs_broker:
            log("starting a private RabbitMQ node (in the background)")
            starter = Background(bench.broker)
        builder = None
        if "explain" in parts:  # mostly PostgreSQL's work: beside the log store's build
            builder = Background(bench.build_explain_db)
        if "seam" in parts:
            bench.build_log_store()
        if builder is not None:
            builder.join()
        if "lateness" in parts or "seam" in parts:
            bench.source("before")
            bench.source("after")
        if starter is not None:
            starter.join()
        if "fsync" in parts:
            results["fsync"] = bench.fsync()
        if "explain" in parts:
            results["explain"] = bench.explain()
            bench.cluster.drop("bench_explain")
        if "set" in parts:
            results["set"] = bench.set_cases()
        if "floor" in parts:
            sizes = [1000]
            kcp = [
                r for r in results.get("set", []) if r["via"] == "kcp" and r["commands_per_commit"]
            ]
            if kcp:
                sizes.append(max(1, round(kcp[0]["commands_per_commit"])))
            results["floor"] = bench.floor(sizes)
        if "dispatch" in parts:
            results["dispatch"] = bench.dispatch()
        if "lateness" in parts:
            results["lateness"] = bench.lateness()
        if "failover" in parts:
            results["failover"] = bench.failover()
        if "seam" in parts:
            results["seam"] = bench.seam()
        if "set_ab" in parts:
            results["set_ab"] = bench.set_ab()
        if "locks" in parts:
            results["locks"] = bench.locks()
        if "profile" in parts:
            results["profile"] = bench.profile()
    finally:
        if bench.cluster is not None:
            bench.cluster.stop()
        if bench.broker_started:
            bench.broker().stop_started_node()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            keep = work / "profiles"
            for child in work.iterdir():
                if child != keep:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            if not keep.exists():
                shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.monotonic() - started
    results["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(report(results))
    print(f"\n(total {results['total_s']:.0f} s)")
    summary = {
        "targets": targets(results),
        "set_per_s": {r["case"]: round(r["sets_per_s"]) for r in results.get("set", [])},
        "dispatch_jobs_per_s": {
            f"{r['backend']} x{r['instances']}": round(r["jobs_per_s"])
            for r in results.get("dispatch", [])
        },
        "lateness_run_start_p50_p99_ms": {
            f"{r['backend']} x{r['instances']}": [
                round(r["run_start_ms"]["p50"], 2),
                round(r["run_start_ms"]["p99"], 2),
            ]
            for r in results.get("lateness", [])
        },
        "failover_s": {
            f"lease {r['lease_s']:g}": round(r["last_rerun_s"], 2)
            for r in results.get("failover", [])
        },
    }
    print(json.dumps(summary, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if "profile" in results:
        print(f"py-spy raw profiles kept in {work / 'profiles'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
