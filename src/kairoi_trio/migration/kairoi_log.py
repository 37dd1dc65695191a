"""Kairoi's log files, read: a sans-io parser (bytes in, entries out, with file offsets).

Source of the format: Kairoi's own code (github.com/emerick42/kairoi),
src/database/storage/persistence/logfile/encoding.rs (the framing) and
src/database/storage/persistence/encoder.rs (the entries). Every number below
is big-endian.

A log file is a sequence of frames, each `u32 length | length bytes`. The
bytes of a frame are one entry:

    job:   u8 0 | str id | i64 execution time, ns since the Unix epoch | u8 status
    rule:  u8 1 | str id | str pattern | u8 runner | runner fields
           runner 0 (shell): str command
           runner 1 (amqp):  str dsn | str exchange | str routing key
    str:   u16 length | that many bytes of UTF-8
    status: 0 planned, 1 triggered, 2 executed, 3 failed

An entry must use up its frame exactly (Kairoi decodes with nom's
`all_consuming`), and an empty frame is not an entry. There is no checksum.

Kairoi keeps three such files in the directory it runs in (see
`persistence/mod.rs`): `logfile` (the appends), `logfile.to_compress` (the
previous `logfile`, renamed when it reached 5,000 entries, waiting for the
background compaction) and `logfile.compressed` (the compacted entries: the
latest entry of every job and rule, deduplicated; "compressed" means that, not
a compression codec). It reads them in the order of `KAIROI_LOG_FILES`, and the
latest entry of a job or rule wins (jobs and rules have separate ids).

`LogfileParser` turns the bytes of one file into entries. Whether a damaged
end is a torn write to skip or an error is the caller's decision (it knows
which file is the last one); the parser only says which of the two it can be.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kairoi_trio.model import AmqpRunner, ShellRunner, Status

# The order Kairoi reads them in at start-up: older entries first.
KAIROI_LOG_FILES = ("logfile.compressed", "logfile.to_compress", "logfile")
# The temporary output of an unfinished compaction; Kairoi itself never reads it.
KAIROI_COMPACTION_TMP = "logfile.compressing"

ENTRY_JOB = 0
ENTRY_RULE = 1
RUNNER_SHELL = 0
RUNNER_AMQP = 1
STATUSES = (Status.PLANNED, Status.TRIGGERED, Status.EXECUTED, Status.FAILED)

_LENGTH = struct.Struct(">I")
_JOB_HEAD = struct.Struct(">IBH")  # frame length, entry type, id length: one unpack per job
_STR_LEN = struct.Struct(">H")
_TIME_STATUS = struct.Struct(">qB")
_MAX_STR = 0xFFFF
# The largest entry Kairoi can write: a rule with five strings of 65,535 bytes.
# A frame length above it can only be damage, so the parser never buffers more.
MAX_JOB_ENTRY = 1 + 2 + _MAX_STR + 8 + 1
MAX_ENTRY = 1 + 2 * (2 + _MAX_STR) + 1 + 3 * (2 + _MAX_STR)


# Entries are not frozen: a frozen dataclass's __init__ costs several times as
# much, and a big file holds millions of them. Nothing changes them after parsing.


@dataclass(slots=True)
class KairoiJob:
    """One job entry. execute_at_ns: signed nanoseconds since the epoch, UTC.

    source and offset: the file it was read from and the offset of its frame's
    length field in that file.
    """

    id: str
    execute_at_ns: int
    status: Status
    source: str = field(default="", compare=False)
    offset: int = field(default=0, compare=False)


@dataclass(slots=True)
class KairoiRule:
    """One rule entry (Kairoi's runners are shell and amqp only)."""

    id: str
    pattern: str
    runner: ShellRunner | AmqpRunner
    source: str = field(default="", compare=False)
    offset: int = field(default=0, compare=False)


KairoiEntry = KairoiJob | KairoiRule


class KairoiFormatError(ValueError):
    """Bytes that Kairoi cannot have written: damage. str() names source, offset and cause."""

    def __init__(self, source: str, offset: int, reason: str) -> None:
        self.source = source
        self.offset = offset
        self.reason = reason
        where = f"{source}: " if source else ""
        super().__init__(f"{where}offset {offset}: {reason}")


@dataclass(frozen=True, slots=True)
class TornEntry:
    """The file ends inside an entry whose bytes so far are consistent: a write cut short.

    offset: where the unfinished frame starts; size: its bytes up to the end of the file.
    """

    source: str
    offset: int
    size: int
    reason: str


class _Short(Exception):
    """The data ends inside the entry (before its declared length): maybe a torn write."""


class _EntryReader:
    """Reads the fields of one entry that is `declared` bytes long.

    `data` is the entry, or with partial=True a prefix of it. A field that runs
    past `declared` raises ValueError (the reason: Kairoi cannot have written
    it); with partial=True, a field that runs past the data raises _Short, after
    checking that the part of it that is there is consistent.
    """

    __slots__ = ("data", "declared", "partial", "pos")

    def __init__(self, data: bytes | memoryview, declared: int, partial: bool) -> None:
        self.data = data
        self.declared = declared
        self.partial = partial
        self.pos = 0

    def _take(self, size: int, what: str) -> bytes | memoryview:
        end = self.pos + size
        if end > self.declared:
            raise ValueError(f"{what} runs past the end of the entry ({self.declared} bytes long)")
        if end > len(self.data):
            raise _Short
        value = self.data[self.pos : end]
        self.pos = end
        return value

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def time_and_status(self) -> tuple[int, int]:
        time_ns, status = _TIME_STATUS.unpack(self._take(9, "the execution time and status"))
        return time_ns, status

    def string(self, what: str) -> str:
        (size,) = _STR_LEN.unpack(self._take(2, f"the length of the {what}"))
        try:
            raw = bytes(self._take(size, f"the {what} ({size} bytes)"))
            final = True
        except _Short:
            raw = bytes(self.data[self.pos :])
            final = False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            # The end of the data may cut the last character of a torn write in two.
            if final or error.reason != "unexpected end of data":
                raise ValueError(
                    f"the {what} is not valid UTF-8 (byte {error.start} of {size})"
                ) from None
        if not final:
            raise _Short
        return text


def _check_job_length(body: bytes | memoryview, declared: int) -> None:
    """A job's frame length follows from its id's length: ValueError if they disagree.

    Checked as soon as the first 3 bytes are there, so that a damaged length
    field in the middle of a file is not mistaken for a torn write at its end.
    """
    if len(body) >= 3 and body[0] == ENTRY_JOB:
        (id_len,) = _STR_LEN.unpack(body[1:3])
        if 12 + id_len != declared:
            raise ValueError(
                f"frame length {declared} does not fit a job entry with a {id_len}-byte id "
                f"({12 + id_len} bytes)"
            )


def _decode_entry(
    body: bytes | memoryview, declared: int, source: str, offset: int, *, partial: bool = False
) -> KairoiEntry:
    """Decode one entry (the bytes of a frame, `declared` bytes long).

    Raises ValueError with the reason when the bytes are not an entry Kairoi
    can have written. With partial=True, `body` may be a prefix of the entry:
    _Short then means "consistent as far as it goes".
    """
    _check_job_length(body, declared)
    reader = _EntryReader(body, declared, partial)
    kind = reader.u8("the entry type")
    entry: KairoiEntry
    if kind == ENTRY_JOB:
        job_id = reader.string("job id")
        time_ns, code = reader.time_and_status()
        if code >= len(STATUSES):
            raise ValueError(f"unknown job status {code} (job {job_id!r})")
        entry = KairoiJob(job_id, time_ns, STATUSES[code], source, offset)
    elif kind == ENTRY_RULE:
        rule_id = reader.string("rule id")
        pattern = reader.string("rule pattern")
        runner_kind = reader.u8("the runner type")
        runner: ShellRunner | AmqpRunner
        if runner_kind == RUNNER_SHELL:
            runner = ShellRunner(reader.string("shell command"))
        elif runner_kind == RUNNER_AMQP:
            runner = AmqpRunner(
                reader.string("amqp dsn"),
                reader.string("amqp exchange"),
                reader.string("amqp routing key"),
            )
        else:
            raise ValueError(f"unknown runner type {runner_kind} (rule {rule_id!r})")
        entry = KairoiRule(rule_id, pattern, runner, source, offset)
    else:
        raise ValueError(f"unknown entry type {kind} (0 is a job, 1 a rule)")
    if reader.pos != declared:
        what = "job" if kind == ENTRY_JOB else "rule"
        raise ValueError(f"{declared - reader.pos} bytes after the end of the {what} entry")
    return entry


class LogfileParser:
    """Parses one Kairoi log file, fed in chunks of any size.

        parser = LogfileParser("logfile")
        for chunk in chunks:
            entries.extend(parser.feed(chunk))   # KairoiFormatError on damage
        torn = parser.close()                     # TornEntry | None; KairoiFormatError

    Buffers at most one entry (MAX_ENTRY bytes) plus the chunk being parsed.
    A frame of length 0 followed only by zero bytes to the end of the file is
    reported by close() as a torn end (space a crash allocated but never
    wrote); anything after it that is not zero makes it damage.
    """

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._buffer = b""
        self._base = 0  # file offset of _buffer[0]
        self._zeros_from: int | None = None  # offset of a run of zero bytes, if in one
        self.entries = 0
        self._closed = False

    @property
    def offset(self) -> int:
        """Bytes fed so far (the file offset of the next byte)."""
        return self._base + len(self._buffer)

    def _error(self, offset: int, reason: str) -> KairoiFormatError:
        return KairoiFormatError(self.source, offset, reason)

    def feed(self, data: bytes) -> list[KairoiEntry]:
        """Parse `data` (the next bytes of the file); return the entries it completes, in order.

        Raises KairoiFormatError (with the file offset of the bad frame) on bytes
        Kairoi cannot have written; the parser is unusable afterwards.
        """
        if self._closed:
            raise RuntimeError("LogfileParser.feed() after close()")
        if self._zeros_from is not None:
            if data.count(0) != len(data):
                raise self._error(self._zeros_from, "empty entry (frame length 0)")
            self._base += len(data)
            return []
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        base = self._base
        source = self.source
        entries: list[KairoiEntry] = []
        append = entries.append
        unpack_length = _LENGTH.unpack_from
        unpack_head = _JOB_HEAD.unpack_from
        unpack_time = _TIME_STATUS.unpack_from
        statuses = STATUSES
        pos = 0
        while size - pos >= 4:
            # The fast path: a well-formed job, nearly every entry of a big file.
            if size - pos >= 16:
                length, kind, id_len = unpack_head(buffer, pos)
                end = pos + 4 + length
                if kind == ENTRY_JOB and length == 12 + id_len and end <= size:
                    time_ns, code = unpack_time(buffer, end - 9)
                    if code < 4:
                        try:
                            job_id = buffer[pos + 7 : end - 9].decode("utf-8")
                        except UnicodeDecodeError:
                            pass  # the general path says where
                        else:
                            append(KairoiJob(job_id, time_ns, statuses[code], source, base + pos))
                            pos = end
                            continue
            (length,) = unpack_length(buffer, pos)
            start = pos + 4
            end = start + length
            if length == 0:
                if buffer.count(0, pos) == size - pos:
                    self._zeros_from = base + pos
                    self._base = base + size
                    self._buffer = b""
                    self.entries += len(entries)
                    return entries
                raise self._error(base + pos, "empty entry (frame length 0)")
            if length > MAX_ENTRY:
                raise self._error(
                    base + pos,
                    f"frame length {length} is larger than any entry (at most {MAX_ENTRY} bytes)",
                )
            if end > size:
                try:  # fail early on a length that cannot be a job's
                    _check_job_length(buffer[start : start + 3], length)
                except ValueError as error:
                    raise self._error(base + pos, str(error)) from None
                break
            try:
                append(_decode_entry(buffer[start:end], length, source, base + pos))
            except ValueError as error:
                raise self._error(base + pos, str(error)) from None
            pos = end
        self._buffer = buffer[pos:]
        self._base = base + pos
        self.entries += len(entries)
        return entries

    def close(self) -> TornEntry | None:
        """The end of the file: None if it ended after a whole entry.

        Else a TornEntry if the unfinished bytes are a consistent beginning of an
        entry (or zeros only); KairoiFormatError if they cannot be.
        """
        self._closed = True
        if self._zeros_from is not None:
            return TornEntry(
                self.source,
                self._zeros_from,
                self._base - self._zeros_from,
                "zero bytes to the end of the file (space allocated but never written)",
            )
        rest = self._buffer
        if not rest:
            return None
        offset = self._base
        if len(rest) < 4:
            return TornEntry(
                self.source, offset, len(rest), f"frame length cut after {len(rest)} of 4 bytes"
            )
        (length,) = _LENGTH.unpack_from(rest, 0)
        body = rest[4:]
        try:
            _decode_entry(body, length, self.source, offset, partial=True)
        except ValueError as error:
            raise self._error(
                offset, f"{error} (in an entry cut short by the end of the file)"
            ) from None
        except _Short:
            pass  # consistent as far as it goes: the write was cut short
        return TornEntry(
            self.source,
            offset,
            len(rest),
            f"{len(body)} of the entry's {length} bytes are there",
        )


@dataclass
class KairoiState:
    """The latest entry of every job and rule, as Kairoi rebuilds it at start-up.

    Feed entries in the order Kairoi reads them (KAIROI_LOG_FILES, each from
    its beginning); a later entry of the same job (or rule) id replaces the earlier.
    """

    jobs: dict[str, KairoiJob] = field(default_factory=dict)
    rules: dict[str, KairoiRule] = field(default_factory=dict)
    entries: int = 0

    def add(self, entries: list[KairoiEntry]) -> None:
        jobs = self.jobs
        rules = self.rules
        for entry in entries:
            if type(entry) is KairoiJob:
                jobs[entry.id] = entry
            else:
                rules[entry.id] = entry  # type: ignore[assignment]
        self.entries += len(entries)
