"""gRPC calls on Trio: the listener, a reader and a writer per connection, calls.

`wire.GrpcConnection` does the protocol; this module moves its bytes. A
streaming call (a `Method`) runs in its own task under its deadline; a unary
`UnaryMethod` call has none, its answer comes from whoever it was handed to
(the actor's reply). The writer sends whatever the calls queued, so the
answers of calls that end together (the replies of one group commit) leave in
one write.

Shutdown (server.serve_grpc): `stop_accepting` closes the listeners and sends
every connection a GOAWAY, `wait_idle` waits for the calls in flight, then
`cancel_all` closes the connections.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import h2.errors
import hyperframe.frame
import structlog
import trio

from kairoi_trio.protocols import accept
from kairoi_trio.protocols.grpc import wire
from kairoi_trio.protocols.limits import ConnectionLimits, peer_host

log = structlog.get_logger(__name__)

RECEIVE_BYTES = 64 << 10
# Request messages a connection holds for its calls, past which a call is refused
# RESOURCE_EXHAUSTED: whole messages waiting for their calls (as they came,
# compressed or not); the compressed ones the calls took, inflated, while they
# keep them (a unary request until its call ends);
# the request of a call that answers with a stream until it ends (a WatchJobs
# keeps it for the watch's whole life). Each counts MESSAGE_OVERHEAD more than its
# bytes. Flow control bounds the bytes on the wire, which the client pays for one
# by one (wire.PARTIAL_BYTES, 32 MiB, of messages not yet taken), not what they
# inflate to (4 KB of gzip can be 4 MiB) nor how long calls keep them.
# HELD_BYTES at least, and HELD_MESSAGES of the largest (GrpcServer.held_bytes),
# so that a raised max_message_bytes is always taken. The same bound applies,
# each on its own, to the messages streaming handlers keep (`Call.messages(keep=
# True)`: a handler past it waits) and to the answers queued on the connection
# that its client's windows have not taken (`_Connection.unread_answers`).
HELD_BYTES = 48 << 20
HELD_MESSAGES = 12  # 48 MiB at the default [grpc] max_message_bytes (4 MiB)
MESSAGE_OVERHEAD = 128  # what holding a message costs beyond its bytes (its objects)
# What every connection together holds of requests, held and kept as above, and
# of answers its clients have not read: one address may open 64 connections, the
# server 1,024, each with its own bounds. Past it only what flow control does not
# bound is refused or waits (a request inflated or kept for a watch's life, a
# kept batch, an answer to a call its client does not read), so that one client
# holding it cannot lock the others' ordinary calls out. At least one
# connection's (GrpcServer.server_held_bytes).
SERVER_HELD_BYTES = 1 << 30
MAX_PENDING_OUTPUT = 1 << 20  # past this much unsent, a connection is not read
PREFACE_TIMEOUT_S = 20.0  # to finish a TLS handshake and send the HTTP/2 preface and SETTINGS
FLUSH_AT_CLOSE_S = 1.0  # what is queued gets this long to go once a connection ends
REFUSAL_SEND_S = 1.0  # a connection past the limits gets this long to take its GOAWAY
KEEPALIVE_TIMEOUT_S = 20.0  # a keepalive PING's answer (any bytes) must come within it


class Abort(Exception):
    """Raised by a handler (`Call.abort`) to end its call with `code` and `details`."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Method:
    """One method a server answers.

    `decode` turns a request message's bytes into what `handler` takes (raising
    on malformed bytes: the call ends INVALID_ARGUMENT). A unary handler returns
    the answer (a protobuf message or its bytes); a streaming one writes with
    `Call.write` and returns None. A streaming request reaches the handler as
    the `Call` itself, to iterate (`Call.messages`).
    """

    request_streaming: bool
    response_streaming: bool
    decode: Callable[[bytes], Any]
    handler: Callable[[Any, Call], Awaitable[Any]]


@dataclass(frozen=True)
class UnaryMethod:
    """A unary method answered without a task of its own, for the calls that only
    hand commands to the actor: `begin(request, call)` starts the call and must
    not block; whatever it hands the call to ends it with `Call.answer` or
    `Call.fail`, in this thread (the actor's reply, say). A task and an event a
    call cost ~35-55 us, a tenth of a SetJob's CPU.

    Such a call is not cancelled at its deadline: its command may be in the
    actor's queue already and is applied anyway; the client stops waiting on
    its own, as it does for any call.
    """

    decode: Callable[[bytes], Any]
    begin: Callable[[Any, Call], None]


