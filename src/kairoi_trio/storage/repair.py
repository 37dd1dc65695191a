"""`kairoi-trio repair SRC DEST`: salvage every readable record of a damaged data directory.

The server refuses to start on a damaged log (records.torn_tail says what may
be cut; anything else is a CorruptLogError naming file and offset). This tool
is the way out: it reads every snapshot and segment of SRC, never writing to
it, keeps every frame that checks out, in order, and writes a fresh data
directory DEST holding one snapshot of the resulting state, which a server
starts on. It prints what it read, what it dropped (byte ranges per file, with
the reason) and what the result holds.

Which files make the state, as start-up would read them: the newest snapshot
N, then segments N+1, N+2, ... in order. If snapshot N is damaged and the
files it replaced are still there (an older snapshot M, or none, and every
segment M+1..N: a compaction interrupted before its deletions), the state is
rebuilt from those instead and nothing is lost. Segments <= N and older
snapshots are otherwise ignored (the snapshot covers them).

Inside a file, after a bad frame the reading resynchronises on the next offset
where a whole frame checks out (records.find_frame): for format version 2 the
header's own checksum and the payload's must both match, so a random position
passes with a chance of 2**-64. A version-2 frame whose header checks out but
whose payload does not is skipped by its length. An unfinished write at the
end of the last segment (what start-up would cut) is reported but does not
count as a loss: it was never acknowledged.

Exit status: 0 nothing was dropped; 1 something was dropped (DEST is still
written, with everything that could be read); 2 bad arguments (SRC is not a
data directory, DEST exists and is not empty, a running server holds SRC);
3 DEST could not be written.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import mmap
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kairoi_trio.model import Job, Rule
from kairoi_trio.storage import compaction
from kairoi_trio.storage.compaction import LOCK_NAME, list_directory
from kairoi_trio.storage.log import CorruptLogError, read_state
from kairoi_trio.storage.records import (
    HEADER_SIZE,
    READABLE_VERSIONS,
    SEGMENT_MAGIC,
    SNAPSHOT_MAGIC,
    Buffer,
    FrameError,
    decode_frame,
    find_frame,
    frame_header,
    frame_header_size,
    read_header,
    replay_into,
    torn_tail,
)

PROG = "kairoi-trio repair"


class RepairRefused(Exception):
    """The arguments cannot be used (exit status 2); nothing was read or written."""


# -- the report ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DroppedRange:
    """Bytes start..end (end excluded) of a file that were not salvaged, and why."""

    start: int
    end: int
    reason: str

    def __str__(self) -> str:
        return f"{self.start}..{self.end} ({self.end - self.start} bytes): {self.reason}"


@dataclass
class FileReport:
    """What one file gave: format version, records salvaged, ranges dropped."""

    path: Path
    kind: str  # "snapshot" or "segment"
    seq: int
    size: int
    version: int = 0  # 0: unknown (header and frames unreadable)
    records: int = 0
    orphan_status: int = 0
    dropped: list[DroppedRange] = field(default_factory=list)
    torn: DroppedRange | None = None  # an unfinished final write, as start-up would cut it
    notes: list[str] = field(default_factory=list)

    @property
    def dropped_bytes(self) -> int:
        return sum(r.end - r.start for r in self.dropped)


@dataclass
class RepairReport:
    """Everything `repair` did; `lost` is True when anything may be missing from DEST."""

    source: Path
    dest: Path
    files: list[FileReport] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # file names not used, with the reason
    problems: list[str] = field(default_factory=list)  # losses not tied to a byte range
    notes: list[str] = field(default_factory=list)
    jobs: int = 0
    rules: int = 0
    snapshot: Path | None = None

    @property
    def lost(self) -> bool:
        return bool(self.problems) or any(f.dropped for f in self.files)

    def render(self) -> str:
        lines = [f"read {self.source} ({len(self.files)} files)"]
        for f in self.files:
            version = f"format {f.version}" if f.version else "format unknown"
            lines.append(
                f"  {f.path.name}: {version}, {f.size} bytes, {f.records} records salvaged"
                + (
                    f", {f.orphan_status} status records for unknown jobs"
                    if f.orphan_status
                    else ""
                )
            )
            lines += [f"    note: {note}" for note in f.notes]
            lines += [f"    DROPPED {r}" for r in f.dropped]
            if f.torn is not None:
                lines.append(f"    cut (an unfinished write, never acknowledged) {f.torn}")
        lines += [f"  ignored {name}" for name in self.ignored]
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"LOST: {problem}" for problem in self.problems]
        dropped = [r for f in self.files for r in f.dropped]
        where = self.snapshot if self.snapshot is not None else self.dest
        lines.append(f"result: {self.jobs} jobs, {self.rules} rules in {where}")
        if self.lost:
            lines.append(
                f"something was dropped: {sum(r.end - r.start for r in dropped)} bytes in "
                f"{len(dropped)} ranges, {len(self.problems)} other losses (listed above)"
            )
        else:
            lines.append("nothing was dropped")
        return "\n".join(lines)


# -- reading ------------------------------------------------------------------------


@contextmanager
def _mapped(path: Path) -> Iterator[Buffer]:
    """The file's bytes, read-only (an mmap; b"" for an empty file). Never writes to it."""
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield view


