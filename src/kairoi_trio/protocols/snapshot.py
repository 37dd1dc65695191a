"""A watch's snapshot, a page at a time (commands.Subscribe): how gRPC WatchJobs and
the HTTP event stream ask the command actor for each next page, each front end on
its own event loop (asyncio, Trio)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from kairoi_trio.commands import (
    SNAPSHOT_PAGE,
    Command,
    CommandError,
    ErrorCode,
    EventSink,
    JobPage,
    ListJobs,
)

PAGE_RETRY_S = 0.01  # a next page asked again while the actor's queue is full


async def next_page(
    call: Callable[[Command], Awaitable[Any]],
    sleep: Callable[[float], Awaitable[object]],
    prefix: str,
    after: str,
    sink: EventSink,
) -> JobPage:
    """The page of the watch `sink` after id `after`. `call` gives one command's
    result (its CommandError raised), `sleep` is the event loop's. A full actor
    queue is waited out, since the stream has begun and a snapshot cut short would
    end the watch; any other CommandError is raised."""
    while True:
        try:
            page: JobPage = await call(ListJobs(prefix, None, after, SNAPSHOT_PAGE, sink))
            return page
        except CommandError as error:
            if error.code is not ErrorCode.RESOURCE_EXHAUSTED:
                raise
        await sleep(PAGE_RETRY_S)
