"""A small Trio-native AMQP 0-9-1 publisher with publisher confirms, on pamqp.

Why our own: trio-amqp (and its successor async-amqp) no longer import on
current Trio and mishandle acks that cover several messages, so a publisher
with many confirms in flight hangs. pamqp does all frame encoding and
decoding but one: the content header of MessageProperties, the runner's fixed
property set, which amqp_wire encodes (checked byte for byte against pamqp);
this module only does the I/O and the bookkeeping (see docs/amqp.md).

Usage, either inside a nursery you own (the connection's tasks live there and
the task returns once the connection is closed, never raising broker faults
after it started)::

    conn = await nursery.start(serve_amqp_connection, "amqp://guest:guest@localhost/")
    await conn.publish("jobs", "due", b"job-1", timeout=30)
    await conn.aclose()

or as a context manager::

    async with open_amqp_connection(url) as conn:
        await conn.publish(...)

Design in one paragraph: one reader task parses frames and settles waiters;
one sender task writes every frame, in the order it was queued, so frames
never interleave and a cancelled caller never leaves half a frame on the
wire. A publish assigns its delivery tag and queues its frames in one step
without a checkpoint, then waits for the broker's ack or nack; a caller that
is cancelled simply stops waiting, and the confirm is dropped when it comes.
A publish's timeout is no cancel scope of its own: one watchdog task fails
the confirms whose deadline passed (they expire in publish order).
Channel opening and exchange checks run as tasks of the connection, so their
state never depends on whether the caller that asked for them is still there.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import structlog
import trio
from pamqp import body as pamqp_body
from pamqp import commands, exceptions, frame, header, heartbeat
from pamqp.base import Frame
from pamqp.common import FieldTable

from kairoi_trio.runners.amqp_wire import MessageProperties, body_frame, content_header_frame

log = structlog.get_logger(__name__)

Properties = commands.Basic.Properties
_F = TypeVar("_F", bound=Frame)

_NO_PROPERTIES = MessageProperties()
_HEARTBEAT_FRAME = frame.marshal(heartbeat.Heartbeat(), 0)
_RECEIVE_SIZE = 256 * 1024
_MAX_SEND_BATCH = 1024 * 1024
_CLOSE_GRACE_S = 1.0
_DEADLINES_SLACK = 1024  # see _compact_deadlines
_MIN_FRAME = 4096  # AMQP's frame-min-size: what peers must accept before tuning
_NOT_FOUND = 404

# Query parameters of RabbitMQ's URI spec (https://www.rabbitmq.com/docs/uri-query-parameters)
# that Kairoi's client (amiquip) read. They are accepted so that Kairoi's DSNs keep
# working, and ignored: the server's [runners.amqp] settings apply to every connection.
IGNORED_URL_PARAMETERS = frozenset(
    {
        "heartbeat",
        "connection_timeout",
        "channel_max",
        "frame_max",
        "auth_mechanism",
        "cacertfile",
        "certfile",
        "keyfile",
        "verify",
        "fail_if_no_peer_cert",
        "server_name_indication",
    }
)


# --- errors -----------------------------------------------------------------


class AmqpError(Exception):
    """Any failure of the AMQP client; `reason` is one line, fit for a job's outcome."""

    def __init__(self, reason: str, *, reply_code: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply_code = reply_code


class AmqpConnectionError(AmqpError):
    """The connection could not be opened, or it was lost or closed."""


class AmqpChannelError(AmqpError):
    """The broker closed a channel (e.g. 404 NOT_FOUND for a missing exchange)."""


class AmqpNackError(AmqpError):
    """The broker refused a published message (basic.nack)."""


class AmqpReturnedError(AmqpError):
    """The broker returned a mandatory message it could not route to any queue (basic.return).

    `reply` is the broker's code and text ("312 NO_ROUTE" on RabbitMQ); the
    broker still confirms the message, which was delivered nowhere.
    """

    def __init__(self, reply: str, *, reply_code: int = 0) -> None:
        super().__init__(
            f"unroutable: the broker returned the message ({reply})", reply_code=reply_code
        )
        self.reply = reply


class AmqpTimeoutError(AmqpError):
    """No answer (e.g. no confirm) from the broker in time."""


# --- URL and options ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AmqpUrl:
    """amqp[s]://user:password@host:port/vhost, with RabbitMQ's defaults.

    An empty path or "/" means the default vhost "/"; otherwise the path is
    percent-decoded ("%2F" is "/", "/prod" is "prod").

    Query parameters: `extra_parameters` names the ones the caller handles
    itself (the runner's `mandatory`); those of IGNORED_URL_PARAMETERS are
    accepted and listed in `ignored`; any other one raises
    AmqpConnectionError, so that a typo is not silently dropped.
    """

    host: str
    port: int
    username: str
    password: str
    vhost: str
    tls: bool
    ignored: tuple[str, ...] = ()

    @classmethod
    def parse(cls, url: str, extra_parameters: frozenset[str] = frozenset()) -> AmqpUrl:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise AmqpConnectionError(f"invalid AMQP URL: {exc}") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise AmqpConnectionError(f"invalid AMQP URL: scheme must be amqp or amqps: {url!r}")
        ignored = []
        for name, _ in parse_qsl(parts.query, keep_blank_values=True):
            if name in IGNORED_URL_PARAMETERS:
                ignored.append(name)
            elif name not in extra_parameters:
                known = ", ".join(sorted(extra_parameters | IGNORED_URL_PARAMETERS))
                raise AmqpConnectionError(
                    f"invalid AMQP URL: unknown query parameter {name!r} (known: {known})"
                )
        tls = parts.scheme == "amqps"
        path = parts.path
        vhost = "/" if path in ("", "/") else unquote(path[1:])
        return cls(
            host=parts.hostname or "localhost",
            port=port or (5671 if tls else 5672),
            username=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=vhost,
            tls=tls,
            ignored=tuple(ignored),
        )

    def redacted(self) -> str:
        """The URL without the password, for logs and error messages."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = "" if self.vhost == "/" else self.vhost
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{vhost}"


@dataclass(frozen=True, slots=True)
class AmqpOptions:
    """Connection options.

    heartbeat_s: the heartbeat we ask for (0 disables it). A connection that
        receives nothing for two intervals is declared dead.
    connect_timeout_s: for TCP connect, TLS and the AMQP handshake together,
        and for each channel open or exchange check.
    ssl_context: for amqps:// (default: the system's trust store).
    """

    heartbeat_s: int = 30
    connect_timeout_s: float = 10.0
    frame_max: int = 131_072
    channel_max: int = 2047
    connection_name: str = "kairoi-trio"
    ssl_context: ssl.SSLContext | None = None


# --- internal bookkeeping -----------------------------------------------------


@dataclass(slots=True)
class _Waiter:
    """One caller waiting for one answer (a confirm, or a reply to a method)."""

    event: trio.Event = field(default_factory=trio.Event)
    result: Frame | None = None
    error: AmqpError | None = None

    def resolve(self, result: Frame | None = None, error: AmqpError | None = None) -> None:
        if not self.event.is_set():
            self.result, self.error = result, error
            self.event.set()


# What a basic.return carries back to tell which message it is: the exchange, the
# routing key and the body (the return has no delivery tag).
_ReturnKey = tuple[str, str, bytes]


class _Confirm:
    """One publish waiting for its confirm; `key` is set for mandatory ones.

    A task waits on `event` (publish), or `on_confirm` is called with the error
    or None (publish_nowait), exactly once either way.
    """

    __slots__ = ("event", "error", "key", "on_confirm", "settled")

    def __init__(self, on_confirm: Callable[[AmqpError | None], None] | None = None) -> None:
        self.event: trio.Event | None = trio.Event() if on_confirm is None else None
        self.on_confirm = on_confirm
        self.error: AmqpError | None = None
        self.key: _ReturnKey | None = None
        self.settled = False

    def resolve(self, result: Frame | None = None, error: AmqpError | None = None) -> None:
        if self.settled:
            return
        self.settled = True
        self.error = error
        if self.on_confirm is not None:
            try:
                self.on_confirm(error)
            except Exception:  # a bug there must not take the reader task down
                log.exception("amqp.confirm_callback_failed")
        else:
            assert self.event is not None
            self.event.set()


@dataclass(slots=True)
class _Returned:
    """A basic.return whose content header and body frames are still arriving."""

    method: commands.Basic.Return
    size: int = -1  # from the content header; -1 until it came
    body: bytearray = field(default_factory=bytearray)
    received: int = 0
    keep: bool = True  # False: longer than anything we could have sent, only counted


@dataclass(slots=True)
class _Channel:
    id: int
    is_open: bool = False
    next_tag: int = 1
    # Unconfirmed publishes by delivery tag, in ascending order (dict order).
    unconfirmed: dict[int, _Confirm] = field(default_factory=dict)
    # Replies to synchronous methods arrive in order; one waiter per call.
    rpc: deque[_Waiter] = field(default_factory=deque)
    # Unconfirmed mandatory publishes by what a return carries, tags ascending. The
    # broker returns messages in publish order and before their confirm, so a
    # return belongs to the oldest unconfirmed publish with its key.
    returnable: dict[_ReturnKey, deque[int]] = field(default_factory=dict)
    # Tags the broker returned, failed when their confirm arrives.
    returned: dict[int, AmqpReturnedError] = field(default_factory=dict)
    incoming: _Returned | None = None
    # The longest body published mandatory on this channel: a returned body
    # longer than it matches nothing and is counted, not kept.
    longest_returnable: int = 0


@dataclass(slots=True)
class _ExchangeCheck:
    done: trio.Event = field(default_factory=trio.Event)
    exists: bool = False
    error: AmqpError | None = None


class _Eof(Exception):
    pass


class _Outbox:
    """Frames for the sender task, in the order queued: a list and a wake-up.

    A memory channel did the same with more work per frame (its send_nowait was
    ~10% of the publish path in a profile); the sender takes all that is queued
    (up to a size bound) with one wake-up.
    """

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._closed = False
        self._wake: trio.Event | None = None  # set while the sender waits for frames

    def put(self, data: bytes) -> None:
        """Queue `data` (whole frames); never blocks. Callers check the connection is open."""
        self._frames.append(data)
        self._notify()

    def close(self) -> None:
        """No more frames: `take` answers None once those queued are taken."""
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    async def take(self, limit: int) -> bytes | None:
        """The frames queued, oldest first, joined: whole frames, at least one, and no
        more once `limit` bytes are reached. None when closed and empty."""
        while not self._frames:
            if self._closed:
                return None
            self._wake = wake = trio.Event()
            await wake.wait()
        frames = self._frames
        if len(frames) == 1:
            self._frames = []
            return frames[0]
        size = count = 0
        for data in frames:
            size += len(data)
            count += 1
            if size >= limit:
                break
        if count == len(frames):
            self._frames = []
            return b"".join(frames)
        batch = frames[:count]
        del frames[:count]
        return b"".join(batch)


class _FrameReader:
    """Split the byte stream into frames and let pamqp decode each one.

    A frame larger than `max_frame` bytes (header and end octet included, as
    AMQP counts frame_max) is refused before it is buffered: a broker cannot
    make us hold more than one frame of the size we agreed to.
    """

    def __init__(self, stream: trio.abc.Stream, max_frame: int) -> None:
        self._stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()
        self._ready: deque[tuple[int, object]] = deque()

    async def receive(self) -> list[tuple[int, object]]:
        """At least one (channel, frame) pair; raises _Eof when the peer closed."""
        while not self._ready:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise _Eof
            self._buf += data
            self._parse()
        frames = list(self._ready)
        self._ready.clear()
        return frames

    async def next(self) -> tuple[int, object]:
        if not self._ready:
            self._ready.extend(await self.receive())
        return self._ready.popleft()

    def _parse(self) -> None:
        buf, pos, size_all = self._buf, 0, len(self._buf)
        while size_all - pos >= 7:
            if buf[pos : pos + 4] == b"AMQP":
                raise AmqpConnectionError("the server does not speak AMQP 0-9-1")
            end = pos + 8 + int.from_bytes(buf[pos + 3 : pos + 7], "big")
            if end - pos > self.max_frame:
                raise AmqpConnectionError(
                    f"frame of {end - pos} bytes from broker, over frame_max {self.max_frame}"
                )
            if end > size_all:
                break
            try:
                _, channel, value = frame.unmarshal(bytes(buf[pos:end]))
            except exceptions.UnmarshalingException as exc:
                raise AmqpConnectionError(f"undecodable frame from broker: {exc}") from None
            self._ready.append((channel, value))
            pos = end
        del buf[:pos]


def _close_reason(method: commands.Connection.Close | commands.Channel.Close) -> str:
    return f"{method.reply_code} {method.reply_text}".strip()


def _os_error_text(exc: OSError) -> str:
    """The OS's words for a socket error (trio wraps them in longer messages)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        # A failed connect to several addresses: one OSError per address.
        first = cause.exceptions[0]
        if isinstance(first, OSError):
            exc = first
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror}"
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


