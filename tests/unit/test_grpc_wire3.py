"""wire.GrpcConnection, sans-io: a third review, of 67421c5.

An in-memory h2 client (support.h2pair, as in tests/unit/test_grpc_wire.py)
drives the server connection, so frame sequences and reads are exact. The first
part holds at 67421c5 and guards likely regressions; each test of "faults found
in 67421c5" failed on it, and its docstring says why. The end-to-end side is
tests/e2e/test_grpc_abuse3.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h2.errors
import h2.events
import h2.settings
import hyperframe.frame as frames
import pytest
from support.h2pair import LIMIT, H2Pair, prefixed

from kairoi_trio.protocols.grpc import wire

MiB = 1 << 20


def _pair(clock: Callable[[], float] = time.monotonic) -> H2Pair:
    """A pair whose client lets the server send 64 MiB more on the connection."""
    return H2Pair(clock=clock, connection_window=64 * MiB)


# -- what held at 67421c5 ---------------------------------------------------------------


def test_admission_returns_to_zero_whatever_ends_the_calls() -> None:
    """Streaming and unary calls with whole, partial, waiting and compressed
    messages, ended every way (the client's reset, the request ended half-way
    through a message, the server's status with an answer still queued): once all
    are over, nothing stays admitted or waiting. (A random walk of such
    sequences, 1,500 of them, found no leak either.)"""
    pair = _pair()
    server = pair.server
    big = prefixed(b"b" * (3 * MiB))
    for k in range(12):  # 36 MiB announced: the last ones wait
        pair.start(2 * k + 1, "/s/Stream" if k % 2 else "/s/Unary")
        pair.pump()
        pair.client.send_data(2 * k + 1, big[:16_000])
        pair.pump()
    assert server._waiting  # noqa: SLF001
    for k in range(12):
        stream_id = 2 * k + 1
        how = k % 4
        if how == 0:
            pair.client.reset_stream(stream_id)
        elif how == 1:  # the request ends half-way through its message; the call ends
            pair.client.end_stream(stream_id)
            pair.pump()
            server.end_call(stream_id, wire.UNIMPLEMENTED, "no whole request")
        elif how == 2:
            server.send_message(stream_id, b"answer" * 30_000)  # more than the window
            server.end_call(stream_id, wire.UNAVAILABLE, "bye")
        else:
            server.end_call(stream_id, wire.CANCELLED)
        pair.pump()
    assert server._admitted == 0, server._admitted  # noqa: SLF001
    assert not server._waiting  # noqa: SLF001
    assert not server._streams  # noqa: SLF001


def test_a_message_padded_frames_and_request_trailers() -> None:
    """Padding counts against the windows and is credited back; a request ended by
    trailers rather than END_STREAM ends once and releases its message."""
    pair = _pair()
    pair.start(1)
    pair.pump()
    body = prefixed(b"p" * 200_000)
    for offset in range(0, len(body), 8_000):  # 8,000 bytes and 255 of padding a frame
        assert pair.client.local_flow_control_window(1) >= 8_255
        pair.client.send_data(1, body[offset : offset + 8_000], pad_length=254)
        pair.pump()
    pair.client.send_headers(1, [("x-end", "1")], end_stream=True)
    pair.pump()
    assert len([e for e in pair.events if isinstance(e, wire.RequestEnded)]) == 1
    assert pair.server._admitted == 0  # noqa: SLF001


# -- faults found in 67421c5 -------------------------------------------------------------


def _stream_credit(pair: H2Pair) -> None:
    """A streaming call's 32 KiB, past CREDIT_BYTES: wire._credit answers with a
    stream WINDOW_UPDATE."""
    pair.start(1, "/s/Stream")
    pair.pump()
    body = prefixed(b"x" * 100_000)
    pair.client.send_data(1, body[:16_384])
    pair.client.send_data(1, body[16_384:32_768])


def _connection_credit(pair: H2Pair) -> None:
    """The DATA frame that brings the connection's uncredited bytes to
    CONNECTION_WINDOW // 4: wire._data answers with a connection WINDOW_UPDATE."""
    pair.start(1)  # a first request of 1 MiB, whole and ended
    pair.pump()
    pair.send(1, prefixed(b"z" * MiB))
    pair.client.end_stream(1)
    body = prefixed(b"y" * (LIMIT - 100))
    pair.start(3)
    pair.pump()
    sent = 0
    step = pair.client.max_outbound_frame_size
    while pair.server._connection_credit + step < wire.CONNECTION_WINDOW // 4:  # noqa: SLF001
        pair.client.send_data(3, body[sent : sent + step])
        sent += step
        pair.pump()
    pair.client.send_data(3, body[sent : sent + step])


def _unary_end(pair: H2Pair) -> None:
    """A unary request of 40 KB that ends: wire._request_end takes it (_taken, _credit)."""
    pair.start(1)
    pair.pump()
    body = prefixed(b"u" * 40_000)
    pair.client.send_data(1, body[:16_000])
    pair.pump()
    pair.client.send_data(1, body[16_000:32_000])
    pair.client.send_data(1, body[32_000:], end_stream=True)


def _unknown_encoding(pair: H2Pair) -> None:
    """A call wire.py refuses at once (UNIMPLEMENTED, Trailers-Only: send_headers)."""
    pair.start(1, extra=((b"grpc-encoding", b"snappy"),))


def _too_large(pair: H2Pair) -> None:
    """A message past the limit (RESOURCE_EXHAUSTED, then RST_STREAM NO_ERROR)."""
    pair.start(1)
    pair.client.send_data(1, b"\0" + (LIMIT + 1).to_bytes(4, "big"))


def _not_grpc(pair: H2Pair) -> None:
    """A GET: the plain HTTP 405 (wire._refuse)."""
    pair.client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    )


