"""`kairoi-trio import-kairoi DIR`: bring a Kairoi server's jobs and rules into the store.

Reads Kairoi's three log files in DIR (kairoi_log.py has the format), keeps the
latest entry of every job and rule, converts them, and writes them into the
kairoi-trio data directory of the target configuration as ONE snapshot
(DurableLog.compact: written under a temporary name and renamed), so an
interrupted import leaves the store exactly as it was. docs/importing-from-kairoi.md
is the user's guide; what follows are the decisions it documents.

- The store's directory lock is taken first: a directory a running server
  holds is refused before anything is read.
- A store that already holds jobs or rules is refused unless --merge; with
  --merge an imported job or rule replaces the one with the same id.
- Times: Kairoi's nanoseconds are rounded UP to kairoi-trio's microseconds,
  so no job runs earlier than Kairoi would have run it (Kairoi's own protocol
  only takes whole seconds, so nothing is rounded in practice). Kairoi's i64
  spans 1677-09-21..2262-04-11, inside kairoi-trio's 0001..9999, so no
  time is out of range.
- Statuses: planned, executed and failed stay; triggered (a run was in flight
  when Kairoi stopped) becomes planned, so it runs again at the server's start,
  as Kairoi itself would have done at its restart (at least once).
- Executed and failed jobs get the import time as their last change, so
  retention (storage.retention_s) keeps them that long after the import.
- Jobs and rules kairoi-trio's validation refuses (an empty id, a shell command
  outside runners.shell.allowed_commands, a malformed amqp dsn) are listed and
  nothing is written, unless --skip-invalid (then they are listed as skipped).
- A torn entry at the end of the newest file (Kairoi stopped mid-write) is
  skipped with a warning; any other damage is an error naming file and offset.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import trio

from kairoi_trio.commands import CommandError
from kairoi_trio.config import Config, ConfigError, add_config_option, load_config
from kairoi_trio.core.validation import RuleValidator, validate_job
from kairoi_trio.migration.kairoi_log import (
    KAIROI_COMPACTION_TMP,
    KAIROI_LOG_FILES,
    KairoiFormatError,
    KairoiJob,
    KairoiState,
    LogfileParser,
    TornEntry,
)
from kairoi_trio.model import Job, Rule, Status, check_time, new_job, now_us
from kairoi_trio.storage.log import CorruptLogError, DirectoryLockedError, DurableLog, StorageError

PROG = "kairoi-trio import-kairoi"
READ_CHUNK = 1 << 20
# Below this the read takes well under a second: no progress bar.
PROGRESS_MIN_BYTES = 4 << 20
# The last_outcome of imported jobs that Kairoi had run (or started to run).
OUTCOME_IMPORTED = "imported from Kairoi"
OUTCOME_RETRIGGERED = "imported from Kairoi while triggered: runs again"
# How many refused entries are listed one by one.
LIST_INVALID = 50


class KairoiImportError(Exception):
    """The import cannot go on; nothing was written. str() is the one-line reason."""


# -- reading ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One of Kairoi's log files as read: size in bytes, entries parsed, a skipped torn end."""

    name: str
    path: Path
    size: int
    entries: int
    torn: TornEntry | None = None


@dataclass
class KairoiData:
    """What DIR holds: the latest entry of every job and rule, and per-file figures."""

    directory: Path
    state: KairoiState
    files: list[SourceFile]
    ignored: list[str] = field(default_factory=list)  # files present but not read


