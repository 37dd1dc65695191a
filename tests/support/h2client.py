"""A raw h2 client on a Trio stream, and a GrpcServer served in the test's own Trio
run: the harness of the in-process tests of protocols/grpc/transport.py.

The client sends exactly the frames a test asks for (no gRPC library between),
acknowledges the answer bytes it reads (so windows reopen), and keeps every h2
event it got in `events`, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio

from kairoi_trio.protocols.grpc import transport

MiB = 1 << 20


class H2Client:
    """An h2 client on `stream`. `settings`: its SETTINGS (INITIAL_WINDOW_SIZE, say);
    `connection_window`: how much its connection window grows beyond h2's 65,535."""

    def __init__(
        self,
        stream: trio.SocketStream,
        settings: dict[int, int] | None = None,
        connection_window: int = 0,
    ) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        if connection_window:
            self.h2.increment_flow_control_window(connection_window)
        self.events: list[h2.events.Event] = []

    async def flush(self) -> None:
        """Send what h2 has queued."""
        if data := self.h2.data_to_send():
            await self.stream.send_all(data)

    async def read_some(self) -> bool:
        """One read, its events taken in; False at the end of the stream."""
        data = await self.stream.receive_some(65536)
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.events.append(event)
        await self.flush()
        return bool(data)

    async def read_until(self, done: Callable[[], object], wait_s: float = 10) -> bool:
        """Read until `done()` is true, the stream ends or `wait_s` passed; done()."""
        with trio.move_on_after(wait_s):
            while not done() and await self.read_some():
                pass
        return bool(done())

    def start(self, stream_id: int, path: str, encoding: str = "") -> None:
        """Open a call of `path` (its request HEADERS, compressed with `encoding` if
        given), queued."""
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
        ]
        self.h2.send_headers(stream_id, headers + ([("grpc-encoding", encoding)] * bool(encoding)))

    async def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """`data` as the windows allow (reading the server's WINDOW_UPDATEs meanwhile),
        then the end of the request if `end`; stops early once the call has a status."""
        while data:
            size = min(
                self.h2.local_flow_control_window(stream_id),
                self.h2.max_outbound_frame_size,
                len(data),
            )
            if size <= 0:
                await self.flush()
                assert await self.read_until(
                    lambda: (
                        self.h2.local_flow_control_window(stream_id) > 0 or self.status(stream_id)
                    )
                ), "no window"
                if self.status(stream_id):
                    return
                continue
            self.h2.send_data(stream_id, data[:size])
            data = data[size:]
        if end and self.status(stream_id) is None:
            self.h2.end_stream(stream_id)
        await self.flush()

    def statuses(self, stream_id: int) -> list[bytes]:
        """Every grpc-status the call got (a well-behaved server sends one)."""
        found = (_grpc_status(e) for e in self.events if _on(e, stream_id))
        return [status for status in found if status is not None]

    def status(self, stream_id: int) -> bytes | None:
        """The call's first grpc-status, b"RST" if the server reset it first, else None."""
        for event in self.events:
            if not _on(event, stream_id):
                continue
            if (status := _grpc_status(event)) is not None:
                return status
            if isinstance(event, h2.events.StreamReset):
                return b"RST"
        return None


def _on(event: h2.events.Event, stream_id: int) -> bool:
    return getattr(event, "stream_id", None) == stream_id


def _grpc_status(event: h2.events.Event) -> bytes | None:
    """The grpc-status an answer's HEADERS or trailers carry, if any."""
    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
        return dict(event.headers or ()).get(b"grpc-status")
    return None


async def serve_in_process(
    nursery: trio.Nursery, methods: dict[str, Any], **options: Any
) -> tuple[transport.GrpcServer, int]:
    """A GrpcServer of `methods` (max_message_bytes 4 MiB, and `options`) listening on
    a free port of 127.0.0.1 in `nursery`; (the server, its port)."""
    server = transport.GrpcServer(methods, max_message_bytes=4 * MiB, **options)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(server.serve, listeners)
    return server, listeners[0].socket.getsockname()[1]


def small_bounds(monkeypatch: Any, connection: int, server: int) -> None:
    """Shrink the transport's held bytes to `connection` a connection (whatever
    max_message_bytes) and `server` on every connection together, for the
    servers the test starts next (`monkeypatch`: pytest's fixture)."""
    monkeypatch.setattr(transport, "HELD_BYTES", connection)
    monkeypatch.setattr(transport, "HELD_MESSAGES", 0)
    monkeypatch.setattr(transport, "SERVER_HELD_BYTES", server)


async def watch_forever(_request: bytes, call: transport.Call) -> None:
    """A response-streaming handler that answers its headers and never ends (a
    watch: its request is held for its whole life)."""
    await call.send_initial_metadata()
    await trio.sleep_forever()
