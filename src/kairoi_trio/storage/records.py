"""Log records: what the storage layer writes, and how it is framed on disk.

Pure code, no I/O: the record types the command actor appends, their binary
encoding, the frame around each encoded record, the file headers, and the
rules that tell an unfinished final write from damage. See docs/storage.md
for the byte layout and the reasons behind it.

Every record is one *frame*. Format versions 2, 4 and 7 (7 is written by this
release; 4 added record type 7, a recurring job, to version 2; 7 adds record
type 8, a chunk of plain jobs stored column by column, which snapshots use;
there is no 3, 5 or 6, each one flipped bit away from an existing version):

    u32 LE payload length | u32 LE crc32(length field) | u32 LE crc32(payload) | payload

The length checks itself, so a damaged length is never mistaken for a write
that was cut short. Format version 1 (the first release; read, never written):

    u32 LE payload length | u32 LE crc32(payload) | payload

Every payload starts with a one-byte record type. Job records (the bulk of
the log) use a fixed little-endian struct followed by the variable-length
fields; rules are rare and are stored as JSON.

Decoding is the start-up hot path (ten million jobs must replay in seconds), so
`replay_into` decodes JobPut and JobStatus frames inline: it shares the Status
members and the empty payload, caches outcome strings and the length checks
(lengths repeat), and builds Job objects through the slot descriptors (half the
cost of the frozen dataclass __init__, same result). A JobStatus changes the
Job replay built in place: nothing else holds it yet. A snapshot holds most
jobs in job chunks (type 8): up to CHUNK_JOBS plain jobs a frame, each field a
column, so that a chunk is decoded by a few C-level passes (one decode and
split of its ids, arrays of its integers) instead of a Python loop per job.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from itertools import chain, compress, islice, repeat
from operator import attrgetter, ne, sub
from typing import Any, TypeAlias

from kairoi_trio.model import (
    JOB_SLOT_SETTERS,
    AmqpRunner,
    HttpRunner,
    Job,
    Misfire,
    Overlap,
    Recurrence,
    Rule,
    RulePolicy,
    RunnerSpec,
    Schedule,
    ShellRunner,
    Status,
    new_job,
    new_recurrence,
    schedule_with_bounds,
)

# Anything decoding reads from: bytes, or a read-only mmap of a file.
Buffer: TypeAlias = bytes | mmap.mmap

# -- record types ---------------------------------------------------------------
# Messages, never changed once made; not frozen because the actor makes one per
# SET and a frozen dataclass's __init__ costs several times as much.


@dataclass(slots=True)
class JobPut:
    """The full state of a job (created, replaced, or re-planned); encoded as type 7
    when the job is recurring (format 3), else as type 1."""

    job: Job


@dataclass(slots=True)
class JobStatus:
    """A status change applied onto the existing job, so a run does not rewrite its payload."""

    id: str
    status: Status
    attempts: int
    last_outcome: str
    updated_at: int


@dataclass(slots=True)
class JobDelete:
    id: str


@dataclass(slots=True)
class RulePut:
    rule: Rule


@dataclass(slots=True)
class RuleDelete:
    id: str


@dataclass(slots=True)
class JobChunk:
    """Many plain jobs (no payload, no outcome, not recurring) in one frame, column by
    column (type 8, format 7). Written by snapshots only (encode_jobs); applying it
    puts each of its jobs, in order, as a JobPut would."""

    jobs: list[Job]


@dataclass(slots=True)
class SnapshotEnd:
    """Last record of a snapshot file: proves the snapshot is complete. Never in segments."""

    jobs: int
    rules: int


Record = JobPut | JobStatus | JobDelete | RulePut | RuleDelete
# What a frame decodes to: a record, or one of the records only snapshots hold.
Decoded = Record | JobChunk | SnapshotEnd

# Record type bytes. Never renumber: they are on disk.
T_JOB_PUT = 1
T_JOB_STATUS = 2
T_JOB_DELETE = 3
T_RULE_PUT = 4
T_RULE_DELETE = 5
T_SNAPSHOT_END = 6
T_RECURRING_JOB_PUT = 7  # format 4
T_JOB_CHUNK = 8  # format 7

# -- framing --------------------------------------------------------------------

# Format version 2 frame header: payload length, crc32 of the 4 length bytes, crc32(payload).
FRAME = struct.Struct("<III")
FRAME_SIZE = FRAME.size
# Format version 1 frame header: payload length, crc32(payload).
FRAME_V1 = struct.Struct("<II")
FRAME_V1_SIZE = FRAME_V1.size
# Upper bound on one payload: a 64 KiB id plus a payload far above any sane cap (and
# far above a job chunk's: CHUNK_JOBS jobs of 13 bytes plus CHUNK_ID_BYTES of ids).
# A length field above it can only be corruption.
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024

# type, status, execute_at, updated_at, attempts, len(id), len(payload), len(outcome)
_JOB_PUT = struct.Struct("<BBqqIIII")
# type, status, updated_at, attempts, len(id), len(outcome)
_JOB_STATUS = struct.Struct("<BBqIII")
_SNAPSHOT_END = struct.Struct("<BQQ")

_STATUS_CODE = {Status.PLANNED: 1, Status.TRIGGERED: 2, Status.EXECUTED: 3, Status.FAILED: 4}
_STATUS_BY_CODE: tuple[Status | None, ...] = (
    None,
    Status.PLANNED,
    Status.TRIGGERED,
    Status.EXECUTED,
    Status.FAILED,
)

_crc32 = zlib.crc32
_frame_pack = FRAME.pack
_job_put_pack = _JOB_PUT.pack
_LENGTH = struct.Struct("<I")

# crc32 of a length field, by length. Lengths repeat (jobs of one application are
# alike), so replay looks the check up instead of computing a CRC per frame.
# Bounded: a log of all-different lengths computes the rest.
_length_checks: dict[int, int] = {}
_LENGTH_CHECKS_MAX = 1 << 16


def length_check(length: int) -> int:
    """The check value of a version-2 frame header: crc32 of the u32 LE length field."""
    check = _length_checks.get(length)
    if check is None:
        check = _crc32(_LENGTH.pack(length))
        if len(_length_checks) < _LENGTH_CHECKS_MAX:
            _length_checks[length] = check
    return check


def frame(payload: bytes) -> bytes:
    """Wrap one encoded record in its (format version 2) frame header."""
    length = len(payload)
    return _frame_pack(length, length_check(length), _crc32(payload)) + payload


# A recurring job's state after the JobPut fields: nominal, runs, skipped, resume,
# resume_at, cursor, the schedule's start and end (valid when flagged), catchup_left,
# flags (1 last_failed, 2 paused, 4 manual, 8 has start, 16 has end); then the rest
# of its Schedule as JSON to the end of the record. Start and end are apart from the
# JSON so that jobs whose schedules differ only by them (intervals start when they
# are set) share one decoded JSON.
_RECURRENCE = struct.Struct("<qQQqqqqqIB")
_RECURRENCE_SIZE = _RECURRENCE.size
_LAST_FAILED, _PAUSED, _MANUAL, _HAS_START, _HAS_END = 1, 2, 4, 8, 16


def encode_schedule(schedule: Schedule) -> bytes:
    """Only what differs from the defaults, so a new option needs no new format."""
    doc: dict[str, object] = {"expression": schedule.expression}
    for name, default in _SCHEDULE_DEFAULTS:
        value = getattr(schedule, name)
        if value != default:
            doc[name] = value.value if isinstance(value, Misfire | Overlap) else value
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


_SCHEDULE_DEFAULTS = [
    (f.name, f.default) for f in fields(Schedule) if f.name not in ("expression", "start", "end")
]


def encode_recurring_job(job: Job) -> bytes:
    """The framed record of a recurring job (type 7, format 4): the JobPut layout,
    then its Recurrence."""
    r = job.recurrence
    assert r is not None
    idb = job.id.encode()
    payload = job.payload
    outb = job.last_outcome.encode() if job.last_outcome else b""
    schedule = r.schedule
    flags = (_LAST_FAILED if r.last_failed else 0) | (_PAUSED if r.paused else 0)
    flags |= _MANUAL if r.manual else 0
    flags |= (_HAS_START if schedule.start is not None else 0) | (
        _HAS_END if schedule.end is not None else 0
    )
    body = b"".join(
        (
            _job_put_pack(
                T_RECURRING_JOB_PUT,
                _STATUS_CODE[job.status],
                job.execute_at,
                job.updated_at,
                job.attempts,
                len(idb),
                len(payload),
                len(outb),
            ),
            idb,
            payload,
            outb,
            _RECURRENCE.pack(
                r.nominal,
                r.runs,
                r.skipped,
                r.resume,
                r.resume_at,
                r.cursor,
                schedule.start or 0,
                schedule.end or 0,
                r.catchup_left,
                flags,
            ),
            encode_schedule(r.schedule),
        )
    )
    return frame(body)


def encode_job(job: Job) -> bytes:
    """The framed JobPut for `job` (used directly by snapshots, skipping the wrapper)."""
    if job.recurrence is not None:
        return encode_recurring_job(job)
    idb = job.id.encode()
    payload = job.payload
    outb = job.last_outcome.encode() if job.last_outcome else b""
    body = (
        _job_put_pack(
            T_JOB_PUT,
            _STATUS_CODE[job.status],
            job.execute_at,
            job.updated_at,
            job.attempts,
            len(idb),
            len(payload),
            len(outb),
        )
        + idb
        + payload
        + outb
    )
    length = len(body)
    return _frame_pack(length, length_check(length), _crc32(body)) + body


def rule_document(rule: Rule) -> dict[str, Any]:
    """A rule as JSON-ready data: {"id", "pattern", "runner": {"kind", ...}, "policy": {...}}
    (the body of a RulePut record; also the PostgreSQL store's columns)."""
    runner = rule.runner
    return {
        "id": rule.id,
        "pattern": rule.pattern,
        "runner": {
            "kind": runner.kind,
            **{f.name: getattr(runner, f.name) for f in fields(runner)},
        },
        "policy": {f.name: getattr(rule.policy, f.name) for f in fields(rule.policy)},
    }


def rule_from_document(doc: dict[str, Any]) -> Rule:
    """The inverse of rule_document; KeyError/TypeError/MalformedRecord on a bad one."""
    return Rule(
        id=doc["id"],
        pattern=doc["pattern"],
        runner=_decode_runner(dict(doc["runner"])),
        policy=RulePolicy(**doc["policy"]),
    )


def encode_rule(rule: Rule) -> bytes:
    """The framed RulePut for `rule`."""
    doc = rule_document(rule)
    return frame(bytes([T_RULE_PUT]) + json.dumps(doc, separators=(",", ":")).encode())


def encode_record(record: Record) -> bytes:
    """One framed record, ready to append."""
    kind = type(record)
    if kind is JobPut:
        return encode_job(record.job)  # type: ignore[union-attr]
    if kind is JobStatus:
        r: JobStatus = record  # type: ignore[assignment]
        idb = r.id.encode()
        outb = r.last_outcome.encode()
        head = _JOB_STATUS.pack(
            T_JOB_STATUS, _STATUS_CODE[r.status], r.updated_at, r.attempts, len(idb), len(outb)
        )
        return frame(head + idb + outb)
    if kind is JobDelete:
        return frame(bytes([T_JOB_DELETE]) + record.id.encode())  # type: ignore[union-attr]
    if kind is RulePut:
        return encode_rule(record.rule)  # type: ignore[union-attr]
    if kind is RuleDelete:
        return frame(bytes([T_RULE_DELETE]) + record.id.encode())  # type: ignore[union-attr]
    raise TypeError(f"not a storage record: {record!r}")


def encode_records(records: Iterable[Record]) -> bytes:
    """Several framed records, concatenated (one write, one fsync)."""
    return b"".join([encode_record(r) for r in records])


def encode_snapshot_end(jobs: int, rules: int) -> bytes:
    return frame(_SNAPSHOT_END.pack(T_SNAPSHOT_END, jobs, rules))


# -- job chunks (type 8, format 7) ------------------------------------------------
#
# A plain job (no payload, no last outcome, no recurrence: the common planned job)
# is five fields. A chunk stores n of them column by column:
#
#   u8 type (8) | u8 reserved (0) | u32 n | u32 id bytes | u32 runs
#   | the n ids, UTF-8, joined by NUL (an id never holds one: core/validation.py)
#   | n x i64 execute_at | n x u8 status code | n x u32 attempts
#   | runs x i64 updated_at | runs x u32 run length (the jobs of a group commit
#     share their updated_at: a run of equal values is stored, and decoded, once)
#
# all little-endian. A chunk is one frame, checked by its CRC as any other; the
# writer closes it at CHUNK_JOBS jobs or CHUNK_ID_BYTES bytes of ids.
_CHUNK = struct.Struct("<BBIII")
# Each column is built by one C-level pass, which holds the GIL throughout: the
# snapshot writer's thread held the server's event loop up to ~50 ms at a time with
# chunks of 65,536 jobs, ~12 ms with 4,096 (1M jobs: benchmarks/compaction_bench.py).
# Start-up reads both as fast. Readers take chunks of any size.
CHUNK_JOBS = 1 << 12
CHUNK_ID_BYTES = 8 << 20
_I64 = "q"
_U32 = "I" if array("I").itemsize == 4 else "L"
if array(_I64).itemsize != 8 or array(_U32).itemsize != 4:  # pragma: no cover
    raise ImportError("no 8- and 4-byte array type codes on this platform")
_BIG_ENDIAN = sys.byteorder == "big"
_VALID_CODES = bytes(range(1, len(_STATUS_BY_CODE)))

_job_id = attrgetter("id")
_job_execute_at = attrgetter("execute_at")
_job_status = attrgetter("status")
_job_attempts = attrgetter("attempts")
_job_updated_at = attrgetter("updated_at")
_job_extras = attrgetter("payload", "last_outcome", "recurrence")
_PLAIN = (b"", "", None)
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend


def _little_endian(values: array[int]) -> bytes:
    if _BIG_ENDIAN:  # pragma: no cover - every platform this runs on is little-endian
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _column(typecode: str, raw: bytes | memoryview) -> array[int]:
    values = array(typecode)
    values.frombytes(raw)
    if _BIG_ENDIAN:  # pragma: no cover
        values.byteswap()
    return values


def encode_job_chunk(jobs: list[Job]) -> bytes:
    """The framed chunk (type 8) of `jobs`: plain jobs whose ids hold no NUL, at least one.

    Raises ValueError for a job that does not fit (the caller, encode_jobs, sorts them out).
    """
    if not jobs:
        raise ValueError("a job chunk holds at least one job")
    if any(map(_PLAIN.__ne__, map(_job_extras, jobs))):
        raise ValueError("a job chunk holds plain jobs only (no payload, outcome, recurrence)")
    ids = list(map(_job_id, jobs))
    text = "\0".join(ids)
    if text.count("\0") != len(ids) - 1:
        raise ValueError("a job id in a chunk holds NUL")
    return _chunk_frame(jobs, text.encode())


def _chunk_frame(jobs: list[Job], ids: bytes) -> bytes:
    n = len(jobs)
    updated = list(map(_job_updated_at, jobs))
    # where a run of equal updated_at values starts
    starts = [0, *compress(range(1, n), map(ne, islice(updated, 1, None), updated))]
    body = b"".join(
        (
            _CHUNK.pack(T_JOB_CHUNK, 0, n, len(ids), len(starts)),
            ids,
            _little_endian(array(_I64, map(_job_execute_at, jobs))),
            bytes(map(_STATUS_CODE.__getitem__, map(_job_status, jobs))),
            _little_endian(array(_U32, map(_job_attempts, jobs))),
            _little_endian(array(_I64, map(updated.__getitem__, starts))),
            _little_endian(array(_U32, map(sub, [*starts[1:], n], starts))),
        )
    )
    return frame(body)


def _chunk_frames(jobs: list[Job]) -> Iterator[bytes]:
    """Chunks of `jobs` (plain, ids without NUL), split where the ids grow too long."""
    ids = "\0".join(map(_job_id, jobs)).encode()
    if len(ids) > CHUNK_ID_BYTES and len(jobs) > 1:
        half = len(jobs) // 2
        yield from _chunk_frames(jobs[:half])
        yield from _chunk_frames(jobs[half:])
        return
    yield _chunk_frame(jobs, ids)


def encode_jobs(jobs: Iterable[Job]) -> Iterator[bytes]:
    """Framed records holding `jobs`, for a snapshot: job chunks for the plain jobs
    and one JobPut (type 1 or 7) for each other one.

    Each batch of CHUNK_JOBS jobs gives its chunk first, then the others' records;
    a job's position in the file follows its batch's, so jobs given in id order
    come back nearly in id order (what the state's sorted indexes want).
    """
    it = iter(jobs)
    while batch := list(islice(it, CHUNK_JOBS)):
        plain = list(map(_PLAIN.__eq__, map(_job_extras, batch)))
        others: list[Job] = []
        if not all(plain):
            others = [job for job, ok in zip(batch, plain, strict=True) if not ok]
            batch = list(compress(batch, plain))
        if batch:
            ids = list(map(_job_id, batch))
            if "\0".join(ids).count("\0") != len(ids) - 1:
                # ids with NUL (never from this release's validation): records of their own
                others += [job for job in batch if "\0" in job.id]
                batch = [job for job in batch if "\0" not in job.id]
        if batch:
            yield from _chunk_frames(batch)
        for job in others:
            yield encode_job(job)


def _decode_chunk(body: bytes) -> tuple[list[str], list[Job]]:
    """The ids and jobs of a type-8 payload. Raises MalformedRecord or ValueError
    (invalid UTF-8) for a bad one."""
    if len(body) < _CHUNK.size:
        raise MalformedRecord("job chunk shorter than its header")
    _t, reserved, n, id_bytes, runs = _CHUNK.unpack_from(body, 0)
    if reserved or not n or not 0 < runs <= n:
        raise MalformedRecord("job chunk header is inconsistent")
    a = _CHUNK.size
    b = a + id_bytes
    c = b + 8 * n
    d = c + n
    e = d + 4 * n
    f = e + 8 * runs
    if f + 4 * runs != len(body):
        raise MalformedRecord("job chunk column lengths do not add up to the frame length")
    ids = body[a:b].decode().split("\0")
    if len(ids) != n:
        raise MalformedRecord(f"job chunk holds {len(ids)} ids, its header says {n}")
    codes = body[c:d]
    if codes.translate(None, _VALID_CODES):
        raise MalformedRecord("unknown status code in a job chunk")
    view = memoryview(body)
    lengths = _column(_U32, view[f:])
    if sum(lengths) != n or 0 in lengths:
        raise MalformedRecord("job chunk updated_at runs do not add up to its jobs")
    times = iter(_column(_I64, view[b:c]))
    if codes.count(1) == n:  # all planned
        statuses: Iterator[Status | None] = repeat(_STATUS_BY_CODE[1])
    else:
        statuses = map(_STATUS_BY_CODE.__getitem__, codes)
    if body.count(0, d, e) == 4 * n:  # no attempt yet
        attempts: Iterator[int] = repeat(0)
    else:
        attempts = iter(_column(_U32, view[d:e]))
    # equal values of a run share one int, as the running server's batch did
    values = _column(_I64, view[e:f]).tolist()
    updated = chain.from_iterable(map(repeat, values, lengths))
    # One C-level pass per field: a Python loop per job costs several times as much.
    # (Passes over 2,048 jobs at a time, to keep them in the CPU's cache, measured
    # no faster.)
    jobs = list(map(Job.__new__, repeat(Job, n)))
    # the columns in JOB_SLOT_SETTERS' order: id, execute_at, status, payload,
    # attempts, last_outcome, updated_at, recurrence
    # (typed: mypy's join of the eight column types is not stable from run to run)
    columns: tuple[Iterable[Any], ...] = (
        ids,
        times,
        statuses,
        repeat(b""),
        attempts,
        repeat(""),
        updated,
        repeat(None),
    )
    for set_slot, column in zip(JOB_SLOT_SETTERS, columns, strict=True):
        _consume(map(set_slot, jobs, column))
    return ids, jobs


def _decode_job_chunk(body: bytes) -> JobChunk:
    return JobChunk(_decode_chunk(body)[1])


# -- file headers ---------------------------------------------------------------

SEGMENT_MAGIC = b"KTRIOLOG"
SNAPSHOT_MAGIC = b"KTRIOSNP"
# The version this release writes, and the ones it reads (each file says which it is).
# Versions differ from each other in at least two bits, so that one flipped bit
# of a file header is reported instead of read as another version.
FORMAT_VERSION = 7
READABLE_VERSIONS = (1, 2, 4, 7)
_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved (0), sequence number
HEADER_SIZE = _HEADER.size


def encode_header(magic: bytes, seq: int) -> bytes:
    """A file header of the current format version."""
    return _HEADER.pack(magic, FORMAT_VERSION, 0, seq)


def frame_header_size(version: int) -> int:
    """Bytes before the payload of each frame in a file of format `version`."""
    return FRAME_SIZE if version >= 2 else FRAME_V1_SIZE


@dataclass(frozen=True, slots=True)
class FileHeader:
    """A parsed file header. `problem` says what is wrong with it (None: it is as expected)."""

    version: int
    problem: str | None


def read_header(data: bytes, magic: bytes, seq: int) -> FileHeader:
    """Check the first HEADER_SIZE bytes of a segment or snapshot named with `seq`.

    Every field is checked (the reserved one must be 0), so that any single
    damaged bit in a header is reported rather than misread.
    """
    if len(data) < HEADER_SIZE:
        return FileHeader(0, f"file header is {len(data)} bytes, expected {HEADER_SIZE}")
    found_magic, version, reserved, found_seq = _HEADER.unpack_from(data, 0)
    if found_magic != magic:
        return FileHeader(version, f"bad magic {found_magic!r}, expected {magic!r}")
    if version not in READABLE_VERSIONS:
        return FileHeader(
            version,
            f"format version {version} is not supported (this release reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; a newer release wrote it?)",
        )
    if reserved != 0:
        return FileHeader(version, f"reserved header field is {reserved:#x}, expected 0")
    if found_seq != seq:
        return FileHeader(
            version, f"header sequence number {found_seq} does not match the file name ({seq})"
        )
    return FileHeader(version, None)


def check_header(data: bytes, magic: bytes, seq: int) -> str | None:
    """What is wrong with a file header, or None if it is a readable one."""
    return read_header(data, magic, seq).problem


# -- decoding -------------------------------------------------------------------


class MalformedRecord(ValueError):
    """A payload whose checksum is right but whose content is not a valid record."""


@dataclass(frozen=True, slots=True)
class FrameError:
    """Why decoding stopped before the end of the data.

    offset: where the bad frame starts (its length field), relative to the data.
    incomplete: the data ends inside this frame and what is there is a
        trustworthy prefix of a real frame (version 2: its header checks out, or
        is itself cut short): a write cut short at the end of a file, or just the
        end of a read block. False means the frame itself is bad (header,
        checksum, content).
    """

    offset: int
    reason: str
    incomplete: bool


@dataclass(slots=True)
class DecodeResult:
    """The records of a run of good frames, and where and why it stopped.

    end: offset just past the last good frame; equals len(data) when error is None.
    """

    records: list[Decoded]
    end: int
    error: FrameError | None


# The fast Job constructor and its slot setters live with Job in model.py.
make_job = new_job


# Outcomes repeat ("exit 0", "HTTP 500" ...): share one str per distinct value.
# Bounded so that a log full of unique outcomes cannot grow it without limit.
_outcome_cache: dict[bytes, str] = {b"": ""}
_OUTCOME_CACHE_MAX = 4096


def _outcome(raw: bytes) -> str:
    text = _outcome_cache.get(raw)
    if text is None:
        text = raw.decode()
        if len(_outcome_cache) < _OUTCOME_CACHE_MAX:
            _outcome_cache[raw] = text
    return text


def _decode_runner(doc: dict) -> RunnerSpec:
    kind = doc.pop("kind")
    if kind == "shell":
        return ShellRunner(**doc)
    if kind == "amqp":
        return AmqpRunner(**doc)
    if kind == "http":
        return HttpRunner(**doc)
    raise MalformedRecord(f"unknown runner kind {kind!r}")


def _decode_job_put(body: bytes) -> JobPut:
    return JobPut(_decode_job(body))


def _decode_job_status(body: bytes) -> JobStatus:
    _t, code, updated_at, attempts, id_len, out_len = _JOB_STATUS.unpack_from(body, 0)
    start = _JOB_STATUS.size
    if start + id_len + out_len != len(body):
        raise MalformedRecord("JobStatus field lengths do not add up to the frame length")
    status = _STATUS_BY_CODE[code] if code < len(_STATUS_BY_CODE) else None
    if status is None:
        raise MalformedRecord(f"unknown status code {code}")
    return JobStatus(
        body[start : start + id_len].decode(),
        status,
        attempts,
        _outcome(body[start + id_len :]),
        updated_at,
    )


def _decode_job_delete(body: bytes) -> JobDelete:
    return JobDelete(body[1:].decode())


def _decode_rule_put(body: bytes) -> RulePut:
    return RulePut(rule_from_document(json.loads(body[1:])))


def _decode_rule_delete(body: bytes) -> RuleDelete:
    return RuleDelete(body[1:].decode())


# Schedules repeat (100,000 jobs `* * * * *`): one object per distinct encoding.
_schedule_cache: dict[bytes, Schedule] = {}
_SCHEDULE_CACHE_MAX = 1 << 16


def decode_schedule(raw: bytes) -> Schedule:
    schedule = _schedule_cache.get(raw)
    if schedule is None:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("expression"), str):
            raise MalformedRecord("a recurring job's schedule has no expression")
        if "misfire" in doc:
            doc["misfire"] = Misfire(doc["misfire"])
        if "overlap" in doc:
            doc["overlap"] = Overlap(doc["overlap"])
        schedule = Schedule(**doc)
        if len(_schedule_cache) < _SCHEDULE_CACHE_MAX:
            _schedule_cache[raw] = schedule
    return schedule


