"""A sans-io gRPC server connection and an h2 client, wired back to back in memory.

The harness of the unit tests of protocols/grpc/wire.py. No sockets and no tasks:
the client's bytes go to `GrpcConnection.receive_data`, the server's
`data_to_send` back to the client, so frame sequences, reads and windows are
exact and the tests deterministic. `H2Pair.events` is what the server saw (wire
events), `H2Pair.answers` what the client saw (h2 events), both in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Sequence
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.settings
import hyperframe.frame

from kairoi_trio.protocols.grpc import wire

LIMIT = 4 << 20  # the server's max_message_bytes, unless told
UNARY = "/s/Unary"  # the path `start` opens, unless told
STREAMING = "/s/Stream"  # the server's streaming method, unless told
MAX_ROUNDS = 10_000  # exchanges a `pump` may take before the pair is said never to settle

Header = tuple[bytes, bytes]
_E = TypeVar("_E")


def prefixed(data: bytes, compressed: bool = False) -> bytes:
    """One gRPC message as it goes on the wire: the compressed flag, the 4-byte
    big-endian length, then `data`."""
    return bytes([compressed]) + len(data).to_bytes(4, "big") + data


def request_headers(path: str = UNARY, content_type: bytes = b"application/grpc") -> list[Header]:
    """A gRPC call's request HEADERS: a POST of `path` with `content_type`."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"x"),
        (b"content-type", content_type),
    ]


class H2Pair:
    """A server connection (`server`) and an h2 client (`client`), back to back.

    `max_message_bytes`, `streaming_requests` and `clock` go to the server. The
    client sends `settings` (its SETTINGS: INITIAL_WINDOW_SIZE, say) and grows
    its connection window by `connection_window` (what the server may send ahead
    on all streams; h2 starts at 65,535), then the pair is pumped unless `pump`
    is False (the client has not read the server's SETTINGS then). While `ack`
    is set (a test may flip it) the client acknowledges the answer bytes `pump`
    hands it, which opens the windows again; while not, they stay spent.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = LIMIT,
        streaming_requests: Container[str] = frozenset({STREAMING}),
        clock: Callable[[], float] = time.monotonic,
        settings: dict[h2.settings.SettingCodes | int, int] | None = None,
        connection_window: int = 0,
        ack: bool = True,
        pump: bool = True,
    ) -> None:
        self.server = wire.GrpcConnection(
            max_message_bytes, streaming_requests=streaming_requests, clock=clock
        )
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        if settings:
            self.client.update_settings(settings)
        if connection_window:
            self.client.increment_flow_control_window(connection_window)
        self.ack = ack
        self.events: list[wire.Event] = []  # what the server saw
        self.answers: list[h2.events.Event] = []  # what the client saw
        if pump:
            self.pump()

    # -- moving bytes -----------------------------------------------------------------

    def pump(self, budget: int = wire.WRITE_BUDGET) -> None:
        """Move bytes both ways, the server's first (`data_to_send(budget)`), until
        neither side has any; AssertionError if they never stop."""
        for _ in range(MAX_ROUNDS):
            moved = False
            if out := self.server.data_to_send(budget):
                for event in self.client.receive_data(out):
                    if self.ack and isinstance(event, h2.events.DataReceived):
                        self.client.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    self.answers.append(event)
                moved = True
            if out := self.client.data_to_send():
                self.events += self.server.receive_data(out)
                moved = True
            if not moved:
                return
        raise AssertionError("the pair never settles")

    def one_read(self) -> list[wire.Event]:
        """Hand what the client has queued to the server as one read (nothing goes
        back); the server's events, also kept in `events`."""
        events = self.server.receive_data(self.client.data_to_send())
        self.events += events
        return events

    def raw(self, *sent: hyperframe.frame.Frame) -> None:
        """Frames the client's h2 would not send, as one read (its state is left
        as it was)."""
        self.events += self.server.receive_data(b"".join(f.serialize() for f in sent))

    # -- the client's side of calls ---------------------------------------------------

    def start(self, stream_id: int, path: str = UNARY, extra: Sequence[Header] = ()) -> None:
        """Open a call on `stream_id`: its request headers and `extra` (which may
        repeat one of them: the last wins), queued, not pumped."""
        self.client.send_headers(stream_id, [*request_headers(path), *extra])

    def send(self, stream_id: int, data: bytes, *, end: bool = False, pump: bool = True) -> None:
        """Send `data` on the stream in DATA frames as large as h2 allows, the last
        with END_STREAM if `end`: each frame its own read (pumped), or with `pump`
        False all left queued. The stream's window must have room."""
        size = self.client.max_outbound_frame_size
        for offset in range(0, len(data), size):
            assert self.client.local_flow_control_window(stream_id) > 0, "no window"
            last = offset + size >= len(data)
            self.client.send_data(stream_id, data[offset : offset + size], end_stream=end and last)
            if pump:
                self.pump()

    def unary(self, stream_id: int) -> None:
        """Open a unary call with an empty request, ended; queued, not pumped."""
        self.start(stream_id)
        self.client.send_data(stream_id, prefixed(b""), end_stream=True)

    # -- what each side saw -----------------------------------------------------------

    def of(self, kind: type[_E], stream_id: int | None = None) -> list[_E]:
        """The server's events of `kind` (on `stream_id`; None: on any stream)."""
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream_id is None or getattr(e, "stream_id", 0) == stream_id)
        ]

    def answers_on(self, stream_id: int) -> list[Any]:
        """The h2 events the client got on `stream_id` (Any: their kinds differ)."""
        return [e for e in self.answers if getattr(e, "stream_id", 0) == stream_id]

    def status(self, stream_id: int) -> tuple[int, str]:
        """The call's grpc-status and grpc-message, from its trailers (or its
        Trailers-Only HEADERS); AssertionError if none came."""
        for event in self.answers_on(stream_id):
            if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                headers = dict(event.headers)
                if b"grpc-status" in headers:
                    return int(headers[b"grpc-status"]), headers.get(b"grpc-message", b"").decode()
        raise AssertionError(f"no status on stream {stream_id}: {self.answers_on(stream_id)}")

    def received(self, stream_id: int) -> tuple[int, bool]:
        """(answer bytes the client got on the stream, whether the stream ended)."""
        data = sum(
            e.flow_controlled_length
            for e in self.answers
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )
        ended = any(
            isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in self.answers
        )
        return data, ended
