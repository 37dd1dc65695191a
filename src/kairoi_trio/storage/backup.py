"""`kairoi-trio backup DEST [-c FILE]`: a consistent copy of a data directory, live or not.

Why a plain copy of the right files, cut at the right places, is consistent:

- The state is the newest snapshot N plus segments N+1, N+2, ... in order
  (docs/storage.md). A snapshot never changes once renamed into place, a
  sealed segment never changes, and the active segment only grows at its end.
- So: list the directory, OPEN snapshot N and every segment after it, then
  read them. A compaction that deletes these files after they were opened
  does not change what is read (an open file's data stays until it is
  closed). One that deleted a file between the listing and its opening is
  seen (the file is missing, or a segment number is skipped): start again.
- Each segment is read up to the size it had when it was opened, and the
  copy keeps its longest prefix of whole frames: a write in progress at the
  end of the active segment (never acknowledged yet) is left out. Every
  record acknowledged before the backup began was on disk before its segment
  was opened, so it is in the copy.

The copy is then read back with the same replay as a server's start-up
(log.read_state), and its figures printed. The source is only ever opened
for reading (its LOCK file is not touched), so this works while a server
writes, and on a stopped server's directory.

Exit status: 0 backed up and verified; 1 the backup could not be made (the
reason is printed; DEST is left empty); 2 bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from kairoi_trio.storage.compaction import (
    fsync_directory,
    list_directory,
    segment_path,
    snapshot_path,
)
from kairoi_trio.storage.log import CorruptLogError, LoadedState, read_state
from kairoi_trio.storage.records import (
    HEADER_SIZE,
    SEGMENT_MAGIC,
    SNAPSHOT_MAGIC,
    read_header,
    scan_frames,
    torn_tail,
)

PROG = "kairoi-trio backup"
# A compaction that removes files between the listing and the opening of a file
# makes an attempt start again; each compaction takes far longer than one attempt's
# listing and opening, so a few attempts are plenty.
ATTEMPTS = 10
_BLOCK = 4 << 20


class BackupRefused(Exception):
    """Bad arguments (exit status 2); nothing was written."""


class BackupError(Exception):
    """The backup could not be made (exit status 1); DEST was left empty."""


class _Retry(Exception):
    """The source changed under this attempt (a compaction): start again."""


@dataclass(frozen=True, slots=True)
class CopiedFile:
    """One file of the backup: bytes copied, and bytes of an unfinished write left out."""

    name: str
    bytes: int
    version: int
    left_out: int = 0


@dataclass
class BackupReport:
    source: Path
    dest: Path
    files: list[CopiedFile] = field(default_factory=list)
    attempts: int = 0
    state: LoadedState | None = None

    def render(self) -> str:
        lines = [f"backed up {self.source} to {self.dest} (attempt {self.attempts})"]
        for f in self.files:
            line = f"  {f.name}: {f.bytes} bytes, format {f.version}"
            if f.left_out:
                line += f" ({f.left_out} bytes of a write in progress at its end left out)"
            lines.append(line)
        state = self.state
        if state is not None:
            lines.append(
                f"verified: {len(state.jobs)} jobs, {len(state.rules)} rules, "
                f"{state.records} records read back in {state.seconds:.2f} s"
            )
            lines += [f"  warning: {w}" for w in state.warnings]
        return "\n".join(lines)


def _check_dest(source: Path, dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupRefused(f"{dest} exists and is not an empty directory")
    inside = source.resolve()
    if dest.resolve() == inside or inside in dest.resolve().parents:
        raise BackupRefused(f"{dest} is inside the data directory {source}")


def backup(source: Path, dest: Path) -> BackupReport:
    """Copy the data directory `source` into the new directory `dest`; verify the copy.

    BLOCKING. Raises BackupRefused (bad arguments), BackupError (the copy
    could not be made or does not read back; `dest` is left empty), OSError
    (from writing `dest`; `dest` is left empty too).
    """
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise BackupRefused(f"the data directory {source} does not exist")
    _check_dest(source, dest)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    report = BackupReport(source, dest)
    why = ""
    try:
        for attempt in range(1, ATTEMPTS + 1):
            report.attempts = attempt
            try:
                report.files = _copy_once(source, dest)
            except _Retry as retry:
                why = str(retry)
                _empty(dest)
                continue
            fsync_directory(dest)
            try:
                report.state = read_state(dest)
            except CorruptLogError as error:
                raise BackupError(f"the copy does not read back: {error}") from None
            return report
        raise BackupError(
            f"{source} changed under every one of {ATTEMPTS} attempts (last: {why}); "
            "is a compaction running in a loop?"
        )
    except BaseException:
        _empty(dest)
        if created:
            dest.rmdir()
        raise


def _empty(dest: Path) -> None:
    for path in dest.iterdir():
        path.unlink()


def _copy_once(source: Path, dest: Path) -> list[CopiedFile]:
    listing = list_directory(source)
    snapshot = max(listing.snapshots, default=0)
    segments = sorted(s for s in listing.segments if s > snapshot)
    if not snapshot and not segments:
        raise BackupError(f"{source} holds no snapshot or segment: not a data directory?")
    for expected, seq in enumerate(segments, start=snapshot + 1):
        if seq != expected:
            raise _Retry(f"segment {expected} is missing from the listing")
    paths = ([snapshot_path(source, snapshot)] if snapshot else []) + [
        segment_path(source, seq) for seq in segments
    ]
    opened: list[BinaryIO] = []
    try:
        for path in paths:
            try:
                opened.append(open(path, "rb", buffering=0))  # noqa: SIM115 - closed below
            except FileNotFoundError:
                raise _Retry(f"{path.name} was removed (a compaction)") from None
        copied = []
        for index, (path, f) in enumerate(zip(paths, opened, strict=True)):
            is_snapshot = bool(snapshot) and index == 0
            copied.append(
                _copy_file(path, f, dest / path.name, is_snapshot, is_last=index == len(paths) - 1)
            )
        return copied
    finally:
        for f in opened:
            f.close()


def _copy_file(
    path: Path, f: BinaryIO, target: Path, is_snapshot: bool, *, is_last: bool
) -> CopiedFile:
    """Copy the whole frames of one opened file (as of its size now) to `target`, fsynced."""
    limit = os.fstat(f.fileno()).st_size
    seq = int(path.name.split("-")[1].split(".")[0])
    header = f.read(HEADER_SIZE)
    parsed = read_header(header, SNAPSHOT_MAGIC if is_snapshot else SEGMENT_MAGIC, seq)
    if parsed.problem is not None:
        raise BackupError(f"{path}: offset 0: {parsed.problem}")
    version = parsed.version
    with open(target, "xb") as out:
        out.write(header)
        done = HEADER_SIZE
        buffer = b""
        left_out = 0
        while True:
            want = limit - done - len(buffer)
            chunk = f.read(min(_BLOCK, want)) if want > 0 else b""
            buffer = buffer + chunk if buffer else chunk
            if is_snapshot:  # immutable and checked as a whole by the read-back
                out.write(buffer)
                done += len(buffer)
                buffer = b""
                if not chunk:
                    break
                continue
            end, error = scan_frames(buffer, 0, version)
            out.write(buffer[:end])
            done += end
            buffer = buffer[end:]
            if error is None or (error.incomplete and chunk):
                if not chunk:
                    break
                continue
            # The whole frames end here: what follows must be a write in progress.
            if is_last:
                want = limit - done - len(buffer)
                buffer += f.read(want) if want > 0 else b""
            left_out = _left_out(path, buffer, done, version, error.reason, is_last=is_last)
            break
        out.flush()
        os.fsync(out.fileno())
    return CopiedFile(path.name, done, version, left_out)


def _left_out(
    path: Path, tail: bytes, offset: int, version: int, reason: str, *, is_last: bool
) -> int:
    """How many bytes after the whole frames (`tail`, from file offset `offset` to the size
    read) are a write in progress, left out of the copy; else raise."""
    if is_last:
        if torn_tail(tail, 0, version, base=offset) is not None:
            return len(tail)
        # A server cutting a failed write off while we read can show this: read again.
        raise _Retry(f"{path}: offset {offset}: {reason}")
    raise BackupError(
        f"{path}: offset {offset}: {reason} (damage in the data directory: see "
        "`kairoi-trio repair`, docs/operations.md)"
    )


def add_backup_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `backup DEST [-c FILE]`."""
    from kairoi_trio.config import add_config_option

    description = (
        "Copy the data directory of the configuration ([storage] directory) into DEST, "
        "consistently, while the server runs or not: the newest snapshot and the segments "
        "after it, each up to its last whole record. The copy is read back and its figures "
        "printed; start a server on it to restore. The data directory is only read."
    )
    sub = commands.add_parser(
        "backup",
        help="copy a (running) server's data directory consistently",
        description=description,
        epilog="Exit status: 0 backed up and verified, 1 the backup failed (reason printed, "
        "DEST left empty), 2 bad configuration or arguments. See docs/operations.md.",
    )
    sub.add_argument("dest", type=Path, metavar="DEST", help="new directory (absent or empty)")
    add_config_option(
        sub,
        "configuration of the server whose data is copied (default: ./configuration.toml "
        "if it exists)",
    )


def run_backup_command(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run `backup` from parsed arguments; returns the exit status (0, 1 or 2)."""
    from kairoi_trio.config import ConfigError, load_config

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as error:
        print(f"{PROG}: {error}", file=err)
        return 2
    try:
        report = backup(config.data_directory, args.dest)
    except BackupRefused as error:
        print(f"{PROG}: {error}", file=err)
        return 2
    except BackupError as error:
        print(f"{PROG}: {error}", file=err)
        return 1
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"{PROG}: {where}{error.strerror or error}", file=err)
        return 1
    print(report.render(), file=out)
    return 0


__all__ = [
    "BackupError",
    "BackupRefused",
    "BackupReport",
    "add_backup_command",
    "backup",
    "run_backup_command",
]
