"""The KCP listener: Trio I/O around the sans-io codec, one task pair per connection.

Each connection has a reader and a writer. The reader parses everything a
receive brought, answers what it can itself (PING, syntax errors), and sends
the rest to the actor as ONE request, so a pipelining client pays the channel
and group-commit costs once per chunk, not per message. Answers are slots in a
FIFO; the writer sends the head slots as soon as they are filled, which keeps
responses in request order whatever order the work completes in.

Memory per connection is bounded in bytes, not only in messages: each slot
counts what it holds (its request until the answer comes, then its answer),
and the reader stops reading while `max_pipelined` slots or
`max_pending_bytes` bytes wait, so a client that sends and never reads fills
its own TCP window, not the server's memory. Answers are encoded only when
written, at most WRITE_CHUNK at a time (plus one answer larger than that), so a
pipeline of GETs of a 1 MiB job holds references, not copies.

Time is bounded too: a message begun must end within `message_timeout_s`
(each byte does not restart a clock, so trickling bytes cannot hold a
connection), a connection that exchanges no message for `idle_timeout_s` is
closed (also one whose answers wait that long for the client to read them),
and with tokens configured a connection must AUTH within `auth_timeout_s`. The
connection limit has a share per client address. Each of these ends the
connection with `* ERROR "<reason>"` after the answers before it.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import Callable

import structlog
import trio

from kairoi_trio.commands import Command, CommandError, Request, Result
from kairoi_trio.config import ControllerConfig, parse_address
from kairoi_trio.core.actor import ActorClient
from kairoi_trio.core.auth import Role, TokenTable, denial, permitted
from kairoi_trio.model import Job, Rule
from kairoi_trio.protocols import accept
from kairoi_trio.protocols.kcp import codec
from kairoi_trio.protocols.kcp.instructions import (
    Answer,
    Authenticate,
    render,
    renders_data,
    translate,
)
from kairoi_trio.protocols.limits import ConnectionLimits, peer_host

log = structlog.get_logger(__name__)

_NOT_YET = object()
RECEIVE_SIZE = 65536
TLS_HANDSHAKE_S = 10.0  # a TLS client must finish its handshake within this
TLS_CLOSE_S = 1.0  # for close_notify at the end of a TLS connection
WRITE_CHUNK = 65536  # answers are encoded and sent this much at a time
SLOT_OVERHEAD = 64  # bytes a slot costs besides its id and arguments
CLOSE_FLUSH_S = 5.0  # after a timeout, the answers still owed get this long to go out
REFUSAL_SEND_S = 1.0  # a refused connection gets this long to take its answer

# Token guessing over AUTH: the first failures of a connection are answered at once
# (a typo), each further one AUTH_DELAY_S later, doubling (and so is every answer
# behind it), and the connection is closed at the AUTH_MAX_FAILURES-th: ten
# guesses cost a connection about 30 s instead of microseconds.
AUTH_FREE_FAILURES = 3
AUTH_DELAY_S = 0.5
AUTH_MAX_FAILURES = 10


class _Slot:
    """One answer to come, in request order."""

    __slots__ = ("id", "result", "data", "with_data", "command", "size")

    def __init__(self, id: str, data: bytes | None = None, size: int = 0) -> None:
        self.id = id
        self.with_data = False  # GET, RULE GET, SCHEDULE answer OK with data; the rest a bare OK
        self.command: Command | None = None  # kept when with_data: what render() answers
        self.data = data  # the encoded answer, once known
        self.result: object = _NOT_YET  # the actor's result, rendered by the writer
        # Bytes counted against max_pending_bytes until written: the request's, then
        # the answer's too (an estimate until it is encoded).
        self.size = SLOT_OVERHEAD + len(id) + (len(data) if data is not None else size)

    def ready(self) -> bool:
        return self.data is not None or self.result is not _NOT_YET

    def encode(self) -> bytes:
        if self.data is not None:
            return self.data
        result = self.result
        if isinstance(result, CommandError):
            return codec.error(self.id, result.message)
        if not self.with_data:
            return codec.ok(self.id)
        try:
            return codec.ok(self.id, *render(result, self.command))
        except Exception as error:  # every request gets its answer; the connection goes on
            log.exception("kcp answer could not be rendered", id=self.id)
            return codec.error(self.id, f"internal error: the answer could not be written: {error}")


class KcpServer:
    def __init__(
        self,
        actor: ActorClient,
        config: ControllerConfig,
        *,
        auth: TokenTable | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """auth: the configured tokens and their roles; None or empty: everyone is admin.
        tls: a server-side context ([controller] tls_cert, tls_key): KCP inside TLS."""
        self._tls = tls
        self._actor = actor
        self._config = config
        self.auth = auth or TokenTable()
        self.limits = ConnectionLimits(config.max_connections, config.max_connections_per_address)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; started() gives the bound port (useful with port 0)."""
        host, port = parse_address(self._config.listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            message = f"KCP cannot listen on {self._config.listen}: {error.strerror}"
            raise OSError(error.errno, message) from None
        bound = listeners[0].socket.getsockname()[1]
        log.info("kcp listening", host=host, port=bound, tls=self._tls is not None)
        task_status.started(bound)
        await accept.serve_listeners(
            self._handle,
            listeners,
            name="kcp",
            refusal=codec.error(None, "server has too many open files"),
        )

    async def _handle(self, stream: trio.SocketStream) -> None:
        address = peer_host(stream)
        refusal = self.limits.enter(address)
        try:
            async with stream:
                if refusal is not None:
                    with trio.move_on_after(REFUSAL_SEND_S):
                        await stream.send_all(codec.error(None, refusal))
                    return
                if self._tls is not None:
                    await self._serve_tls(stream)
                    return
                await _Connection(self, stream).serve()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (also from inside the connection's nursery: a reset)
        except* Exception:  # one connection's bug must not stop the listener
            log.exception("kcp connection failed")
        finally:
            self.limits.leave(address)

    @property
    def connections(self) -> int:
        """Connections open now (refused ones included, until they are closed)."""
        return self.limits.open

    async def _serve_tls(self, stream: trio.SocketStream) -> None:
        """KCP inside TLS: the handshake within TLS_HANDSHAKE_S, then the connection as
        usual. A client that does not speak TLS (a plain-text KCP client) gets no KCP
        answer at all, only, perhaps, a TLS alert."""
        assert self._tls is not None
        tls = trio.SSLStream(stream, self._tls, server_side=True, https_compatible=True)
        with trio.move_on_after(TLS_HANDSHAKE_S) as handshake:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as error:
                reason = str(error.__cause__ or error)
                log.debug("kcp tls handshake failed", peer=_peer_text(stream), error=reason)
                return
        if handshake.cancelled_caught:
            log.debug("kcp tls handshake timed out", peer=_peer_text(stream))
            return
        await _Connection(self, tls).serve()
        with trio.move_on_after(TLS_CLOSE_S):
            await tls.aclose()  # close_notify, so that the client sees a clean end


class _Connection:
    def __init__(self, server: KcpServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        self.config = server._config
        self.parser = codec.KcpParser(self.config.max_message_bytes)
        self.pending: deque[_Slot] = deque()
        # Set by AUTH; None until then when tokens are configured (admin when not).
        self.role: Role | None = server.auth.anonymous
        self.auth_failures = 0
        self._late_auth: tuple[_Slot, float, bool] | None = None  # a failed AUTH answered late
        self._late_auth_wait: trio.CancelScope | None = None  # its delay; _end cuts it short
        self.reading = True
        self.answered = trio.Event()  # set when a slot gets its answer
        self.written = trio.Event()  # set when the writer freed slots
        self.pending_bytes = 0  # the sizes of the slots not yet written
        now = trio.current_time()
        self.last_exchange = now  # a message received or answers written (idle clock)
        self.message_since: float | None = None  # when the unfinished message began
        self.closing: str | None = None  # why the server ends the connection
        self.close_by = math.inf  # the deadline of the last answers' flush, once closing
        self._wait_scope: trio.CancelScope | None = None  # the reader's wait for the client

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, nursery.cancel_scope)
            if self.role is None and self.config.auth_timeout_s:
                nursery.start_soon(self._auth_deadline)
            try:
                await self._read_loop()
            finally:
                self.reading = False
                self.answered.set()
                if 1 < self.auth_failures < AUTH_MAX_FAILURES:
                    log.warning("kcp auth failed", peer=self._peer(), failures=self.auth_failures)

    # -- reading ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        parser = self.parser
        while not self.closing:
            data: bytes | bytearray | None = None
            timed_out = ""
            with trio.CancelScope() as self._wait_scope:  # cancelled by _end
                await self._wait_for_room()
                deadline, reason = self._read_deadline()
                with trio.move_on_at(deadline) as timer:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                if timer.cancelled_caught:
                    timed_out = reason
            self._wait_scope = None
            if self.closing:
                return
            if timed_out:
                self._end(timed_out)
                return
            if not data:
                await self._handle_events(parser.close())
                return
            held = parser.buffered
            parser.feed(bytes(data))  # no copy of bytes; an SSLStream may give a bytearray
            events = parser.events()
            now = trio.current_time()
            if events:
                self.last_exchange = now
            if not parser.buffered:
                self.message_since = None
            elif self.message_since is None or parser.buffered < held + len(data):
                self.message_since = now  # a message ended in this data: the rest is a new one
            if not await self._handle_events(events):
                return

    async def _wait_for_room(self) -> None:
        """Backpressure: wait while too many answers, or too many bytes, are waiting."""
        limit, byte_limit = self.config.max_pipelined, self.config.max_pending_bytes
        if len(self.pending) < limit and self.pending_bytes < byte_limit:
            return
        paused = trio.current_time()
        while len(self.pending) >= limit or self.pending_bytes >= byte_limit:
            await self.written.wait()
        if self.message_since is not None:  # the client's clock stops while it is not read
            self.message_since += trio.current_time() - paused

    def _read_deadline(self) -> tuple[float, str]:
        """When the wait for the client's next bytes ends, and why."""
        config = self.config
        deadline, reason = math.inf, ""
        if config.idle_timeout_s:
            deadline, reason = self.last_exchange + config.idle_timeout_s, "idle timeout"
        if self.message_since is not None and config.message_timeout_s:
            message_deadline = self.message_since + config.message_timeout_s
            if message_deadline < deadline:
                deadline, reason = message_deadline, "message timed out"
        return deadline, reason

    async def _auth_deadline(self) -> None:
        await trio.sleep(self.config.auth_timeout_s)
        if self.role is None:
            self._end("authentication timed out")

    def _end(self, reason: str) -> None:
        """Close the connection: the answers owed, then `* ERROR reason`, within CLOSE_FLUSH_S."""
        if self.closing:
            return
        log.debug("kcp connection closed", peer=self._peer(), reason=reason)
        self.closing = reason
        self._queue(_Slot("*", codec.error(None, reason)))
        self.close_by = trio.current_time() + CLOSE_FLUSH_S
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        if self._late_auth_wait is not None:  # the held answer goes now, before the reason:
            self._late_auth_wait.cancel()  # its delay (up to 16 s) would outlast the flush
        self.answered.set()

    def _queue(self, slot: _Slot) -> None:
        self.pending.append(slot)
        self.pending_bytes += slot.size

    async def _handle_events(self, events: list) -> bool:
        """Queue answers for one receive's worth of events; False: stop reading."""
        commands: list[Command] = []
        slots: list[_Slot] = []
        keep_reading = True
        for event in events:
            if isinstance(event, codec.Message):
                slot = _Slot(event.id, size=sum(map(len, event.args)))
                self._queue(slot)
                command = self._translate(event, slot)
                if command is not None:
                    if renders_data(command):
                        slot.with_data = True
                        slot.command = command
                    commands.append(command)
                    slots.append(slot)
                elif self._late_auth is not None:  # what came before it is not held up
                    if commands:
                        await self.server._actor.submit(Request(commands, self._replier(slots)))
                        commands, slots = [], []
                    # The only wait in this loop: the AUTH deadline may end the connection
                    # meanwhile (_end), and nothing is answered after its reason.
                    if not await self._answer_late_auth() or self.closing:
                        keep_reading = False
                        break
            elif isinstance(event, codec.BadMessage):
                self._queue(_Slot("*", codec.error(event.id, event.reason)))
            else:  # FatalError: answer, then close once earlier answers are out
                self._queue(_Slot("*", codec.error(None, event.reason)))
                keep_reading = False
                break
        if commands:
            await self.server._actor.submit(Request(commands, self._replier(slots)))
        if self.pending and self.pending[0].ready():
            self.answered.set()
        return keep_reading

    def _translate(self, message: codec.Message, slot: _Slot) -> Command | None:
        try:
            action = translate(message.args)
        except CommandError as error:
            slot.data = codec.error(message.id, error.message)
            return None
        if isinstance(action, Answer):
            slot.data = codec.ok(message.id, *action.args)
        elif isinstance(action, Authenticate):
            self._authenticate(action.token, slot)
        elif self.role is None:
            slot.data = codec.error(message.id, "authentication required: send AUTH <token>")
        elif self.role is not Role.ADMIN and not permitted(self.role, action):
            slot.data = codec.error(message.id, denial(self.role, action))
        else:
            return action
        return None

    def _authenticate(self, token: str, slot: _Slot) -> None:
        """AUTH: a known token sets the connection's role; a wrong one leaves it as it
        was and counts against the connection (see AUTH_FREE_FAILURES)."""
        role = self.server.auth.role_of(token)
        if role is not None:
            self.role = role
            slot.data = codec.ok(slot.id)
            return
        self.auth_failures += 1
        failures = self.auth_failures
        if failures == 1:  # the rest are counted in one line when the connection ends
            log.warning("kcp auth failed", peer=self._peer(), failures=1)
        if failures >= AUTH_MAX_FAILURES:
            log.warning("kcp auth failed too often", peer=self._peer(), failures=failures)
            self._late_auth = (slot, 0.0, True)
        elif failures > AUTH_FREE_FAILURES:
            self._late_auth = (slot, AUTH_DELAY_S * 2 ** (failures - AUTH_FREE_FAILURES - 1), False)
        else:
            slot.data = codec.error(slot.id, "invalid token")

    async def _answer_late_auth(self) -> bool:
        """Answer the failed AUTH held by _authenticate after its delay; False once the
        connection has failed too often and must close (after the answers before)."""
        assert self._late_auth is not None
        slot, delay, last = self._late_auth
        self._late_auth = None
        if delay and not self.closing:  # (closing: it goes now, before the reason)
            self.answered.set()  # the answers before it go out meanwhile
            with trio.CancelScope() as self._late_auth_wait:
                await trio.sleep(delay)
            self._late_auth_wait = None
        reason = "invalid token"
        if last:
            reason += f": {self.auth_failures} failed AUTH on this connection, closing it"
        slot.data = codec.error(slot.id, reason)
        self.answered.set()
        return not last

    def _peer(self) -> str:
        return _peer_text(self.stream)

    def _replier(self, slots: list[_Slot]) -> Callable[[list[Result]], None]:
        def reply(results: list[Result]) -> None:
            added = 0
            for slot, result in zip(slots, results, strict=True):
                if slot.with_data or isinstance(result, CommandError):
                    slot.result = result
                    size = _answer_size(result)
                    slot.size += size
                    added += size
                else:
                    slot.result = None  # a bare OK: the stored job is not held for it
            self.pending_bytes += added
            self.answered.set()  # the writer's current event, read at call time

        return reply

    # -- writing ----------------------------------------------------------------

    async def _write_loop(self, connection_scope: trio.CancelScope) -> None:
        """Write the answers in order as they come; the connection ends when this returns."""
        pending = self.pending
        try:
            while True:
                self.answered = trio.Event()
                out = bytearray()
                taken = size = 0
                while pending and pending[0].ready() and len(out) < WRITE_CHUNK:
                    slot = pending.popleft()
                    out += slot.encode()
                    taken += 1
                    size += slot.size
                if taken:
                    if out and not await self._send(out):
                        return
                    self.pending_bytes -= size
                    self.written.set()
                    self.written = trio.Event()
                    continue
                if not self.reading and not pending:
                    return
                with trio.move_on_at(self.close_by):
                    await self.answered.wait()
                if trio.current_time() >= self.close_by:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone
        finally:
            connection_scope.cancel()  # stop reading too (and the AUTH deadline)

    async def _send(self, data: bytearray) -> bool:
        """Send, within the idle timeout (or the closing flush); False: the client
        did not take the data in time, the connection is dropped."""
        deadline = self.close_by
        if self.config.idle_timeout_s:
            deadline = min(deadline, trio.current_time() + self.config.idle_timeout_s)
        with trio.move_on_at(deadline):
            await self.stream.send_all(data)
            self.last_exchange = trio.current_time()
            return True
        log.debug("kcp client does not read its answers", peer=self._peer())
        return False


def _answer_size(result: object) -> int:
    """What the answer to `result` will take once encoded, about (before escaping)."""
    if isinstance(result, Job):
        size = len(result.id) + len(result.payload) + 48
        if result.recurrence is not None:  # the schedule's fields and the last outcome
            schedule = result.recurrence.schedule
            size += len(schedule.expression) + len(schedule.tz) + len(result.last_outcome) + 320
        return size
    if isinstance(result, Rule):
        return len(result.id) + len(result.pattern) + len(repr(result.runner))
    if isinstance(result, CommandError):
        return len(result.message) + 16
    return 16


def _peer_text(stream: trio.abc.Stream) -> str:
    """The client's "host:port", for logs; "?" when unknown."""
    found: object = stream
    while not isinstance(found, trio.SocketStream):  # under TLS: the TCP stream
        found = getattr(found, "transport_stream", None)
        if found is None:
            return "?"
    try:
        host, port = found.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