def _guess_version(data: Buffer) -> int:
    """The format version whose frames read furthest after a damaged file header (0: none)."""
    best, best_end = 0, HEADER_SIZE
    for version in sorted(READABLE_VERSIONS, reverse=True):
        start = find_frame(data, HEADER_SIZE, version, stop=HEADER_SIZE + 1)
        if start is None:
            continue
        pos = start
        while pos < len(data):
            result = decode_frame(data, pos, version)
            if isinstance(result, FrameError):
                break
            pos = result[1]
        if pos > best_end:
            best, best_end = version, pos
    if best:
        return best
    for version in sorted(READABLE_VERSIONS, reverse=True):  # the first frame is damaged too
        if find_frame(data, HEADER_SIZE, version) is not None:
            return version
    return 0


def _resume_at(data: Buffer, offset: int, version: int) -> int | None:
    """Where reading goes on after the bad frame at `offset`: the next valid frame, or None."""
    header = frame_header(data, offset, version)
    if version >= 2 and not isinstance(header, FrameError):
        # The header checks out: the damage is in the payload, the next frame follows it.
        after = offset + frame_header_size(version) + header[0]
        if after == len(data):
            return None
        if after < len(data) and not isinstance(decode_frame(data, after, version), FrameError):
            return after
    return find_frame(data, offset + 1, version)


def _unreadable(path: Path, kind: str, seq: int, error: OSError) -> FileReport:
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    report = FileReport(path, kind, seq, size)
    report.dropped.append(DroppedRange(0, size, f"cannot be read: {error.strerror or error}"))
    return report


def salvage_file(
    path: Path,
    kind: str,
    seq: int,
    jobs: dict[str, Job],
    rules: dict[str, Rule],
    *,
    is_last: bool = False,
) -> FileReport:
    """Apply every valid record of one snapshot or segment to `jobs` and `rules`, in order.

    BLOCKING. `is_last`: the newest segment, whose unfinished final write is
    reported in `torn` rather than as dropped. Never raises for damage; raises
    OSError if the file cannot be read at all.
    """
    magic = SNAPSHOT_MAGIC if kind == "snapshot" else SEGMENT_MAGIC
    with _mapped(path) as data:
        size = len(data)
        report = FileReport(path, kind, seq, size)
        header = read_header(bytes(data[:HEADER_SIZE]), magic, seq)
        version = header.version
        if header.problem is not None:
            if version not in READABLE_VERSIONS or bytes(data[:8]) != magic:
                version = _guess_version(data)
                report.notes.append(
                    f"file header damaged ({header.problem}); "
                    + (f"frames read as format {version}" if version else "no frame found")
                )
            else:
                report.notes.append(f"file header: {header.problem}")
            report.dropped.append(
                DroppedRange(0, min(size, HEADER_SIZE), f"file header: {header.problem}")
            )
            if not version:
                if size > HEADER_SIZE:
                    report.dropped.append(DroppedRange(HEADER_SIZE, size, "no valid frame"))
                return report
        report.version = version
        end_record = None
        pos = HEADER_SIZE
        while pos < size:
            result = replay_into(data, pos, jobs, rules, version)
            report.records += result.records
            report.orphan_status += result.orphan_status
            if result.snapshot_end is not None:
                if kind == "snapshot" and end_record is None:
                    end_record = result.snapshot_end
                    if result.end < size:
                        report.notes.append(f"data after the end record at offset {result.end}")
                else:
                    report.notes.append(f"a snapshot end record at offset {result.end} (skipped)")
                pos = result.end
                continue
            error = result.error
            if error is None:
                break
            offset = result.end
            if is_last and kind == "segment":
                torn = torn_tail(data, offset, version)
                if torn is not None:
                    report.torn = DroppedRange(offset, size, torn)
                    break
            resume = _resume_at(data, offset, version)
            report.dropped.append(
                DroppedRange(offset, size if resume is None else resume, error.reason)
            )
            if resume is None:
                break
            pos = resume
        if kind == "snapshot":
            if end_record is None:
                report.notes.append("no end record: the snapshot is incomplete")
                report.dropped.append(
                    DroppedRange(size, size, "the snapshot ends without its end record")
                )
            elif (end_record.jobs, end_record.rules) != (len(jobs), len(rules)):
                report.dropped.append(
                    DroppedRange(
                        size,
                        size,
                        f"the snapshot's end record promises {end_record.jobs} jobs and "
                        f"{end_record.rules} rules; {len(jobs)} and {len(rules)} were salvaged",
                    )
                )
    return report