def _decode_recurrence(data: Buffer, d: int, end: int) -> Recurrence:
    """The Recurrence of a type-7 record whose recurrence part is data[d:end]."""
    nominal, runs, skipped, resume, resume_at, cursor, start, stop, catchup_left, flags = (
        _RECURRENCE.unpack_from(data, d)
    )
    return new_recurrence(
        schedule_with_bounds(
            decode_schedule(data[d + _RECURRENCE_SIZE : end]),
            start if flags & _HAS_START else None,
            stop if flags & _HAS_END else None,
        ),
        nominal,
        runs,
        skipped,
        bool(flags & _LAST_FAILED),
        bool(flags & _PAUSED),
        bool(flags & _MANUAL),
        resume,
        resume_at,
        cursor,
        catchup_left,
    )


def _decode_recurring_job_put(body: bytes) -> JobPut:
    _t, code, execute_at, updated_at, attempts, id_len, pl_len, out_len = _JOB_PUT.unpack_from(
        body, 0
    )
    a = _JOB_PUT.size
    b = a + id_len
    c = b + pl_len
    d = c + out_len
    if d + _RECURRENCE.size > len(body):
        raise MalformedRecord("recurring JobPut field lengths exceed the frame length")
    status = _STATUS_BY_CODE[code] if code < len(_STATUS_BY_CODE) else None
    if status is None:
        raise MalformedRecord(f"unknown status code {code}")
    recurrence = _decode_recurrence(body, d, len(body))
    return JobPut(
        make_job(
            body[a:b].decode(),
            execute_at,
            status,
            body[b:c],
            attempts,
            _outcome(body[c:d]) if out_len else "",
            updated_at,
            recurrence,
        )
    )


