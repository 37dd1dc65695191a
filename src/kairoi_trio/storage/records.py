"""Log records: what the storage layer writes, and how it is framed on disk.

Pure code, no I/O: the record types the command actor appends, their binary
encoding, the frame around each encoded record, and the file headers. See
docs/storage.md for the byte layout.

Every record is one *frame*:

    u32 LE payload length | u32 LE crc32(payload) | payload

and every payload starts with a one-byte record type. Job records (the bulk of
the log) use a fixed little-endian struct followed by the variable-length
fields; rules are rare and are stored as JSON.

Decoding is the start-up hot path (a million records must replay in a couple
of seconds), so `decode_records` avoids per-record allocation where it can: it
shares the Status members and the empty payload, caches outcome strings, and
builds Job objects through the slot descriptors (half the cost of the frozen
dataclass __init__, same result).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, fields

from kairoi_trio.model import (
    JOB_SLOT_SETTERS,
    AmqpRunner,
    HttpRunner,
    Job,
    Rule,
    RulePolicy,
    RunnerSpec,
    ShellRunner,
    Status,
    new_job,
)

# -- record types ---------------------------------------------------------------
# Messages, never changed once made; not frozen because the actor makes one per
# SET and a frozen dataclass's __init__ costs several times as much.


@dataclass(slots=True)
class JobPut:
    """The full state of a job (created, replaced, or re-planned)."""

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
class SnapshotEnd:
    """Last record of a snapshot file: proves the snapshot is complete. Never in segments."""

    jobs: int
    rules: int


Record = JobPut | JobStatus | JobDelete | RulePut | RuleDelete

# Record type bytes. Never renumber: they are on disk.
T_JOB_PUT = 1
T_JOB_STATUS = 2
T_JOB_DELETE = 3
T_RULE_PUT = 4
T_RULE_DELETE = 5
T_SNAPSHOT_END = 6

# -- framing --------------------------------------------------------------------

FRAME = struct.Struct("<II")  # payload length, crc32(payload)
FRAME_SIZE = FRAME.size
# Upper bound on one payload: a 64 KiB id plus a payload far above any sane cap.
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


def frame(payload: bytes) -> bytes:
    """Wrap one encoded record in its length + checksum header."""
    return _frame_pack(len(payload), _crc32(payload)) + payload


def encode_job(job: Job) -> bytes:
    """The framed JobPut for `job` (used directly by snapshots, skipping the wrapper)."""
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
    return _frame_pack(len(body), _crc32(body)) + body


def encode_rule(rule: Rule) -> bytes:
    """The framed RulePut for `rule`."""
    runner = rule.runner
    doc = {
        "id": rule.id,
        "pattern": rule.pattern,
        "runner": {
            "kind": runner.kind,
            **{f.name: getattr(runner, f.name) for f in fields(runner)},
        },
        "policy": {f.name: getattr(rule.policy, f.name) for f in fields(rule.policy)},
    }
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


# -- file headers ---------------------------------------------------------------

SEGMENT_MAGIC = b"KTRIOLOG"
SNAPSHOT_MAGIC = b"KTRIOSNP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved (0), sequence number
HEADER_SIZE = _HEADER.size


def encode_header(magic: bytes, seq: int) -> bytes:
    return _HEADER.pack(magic, FORMAT_VERSION, 0, seq)


def check_header(data: bytes, magic: bytes, seq: int) -> str | None:
    """What is wrong with a file header, or None if it is the expected one."""
    if len(data) < HEADER_SIZE:
        return f"file header is {len(data)} bytes, expected {HEADER_SIZE}"
    found_magic, version, _reserved, found_seq = _HEADER.unpack_from(data, 0)
    if found_magic != magic:
        return f"bad magic {found_magic!r}, expected {magic!r}"
    if version != FORMAT_VERSION:
        return f"format version {version} is not supported (expected {FORMAT_VERSION})"
    if found_seq != seq:
        return f"header sequence number {found_seq} does not match the file name ({seq})"
    return None


# -- decoding -------------------------------------------------------------------


class MalformedRecord(ValueError):
    """A payload whose checksum is right but whose content is not a valid record."""


@dataclass(frozen=True, slots=True)
class FrameError:
    """Why decoding stopped before the end of the data.

    offset: where the bad frame starts (its length field), relative to the data.
    incomplete: the data ends inside this frame and what is there is a plausible
        prefix of a real frame: a torn write at the end of a file, or just the end of
        a read block. False means the frame itself is bad (checksum, content).
    """

    offset: int
    reason: str
    incomplete: bool


@dataclass(slots=True)
class DecodeResult:
    """The records of a run of good frames, and where and why it stopped.

    end: offset just past the last good frame; equals len(data) when error is None.
    """

    records: list[Record | SnapshotEnd]
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


def decode_payload(body: bytes) -> Record | SnapshotEnd:
    """Decode one record payload (checksum already verified). Raises MalformedRecord."""
    try:
        kind = body[0]
        if kind == T_JOB_PUT:
            return JobPut(_decode_job(body))
        if kind == T_JOB_STATUS:
            _t, code, updated_at, attempts, id_len, out_len = _JOB_STATUS.unpack_from(body, 0)
            start = _JOB_STATUS.size
            if start + id_len + out_len != len(body):
                raise MalformedRecord("JobStatus field lengths do not add up to the frame length")
            status = _STATUS_BY_CODE[code]
            if status is None:
                raise MalformedRecord(f"unknown status code {code}")
            return JobStatus(
                body[start : start + id_len].decode(),
                status,
                attempts,
                _outcome(body[start + id_len :]),
                updated_at,
            )
        if kind == T_JOB_DELETE:
            return JobDelete(body[1:].decode())
        if kind == T_RULE_PUT:
            doc = json.loads(body[1:])
            return RulePut(
                Rule(
                    id=doc["id"],
                    pattern=doc["pattern"],
                    runner=_decode_runner(doc["runner"]),
                    policy=RulePolicy(**doc["policy"]),
                )
            )
        if kind == T_RULE_DELETE:
            return RuleDelete(body[1:].decode())
        if kind == T_SNAPSHOT_END:
            if len(body) != _SNAPSHOT_END.size:
                raise MalformedRecord("SnapshotEnd has the wrong length")
            _t, jobs, rules = _SNAPSHOT_END.unpack(body)
            return SnapshotEnd(jobs, rules)
        raise MalformedRecord(f"unknown record type {kind}")
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
    status = _STATUS_BY_CODE[code]
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


def _plausible_prefix(data: bytes | memoryview, offset: int, length: int) -> str | None:
    """Check the start of an incomplete frame against its length field.

    A torn write leaves a prefix of a real frame; a corrupted length field in the
    middle of a file also looks "incomplete" when it points past the end. Job
    records carry their own field lengths, so when enough of the record header is
    present we can tell the two apart. Returns a reason if the prefix is not
    plausible, None if it is.
    """
    start = offset + FRAME_SIZE
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
    elif kind in (T_JOB_PUT, T_JOB_STATUS, T_JOB_DELETE, T_RULE_PUT, T_RULE_DELETE):
        return None
    else:
        return f"unknown record type {kind} in an incomplete frame"
    if expected != length:
        return f"frame length {length} disagrees with its record header ({expected})"
    return None


def decode_frame(data: bytes, pos: int) -> tuple[Record | SnapshotEnd, int] | FrameError:
    """Decode the frame at `pos`: (record, offset after it), or what is wrong with it."""
    size = len(data)
    if size - pos < FRAME_SIZE:
        return FrameError(pos, f"frame header cut after {size - pos} of {FRAME_SIZE} bytes", True)
    length, crc = FRAME.unpack_from(data, pos)
    start = pos + FRAME_SIZE
    end = start + length
    if length == 0:
        return FrameError(pos, "empty frame (length 0)", False)
    if length > MAX_PAYLOAD_BYTES:
        return FrameError(pos, f"frame length {length} is impossibly large", False)
    if end > size:
        reason = _plausible_prefix(data, pos, length)
        if reason is not None:
            return FrameError(pos, reason, False)
        return FrameError(pos, f"frame of {length} bytes cut after {size - start} bytes", True)
    body = data[start:end]
    if _crc32(body) != crc:
        return FrameError(pos, "checksum mismatch", False)
    try:
        return decode_payload(body), end
    except MalformedRecord as exc:
        return FrameError(pos, str(exc), False)


def decode_records(data: bytes | memoryview, offset: int = 0) -> DecodeResult:
    """Decode consecutive frames of `data` from `offset` until the end or the first bad frame.

    Never raises for bad input: the result says how far the good frames go
    (`end`) and, if decoding stopped early, which frame is bad and why. Whether an
    incomplete frame is a torn tail (cut it) or corruption (refuse to start) is
    the caller's decision, since only the caller knows if this is the end of the
    last file.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    records: list[Record | SnapshotEnd] = []
    pos = offset
    while pos < len(data):
        result = decode_frame(data, pos)
        if isinstance(result, FrameError):
            return DecodeResult(records, pos, result)
        record, pos = result
        records.append(record)
    return DecodeResult(records, pos, None)