@dataclass
class Salvaged:
    jobs: dict[str, Job]
    rules: dict[str, Rule]
    report: RepairReport
    last_seq: int


def salvage_directory(source: Path, dest: Path) -> Salvaged:
    """Read SRC as start-up would, keeping every valid record (BLOCKING; writes nothing).

    Raises RepairRefused if SRC holds no snapshot or segment, OSError if it
    cannot be listed. A file that cannot be read is reported as dropped.
    """
    if not source.is_dir():
        raise RepairRefused(f"{source} is not a directory")
    listing = list_directory(source)
    if not listing.snapshots and not listing.segments:
        raise RepairRefused(f"{source} holds no snapshot-*.snap or segment-*.log file")
    report = RepairReport(source, dest)
    jobs: dict[str, Job] = {}
    rules: dict[str, Rule] = {}
    newest = max(listing.snapshots, default=0)
    used: set[Path] = set()
    if newest:
        chain = _older_chain(listing.segments, listing.snapshots, newest)
        snap = _salvage(listing.snapshots[newest], "snapshot", newest, jobs, rules)
        rebuilt = None
        if (snap.dropped or snap.notes) and chain is not None:
            trial_jobs: dict[str, Job] = {}
            trial_rules: dict[str, Rule] = {}
            trial = [
                _salvage(path, kind, seq, trial_jobs, trial_rules) for kind, seq, path in chain
            ]
            if not any(f.dropped for f in trial):
                rebuilt = trial
                jobs, rules = trial_jobs, trial_rules
        if rebuilt is None:
            report.files.append(snap)
        else:
            report.notes.append(
                f"snapshot {newest} is damaged; the state it held was rebuilt from "
                + ", ".join(f.path.name for f in rebuilt)
                + ", which it replaced and which are intact"
            )
            report.ignored.append(f"{snap.path.name} (damaged; rebuilt from older files)")
            report.files = rebuilt
            used.update(f.path for f in rebuilt)
        used.add(listing.snapshots[newest])
    segments = sorted(s for s in listing.segments if s > newest)
    expected = newest + 1
    for seq in segments:
        if seq != expected:
            report.problems.append(
                f"segments {expected}..{seq - 1} are missing: their records are lost"
                if seq - 1 > expected
                else f"segment {expected} is missing: its records are lost"
            )
        expected = seq + 1
        path = listing.segments[seq]
        report.files.append(
            _salvage(path, "segment", seq, jobs, rules, is_last=seq == segments[-1])
        )
        used.add(path)
    for path in sorted(listing.snapshots.values()):
        if path not in used:
            report.ignored.append(f"{path.name} (older than snapshot {newest})")
    for path in sorted(listing.segments.values()):
        if path not in used:
            report.ignored.append(f"{path.name} (covered by snapshot {newest})")
    report.ignored += [f"{p.name} (an unfinished temporary file)" for p in listing.temporary]
    report.jobs, report.rules = len(jobs), len(rules)
    last_seq = max([newest, *segments])
    return Salvaged(jobs, rules, report, last_seq)


def _salvage(
    path: Path,
    kind: str,
    seq: int,
    jobs: dict[str, Job],
    rules: dict[str, Rule],
    *,
    is_last: bool = False,
) -> FileReport:
    try:
        return salvage_file(path, kind, seq, jobs, rules, is_last=is_last)
    except OSError as error:
        return _unreadable(path, kind, seq, error)


def _older_chain(
    segments: dict[int, Path], snapshots: dict[int, Path], newest: int
) -> list[tuple[str, int, Path]] | None:
    """Files that hold the same state as snapshot `newest`: an older snapshot (or none) and
    every segment after it up to `newest`; None if no such complete set is left."""
    for base in [*sorted((s for s in snapshots if s < newest), reverse=True), 0]:
        if all(seq in segments for seq in range(base + 1, newest + 1)):
            files = [("snapshot", base, snapshots[base])] if base else []
            return files + [("segment", s, segments[s]) for s in range(base + 1, newest + 1)]
    return None


