"""Whole-store reads and writes of the PostgreSQL store, for `storage copy` and
`db migrate` (blocking; never used by a running server).

The copy writes with COPY (psycopg's copy protocol), in one transaction: a
copy that fails leaves the target as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from kairoi_trio.model import Job, Rule, Status
from kairoi_trio.storage.postgres.rows import (
    JOB_SELECT,
    job_from_row,
    job_row,
    rule_from_row,
    rule_row,
)
from kairoi_trio.storage.postgres.schema import check_version, migrate

READ_BATCH = 10_000


def connect(dsn: str) -> Any:
    """A psycopg connection (autocommit off); psycopg.OperationalError if unreachable."""
    import psycopg

    return psycopg.connect(dsn, connect_timeout=10)


def migrate_database(dsn: str, schema: str) -> tuple[int, int]:
    """`db migrate`: (version before, version after)."""
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        return migrate(conn, schema)


def read_store(conn: Any, schema: str) -> tuple[list[Rule], Iterator[Job]]:
    """The rules, and the jobs in id order (read in batches from a server-side
    cursor, in one repeatable-read transaction: a consistent copy)."""
    from psycopg import IsolationLevel

    check_version(conn, schema)
    conn.rollback()
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    conn.execute(f'SET LOCAL search_path TO "{schema}"')
    rules = [
        rule_from_row(r) for r in conn.execute("SELECT id, pattern, runner, policy FROM rules")
    ]

    def jobs() -> Iterator[Job]:
        with conn.cursor(name="kairoi_copy") as cursor:
            cursor.itersize = READ_BATCH
            cursor.execute(f"SELECT {JOB_SELECT} FROM jobs ORDER BY id")
            for row in cursor:
                yield job_from_row(row)
        conn.rollback()

    return rules, jobs()


def is_empty(conn: Any, schema: str) -> bool:
    conn.execute(f'SET search_path TO "{schema}"')
    (jobs,) = conn.execute("SELECT count(*) FROM (SELECT 1 FROM jobs LIMIT 1) AS j").fetchone()
    (rules,) = conn.execute("SELECT count(*) FROM rules").fetchone()
    conn.rollback()
    return not jobs and not rules


def write_store(conn: Any, schema: str, rules: Iterable[Rule], jobs: Iterable[Job]) -> int:
    """Write rules and jobs into an empty, migrated store, in one transaction;
    the number of jobs written. Jobs `triggered` in the source are written
    planned (their run may or may not have happened: at-least-once)."""
    counts = dict.fromkeys(Status, 0)
    written = 0
    with conn.transaction():
        conn.execute(f'SET LOCAL search_path TO "{schema}"')
        with conn.cursor().copy("COPY rules (id, pattern, runner, policy) FROM STDIN") as copy:
            for rule in rules:
                rule_id, pattern, runner, policy = rule_row(rule)
                copy.write_row((rule_id, pattern, runner, policy))
        with conn.cursor().copy(f"COPY jobs ({JOB_SELECT}) FROM STDIN") as copy:
            for job in jobs:
                if job.status is Status.TRIGGERED:
                    job = _planned(job)
                row = job_row(job)
                copy.write_row(row)
                counts[job.status] += 1
                written += 1
        conn.execute(
            "INSERT INTO job_counts (shard, status, n) SELECT 0, s, n"
            " FROM unnest(%s::text[], %s::bigint[]) AS c(s, n)"
            " ON CONFLICT (shard, status) DO UPDATE SET n = job_counts.n + EXCLUDED.n",
            ([s.value for s in counts], list(counts.values())),
        )
        conn.execute("UPDATE settings SET value = value + 1 WHERE key = 'rules_version'")
    return written


def _planned(job: Job) -> Job:
    from kairoi_trio.model import new_job

    return new_job(
        job.id,
        job.execute_at,
        Status.PLANNED,
        job.payload,
        job.attempts,
        job.last_outcome,
        job.updated_at,
        job.recurrence,
    )
