"""Snapshots: the compacted form of the log, written so that a crash at any step loses nothing.

A snapshot `snapshot-N.snap` holds the state (every job and rule) as of the END
of segment N, followed by a SnapshotEnd record with the counts, which proves it
is complete. Plain jobs (no payload, outcome or recurrence) are stored in job
chunks of up to CHUNK_JOBS (records.encode_jobs), the others one JobPut each, rules
one RulePut each. Jobs are written grouped by status, each group in id order:
start-up then finds every per-status id index already sorted. Writing one takes four steps, each of
which leaves a directory that start-up reads correctly:

1. write `snapshot-N.snap.tmp` and fsync it      crash: *.tmp is ignored and deleted; state =
                                                  old snapshot + segments, all still there
2. rename it to `snapshot-N.snap`                 crash: atomic; either name is what start-up sees
3. fsync the directory                            makes the rename durable before any deletion
4. delete segments <= N and older snapshots       crash: leftovers are covered by snapshot N and
                                                  deleted at the next start-up

The functions here are blocking; DurableLog runs them in a worker thread. They
are separate so the crash-safety tests can stop between any two of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, is_
from pathlib import Path

import structlog

from kairoi_trio.model import Job, Rule, Status
from kairoi_trio.storage.faults import os  # os itself (a fault proxy in tests only)
from kairoi_trio.storage.records import (
    SNAPSHOT_MAGIC,
    encode_header,
    encode_jobs,
    encode_rule,
    encode_snapshot_end,
)

log = structlog.get_logger(__name__)

# -- directory layout -----------------------------------------------------------

LOCK_NAME = "LOCK"
TMP_SUFFIX = ".tmp"
# Exactly the names this code writes (10 digits): "segment-3.log" is not segment 3.
_NAME = re.compile(r"^(segment|snapshot)-(\d{10})\.(log|snap)$")


def segment_path(directory: Path, seq: int) -> Path:
    return directory / f"segment-{seq:010d}.log"


def snapshot_path(directory: Path, seq: int) -> Path:
    return directory / f"snapshot-{seq:010d}.snap"


@dataclass(slots=True)
class DirectoryListing:
    segments: dict[int, Path]
    snapshots: dict[int, Path]
    temporary: list[Path]


def list_directory(directory: Path) -> DirectoryListing:
    """Classify the files of a data directory; unknown names are left alone."""
    listing = DirectoryListing({}, {}, [])
    for entry in os.scandir(directory):
        name = entry.name
        if name.endswith(TMP_SUFFIX):
            listing.temporary.append(Path(entry.path))
            continue
        match = _NAME.match(name)
        if match is None:
            continue
        kind, seq, ext = match.group(1), int(match.group(2)), match.group(3)
        if kind == "segment" and ext == "log":
            listing.segments[seq] = Path(entry.path)
        elif kind == "snapshot" and ext == "snap":
            listing.snapshots[seq] = Path(entry.path)
    return listing


def fsync_directory(directory: Path) -> None:
    """Make renames, creations and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        close_quietly(fd, str(directory))


def close_quietly(fd: int, what: str) -> None:
    """Close a descriptor; an error is logged, never raised. close(2) releases the
    descriptor even when it fails (Linux), and what the store needs durable was
    synced before (an append's fdatasync, a file's or directory's fsync): a late
    EIO from a file system must not fail a rotation or crash a clean stop."""
    try:
        os.close(fd)
    except OSError as exc:
        log.warning("closing a file failed", file=what, error=f"{exc.strerror or exc}")


# -- the order of the jobs in a snapshot -------------------------------------------


class OrderedJobs:
    """Jobs in the order a snapshot stores them: the command actor's copy
    (core/checkpoint.py), which walks its sorted id indexes in that order."""

    __slots__ = ("jobs",)

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)


_status_of = attrgetter("status")


def snapshot_order(jobs: Mapping[str, Job] | OrderedJobs) -> Iterable[Job]:
    """The jobs as a snapshot stores them: grouped by status (in Status order), each
    group in id order. Start-up puts the ids of each status in a sorted index: a
    sorted run costs it one comparison an id, random order ~23 at 10 million.

    OrderedJobs are in that order already (the actor's); a mapping is sorted
    here (the offline tools: repair, copy, import)."""
    if isinstance(jobs, OrderedJobs):
        return jobs.jobs
    ids = list(jobs)
    statuses = list(map(_status_of, jobs.values()))
    order: list[str] = []
    for status in Status:
        order += sorted(compress(ids, map(is_, statuses, repeat(status))))
    return map(jobs.__getitem__, order)


# -- the compaction steps -------------------------------------------------------

_WRITE_BUFFER = 1 << 20


def write_snapshot_tmp(
    directory: Path,
    seq: int,
    jobs: Mapping[str, Job] | OrderedJobs,
    rules: Mapping[str, Rule],
    *,
    fsync: bool = True,
) -> Path:
    """Step 1: write the whole snapshot under a temporary name (and fsync it)."""
    tmp = snapshot_path(directory, seq).with_name(snapshot_path(directory, seq).name + TMP_SUFFIX)
    try:
        with open(tmp, "wb", buffering=_WRITE_BUFFER) as f:
            write = f.write
            write(encode_header(SNAPSHOT_MAGIC, seq))
            for framed in encode_jobs(snapshot_order(jobs)):
                write(framed)
            for rule in rules.values():
                write(encode_rule(rule))
            write(encode_snapshot_end(len(jobs), len(rules)))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish_snapshot(tmp: Path, *, fsync: bool = True) -> Path:
    """Steps 2 and 3: atomically rename the finished snapshot into place, durably."""
    final = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX))
    os.replace(tmp, final)
    if fsync:
        fsync_directory(final.parent)
    return final


def remove_covered(directory: Path, seq: int, *, fsync: bool = True) -> list[Path]:
    """Step 4: delete the segments snapshot `seq` covers and the older snapshots.

    Only ever called once snapshot `seq` is durable. Failures are logged, not
    raised: anything left behind is deleted again at the next start-up.
    """
    listing = list_directory(directory)
    doomed = [path for s, path in sorted(listing.segments.items()) if s <= seq]
    doomed += [path for s, path in sorted(listing.snapshots.items()) if s < seq]
    removed = []
    for path in doomed:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete a compacted file", path=str(path), error=str(exc))
    if removed and fsync:
        try:
            fsync_directory(directory)
        except OSError as exc:
            log.warning("could not fsync the data directory", error=str(exc))
    return removed


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: Path
    bytes: int
    jobs: int
    rules: int
    removed: tuple[Path, ...]


def write_snapshot(
    directory: Path,
    seq: int,
    jobs: Mapping[str, Job] | OrderedJobs,
    rules: Mapping[str, Rule],
    *,
    fsync: bool = True,
) -> SnapshotInfo:
    """All four steps: snapshot the state as of the end of segment `seq`, then drop what it covers.

    Raises OSError if the snapshot could not be written (nothing changed then:
    the temporary file is removed and the old files are all still there).
    """
    tmp = write_snapshot_tmp(directory, seq, jobs, rules, fsync=fsync)
    try:
        final = publish_snapshot(tmp, fsync=fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = final.stat().st_size
    removed = remove_covered(directory, seq, fsync=fsync)
    return SnapshotInfo(final, size, len(jobs), len(rules), tuple(removed))
