"""The server's log set-up: JSON lines and their timestamps."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kairoi_trio.observability.logging import BatchedLineWriter, UtcTimestamper


def run_python(program: str) -> subprocess.CompletedProcess[str]:
    """`program` run by this Python in a process of its own: its output as text."""
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )


def test_the_timestamp_is_utc_iso_8601_with_microseconds() -> None:
    stamp = UtcTimestamper()
    for _ in range(3):  # the second's prefix is cached: the same answer each time
        before = datetime.now(UTC)
        text = stamp(None, "info", {})["timestamp"]
        after = datetime.now(UTC)
        assert len(text) == len("2026-11-30T05:04:13.000123Z") and text.endswith("Z")
        when = datetime.fromisoformat(text)
        assert before - timedelta(microseconds=1) <= when <= after
        time.sleep(0.3)


def test_the_cached_second_moves_on() -> None:
    stamp = UtcTimestamper()
    first = datetime.fromisoformat(stamp(None, "info", {})["timestamp"])
    time.sleep(1.1)
    second = datetime.fromisoformat(stamp(None, "info", {})["timestamp"])
    assert second - first >= timedelta(seconds=1.1)


PROGRAM = """
import structlog
from kairoi_trio.observability.logging import configure_logging
configure_logging("info", "json")
log = structlog.get_logger()
log.info("job run", job="a.1", ok=True, seconds=0.25, attempt=2, when=object())
log.debug("below the level")
log.warning("second", text="é\\nnewline")
"""


def test_json_lines_one_object_each_on_stderr() -> None:
    done = run_python(PROGRAM)
    first, second = (json.loads(line) for line in done.stderr.splitlines())
    assert first["event"] == "job run" and first["level"] == "info"
    assert (first["job"], first["ok"], first["seconds"], first["attempt"]) == ("a.1", True, 0.25, 2)
    assert first["when"].startswith("<object object at")  # what JSON cannot hold is its repr
    assert datetime.fromisoformat(first["timestamp"]) <= datetime.now(UTC)
    assert second["text"] == "é\nnewline" and second["level"] == "warning"


BATCHED = """
import logging, structlog
from kairoi_trio.observability.logging import configure_logging
close = configure_logging("info", "{fmt}", batched=True)
log = structlog.get_logger()
for n in range(5000):
    log.info("job run", n=n)
    if n % 1000 == 0:
        logging.getLogger("library").warning("library line %d", n)
close()
log.info("after close", n=5000)
"""


def test_batched_lines_all_arrive_in_order_with_the_librarys_in_their_place() -> None:
    for fmt in ("json", "console"):
        done = run_python(BATCHED.format(fmt=fmt))
        lines = done.stderr.splitlines()
        assert len(lines) == 5000 + 5 + 1, lines[-3:]
        numbers = [
            int(line.split("n=")[-1]) if fmt == "console" else json.loads(line)["n"]
            for line in lines
            if "library line" not in line
        ]
        assert numbers == list(range(5001))  # every line, in order, the one after close too
        for k in range(5):  # each library line right after the structlog line it followed
            at = next(i for i, line in enumerate(lines) if f"library line {k * 1000}" in line)
            assert f"{k * 1000}" in lines[at - 1]


SLOW_READER = """
import os, signal, structlog, sys
from kairoi_trio.observability.logging import configure_logging
signal.signal(signal.SIGUSR1, lambda *_: None)  # a handler: its signal interrupts write(2)
if {nonblocking}:
    os.set_blocking(2, False)  # as a parent that shares its pipe non-blocking may leave it
close = configure_logging("info", "{fmt}", batched={batched})
if {batched}:  # the signals go to the thread that writes (started above, it is not masked)
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
print("go", flush=True)
log = structlog.get_logger()
for n in range({lines}):
    log.info("job run", n=n, pad="x" * {pad})
close()
os.close(2)  # the end of the lines for the reader; exit once it stopped the signals
sys.stdin.read()
"""


def _console_n(line: str) -> str:
    """The n of a console line "... [info     ] job run    n=12 pad=xxx...x"."""
    match = re.fullmatch(r".* n=(\d+) pad=x+", line)
    assert match is not None, line
    return match[1]


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize(
    ("batched", "nonblocking"), [(True, False), (False, False), (True, True), (False, True)]
)
def test_a_slow_reader_and_signals_lose_no_line_and_cut_none(
    batched: bool, nonblocking: bool, fmt: str
) -> None:
    """stderr's binary layer is raw: one write(2) may take part of a batch (a signal
    interrupting a write to a full pipe: SIGTERM at shutdown, a profiler) or none (a
    non-blocking pipe). The rest must still be written, whole lines only."""
    lines = 20_000 if batched else 1_500
    pad = 100 if batched else 6_000  # one line > PIPE_BUF: a write of it can be cut
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_READER.format(
                batched=batched, nonblocking=nonblocking, lines=lines, pad=pad, fmt=fmt
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        assert child.stdout.readline() == b"go\n"
        stop = threading.Event()

        def pester() -> None:
            while not stop.is_set():
                child.send_signal(signal.SIGUSR1)
                time.sleep(0.0005)

        pesterer = threading.Thread(target=pester, daemon=True)
        pesterer.start()
        received = bytearray()
        assert isinstance(child.stderr, io.BufferedReader)  # (has read1: Popen's default)
        while chunk := child.stderr.read1(4096):  # slowly: the pipe stays full
            received += chunk
            time.sleep(0.0002)
        stop.set()
        pesterer.join()
        child.stdin.close()
        assert child.wait(30) == 0
    finally:
        child.kill()
        child.wait()
    text = bytes(received).decode()
    if fmt == "json":
        numbers = [json.loads(line)["n"] for line in text.splitlines()]
    else:  # "... [info     ] job run    n=12 pad=xxx...x"
        numbers = [int(_console_n(line)) for line in text.splitlines()]
    assert numbers == list(range(lines))


WRITES = """
import io, json, logging, structlog, sys
from kairoi_trio.observability.logging import configure_logging
class Raw(io.RawIOBase):  # stderr's binary layer, recording each write(2) it is given
    calls = []
    def writable(self): return True
    def write(self, data): self.calls.append(bytes(data).decode()); return len(data)
