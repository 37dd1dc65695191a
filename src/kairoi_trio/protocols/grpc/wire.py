"""gRPC over HTTP/2, sans-io: h2's connection state machine plus gRPC's framing.

Bytes in (`receive_data`), events out; calls in (`send_message`, `end_call`),
bytes out (`data_to_send`). No sockets and no tasks (one clock, injectable: the
rate of the client's SETTINGS frames): `transport.py` wraps it in Trio, as h11
and wsproto are wrapped.

What it implements, after "gRPC over HTTP2" (grpc/grpc, doc/PROTOCOL-HTTP2.md):

- A call is an HTTP/2 stream: a POST whose `:path` names the method, with
  `content-type: application/grpc`, and `grpc-timeout` for a deadline.
- A message is a 5-byte prefix (compressed flag, 4-byte big-endian length) and
  its bytes; DATA frames do not have to align with messages.
- The answer is HEADERS (`:status 200`), its messages, then trailers with
  `grpc-status` and a percent-encoded `grpc-message`; a call refused before any
  answer gets the trailers alone ("Trailers-Only").
- Compressed requests (`grpc-encoding: gzip` or `deflate`) are inflated
  (`inflate`) when their call takes them; answers are never compressed.

Flow control: each call's stream window (64 KiB) is the control; the
connection's window is credited as bytes arrive. A request message is
admitted by the size its prefix announces, and stays admitted until its call
takes it (a streaming handler reads it, `consumed`; a unary request ends), up
to PARTIAL_BYTES a connection; a message not admitted waits, its client held
to its window, so a slow handler slows its clients rather than failing them.
Answers are queued per stream and handed to h2 as the client's windows allow;
`buffered` tells how much waits on a call, `queued_answers` on the connection.
"""

from __future__ import annotations

import base64
import time
import zlib
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

# Status codes (grpc/grpc, doc/statuscodes.md); names as grpc.StatusCode has them.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

PREFIX_BYTES = 5  # compressed flag + 4-byte length
# Flow control: the stream windows are the control, the connection's window is
# credited as bytes arrive (so that calls held back cannot starve the others).
CONNECTION_WINDOW = 16 << 20
STREAM_WINDOW = 64 << 10  # what a call may send ahead of being credited (HTTP/2's default)
CREDIT_BYTES = 16 << 10  # credit a stream back once this much is due (fewer WINDOW_UPDATEs)
MAX_HEADER_LIST_BYTES = 16 << 10
MAX_CONCURRENT_STREAMS = 1024
# A grpc-message longer than this, percent-encoded, is cut: hpack's Huffman encoder
# takes time quadratic in a value's length (2 KiB: ~2 ms, 16 KiB: ~50 ms). It holds
# convert.status_details' 200 quoted characters of any script (9 bytes each at most).
MAX_STATUS_BYTES = 2048
_JOIN_BYTES = 16 << 10  # answers up to this size go with their prefix in one DATA frame
# Request messages are admitted, by their announced size, up to this many bytes
# at once on a connection (one always: a message may be up to max_message_bytes),
# from their first byte until their call takes them; the bytes of a message not
# admitted are not credited back past its window.
PARTIAL_BYTES = 32 << 20
SETTINGS_BURST = 100  # SETTINGS frames a client may send at once (see _H2Connection)
SETTINGS_PER_S = 10.0  # and on average
RESETS_BURST = MAX_CONCURRENT_STREAMS  # calls a client may reset at once (all it may have)
RESETS_PER_S = 1000.0  # and on average (a call started and reset costs ~90 us)
WRITE_BUDGET = 256 << 10  # answer bytes handed to h2 for one write to the socket
TURN_BYTES = 64 << 10  # what one call hands h2 before the next call's turn

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_ANSWER_HEADERS = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]
# Bytes grpc-message may carry as they are (the spec's unreserved set, less '%').
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


@dataclass(frozen=True)
class CallStarted:
    """A client opened a call: `method` is the path (`/package.Service/Method`),
    `metadata` its custom headers (`-bin` values decoded), `timeout_s` its deadline
    relative to now (None: none), `peer` unset here (the transport knows it)."""

    stream_id: int
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    timeout_s: float | None


@dataclass(frozen=True)
class MessageReceived:
    """One whole request message of a call, as it came: compressed with `encoding`
    (None: not compressed; `inflate` it when the call takes it). `size` is what it
    took on the wire, for `consumed`."""

    stream_id: int
    message: bytes
    size: int
    encoding: bytes | None = None