# --- the connection -----------------------------------------------------------


class AmqpConnection:
    """One AMQP connection with one confirm-mode publishing channel.

    Create it with `serve_amqp_connection` or `open_amqp_connection`, not
    directly. Safe to use from many tasks at once.
    """

    def __init__(self, url: str, options: AmqpOptions | None = None) -> None:
        self.url = AmqpUrl.parse(url)
        self.options = options or AmqpOptions()
        self.heartbeat_s = 0
        self.frame_max = self.options.frame_max
        self.channel_max = self.options.channel_max
        self.server_properties: dict[str, object] = {}
        self._log = log.bind(amqp=self.url.redacted())
        self._stream: trio.abc.Stream | None = None
        self._reader: _FrameReader | None = None
        self._nursery: trio.Nursery | None = None
        self._outbox = _Outbox()
        self._sender_done = trio.Event()
        self._error: AmqpConnectionError | None = None
        self._closed = trio.Event()
        self._finished = trio.Event()
        self._close_ok = trio.Event()
        self._awaiting_close_ok = False
        self._open = False
        self._last_recv = 0.0
        self._last_send = 0.0
        self._blocked_reason: str | None = None
        self._unblocked = trio.Event()
        self._unblocked.set()
        self._channels: dict[int, _Channel] = {}
        self._last_channel_id = 0
        self._publish_channel: _Channel | None = None
        self._publish_channel_ready: trio.Event | None = None
        self._publish_channel_error: AmqpError | None = None
        self._exchange_checks: dict[str, _ExchangeCheck] = {}
        self._known_exchanges: set[str] = set()
        self._in_flight = 0
        self._idle: trio.Event | None = None
        # Fast-path publishes waiting for a confirm, for the watchdog (see publish).
        self._deadlines: deque[tuple[float, float, _Confirm]] = deque()
        self._deadline_added: trio.Event | None = None

    # -- public state

    @property
    def is_open(self) -> bool:
        return self._open and self._error is None

    @property
    def close_reason(self) -> str | None:
        """Why the connection is closed, or None while it is open."""
        return self._error.reason if self._error is not None else None

    @property
    def is_blocked(self) -> bool:
        """True while the broker has blocked publishing (connection.blocked, e.g. low memory)."""
        return self._blocked_reason is not None

    @property
    def in_flight(self) -> int:
        """Publishes sent and not yet confirmed."""
        return self._in_flight

    # -- public operations

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        properties: Properties | MessageProperties | None = None,
        mandatory: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a deadline that also covers blocking
    ) -> None:
        """Publish one message and wait for the broker's confirm.

        `properties` as MessageProperties (the runner's fixed set) are encoded
        by amqp_wire, much faster than pamqp's generic Basic.Properties.

        With `mandatory`, a message that no queue receives comes back
        (basic.return, before its confirm) and raises AmqpReturnedError;
        without it the broker drops such a message and confirms it all the same.
        Raises AmqpNackError on a nack, AmqpChannelError when the broker closes
        the channel (e.g. the exchange does not exist), AmqpConnectionError when
        the connection is or becomes closed, AmqpTimeoutError after `timeout`
        seconds (counted from the call, including time spent blocked). The
        message may still have reached the broker in the last three cases.
        Mandatory messages that are byte for byte the same (exchange, routing
        key, body) and in flight together are told apart by order only.
        """
        waiter = self._publish_fast(exchange, routing_key, body, properties, mandatory, timeout)
        if waiter is not None:
            assert waiter.event is not None
            await waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
            return
        # The slow path: blocked, no channel yet, or a deadline earlier than one
        # the watchdog already holds (its deadlines must stay in order).
        waiter_or_none: _Confirm | None = None
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            while self._blocked_reason is not None and self._error is None:
                await self._unblocked.wait()
            channel = await self._ready_publish_channel()
            waiter_or_none = self._enqueue_publish(
                channel, exchange, routing_key, body, properties, mandatory
            )
            assert waiter_or_none.event is not None
            await waiter_or_none.event.wait()
        if scope.cancelled_caught:
            assert timeout is not None
            raise self._timeout_error(timeout, waiter_or_none is not None)
        assert waiter_or_none is not None
        if waiter_or_none.error is not None:
            raise waiter_or_none.error

    def publish_nowait(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        on_confirm: Callable[[AmqpError | None], None],
        *,
        properties: Properties | MessageProperties | None = None,
        mandatory: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """Publish one message without waiting: `on_confirm(None)` once the broker
        confirms it, `on_confirm(error)` with what `publish` would raise otherwise
        (called exactly once, from this connection's tasks; it must not block).

        Answers False, having sent nothing, when the message cannot go out at once
        (the connection closed or blocked, no open channel yet, a deadline earlier
        than one the watchdog holds): then use `publish`, which waits or raises.
        Raises AmqpError when the message cannot be encoded. No task per message:
        the amqp runner's hot path.
        """
        waiter = _Confirm(on_confirm)
        return (
            self._publish_fast(exchange, routing_key, body, properties, mandatory, timeout, waiter)
            is not None
        )

    def _publish_fast(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties | MessageProperties | None,
        mandatory: bool,
        timeout: float | None,
        waiter: _Confirm | None = None,
    ) -> _Confirm | None:
        """Queue the message on the open, unblocked channel with the watchdog as its
        deadline, and answer its waiter; None (nothing sent) when it needs the slow
        path. No cancel scope per publish (entering, registering and leaving one
        cost ~12% of the server's CPU per job): the watchdog fails the confirm at
        the deadline instead."""
        channel = self._publish_channel
        if (
            self._blocked_reason is not None
            or channel is None
            or not channel.is_open
            or self._error is not None
            or (timeout is not None and timeout < 0)
        ):
            return None
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        deadlines = self._deadlines
        if deadlines and deadlines[-1][0] > deadline:
            return None  # the watchdog's deadlines must stay in order
        waiter = self._enqueue_publish(
            channel, exchange, routing_key, body, properties, mandatory, waiter
        )
        if deadline != math.inf:
            assert timeout is not None
            while deadlines and deadlines[0][2].settled:
                deadlines.popleft()  # settled: forgotten here, not by the watchdog
            if not deadlines and self._deadline_added is not None:
                self._deadline_added.set()
            elif len(deadlines) > 2 * self._in_flight + _DEADLINES_SLACK:
                self._compact_deadlines()
            deadlines.append((deadline, timeout, waiter))
        return waiter

    def _enqueue_publish(
        self,
        channel: _Channel,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties | MessageProperties | None,
        mandatory: bool,
        waiter: _Confirm | None = None,
    ) -> _Confirm:
        """Encode, take the delivery tag and queue the frames: no checkpoint in here,
        so the tag we take is the one the broker will count for this message."""
        frames = self._publish_frames(
            channel.id, exchange, routing_key, body, properties, mandatory
        )
        self._check_open()
        tag = channel.next_tag
        channel.next_tag += 1
        if waiter is None:
            waiter = _Confirm()
        channel.unconfirmed[tag] = waiter
        if mandatory:
            waiter.key = (exchange, routing_key, body)
            channel.returnable.setdefault(waiter.key, deque()).append(tag)
            if len(body) > channel.longest_returnable:
                channel.longest_returnable = len(body)
        self._in_flight += 1
        self._outbox.put(frames)
        return waiter

    def _compact_deadlines(self) -> None:
        """Drop settled entries from anywhere in `_deadlines`, keeping the order.

        Settled ones are otherwise only dropped from the front: behind one slow
        confirm, a whole `timeout` worth of publishes would stay. Called when
        the deque holds over twice the publishes in flight (plus a slack), so
        the cost per publish stays constant.
        """
        live = [entry for entry in self._deadlines if not entry[2].settled]
        self._deadlines.clear()  # in place: the watchdog holds this deque
        self._deadlines.extend(live)

    def _timeout_error(self, timeout: float, sent: bool) -> AmqpTimeoutError:
        what = "a confirm" if sent else "the broker to accept publishes"
        if self._blocked_reason is not None:
            what += f" (connection blocked: {self._blocked_reason})"
        return AmqpTimeoutError(f"no answer within {timeout:g}s waiting for {what}")

    async def _confirm_watchdog(self) -> None:
        """Fail fast-path publishes whose confirm did not come by their deadline.

        `_deadlines` holds (deadline, timeout, waiter) in publish order with
        deadlines never decreasing (publish takes the slow path otherwise), so
        the front is always the first to expire: one sleep for all of them.
        """
        deadlines = self._deadlines
        while True:
            while deadlines and deadlines[0][2].settled:
                deadlines.popleft()
            if not deadlines:
                self._deadline_added = trio.Event()
                await self._deadline_added.wait()
                self._deadline_added = None
                continue
            await trio.sleep_until(deadlines[0][0])
            now = trio.current_time()
            while deadlines and deadlines[0][0] <= now:
                _, timeout, waiter = deadlines.popleft()
                waiter.resolve(error=self._timeout_error(timeout, True))

    def exchange_known(self, name: str) -> bool:
        """Whether `name` is known to exist (the default exchange, or a cached positive
        `exchange_exists`): lets a caller skip the await on the hot path."""
        return name == "" or name in self._known_exchanges

    async def exchange_exists(
        self,
        name: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - raises AmqpTimeoutError, not TooSlow
    ) -> bool:
        """Whether `name` exists, by a passive declare on a throwaway channel.

        Positive answers are cached for the life of the connection (and
        forgotten when a publish hits 404). Concurrent checks of the same name
        share one declare.
        """
        if name == "" or name in self._known_exchanges:
            return True
        self._check_open()
        check = self._exchange_checks.get(name)
        if check is None:
            check = _ExchangeCheck()
            self._exchange_checks[name] = check
            assert self._nursery is not None
            self._nursery.start_soon(self._run_exchange_check, name, check)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await check.done.wait()
        if not check.done.is_set():
            raise AmqpTimeoutError(f"no answer within {timeout:g}s checking exchange {name!r}")
        if check.error is not None:
            raise check.error
        return check.exists

    async def wait_idle(self) -> None:
        """Return once no publish is waiting for a confirm (or the connection closed)."""
        while self._in_flight and self._error is None:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    async def wait_closed(self) -> None:
        """Return once the connection is closed, whoever closed it (see `close_reason`)."""
        await self._closed.wait()

    async def aclose(self) -> None:
        """Close politely (connection.close, wait briefly for close-ok); idempotent.

        Unconfirmed publishes fail with "connection closed by client".
        """
        if self._error is None:
            self._fail(
                AmqpConnectionError("connection closed by client"),
                final_frame=frame.marshal(
                    commands.Connection.Close(
                        reply_code=200, reply_text="Normal shutdown", class_id=0, method_id=0
                    ),
                    0,
                ),
                graceful=True,
            )
        await self._finished.wait()

    # -- startup

    async def _connect(self) -> None:
        """TCP (and TLS), protocol header, start/tune/open; raises AmqpConnectionError."""
        url, opts = self.url, self.options
        where = f"{url.host}:{url.port}"
        try:
            with trio.fail_after(opts.connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(url.host, url.port)
                self._stream = stream
                if url.tls:
                    context = opts.ssl_context or ssl.create_default_context()
                    stream = trio.SSLStream(stream, context, server_hostname=url.host)
                    self._stream = stream
                    await stream.do_handshake()
                self._reader = _FrameReader(stream, max(self.frame_max, _MIN_FRAME))
                await self._handshake(stream)
        except trio.TooSlowError:
            await self._abort_stream()
            raise AmqpConnectionError(
                f"cannot connect to {url.redacted()}: timed out after {opts.connect_timeout_s:g}s"
            ) from None
        except AmqpConnectionError as exc:
            await self._abort_stream()
            raise AmqpConnectionError(
                f"cannot connect to {url.redacted()}: {exc.reason}", reply_code=exc.reply_code
            ) from None
        except _Eof:
            await self._abort_stream()
            raise AmqpConnectionError(
                f"cannot connect to {url.redacted()}: broker closed the connection during the "
                "handshake"
            ) from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            await self._abort_stream()
            text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            raise AmqpConnectionError(f"cannot connect to {where}: {text}") from None
        except UnicodeError as exc:  # the resolver's IDNA encoding of a stored rule's host
            await self._abort_stream()
            raise AmqpConnectionError(
                f"cannot connect to {where}: the host name cannot be encoded ({exc})"
            ) from None
        except BaseException:
            await self._abort_stream()
            raise
        self._last_recv = self._last_send = trio.current_time()
        self._open = True

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        url, opts = self.url, self.options
        await stream.send_all(frame.marshal(header.ProtocolHeader(), 0))
        start = await self._expect(commands.Connection.Start)
        mechanisms = (start.mechanisms or "").split()
        if "PLAIN" not in mechanisms:
            raise AmqpConnectionError(f"broker does not offer PLAIN login (offers {mechanisms})")
        self.server_properties = dict(start.server_properties or {})
        client_properties: FieldTable = {
            "product": "kairoi-trio",
            "platform": "Python/Trio",
            "connection_name": opts.connection_name,
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
            },
        }
        start_ok = commands.Connection.StartOk(
            client_properties=client_properties,
            mechanism="PLAIN",
            response=f"\0{url.username}\0{url.password}",
            locale="en_US",
        )
        await stream.send_all(frame.marshal(start_ok, 0))
        tune = await self._expect(commands.Connection.Tune)
        self.channel_max = min(tune.channel_max or 65535, opts.channel_max)
        self.frame_max = max(min(tune.frame_max or 2**31, opts.frame_max), _MIN_FRAME)
        assert self._reader is not None
        self._reader.max_frame = self.frame_max
        self.heartbeat_s = opts.heartbeat_s
        tune_ok = commands.Connection.TuneOk(
            channel_max=self.channel_max, frame_max=self.frame_max, heartbeat=self.heartbeat_s
        )
        try:
            open_vhost = commands.Connection.Open(virtual_host=url.vhost)
        except ValueError as exc:
            raise AmqpConnectionError(f"invalid vhost {url.vhost!r}: {exc}") from None
        await stream.send_all(frame.marshal(tune_ok, 0) + frame.marshal(open_vhost, 0))
        await self._expect(commands.Connection.OpenOk)

    async def _expect(self, kind: type[_F]) -> _F:
        assert self._reader is not None
        channel, value = await self._reader.next()
        if isinstance(value, commands.Connection.Close):
            raise AmqpConnectionError(_close_reason(value), reply_code=value.reply_code or 0)
        if channel != 0 or not isinstance(value, kind):
            name = getattr(value, "name", type(value).__name__)
            raise AmqpConnectionError(f"unexpected {name} during the handshake")
        return value

    async def _abort_stream(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)

    # -- the running connection

    async def _serve(
        self, task_status: trio.TaskStatus[AmqpConnection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._confirm_watchdog)
                if self.heartbeat_s > 0:
                    nursery.start_soon(self._heartbeat_loop)
                self._log.info("amqp.connected", heartbeat_s=self.heartbeat_s)
                task_status.started(self)
                await self._closed.wait()
                # Let the sender flush a last close or close-ok frame, then stop.
                with trio.move_on_after(_CLOSE_GRACE_S):
                    await self._sender_done.wait()
                    if self._awaiting_close_ok:
                        await self._close_ok.wait()
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug in here must not take the owner's nursery down
            self._log.exception("amqp.internal_error")
            self._fail(AmqpConnectionError(f"internal error in AMQP client: {exc!r}"))
        finally:
            # Reached first only when our owner cancelled us: a normal shutdown.
            self._fail(AmqpConnectionError("connection closed"), graceful=True)
            with trio.CancelScope(shield=True):
                await self._abort_stream()
            self._finished.set()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                frames = await self._reader.receive()
                self._last_recv = trio.current_time()
                for channel_id, value in frames:
                    self._dispatch(channel_id, value)
        except _Eof:
            self._fail(AmqpConnectionError("connection closed by the broker"))
        except AmqpConnectionError as exc:
            self._fail(exc)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc) or "broken"
            self._fail(AmqpConnectionError(f"connection lost: {text}"))

    async def _send_loop(self) -> None:
        assert self._stream is not None
        try:
            while (data := await self._outbox.take(_MAX_SEND_BATCH)) is not None:
                await self._stream.send_all(data)
                self._last_send = trio.current_time()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc) or "broken"
            self._fail(AmqpConnectionError(f"connection lost: {text}"))
        finally:
            self._sender_done.set()

    async def _heartbeat_loop(self) -> None:
        """Heartbeat when we have been quiet; the broker is dead after 2 silent intervals."""
        interval = self.heartbeat_s / 2
        while True:
            await trio.sleep(interval)
            if self._error is not None:
                return
            now = trio.current_time()
            silent = now - self._last_recv
            if silent > 2 * self.heartbeat_s:
                self._fail(
                    AmqpConnectionError(
                        f"broker missed heartbeats: nothing received for {silent:.1f}s "
                        f"(heartbeat {self.heartbeat_s}s)"
                    )
                )
                return
            if now - self._last_send >= interval:
                self._send_nowait(_HEARTBEAT_FRAME)

    def _send_nowait(self, data: bytes) -> None:
        self._check_open()
        self._outbox.put(data)

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._open:
            raise AmqpConnectionError("connection not open")

    # -- incoming frames

    def _dispatch(self, channel_id: int, value: object) -> None:
        if isinstance(value, heartbeat.Heartbeat):
            return
        if channel_id == 0:
            self._dispatch_connection(value)
            return
        channel = self._channels.get(channel_id)
        if channel is None:
            return  # late frames for a channel we already gave up
        if isinstance(value, commands.Basic.Ack):
            self._settle(channel, value.delivery_tag, value.multiple, None)
        elif isinstance(value, commands.Basic.Nack):
            # RabbitMQ nacks when a queue refuses the message (at its length limit
            # with overflow reject-publish) or on an internal error.
            nack = AmqpNackError(
                "broker refused the message (nack: a queue at its length limit with "
                "overflow reject-publish, or a broker error)"
            )
            self._settle(channel, value.delivery_tag, value.multiple, nack)
        elif isinstance(value, commands.Channel.Close):
            self._send_nowait(frame.marshal(commands.Channel.CloseOk(), channel_id))
            reason = _close_reason(value)
            self._log.warning("amqp.channel_closed_by_broker", channel=channel_id, reason=reason)
            closed = AmqpChannelError(
                f"channel closed by broker: {reason}", reply_code=value.reply_code or 0
            )
            if value.reply_code == _NOT_FOUND:
                self._known_exchanges.clear()  # something we believed in is gone
            self._drop_channel(channel, closed)
        elif isinstance(value, commands.Basic.Return):
            channel.incoming = _Returned(value)
        elif isinstance(value, header.ContentHeader | pamqp_body.ContentBody):
            self._returned_content(channel, value)
        elif isinstance(value, commands.Channel.CloseOk):
            self._resolve_rpc(channel, value)
            self._drop_channel(channel, AmqpChannelError("channel closed"))
        elif isinstance(value, commands.Channel.Flow):
            # RabbitMQ uses connection.blocked instead; a broker that sends flow
            # must get flow-ok, and closes the channel if we publish regardless,
            # which fails those publishes with its reason.
            self._send_nowait(
                frame.marshal(commands.Channel.FlowOk(active=value.active), channel_id)
            )
            self._log.warning("amqp.channel_flow", channel=channel_id, active=value.active)
        elif isinstance(value, Frame) and value.name.endswith("Ok"):
            self._resolve_rpc(channel, value)
        else:
            # We never consume, so deliveries and consumer cancels cannot concern us.
            self._log.warning("amqp.unexpected_frame", channel=channel_id, frame=repr(value))

    def _dispatch_connection(self, value: object) -> None:
        if isinstance(value, commands.Connection.Close):
            reason = _close_reason(value)
            self._fail(
                AmqpConnectionError(
                    f"connection closed by broker: {reason}", reply_code=value.reply_code or 0
                ),
                final_frame=frame.marshal(commands.Connection.CloseOk(), 0),
            )
        elif isinstance(value, commands.Connection.CloseOk):
            self._close_ok.set()
        elif isinstance(value, commands.Connection.Blocked):
            self._blocked_reason = value.reason or "blocked"
            self._unblocked = trio.Event()
            self._log.warning("amqp.blocked", reason=self._blocked_reason)
        elif isinstance(value, commands.Connection.Unblocked):
            self._blocked_reason = None
            self._unblocked.set()
            self._log.info("amqp.unblocked")

    def _settle(self, channel: _Channel, tag: int, multiple: bool, error: AmqpError | None) -> None:
        if multiple:
            tags = []
            for pending in channel.unconfirmed:  # ascending: stop at the first one above `tag`
                if pending > tag > 0:  # tag 0 with multiple: every outstanding one
                    break
                tags.append(pending)
        else:
            tags = [tag] if tag in channel.unconfirmed else []
        for pending in tags:
            waiter = channel.unconfirmed.pop(pending)
            returned = channel.returned.pop(pending, None) if channel.returned else None
            if waiter.key is not None:
                self._forget_returnable(channel, waiter.key, pending)
            waiter.resolve(error=error or returned)
        self._release(len(tags))

    @staticmethod
    def _forget_returnable(channel: _Channel, key: _ReturnKey, tag: int) -> None:
        tags = channel.returnable.get(key)
        if tags is None:
            return
        if tags and tags[0] == tag:  # confirms mostly come in order
            tags.popleft()
        elif tag in tags:
            tags.remove(tag)
        if not tags:
            del channel.returnable[key]

    def _returned_content(
        self, channel: _Channel, value: header.ContentHeader | pamqp_body.ContentBody
    ) -> None:
        """Collect a returned message's header and body; match it once complete."""
        incoming = channel.incoming
        if incoming is None:
            self._log.warning("amqp.unexpected_content", channel=channel.id)
            return
        if isinstance(value, header.ContentHeader):
            incoming.size = value.body_size
            incoming.keep = incoming.size <= channel.longest_returnable
        else:
            incoming.received += len(value.value)
            if incoming.keep:
                incoming.body += value.value
        if 0 <= incoming.size <= incoming.received:
            channel.incoming = None
            if incoming.keep:
                self._match_return(channel, incoming)
            else:
                self._log.warning("amqp.unmatched_return", size=incoming.size)

    def _match_return(self, channel: _Channel, incoming: _Returned) -> None:
        method = incoming.method
        key = (method.exchange or "", method.routing_key or "", bytes(incoming.body))
        tags = channel.returnable.get(key)
        reply = f"{method.reply_code} {method.reply_text}".strip()
        if not tags:
            # A return for a publish we no longer track (its channel was replaced).
            self._log.warning(
                "amqp.unmatched_return",
                exchange=method.exchange,
                routing_key=method.routing_key,
                reply=reply,
            )
            return
        tag = tags.popleft()
        if not tags:
            del channel.returnable[key]
        channel.returned[tag] = AmqpReturnedError(reply, reply_code=method.reply_code or 0)

    def _release(self, count: int) -> None:
        self._in_flight -= count
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _resolve_rpc(self, channel: _Channel, value: Frame) -> None:
        if channel.rpc:
            channel.rpc.popleft().resolve(result=value)

    def _drop_channel(self, channel: _Channel, error: AmqpError) -> None:
        """Forget a channel and fail everything that waits on it."""
        channel.is_open = False
        self._channels.pop(channel.id, None)
        if self._publish_channel is channel:
            self._publish_channel = None
        waiters: list[_Waiter | _Confirm] = list(channel.unconfirmed.values())
        channel.unconfirmed.clear()
        channel.returnable.clear()
        channel.returned.clear()
        channel.incoming = None
        self._release(len(waiters))
        waiters.extend(channel.rpc)
        channel.rpc.clear()
        for waiter in waiters:
            waiter.resolve(error=error)

    def _fail(
        self,
        error: AmqpConnectionError,
        *,
        final_frame: bytes | None = None,
        graceful: bool = False,
    ) -> None:
        """Mark the connection closed (first reason wins) and fail every waiter."""
        if self._error is not None:
            return
        self._error = error
        if self._open and not graceful:
            self._log.warning("amqp.connection_failed", reason=error.reason)
        elif graceful:
            self._log.info("amqp.connection_closed")
        if final_frame is not None:
            self._outbox.put(final_frame)
            self._awaiting_close_ok = graceful
        self._outbox.close()
        for channel in list(self._channels.values()):
            self._drop_channel(channel, error)
        for check in self._exchange_checks.values():
            if not check.done.is_set():
                check.error = error
                check.done.set()
        if self._publish_channel_ready is not None:
            self._publish_channel_error = error
            self._publish_channel_ready.set()
        self._unblocked.set()
        if self._idle is not None:
            self._idle.set()
        self._closed.set()

    # -- channels

    def _new_channel(self) -> _Channel:
        for _ in range(self.channel_max):
            self._last_channel_id = self._last_channel_id % self.channel_max + 1
            if self._last_channel_id not in self._channels:
                channel = _Channel(self._last_channel_id)
                self._channels[channel.id] = channel
                return channel
        raise AmqpConnectionError(f"all {self.channel_max} channels in use")

    async def _call(self, channel: _Channel, method: Frame, reply: type[Frame]) -> Frame:
        """Send a synchronous method on `channel` and wait for its reply (bounded)."""
        waiter = _Waiter()
        channel.rpc.append(waiter)
        self._send_nowait(frame.marshal(method, channel.id))
        timeout = self.options.connect_timeout_s
        with trio.move_on_after(timeout):
            await waiter.event.wait()
        if not waiter.event.is_set():
            # The channel's state is unknown now; a broker this slow is not usable.
            error = AmqpConnectionError(f"broker did not answer {method.name} within {timeout:g}s")
            self._fail(error)
            raise error
        if waiter.error is not None:
            raise waiter.error
        if not isinstance(waiter.result, reply):
            raise AmqpConnectionError(f"expected {reply.name}, got {waiter.result!r}")
        return waiter.result

    async def _ready_publish_channel(self) -> _Channel:
        """The open confirm-mode channel, opening one (in the background) if needed."""
        while True:
            self._check_open()
            channel = self._publish_channel
            if channel is not None and channel.is_open:
                return channel
            if self._publish_channel_ready is None:
                self._publish_channel_ready = trio.Event()
                self._publish_channel_error = None
                assert self._nursery is not None
                self._nursery.start_soon(self._open_publish_channel, self._publish_channel_ready)
            ready = self._publish_channel_ready
            await ready.wait()
            if self._publish_channel_error is not None:
                raise self._publish_channel_error

    async def _open_publish_channel(self, ready: trio.Event) -> None:
        try:
            channel = self._new_channel()
            await self._call(channel, commands.Channel.Open(), commands.Channel.OpenOk)
            await self._call(channel, commands.Confirm.Select(), commands.Confirm.SelectOk)
            channel.is_open = True
            self._publish_channel = channel
        except AmqpError as exc:
            self._publish_channel_error = exc
        finally:
            self._publish_channel_ready = None
            ready.set()

    async def _run_exchange_check(self, name: str, check: _ExchangeCheck) -> None:
        """Passive declare on its own channel: a failed one closes the channel it runs on."""
        channel: _Channel | None = None
        try:
            channel = self._new_channel()
            await self._call(channel, commands.Channel.Open(), commands.Channel.OpenOk)
            channel.is_open = True
            try:
                declare = commands.Exchange.Declare(exchange=name, passive=True)
            except ValueError:
                raise AmqpChannelError(f"invalid exchange name {name!r}") from None
            await self._call(channel, declare, commands.Exchange.DeclareOk)
            check.exists = True
            self._known_exchanges.add(name)
        except AmqpError as exc:
            if exc.reply_code == _NOT_FOUND:
                check.exists = False
            else:
                check.error = exc
        finally:
            self._exchange_checks.pop(name, None)
            check.done.set()
        if channel is not None and channel.is_open and self._error is None:
            try:
                close = commands.Channel.Close(
                    reply_code=200, reply_text="done", class_id=0, method_id=0
                )
                await self._call(channel, close, commands.Channel.CloseOk)
            except AmqpError:
                pass

    # -- encoding

    def _publish_frames(
        self,
        channel_id: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Properties | MessageProperties | None,
        mandatory: bool,
    ) -> bytes:
        try:
            method_frame = _publish_method_frame(channel_id, exchange, routing_key, mandatory)
            if properties is None:
                properties = _NO_PROPERTIES
            if isinstance(properties, MessageProperties):
                content_frame = content_header_frame(channel_id, len(body), properties)
            else:
                content = header.ContentHeader(0, len(body), properties)
                content_frame = frame.marshal(content, channel_id)
            if len(content_frame) > self.frame_max:
                # Sent anyway, the broker would close the whole connection.
                raise AmqpError(
                    f"message properties and headers too large: {len(content_frame)} bytes, "
                    f"over the broker's frame size limit of {self.frame_max}"
                )
            parts = [method_frame, content_frame]
            chunk = self.frame_max - 8  # frame header (7) and frame end (1)
            for start in range(0, len(body), chunk):  # an empty body has no body frame
                parts.append(body_frame(channel_id, body[start : start + chunk]))
        except (ValueError, TypeError) as exc:
            raise AmqpError(f"cannot encode message: {exc}") from None
        return b"".join(parts)