def _decode_snapshot_end(body: bytes) -> SnapshotEnd:
    if len(body) != _SNAPSHOT_END.size:
        raise MalformedRecord("SnapshotEnd has the wrong length")
    _t, jobs, rules = _SNAPSHOT_END.unpack(body)
    return SnapshotEnd(jobs, rules)


# The payload decoder of each record type. A new record type gets a new number
# here (and in apply_record); a file holding a type this table lacks is refused
# as corruption, naming the type and the file's format version.
DECODERS: dict[int, Callable[[bytes], Decoded]] = {
    T_JOB_PUT: _decode_job_put,
    T_JOB_STATUS: _decode_job_status,
    T_JOB_DELETE: _decode_job_delete,
    T_RULE_PUT: _decode_rule_put,
    T_RULE_DELETE: _decode_rule_delete,
    T_SNAPSHOT_END: _decode_snapshot_end,
    T_RECURRING_JOB_PUT: _decode_recurring_job_put,
    T_JOB_CHUNK: _decode_job_chunk,
}


def decode_payload(body: bytes, version: int = FORMAT_VERSION) -> Decoded:
    """Decode one record payload (checksum already verified). Raises MalformedRecord.

    `version` is the format version of the file, named in the message of an
    unknown record type.
    """
    if not body:
        raise MalformedRecord("empty record")
    decoder = DECODERS.get(body[0])
    if decoder is None:
        known = ", ".join(str(t) for t in sorted(DECODERS))
        raise MalformedRecord(
            f"unknown record type {body[0]} in a format-version-{version} file "
            f"(this release reads types {known}; a newer release wrote it?)"
        )
    try:
        return decoder(body)
    except MalformedRecord:
        raise
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        raise MalformedRecord(f"undecodable record: {exc}") from None