# What the server asks before it runs a call: None lets it run, else (code, details).
Authorize = Callable[[str, tuple[tuple[str, str | bytes], ...], str], "tuple[int, str] | None"]


# A streaming request's messages as they came: (bytes, wire size, encoding or None).
_Message = tuple[bytes, int, bytes | None]
_Inbox = tuple[trio.MemorySendChannel[_Message], trio.MemoryReceiveChannel[_Message]]


class Call:
    """What a handler sees of its call: metadata, peer, and the ways to answer."""

    def __init__(
        self,
        connection: _Connection,
        stream_id: int,
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
        deadline: float,
    ) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self.scope = trio.CancelScope(deadline=deadline)
        self.reset = False  # the client or the protocol ended it: nobody to answer
        self.done = False  # over, and no longer counted (GrpcServer.wait_idle)
        self.task = False  # runs in a task of its own (else a UnaryMethod's, or waiting)
        self.request: bytes | None = None  # a unary call's request, until it is whole
        self.request_encoding: bytes | None = None  # compressed with it (None: not)
        self.held = 0  # bytes of its requests the connection holds for it (held_bytes)
        self.kept: deque[int] = deque()  # what each message its handler keeps counts (keep)
        self._inbox: _Inbox | None = None  # a streaming request's messages

    def peer(self) -> str:
        """ "ipv4:127.0.0.1:54321" or "ipv6:[::1]:54321", as grpc-core names peers."""
        return self._connection.peer

    async def abort(self, code: int, details: str) -> NoReturn:
        """End the call with `code` (a grpc status code number) and `details`."""
        raise Abort(code, details)

    def answer(self, message: Any) -> None:
        """End a UnaryMethod's call with its answer (a protobuf message or its bytes);
        RESOURCE_EXHAUSTED instead if the client has not read the connection's
        earlier answers (`_Connection.unread_answers`)."""
        if not self.done:
            data = message if isinstance(message, bytes) else message.SerializeToString()
            if not self.reset:
                refusal = self._connection.unread_answers(self.stream_id, len(data))
                if refusal:
                    self.fail(wire.RESOURCE_EXHAUSTED, refusal)
                    return
                self._connection.grpc.send_message(self.stream_id, data)
            self.fail(wire.OK, "")

    def fail(self, code: int, details: str) -> None:
        """End a UnaryMethod's call with status `code` and `details`."""
        if not self.done:
            if not self.reset:
                self._connection.grpc.end_call(self.stream_id, code, details)
            self._connection.finish(self)

    async def send_initial_metadata(self) -> None:
        """Send the answer's headers now (a client sees the call has begun)."""
        self._connection.grpc.send_headers(self.stream_id)
        self._connection.wake_writer()

    async def write(self, message: Any) -> None:
        """Send one answer message (a protobuf message or its bytes); returns once it is
        handed to the connection's writer, which waits for the client's window: a
        client that does not read holds the write. Raises trio.BrokenResourceError
        if the call is over."""
        data = message if isinstance(message, bytes) else message.SerializeToString()
        connection = self._connection
        server = connection.server
        # Its client does not read the call: it waits for a read of its connection
        # (that client reading, or its other calls' answers going out).
        while connection.unread_answers(self.stream_id, len(data)):
            if not connection.grpc.is_open(self.stream_id):
                break  # send_message says so
            server.answer_waiters += 1
            try:
                await connection.written()
            finally:
                server.answer_waiters -= 1
        if not connection.grpc.send_message(self.stream_id, data):
            raise trio.BrokenResourceError("the call is over")
        connection.wake_writer()
        while connection.grpc.buffered(self.stream_id):
            await connection.written()

    async def messages(self, keep: bool = False) -> Any:
        """The request messages of a streaming call, decoded, as the client sends them.

        The handler lets go of each message before it asks for the next, unless
        `keep`: then it may keep messages after it takes more (StreamSetJobs: the
        batches in flight) and calls `let_go` as it lets go of each, oldest first.
        A kept message counts against the connection's held bytes (its bytes,
        inflated if compressed) until then, and taking a message waits while the
        connection keeps more than those and this call keeps any: the stream is
        slowed, not refused, and a call that keeps nothing always goes on.
        Raises Abort: RESOURCE_EXHAUSTED past max_message_bytes inflated,
        INTERNAL for a corrupt compressed message, INVALID_ARGUMENT for a
        malformed one.
        """
        assert self._inbox is not None
        connection, server = self._connection, self._connection.server
        decode = server.methods[self.method].decode
        async for data, size, encoding in self._inbox[1]:
            connection.release(self, len(data))
            connection.grpc.consumed(self.stream_id, size)
            connection.wake_writer()  # the credit goes out as a WINDOW_UPDATE
            data = server.inflate(data, encoding)
            if keep:
                await connection.keep(self, len(data))
            message = server.decode(decode, data, self)
            del data  # while the handler waits for the next, nothing here holds this one
            yield message
            del message

    def let_go(self) -> None:
        """The handler let go of the oldest message it kept (`messages(keep=True)`)."""
        self._connection.let_go(self)


