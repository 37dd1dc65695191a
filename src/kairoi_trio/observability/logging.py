"""structlog set-up: console or JSON lines on stderr, level from config."""

from __future__ import annotations

import logging
import select
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog

# Kairoi's level names (Rust's `log` crate) on Python's numeric levels. `trace`
# also lets libraries' debug lines through; `off` is above every level.
TRACE = logging.NOTSET  # everything
OFF = logging.CRITICAL + 10
_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}


def level_number(level: str) -> int:
    """`[log] level` (any case) -> Python's numeric level; KeyError if unknown."""
    return _LEVELS[level.lower()]


class UtcTimestamper:
    """A structlog processor: `timestamp` = the wall clock in UTC, ISO 8601 with
    microseconds ("2026-11-30T05:04:13.000123Z").

    The same text as structlog's `TimeStamper(fmt="iso", utc=True)` but for the
    microseconds, always six digits here. About 2 µs a line against its ~7: the
    date and time of day are formatted once per second, and the server logs a
    line per job run.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:  # a data race between threads only redoes this
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}


class JsonLine:
    """The server's JSON line in one structlog processor: structlog's
    `add_log_level`, a UtcTimestamper, `format_exc_info` (only when the event
    carries `exc_info`) and `JSONRenderer(serializer=orjson.dumps)`, in that
    order and with the same output (bytes), as one call instead of four: ~2 µs
    less a line, and the server logs a line per job run."""

    def __init__(self, timestamper: UtcTimestamper) -> None:
        self._timestamper = timestamper
        self._render = structlog.processors.JSONRenderer(serializer=orjson.dumps)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        event["level"] = _LEVEL_OF_METHOD.get(method, method)  # as add_log_level
        self._timestamper(logger, method, event)
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        return self._render(logger, method, event)


class BatchedLineWriter:
    """Log lines written to a binary file by a thread of their own, in batches.

    `write(line)` (any thread: the event loop, gRPC's) appends the line to a list
    and returns; the writer thread writes everything gathered since its last
    write in one write(2). Under load that is one system call for tens of lines
    instead of one each (the server logs a line per job run: ~15% of its CPU went
    to those calls), and the event loop never waits on a slow reader of stderr
    until `limit_bytes` are pending: then writers wait for room (backpressure, no
    line is dropped). Lines keep their order. The first line into an empty list
    wakes the thread; within `linger_s` (5 ms) of its last write (a burst) it
    waits that long for more before it writes, else it writes at once: a line is
    out within microseconds on a quiet server and about 5 ms in a burst, and a
    SIGKILL loses at most the lines of the batch being gathered.

    `close()` writes what is pending and stops the thread; later lines are written
    at once by their caller. A failing write (stderr closed) drops its batch:
    nothing else could report it, and the server must not stop for it.
    """

    def __init__(
        self, file: BinaryIO, *, limit_bytes: int = 8 << 20, linger_s: float = 0.005
    ) -> None:
        self._file = file
        self._limit = limit_bytes
        self._linger = linger_s
        self._last_write = -linger_s  # monotonic time of the last write
        self._lines: list[bytes] = []
        self._pending = 0  # bytes in _lines
        self._closed = False
        lock = threading.Lock()
        self._ready = threading.Condition(lock)  # the writer waits for lines
        self._room = threading.Condition(lock)  # callers wait below the limit
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one line (its newline included)."""
        with self._ready:
            while self._pending >= self._limit and not self._closed:
                self._room.wait()
            if self._closed:
                self._write_now([line])
                return
            self._lines.append(line)
            self._pending += len(line)
            if len(self._lines) == 1:
                self._ready.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop the thread (waiting up to `timeout` s
        for a reader that does not read)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
            self._room.notify_all()
        self._thread.join(timeout)

    def _drain(self) -> None:
        while True:
            with self._ready:
                while not self._lines and not self._closed:
                    self._ready.wait()
                if not self._lines:
                    return
            # Woken by a first line within `linger` of the last write: a burst. Let
            # more gather before writing; else the thread takes each line as it
            # comes, and every next line wakes it again (a futex and a GIL
            # hand-off per line: 6-17% of the server's CPU in a burst of runs).
            # After a quiet spell the line goes out at once.
            if time.monotonic() - self._last_write < self._linger:
                time.sleep(self._linger)
            with self._ready:
                lines, self._lines, self._pending = self._lines, [], 0
                self._room.notify_all()
            self._write_now(lines)
            self._last_write = time.monotonic()

    def _write_now(self, lines: list[bytes]) -> None:
        try:
            write_all(self._file, b"".join(lines))
        except (OSError, ValueError):  # a closed pipe or file
            pass


# How long write_all waits at a time for a full non-blocking pipe to take more (s).
_WRITABLE_WAIT_S = 1.0


def write_all(file: BinaryIO, data: bytes) -> None:
    """Write all of `data` to `file`, then flush it.

    stderr's binary layer is a raw FileIO: one write(2), which may take only part
    of `data` when a signal (SIGTERM, a profiler's ptrace stop) interrupts a
    write to a full pipe, and none (None, or BlockingIOError from a buffered
    layer) when the pipe is non-blocking and full. Either way the rest is
    written, after waiting for the pipe to take more: a line is never cut.
    Raises OSError (a closed pipe: EPIPE) and ValueError (a closed file).
    """
    view = memoryview(data)
    while view:
        try:
            written = file.write(view)
        except BlockingIOError as error:
            written = error.characters_written
        if not written:  # a full non-blocking pipe: wait until it takes more
            select.select([], [file], [], _WRITABLE_WAIT_S)
            continue
        view = view[written:]
    file.flush()


class WholeWrites:
    """A file on `file` (binary) whose write() writes all it is given (write_all):
    bytes as they are, text as UTF-8. For the unbatched loggers on stderr's raw
    layer (a text stream over it drops what a partial write left out: CPython's
    TextIOWrapper does not look at the count)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        # A thread's line is not cut by another's (reentrant: a signal handler may log).
        self._lock = threading.RLock()

    def write(self, data: bytes | str) -> int:
        if isinstance(data, str):
            data = data.encode("utf-8", "backslashreplace")
        with self._lock:
            write_all(self._file, data)
        return len(data)

    def flush(self) -> None:
        pass  # write_all flushed


class _LineLogger:
    """structlog's logger on a BatchedLineWriter or a WholeWrites: every method
    writes the rendered event (str or bytes) and its newline in one write."""

    def __init__(self, writer: BatchedLineWriter | WholeWrites) -> None:
        self._writer = writer

    def msg(self, message: str | bytes) -> None:
        if isinstance(message, str):
            message = message.encode("utf-8", "backslashreplace")
        self._writer.write(message + b"\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LineStream:
    """A text stream for the standard library's StreamHandler, on the same writer
    (so that library lines keep their place among the server's)."""

    def __init__(self, writer: BatchedLineWriter) -> None:
        self._writer = writer

    def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8", "backslashreplace"))

    def flush(self) -> None:
        pass


# Set by configure_logging when JSON lines go through a BatchedLineWriter: the
# renderer and the writer, for `InfoLine`'s direct path.
_direct: tuple[JsonLine, BatchedLineWriter] | None = None


class InfoLine:
    """An info event logged once per job (the pool's "job run"), at a third of the cost.

    `line(event, fields)` writes the same bytes as `logger.info(event, **fields)`
    would with the server's configuration (JSON lines through a BatchedLineWriter,
    level info or lower): `fields` plus `event`, then JsonLine's level and
    timestamp, in that order (structlog puts `event` after the keywords). It skips
    structlog's proxy, its filtering method, the context copy and the processor
    loop: ~4 µs a line instead of ~12. With any other configuration (console
    lines, a level above info, a test's capture) it calls `logger.info`.
    `fields` is consumed (the event is added to it).
    """

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        direct = _direct
        if direct is None:
            self._logger.info(event, **fields)
            return
        render, writer = direct
        fields["event"] = event
        writer.write(render(None, "info", fields) + b"\n")


def configure_logging(
    level: str = "info", fmt: str = "console", *, batched: bool = False
) -> Callable[[], None]:
    """Send structlog and the standard library's logging to stderr at `level`.

    level: trace, debug, info, warn (warning), error, critical or off.
    fmt: "console" (human-readable lines) or "json" (one object per line).
    batched: lines go through a BatchedLineWriter (the server: a line per job
    run); else each is written by its caller.
    Returns the function that writes what is pending and stops the writer (call
    it before the process exits; it does nothing when not batched).
    """
    numeric = level_number(level)
    timestamper = UtcTimestamper()
    # JSON lines are rendered by orjson straight to bytes (~10 µs less a line than
    # the json module and a text stream: the server logs a line per job run).
    json_line = JsonLine(timestamper) if fmt == "json" and hasattr(sys.stderr, "buffer") else None
    processors: list[structlog.typing.Processor] = (
        [json_line]
        if json_line is not None
        else [
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer()  # a stream of text only (a test's capture)
            if fmt == "json"
            else structlog.dev.ConsoleRenderer(colors=False),
        ]
    )
    writer = (
        BatchedLineWriter(sys.stderr.buffer)
        if batched and numeric != OFF and hasattr(sys.stderr, "buffer")
        else None
    )
    whole = WholeWrites(sys.stderr.buffer) if hasattr(sys.stderr, "buffer") else None
    factory: Any
    if numeric == OFF:
        factory = structlog.ReturnLoggerFactory()
    elif writer is not None:
        logger = _LineLogger(writer)
        factory = lambda *args: logger  # noqa: E731
    elif whole is not None:
        # A line and its newline in one write (structlog's PrintLogger prints them
        # in two: another writer of stderr could put its bytes between them).
        whole_lines = _LineLogger(whole)
        factory = lambda *args: whole_lines  # noqa: E731
    else:
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        # structlog filters at the standard levels only: `off` keeps the cheapest
        # filter and writes what passes it nowhere.
        wrapper_class=structlog.make_filtering_bound_logger(min(numeric, logging.CRITICAL)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()  # text: the standard library's stream
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Libraries (trio's accept loop, grpc) log through the standard library: their
    # records go through the same renderer, so that with `json` a library's error,
    # traceback included, is one JSON object on one line like every other.
    stream: Any = _LineStream(writer) if writer is not None else whole or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    logging.basicConfig(
        level=numeric if numeric in (TRACE, OFF) else max(numeric, logging.INFO),
        handlers=[handler],
    )
    # httpx logs every request at INFO ("HTTP Request: POST ..."): one more line per
    # run of the http runner, which logs the run itself. Its warnings still show,
    # and at debug and trace so does every request.
    logging.getLogger("httpx").setLevel(
        max(numeric, logging.WARNING) if numeric > logging.DEBUG else numeric
    )
    global _direct
    _direct = None
    if json_line is not None and writer is not None and numeric <= logging.INFO:
        _direct = (json_line, writer)
    return writer.close if writer is not None else lambda: None
