"""wire.GrpcConnection (sans-io gRPC over h2) driven by an in-memory h2 client.

No sockets and no clocks (support.h2pair): the client's bytes go to
`receive_data`, the server's `data_to_send` back to the client, so flow control
and framing are exact and the tests deterministic. Faults found in 011c705 are marked so.
"""

from __future__ import annotations

import gzip
import zlib

import h2.errors
import h2.events
import h2.settings
import hyperframe.frame as frames
import pytest
from support.h2pair import LIMIT, H2Pair, prefixed

from kairoi_trio.protocols.grpc import wire

MiB = 1 << 20


# -- what held ------------------------------------------------------------------------


def test_credit_comes_back_when_calls_with_partial_messages_end() -> None:
    """Calls reset by the client, ended or reset by the server half-way through a
    message give their admission back, whichever way they end."""
    pair = H2Pair()
    part = prefixed(b"x" * (3 * MiB))[: wire.STREAM_WINDOW - 100]
    for k in range(60):
        stream_id = 2 * k + 1
        pair.start(stream_id)
        assert pair.client.local_flow_control_window(stream_id) >= len(part), k
        pair.send(stream_id, part)
        if k % 3 == 0:
            pair.client.reset_stream(stream_id)
        elif k % 3 == 1:
            pair.server.end_call(stream_id, wire.UNAVAILABLE, "going away")
        else:
            pair.server.end_call(stream_id, wire.CANCELLED, "cancelled")
        pair.pump()
    assert pair.server._admitted == 0  # noqa: SLF001 - the accounting the bound rests on
    assert not pair.server._waiting  # noqa: SLF001


def test_a_streaming_handler_that_does_not_read_holds_the_client_to_its_window() -> None:
    pair = H2Pair()
    pair.start(1, "/s/Stream")
    sent = 0
    message = prefixed(b"m" * 10_000)
    while pair.client.local_flow_control_window(1) >= len(message):
        pair.client.send_data(1, message)
        sent += len(message)
        pair.pump()
    assert sent <= wire.STREAM_WINDOW + len(message)
    received = pair.of(wire.MessageReceived, 1)
    for event in received:  # the handler takes them: the window opens again
        pair.server.consumed(1, event.size)
    pair.pump()  # (h2 sends WINDOW_UPDATE once half a window is consumed)
    assert pair.client.local_flow_control_window(1) >= wire.STREAM_WINDOW // 2


def test_answers_share_the_connection_and_trailers_come_last() -> None:
    pair = H2Pair(settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100_000})
    for stream_id in (1, 3):
        pair.start(stream_id)
        pair.client.send_data(stream_id, prefixed(b""), end_stream=True)
    pair.pump()
    for stream_id in (1, 3):
        pair.server.send_message(stream_id, b"a" * 300_000)
        pair.server.end_call(stream_id, wire.OK)
    pair.pump(budget=64_000)
    order = [
        (type(e).__name__, e.stream_id)
        for e in pair.answers
        if isinstance(e, (h2.events.DataReceived, h2.events.TrailersReceived))
    ]
    for stream_id in (1, 3):
        mine = [kind for kind, sid in order if sid == stream_id]
        assert mine[-1] == "TrailersReceived" and mine.count("TrailersReceived") == 1
        assert (
            sum(
                e.flow_controlled_length
                for e in pair.answers
                if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
            )
            == 300_005
        )
    # round robin: stream 3 did not wait for all of stream 1
    data = [sid for kind, sid in order if kind == "DataReceived"]
    assert data.index(3) < len(data) - 1 - data[::-1].index(1)


# -- faults found in 011c705 ---------------------------------------------------------


def test_many_large_requests_interleaved_do_not_deadlock() -> None:
    """16 calls each send a message just under 4 MiB, a frame of each in turn, as
    their windows allow. Past PARTIAL_BYTES (32 MiB) of messages not yet whole,
    011c705 credits nothing back (wire._credit: `give -= len(stream.inbound)`),
    and no call has window enough to complete its message: all stall for ever."""
    pair = H2Pair()
    size = LIMIT - 200
    left = {2 * k + 1: prefixed(b"x" * size) for k in range(16)}
    for stream_id in left:
        pair.start(stream_id)
    pair.pump()
    while any(left.values()):
        progress = False
        for stream_id, data in left.items():
            window = min(pair.client.local_flow_control_window(stream_id), 16_384, len(data))
            if window > 0:
                pair.client.send_data(stream_id, data[:window], end_stream=window == len(data))
                left[stream_id] = data[window:]
                progress = True
            pair.pump()
        assert progress, f"deadlock: {sum(map(len, left.values()))} bytes can never be sent"
    assert len(pair.of(wire.MessageReceived)) == 16