class GrpcServer:
    """Serves `methods` (by path, `/package.Service/Method`) on the listeners given to
    `serve`, until `shut_down`."""

    def __init__(
        self,
        methods: Mapping[str, Method | UnaryMethod],
        *,
        max_message_bytes: int,
        limits: ConnectionLimits | None = None,
        authorize: Authorize | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_malformed: Callable[[str, str, Exception], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
        idle_timeout_s: float = 0.0,
        keepalive_s: float = 0.0,
    ) -> None:
        self.methods = dict(methods)
        self.max_message_bytes = max_message_bytes
        self.held_bytes = max(HELD_BYTES, HELD_MESSAGES * (max_message_bytes + MESSAGE_OVERHEAD))
        self.server_held_bytes = max(SERVER_HELD_BYTES, self.held_bytes)
        self.held = 0  # request bytes every connection holds and keeps (server_held_bytes)
        self.room = trio.Event()  # set (and replaced) when held bytes are let go of
        self.room_waiters = 0  # calls waiting for it (`_Connection.keep`)
        self.answer_waiters = 0  # streaming writes waiting for room (`Call.write`)
        self.limits = limits or ConnectionLimits(1 << 31, 0)
        self._authorize = authorize
        self._ssl_context = ssl_context
        self._on_malformed = on_malformed
        self._on_refused = on_refused  # (peer, reason): grpc clients do not show the reason
        self.idle_timeout_s = idle_timeout_s  # 0: never
        self.keepalive_s = keepalive_s  # 0: never
        self._streaming_requests = frozenset(
            path
            for path, method in self.methods.items()
            if isinstance(method, Method) and method.request_streaming
        )
        self._connections: set[_Connection] = set()
        self._accepting_scope = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()
        self._calls = 0

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until cancelled; `stop_accepting` closes the listeners."""
        async with trio.open_nursery() as connections:
            with self._accepting_scope:
                task_status.started()
                try:
                    await accept.serve_listeners(
                        self._serve_connection,
                        listeners,
                        name="grpc",
                        refusal=_REFUSAL,
                        handler_nursery=connections,
                    )
                finally:
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        address = peer_host(stream)
        refusal = self.limits.enter(address)
        try:
            if refusal is None:
                await self._serve_admitted(stream)
                return
            if self._on_refused is not None:
                self._on_refused(_peer_name(stream), refusal)
            if self._ssl_context is None:  # (under TLS it would be garbage: closed)
                with trio.move_on_after(REFUSAL_SEND_S):
                    try:
                        await stream.send_all(_goaway(_CALM, refusal))
                    except _GONE:
                        pass
        finally:
            self.limits.leave(address)

    async def _serve_admitted(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        transport: trio.abc.Stream = stream
        if self._ssl_context is not None:
            transport = trio.SSLStream(stream, self._ssl_context, server_side=True)
        connection = _Connection(self, transport, peer)
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:  # a fault of this module: the connection ends, the server goes on
            log.exception("grpc connection failed", peer=peer)
        finally:
            self._connections.discard(connection)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(transport)

    def stop_accepting(self) -> None:
        """No new connections, and every connection is told to open no new call."""
        self._accepting_scope.cancel()
        for connection in list(self._connections):
            connection.go_away()

    async def wait_idle(self) -> None:
        """Until no call is in flight."""
        await self._idle.wait()

    def cancel_all(self) -> None:
        """Close every connection now (the calls still in flight are cancelled)."""
        for connection in list(self._connections):
            connection.close()

    # -- calls -----------------------------------------------------------------

    def call_began(self) -> None:
        if self._calls == 0:
            self._idle = trio.Event()
        self._calls += 1

    def call_ended(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._idle.set()

    def let_go(self, size: int) -> None:
        """`size` held bytes are let go of: the calls waiting for room may go on."""
        self.held -= size
        if self.room_waiters:  # (a new Event a message would cost every call)
            room, self.room = self.room, trio.Event()
            room.set()

    @property
    def queued_answers(self) -> int:
        """The answer bytes every connection's client has not taken yet (summed when
        asked: only a call whose client does not read it asks)."""
        return sum(connection.grpc.queued_answers for connection in self._connections)

    def check(self, call: Call) -> tuple[int, str] | None:
        """Why the call may not run (code, details), or None."""
        if self._authorize is None:
            return None
        return self._authorize(call.method, call.metadata, call.peer())

    def inflate(self, data: bytes, encoding: bytes | None) -> bytes:
        """A request message as its call takes it, inflated if compressed; Abort
        (RESOURCE_EXHAUSTED past max_message_bytes, INTERNAL if corrupt) if not."""
        if encoding is None:
            return data
        try:
            return wire.inflate(data, encoding, self.max_message_bytes)
        except wire.TooLarge as error:
            raise Abort(wire.RESOURCE_EXHAUSTED, str(error)) from None
        except ValueError as error:
            raise Abort(wire.INTERNAL, str(error)) from None

    def decode(self, decode: Callable[[bytes], Any], data: bytes, call: Call) -> Any:
        """A request message, decoded; Abort(INVALID_ARGUMENT) if it is malformed."""
        try:
            return decode(data)
        except Exception as error:  # DecodeError, or anything a parser may raise
            if self._on_malformed is not None:
                self._on_malformed(call.method, call.peer(), error)
            raise Abort(wire.INVALID_ARGUMENT, f"malformed request: {error}") from None

    @property
    def streaming_requests(self) -> frozenset[str]:
        return self._streaming_requests


class _Connection:
    """One client connection: reads events, starts calls, writes what they queue.

    A call is counted (GrpcServer.wait_idle) from its start to `finish`, whatever
    ends it: its task, its UnaryMethod's answer, the client, or the connection.
    """

    def __init__(self, server: GrpcServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.grpc = wire.GrpcConnection(server.max_message_bytes, server.streaming_requests)
        self._calls: dict[int, Call] = {}
        self._held = 0  # bytes of whole requests held for calls (unary, or not yet read)
        self._kept = 0  # bytes of the messages streaming handlers keep (Call.messages)
        self._has_output = trio.Event()
        self._written = trio.Event()  # set after each round of the writer
        self._closed = False
        self._scope = trio.CancelScope()
        self.last_received = self.idle_since = trio.current_time()

    def wake_writer(self) -> None:
        self._has_output.set()

    async def written(self) -> None:
        """Until the writer's next round (answers handed over, or a call ended)."""
        await self._written.wait()

    def go_away(self) -> None:
        self.grpc.go_away()
        self.wake_writer()

    def close(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write)
                if self.server.keepalive_s or self.server.idle_timeout_s:
                    nursery.start_soon(self._watch)
                self.wake_writer()  # the server's SETTINGS
                try:
                    await self._read(nursery)
                finally:
                    self._closed = True
                    self.wake_writer()
                    for call in list(self._calls.values()):
                        call.reset = True
                        call.scope.cancel()
                        if not call.task:
                            self.finish(call)  # its answer, if it ever comes, goes nowhere
                    # The writer gets a moment to send what is queued (a GOAWAY),
                    # not for ever: a TLS handshake that failed would hold it.
                    nursery.cancel_scope.deadline = trio.current_time() + FLUSH_AT_CLOSE_S

    async def _write(self) -> None:
        grpc, stream = self.grpc, self.stream
        while True:
            await self._has_output.wait()
            self._has_output = trio.Event()
            while data := grpc.data_to_send():  # a budget of answers at a time
                try:
                    await stream.send_all(data)
                except _GONE:  # the client went away: so does the connection
                    self._scope.cancel()
                    return
                self._round_done()
            self._round_done()
            if self._closed:
                return

    async def _watch(self) -> None:
        """Keepalive and idle timeout. A connection nothing came from for keepalive_s
        gets a PING, and is closed if nothing comes within KEEPALIVE_TIMEOUT_S: its
        client vanished without a FIN (a host gone, a network cut), and would hold
        its connection, its calls (a WatchJobs) and a connection slot for ever. A
        connection without a call for idle_timeout_s gets a GOAWAY and is closed
        (a grpc client opens a new one at its next call), as grpc-core's
        max_connection_idle does."""
        keepalive, idle = self.server.keepalive_s, self.server.idle_timeout_s
        while True:
            quiet_until = self.last_received + keepalive if keepalive else math.inf
            idle_until = self.idle_since + idle if idle and not self._calls else math.inf
            wake = min(quiet_until, idle_until, trio.current_time() + max(keepalive, idle))
            await trio.sleep_until(wake)
            now = trio.current_time()
            if idle and not self._calls and now >= self.idle_since + idle:
                log.debug("grpc connection idle: closed", peer=self.peer)
                self.go_away()
                await self.written()
                self.close()
                return
            if keepalive and now >= self.last_received + keepalive:
                self.grpc.ping()
                self.wake_writer()
                await trio.sleep(KEEPALIVE_TIMEOUT_S)
                if self.last_received < now:
                    log.info("grpc client gone: no answer to a keepalive PING", peer=self.peer)
                    self.close()
                    return

    def _round_done(self) -> None:
        written, self._written = self._written, trio.Event()
        written.set()

    async def _read(self, nursery: trio.Nursery) -> None:
        grpc = self.grpc
        # A client has PREFACE_TIMEOUT_S to finish its TLS handshake and send its
        # preface and SETTINGS, however it splits them.
        with trio.move_on_after(PREFACE_TIMEOUT_S):
            while not grpc.preface_received:
                if not await self._receive(nursery):
                    return
                await self._drained()  # PINGs are answered before SETTINGS come
        if not grpc.preface_received:
            return
        while await self._receive(nursery):
            await self._drained()

    async def _drained(self) -> None:
        """A client that does not read its answers is not read either: what h2 has
        to send (answers, PING and SETTINGS acknowledgements) stays bounded."""
        while self.grpc.pending_output() > MAX_PENDING_OUTPUT:
            await self.written()

    async def _receive(self, nursery: trio.Nursery) -> bool:
        """Read once and act on what came; False once the connection is over."""
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except _GONE:  # the client went away, or failed its TLS handshake
            return False
        if not data:
            return False
        self.last_received = trio.current_time()
        for event in self.grpc.receive_data(data):
            if isinstance(event, wire.CallStarted):
                self._start(event, nursery)
            elif isinstance(event, wire.MessageReceived):
                self._message(event)
            elif isinstance(event, wire.RequestEnded):
                self._request_ended(event.stream_id, nursery)
            elif isinstance(event, wire.CallEnded):
                self._ended(event.stream_id)
            elif isinstance(event, wire.ConnectionEnded):
                self.wake_writer()
                if event.error:
                    log.info("grpc connection closed", peer=self.peer, error=event.error)
                return False
        self.wake_writer()
        return True

    def _start(self, event: wire.CallStarted, nursery: trio.Nursery) -> None:
        stream_id = event.stream_id
        method = self.server.methods.get(event.method)
        if method is None:
            self.grpc.end_call(
                stream_id, wire.UNIMPLEMENTED, f"Method not found: {event.method[:200]}"
            )
            return
        deadline = math.inf if event.timeout_s is None else trio.current_time() + event.timeout_s
        call = Call(self, stream_id, event.method, event.metadata, deadline)
        refusal = self.server.check(call)
        if refusal is not None:
            self.grpc.end_call(stream_id, *refusal)
            return
        self._calls[stream_id] = call
        self.server.call_began()
        if isinstance(method, Method) and method.request_streaming:
            call._inbox = trio.open_memory_channel(math.inf)  # bounded: held_bytes, windows
            self._run(call, method, call, nursery)

    def hold(self, call: Call, size: int, *, unbounded: bool = False) -> None:
        """Count a request message of `size` bytes held for `call` (until `release`
        or the call's end); Abort(RESOURCE_EXHAUSTED) past the server's held_bytes
        on this connection, or, if flow control does not bound it (`unbounded`:
        inflated), past its server_held_bytes on every connection."""
        size += MESSAGE_OVERHEAD
        server = self.server
        if self._held + size > server.held_bytes:
            raise Abort(
                wire.RESOURCE_EXHAUSTED,
                f"too many request bytes held on this connection (over {server.held_bytes})",
            )
        if unbounded:
            self._check_server(size)
        self._held += size
        server.held += size
        call.held += size

    def _check_server(self, size: int) -> None:
        """Abort(RESOURCE_EXHAUSTED) if `size` more held bytes would take every
        connection together past the server's server_held_bytes. Only what flow
        control does not bound is refused so (a request inflated, or kept for a
        call's whole life): a client holding the server's bytes with watches
        would otherwise lock every other client's every call out."""
        server = self.server
        if server.held + size > server.server_held_bytes:
            raise Abort(
                wire.RESOURCE_EXHAUSTED,
                f"too many request bytes held by the server (over {server.server_held_bytes})",
            )

    def release(self, call: Call, size: int) -> None:
        """A message of `size` bytes held for `call` is held no longer."""
        size += MESSAGE_OVERHEAD
        self._held -= size
        call.held -= size
        self.server.let_go(size)

    async def keep(self, call: Call, size: int) -> None:
        """Count a message of `size` bytes `call`'s handler keeps (until `let_go`),
        once the connection keeps at most its held bytes with it and the server
        holds at most its server_held_bytes, or at once if the call keeps nothing
        else (so that some call always goes on)."""
        size += MESSAGE_OVERHEAD
        server = self.server
        while call.kept and (
            self._kept + size > server.held_bytes or server.held + size > server.server_held_bytes
        ):
            server.room_waiters += 1
            try:
                await server.room.wait()
            finally:
                server.room_waiters -= 1
        self._kept += size
        server.held += size
        call.kept.append(size)

    def let_go(self, call: Call, every: bool = False) -> None:
        """`call`'s handler let go of its oldest kept message (or of all of them)."""
        if not call.kept:
            return
        size = sum(call.kept) if every else call.kept[0]
        self._kept -= size
        if every:
            call.kept.clear()
        else:
            call.kept.popleft()
        self.server.let_go(size)

    def unread_answers(self, stream_id: int, size: int) -> str:
        """Why an answer of `size` bytes may not be queued on the call now ("" if it
        may): its client does not read the call (its stream's window is spent, or
        was never opened), and with it the answers queued on the connection would
        be more than the server's held bytes, or those of every connection
        together more than its server_held_bytes. A client that reads its calls
        is never refused (24 answers of 4 MB at once to a grpcio channel are
        queued before the writer runs), and one answer a connection always may."""
        queued, limit = self.grpc.queued_answers, self.server.held_bytes
        if not queued or self.grpc.stream_window(stream_id) > 0:
            return ""
        if queued + size > limit:
            return (
                f"the client has not read {queued} bytes of answers on this connection"
                f" (over {limit})"
            )
        server = self.server
        if server.queued_answers + size > server.server_held_bytes:
            return (
                f"the clients have not read {server.queued_answers} bytes of answers on"
                f" this server (over {server.server_held_bytes})"
            )
        return ""

    def _message(self, event: wire.MessageReceived) -> None:
        call = self._calls.get(event.stream_id)
        if call is None or call.done:
            return
        try:
            self.hold(call, len(event.message))
        except Abort as abort:
            self._refuse(call, abort.code, abort.details)
            return
        if call._inbox is not None:
            try:
                call._inbox[0].send_nowait((event.message, event.size, event.encoding))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self.release(call, len(event.message))  # the handler stopped reading
            return
        if call.request is not None:
            self._refuse(call, wire.UNIMPLEMENTED, "unary call with more than one request")
            return
        call.request, call.request_encoding = event.message, event.encoding

    def _request_ended(self, stream_id: int, nursery: trio.Nursery) -> None:
        call = self._calls.get(stream_id)
        if call is None or call.done:
            return
        if call._inbox is not None:
            call._inbox[0].close()
            return
        data = call.request
        if data is None:
            self._refuse(call, wire.UNIMPLEMENTED, "unary call without a request message")
            return
        call.request = None
        method = self.server.methods[call.method]
        # A compressed request stays counted, inflated, until its call ends, and so
        # does one a call may keep for ever (a WatchJobs, for the watch's whole
        # life); the others are let go of now.
        lasting = isinstance(method, Method) and method.response_streaming
        if call.request_encoding is not None or not lasting:
            self.release(call, len(data))
        try:
            if call.request_encoding is not None:
                data = self.server.inflate(data, call.request_encoding)
                self.hold(call, len(data), unbounded=True)
            elif lasting:  # held since it came, and now for the call's whole life
                self._check_server(0)
        except Abort as abort:
            self._refuse(call, abort.code, abort.details)
            return
        if isinstance(method, UnaryMethod):
            try:
                request = self.server.decode(method.decode, data, call)
            except Abort as abort:
                call.fail(abort.code, abort.details)
                return
            method.begin(request, call)
            return
        self._run(call, method, data, nursery)

    def _ended(self, stream_id: int) -> None:
        """The client reset the call, or the protocol ended it: stop it."""
        call = self._calls.get(stream_id)
        if call is None:
            return
        call.reset = True
        call.scope.cancel()
        if not call.task:
            self.finish(call)

    def _refuse(self, call: Call, code: int, details: str) -> None:
        """End a call with a status before (or while) its handler runs."""
        self.grpc.end_call(call.stream_id, code, details)
        call.reset = True  # answered: its handler, if any, must not answer again
        call.scope.cancel()
        if not call.task:
            self.finish(call)

    def finish(self, call: Call) -> None:
        """The call is over: forget it, let go of what it held, count it off."""
        if call.done:
            return
        call.done = True
        self._calls.pop(call.stream_id, None)
        if not self._calls:
            self.idle_since = trio.current_time()
        self._held -= call.held
        if call.held:
            self.server.let_go(call.held)
        call.held = 0
        self.let_go(call, every=True)
        call.request = None
        self.server.call_ended()
        self.wake_writer()

    def _run(self, call: Call, method: Method, request: Any, nursery: trio.Nursery) -> None:
        call.task = True
        nursery.start_soon(self._call, call, method, request)

    async def _call(self, call: Call, method: Method, request: Any) -> None:
        grpc = self.grpc
        stream_id = call.stream_id
        code, details = wire.OK, ""
        try:
            with call.scope:
                try:
                    if not method.request_streaming:
                        request = self.server.decode(method.decode, request, call)
                    running = method.handler(request, call)
                    del request  # the handler keeps what it needs of it, no more
                    answer = await running
                    if not method.response_streaming:
                        data = answer if isinstance(answer, bytes) else answer.SerializeToString()
                        refusal = self.unread_answers(stream_id, len(data))
                        if refusal:
                            raise Abort(wire.RESOURCE_EXHAUSTED, refusal)
                        grpc.send_message(stream_id, data)
                except Abort as abort:
                    code, details = abort.code, abort.details
                except trio.BrokenResourceError:
                    call.reset = True  # a write to a call that is over
                except Exception as error:
                    log.exception("grpc handler failed", method=call.method)
                    code, details = wire.UNKNOWN, f"Unexpected {type(error).__name__}: {error}"
            if call.scope.cancelled_caught and not call.reset:
                if trio.current_time() >= call.deadline:
                    code, details = wire.DEADLINE_EXCEEDED, "Deadline Exceeded"
                else:
                    code, details = wire.CANCELLED, "Cancelled"
            if not call.reset and grpc.is_open(stream_id):
                grpc.end_call(stream_id, code, details)
        finally:
            if call._inbox is not None:
                call._inbox[1].close()
            self.finish(call)


def _goaway(code: h2.errors.ErrorCodes, reason: str) -> bytes:
    """What a refused connection gets: a GOAWAY saying why, in place of the server's
    SETTINGS. A gRPC client then fails its calls at once with UNAVAILABLE; had
    SETTINGS come first, grpc-core would reconnect in a loop until each call's
    deadline."""
    frame = hyperframe.frame.GoAwayFrame(0)
    frame.error_code = code
    frame.additional_data = reason.encode("ascii")
    return frame.serialize()


_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM  # past the connection limits
# Accepted while the process is out of file descriptors (accept.py).
_REFUSAL = _goaway(h2.errors.ErrorCodes.INTERNAL_ERROR, "server has too many open files")

# What a socket or TLS stream raises when the client goes away.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown"
    if stream.socket.family == trio.socket.AF_INET6:
        return f"ipv6:[{address[0]}]:{address[1]}"
    return f"ipv4:{address[0]}:{address[1]}"