@dataclass(frozen=True)
class RequestEnded:
    """The client sent its last message (half-closed its side of the call)."""

    stream_id: int


@dataclass(frozen=True)
class CallEnded:
    """The call is over before its handler finished: the client reset it, or this
    side ended it with a status (a message too large, say). Stop its handler."""

    stream_id: int


@dataclass(frozen=True)
class ConnectionEnded:
    """The client went away (GOAWAY) or broke the protocol: close the connection
    once `data_to_send` is written."""

    error: str | None


Event = CallStarted | MessageReceived | RequestEnded | CallEnded | ConnectionEnded


@dataclass
class _Stream:
    streaming_request: bool = False
    encoding: bytes = b"identity"
    inbound: bytearray = field(default_factory=bytearray)  # a message not yet whole
    held: int = 0  # flow-controlled bytes received and not credited back to the stream
    unconsumed: int = 0  # of which whole messages the call has not taken yet
    admitted: int = 0  # the announced size of the message being received, once admitted
    outbound: deque[bytes] = field(default_factory=deque)  # answer bytes h2 has not taken
    sent: int = 0  # of which, bytes of the first already handed to h2
    buffered: int = 0  # their sum
    headers_sent: bool = False
    trailers: list[tuple[bytes, bytes]] | None = None  # to send once outbound is empty
    ended: bool = False  # trailers queued or the stream reset: nothing more to send
    request_ended: bool = False