# -- the command --------------------------------------------------------------------


def _lock_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def _hold_source(source: Path, force: bool, err: TextIO) -> Iterator[None]:
    """Keep a server from starting on SRC while it is read: a shared flock on its LOCK file.

    Refuses (RepairRefused) if a server holds it, unless `force`. Opens LOCK
    read-only and never creates it: SRC is not written to.
    """
    lock = source / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            if not force:
                raise RepairRefused(
                    f"{source} is in use by a running kairoi-trio server (pid {_lock_pid(lock)}, "
                    f"{lock} is locked): stop it first, or use --force to read it anyway"
                ) from None
            print(
                f"{PROG}: warning: {source} is in use by a running server; reading it anyway "
                "(--force). Files may change while they are read: the result is a best effort, "
                "and records written meanwhile may be missing or cut.",
                file=err,
            )
        yield
    finally:
        os.close(fd)


def _check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RepairRefused(f"{dest} exists and is not an empty directory")


def repair(
    source: Path, dest: Path, *, force: bool = False, err: TextIO | None = None
) -> RepairReport:
    """Salvage SRC into a new data directory DEST (BLOCKING). See the module docstring.

    Raises RepairRefused (bad arguments, nothing written), OSError (DEST
    cannot be written), CorruptLogError (the written DEST does not read back:
    a bug, reported as such).
    """
    err = err or sys.stderr
    source, dest = Path(source), Path(dest)
    _check_dest(dest)
    inside = source.resolve()
    if dest.resolve() == inside or inside in dest.resolve().parents:
        raise RepairRefused(f"DEST {dest} is inside SRC {source}: repair never writes to SRC")
    try:
        with _hold_source(source, force, err):
            salvaged = salvage_directory(source, dest)
    except OSError as error:
        raise RepairRefused(f"cannot read {source}: {error.strerror or error}") from None
    report = salvaged.report
    dest.mkdir(parents=True, exist_ok=True)
    seq = max(salvaged.last_seq, 1)
    tmp = compaction.write_snapshot_tmp(dest, seq, salvaged.jobs, salvaged.rules)
    report.snapshot = compaction.publish_snapshot(tmp)
    check = read_state(dest)  # the same replay as start-up, without changing anything
    if check.jobs != salvaged.jobs or check.rules != salvaged.rules or check.warnings:
        raise CorruptLogError(f"{report.snapshot}: the repaired directory does not read back")
    return report


def add_repair_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `repair SRC DEST [--force]`."""
    description = (
        "Copy every readable record of a damaged data directory SRC into a new data "
        "directory DEST (one snapshot), dropping only what cannot be read, and print what "
        "was dropped (file, byte range, reason). SRC is never written to. Stop the server "
        "first; then start it on DEST (or move DEST into place)."
    )
    sub = commands.add_parser(
        "repair",
        help="salvage a damaged data directory into a new one",
        description=description,
        epilog="Exit status: 0 nothing was dropped, 1 something was dropped (DEST is written "
        "anyway), 2 bad arguments, 3 DEST could not be written. See docs/operations.md.",
    )
    sub.add_argument("source", type=Path, metavar="SRC", help="the damaged data directory")
    sub.add_argument(
        "dest",
        type=Path,
        metavar="DEST",
        help="the new data directory (must not exist or be empty)",
    )
    sub.add_argument(
        "--force",
        action="store_true",
        help="read SRC even though a running server holds it (racy: files may change while "
        "they are read)",
    )


def run_repair_command(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run `repair` from parsed arguments; returns the exit status (0, 1, 2 or 3)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        report = repair(args.source, args.dest, force=args.force, err=err)
    except RepairRefused as error:
        print(f"{PROG}: {error}", file=err)
        return 2
    except (OSError, CorruptLogError) as error:
        where = f"{error.filename}: " if isinstance(error, OSError) and error.filename else ""
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            reason = "no space left on device"
        print(f"{PROG}: cannot write {args.dest}: {where}{reason}", file=err)
        return 3
    print(report.render(), file=out)
    return 1 if report.lost else 0


__all__ = [
    "DroppedRange",
    "FileReport",
    "RepairRefused",
    "RepairReport",
    "add_repair_command",
    "repair",
    "run_repair_command",
    "salvage_directory",
    "salvage_file",
]
