"""`kairoi-trio storage copy` and `kairoi-trio db migrate`: move every job and
rule between the embedded log and PostgreSQL, and upgrade a database's schema.

    kairoi-trio storage copy --from log:DIR --to postgres:DSN [--schema S]
    kairoi-trio storage copy --from postgres:DSN --to log:DIR [--schema S]
    kairoi-trio db migrate [-c FILE] [--dsn DSN] [--schema S]

The source is only read; the servers using it should be stopped (a log
directory in use is refused, as its lock says). The target must be empty: a
new log directory (absent or empty), or a database schema without jobs or
rules (created and migrated if missing). Jobs `triggered` in the source are
copied planned: their run may or may not have happened (at-least-once), as a
restart would do. See docs/postgres.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from kairoi_trio.model import Job, Rule

LOG, POSTGRES = "log", "postgres"


def add_storage_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `storage copy` and `db migrate`."""
    from kairoi_trio.config import add_config_option

    storage = commands.add_parser("storage", help="copy jobs and rules between stores")
    storage_commands = storage.add_subparsers(dest="storage_command", metavar="COMMAND")
    storage_commands.required = True
    copy = storage_commands.add_parser(
        "copy",
        help="copy every job and rule from one store into an empty one",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
        epilog="Exit status: 0 copied and counted, 1 the copy failed (the target is left"
        " as it was), 2 bad arguments.",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="log:DIR|postgres:DSN")
    copy.add_argument("--to", dest="target", required=True, metavar="log:DIR|postgres:DSN")
    copy.add_argument("--schema", default="kairoi", help="the PostgreSQL schema (default: kairoi)")

    db = commands.add_parser("db", help="the PostgreSQL store's schema")
    db_commands = db.add_subparsers(dest="db_command", metavar="COMMAND")
    db_commands.required = True
    migrate = db_commands.add_parser(
        "migrate",
        help="create or upgrade the schema of [storage.postgres]",
        description="Apply the schema migrations this release knows to the database of"
        " [storage.postgres] (or --dsn), under an advisory lock; a schema newer than this"
        " release is refused. The server does the same at start-up.",
    )
    add_config_option(migrate)
    migrate.add_argument("--dsn", help="instead of [storage.postgres] dsn")
    migrate.add_argument("--schema", help="instead of [storage.postgres] schema")


def _endpoint(text: str) -> tuple[str, str]:
    kind, sep, where = text.partition(":")
    if not sep or kind not in (LOG, POSTGRES) or not where:
        raise ValueError(f"{text!r}: expected log:DIRECTORY or postgres:DSN")
    return kind, where


def run_storage_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `storage copy` from parsed arguments; the exit status (0, 1 or 2)."""
    from kairoi_trio.observability.logging import configure_logging

    configure_logging("warning", "console")  # the summary line says what was done
    out = out or sys.stdout
    try:
        source = _endpoint(args.source)
        target = _endpoint(args.target)
    except ValueError as error:
        print(f"kairoi-trio: {error}", file=sys.stderr)
        return 2
    if source[0] == target[0]:
        hint = " (`kairoi-trio backup` copies a data directory)" if source[0] == LOG else ""
        print(f"kairoi-trio: copy goes from one kind of store to the other{hint}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        jobs, rules = _copy(source, target, args.schema)
    except Exception as error:  # one line, nothing half-done (see _copy)
        print(f"kairoi-trio: copy failed: {error}", file=sys.stderr)
        return 1
    print(
        f"copied {jobs} jobs and {rules} rules from {source[0]} to {target[0]}"
        f" in {time.monotonic() - started:.1f} s",
        file=out,
    )
    return 0


def _copy(source: tuple[str, str], target: tuple[str, str], schema: str) -> tuple[int, int]:
    from kairoi_trio.storage.postgres import bulk

    if target[0] == POSTGRES:
        bulk.migrate_database(target[1], schema)
        with bulk.connect(target[1]) as conn:
            if not bulk.is_empty(conn, schema):
                raise ValueError(f"the target schema {schema!r} already holds jobs or rules")
            if source[0] == LOG:
                jobs, rules = _read_log(Path(source[1]))
                written = bulk.write_store(conn, schema, rules, jobs.values())
                return written, len(rules)
            with bulk.connect(source[1]) as from_conn:
                rule_list, job_iter = bulk.read_store(from_conn, schema)
                return bulk.write_store(conn, schema, rule_list, job_iter), len(rule_list)
    directory = Path(target[1])
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty")
    with bulk.connect(source[1]) as conn:
        rule_list, job_iter = bulk.read_store(conn, schema)
        jobs = {job.id: job for job in job_iter}
    _write_log(directory, jobs, {rule.id: rule for rule in rule_list})
    return len(jobs), len(rule_list)


def _read_log(directory: Path) -> tuple[dict[str, Job], list[Rule]]:
    """The state a server would load from `directory` (locked meanwhile: refused
    while a server uses it); triggered jobs stay as they are (bulk plans them)."""
    import trio

    from kairoi_trio.storage.log import DurableLog

    if not directory.is_dir():
        raise ValueError(f"{directory}: no such data directory")

    async def read() -> tuple[dict[str, Job], list[Rule]]:
        log = DurableLog(directory, fsync=False)
        loaded = await trio.to_thread.run_sync(log.load)
        await log.aclose()
        return loaded.jobs, list(loaded.rules.values())

    return trio.run(read)


def _write_log(directory: Path, jobs: dict[str, Job], rules: dict[str, Rule]) -> None:
    """A new data directory holding `jobs` and `rules` as one snapshot."""
    import trio

    from kairoi_trio.core.state import recover_replayed
    from kairoi_trio.storage.log import DurableLog

    recover_replayed(jobs)  # triggered: planned again

    async def write() -> None:
        log = DurableLog(directory)
        await trio.to_thread.run_sync(log.load)
        try:
            await log.compact(jobs, rules)
        finally:
            await log.aclose()

    trio.run(write)


def run_db_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `db migrate` from parsed arguments; the exit status (0, 1 or 2)."""
    from kairoi_trio.config import ConfigError, load_config
    from kairoi_trio.storage.postgres import bulk
    from kairoi_trio.storage.postgres.schema import SchemaError

    out = out or sys.stdout
    try:
        config = load_config(getattr(args, "config", None)).storage.postgres
    except ConfigError as error:
        print(f"kairoi-trio: {error}", file=sys.stderr)
        return 2
    dsn = args.dsn or config.dsn
    schema = args.schema or config.schema
    if not dsn:
        print("kairoi-trio: no database: give --dsn or [storage.postgres] dsn", file=sys.stderr)
        return 2
    try:
        before, after = bulk.migrate_database(dsn, schema)
    except SchemaError as error:
        print(f"kairoi-trio: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"kairoi-trio: migration failed: {error}", file=sys.stderr)
        return 1
    if before == after:
        print(f"schema {schema!r} is up to date (version {after})", file=out)
    else:
        print(f"schema {schema!r} migrated from version {before} to {after}", file=out)
    return 0