def _decode_job(body: bytes) -> Job:
    _t, code, execute_at, updated_at, attempts, id_len, pl_len, out_len = _JOB_PUT.unpack_from(
        body, 0
    )
    a = _JOB_PUT.size
    b = a + id_len
    c = b + pl_len
    if c + out_len != len(body):
        raise MalformedRecord("JobPut field lengths do not add up to the frame length")
    status = _STATUS_BY_CODE[code] if code < len(_STATUS_BY_CODE) else None
    if status is None:
        raise MalformedRecord(f"unknown status code {code}")
    return make_job(
        body[a:b].decode(),
        execute_at,
        status,
        body[b:c],
        attempts,
        _outcome(body[c:]) if out_len else "",
        updated_at,
    )


def _plausible_prefix_v1(data: Buffer, offset: int, length: int) -> str | None:
    """Check the start of an incomplete version-1 frame against its length field.

    Version 1 lengths carry no check of their own; job records carry their own
    field lengths, so when enough of the record header is present a damaged
    length can still be told from a cut write. Returns a reason if the prefix
    is not plausible, None if it is.
    """
    start = offset + FRAME_V1_SIZE
    available = len(data) - start
    if available < 1:
        return None
    kind = data[start]
    if kind == T_JOB_PUT and available >= _JOB_PUT.size:
        fields_ = _JOB_PUT.unpack_from(data, start)
        expected = _JOB_PUT.size + fields_[5] + fields_[6] + fields_[7]
    elif kind == T_JOB_STATUS and available >= _JOB_STATUS.size:
        fields_ = _JOB_STATUS.unpack_from(data, start)
        expected = _JOB_STATUS.size + fields_[4] + fields_[5]
    elif kind in DECODERS and kind != T_SNAPSHOT_END:
        return None
    else:
        return f"unknown record type {kind} in an incomplete frame"
    if expected != length:
        return f"frame length {length} disagrees with its record header ({expected})"
    return None