BEFORE_GOAWAY: dict[str, Callable[[H2Pair], None]] = {
    "stream credit": _stream_credit,
    "connection credit": _connection_credit,
    "unary request end": _unary_end,
    "unknown grpc-encoding": _unknown_encoding,
    "message too large": _too_large,
    "GET (405)": _not_grpc,
}


@pytest.mark.parametrize("name", list(BEFORE_GOAWAY))
def test_a_client_goaway_in_the_read_that_wire_answers(name: str) -> None:
    """The client's GOAWAY comes in the same read as frames wire.py answers with an
    h2 call (a WINDOW_UPDATE credit, a refusal's HEADERS or RST_STREAM). h2 parses
    the whole read first and closes its connection state machine at the GOAWAY;
    then GrpcConnection.receive_data walks the events and makes the h2 call
    (wire._data: increment_flow_control_window; _credit; _refuse / end_call:
    send_headers; _finish: reset_stream). `_h2_open` only asks whether the
    stream is closed, not the connection, so h2 raises ProtocolError ("Invalid
    input ConnectionInputs.SEND_WINDOW_UPDATE in state ConnectionState.CLOSED")
    out of receive_data, past its own `except` (which wraps h2.receive_data
    only): transport._Connection dies of it, "grpc connection failed" with a
    traceback at ERROR, any client's to cause. A grpc client closing its channel
    while it uploads does this. receive_data should return ConnectionEnded: h2
    calls once h2's connection is closed should be skipped (check
    `self._h2.state_machine.state` in _h2_open and before the connection
    credit)."""
    pair = _pair()
    BEFORE_GOAWAY[name](pair)
    pair.client.close_connection()  # GOAWAY, in the same write as the frames above
    events = pair.one_read()
    assert isinstance(events[-1], wire.ConnectionEnded)
    assert pair.server.closed
    pair.server.data_to_send()  # the writer's next round: nothing raises either


def _with_calls_open(count: int) -> H2Pair:
    pair = _pair()
    for k in range(count):  # unary calls whose request has not come yet: open streams
        pair.start(2 * k + 1)
    pair.pump()
    return pair


class _CountedWalks(dict):
    """The server's streams, counting the walks over all of them."""

    walks = 0

    def items(self):  # type: ignore[override]
        self.walks += 1
        return super().items()

    def values(self):  # type: ignore[override]
        self.walks += 1
        return super().values()

    def __iter__(self):  # type: ignore[override]
        self.walks += 1
        return super().__iter__()


def test_a_connection_window_update_does_not_walk_every_call() -> None:
    """With 1,000 calls open, one 64 KB read of connection WINDOW_UPDATEs (4,923 of
    them) walked every call for each frame at 67421c5 (wire._all_ready, from
    WindowUpdated on stream 0): ~0.3 s of the one thread a read, against 0.04 s
    with no call open; a client with 1,000 health Checks left open held every
    other client for seconds. The calls waiting for window are kept apart and
    made ready once a read."""
    pair = _with_calls_open(1000)
    streams = _CountedWalks(pair.server._streams)  # noqa: SLF001
    pair.server._streams = streams  # noqa: SLF001
    flood = frames.WindowUpdateFrame(0, window_increment=1).serialize() * (64_000 // 13)
    pair.server.receive_data(flood)
    pair.server.data_to_send()
    assert streams.walks == 0


def test_a_settings_flood_ends_the_connection_with_enhance_your_calm() -> None:
    """h2 walks every open stream for each SETTINGS frame carrying
    INITIAL_WINDOW_SIZE, changed or not (_flow_control_change_from_settings): with
    1,000 calls open, a 64 KB read of them held the one thread ~1 s at 67421c5.
    Past SETTINGS_BURST frames at once the connection ends, ENHANCE_YOUR_CALM;
    a few frames now and then (as grpc-core sizes its windows) are fine."""
    now = [0.0]
    pair = _pair(clock=lambda: now[0])
    one = frames.SettingsFrame(
        0, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535}
    ).serialize()
    for _ in range(wire.SETTINGS_BURST * 3):  # a few a second for a while: fine
        assert not pair.server.receive_data(one)
        now[0] += 1 / wire.SETTINGS_PER_S
    events = pair.server.receive_data(one * (wire.SETTINGS_BURST + 1))
    assert isinstance(events[-1], wire.ConnectionEnded) and pair.server.closed
    goaway = [
        event
        for event in pair.client.receive_data(pair.server.data_to_send())
        if isinstance(event, h2.events.ConnectionTerminated)
    ]
    assert [event.error_code for event in goaway] == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