class _Flood(h2.exceptions.ProtocolError):
    error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class _Allowance:
    """A token bucket: `take` is True while at most `burst` were taken at once and
    `per_s` on average since (clock: seconds)."""

    def __init__(self, burst: int, per_s: float, clock: Callable[[], float]) -> None:
        self._burst, self._per_s, self._clock = float(burst), per_s, clock
        self._left = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        left = min(self._left + (now - self._at) * self._per_s, self._burst) - 1
        self._left, self._at = left, now
        return left >= 0


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, with the client's SETTINGS and RST_STREAM frames rate-limited.

    h2 walks every open stream for each SETTINGS frame that carries
    INITIAL_WINDOW_SIZE, changed or not, so a flood of them with a thousand calls
    open would hold the one thread for seconds. A call the client opens and
    resets at once ("rapid reset", CVE-2023-44487) frees its slot at once, so
    MAX_CONCURRENT_STREAMS does not bound how many a client starts: ~2,300 in one
    64 KiB read, each a call started and cancelled, while other clients wait.
    Past SETTINGS_BURST SETTINGS frames at once or SETTINGS_PER_S on average,
    and past RESETS_BURST resets at once or RESETS_PER_S on average, the
    connection ends with ENHANCE_YOUR_CALM, as nghttp2 and grpc-core bound such
    floods. (A client sends one SETTINGS, and grpc-core a few more as it sizes
    its windows; a client resets a call it cancels, or whose deadline passed.)
    """

    def __init__(self, config: h2.config.H2Configuration, clock: Callable[[], float]) -> None:
        super().__init__(config)
        self._settings = _Allowance(SETTINGS_BURST, SETTINGS_PER_S, clock)
        self._resets = _Allowance(RESETS_BURST, RESETS_PER_S, clock)

    def _receive_settings_frame(self, frame: Any) -> Any:  # h2's handler of one frame
        if "ACK" not in frame.flags and not self._settings.take():
            raise _Flood("too many SETTINGS frames")
        return super()._receive_settings_frame(frame)

    def _receive_rst_stream_frame(self, frame: Any) -> Any:  # h2's handler of one frame
        if not self._resets.take():
            raise _Flood("too many calls reset")
        return super()._receive_rst_stream_frame(frame)


class GrpcConnection:
    """The server side of one HTTP/2 connection carrying gRPC calls.

    `max_message_bytes` bounds request messages (a larger one ends its call with
    RESOURCE_EXHAUSTED, as grpc-core does) and is not checked on answers, which
    the handlers size themselves. `streaming_requests`: the paths of the methods
    whose requests stream, whose messages are credited back as they are consumed.
    """

    def __init__(
        self,
        max_message_bytes: int,
        streaming_requests: Container[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self._streaming_requests = streaming_requests  # methods credited as consumed
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = _H2Connection(config, clock)
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            },
        )
        self._h2.initiate_connection()
        # Streams past MAX_CONCURRENT_STREAMS are refused here, one by one (h2 would
        # end the connection, every call on it): h2's own limit goes out of the way.
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (1 << 31) - 1,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            },
        )
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST_BYTES  # as advertised
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self._streams: dict[int, _Stream] = {}
        self.closed = False
        self.preface_received = False  # the client's preface and first SETTINGS came
        self._going_away = False
        self._ready: dict[int, None] = {}  # calls with answer bytes or trailers to hand h2
        self._blocked: dict[int, None] = {}  # calls with answer bytes waiting for window
        self._admitted = 0  # bytes of the messages admitted and not taken (PARTIAL_BYTES)
        self._waiting: dict[int, None] = {}  # streams whose message waits for admission
        self._connection_credit = 0  # bytes received, not yet credited to the connection
        # Answer bytes queued on every call and not handed to h2 yet: what waits for
        # the client's windows (the transport bounds it: a client that does not read).
        self.queued_answers = 0

    # -- bytes in ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes from the socket; the gRPC events they complete, in order."""
        if self.closed:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as error:  # h2 has queued its GOAWAY
            self.closed = True
            return [ConnectionEnded(f"HTTP/2 protocol error: {error}")]
        events: list[Event] = []
        unblock = False  # the connection's window, or every stream's, has grown
        for event in h2_events:
            if isinstance(event, h2.events.RequestReceived):
                self._start(event, events)
            elif isinstance(event, h2.events.DataReceived):
                self._data(event, events)
            elif isinstance(event, h2.events.StreamEnded):
                self._request_end(event.stream_id, events)
            elif isinstance(event, h2.events.TrailersReceived):  # request trailers: the end
                self._request_end(event.stream_id, events)
            elif isinstance(event, h2.events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._forget(event.stream_id, stream)
                    events.append(CallEnded(event.stream_id))
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id:
                    if event.stream_id in self._streams:
                        self._ready[event.stream_id] = None
                        self._blocked.pop(event.stream_id, None)
                else:
                    unblock = True
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.preface_received = True
                unblock = True  # a larger initial window opens every stream
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
                events.append(ConnectionEnded(None))
        if unblock:  # once a read, however many frames opened the windows
            self._ready.update(self._blocked)
            self._blocked.clear()
        return events

    def _start(self, event: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        headers = event.headers or []
        method = path = content_type = b""
        encoding = b"identity"
        timeout_s: float | None = None
        metadata: list[tuple[str, str | bytes]] = []
        for name, value in headers:
            if name.startswith(b":"):
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
                continue
            if name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout_s = _timeout(value)
            elif name == b"grpc-encoding":
                encoding = value
            elif name in (b"te", b"user-agent", b"grpc-accept-encoding"):
                continue
            else:
                key = name.decode("ascii", "replace")
                if key.endswith("-bin"):
                    metadata.append((key, _b64decode(value)))
                else:
                    metadata.append((key, value.decode("latin-1")))
        if self._going_away or len(self._streams) >= MAX_CONCURRENT_STREAMS:
            # Opened after our GOAWAY, or past the limit before our SETTINGS reached
            # the client: refused, which grpc clients retry on their own.
            if self._h2_open(stream_id):
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        path_text = path.decode("utf-8", "replace")
        stream = _Stream(streaming_request=path_text in self._streaming_requests, encoding=encoding)
        self._streams[stream_id] = stream
        if method != b"POST":
            self._refuse(stream_id, stream, b"405")
            return
        if not content_type.startswith(b"application/grpc"):
            self._refuse(stream_id, stream, b"415")
            return
        if encoding not in (b"identity", b"gzip", b"deflate"):
            self.end_call(
                stream_id,
                UNIMPLEMENTED,
                f"unsupported grpc-encoding {encoding[:100].decode('latin-1')!r}",
            )
            return
        events.append(CallStarted(stream_id, path_text, tuple(metadata), timeout_s))

    def _request_end(self, stream_id: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended or stream.request_ended:
            return
        stream.request_ended = True
        if not stream.streaming_request:  # a unary call takes its request now
            self._taken(stream_id, stream, stream.unconsumed)
        events.append(RequestEnded(stream_id))

    def _refuse(self, stream_id: int, stream: _Stream, status: bytes) -> None:
        """A request that is not gRPC at all: a plain HTTP error, the call never starts."""
        stream.ended = True
        if self._h2_open(stream_id):
            self._h2.send_headers(stream_id, [(b":status", status)], end_stream=True)
        self._forget(stream_id, stream)

    def _data(self, event: h2.events.DataReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        length = event.flow_controlled_length
        self._connection_credit += length  # the connection's window: credited as it comes
        if self._connection_credit >= CONNECTION_WINDOW // 4 and self._h2_running():
            self._h2.increment_flow_control_window(self._connection_credit)
            self._connection_credit = 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:  # answered already: nothing to credit
            return
        stream.held += length
        buffer = stream.inbound
        buffer += event.data
        while len(buffer) >= PREFIX_BYTES:
            size = int.from_bytes(buffer[1:5], "big")
            if size > self.max_message_bytes:
                self._refuse_message(
                    stream_id,
                    RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({size} vs. {self.max_message_bytes})",
                    events,
                )
                return
            if len(buffer) < PREFIX_BYTES + size:
                if not stream.admitted and stream_id not in self._waiting:
                    self._admit(stream_id, stream, size)
                break
            flag = buffer[0]
            message = bytes(buffer[PREFIX_BYTES : PREFIX_BYTES + size])
            del buffer[: PREFIX_BYTES + size]
            self._whole(stream_id, stream, PREFIX_BYTES + size)
            encoding = None
            if flag & 1:  # inflated when its call takes it (`inflate`): held compressed
                if stream.encoding == b"identity":
                    text = "compressed message without a grpc-encoding"
                    self._refuse_message(stream_id, INTERNAL, text, events)
                    return
                encoding = stream.encoding
            events.append(MessageReceived(stream_id, message, PREFIX_BYTES + size, encoding))
        self._credit(stream_id, stream)

    def _refuse_message(self, stream_id: int, code: int, message: str, events: list[Event]) -> None:
        self.end_call(stream_id, code, message)
        events.append(CallEnded(stream_id))

    def _admit(self, stream_id: int, stream: _Stream, size: int) -> None:
        """Admit the stream's message of `size` bytes if it fits PARTIAL_BYTES (or is
        the only one), else queue it: its bytes past its window wait meanwhile."""
        if self._admitted and self._admitted + size > PARTIAL_BYTES:
            self._waiting[stream_id] = None
            return
        stream.admitted = size
        self._admitted += size

    def _whole(self, stream_id: int, stream: _Stream, size: int) -> None:
        """The stream's message of `size` wire bytes is whole. It stays admitted, and
        its bytes are not credited back, until its call takes it: a streaming
        handler reads it (`consumed`), a unary call's request ends."""
        self._waiting.pop(stream_id, None)
        self._admitted += size - stream.admitted
        stream.admitted = 0
        stream.unconsumed += size

    def _taken(self, stream_id: int, stream: _Stream, size: int) -> None:
        """`size` bytes of whole messages were taken: admit the messages waiting."""
        size = min(size, stream.unconsumed)
        stream.unconsumed -= size
        self._admitted -= size
        self._admit_waiting()
        self._credit(stream_id, stream)

    def _admit_waiting(self) -> None:
        if not self._waiting:
            return
        for waiting_id in list(self._waiting):
            waiting = self._streams.get(waiting_id)
            if waiting is None or len(waiting.inbound) < PREFIX_BYTES:
                del self._waiting[waiting_id]
                continue
            size = int.from_bytes(waiting.inbound[1:5], "big")
            if self._admitted and self._admitted + size > PARTIAL_BYTES:
                break
            del self._waiting[waiting_id]
            waiting.admitted = size
            self._admitted += size
            self._credit(waiting_id, waiting)

    def consumed(self, stream_id: int, size: int) -> None:
        """A handler took a request message of `size` wire bytes (MessageReceived.size)."""
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.ended and stream.streaming_request:
            self._taken(stream_id, stream, size)

    def _credit(self, stream_id: int, stream: _Stream) -> None:
        """Credit the stream back for what it sent, but for whole messages its call has
        not taken yet and the part of a message not admitted yet; in
        steps of CREDIT_BYTES, and not once the client has sent its last byte."""
        if stream.request_ended:
            return
        give = stream.held - stream.unconsumed
        if stream_id in self._waiting:
            give -= len(stream.inbound)
        if give >= CREDIT_BYTES and self._h2_open(stream_id):
            stream.held -= give
            self._h2.increment_flow_control_window(give, stream_id=stream_id)

    # -- calls out --------------------------------------------------------------

    def send_headers(self, stream_id: int, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """The answer's headers (initial metadata), if not sent yet."""
        stream = self._streams.get(stream_id)
        if self.closed or stream is None or stream.ended or stream.headers_sent:
            return
        stream.headers_sent = True
        headers = list(_ANSWER_HEADERS)
        headers += [(k.encode("ascii"), v.encode("latin-1")) for k, v in metadata]
        self._h2.send_headers(stream_id, headers)

    def send_message(self, stream_id: int, message: bytes) -> bool:
        """Queue one answer message (uncompressed); False if the call is over."""
        stream = self._streams.get(stream_id)
        if self.closed or stream is None or stream.ended:
            return False
        if not stream.headers_sent:
            self.send_headers(stream_id)
        prefix = b"\x00" + len(message).to_bytes(4, "big")
        if len(message) <= _JOIN_BYTES:  # one DATA frame rather than two
            stream.outbound.append(prefix + message)
        else:  # not copied: what one DATA frame cannot carry is cut into frames anyway
            stream.outbound.append(prefix)
            stream.outbound.append(message)
        stream.buffered += PREFIX_BYTES + len(message)
        self.queued_answers += PREFIX_BYTES + len(message)
        self._ready[stream_id] = None
        return True

    def end_call(
        self,
        stream_id: int,
        code: int,
        message: str = "",
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Queue the trailers with `code` and `message`, after the answer's messages.
        A call that sent nothing yet gets one HEADERS frame (Trailers-Only)."""
        stream = self._streams.get(stream_id)
        if self.closed or stream is None or stream.ended:
            return
        stream.ended = True
        trailers = [(b"grpc-status", str(code).encode("ascii"))]
        if message:
            trailers.append((b"grpc-message", percent_encode(message, MAX_STATUS_BYTES)))
        trailers += [(k.encode("ascii"), v.encode("latin-1")) for k, v in metadata]
        if not stream.headers_sent:
            stream.headers_sent = True
            if self._h2_open(stream_id):
                self._h2.send_headers(stream_id, [*_ANSWER_HEADERS[:2], *trailers], end_stream=True)
            self._finish(stream_id, stream)
            return
        stream.trailers = trailers
        self._ready[stream_id] = None

    def buffered(self, stream_id: int) -> int:
        """Answer bytes of the call still waiting for the client's window (0: none,
        or the call is over)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.buffered

    def stream_window(self, stream_id: int) -> int:
        """What the client lets the call send before it reads (its stream's window,
        not the connection's): 0 or less once the call's client stopped reading
        it, or never opened it (an INITIAL_WINDOW_SIZE of 0)."""
        stream = self._h2.streams.get(stream_id)
        return 0 if stream is None else stream.outbound_flow_control_window

    def is_open(self, stream_id: int) -> bool:
        """Whether the call can still send: not ended by either side."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.ended

    def go_away(self) -> None:
        """Tell the client to open no more calls here (GOAWAY); open ones go on.

        h2's own close_connection would also stop the calls in flight from
        answering, so the frame is written here and h2's state left open.
        """
        if self.closed or self._going_away:
            return
        self._going_away = True
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._h2._data_to_send += frame.serialize()  # noqa: SLF001 - see above

    def ping(self) -> None:
        """Send a PING (a keepalive: any answer shows the client is there)."""
        if not self.closed and self._h2_running():
            self._h2.ping(b"keepaliv")

    def pending_output(self) -> int:
        """Bytes h2 has ready that `data_to_send` has not taken yet."""
        return len(self._h2._data_to_send)  # h2 has no public count of it

    def data_to_send(self, budget: int = WRITE_BUDGET) -> bytes:
        """What to write to the socket now (b"" if nothing): what h2 has ready, and
        the calls' queued answers as far as the client's windows and about `budget`
        bytes allow, TURN_BYTES a call in turn. Answers wait in their queues rather than
        in h2's buffer, so what waits is bounded by the calls' own bounds."""
        ready = self._ready
        if self.closed:  # h2 would refuse: the client has gone (GOAWAY) or broke the rules
            ready.clear()
        while ready and budget > 0:
            stream_id = next(iter(ready))
            del ready[stream_id]
            stream = self._streams.get(stream_id)
            if stream is not None:
                budget -= self._flush(stream_id, stream, min(budget, TURN_BYTES))
                if not stream.outbound:
                    continue
                if self._h2.local_flow_control_window(stream_id) > 0:
                    ready[stream_id] = None  # its turn again after the others
                else:
                    self._blocked[stream_id] = None  # until the client's WINDOW_UPDATE
        return self._h2.data_to_send()

    # -- flow control ------------------------------------------------------------

    def _flush(self, stream_id: int, stream: _Stream, budget: int) -> int:
        """Hand h2 up to `budget` bytes of the stream's answer, as the windows allow;
        then its trailers once all is handed over. Returns the bytes handed."""
        h2conn = self._h2
        outbound = stream.outbound
        handed = 0
        while outbound and handed < budget:
            window = h2conn.local_flow_control_window(stream_id)
            if window <= 0:
                return handed
            chunk, start = outbound[0], stream.sent
            size = min(window, h2conn.max_outbound_frame_size, len(chunk) - start)
            if start or size < len(chunk):  # a frame's worth copied, never the rest
                h2conn.send_data(stream_id, chunk[start : start + size])
            else:
                h2conn.send_data(stream_id, chunk)
            if start + size < len(chunk):
                stream.sent = start + size
            else:
                outbound.popleft()
                stream.sent = 0
            stream.buffered -= size
            self.queued_answers -= size
            handed += size
        if not outbound and stream.trailers is not None:
            h2conn.send_headers(stream_id, stream.trailers, end_stream=True)
            stream.trailers = None
            self._finish(stream_id, stream)
        return handed

    def _finish(self, stream_id: int, stream: _Stream) -> None:
        """The answer is complete. A client still sending is told to stop (RST_STREAM
        NO_ERROR, as the spec asks), and what it sent is credited back."""
        if not stream.request_ended and self._h2_open(stream_id):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        self._forget(stream_id, stream)

    def _h2_open(self, stream_id: int) -> bool:
        """Whether h2 can still send on the stream. h2 parses a whole read before its
        events are handled here, so the stream an event names may be closed already
        (the client reset it later in the same read), and h2 raises on any frame for
        it (StreamClosedError, or StreamIDTooLowError once it forgot the stream); or
        the client's GOAWAY later in the read closed the whole connection."""
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed and self._h2_running()

    def _h2_running(self) -> bool:
        """Whether h2's connection is not closed (by a GOAWAY, maybe later in this read)."""
        return self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        stream.inbound.clear()
        stream.outbound.clear()  # a reset call's answer goes nowhere
        self.queued_answers -= stream.buffered
        stream.buffered = 0
        self._streams.pop(stream_id, None)
        self._ready.pop(stream_id, None)
        self._blocked.pop(stream_id, None)
        self._waiting.pop(stream_id, None)
        self._admitted -= stream.admitted + stream.unconsumed
        stream.admitted = stream.unconsumed = 0
        self._admit_waiting()


def percent_encode(message: str, limit: int | None = None) -> bytes:
    """grpc-message's encoding: UTF-8, with bytes outside 0x20-0x7E and '%' as %XX;
    cut to at most `limit` bytes (never inside an escape), with "..." at the cut."""
    raw = message.encode("utf-8")
    if all(b in _PLAIN for b in raw):
        encoded = raw
    else:
        encoded = b"".join(bytes((b,)) if b in _PLAIN else b"%%%02X" % b for b in raw)
    if limit is None or len(encoded) <= limit:
        return encoded
    cut = encoded[: limit - 3]
    escape = cut.rfind(b"%", len(cut) - 2)
    if escape != -1:
        cut = cut[:escape]
    return cut + b"..."


def _timeout(value: bytes) -> float | None:
    """grpc-timeout (`TimeoutValue TimeoutUnit`: at most 8 digits and H/M/S/m/u/n) in
    seconds; None if malformed (the call then has no deadline, as grpc-core does)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def _b64decode(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return b""


class TooLarge(ValueError):
    """A compressed message larger than the limit once inflated (RESOURCE_EXHAUSTED)."""


def inflate(data: bytes, encoding: bytes, limit: int) -> bytes:
    """A compressed message (`gzip` or `deflate`), inflated to at most `limit` bytes.

    Messages are held compressed until their call takes them, so that what a
    call holds is what flow control bounds (a 4 KB message may inflate to 4 MiB).
    Raises TooLarge past the limit; ValueError if it is not what `encoding` says,
    is cut short or has bytes after its end (grpc-core answers those INTERNAL,
    "Decompression failed")."""
    wbits = 16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS
    if encoding not in (b"gzip", b"deflate"):
        raise ValueError(f"compressed message without a known grpc-encoding ({encoding!r})")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise ValueError(f"could not decompress the message: {error}") from None
    if len(out) > limit:
        raise TooLarge(f"decompressed message larger than max ({limit} bytes)")
    if not inflater.eof or inflater.unused_data:
        raise ValueError("could not decompress the message: cut short or followed by other bytes")
    return out