def check_publish_names(exchange: str, routing_key: str) -> None:
    """Raise AmqpError when a basic.publish to these names cannot be encoded.

    pamqp checks an exchange name against AMQP 0-9-1's grammar (letters, digits,
    `-_.:`, at most 127 characters) and a routing key's length (255 bytes).
    """
    try:
        _publish_method_frame(1, exchange, routing_key, True)
    except (ValueError, TypeError) as exc:
        raise AmqpError(f"cannot publish to exchange {exchange!r}: {exc}") from None


@functools.lru_cache(maxsize=1024)
def _publish_method_frame(
    channel_id: int, exchange: str, routing_key: str, mandatory: bool
) -> bytes:
    """The basic.publish frame: the same bytes for every job of a rule, so encoded once."""
    method = commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    return frame.marshal(method, channel_id)


# --- entry points -------------------------------------------------------------


async def serve_amqp_connection(
    url: str,
    options: AmqpOptions | None = None,
    *,
    task_status: trio.TaskStatus[AmqpConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open a connection and serve it until it closes; use with `nursery.start`.

    `nursery.start` returns the open AmqpConnection, or raises
    AmqpConnectionError if it could not be opened. Once started, this task
    never raises broker faults: it returns when the connection is closed
    (by `aclose`, by the broker, or because it was lost), leaving the reason
    in `conn.close_reason`.
    """
    conn = AmqpConnection(url, options)
    await conn._connect()
    await conn._serve(task_status)


@asynccontextmanager
async def open_amqp_connection(
    url: str, options: AmqpOptions | None = None
) -> AsyncIterator[AmqpConnection]:
    """`async with open_amqp_connection(url) as conn:`; closes the connection on exit.

    Raises AmqpConnectionError on entry if the connection cannot be opened.
    """
    conn = AmqpConnection(url, options)
    await conn._connect()  # outside the nursery, so its error is not wrapped in a group
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn._serve)
            try:
                yield conn
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE_S * 2):
                    await conn.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The connection's tasks never raise, so a lone exception is the body's own.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def message_properties(
    *,
    content_type: str | None = None,
    message_id: str | None = None,
    headers: FieldTable | None = None,
    persistent: bool = True,
    timestamp: float | None = None,
) -> Properties:
    """Basic.Properties for the common cases (timestamp in epoch seconds, default now)."""
    when = datetime.fromtimestamp(time.time() if timestamp is None else timestamp, UTC)
    return Properties(
        content_type=content_type,
        message_id=message_id,
        headers=headers,
        delivery_mode=2 if persistent else 1,
        timestamp=when,
    )