def frame_header(data: Buffer, pos: int, version: int) -> tuple[int, int] | FrameError:
    """(payload length, payload crc32) of the frame header at `pos`, or what is wrong with it.

    Only the header is looked at: the payload may be absent. Version 2 headers
    check their own length; version 1 lengths are only bounded.
    """
    available = len(data) - pos
    if version >= 2:
        if available < FRAME_SIZE:
            return FrameError(
                pos, f"frame header cut after {available} of {FRAME_SIZE} bytes", True
            )
        length, check, crc = FRAME.unpack_from(data, pos)
        if check != length_check(length):
            return FrameError(pos, "frame header checksum mismatch (damaged length field)", False)
    else:
        if available < FRAME_V1_SIZE:
            return FrameError(
                pos, f"frame header cut after {available} of {FRAME_V1_SIZE} bytes", True
            )
        length, crc = FRAME_V1.unpack_from(data, pos)
    if length == 0:
        return FrameError(pos, "empty frame (length 0)", False)
    if length > MAX_PAYLOAD_BYTES:
        return FrameError(pos, f"frame length {length} is impossibly large", False)
    return length, crc


def decode_frame(
    data: Buffer, pos: int, version: int = FORMAT_VERSION
) -> tuple[Decoded, int] | FrameError:
    """Decode the frame at `pos`: (record, offset after it), or what is wrong with it."""
    header = frame_header(data, pos, version)
    if isinstance(header, FrameError):
        return header
    length, crc = header
    start = pos + frame_header_size(version)
    end = start + length
    if end > len(data):
        if version < 2:
            reason = _plausible_prefix_v1(data, pos, length)
            if reason is not None:
                return FrameError(pos, reason, False)
        return FrameError(pos, f"frame of {length} bytes cut after {len(data) - start} bytes", True)
    body = data[start:end]
    if _crc32(body) != crc:
        return FrameError(pos, "checksum mismatch", False)
    try:
        return decode_payload(body, version), end
    except MalformedRecord as exc:
        return FrameError(pos, str(exc), False)