# -- applying records to state --------------------------------------------------


def apply_record(jobs: dict[str, Job], rules: dict[str, Rule], record: Record) -> bool:
    """Apply one record to the state; False if it is a JobStatus for an unknown job."""
    kind = type(record)
    if kind is JobPut:
        job = record.job  # type: ignore[union-attr]
        jobs[job.id] = job
    elif kind is JobStatus:
        r: JobStatus = record  # type: ignore[assignment]
        old = jobs.get(r.id)
        if old is None:
            return False
        jobs[r.id] = make_job(
            old.id, old.execute_at, r.status, old.payload, r.attempts, r.last_outcome, r.updated_at
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
_FRAMED_JOB_PUT = struct.Struct("<II" + _JOB_PUT.format[1:])
_FRAMED_JOB_PUT_SIZE = _FRAMED_JOB_PUT.size


def replay_into(
    data: bytes, offset: int, jobs: dict[str, Job], rules: dict[str, Rule]
) -> ReplayResult:
    """Decode frames of `data` from `offset` and apply them to `jobs` and `rules` in place.

    Same stopping rules as decode_records (it stops at the first bad or
    incomplete frame and reports it), but JobPut frames, which are almost all of
    a log or snapshot, are decoded inline without intermediate objects. Stops
    after a SnapshotEnd record.
    """
    size = len(data)
    pos = offset
    count = 0
    orphans = 0
    crc32 = _crc32
    unpack = _FRAMED_JOB_PUT.unpack_from
    head = _FRAMED_JOB_PUT_SIZE
    last_head = size - head
    by_code = _STATUS_BY_CODE
    outcome = _outcome
    new = Job.__new__
    (
        set_id,
        set_execute_at,
        set_status,
        set_payload,
        set_attempts,
        set_last_outcome,
        set_updated_at,
    ) = JOB_SLOT_SETTERS
    while pos < size:
        if pos <= last_head:
            length, crc, kind, code, execute_at, updated_at, attempts, id_len, pl_len, out_len = (
                unpack(data, pos)
            )
            end = pos + FRAME_SIZE + length
            if (
                kind == 1  # T_JOB_PUT
                and end <= size
                and 34 + id_len + pl_len + out_len == length  # 34 = _JOB_PUT.size
                and 0 < code < 5
                and crc32(data[pos + FRAME_SIZE : end]) == crc
            ):
                a = pos + head
                b = a + id_len
                c = b + pl_len
                try:
                    job_id = data[a:b].decode()
                    last = outcome(data[c:end]) if out_len else ""
                except UnicodeDecodeError:
                    return ReplayResult(
                        pos, FrameError(pos, "invalid UTF-8 in a JobPut", False), count, orphans
                    )
                job = new(Job)
                set_id(job, job_id)
                set_execute_at(job, execute_at)
                set_status(job, by_code[code])
                set_payload(job, data[b:c] if pl_len else b"")
                set_attempts(job, attempts)
                set_last_outcome(job, last)
                set_updated_at(job, updated_at)
                jobs[job_id] = job
                count += 1
                pos = end
                continue
        # Anything else (other record types, errors, the last few bytes): the general path.
        result = decode_frame(data, pos)
        if isinstance(result, FrameError):
            return ReplayResult(pos, result, count, orphans)
        record, end = result
        if isinstance(record, SnapshotEnd):
            return ReplayResult(end, None, count, orphans, record)
        count += 1
        if not apply_record(jobs, rules, record):
            orphans += 1
        pos = end
    return ReplayResult(pos, None, count, orphans)