def kairoi_files(directory: Path) -> list[Path]:
    """The log files present in `directory`, in the order Kairoi reads them.

    Raises KairoiImportError if `directory` is not a directory or holds none of them.
    """
    if not directory.is_dir():
        raise KairoiImportError(f"{directory} is not a directory")
    present = [directory / name for name in KAIROI_LOG_FILES if (directory / name).is_file()]
    if not present:
        raise KairoiImportError(
            f"{directory} holds none of Kairoi's log files ({', '.join(KAIROI_LOG_FILES)}); "
            "Kairoi writes them in the directory it runs in"
        )
    return present


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_kairoi_directory(
    directory: Path, progress: Callable[[int], object] | None = None
) -> KairoiData:
    """Read Kairoi's log files in `directory` (BLOCKING: run it in a worker thread).

    progress(n) is called with the number of bytes of each chunk read.
    Raises KairoiImportError (no log files; a file changed while it was read,
    i.e. Kairoi still runs), KairoiFormatError (damage: file and offset), OSError.
    A torn entry at the end of the newest file is skipped and reported in
    SourceFile.torn; a torn end of an older file is an error, since Kairoi
    wrote the newer files after it and cannot have left it torn.
    """
    paths = kairoi_files(directory)
    watched = [directory / name for name in KAIROI_LOG_FILES]
    before = [_stamp(path) for path in watched]
    state = KairoiState()
    files: list[SourceFile] = []
    for path in paths:
        parser = LogfileParser(str(path))
        with open(path, "rb", buffering=0) as f:
            # Up to the size seen before reading: a file that grows meanwhile is
            # caught below rather than read for as long as it grows.
            left = os.fstat(f.fileno()).st_size
            while left > 0 and (chunk := f.read(min(READ_CHUNK, left))):
                left -= len(chunk)
                state.add(parser.feed(chunk))
                if progress is not None:
                    progress(len(chunk))
        torn = parser.close()
        if torn is not None and path != paths[-1]:
            newer = ", ".join(p.name for p in paths[paths.index(path) + 1 :])
            raise KairoiFormatError(
                str(path),
                torn.offset,
                f"{torn.reason}, but this is not the newest file ({newer} came after it); "
                f"`truncate -s {torn.offset} {path}` drops the entry if you accept losing it",
            )
        files.append(SourceFile(path.name, path, parser.offset, parser.entries, torn))
    if [_stamp(path) for path in watched] != before:
        raise KairoiImportError(
            f"Kairoi's log files in {directory} changed while they were read: "
            "stop Kairoi, then run the import again"
        )
    ignored = [KAIROI_COMPACTION_TMP] if (directory / KAIROI_COMPACTION_TMP).exists() else []
    return KairoiData(directory, state, files, ignored)


# -- converting ---------------------------------------------------------------------


def ns_to_us(ns: int) -> int:
    """Nanoseconds -> microseconds since the epoch, rounded up (towards the future)."""
    return -(-ns // 1000)


def convert_job(entry: KairoiJob, now: int) -> Job:
    """A Kairoi job as a kairoi-trio job (see the module docstring for each choice).

    now: the import time in microseconds, the job's updated_at.
    Raises ValueError for a time outside 0001-01-01..9999-12-31.
    """
    status = entry.status
    # Never out of range from a file (an i64 of ns spans 1677..2262): a guard for other callers.
    execute_at = check_time(ns_to_us(entry.execute_at_ns), "the execution time")
    if status is Status.TRIGGERED:
        return new_job(entry.id, execute_at, Status.PLANNED, b"", 0, OUTCOME_RETRIGGERED, now)
    if status.finished:  # one run that Kairoi made
        return new_job(entry.id, execute_at, status, b"", 1, OUTCOME_IMPORTED, now)
    return new_job(entry.id, execute_at, status, b"", 0, "", now)


@dataclass(frozen=True, slots=True)
class Refused:
    """An entry kairoi-trio's validation refuses: what, where it was read, why."""

    kind: str  # "job" or "rule"
    id: str
    source: str
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.id!r} ({self.source}, offset {self.offset}): {self.reason}"


@dataclass
class ImportPlan:
    """What the import writes: converted jobs and rules, and the figures it prints.

    by_status counts Kairoi's statuses (triggered included); replaced_* count
    ids the store already held (only with --merge).
    """

    jobs: dict[str, Job] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)
    refused: list[Refused] = field(default_factory=list)
    by_status: Counter[Status] = field(default_factory=Counter)
    by_runner: Counter[str] = field(default_factory=Counter)
    replaced_jobs: int = 0
    replaced_rules: int = 0


def plan_import(
    state: KairoiState,
    *,
    existing_jobs: Mapping[str, Job],
    existing_rules: Mapping[str, Rule],
    validate_rule: RuleValidator,
    max_payload_bytes: int,
    now: int,
) -> ImportPlan:
    """Convert and validate Kairoi's latest entries (pure: no I/O)."""
    plan = ImportPlan()
    for entry in state.jobs.values():
        try:
            validate_job(entry.id, b"", max_payload_bytes)
            plan.jobs[entry.id] = convert_job(entry, now)
        except (CommandError, ValueError) as error:
            reason = error.message if isinstance(error, CommandError) else str(error)
            plan.refused.append(Refused("job", entry.id, entry.source, entry.offset, reason))
            continue
        plan.by_status[entry.status] += 1
        plan.replaced_jobs += entry.id in existing_jobs
    for rule_entry in state.rules.values():
        rule = Rule(rule_entry.id, rule_entry.pattern, rule_entry.runner)
        try:
            validate_rule(rule)
        except CommandError as error:
            plan.refused.append(
                Refused("rule", rule.id, rule_entry.source, rule_entry.offset, error.message)
            )
            continue
        # The same policy a rule set over KCP gets: the configured default.
        plan.rules[rule.id] = validate_rule.with_default_policy(rule)
        plan.by_runner[rule.runner.kind] += 1
        plan.replaced_rules += rule.id in existing_rules
    return plan