out, sys.stderr = sys.stderr, io.TextIOWrapper(Raw())
configure_logging("info", "{fmt}")
for n in range(3):
    structlog.get_logger().warning("line", n=n)
    logging.getLogger("library").warning("library line %d", n)
print(json.dumps(Raw.calls))
"""


def test_unbatched_lines_go_out_whole_one_write_each() -> None:
    """A line and its newline in one write: in two, another writer of the same
    stderr (a process sharing it, gRPC's core) can put its own bytes between them."""
    for fmt in ("json", "console"):
        done = run_python(WRITES.format(fmt=fmt))
        writes = json.loads(done.stdout)
        assert len(writes) == 6, (fmt, writes)
        assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes), (fmt, writes)


def test_a_reader_that_stops_reading_holds_callers_back_and_loses_nothing() -> None:
    read_end, write_end = os.pipe()
    writer = BatchedLineWriter(os.fdopen(write_end, "wb"), limit_bytes=64 << 10)
    line = b"x" * 1023 + b"\n"
    written = 0
    done = threading.Event()

    def produce() -> None:
        nonlocal written
        for _ in range(1000):  # 1 MB: more than the pipe (64 KiB) and the limit hold
            writer.write(line)
            written += 1
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.5)
    assert not done.is_set() and written < 1000  # held back, not buffered without end
    received = bytearray()
    with os.fdopen(read_end, "rb") as reader:
        while len(received) < 1000 * len(line):
            received += reader.read1(1 << 20)
        assert done.wait(10)
        writer.close()
    assert bytes(received) == line * 1000


def test_a_closed_stderr_does_not_fail_the_caller() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    writer = BatchedLineWriter(os.fdopen(write_end, "wb"))
    for _ in range(100):
        writer.write(b"line\n")  # EPIPE in the writer thread: dropped, never raised here
    writer.close()
    writer.write(b"after close\n")  # written by the caller: the error is dropped too


def test_the_json_line_is_what_structlogs_own_chain_renders() -> None:
    """JsonLine (one processor) against add_log_level, the timestamper,
    format_exc_info and JSONRenderer(orjson) in a row: the same bytes, warn and
    exception levels, a traceback and an object JSON cannot hold included."""
    import orjson
    import structlog

    from kairoi_trio.observability.logging import JsonLine

    class Frozen(UtcTimestamper):
        def __call__(self, logger: object, method: str, event: dict) -> dict:  # type: ignore[override]
            event["timestamp"] = "2026-11-30T00:00:00.000000Z"
            return event

    chain: list[Any] = [
        structlog.processors.add_log_level,
        Frozen(),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=orjson.dumps),
    ]
    try:
        raise ValueError("boom")
    except ValueError as error:
        caught = error
    events: list[tuple[str, dict[str, Any]]] = [
        ("info", {"event": "job run", "job": "a.1", "ok": True, "when": object}),
        ("warn", {"event": "w", "text": "é\nx"}),
        ("exception", {"event": "crash", "exc_info": caught}),
        ("error", {"event": "e", "exc_info": False}),
    ]
    for method, event in events:
        expected: Any = dict(event)
        for step in chain:
            expected = step(None, method, expected)
        got = JsonLine(Frozen())(None, method, dict(event))
        assert got == expected, method


INFO_LINE = """
import structlog
from kairoi_trio.observability.logging import InfoLine, configure_logging
close = configure_logging("{level}", "{fmt}", batched={batched})
log = structlog.get_logger("kairoi_trio.runners.pool")
line = InfoLine(log)
fields = dict(job="a.1", rule="r", kind="amqp", ok=True, outcome="é", seconds=0.25, attempt=2)
log.info("job run", **fields)
line("job run", dict(fields))
close()
"""


def test_info_line_writes_what_structlog_would_whatever_the_configuration() -> None:
    """The direct path (JSON through the batched writer) and the fallback (console,
    unbatched, a level above info) give the bytes `logger.info` gives, timestamps aside."""
    for level, fmt, batched in (
        ("info", "json", True),
        ("debug", "json", True),
        ("info", "json", False),
        ("info", "console", True),
        ("warn", "json", True),
    ):
        done = run_python(INFO_LINE.format(level=level, fmt=fmt, batched=batched))
        lines = done.stderr.splitlines()
        if level == "warn":
            assert lines == []
            continue
        assert len(lines) == 2, (level, fmt, batched, lines)
        if fmt == "json":
            first, second = (json.loads(line) for line in lines)
            assert datetime.fromisoformat(second["timestamp"]) >= datetime.fromisoformat(
                first["timestamp"]
            )
            del first["timestamp"], second["timestamp"]
            assert list(first.items()) == list(second.items())  # the keys' order too
        else:
            assert lines[0][27:] == lines[1][27:]  # after the console's timestamp
