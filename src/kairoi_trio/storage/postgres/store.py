"""PostgresStore: the command actor's store on a PostgreSQL database shared by
several kairoi-trio instances (docs/postgres.md).

One batch of the actor is one transaction, on the instance's writer
connection:

    begin(commands)   lock and read the rows the batch names (SELECT ... FOR
                      UPDATE, ids in order), claim due jobs for a TriggerDue
                      (FOR UPDATE SKIP LOCKED, oldest first: another
                      instance's claim never waits for ours nor takes the same
                      job), read the pages it lists; returns a BatchView
    append(records)   write the view's net changes with one multi-row
                      statement per kind, move the job counts, NOTIFY the
                      other instances, COMMIT; the actor replies only then

A job SET or SCHEDULEd under an id nobody has yet is protected by a
transaction-level advisory lock on its bucket (the id's hash modulo 256),
taken before the rows are read: two instances creating the same id one after
the other see each other's row, as two SETs of an existing id do through its
row lock. Buckets, not ids: a batch of thousands of new ids would otherwise
fill PostgreSQL's shared lock table; an empty row per new id (tried) doubles
the database's work per SET. "SET of a
triggered job is refused" is therefore decided on a row the transaction has
locked, never on a read that another instance could overtake.

Changed job ids are NOTIFYed only while another instance has watchers (its
`instances.watching`): without watchers a burst costs no notification (NOTIFY
serializes commits cluster-wide, and every instance would decode every
payload). Each write transaction takes the watch gate, an advisory lock, in
shared mode and then reads the flags; an instance turning its flag on takes
the gate exclusively in the transaction that also reads its new watcher's
snapshot. So a write either committed before that snapshot (the snapshot
shows it) or read the flag after it was set (and NOTIFYs its changes).

Besides the actor, the store runs (`run`):
- a listener (LISTEN kairoi_due, kairoi_jobs): another instance set a job due
  earlier than this one knew (wake the dispatcher), or changed jobs (watchers
  of this instance are told, through the actor);
- a lease keeper: renews this instance's lease every heartbeat; under an
  advisory lock (one instance at a time), plans again the jobs `triggered` by
  instances whose lease has expired (at-least-once), and forgets those
  instances;
- a poll of the earliest due time every poll_interval_s, the safety net
  under NOTIFY.

psycopg's sync API runs in worker threads (trio.to_thread): the actor's
transaction spans two of them (begin, append) on one connection, which only
the actor uses.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
import trio

from kairoi_trio.commands import Command
from kairoi_trio.config import PostgresConfig
from kairoi_trio.core.state import State, waits
from kairoi_trio.model import Job, Rule, Status, now_us
from kairoi_trio.storage.postgres.rows import (
    JOB_SELECT,
    STATUS_BY_NAME,
    job_from_row,
    job_row,
    rule_from_row,
    rule_row,
    safe_text,
)
from kairoi_trio.storage.postgres.schema import migrate
from kairoi_trio.storage.postgres.view import BatchView, Loaded, LoadPlan, prefix_upper_bound

log = structlog.get_logger(__name__)

DUE_CHANNEL = "kairoi_due"
JOBS_CHANNEL = "kairoi_jobs"
# NOTIFY payloads must stay under 8000 bytes.
MAX_NOTIFY_BYTES = 7000
# Advisory lock keys ("kairoi-h", "kairoi-r" as integers).
HOUSEKEEPING_LOCK = 0x6B6169726F692D68
RETENTION_LOCK = 0x6B6169726F692D72
COUNT_SHARDS = 16
# New ids are locked by bucket (the first key of the two-key advisory lock names
# the use, "kairoi-c" folded to 32 bits; the second is the bucket).
CREATE_LOCK = 0x6B2D6300
# pg_advisory_xact_lock key of the watch gate (module docstring).
WATCH_GATE = 0x6B6169726F692D77
CREATE_BUCKETS = 256
# A claim that found due jobs locked by other instances: look again after this
# long instead of spinning (their transactions last milliseconds).
LOCKED_RETRY_US = 20_000
# How long a batch waits for a connection when the database is unreachable.
CONNECT_WAIT_S = 2.0
# Bounds on one statement: a stuck lock or a hung server fails the batch.
STATEMENT_TIMEOUT_MS = 10_000


class PostgresUnavailable(Exception):
    """The database could not be used: the batch was not kept (UNAVAILABLE)."""


# describe(): sizes from the catalog, the last vacuum from the statistics views,
# live instances from their (small) table.
_DESCRIBE = """
SELECT
    (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')),
    (SELECT greatest(last_vacuum, last_autovacuum) FROM pg_stat_user_tables
      WHERE schemaname = current_schema() AND relname = 'jobs'),
    (SELECT count(*) FROM instances WHERE lease_until > now())
"""


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"PostgreSQL: {text[0] if text else type(error).__name__}"


def _unnest(columns: Sequence[str]) -> str:
    # Arrays go in binary (%b): psycopg's text array dumper quotes and escapes each
    # element in Python, ~3.5x the CPU (it was a third of an instance's dispatch CPU).
    return ", ".join(f"%b::{kind}[]" for kind in columns)


_JOB_TYPES = ("text", "bigint", "text", "bool", "bytea", "int", "text", "bigint", "jsonb", "uuid")
_INSERT_JOBS = f"INSERT INTO jobs ({JOB_SELECT}, owner) SELECT * FROM unnest({_unnest(_JOB_TYPES)})"
_UPDATE_JOBS = (
    "UPDATE jobs SET execute_at = u.execute_at, status = u.status, waits = u.waits,"
    " payload = u.payload, attempts = u.attempts, last_outcome = u.last_outcome,"
    " updated_at = u.updated_at, recurrence = u.recurrence, owner = u.owner"
    f" FROM unnest({_unnest(_JOB_TYPES)})"
    " AS u(id, execute_at, status, waits, payload, attempts, last_outcome, updated_at,"
    " recurrence, owner) WHERE jobs.id = u.id"
)
# A job whose time, payload and schedule did not change (a trigger, most outcomes):
# only its status columns are sent (~35% less to encode than _UPDATE_JOBS per row).
_UPDATE_STATUSES = (
    "UPDATE jobs SET status = u.status, waits = u.waits, attempts = u.attempts,"
    " last_outcome = u.last_outcome, updated_at = u.updated_at, owner = u.owner"
    f" FROM unnest({_unnest(('text', 'text', 'bool', 'int', 'text', 'bigint', 'uuid'))})"
    " AS u(id, status, waits, attempts, last_outcome, updated_at, owner) WHERE jobs.id = u.id"
)
_UPSERT_RULES = (
    "INSERT INTO rules (id, pattern, runner, policy)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::jsonb[], %b::jsonb[])"
    " ON CONFLICT (id) DO UPDATE SET pattern = EXCLUDED.pattern, runner = EXCLUDED.runner,"
    " policy = EXCLUDED.policy"
)
_MOVE_COUNTS = (
    "INSERT INTO job_counts (shard, status, n)"
    " SELECT %s, s, d FROM unnest(%b::text[], %b::bigint[]) AS c(s, d)"
    " ON CONFLICT (shard, status) DO UPDATE SET n = job_counts.n + EXCLUDED.n"
)
# Triggered jobs planned again, their waits as core.state.waits computes it: those of dead
# instances (owner not among the live ones), and this instance's own at a clean stop.
_PLAN_AGAIN = """
    UPDATE jobs SET status = 'planned', owner = NULL,
        waits = (recurrence IS NULL OR NOT (recurrence->>'paused')::boolean
                 OR (recurrence->>'manual')::boolean)
    WHERE status = 'triggered' AND {owner}
    RETURNING id, execute_at, waits
"""
_FREE_TRIGGERED = _PLAN_AGAIN.format(owner="(owner IS NULL OR owner <> ALL(%b::uuid[]))")
_FREE_OWN = _PLAN_AGAIN.format(owner="owner = %s")


def _job_arrays(jobs: list[Job], owner: str) -> list[list[Any]]:
    rows = [job_row(job) for job in jobs]
    columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
    columns.append([owner if job.status is Status.TRIGGERED else None for job in jobs])
    return columns


def _status_arrays(jobs: list[Job], owner: str) -> list[list[Any]]:
    """The columns of _UPDATE_STATUSES for `jobs` (as job_row writes them)."""
    return [
        [job.id for job in jobs],
        [job.status.value for job in jobs],
        [waits(job) for job in jobs],
        [job.attempts for job in jobs],
        [safe_text(job.last_outcome) for job in jobs],
        [job.updated_at for job in jobs],
        [owner if job.status is Status.TRIGGERED else None for job in jobs],
    ]


def _split_updates(updated: list[Job], before: dict[str, Job]) -> tuple[list[Job], list[Job]]:
    """(whole rows, status-only rows): a job whose execute_at, payload and schedule
    are those it was loaded with needs only its status columns written."""
    whole: list[Job] = []
    statuses: list[Job] = []
    for job in updated:
        old = before[job.id]
        same = (
            job.execute_at == old.execute_at
            and job.payload == old.payload
            and job.recurrence == old.recurrence
        )
        (statuses if same else whole).append(job)
    return whole, statuses


class PostgresStore:
    """The store of one instance (see the module's docstring).

    Not thread-safe by itself: `begin`/`append` are called by the actor only,
    one batch at a time; the background tasks use their own connections.
    """

    def __init__(self, config: PostgresConfig) -> None:
        self.config = config
        self.instance_id = str(uuid.uuid4())
        self._shard = random.randrange(COUNT_SHARDS)
        self._pool: Any = None
        self._conn: Any = None  # the actor's writer connection, while it works
        self._rules = State()  # this instance's copy of the rules
        self._rules_version = -1
        self.counts: dict[Status, int] = dict.fromkeys(Status, 0)
        self._next_due: int | None = None
        self._on_due: Callable[[int | None], None] = lambda _: None
        self._view: BatchView | None = None
        self._plan = LoadPlan()
        self._lock = threading.Lock()  # the writer connection: one thread at a time
        self.has_watchers: Callable[[], bool] = lambda: False
        self._watching = False  # this instance's instances.watching, as committed
        self._watching_next: bool | None = None  # ...as the open transaction sets it
        self.errors: tuple[type[BaseException], ...] = (PostgresUnavailable,)

    # -- life -------------------------------------------------------------------

    def open(self) -> None:
        """Connect (waiting up to connect_timeout_s for the database), migrate
        the schema, register this instance with its lease, and read the rules,
        the counts and the earliest due time. Blocking: run it in a thread.

        Raises PostgresUnavailable when the database cannot be reached in time,
        SchemaError for a schema newer than this server.
        """
        import psycopg
        from psycopg_pool import ConnectionPool

        # The pool logs every failed connection attempt; the actor's storage
        # errors already say, once per outage, that the database cannot be used.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        config = self.config
        deadline = time.monotonic() + config.connect_timeout_s
        delay = 0.1
        while True:
            try:
                with psycopg.connect(config.dsn, connect_timeout=5, autocommit=True) as conn:
                    before, after = migrate(conn, config.schema)
                break
            except psycopg.OperationalError as error:
                if time.monotonic() + delay > deadline:
                    raise PostgresUnavailable(
                        f"{_describe(error)} (waited {config.connect_timeout_s:g} s)"
                    ) from None
                log.warning("waiting for PostgreSQL", error=_describe(error), retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        if before != after:
            log.info("database schema migrated", schema=config.schema, version=after, was=before)
        schema = config.schema

        def configure(conn: Any) -> None:
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            conn.commit()

        self._pool = ConnectionPool(
            config.dsn,
            min_size=min(2, config.pool_size),
            max_size=config.pool_size,
            kwargs={
                "connect_timeout": 5,
                "application_name": f"kairoi-trio {self.instance_id[:8]}",
                # a dead peer is noticed in ~25 s, not after the kernel's 2 hours
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
            configure=configure,
            check=ConnectionPool.check_connection,
            open=True,
            name="kairoi-trio",
            timeout=CONNECT_WAIT_S,
            reconnect_timeout=float("inf"),  # keep trying while the database is down
        )
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO instances (id, host, pid, lease_until)"
                " VALUES (%s, %s, %s, now() + %s * interval '1 second')",
                (self.instance_id, socket.gethostname(), os.getpid(), config.lease_s),
            )
            self._reload_rules(conn)
            self._read_counts(conn)
            self._next_due = self._earliest_due(conn)

    def describe(self) -> dict[str, object]:
        """What the dashboard shows of this store (storage/info.py), from the catalog
        and the statistics views, never a scan of the jobs: the schema's tables
        with their indexes and TOAST (pg_total_relation_size: a stat of their
        files), the jobs table's last vacuum (manual or automatic: the
        compaction of PostgreSQL), and the live instances. Blocking; one pooled
        connection for a moment. {"error": ...} when the database cannot answer."""
        import psycopg
        import psycopg_pool

        try:
            with self._pool.connection(timeout=CONNECT_WAIT_S) as conn:
                row = conn.execute(_DESCRIBE).fetchone()
                conn.commit()
        except (psycopg.Error, psycopg_pool.PoolTimeout) as error:
            return {"backend": "postgres", "error": f"PostgreSQL: {_describe(error)}"}
        size, vacuumed, instances = row
        return {
            "backend": "postgres",
            "bytes": int(size),
            "last_vacuum_us": (None if vacuumed is None else int(vacuumed.timestamp() * 1_000_000)),
            "instances": int(instances),
        }

    def idle_view(self) -> BatchView:
        """The view between batches: rules, counts and the next due time, no jobs."""
        return BatchView(Loaded(), self._rules, dict(self.counts), self.next_due)

    def close(self) -> None:
        """Give back this instance's runs in flight (planned again at once, for any
        instance) and leave; close the connections. Blocking; never raises."""
        if self._pool is None:
            return
        try:
            with self._pool.connection(timeout=CONNECT_WAIT_S) as conn:
                self._free(conn, _FREE_OWN, self.instance_id, self._others_watch(conn))
                conn.execute("DELETE FROM instances WHERE id = %s", (self.instance_id,))
        except Exception as error:
            log.warning("could not leave the cluster cleanly", error=_describe(error))
        with self._lock:
            if self._conn is not None:
                self._pool.putconn(self._conn)
                self._conn = None
        self._pool.close()

    # -- the actor's batches ------------------------------------------------------

    async def begin(self, commands: Sequence[Command]) -> BatchView:
        """Open the batch's transaction and load what its commands need.
        PostgresUnavailable: nothing was done."""
        plan = LoadPlan.of(commands)
        watch = plan.subscribing or self.has_watchers()
        loaded = await trio.to_thread.run_sync(self._load, plan, watch)
        self._plan = plan
        self._view = BatchView(loaded, self._rules, dict(self.counts), self.next_due)
        return self._view

    async def append(self, records: Sequence[object]) -> None:
        """Write the batch's changes (the view's, whatever the records) and commit.
        PostgresUnavailable: rolled back, nothing was kept."""
        view = self._view
        assert view is not None, "append without begin"
        self._view = None
        plan = self._plan
        if plan.read_only:  # committed by begin
            if view.changes() != ([], [], []) or view.rule_changes() != ([], []):
                # a command taken for a read changed something: a bug, never acknowledged
                log.error("a read-only batch changed the store", plan=repr(plan)[:500])
                raise PostgresUnavailable("internal error: a read-only batch changed the store")
            return
        due = await trio.to_thread.run_sync(self._commit, view, plan)
        for status, n in view.count_changes().items():
            self.counts[status] += n
        if plan.claim_now is not None:
            # A claim read the earliest waiting job after its own: that is the next
            # due time, None included (a stale past time would make the dispatcher
            # claim again and again, finding nothing, until the next poll).
            self._set_next_due(due)
        elif due is not None:
            self._set_next_due(due)

    def next_due(self) -> int | None:
        return self._next_due

    def _set_next_due(self, due: int | None) -> None:
        self._next_due = due
        self._on_due(due)

    def _writer(self) -> Any:
        if self._conn is None:
            import psycopg_pool

            try:
                self._conn = self._pool.getconn(timeout=CONNECT_WAIT_S)
            except psycopg_pool.PoolTimeout:
                raise PostgresUnavailable(
                    f"PostgreSQL: no connection within {CONNECT_WAIT_S:g} s"
                ) from None
        return self._conn

    def _failed(self, error: BaseException | None) -> PostgresUnavailable:
        """Roll back and give the connection back to the pool (which drops a
        broken one); the error to raise."""
        conn, self._conn = self._conn, None
        self._watching_next = None  # rolled back
        if conn is not None:
            try:
                conn.rollback()
            except Exception:
                pass
            self._pool.putconn(conn)
        return PostgresUnavailable(_describe(error) if error else "PostgreSQL: internal error")

    def _load(self, plan: LoadPlan, watch: bool) -> Loaded:
        import psycopg

        with self._lock:
            conn = self._writer()
            try:
                loaded = self._load_in(conn, plan, watch)
                if plan.read_only:
                    self._committed()
                return loaded
            except psycopg.Error as error:
                raise self._failed(error) from None
            except BaseException:  # a bug: never leave the transaction (and its locks) open
                self._failed(None)
                raise

    def _load_in(self, conn: Any, plan: LoadPlan, watch: bool) -> Loaded:
        loaded = Loaded()
        with conn.pipeline():
            version, others_watch = self._watch_gate(conn, watch, plan.read_only)
            if plan.creating:
                # One lock per bucket of ids, not per id: a batch of thousands of new
                # ids takes at most CREATE_BUCKETS entries of the shared lock table
                # (64 per connection by default), in bucket order (no deadlock).
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, b) FROM (SELECT DISTINCT"
                    " hashtext(i) & %s AS b FROM unnest(%b::text[]) AS i ORDER BY 1) AS s",
                    (CREATE_LOCK, CREATE_BUCKETS - 1, sorted(plan.creating)),
                )
            rows = (
                conn.execute(
                    f"SELECT {JOB_SELECT} FROM jobs WHERE id = ANY(%b::text[])"
                    " ORDER BY id FOR UPDATE",
                    (sorted(plan.ids),),
                )
                if plan.ids
                else None
            )
            peeked = (
                conn.execute(
                    f"SELECT {JOB_SELECT} FROM jobs WHERE id = ANY(%b::text[])",
                    (sorted(plan.peeks),),
                )
                if plan.peeks
                else None
            )
            claimed = (
                conn.execute(
                    f"SELECT {JOB_SELECT} FROM jobs WHERE waits AND execute_at <= %s"
                    " ORDER BY execute_at LIMIT %s FOR UPDATE SKIP LOCKED",
                    (plan.claim_now, plan.claim_limit),
                )
                if plan.claim_now is not None
                else None
            )
            pages = {key: self._page(conn, *key) for key in plan.lists}
            counts = (
                conn.execute("SELECT status, sum(n)::bigint FROM job_counts GROUP BY status")
                if plan.counts
                else None
            )
            if plan.read_only:  # nothing to write: no round trip, no thread, to commit
                conn.commit()
        if rows is not None:
            for row in rows.fetchall():
                job = job_from_row(row)
                loaded.jobs[job.id] = job
        if peeked is not None:
            for row in peeked.fetchall():
                job = job_from_row(row)
                loaded.jobs[job.id] = job
        if claimed is not None:
            for row in claimed.fetchall():
                job = job_from_row(row)
                if job.id not in plan.ids:  # (a locked read of the same row came first)
                    loaded.jobs[job.id] = job
                loaded.claimed.append(loaded.jobs[job.id])
        for key, cursor in pages.items():
            loaded.pages[key] = [job_from_row(row) for row in cursor.fetchall()]
        if counts is not None:
            found = dict.fromkeys(Status, 0)
            for status, n in counts.fetchall():
                found[STATUS_BY_NAME[status]] = int(n)
            self.counts = found
        if plan.expire_before is not None:
            self._load_expired(conn, plan, loaded)
        current = version.fetchone()[0]
        if current != self._rules_version:
            self._reload_rules(conn)
            if plan.read_only:
                conn.commit()
        loaded.others_watch = others_watch is not None and others_watch.fetchone()[0]
        return loaded

    def _watch_gate(self, conn: Any, watch: bool, read_only: bool) -> tuple[Any, Any]:
        """First statements of a batch's transaction: the watch gate (module
        docstring) with the rules' version, this instance's watching flag set to
        `watch` when it changes, and "another instance watches" (a statement of
        its own: its snapshot must follow the lock) unless the batch only reads.
        Their cursors: (rules version, others watch or None)."""
        lock = (
            "pg_advisory_xact_lock"
            if watch and not self._watching
            else "pg_advisory_xact_lock_shared"
        )
        version = conn.execute(
            f"SELECT (SELECT value FROM settings WHERE key = 'rules_version'), {lock}(%s)",
            (WATCH_GATE,),
        )
        if watch != self._watching:  # self._watching follows at the commit
            conn.execute(
                "UPDATE instances SET watching = %s WHERE id = %s", (watch, self.instance_id)
            )
            self._watching_next = watch
        return version, None if read_only else self._others_watching(conn)

    def _others_watching(self, conn: Any) -> Any:
        """The cursor of "another instance has watchers"."""
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM instances WHERE watching AND id <> %s)",
            (self.instance_id,),
        )

    def _others_watch(self, conn: Any) -> bool:
        """First statement of a housekeeping transaction that changes jobs: the
        watch gate, shared (before any row lock: no deadlock with a transaction
        that holds it exclusively); whether another instance has watchers."""
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (WATCH_GATE,))
        return bool(self._others_watching(conn).fetchone()[0])

    @staticmethod
    def _page(conn: Any, prefix: str, status: Status | None, after: str, limit: int) -> Any:
        """Jobs with `prefix` after `after` in id order: an index range scan."""
        where = ["id >= %s"]
        params: list[Any] = [prefix]
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            where.append("id < %s")
            params.append(upper)
        if after:
            where.append("id > %s")
            params.append(after)
        if status is not None:
            where.append("status = %s")
            params.append(status.value)
        query = f"SELECT {JOB_SELECT} FROM jobs WHERE {' AND '.join(where)} ORDER BY id LIMIT %s"
        params.append(limit + 1)  # one more: are there more?
        return conn.execute(query, params)

    @staticmethod
    def _load_expired(conn: Any, plan: LoadPlan, loaded: Loaded) -> None:
        # One instance at a time; the others' passes find nothing to do meanwhile.
        (mine,) = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK,)).fetchone()
        if not mine:
            return
        for row in conn.execute(
            f"SELECT {JOB_SELECT} FROM jobs WHERE status IN ('executed', 'failed')"
            " AND updated_at < %s ORDER BY updated_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (plan.expire_before, plan.expire_limit),
        ):
            job = job_from_row(row)
            if job.id not in plan.ids:
                loaded.jobs[job.id] = job
            loaded.expired.append(job.id)

    def _commit(self, view: BatchView, plan: LoadPlan) -> int | None:
        """Write and commit; the next due time to use, when this batch tells one."""
        import psycopg

        with self._lock:
            conn = self._writer()
            try:
                due = self._write(conn, view, plan)
            except psycopg.Error as error:
                raise self._failed(error) from None
            except BaseException:
                self._failed(None)
                raise
            self._committed()
            return due

    def _committed(self) -> None:
        if self._watching_next is not None:
            self._watching, self._watching_next = self._watching_next, None

    def _write(self, conn: Any, view: BatchView, plan: LoadPlan) -> int | None:
        inserted, updated, deleted = view.changes()
        rules_put, rules_deleted = view.rule_changes()
        deltas = sorted((status.value, n) for status, n in view.count_changes().items())
        me = self.instance_id
        earliest = min(
            (job.execute_at for job in (*inserted, *updated) if waits(job)), default=None
        )
        bumped = None
        with conn.pipeline():
            if inserted:
                conn.execute(_INSERT_JOBS, _job_arrays(inserted, me))
            whole, marked = _split_updates(updated, view.loaded.jobs)
            if whole:
                conn.execute(_UPDATE_JOBS, _job_arrays(whole, me))
            if marked:
                conn.execute(_UPDATE_STATUSES, _status_arrays(marked, me))
            if deleted:
                conn.execute("DELETE FROM jobs WHERE id = ANY(%b::text[])", (deleted,))
            if deltas:
                statuses, numbers = zip(*deltas, strict=True)
                conn.execute(_MOVE_COUNTS, (self._shard, list(statuses), list(numbers)))
            if rules_put:
                conn.execute(
                    _UPSERT_RULES, [list(c) for c in zip(*map(rule_row, rules_put), strict=True)]
                )
            if rules_deleted:
                conn.execute("DELETE FROM rules WHERE id = ANY(%b::text[])", (rules_deleted,))
            if rules_put or rules_deleted:
                bumped = conn.execute(
                    "UPDATE settings SET value = value + 1 WHERE key = 'rules_version'"
                    " RETURNING value"
                )
            changed = [job.id for job in inserted] + [job.id for job in updated] + deleted
            if changed and view.loaded.others_watch:
                self._notify_jobs(conn, changed)
            if earliest is not None and (self._next_due is None or earliest < self._next_due):
                conn.execute("SELECT pg_notify(%s, %s)", (DUE_CHANNEL, f"{me} {earliest}"))
            next_due = (
                conn.execute(
                    "SELECT execute_at FROM jobs WHERE waits ORDER BY execute_at LIMIT 1"
                    " FOR UPDATE SKIP LOCKED"
                )
                if plan.claim_now is not None
                else None
            )
            conn.commit()  # in the pipeline: no round trip of its own
        if bumped is not None:
            (version,) = bumped.fetchone()
            if version != self._rules_version + 1:  # another instance changed rules meanwhile
                self._reload_rules(conn)
                conn.commit()
            else:
                self._rules_version = version
        if next_due is not None:
            row = next_due.fetchone()
            due = None if row is None else row[0]
            now = now_us()
            if due is not None and due <= now and (view.waiting or not view.loaded.claimed):
                # What is due was held back (its runner kind is full: the dispatcher
                # waits for room) or is locked by other instances' claims: look
                # again soon, not at once (the claim would find the same rows).
                due = now + LOCKED_RETRY_US
            if earliest is not None and (due is None or earliest < due):
                due = earliest
            return due
        if earliest is not None and (self._next_due is None or earliest < self._next_due):
            return earliest
        return None

    def _notify_jobs(self, conn: Any, ids: list[str]) -> None:
        """Tell the other instances which jobs changed, in payloads under 8000 bytes."""
        chunk: list[str] = []
        size = 0
        for job_id in ids:
            length = len(job_id.encode()) + 4
            if chunk and size + length > MAX_NOTIFY_BYTES:
                self._send_ids(conn, chunk)
                chunk, size = [], 0
            if length > MAX_NOTIFY_BYTES:  # an id too long for a payload: refreshed by id hash
                continue
            chunk.append(job_id)
            size += length
        if chunk:
            self._send_ids(conn, chunk)

    def _send_ids(self, conn: Any, ids: list[str]) -> None:
        payload = json.dumps([self.instance_id, ids], ensure_ascii=False, separators=(",", ":"))
        conn.execute("SELECT pg_notify(%s, %s)", (JOBS_CHANNEL, payload))

    # -- shared reads ---------------------------------------------------------------

    def _reload_rules(self, conn: Any) -> None:
        version = conn.execute("SELECT value FROM settings WHERE key = 'rules_version'").fetchone()[
            0
        ]
        rules = [
            rule_from_row(row)
            for row in conn.execute("SELECT id, pattern, runner, policy FROM rules")
        ]
        index = self._rules
        for rule_id in list(index.rules):
            index.delete_rule(rule_id)
        for rule in rules:
            index.put_rule(rule)
        self._rules_version = version

    def _read_counts(self, conn: Any) -> None:
        found = dict.fromkeys(Status, 0)
        for status, n in conn.execute(
            "SELECT status, sum(n)::bigint FROM job_counts GROUP BY status"
        ):
            found[STATUS_BY_NAME[status]] = int(n)
        self.counts = found

    @staticmethod
    def _earliest_due(conn: Any) -> int | None:
        row = conn.execute("SELECT min(execute_at) FROM jobs WHERE waits").fetchone()
        return None if row is None else row[0]

    @property
    def rules(self) -> dict[str, Rule]:
        return self._rules.rules

    # -- background: leases, notifications, polling -----------------------------------

    async def run(
        self,
        on_due: Callable[[int | None], None],
        on_jobs_changed: Callable[[list[str]], Awaitable[None]],
        probe: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the lease, listen, poll; until cancelled. `on_due(t)`: the earliest
        due time changed; `on_jobs_changed(ids)`: another instance (or this one's
        housekeeping) changed jobs, called while this instance has watchers;
        `probe()`: the database failed a poll: have the actor try a batch (an idle
        instance learns so that it cannot write, and /ready says so)."""
        self._on_due = on_due
        on_due(self._next_due)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_lease, on_jobs_changed)
            nursery.start_soon(self._poll, probe)
            # Started once it listens: a watcher subscribed after this instance is
            # ready must hear every change another instance makes from then on.
            await nursery.start(self._listen, on_jobs_changed)
            task_status.started()

    async def _keep_lease(self, on_jobs_changed: Callable[[list[str]], Awaitable[None]]) -> None:
        failing = False
        while True:
            await trio.sleep(self.config.heartbeat_s)
            try:
                freed = await trio.to_thread.run_sync(self._renew_and_sweep)
            except Exception as error:
                if not failing:  # once per outage; the actor's storage errors say the rest
                    log.warning("lease renewal failed", error=_describe(error))
                failing = True
                continue
            if failing:
                log.info("lease renewed again")
            failing = False
            if freed and self.has_watchers():  # the other instances' were NOTIFYed
                await on_jobs_changed(freed)

    def _renew_and_sweep(self) -> list[str]:
        """Renew the lease; when this instance does the housekeeping, plan again
        the runs of dead instances. The ids of the jobs planned again."""
        config = self.config
        with self._pool.connection() as conn:
            renewed = conn.execute(
                "UPDATE instances SET lease_until = now() + %s * interval '1 second' WHERE id = %s",
                (config.lease_s, self.instance_id),
            ).rowcount
            if not renewed:  # taken for dead (e.g. cut off from the database): come back
                log.warning("lease had expired: this instance's runs in flight may run twice")
                self._watching = False  # the new row's; the next batch sets it under the gate
                conn.execute(
                    "INSERT INTO instances (id, host, pid, lease_until)"
                    " VALUES (%s, %s, %s, now() + %s * interval '1 second')",
                    (self.instance_id, socket.gethostname(), os.getpid(), config.lease_s),
                )
            conn.commit()
            (mine,) = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s)", (HOUSEKEEPING_LOCK,)
            ).fetchone()
            freed: list[str] = []
            if mine:
                others_watch = self._others_watch(conn)
                conn.execute("DELETE FROM instances WHERE lease_until < now()")
                live = [str(row[0]) for row in conn.execute("SELECT id FROM instances FOR SHARE")]
                freed = self._free(conn, _FREE_TRIGGERED, live, others_watch)
                if freed:
                    log.warning("runs of dead instances planned again", jobs=len(freed))
            conn.commit()
            return freed

    def _free(self, conn: Any, statement: str, param: Any, others_watch: bool) -> list[str]:
        """Plan again the triggered jobs `statement` selects; counts, NOTIFY. Commits;
        the ids. others_watch: from _others_watch, first in the transaction."""
        rows = conn.execute(statement, (param,)).fetchall()
        if rows:
            waiting = [at for _id, at, waits in rows if waits]
            conn.execute(
                _MOVE_COUNTS, (self._shard, ["planned", "triggered"], [len(rows), -len(rows)])
            )
            if others_watch:
                self._notify_jobs(conn, [job_id for job_id, _at, _waits in rows])
            if waiting:
                conn.execute("SELECT pg_notify(%s, %s)", (DUE_CHANNEL, f"- {min(waiting)}"))
        conn.commit()
        return [job_id for job_id, _at, _waits in rows]

    async def _poll(self, probe: Callable[[], Awaitable[None]]) -> None:
        while True:
            await trio.sleep(self.config.poll_interval_s)
            try:
                due = await trio.to_thread.run_sync(self._poll_once)
            except Exception as error:
                log.debug("poll failed", error=_describe(error))
                await probe()
                continue
            self._set_next_due(due)

    def _poll_once(self) -> int | None:
        with self._pool.connection() as conn:
            self._read_counts(conn)
            return self._earliest_due(conn)

    async def _listen(
        self,
        on_jobs_changed: Callable[[list[str]], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """LISTEN for other instances' changes; started once listening, or once
        the first attempt failed (the database is down: it retries meanwhile, and
        the actor's batches fail and say so)."""
        import psycopg

        delay = 0.1
        started = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._listener)
            except psycopg.Error as error:
                log.debug("listener cannot connect", error=_describe(error), retry_in_s=delay)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if not started:
                task_status.started()
                started = True
            delay = 0.1
            try:
                while True:
                    notes = await trio.to_thread.run_sync(
                        self._wait_notifies, conn, abandon_on_cancel=True
                    )
                    changed = self._heard(notes)
                    if changed and self.has_watchers():
                        await on_jobs_changed(changed)
            except psycopg.Error as error:
                log.debug("listener lost its connection", error=_describe(error))
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close)

    def _listener(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.config.dsn, autocommit=True, connect_timeout=5)
        conn.execute(f"LISTEN {DUE_CHANNEL}")
        conn.execute(f"LISTEN {JOBS_CHANNEL}")
        return conn

    def _wait_notifies(self, conn: Any) -> list[tuple[str, str]]:
        notes = [(n.channel, n.payload) for n in conn.notifies(timeout=0.5, stop_after=1)]
        # what else is queued, without waiting
        notes += [(n.channel, n.payload) for n in conn.notifies(timeout=0.001)]
        return notes

    def _heard(self, notes: list[tuple[str, str]]) -> list[str]:
        """Act on notifications; the ids of jobs other instances changed."""
        changed: list[str] = []
        earliest: int | None = None
        for channel, payload in notes:
            try:
                if channel == DUE_CHANNEL:
                    sender, _, at = payload.partition(" ")
                    if sender != self.instance_id:
                        due = int(at)
                        earliest = due if earliest is None else min(earliest, due)
                elif channel == JOBS_CHANNEL:
                    sender, ids = json.loads(payload)
                    if sender != self.instance_id:
                        changed.extend(ids)
            except (ValueError, TypeError):
                log.warning("unreadable notification", channel=channel)
        if earliest is not None and (self._next_due is None or earliest < self._next_due):
            self._set_next_due(earliest)
        return changed
