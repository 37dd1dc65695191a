"""The open-files limit (RLIMIT_NOFILE) at start-up: raised as far as allowed, checked.

Every KCP, gRPC and HTTP connection, shell run and broker connection holds a
descriptor. Many systems start services with a soft limit of 1024
(and a hard limit far above), which the default `max_connections = 1024`
alone exceeds: at about 1,000 connections accept failed with EMFILE, new
clients hung and /metrics went dark. The soft limit may be raised up to the
hard limit without privileges, so the server does that first, then warns when
what the configuration allows still does not fit.
"""

from __future__ import annotations

import resource

import structlog

from kairoi_trio.config import Config

log = structlog.get_logger(__name__)

# Descriptors the process uses whatever the load: stdio, the listeners, the event
# loop's own, the data directory's lock and segments. A margin, not a count.
BASE_OPEN_FILES = 128
SHELL_RUN_FILES = 3  # a run's output pipe, payload file and process handle
# Where the hard limit is "unlimited", the soft one cannot be: the kernel's
# per-process maximum (fs.nr_open) is 1,048,576 by default.
UNLIMITED_CAP = 1 << 20


def needed_open_files(config: Config) -> int:
    """Descriptors the configuration may hold at once: one per KCP, gRPC (if
    enabled) and HTTP connection, per running shell script (SHELL_RUN_FILES), per
    broker connection and HTTP runner request, plus BASE_OPEN_FILES."""
    runners = config.runners
    return (
        config.controller.max_connections
        + (config.grpc.max_connections if config.grpc.enabled else 0)
        + (config.http.max_connections if config.http.enabled else 0)
        + runners.shell.concurrency * SHELL_RUN_FILES
        + runners.amqp.max_connections
        + runners.http.concurrency
        + BASE_OPEN_FILES
    )


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, soft, hard).

    Never raises: a limit that cannot be changed is left as it is.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else UNLIMITED_CAP
    if before == resource.RLIM_INFINITY or before >= target:
        return before, before, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return before, before, hard
    return before, target, hard


def check_open_files(config: Config) -> None:
    """At start-up: raise the soft limit, log the limits, warn when the configuration
    does not fit in them (see needed_open_files)."""
    before, soft, hard = raise_open_files_limit()
    needed = needed_open_files(config)
    log.info(
        "open files limit",
        soft=soft,
        hard=hard if hard != resource.RLIM_INFINITY else "unlimited",
        raised_from=before if before != soft else None,
        needed=needed,
    )
    if soft != resource.RLIM_INFINITY and needed > soft:
        log.warning(
            "open files limit too low for the configuration",
            limit=soft,
            needed=needed,
            max_connections=config.controller.max_connections,
            hint="raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower "
            "controller.max_connections, grpc.max_connections or the runners' "
            "concurrency; past the limit "
            'new clients are refused with "server has too many open files"',
        )