def test_the_stream_past_the_limit_is_refused_not_the_connection() -> None:
    """RFC 9113 5.1.2: a stream past SETTINGS_MAX_CONCURRENT_STREAMS is a stream
    error. 011c705 turns h2's TooManyStreamsError into a connection error
    (ConnectionEnded, GOAWAY PROTOCOL_ERROR), losing the calls within the limit,
    even when the client opened them before our SETTINGS could reach it."""
    pair = H2Pair(pump=False)  # the client has not read our SETTINGS yet: it may open them
    for k in range(wire.MAX_CONCURRENT_STREAMS + 1):
        pair.start(2 * k + 1)
    pair.one_read()
    assert not pair.of(wire.ConnectionEnded)
    assert len(pair.of(wire.CallStarted)) == wire.MAX_CONCURRENT_STREAMS
    pair.pump()
    refused = [e for e in pair.answers if isinstance(e, h2.events.StreamReset)]
    assert [e.stream_id for e in refused] == [2 * wire.MAX_CONCURRENT_STREAMS + 1]
    assert refused[0].error_code in (
        h2.errors.ErrorCodes.REFUSED_STREAM,
        h2.errors.ErrorCodes.PROTOCOL_ERROR,
    )


def test_a_client_goaway_while_an_answer_waits_for_window() -> None:
    """h2 closes its state machine at the client's GOAWAY; 011c705's data_to_send then
    hands it the waiting answer (wire._flush: send_data) and raises h2's
    ProtocolError, which kills the connection's writer task ("grpc connection
    failed", a traceback at ERROR)."""
    pair = H2Pair(settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    pair.start(1)
    pair.client.send_data(1, prefixed(b""), end_stream=True)
    pair.pump()
    pair.server.send_message(1, b"answer")
    pair.server.end_call(1, wire.OK)
    pair.pump()
    pair.raw(
        frames.WindowUpdateFrame(1, window_increment=100),
        frames.GoAwayFrame(0, last_stream_id=0, error_code=0),
    )
    assert pair.of(wire.ConnectionEnded)
    pair.server.data_to_send()  # must not raise
    pair.server.send_message(1, b"more")  # nor these, from handlers still running
    pair.server.end_call(1, wire.OK)
    pair.server.data_to_send()


def test_a_gzip_message_cut_short_is_refused() -> None:
    """011c705's inflation did not check that the gzip stream ended (zlib's eof), so
    a message missing its end (or its CRC) was handed on as what did arrive.
    (Messages are inflated as their call takes them: transport maps ValueError to
    INTERNAL, as grpc-core answers.)"""
    whole = bytes(range(256)) * 40
    packed = gzip.compress(whole)
    assert wire.inflate(packed, b"gzip", LIMIT) == whole
    for body in (packed[:-8], packed[: len(packed) // 2], packed + b"?"):
        with pytest.raises(ValueError, match="could not decompress"):
            wire.inflate(body, b"gzip", LIMIT)


def test_a_message_too_large_once_inflated_is_resource_exhausted() -> None:
    """grpc-core: RESOURCE_EXHAUSTED, as for a message too large on the wire (the
    transport maps TooLarge to it); 011c705: INTERNAL."""
    with pytest.raises(wire.TooLarge):
        wire.inflate(zlib.compress(b"\0" * (LIMIT + 1)), b"deflate", LIMIT)
    assert wire.inflate(zlib.compress(b"\0" * LIMIT), b"deflate", LIMIT) == b"\0" * LIMIT


# -- faults found in e3612a2 (second review): a call reset in the read that brought it --
#
# h2 parses every frame of a read before `receive_data` walks its events, so by the
# time an event is handled h2 may already have closed the stream it names. A grpc
# client cancelling an upload does exactly this (its last DATA frames and the
# RST_STREAM leave in one write).

CANCEL = h2.errors.ErrorCodes.CANCEL


@pytest.mark.parametrize("new_call", [False, True], ids=["reset", "reset and a new call"])
def test_data_credited_then_reset_in_the_same_read(new_call: bool) -> None:
    """Two DATA frames (32 KiB, past CREDIT_BYTES) then RST_STREAM in one read:
    wire._data -> _credit -> h2.increment_flow_control_window(stream 1), which h2
    has closed already: StreamClosedError at e3612a2, or KeyError if the read also
    opens a new call (h2 then drops the closed stream from h2.streams)."""
    pair = H2Pair()
    pair.start(1)
    pair.pump()
    body = prefixed(b"x" * 100_000)
    pair.client.send_data(1, body[:16_384])
    pair.client.send_data(1, body[16_384:32_768])
    pair.client.reset_stream(1, CANCEL)
    if new_call:
        pair.start(5)
    events = pair.one_read()
    assert [type(e) for e in events] == [wire.CallEnded] + [wire.CallStarted] * new_call
    assert pair.server._admitted == 0 and not pair.server._waiting  # noqa: SLF001
    pair.pump()  # the connection goes on
    pair.start(7)
    pair.send(7, prefixed(b""), end=True)
    assert pair.of(wire.RequestEnded, 7)


def _get(pair: H2Pair) -> None:
    pair.client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":path", "/x"), (":authority", "x")]
    )