# -- the command --------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOptions:
    source: Path
    config: Config
    merge: bool = False
    dry_run: bool = False
    skip_invalid: bool = False
    progress: bool | None = None  # None: when stderr is a terminal and the input is large


def _plural(count: int, word: str, words: str = "") -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


def _entries(count: int) -> str:
    return _plural(count, "entry", "entries")


def _size(size: int) -> str:
    if size < 1024:
        return _plural(size, "byte")
    if size < 1 << 20:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1 << 20):.1f} MiB"


class _Progress:
    """A tqdm bar over the bytes read, or nothing (not a terminal, small input)."""

    def __init__(self, total: int, out: TextIO, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc="reading Kairoi's log files",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=out,
                leave=False,
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def import_kairoi(options: ImportOptions, out: TextIO, err: TextIO) -> int:
    """Run the import; print the summary to `out`, warnings to `err`. Returns the exit status.

    Raises KairoiImportError, KairoiFormatError, CorruptLogError, StorageError
    or OSError when the import cannot be done; nothing is written then.
    """
    config = options.config
    paths = kairoi_files(options.source)  # fail fast, before the store is touched
    target = config.data_directory
    store: DurableLog | None = None
    existing_jobs: dict[str, Job] = {}
    existing_rules: dict[str, Rule] = {}
    if not (options.dry_run and not target.exists()):
        # fsync always: the import says "done" only once the data is on disk.
        store = DurableLog(target, fsync=True)
        try:
            loaded = await trio.to_thread.run_sync(store.load)
        except DirectoryLockedError:
            raise KairoiImportError(
                f"the data directory {target} is in use by a running kairoi-trio server: "
                "stop it, import, then start it again"
            ) from None
        existing_jobs, existing_rules = loaded.jobs, loaded.rules
    try:
        if (existing_jobs or existing_rules) and not options.merge:
            raise KairoiImportError(
                f"the data directory {target} already holds {_plural(len(existing_jobs), 'job')} "
                f"and {_plural(len(existing_rules), 'rule')}: use --merge to import into it "
                "(Kairoi's jobs and rules then replace those with the same id)"
            )
        total = sum(path.stat().st_size for path in paths)
        show = options.progress
        if show is None:
            show = err.isatty() and total >= PROGRESS_MIN_BYTES
        bar = _Progress(total, err, show)
        try:
            data = await trio.to_thread.run_sync(
                read_kairoi_directory, options.source, bar.update, abandon_on_cancel=True
            )
        finally:
            bar.close()
        for source in data.files:
            if source.torn is not None:
                torn = source.torn
                print(
                    f"{PROG}: warning: {torn.source}: offset {torn.offset}: skipped a torn entry "
                    f"at the end of the file, {_plural(torn.size, 'byte')} ({torn.reason}): "
                    "Kairoi stopped while writing it and never acknowledged it",
                    file=err,
                )
        for name in data.ignored:
            print(
                f"{PROG}: warning: {options.source / name} ignored: the temporary file of an "
                "unfinished Kairoi compaction (Kairoi does not read it either)",
                file=err,
            )
        plan = plan_import(
            data.state,
            existing_jobs=existing_jobs,
            existing_rules=existing_rules,
            validate_rule=RuleValidator(
                config.runners.shell.allowed_commands, config.policy.to_policy()
            ),
            max_payload_bytes=config.jobs.max_payload_bytes,
            now=now_us(),
        )
        if plan.refused:
            for refused in plan.refused[:LIST_INVALID]:
                verb = "skipped" if options.skip_invalid else "refused"
                print(f"{PROG}: {verb}: {refused}", file=err)
            if len(plan.refused) > LIST_INVALID:
                print(f"{PROG}: ... and {len(plan.refused) - LIST_INVALID} more", file=err)
            if not options.skip_invalid:
                raise KairoiImportError(
                    f"{_entries(len(plan.refused))} kairoi-trio refuses (listed above); "
                    "nothing was written. Fix them (e.g. runners.shell.allowed_commands in the "
                    "configuration) or pass --skip-invalid to import the rest"
                )
        if store is not None and not options.dry_run:
            jobs = {**existing_jobs, **plan.jobs}
            rules = {**existing_rules, **plan.rules}
            await store.compact(jobs, rules)
    finally:
        if store is not None:
            await store.aclose()
    _print_summary(options, data, plan, out)
    return 0


def _print_summary(options: ImportOptions, data: KairoiData, plan: ImportPlan, out: TextIO) -> None:
    config = options.config
    lines = [f"Kairoi directory {data.directory}:"]
    read = {source.name: source for source in data.files}
    for name in KAIROI_LOG_FILES:
        source = read.get(name)
        if source is None:
            lines.append(f"  {name}: not there")
        else:
            lines.append(
                f"  {name}: {_entries(source.entries)} ({_size(source.size)})"
                + (", torn end skipped" if source.torn else "")
            )
    verb = "Would import" if options.dry_run else "Imported"
    lines.append(
        f"{verb} into {config.data_directory}: {_plural(len(plan.jobs), 'job')}, "
        f"{_plural(len(plan.rules), 'rule')} (the latest of {_entries(data.state.entries)})"
    )
    statuses = ", ".join(f"{status.value} {plan.by_status[status]}" for status in Status)
    lines.append(f"  jobs by status: {statuses}")
    runners = ", ".join(f"{kind} {plan.by_runner[kind]}" for kind in ("shell", "amqp"))
    lines.append(f"  rules by runner: {runners}")
    if plan.refused:
        lines.append(f"  skipped: {_entries(len(plan.refused))} kairoi-trio refuses")
    if options.merge:
        lines.append(
            f"  replaced: {_plural(plan.replaced_jobs, 'job')} and "
            f"{_plural(plan.replaced_rules, 'rule')} the store already held"
        )
    triggered = plan.by_status[Status.TRIGGERED]
    if triggered:
        lines.append(
            f"  {_plural(triggered, 'job')} triggered when Kairoi stopped: planned again, "
            "to run when the server starts (at least once)"
        )
    finished = plan.by_status[Status.EXECUTED] + plan.by_status[Status.FAILED]
    if finished:
        lines.append(
            f"  {_plural(finished, 'executed or failed job')}: kept for storage.retention_s "
            f"({config.storage.retention_s:g} s) from now, then removed"
        )
    if options.dry_run:
        lines.append("Dry run: nothing was written.")
    out.write("\n".join(lines) + "\n")


# -- command-line wiring ------------------------------------------------------------


def add_import_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `import-kairoi DIR [-c FILE] [--merge] [--dry-run] [--skip-invalid]`."""
    description = (
        "Import a Kairoi server's jobs and rules: reads logfile.compressed, "
        "logfile.to_compress and logfile in DIR (the directory Kairoi ran in) and writes "
        "the latest state of each job and rule into the data directory of the "
        "configuration. Stop both servers first."
    )
    sub = commands.add_parser(
        "import-kairoi",
        help="import a Kairoi server's jobs and rules",
        description=description,
        epilog="Exit status: 0 imported, 1 nothing imported (the reason is printed), "
        "2 bad configuration or arguments. See docs/importing-from-kairoi.md.",
    )
    sub.add_argument("directory", type=Path, metavar="DIR", help="the directory Kairoi ran in")
    add_config_option(
        sub,
        "configuration of the target kairoi-trio (default: ./configuration.toml if it "
        "exists); its [storage] directory receives the data",
    )
    sub.add_argument(
        "--merge",
        action="store_true",
        help="import into a store that already holds jobs or rules; Kairoi's replace "
        "those with the same id",
    )
    sub.add_argument(
        "--dry-run",
        action="store_true",
        help="read and check everything, print what would be imported, write nothing",
    )
    sub.add_argument(
        "--skip-invalid",
        action="store_true",
        help="import even if some jobs or rules are refused by kairoi-trio's validation "
        "(they are listed and left out)",
    )


def run_import_command(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run `import-kairoi` from parsed arguments; returns the exit status.

    0 imported (or would be, with --dry-run); 1 nothing imported, the reason on
    `err`; 2 a bad configuration; 130 interrupted (Ctrl-C).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as error:
        print(f"{PROG}: {error}", file=err)
        return 2
    from kairoi_trio.observability.logging import configure_logging

    # The storage's info lines ("log loaded", "log compacted") would repeat the summary.
    configure_logging("warning", "console")
    options = ImportOptions(
        source=args.directory,
        config=config,
        merge=args.merge,
        dry_run=args.dry_run,
        skip_invalid=args.skip_invalid,
    )
    try:
        return trio.run(import_kairoi, options, out, err)
    except (KairoiImportError, KairoiFormatError, CorruptLogError) as error:
        print(f"{PROG}: {error}", file=err)
    except StorageError as error:
        print(f"{PROG}: {error}; nothing was imported", file=err)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"{PROG}: {where}{error.strerror or error}", file=err)
    except KeyboardInterrupt:
        # The snapshot is renamed into place whole or not at all: the store holds
        # either none of the import or all of it.
        print(f"{PROG}: interrupted", file=err)
        return 130
    return 1


__all__ = [
    "KairoiImportError",
    "add_import_command",
    "import_kairoi",
    "plan_import",
    "read_kairoi_directory",
    "run_import_command",
]
