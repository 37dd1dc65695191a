"""The durable log: append-only segment files plus snapshots, in one locked directory.

Directory layout (see docs/storage.md for the byte format and the crash-safety argument):

    LOCK                          flock'ed while a server uses the directory
    snapshot-0000000007.snap      state as of the end of segment 7 (optional)
    segment-0000000008.log        records appended after it, in order
    segment-0000000009.log        the active segment (the only one written to)

Start-up (`load`) replays the newest snapshot and the later segments. An
unfinished write at the end of the last segment (a crash mid-append, see
records.torn_tail) is cut off with a warning; any other damage raises
CorruptLogError naming the file and offset, and nothing is changed.

Files of format version 1 (the first release) are read as they are; new
segments and snapshots are written in the current version, and a version-1
segment that was still the active one is sealed at start-up (appends go to a
new segment), so that no file mixes versions. `read_state` replays a directory
without locking or changing it (backup verification).

Appends are group commits: the caller hands over a batch of records, they are
encoded, written with one pwrite and made durable with one fdatasync, all in one
worker thread call. A failed append leaves the file exactly as it was before.

Compaction is split so the command actor can keep appending while a snapshot
is written:

    seq = await log.rotate()                        # seal the active segment (no append in flight)
    await log.write_snapshot(seq, jobs, rules)      # in a background task; appends may continue

`compact(jobs, rules)` does both in a row.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import mmap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from kairoi_trio.model import Job, Rule
from kairoi_trio.storage import compaction
from kairoi_trio.storage.compaction import (
    LOCK_NAME,
    TMP_SUFFIX,
    OrderedJobs,
    close_quietly,
    fsync_directory,
    list_directory,
    segment_path,
)
from kairoi_trio.storage.faults import os  # os itself (a fault proxy in tests only)
from kairoi_trio.storage.records import (
    FORMAT_VERSION,
    HEADER_SIZE,
    SEGMENT_MAGIC,
    SNAPSHOT_MAGIC,
    Record,
    encode_header,
    encode_records,
    read_header,
    replay_into,
    torn_tail,
    zero_tail_start,
)

log = structlog.get_logger(__name__)

_READ_BLOCK = 16 * 1024 * 1024


def _fdatasync(fd: int) -> None:
    """fdatasync where available: enough for appends (it syncs the file size too)."""
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


class StorageError(Exception):
    """A write to the log failed (disk full, read-only, I/O error). The log stays usable."""


class DirectoryLockedError(StorageError):
    """Another process (or another DurableLog) already uses this data directory."""


class CorruptLogError(Exception):
    """The log cannot be read safely: start-up must stop. The message names file, offset, cause."""


REPAIR_HINT = (
    "the files were left as they are; `kairoi-trio repair` copies every readable record "
    "into a new directory (docs/operations.md, Backup and repair)"
)


@dataclass
class LoadedState:
    """What `load` found: the state, and figures worth logging at start-up."""

    jobs: dict[str, Job]
    rules: dict[str, Rule]
    records: int = 0  # records applied (snapshot entries + segment records)
    repaired_tail_bytes: int = 0  # bytes cut off a torn end of the last segment
    warnings: list[str] = field(default_factory=list)
    snapshot_seq: int = 0  # 0 when no snapshot was used
    segments: int = 0  # segment files replayed
    versions: dict[str, int] = field(default_factory=dict)  # file name -> format version read
    bytes_read: int = 0
    orphan_status_records: int = 0  # JobStatus records for jobs that did not exist
    seconds: float = 0.0


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device (disk full)"
    elif exc.errno == errno.EFBIG:
        reason = "file too large (file size limit reached)"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    return f"{reason} [{name}]" if name else reason


class DurableLog:
    """The append-only log of one data directory. See the module docstring."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self._dir = Path(directory)
        self._fsync = fsync
        self._read_only = False  # read_state(): replay only, change nothing
        self._lock_fd: int | None = None
        self._fd: int | None = None  # active segment, opened read-write
        self._active_seq = 0
        self._active_size = 0  # length of the active segment up to its last good frame
        self._needs_repair: OSError | None = None  # set when restoring a failed append failed
        self._sealed: dict[int, int] = {}  # size of each segment after the snapshot but active
        self._snapshot_seq = 0
        self._snapshot_bytes = 0
        self._write_lock = trio.Lock()
        self._compacting = False
        self._compaction_done: trio.Event | None = None
        self._closed = False

    # -- properties -------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def bytes_since_snapshot(self) -> int:
        """Bytes of segment files written after the newest snapshot: compact when this is large.

        A good rule is `bytes_since_snapshot > max(threshold, ratio * snapshot_bytes)`,
        so that compaction work stays proportional to the log's growth (the actor's,
        with `[storage] compact_after_bytes` and `compact_ratio`).
        """
        return sum(self._sealed.values()) + self._active_size

    @property
    def snapshot_bytes(self) -> int:
        """Size of the newest snapshot file (0 if there is none)."""
        return self._snapshot_bytes

    @property
    def active_segment(self) -> int:
        return self._active_seq

    @property
    def compacting(self) -> bool:
        """True while a snapshot is being written (a second one is refused)."""
        return self._compacting

    # -- start-up ---------------------------------------------------------------

    def load(self) -> LoadedState:
        """Lock the directory, replay it, repair a torn tail, and open the active segment.

        BLOCKING: run it with trio.to_thread.run_sync. Raises DirectoryLockedError
        if the directory is in use, CorruptLogError if it cannot be read safely,
        OSError for I/O failures. The garbage collector is paused while replaying
        (a million new long-lived objects would trigger many useless collections);
        freezing them afterwards is the caller's call (see app.load_state).
        """
        if self._lock_fd is not None or self._closed:
            raise RuntimeError("DurableLog.load() can only be called once")
        started = time.perf_counter()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        gc_was_enabled = gc.isenabled()
        # A million new long-lived objects would trigger many useless full collections.
        gc.disable()
        try:
            state = self._replay()
        except CorruptLogError as exc:
            self._unlock()
            raise CorruptLogError(f"{exc}; {REPAIR_HINT}") from None
        except BaseException:
            self._unlock()
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        state.seconds = time.perf_counter() - started
        log.info(
            "log loaded",
            directory=str(self._dir),
            jobs=len(state.jobs),
            rules=len(state.rules),
            records=state.records,
            snapshot=state.snapshot_seq,
            segments=state.segments,
            mib_read=round(state.bytes_read / 2**20, 1),
            seconds=round(state.seconds, 3),
        )
        return state

    def _lock(self) -> None:
        path = self._dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            close_quietly(fd, "the lock file")
            raise DirectoryLockedError(
                f"data directory {self._dir} is already in use by another kairoi-trio server "
                f"(lock file {path} is held)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            close_quietly(self._fd, "the active segment")
            self._fd = None
        if self._lock_fd is not None:
            close_quietly(self._lock_fd, "the lock file")  # closing it releases the flock
            self._lock_fd = None

    def _replay(self) -> LoadedState:
        state = LoadedState(jobs={}, rules={})
        listing = list_directory(self._dir)
        if not self._read_only:
            for tmp in listing.temporary:
                log.info("removing an unfinished temporary file", path=str(tmp))
                tmp.unlink(missing_ok=True)

        previous: int | None = None  # format version of the newest file read so far
        if listing.snapshots:
            seq = max(listing.snapshots)
            previous = self._replay_snapshot(listing.snapshots[seq], seq, state)
            state.snapshot_seq = self._snapshot_seq = seq
            self._snapshot_bytes = listing.snapshots[seq].stat().st_size
            if not self._read_only:
                # Leftovers of a compaction interrupted after its snapshot became durable.
                compaction.remove_covered(self._dir, seq, fsync=self._fsync)

        segments = sorted(s for s in listing.segments if s > self._snapshot_seq)
        expected = self._snapshot_seq + 1
        for seq in segments:
            if seq != expected:
                raise CorruptLogError(
                    f"{segment_path(self._dir, expected)}: segment {expected} is missing "
                    f"(found segment {seq} after "
                    + (f"snapshot {self._snapshot_seq})" if self._snapshot_seq else "no snapshot)")
                )
            expected += 1

        for seq in list(segments):
            is_last = seq == segments[-1]
            path = segment_path(self._dir, seq)
            replayed = self._replay_segment(path, seq, state, is_last=is_last, previous=previous)
            if replayed is None:  # an unfinished segment of the previous release, removed
                segments.pop()
                break
            self._sealed[seq], previous = replayed
            state.segments += 1

        if state.orphan_status_records:
            state.warnings.append(
                f"{state.orphan_status_records} status records for unknown jobs were skipped"
            )
        for warning in state.warnings:
            log.warning(warning)
        if self._read_only:
            return state

        if segments and previous == FORMAT_VERSION:
            self._active_seq = segments[-1]
            self._active_size = self._sealed.pop(self._active_seq)
            self._fd = os.open(segment_path(self._dir, self._active_seq), os.O_RDWR)
        else:
            # No segment yet, or the newest is of an older format version: append to
            # a new segment of the current one, so that no file mixes versions.
            self._active_seq = (segments[-1] if segments else self._snapshot_seq) + 1
            self._fd, self._active_size = self._create_segment(self._active_seq)
            if segments:
                log.info(
                    "continuing in a new segment of the current format",
                    segment=self._active_seq,
                    format_version=FORMAT_VERSION,
                    sealed=segments[-1],
                    sealed_format_version=previous,
                )
        return state

    def _replay_snapshot(self, path: Path, seq: int, state: LoadedState) -> int:
        """Apply snapshot `seq` to `state`; return its format version."""
        with open(path, "rb", buffering=0) as f:
            header = read_header(f.read(HEADER_SIZE), SNAPSHOT_MAGIC, seq)
            if header.problem is not None:
                raise CorruptLogError(f"{path}: offset 0: {header.problem}")
            version = header.version
            state.versions[path.name] = version
            size = os.fstat(f.fileno()).st_size
            buffer = b""
            base = HEADER_SIZE
            while True:
                chunk = f.read(_READ_BLOCK)
                buffer = buffer + chunk if buffer else chunk
                result = replay_into(buffer, 0, state.jobs, state.rules, version)
                state.records += result.records
                state.orphan_status_records += result.orphan_status
                state.bytes_read += result.end
                end = result.snapshot_end
                if end is not None:
                    offset = base + result.end
                    if offset != size:
                        raise CorruptLogError(
                            f"{path}: offset {offset}: data after the end of the snapshot"
                        )
                    if (end.jobs, end.rules) != (len(state.jobs), len(state.rules)):
                        raise CorruptLogError(
                            f"{path}: offset {offset}: snapshot promises {end.jobs} jobs and "
                            f"{end.rules} rules, holds {len(state.jobs)} and {len(state.rules)}"
                        )
                    return version
                error = result.error
                if error is not None and not (error.incomplete and chunk):
                    # A snapshot is complete before it is renamed: nothing in it is torn.
                    raise CorruptLogError(f"{path}: offset {base + error.offset}: {error.reason}")
                if not chunk:
                    raise CorruptLogError(
                        f"{path}: offset {size}: snapshot ends without its end record"
                    )
                base += result.end
                buffer = buffer[result.end :]

    def _replay_segment(
        self, path: Path, seq: int, state: LoadedState, *, is_last: bool, previous: int | None
    ) -> tuple[int, int] | None:
        """Apply one segment to `state`: its (possibly repaired) size and format version.

        None if it was an unfinished segment of the previous release, now removed.
        `previous` is the format version of the file before it (None: no file).
        """
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_SIZE)
            header = read_header(raw, SEGMENT_MAGIC, seq)
            if header.problem is not None:
                if is_last and previous == 1 and self._unfinished_v1_segment(raw, size):
                    self._remove_unfinished(path, size, state)
                    return None
                hint = ""
                if size <= HEADER_SIZE or zero_tail_start(raw) == 0:
                    hint = (
                        " (this release creates a segment whole under a temporary name, so "
                        "this one was cut or overwritten later: records may be missing)"
                    )
                raise CorruptLogError(f"{path}: offset 0: {header.problem}{hint}")
            version = header.version
            state.versions[path.name] = version
            buffer = b""
            base = HEADER_SIZE  # file offset of buffer[0]
            while True:
                chunk = f.read(_READ_BLOCK)
                buffer = buffer + chunk if buffer else chunk
                result = replay_into(buffer, 0, state.jobs, state.rules, version)
                state.records += result.records
                state.orphan_status_records += result.orphan_status
                state.bytes_read += result.end
                if result.snapshot_end is not None:
                    raise CorruptLogError(
                        f"{path}: offset {base + result.end}: snapshot end record inside a segment"
                    )
                error = result.error
                if error is None:
                    if not chunk:
                        return size, version
                    base += len(buffer)
                    buffer = b""
                    continue
                if error.incomplete and chunk:
                    base += result.end  # a frame spans the block boundary: read on
                    buffer = buffer[result.end :]
                    continue
                offset = base + error.offset
                if is_last:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                        torn = torn_tail(view, offset, version)
                    if torn is not None:
                        self._repair_tail(path, offset, size, state, reason=torn)
                        return offset, version
                raise CorruptLogError(f"{path}: offset {offset}: {error.reason}")

    @staticmethod
    def _unfinished_v1_segment(raw: bytes, size: int) -> bool:
        """Did the previous release die while creating this segment (so it holds no record)?

        That release created a segment in place with one 24-byte write: a crash
        before its fsync leaves an empty file or one of zeros (a write of one
        sector is never half done). This release creates segments under a
        temporary name, so only a version-1 directory can hold one; anything
        else (a file of 10 bytes...) was cut after it was written.
        """
        return size <= HEADER_SIZE and raw.count(0) == len(raw) == size

    def _remove_unfinished(self, path: Path, size: int, state: LoadedState) -> None:
        state.warnings.append(
            f"{path}: {'ignored' if self._read_only else 'removed'} a segment the previous "
            f"release left unfinished while creating it ({size} bytes, no records)"
        )
        if self._read_only:
            return
        path.unlink()
        if self._fsync:
            fsync_directory(self._dir)

    def _repair_tail(
        self, path: Path, offset: int, size: int, state: LoadedState, *, reason: str
    ) -> None:
        """Cut the unfinished write at `offset` off the last segment (read_state: report it)."""
        if self._read_only:
            state.warnings.append(
                f"{path}: an unfinished write at the end of the log at offset {offset} "
                f"({size - offset} bytes: {reason}) is not part of the state"
            )
            return
        with open(path, "r+b", buffering=0) as f:
            f.truncate(offset)
            if self._fsync:
                os.fsync(f.fileno())
        state.repaired_tail_bytes += size - offset
        state.warnings.append(
            f"{path}: cut {size - offset} bytes of a torn record at the end of the log "
            f"at offset {offset} ({reason})"
        )

    # -- appending --------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("DurableLog is closed")
        if self._fd is None:
            raise RuntimeError("DurableLog.load() must be called first")

    async def append(self, records: Sequence[Record]) -> None:
        """Write `records` as one group commit; return only once they are durable.

        Raises StorageError if they could not be written; the log is then exactly
        as before the call and later appends may succeed (e.g. once disk space is
        freed).
        """
        self._check_usable()
        if not records:
            return
        async with self._write_lock:
            await trio.to_thread.run_sync(self._append_blocking, records)

    def _append_blocking(self, records: Sequence[Record]) -> None:
        if self._needs_repair is not None:
            self._repair()
        data = encode_records(records)
        fd = self._fd
        assert fd is not None
        good = self._active_size
        try:
            view = memoryview(data)
            offset = good
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
            if self._fsync:
                _fdatasync(fd)
        except OSError as exc:
            # Never leave a partial frame behind: the next append would land after
            # it and turn a torn tail into corruption in the middle of the log.
            # After a failed fsync the page cache cannot be trusted either, so the
            # new bytes are cut rather than synced again (see docs/storage.md).
            self._restore(good, exc)
            raise StorageError(
                f"cannot write to the log {segment_path(self._dir, self._active_seq)}: "
                f"{_describe(exc)}"
            ) from exc
        self._active_size = good + len(data)

    def _restore(self, good: int, cause: OSError) -> None:
        try:
            os.ftruncate(self._fd, good)  # type: ignore[arg-type]
            if self._fsync:
                _fdatasync(self._fd)  # type: ignore[arg-type]
        except OSError as exc:
            log.error(
                "could not cut a failed append off the log; will retry before the next write",
                path=str(segment_path(self._dir, self._active_seq)),
                error=_describe(exc),
                cause=_describe(cause),
            )
            self._needs_repair = exc
        else:
            self._needs_repair = None

    def _repair(self) -> None:
        self._restore(self._active_size, self._needs_repair or OSError())
        if self._needs_repair is not None:
            raise StorageError(
                f"the log {segment_path(self._dir, self._active_seq)} still holds a failed "
                f"write that cannot be removed: {_describe(self._needs_repair)}"
            )
        log.info("removed a failed write from the log", segment=self._active_seq)

    # -- compaction -------------------------------------------------------------

    async def rotate(self) -> int:
        """Seal the active segment and start a new one; return the sealed segment's number.

        The state the caller holds right now (with no append in flight) is the
        state as of the end of the returned segment: pass both to write_snapshot.
        """
        self._check_usable()
        async with self._write_lock:
            old_seq, old_size = await trio.to_thread.run_sync(self._rotate_blocking)
        self._sealed[old_seq] = old_size
        return old_seq

    def _create_segment(self, seq: int) -> tuple[int, int]:
        """Create segment `seq` holding only its header; (read-write fd, size).

        Written under a temporary name and renamed, so that a segment file
        always has a whole header: a shorter one is damage, never a crash
        (start-up deletes a leftover *.tmp).
        """
        path = segment_path(self._dir, seq)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header = encode_header(SEGMENT_MAGIC, seq)
            if os.write(fd, header) != len(header):
                raise OSError(errno.EIO, "short write of a segment header")
            if self._fsync:
                os.fsync(fd)
            os.rename(tmp, path)
            if self._fsync:
                fsync_directory(self._dir)
        except BaseException:
            close_quietly(fd, str(tmp))
            tmp.unlink(missing_ok=True)
            raise
        return fd, HEADER_SIZE

    def _rotate_blocking(self) -> tuple[int, int]:
        if self._needs_repair is not None:
            self._repair()
        old_fd, old_seq, old_size = self._fd, self._active_seq, self._active_size
        try:
            new_fd, new_size = self._create_segment(old_seq + 1)
        except OSError as exc:
            raise StorageError(f"cannot start a new log segment: {_describe(exc)}") from exc
        self._fd, self._active_seq, self._active_size = new_fd, old_seq + 1, new_size
        close_quietly(old_fd, f"segment {old_seq}")  # type: ignore[arg-type]
        return old_seq, old_size

    async def write_snapshot(
        self, seq: int, jobs: Mapping[str, Job] | OrderedJobs, rules: Mapping[str, Rule]
    ) -> None:
        """Write snapshot `seq` (the state as of the end of segment `seq`) and drop what it covers.

        `seq` comes from rotate(); jobs and rules must be the state at that
        moment and must not change meanwhile (pass shallow copies). Safe to run
        in a background task while appends continue. Raises RuntimeError if a
        snapshot is already being written, StorageError if this one cannot be
        (nothing is lost then; try again later).
        """
        self._check_usable()
        if self._compacting:
            raise RuntimeError("a compaction is already running")
        if not self._snapshot_seq < seq < self._active_seq:
            raise ValueError(
                f"segment {seq} is not a sealed segment after snapshot {self._snapshot_seq}"
            )
        self._compacting = True
        self._compaction_done = trio.Event()
        started = time.perf_counter()
        try:
            info = await trio.to_thread.run_sync(
                lambda: compaction.write_snapshot(self._dir, seq, jobs, rules, fsync=self._fsync)
            )
        except OSError as exc:
            raise StorageError(f"cannot write snapshot {seq}: {_describe(exc)}") from exc
        finally:
            self._compacting = False
            self._compaction_done.set()
        self._snapshot_seq = seq
        self._snapshot_bytes = info.bytes
        for covered in [s for s in self._sealed if s <= seq]:
            del self._sealed[covered]
        log.info(
            "log compacted",
            snapshot=seq,
            jobs=info.jobs,
            rules=info.rules,
            mib=round(info.bytes / 2**20, 1),
            files_removed=len(info.removed),
            seconds=round(time.perf_counter() - started, 3),
        )

    async def compact(self, jobs: Mapping[str, Job], rules: Mapping[str, Rule]) -> None:
        """rotate() then write_snapshot(): call between appends with copies of the current state."""
        if self._compacting:
            raise RuntimeError("a compaction is already running")
        seq = await self.rotate()
        await self.write_snapshot(seq, jobs, rules)

    # -- shutdown ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Wait for a running snapshot, sync and close the files, release the lock."""
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            if self._compaction_done is not None:
                await self._compaction_done.wait()
            async with self._write_lock:
                self._closed = True
                await trio.to_thread.run_sync(self._close_blocking)

    def _close_blocking(self) -> None:
        try:
            if self._fd is not None and self._fsync and self._needs_repair is None:
                _fdatasync(self._fd)
        except OSError as exc:
            log.warning("could not sync the log on close", error=_describe(exc))
        finally:
            self._unlock()


def read_state(directory: Path) -> LoadedState:
    """Replay a data directory without locking or changing it: the state a server would load.

    BLOCKING. Same checks as DurableLog.load, but nothing is written: an
    unfinished write at the end of the last segment is left out of the state
    and reported in `warnings` instead of being cut, leftover temporary and
    compacted files are ignored. Raises CorruptLogError, FileNotFoundError if
    `directory` does not exist, OSError. Used to verify backups.
    """
    if not Path(directory).is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such data directory", str(directory))
    reader = DurableLog(directory)
    reader._read_only = True
    started = time.perf_counter()
    state = reader._replay()
    state.seconds = time.perf_counter() - started
    return state
