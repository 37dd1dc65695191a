"""The PostgreSQL schema: numbered migrations, applied in order, once each.

`migrate(conn, schema)` brings a database up to SCHEMA_VERSION under an
advisory lock (several instances starting at once apply each migration once)
and refuses a schema newer than this server knows: an older release must not
write a layout it does not understand. The server migrates at start-up;
`kairoi-trio db migrate` does it by hand (e.g. before a rolling upgrade).

A migration is never edited once released: a change is a new, higher number.
Every statement runs with `search_path` set to the configured schema, so the
SQL below names tables without a schema.
"""

from __future__ import annotations

from typing import Any

# (version, what it does, SQL). Versions are 1, 2, 3... without gaps.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "jobs, rules, counts, instances",
        """
        -- Ids compare as bytes (COLLATE "C"): the order of the embedded store and of
        -- the protocols' pagination, and index range scans for id prefixes.
        CREATE TABLE jobs (
            id text COLLATE "C" PRIMARY KEY,
            execute_at bigint NOT NULL,          -- microseconds since 1970, UTC
            status text NOT NULL
                CHECK (status IN ('planned', 'triggered', 'executed', 'failed')),
            waits boolean NOT NULL,              -- planned, not paused: waits for its time
            payload bytea NOT NULL,
            attempts integer NOT NULL,
            last_outcome text NOT NULL,
            updated_at bigint NOT NULL,          -- microseconds since 1970, UTC
            recurrence jsonb,                    -- null for a one-shot job
            owner uuid                           -- the instance running it, while triggered
        );
        -- Due jobs, oldest first: the claim's index (planned rows only).
        CREATE INDEX jobs_due ON jobs (execute_at) WHERE waits;
        -- Retention: finished jobs by age.
        CREATE INDEX jobs_finished ON jobs (updated_at) WHERE status IN ('executed', 'failed');
        -- Runs in flight per instance: what a dead instance's lease frees.
        CREATE INDEX jobs_triggered ON jobs (owner) WHERE status = 'triggered';
        -- Listing by status in id order.
        CREATE INDEX jobs_status_id ON jobs (status, id);

        CREATE TABLE rules (
            id text COLLATE "C" PRIMARY KEY,
            pattern text COLLATE "C" NOT NULL,
            runner jsonb NOT NULL,
            policy jsonb NOT NULL
        );

        -- Jobs by status, kept by every write in its own transaction: a count
        -- without scanning the jobs. Each instance adds its deltas to one of 16
        -- shards, so instances rarely wait for each other's counter row.
        CREATE TABLE job_counts (
            shard smallint NOT NULL,
            status text NOT NULL,
            n bigint NOT NULL,
            PRIMARY KEY (shard, status)
        );

        -- Live instances and their leases.
        CREATE TABLE instances (
            id uuid PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at timestamptz NOT NULL DEFAULT now(),
            lease_until timestamptz NOT NULL
        );

        -- Counters shared by instances: rules_version changes with every rule
        -- write, so that each instance reloads its copy of the rules.
        CREATE TABLE settings (
            key text PRIMARY KEY,
            value bigint NOT NULL
        );
        INSERT INTO settings VALUES ('rules_version', 0);

        -- The jobs with readable times, for people at a psql prompt.
        CREATE VIEW job_times AS
            SELECT id, status,
                   timestamptz 'epoch' + execute_at * interval '1 microsecond' AS execute_at,
                   attempts, last_outcome,
                   timestamptz 'epoch' + updated_at * interval '1 microsecond' AS updated_at,
                   recurrence IS NOT NULL AS recurring, owner, length(payload) AS payload_bytes
            FROM jobs;
        """,
    ),
    (
        2,
        "instances.watching",
        """
        -- The instance has WatchJobs streams: the others NOTIFY the ids they change
        -- (storage/postgres/store.py, the watch gate). None watching, none is sent.
        ALTER TABLE instances ADD COLUMN watching boolean NOT NULL DEFAULT false;
        """,
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

# pg_advisory_xact_lock key of migrations ("kairoi-m" as an integer).
MIGRATION_LOCK = 0x6B6169726F692D6D


class SchemaError(Exception):
    """The database's schema cannot be used by this server (newer than it knows)."""


def migrate(conn: Any, schema: str) -> tuple[int, int]:
    """Bring `schema` up to SCHEMA_VERSION; returns (version before, version after).

    conn: a psycopg Connection (not in a transaction). Creates the schema and its
    `schema_version` table when missing. Raises SchemaError for a schema newer
    than SCHEMA_VERSION, psycopg.Error when the database fails.
    """
    from psycopg import sql

    name = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(name))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY,"
            " description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        before = int(row[0])
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"the database schema {schema!r} is at version {before}, newer than this"
                f" server knows ({SCHEMA_VERSION}): upgrade kairoi-trio, or use another schema"
            )
        for version, description, statements in MIGRATIONS:
            if version > before:
                conn.execute(statements)
                conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                    (version, description),
                )
    return before, SCHEMA_VERSION


def check_version(conn: Any, schema: str) -> int:
    """The schema's version; SchemaError if it is missing, older or newer than this server's."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.schema_version",)
    ).fetchone()
    if not row[0]:
        raise SchemaError(f"no kairoi-trio schema {schema!r} in this database: run db migrate")
    version = conn.execute(f'SELECT coalesce(max(version), 0) FROM "{schema}".schema_version')
    found = int(version.fetchone()[0])
    if found != SCHEMA_VERSION:
        newer = "newer" if found > SCHEMA_VERSION else "older"
        raise SchemaError(
            f"the database schema {schema!r} is at version {found}, {newer} than this"
            f" server's {SCHEMA_VERSION}"
        )
    return found