def decode_records(
    data: Buffer | memoryview, offset: int = 0, version: int = FORMAT_VERSION
) -> DecodeResult:
    """Decode consecutive frames of `data` from `offset` until the end or the first bad frame.

    Never raises for bad input: the result says how far the good frames go
    (`end`) and, if decoding stopped early, which frame is bad and why. Whether an
    incomplete frame is a torn tail (cut it) or corruption (refuse to start) is
    the caller's decision (see torn_tail), since only the caller knows if this
    is the end of the last file.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    records: list[Decoded] = []
    pos = offset
    while pos < len(data):
        result = decode_frame(data, pos, version)
        if isinstance(result, FrameError):
            return DecodeResult(records, pos, result)
        record, pos = result
        records.append(record)
    return DecodeResult(records, pos, None)


def scan_frames(data: Buffer, offset: int, version: int) -> tuple[int, FrameError | None]:
    """Check consecutive frames from `offset` without decoding them: (end, error).

    Checks what proves a frame whole (its header, and its payload checksum),
    not the record inside, so it is cheap; used to find where the good frames
    of a file being copied end. `end` is just past the last whole frame.
    """
    size = len(data)
    hsize = frame_header_size(version)
    pos = offset
    while pos < size:
        header = frame_header(data, pos, version)
        if isinstance(header, FrameError):
            return pos, header
        length, crc = header
        end = pos + hsize + length
        if end > size:
            decoded = decode_frame(data, pos, version)  # incomplete, or a damaged v1 length
            assert isinstance(decoded, FrameError)
            return pos, decoded
        if _crc32(data[pos + hsize : end]) != crc:
            return pos, FrameError(pos, "checksum mismatch", False)
        pos = end
    return pos, None


# -- damage: torn tails and resynchronisation -------------------------------------

# Storage writes whole sectors: the part of a write that never reached the disk
# reads back as zeros from a sector boundary on (or is cut off by the file size).
SECTOR_BYTES = 512
_SCAN_BLOCK = 1 << 20


def zero_tail_start(data: Buffer, lo: int = 0) -> int:
    """The offset (>= lo) from which `data` holds only zero bytes (len(data) if none)."""
    end = len(data)
    while end > lo:
        start = max(lo, end - _SCAN_BLOCK)
        kept = len(bytes(data[start:end]).rstrip(b"\0"))
        if kept:
            return start + kept
        end = start
    return lo


def torn_tail(data: Buffer, offset: int, version: int, base: int = 0) -> str | None:
    """Is the bad frame at `offset` an unfinished final write? Its description if so, else None.

    `data` is a whole file (bytes or an mmap) that is the LAST segment of a
    log; every frame before `offset` decoded. Only an append that never
    finished (and so was never acknowledged) may be cut, and it can only have
    left, from `offset` to the end of the file:

    - zeros only (the file grew but the data never arrived), or a frame header
      cut short, then nothing or zeros;
    - a frame whose header checks out (version 1: whose length agrees with the
      record header, and after which no valid frame starts), with the file
      ending inside it, or with its payload ending in zeros from a sector
      boundary to the end of the file (the last sectors never arrived).

    Anything else (a bad frame header, a complete frame with a bad checksum,
    non-zero bytes after the bad frame) is damage: None. `base` is the file
    offset of data[0] when `data` is only the end of the file (for the sector
    boundaries).
    """
    size = len(data)
    zeros = zero_tail_start(data, offset)
    hsize = frame_header_size(version)
    if zeros - offset <= hsize:  # not one payload byte arrived (a payload never starts with 0)
        if zeros == offset:
            return f"{size - offset} zero bytes after the last record"
        return f"a frame header cut after {zeros - offset} bytes" + (
            f" then {size - zeros} zero bytes" if zeros < size else ""
        )
    header = frame_header(data, offset, version)
    if isinstance(header, FrameError):
        return None
    length, _crc = header
    end = offset + hsize + length
    if end > size:
        if version < 2 and (
            _plausible_prefix_v1(data, offset, length) is not None
            or find_frame(data, offset + 1, version) is not None
        ):
            return None  # a damaged length: valid records follow
        return f"a frame of {length} bytes cut after {size - offset - hsize} bytes"
    sector = -(-(base + zeros) // SECTOR_BYTES) * SECTOR_BYTES - base
    if sector < end:
        return f"a frame of {length} bytes whose last {end - zeros} bytes are zeros"
    return None


def find_frame(data: Buffer, start: int, version: int, stop: int | None = None) -> int | None:
    """The first offset in start..stop-1 where a whole valid frame begins, or None.

    Valid: the header checks out, the payload is all there and its checksum
    matches, and it decodes. Used to resynchronise after damage: for version 2
    a random position passes both checks with a chance of 2**-64. Runs of zero
    bytes (the usual damage) are skipped at once.
    """
    size = len(data)
    stop = size if stop is None else min(stop, size)
    hsize = frame_header_size(version)
    pos = start
    while pos < stop:
        if data[pos] == 0:
            # A frame can start with zero bytes (a length that is a multiple of
            # 256) but never with more than three: its length is below 2**28.
            run_end = pos + 1
            while run_end < stop:
                chunk = bytes(data[run_end : min(stop, run_end + _SCAN_BLOCK)])
                zeros = len(chunk) - len(chunk.lstrip(b"\0"))
                run_end += zeros
                if zeros < len(chunk):
                    break
            if run_end - pos > 3:
                pos = run_end - 3
        if size - pos < hsize:
            return None
        header = frame_header(data, pos, version)
        if not isinstance(header, FrameError) and pos + hsize + header[0] <= size:
            result = decode_frame(data, pos, version)
            if not isinstance(result, FrameError):
                return pos
        pos += 1
    return None


# -- applying records to state --------------------------------------------------


def apply_record(jobs: dict[str, Job], rules: dict[str, Rule], record: Record | JobChunk) -> bool:
    """Apply one record to the state; False if it is a JobStatus for an unknown job."""
    kind = type(record)
    if kind is JobChunk:
        chunk: list[Job] = record.jobs  # type: ignore[union-attr]
        jobs.update(zip(map(_job_id, chunk), chunk, strict=True))
    elif kind is JobPut:
        job = record.job  # type: ignore[union-attr]
        jobs[job.id] = job
    elif kind is JobStatus:
        r: JobStatus = record  # type: ignore[assignment]
        old = jobs.get(r.id)
        if old is None:
            return False
        jobs[r.id] = make_job(
            old.id,
            old.execute_at,
            r.status,
            old.payload,
            r.attempts,
            r.last_outcome,
            r.updated_at,
            old.recurrence,
        )
    elif kind is JobDelete:
        jobs.pop(record.id, None)  # type: ignore[union-attr]
    elif kind is RulePut:
        rule = record.rule  # type: ignore[union-attr]
        rules[rule.id] = rule
    elif kind is RuleDelete:
        rules.pop(record.id, None)  # type: ignore[union-attr]
    else:
        raise TypeError(f"not a storage record: {record!r}")
    return True


@dataclass(slots=True)
class ReplayResult:
    """Outcome of `replay_into` over one buffer.

    end: offset just past the last applied frame.
    records: how many records were applied.
    orphan_status: JobStatus records for jobs that did not exist (skipped).
    snapshot_end: set if decoding stopped after a SnapshotEnd record.
    """

    end: int
    error: FrameError | None
    records: int = 0
    orphan_status: int = 0
    snapshot_end: SnapshotEnd | None = None


# Frame header + JobPut header in one unpack: the fast path of replay.
_FRAMED_JOB_PUT = struct.Struct("<III" + _JOB_PUT.format[1:])
# The same for JobStatus: a running server's segments are mostly these (a trigger and
# an outcome a run), which the general path replays at ~5.5 µs each against ~3.
_FRAMED_JOB_STATUS = struct.Struct("<III" + _JOB_STATUS.format[1:])


def replay_into(
    data: Buffer,
    offset: int,
    jobs: dict[str, Job],
    rules: dict[str, Rule],
    version: int = FORMAT_VERSION,
) -> ReplayResult:
    """Decode frames of `data` (format `version`) from `offset` and apply them in place.

    Same stopping rules as decode_records (it stops at the first bad or
    incomplete frame and reports it), but JobPut and JobStatus frames, which
    are almost all of a log or snapshot, are decoded inline without intermediate
    objects. Stops after a SnapshotEnd record.

    `jobs` must be replay's own: a JobStatus changes the Job it names in place
    (the Job objects in `jobs` are not to be held anywhere else meanwhile).
    """
    if version >= 2:
        return _replay_v2(data, offset, jobs, rules, version)
    return _replay_v1(data, offset, jobs, rules)


def _replay_general(
    data: Buffer,
    pos: int,
    jobs: dict[str, Job],
    rules: dict[str, Rule],
    version: int,
    result: ReplayResult,
) -> int | None:
    """Apply the one frame at `pos` the fast path did not take; its end, or None to stop."""
    decoded = decode_frame(data, pos, version)
    if isinstance(decoded, FrameError):
        result.end, result.error = pos, decoded
        return None
    record, end = decoded
    if isinstance(record, SnapshotEnd):
        result.end, result.snapshot_end = end, record
        return None
    result.records += len(record.jobs) if isinstance(record, JobChunk) else 1
    if not apply_record(jobs, rules, record):
        result.orphan_status += 1
    return end


def _replay_v2(
    data: Buffer, offset: int, jobs: dict[str, Job], rules: dict[str, Rule], version: int
) -> ReplayResult:
    """Formats 2, 4 and 7 (same frames; 4 and 7 add record types)."""
    result = ReplayResult(offset, None)
    size = len(data)
    pos = offset
    count = 0
    crc32 = _crc32
    checks = _length_checks.get
    unpack = _FRAMED_JOB_PUT.unpack_from
    head = _FRAMED_JOB_PUT.size
    unpack_status = _FRAMED_JOB_STATUS.unpack_from
    status_head = _FRAMED_JOB_STATUS.size
    get = jobs.get
    last_head = size - head
    by_code = _STATUS_BY_CODE
    outcome = _outcome
    new = Job.__new__
    # The jobs of one group commit share their updated_at (the batch's clock
    # reading) and a snapshot keeps them together: one int object for a run of
    # equal values, as the running server had, instead of 32 bytes a job.
    shared_updated_at: int | None = None
    (
        set_id,
        set_execute_at,
        set_status,
        set_payload,
        set_attempts,
        set_last_outcome,
        set_updated_at,
        set_recurrence,
    ) = JOB_SLOT_SETTERS
    while pos < size:
        if pos <= last_head:
            (
                length,
                check,
                crc,
                kind,
                code,
                execute_at,
                updated_at,
                attempts,
                id_len,
                pl_len,
                out_len,
            ) = unpack(data, pos)
            end = pos + 12 + length  # 12 = FRAME_SIZE
            if (
                kind == 1  # T_JOB_PUT
                and end <= size
                and 34 + id_len + pl_len + out_len == length  # 34 = _JOB_PUT.size
                and 0 < code < 5
                and check == (checks(length) or length_check(length))
                and crc32(data[pos + 12 : end]) == crc
            ):
                a = pos + head
                b = a + id_len
                c = b + pl_len
                try:
                    job_id = data[a:b].decode()
                    last = outcome(data[c:end]) if out_len else ""
                except UnicodeDecodeError:
                    result.records = count
                    result.end = pos
                    result.error = FrameError(pos, "invalid UTF-8 in a JobPut", False)
                    return result
                if updated_at != shared_updated_at:
                    shared_updated_at = updated_at
                job = new(Job)
                set_id(job, job_id)
                set_execute_at(job, execute_at)
                set_status(job, by_code[code])
                set_payload(job, data[b:c] if pl_len else b"")
                set_attempts(job, attempts)
                set_last_outcome(job, last)
                set_updated_at(job, shared_updated_at)
                set_recurrence(job, None)
                jobs[job_id] = job
                count += 1
                pos = end
                continue
            if kind == 2:  # T_JOB_STATUS: a status change onto the job it names
                length, check, crc, _, code, updated_at, attempts, id_len, out_len = unpack_status(
                    data, pos
                )
                end = pos + 12 + length
                if (
                    end <= size
                    and 22 + id_len + out_len == length  # 22 = _JOB_STATUS.size
                    and 0 < code < 5
                    and check == (checks(length) or length_check(length))
                    and crc32(data[pos + 12 : end]) == crc
                ):
                    a = pos + status_head
                    b = a + id_len
                    try:
                        job_id = data[a:b].decode()
                        last = outcome(data[b:end]) if out_len else ""
                    except UnicodeDecodeError:
                        pass  # the general path reports it
                    else:
                        changed = get(job_id)
                        if changed is None:
                            result.orphan_status += 1
                        else:
                            # In place: replay made this Job and nothing else holds it
                            # yet (a new one costs an allocation and a dict store more).
                            if updated_at != shared_updated_at:
                                shared_updated_at = updated_at
                            set_status(changed, by_code[code])
                            set_attempts(changed, attempts)
                            set_last_outcome(changed, last)
                            set_updated_at(changed, shared_updated_at)
                        count += 1
                        pos = end
                        continue
            if (
                kind == 8  # T_JOB_CHUNK: many plain jobs, decoded column by column
                and end <= size
                and check == (checks(length) or length_check(length))
            ):
                body = data[pos + 12 : end]
                if crc32(body) == crc:
                    try:
                        ids, chunk = _decode_chunk(body)
                    except (MalformedRecord, ValueError):
                        pass  # the general path reports it
                    else:
                        jobs.update(zip(ids, chunk, strict=True))
                        count += len(ids)
                        pos = end
                        continue
            if (
                kind == 7  # T_RECURRING_JOB_PUT: a recurring job, decoded by its function
                and end <= size
                and 34 + id_len + pl_len + out_len + _RECURRENCE_SIZE <= length
                and check == (checks(length) or length_check(length))
                and crc32(data[pos + 12 : end]) == crc
            ):
                a = pos + head
                b = a + id_len
                c = b + pl_len
                d = c + out_len
                try:
                    recurrence = _decode_recurrence(data, d, end)
                    job_id = data[a:b].decode()
                    last = outcome(data[c:d]) if out_len else ""
                    status = by_code[code]
                except (MalformedRecord, ValueError, KeyError, TypeError, IndexError):
                    pass  # the general path reports it
                else:
                    if status is not None:
                        if updated_at != shared_updated_at:
                            shared_updated_at = updated_at
                        job = new(Job)
                        set_id(job, job_id)
                        set_execute_at(job, execute_at)
                        set_status(job, status)
                        set_payload(job, data[b:c] if pl_len else b"")
                        set_attempts(job, attempts)
                        set_last_outcome(job, last)
                        set_updated_at(job, shared_updated_at)
                        set_recurrence(job, recurrence)
                        jobs[job_id] = job
                        count += 1
                        pos = end
                        continue
        # Anything else (other record types, errors, the last few bytes): the general path.
        result.records = count
        after = _replay_general(data, pos, jobs, rules, version, result)
        if after is None:
            return result
        count = result.records
        pos = after
    result.records = count
    result.end = pos
    return result


def _replay_v1(
    data: Buffer, offset: int, jobs: dict[str, Job], rules: dict[str, Rule]
) -> ReplayResult:
    """Format 1 is only read once, at the first start after an upgrade (appends go to
    a format-2 segment and the next compaction rewrites it all): the general path."""
    result = ReplayResult(offset, None)
    pos: int | None = offset
    size = len(data)
    while pos is not None and pos < size:
        pos = _replay_general(data, pos, jobs, rules, 1, result)
    if pos is not None:
        result.end = pos
    return result
