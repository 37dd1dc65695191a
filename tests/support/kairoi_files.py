"""Write Kairoi's log files for tests, byte by byte as Kairoi's encoder does.

Written from Kairoi's source (src/database/storage/persistence/encoder.rs and
logfile/encoding.rs), independently of kairoi_trio.migration.kairoi_log, so
that a test of the reader is not a test of the reader against itself. All
numbers are big-endian; a frame is `u32 length | entry`.
"""

from __future__ import annotations

import struct
from pathlib import Path

STATUS = {"planned": 0, "triggered": 1, "executed": 2, "failed": 3}


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw)) + raw


def frame(entry: bytes) -> bytes:
    return struct.pack(">I", len(entry)) + entry


def job(job_id: str | bytes, execute_at_ns: int, status: str | int = "planned") -> bytes:
    """A framed job entry: type 0, id, i64 ns since the epoch, status byte."""
    code = STATUS[status] if isinstance(status, str) else status
    return frame(b"\x00" + string(job_id) + struct.pack(">qB", execute_at_ns, code))


def shell_rule(rule_id: str | bytes, pattern: str | bytes, command: str | bytes) -> bytes:
    """A framed rule entry with a shell runner (runner type 0)."""
    return frame(b"\x01" + string(rule_id) + string(pattern) + b"\x00" + string(command))


def amqp_rule(rule_id: str, pattern: str, dsn: str, exchange: str, routing_key: str) -> bytes:
    """A framed rule entry with an amqp runner (runner type 1)."""
    runner = b"\x01" + string(dsn) + string(exchange) + string(routing_key)
    return frame(b"\x01" + string(rule_id) + string(pattern) + runner)


def seconds(text: str) -> int:
    """'YYYY-MM-DD HH:MM:SS' (UTC) -> nanoseconds since the epoch, as Kairoi stores it."""
    from datetime import UTC, datetime

    dt = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000


def write(directory: Path, name: str, *entries: bytes) -> Path:
    """Write `entries` (already framed, or raw bytes) as Kairoi's file `name` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"".join(entries))
    return path