def _plain_text(pair: H2Pair) -> None:
    pair.start(1, extra=((b"content-type", b"text/plain"),))


def _unknown_encoding(pair: H2Pair) -> None:
    pair.start(1, extra=((b"grpc-encoding", b"snappy"),))


def _too_large(pair: H2Pair) -> None:
    pair.start(1)
    pair.client.send_data(1, b"\x00" + (LIMIT + 1).to_bytes(4, "big"))


def _corrupt_gzip(pair: H2Pair) -> None:
    pair.start(1, extra=((b"grpc-encoding", b"gzip"),))
    pair.client.send_data(1, prefixed(gzip.compress(b"x" * 100)[:-8], compressed=True))


def _after_goaway(pair: H2Pair) -> None:
    pair.server.go_away()
    pair.start(1)


REFUSED = {
    "GET (405)": _get,
    "not gRPC (415)": _plain_text,
    "unknown grpc-encoding": _unknown_encoding,
    "message too large": _too_large,
    "corrupt gzip": _corrupt_gzip,
    "opened after our GOAWAY": _after_goaway,
}


@pytest.mark.parametrize("new_call", [False, True], ids=["reset", "reset and a new call"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_a_call_refused_and_reset_in_the_same_read(name: str, new_call: bool) -> None:
    """A call the server refuses at once (wire._refuse, end_call's Trailers-Only,
    _refuse_message, _start's REFUSED_STREAM), the client's RST_STREAM for it in
    the same read: h2.send_headers / reset_stream on a stream h2 has closed
    (StreamClosedError at e3612a2; StreamIDTooLowError if the read also opens a
    new call, which makes h2 forget the closed stream)."""
    pair = H2Pair()
    REFUSED[name](pair)
    pair.client.reset_stream(1, CANCEL)
    if new_call:
        pair.start(3)
    pair.one_read()
    assert not pair.server.closed
    open_calls = set(pair.server._streams)  # noqa: SLF001
    assert open_calls == ({3} if new_call and name != "opened after our GOAWAY" else set())


def test_a_waiting_message_admitted_then_reset_in_the_same_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stream 3's message waits for admission (PARTIAL_BYTES, made small here). In one
    read, stream 1's request completes and ends (wire._taken admits stream 3 and
    credits it: h2.increment_flow_control_window) and stream 3 is reset:
    StreamClosedError at e3612a2."""
    monkeypatch.setattr(wire, "PARTIAL_BYTES", 100_000)
    pair = H2Pair()
    pair.start(1)
    pair.start(3)
    pair.pump()
    first, second = prefixed(b"a" * 90_000), prefixed(b"b" * 90_000)
    pair.send(1, first[:60_000])  # admitted: credited as it comes
    pair.send(3, second[:40_000])  # waits: 90,000 + 90,000 > 100,000
    assert 3 in pair.server._waiting  # noqa: SLF001
    for offset in range(60_000, len(first), 16_384):
        end = offset + 16_384 >= len(first)
        pair.client.send_data(1, first[offset : offset + 16_384], end_stream=end)
    pair.client.reset_stream(3, CANCEL)
    events = pair.one_read()
    kinds = [wire.MessageReceived, wire.RequestEnded, wire.CallEnded]
    assert [type(e) for e in events] == kinds
    assert pair.server._admitted == 0 and not pair.server._waiting  # noqa: SLF001


def test_a_stream_reset_with_its_window_update_and_a_goaway() -> None:
    """Held at e3612a2 (a guard for the fix): RST_STREAM, WINDOW_UPDATE and GOAWAY
    for a call whose answer waits, in one read."""
    pair = H2Pair()
    pair.start(1)
    pair.send(1, prefixed(b""), end=True)
    pair.server.send_message(1, b"x" * 200_000)
    pair.pump()
    pair.raw(
        frames.RstStreamFrame(1, error_code=int(CANCEL)),
        frames.WindowUpdateFrame(1, window_increment=1000),
        frames.GoAwayFrame(0, last_stream_id=1, error_code=0),
    )
    pair.server.data_to_send()
