"""structlog set-up: console or JSON lines on stderr, level from config."""

from __future__ import annotations

import logging
import sys

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


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Send structlog and the standard library's logging to stderr at `level`.

    level: trace, debug, info, warn (warning), error, critical or off.
    fmt: "console" (human-readable lines) or "json" (one object per line).
    """
    numeric = level_number(level)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        # structlog filters at the standard levels only: `off` keeps the cheapest
        # filter and writes what passes it nowhere.
        wrapper_class=structlog.make_filtering_bound_logger(min(numeric, logging.CRITICAL)),
        logger_factory=(
            structlog.ReturnLoggerFactory()
            if numeric == OFF
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
    # Libraries (trio's accept loop, grpc) log through the standard library: their
    # records go through the same renderer, so that with `json` a library's error,
    # traceback included, is one JSON object on one line like every other.
    handler = logging.StreamHandler(sys.stderr)
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
