"""Accept loops that answer, rather than hang, when the process runs out of file descriptors.

`trio.serve_listeners` meets EMFILE ("too many open files") by logging a
traceback and retrying 0.1 s later; meanwhile the connection waits in the
kernel's backlog with no answer, and the log fills with ten tracebacks a second.
`serve_listeners` here keeps one descriptor in reserve (an open /dev/null, the
classic "reserve fd" technique): when accept fails for lack of descriptors, it
closes the reserve, accepts the waiting connection with the freed descriptor,
sends it `refusal` (a line saying why), closes it and opens the reserve again.
So a client learns why at once, and the connection leaves the backlog. When no
descriptor can be freed (the reserve could not be reopened: another part of the
process took it), the loop waits, doubling from 10 ms to 1 s.

An episode (from the first EMFILE to the first accept that works after
EPISODE_QUIET_S without one) is logged twice: a warning when it starts, and a
line with the number of refused connections when it ends (and every minute
while it lasts), never a traceback. The quiet period keeps a process that hovers
at its limit (files opened and closed now and then) from logging an episode for
each descriptor that comes and goes.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import structlog
import trio

log = structlog.get_logger(__name__)

# Errors that say "no descriptor or memory for one more socket", not "broken listener".
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_S = (0.01, 1.0)  # wait between tries when no connection can be refused, doubling
REFUSAL_SEND_S = 1.0  # a refused client gets this long to take the answer
SUMMARY_EVERY_S = 60.0  # a long episode is summed up this often
EPISODE_QUIET_S = 5.0  # an episode ends at an accept this long after its last failure

Handler = Callable[[trio.SocketStream], Awaitable[object]]


async def serve_listeners(
    handler: Handler,
    listeners: Sequence[trio.SocketListener],
    *,
    name: str,
    refusal: bytes,
    handler_nursery: trio.Nursery | None = None,
) -> NoReturn:
    """Accept on every listener until cancelled; `handler(stream)` runs in its own task.

    `name` names the listener in log lines ("kcp", "metrics"); `refusal` is
    sent to a connection accepted while the process is out of descriptors,
    before it is closed. The stream is closed after the handler returns. Other
    accept errors are raised, as trio.serve_listeners does. The handlers run in
    `handler_nursery` if given (so that they outlive the accept loops: a
    graceful shutdown stops accepting and lets connections finish), else in the
    loops' own nursery.
    """
    reserve = _Reserve()
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                handlers = handler_nursery or nursery
                loop = _AcceptLoop(listener, handler, handlers, reserve, name, refusal)
                nursery.start_soon(loop.run)
    finally:
        reserve.close()
    raise AssertionError("unreachable: accept loops run until cancelled")


async def _run_handler(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


class _Reserve:
    """One descriptor held back, to be given up for a moment so that accept works."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.lock = trio.Lock()  # listeners that share the reserve take turns
        self.take()

    def take(self) -> bool:
        """Hold a descriptor again if none is held; False when there is none to take."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Give the descriptor back to the process; False when none was held."""
        if self._fd is None and not self.take():
            return False
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _AcceptLoop:
    def __init__(
        self,
        listener: trio.SocketListener,
        handler: Handler,
        nursery: trio.Nursery,
        reserve: _Reserve,
        name: str,
        refusal: bytes,
    ) -> None:
        self.listener = listener
        self.handler = handler
        self.nursery = nursery
        self.reserve = reserve
        self.name = name
        self.refusal = refusal
        self.episode: _Episode | None = None

    async def run(self) -> None:
        delay = BACKOFF_S[0]
        waited = False  # a connection is known to wait in the backlog
        async with self.listener:
            while True:
                try:
                    stream = await self.listener.accept()
                except OSError as error:
                    if error.errno not in CAPACITY_ERRNOS:
                        raise
                    if self.episode is None:
                        self.episode = _Episode(self.name, error)
                    self.episode.failed()
                    if not waited:
                        # Linux fails accept for lack of a descriptor before it looks
                        # at the backlog: wait for a connection, then try once more
                        # (descriptors may have come back meanwhile) before refusing.
                        await trio.lowlevel.wait_readable(self.listener.socket)
                        waited = True
                    elif await self._refuse_one():
                        self.episode.refused += 1
                        waited = False
                        delay = BACKOFF_S[0]
                    else:
                        await trio.sleep(delay)
                        delay = min(delay * 2, BACKOFF_S[1])
                    continue
                waited = False
                delay = BACKOFF_S[0]
                if self.episode is not None and self.episode.over():
                    self.episode.end()
                    self.episode = None
                self.nursery.start_soon(_run_handler, self.handler, stream)

    async def _refuse_one(self) -> bool:
        """Accept one waiting connection with the reserve's descriptor, answer it with
        the refusal and close it; False when that was not possible."""
        async with self.reserve.lock:
            if not self.reserve.release():
                return False
            try:
                try:
                    stream = await self.listener.accept()
                except OSError as error:
                    if error.errno in CAPACITY_ERRNOS:  # someone else took the descriptor
                        return False
                    raise
                try:
                    with trio.move_on_after(REFUSAL_SEND_S):
                        await stream.send_all(self.refusal)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away: refused all the same
                finally:
                    await trio.aclose_forcefully(stream)
                return True
            finally:
                self.reserve.take()


class _Episode:
    """From the first accept that failed for lack of descriptors to the next that worked."""

    def __init__(self, name: str, error: OSError) -> None:
        self.name = name
        self.started = self.last_failure = trio.current_time()
        self.summarised = self.started
        self.refused = 0
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning(
            "out of file descriptors: refusing connections",
            listener=name,
            error=errno.errorcode.get(error.errno or 0, str(error.errno)),
            open_files_limit=soft,
            hint="raise the open-files limit (ulimit -n, systemd LimitNOFILE) "
            "or lower controller.max_connections",
        )

    def over(self) -> bool:
        """Whether an accept that worked now ends the episode."""
        return trio.current_time() - self.last_failure >= EPISODE_QUIET_S

    def failed(self) -> None:
        """One more accept failed for lack of descriptors."""
        now = self.last_failure = trio.current_time()
        if now - self.summarised >= SUMMARY_EVERY_S:
            self.summarised = now
            log.warning(
                "still out of file descriptors",
                listener=self.name,
                refused=self.refused,
                seconds=round(now - self.started, 1),
            )

    def end(self) -> None:
        log.warning(
            "accepting connections again",
            listener=self.name,
            refused=self.refused,
            seconds=round(trio.current_time() - self.started, 1),
        )
