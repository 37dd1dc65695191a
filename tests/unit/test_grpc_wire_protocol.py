"""wire.GrpcConnection, sans-io: driven by h2's own client state machine, no sockets."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import pytest
from support.h2pair import H2Pair, prefixed, request_headers

from kairoi_trio.protocols.grpc import wire

PATH = "/kairoi.v1.Scheduler/SetJob"
STREAM_PATH = "/kairoi.v1.Scheduler/StreamSetJobs"


class Peer(H2Pair):
    """The pair as a gRPC client uses it: each call on the next stream id, the
    answers acknowledged only as the test takes them (`body`), and with `window`
    the client's initial stream window (what the server may send ahead a call)."""

    def __init__(self, max_message_bytes: int = 4 << 20, window: int | None = None) -> None:
        settings: dict[h2.settings.SettingCodes | int, int] | None = None
        if window is not None:
            settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        super().__init__(
            max_message_bytes=max_message_bytes,
            streaming_requests={STREAM_PATH},
            settings=settings,
            connection_window=0 if window is None else 16 << 20,
            ack=False,
        )

    def call(
        self,
        body: bytes,
        path: str = PATH,
        end: bool = True,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        """Open a call, send `body` (and END_STREAM if `end`) in one read, pump;
        its stream id."""
        stream_id = self.client.get_next_available_stream_id()
        self.start(stream_id, path, [(b"te", b"trailers"), *(headers or [])])
        self.send(stream_id, body, pump=False)
        if end:
            self.client.end_stream(stream_id)
        self.pump()
        return stream_id

    def body(self, stream_id: int) -> bytes:
        """The answer bytes the call got since the last `body`, acknowledged (which
        opens the windows) and taken out of `answers`."""
        data = b""
        kept = []
        for event in self.answers:
            if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                data += event.data
                self.client.acknowledge_received_data(event.flow_controlled_length, stream_id)
            else:
                kept.append(event)
        self.answers[:] = kept
        return data


def test_a_unary_call_its_message_across_frames_and_its_answer() -> None:
    peer = Peer()
    stream_id = peer.client.get_next_available_stream_id()
    peer.client.send_headers(
        stream_id,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PATH.encode()),
            (b":authority", b"t"),
            (b"content-type", b"application/grpc+proto"),
            (b"grpc-timeout", b"250m"),
            (b"authorization", b"Bearer x"),
            (b"trace-bin", b"AAEC"),
        ],
    )
    message = prefixed(b"hello world")
    for i in range(0, len(message), 3):  # a prefix and a message cut anywhere
        peer.client.send_data(stream_id, message[i : i + 3])
    peer.client.end_stream(stream_id)
    peer.pump()
    [started] = peer.of(wire.CallStarted, stream_id)
    assert started.method == PATH and started.timeout_s == pytest.approx(0.25)
    assert ("authorization", "Bearer x") in started.metadata
    assert ("trace-bin", b"\x00\x01\x02") in started.metadata
    [received] = peer.of(wire.MessageReceived, stream_id)
    assert received.message == b"hello world"
    assert peer.of(wire.RequestEnded, stream_id)

    assert peer.server.send_message(stream_id, b"answer")
    peer.server.end_call(stream_id, wire.OK)
    peer.pump()
    assert peer.body(stream_id) == prefixed(b"answer")
    assert peer.status(stream_id) == (0, "")
    assert not peer.server.is_open(stream_id)
    assert not peer.server.send_message(stream_id, b"late")  # the call is over


def test_a_refusal_before_any_answer_is_trailers_only_and_percent_encoded() -> None:
    peer = Peer()
    stream_id = peer.call(prefixed(b"x"))
    peer.server.end_call(stream_id, wire.NOT_FOUND, "job «a\nb» 100% gone")
    peer.pump()
    [response] = [
        e for e in peer.answers_on(stream_id) if isinstance(e, h2.events.ResponseReceived)
    ]
    headers = dict(response.headers)
    assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"5"
    assert headers[b"grpc-message"] == b"job %C2%ABa%0Ab%C2%BB 100%25 gone"
    assert wire.percent_encode("plain text") == b"plain text"


def test_what_is_not_a_grpc_request_gets_plain_http_errors() -> None:
    peer = Peer()
    stream_id = peer.client.get_next_available_stream_id()
    peer.client.send_headers(
        stream_id,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"t")],
        end_stream=True,
    )
    peer.pump()
    [response] = peer.answers_on(stream_id)[:1]
    assert dict(response.headers)[b":status"] == b"405"
    stream_id = peer.call(prefixed(b"x"), headers=[])
    json_call = peer.client.get_next_available_stream_id()
    peer.client.send_headers(
        json_call, request_headers(PATH, content_type=b"application/json"), end_stream=True
    )
    peer.pump()
    assert dict(peer.answers_on(json_call)[0].headers)[b":status"] == b"415"
    assert not peer.of(wire.CallStarted, json_call)


def test_a_message_over_the_limit_ends_its_call_and_is_credited_back() -> None:
    peer = Peer(max_message_bytes=1000)
    small = peer.call(prefixed(b"x" * 1000))
    assert peer.of(wire.MessageReceived, small)
    big = peer.call(prefixed(b"y" * 1001))
    assert peer.of(wire.CallEnded, big) and not peer.of(wire.MessageReceived, big)
    assert peer.status(big) == (8, "Received message larger than max (1001 vs. 1000)")
    # The prefix alone is enough to refuse: a 4 GiB announcement holds nothing.
    huge = peer.call(b"\x00\xff\xff\xff\xff", end=False)
    assert peer.status(huge)[0] == wire.RESOURCE_EXHAUSTED
    assert peer.server._admitted == 0
    # What refused calls sent is credited back: more of it than the connection's
    # window does not stop the next call.
    for _ in range(wire.CONNECTION_WINDOW // 16_000 + 20):
        peer.call(prefixed(b"z" * 15_995))
    last = peer.call(prefixed(b"still served"))
    assert [e.message for e in peer.of(wire.MessageReceived, last)] == [b"still served"]


def test_compressed_requests_are_passed_on_compressed() -> None:
    """A compressed message is handed on as it came, with its encoding: its call
    inflates it when it takes it (wire.inflate), so what waits is what flow
    control bounds (a 4 KB message may inflate to 4 MiB)."""
    peer = Peer(max_message_bytes=10_000)
    packed = gzip.compress(b"a" * 5000)
    gzip_call = peer.call(prefixed(packed, compressed=True), headers=[(b"grpc-encoding", b"gzip")])
    [received] = peer.of(wire.MessageReceived, gzip_call)
    assert (received.message, received.encoding) == (packed, b"gzip")
    assert wire.inflate(received.message, b"gzip", 10_000) == b"a" * 5000
    deflate_call = peer.call(
        prefixed(zlib.compress(b"b" * 10), compressed=True),
        headers=[(b"grpc-encoding", b"deflate")],
    )
    [received] = peer.of(wire.MessageReceived, deflate_call)
    assert wire.inflate(received.message, b"deflate", 10_000) == b"b" * 10
    plain = peer.call(prefixed(b"c"), headers=[(b"grpc-encoding", b"gzip")])  # flag not set
    assert [(e.message, e.encoding) for e in peer.of(wire.MessageReceived, plain)] == [(b"c", None)]
    unannounced = peer.call(prefixed(b"not gzip", compressed=True))
    assert peer.status(unannounced)[0] == wire.INTERNAL
    unknown = peer.call(prefixed(b"x"), headers=[(b"grpc-encoding", b"snappy")])
    assert peer.status(unknown)[0] == wire.UNIMPLEMENTED


def test_a_streaming_request_is_credited_as_its_handler_takes_it() -> None:
    peer = Peer()
    stream_id = peer.call(b"", path=STREAM_PATH, end=False)
    message = prefixed(b"m" * 10_000)
    sent = 0
    while peer.client.local_flow_control_window(stream_id) >= len(message):
        peer.send(stream_id, message, pump=False)
        sent += len(message)
        peer.pump()
    # Nothing was credited: the handler took none of them, so the client stopped.
    assert wire.STREAM_WINDOW - len(message) < sent <= wire.STREAM_WINDOW
    received = peer.of(wire.MessageReceived, stream_id)
    assert len(received) == sent // len(message)
    for event in received:
        peer.server.consumed(stream_id, event.size)
    peer.pump()
    assert peer.client.local_flow_control_window(stream_id) == wire.STREAM_WINDOW


def test_answers_wait_for_the_window_and_trailers_follow_the_last_byte() -> None:
    peer = Peer(window=10_000)
    stream_id = peer.call(prefixed(b"x"))
    peer.server.send_message(stream_id, b"z" * 30_000)
    peer.server.end_call(stream_id, wire.OK)
    peer.pump()
    assert peer.server.buffered(stream_id) == 30_005 - 10_000
    assert peer.server.is_open(stream_id) is False  # ended: no more messages ...
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in peer.answers_on(stream_id))
    data = b""
    while not any(isinstance(e, h2.events.TrailersReceived) for e in peer.answers_on(stream_id)):
        data += peer.body(stream_id)  # acknowledges, which opens the window
        peer.pump()
    data += peer.body(stream_id)
    assert data == prefixed(b"z" * 30_000)  # ... but all of it arrives, then the trailers
    assert peer.status(stream_id) == (0, "")


def test_the_writer_budget_serves_calls_in_turn() -> None:
    peer = Peer(window=1 << 20)
    calls = [peer.call(prefixed(b"x")) for _ in range(3)]
    for stream_id in calls:
        peer.server.send_message(stream_id, b"w" * 200_000)

    def handed() -> list[int]:
        return [200_005 - peer.server.buffered(stream_id) for stream_id in calls]

    first = peer.server.data_to_send(budget=100_000)
    assert 100_000 <= len(first) < 130_000  # about the budget, not the 600 KB waiting
    assert handed()[0] == wire.TURN_BYTES + 5  # a turn (and the prefix), then the next
    assert 0 < handed()[1] <= wire.TURN_BYTES and handed()[2] == 0
    peer.server.data_to_send(budget=2 * wire.TURN_BYTES)
    assert handed()[2] > 0  # whoever waited goes first
    while peer.server.data_to_send():
        pass
    assert handed() == [0, 0, 0] or all(peer.server.buffered(s) == 0 for s in calls)


def frames(data: bytes) -> list[Any]:
    """The HTTP/2 frames in `data` (hyperframe's classes)."""
    found = []
    view = memoryview(data)
    while view:
        frame_, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        frame_.parse_body(view[9 : 9 + length])
        found.append(frame_)
        view = view[9 + length :]
    return found


def test_after_goaway_calls_in_flight_answer_and_new_ones_are_refused() -> None:
    peer = Peer()
    before = peer.call(prefixed(b"x"))
    peer.server.go_away()
    [goaway] = frames(peer.server.data_to_send())
    assert isinstance(goaway, hyperframe.frame.GoAwayFrame)
    assert goaway.last_stream_id == before and goaway.error_code == 0
    # A call the client opened before it saw the GOAWAY is refused, to retry elsewhere.
    after = peer.client.get_next_available_stream_id()
    peer.client.send_headers(after, request_headers(PATH), end_stream=True)
    assert peer.one_read() == []
    [reset] = frames(peer.server.data_to_send())
    assert isinstance(reset, hyperframe.frame.RstStreamFrame) and reset.stream_id == after
    assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    # The call in flight still answers.
    assert peer.server.send_message(before, b"still answered")
    peer.server.end_call(before, wire.OK)
    kinds = [type(f).__name__ for f in frames(peer.server.data_to_send())]
    assert kinds == ["HeadersFrame", "DataFrame", "HeadersFrame"]


def test_a_client_reset_ends_the_call() -> None:
    peer = Peer()
    stream_id = peer.call(prefixed(b"x"), end=False)
    peer.client.reset_stream(stream_id)
    peer.pump()
    assert peer.of(wire.CallEnded, stream_id)
    assert not peer.server.is_open(stream_id)
    peer.server.end_call(stream_id, wire.OK)  # a handler that ends late changes nothing
    assert peer.server.data_to_send() == b""


def test_messages_are_admitted_to_a_bound_per_connection(monkeypatch) -> None:
    monkeypatch.setattr(wire, "PARTIAL_BYTES", 3 << 20)
    peer = Peer()
    calls = []
    for _ in range(3):  # each call announces a 2 MiB message and sends what it may
        stream_id = peer.call(b"", end=False)
        peer.send(stream_id, prefixed(b"p" * (2 << 20))[: wire.STREAM_WINDOW], pump=False)
        peer.pump()
        calls.append(stream_id)
    # The first was admitted (alone, it may exceed the bound) and credited back; the
    # others wait: they may send no more than their window.
    windows = [peer.client.local_flow_control_window(s) for s in calls]
    assert windows == [wire.STREAM_WINDOW, 0, 0]
    assert list(peer.server._waiting) == calls[1:]
    # The connection's window is credited whatever waits: the first call can go on.
    assert peer.client.outbound_flow_control_window > wire.CONNECTION_WINDOW // 2
    peer.client.reset_stream(calls[0])
    peer.pump()
    # Its admission freed, the next one is admitted and credited, the last still waits.
    windows = [peer.client.local_flow_control_window(s) for s in calls[1:]]
    assert windows == [wire.STREAM_WINDOW, 0]
    peer.client.reset_stream(calls[1])
    peer.pump()
    assert peer.client.local_flow_control_window(calls[2]) == wire.STREAM_WINDOW
    peer.client.reset_stream(calls[2])
    peer.pump()
    assert peer.server._admitted == 0 and not peer.server._waiting


def test_a_protocol_error_ends_the_connection() -> None:
    server = wire.GrpcConnection(1000)
    [event] = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, wire.ConnectionEnded) and event.error
    assert server.receive_data(b"more") == []


def upload(peer: Peer, stream_id: int, data: bytes) -> None:
    """Send all of `data`, as fast as the server credits the stream back."""
    while data:
        room = peer.client.local_flow_control_window(stream_id)
        assert room > 0, "the server stopped crediting the stream"
        peer.send(stream_id, data[:room], pump=False)
        data = data[room:]
        peer.pump()


def test_unread_streaming_messages_hold_the_next_ones_to_their_window(monkeypatch) -> None:
    """Whole messages a streaming handler has not read stay admitted: past
    PARTIAL_BYTES, the next large message waits (its client held to its window)
    until a handler reads, rather than being held in memory or refused."""
    big = prefixed(b"b" * (1 << 20))
    monkeypatch.setattr(wire, "PARTIAL_BYTES", 3 * len(big))
    peer = Peer()
    calls = []
    for _ in range(3):  # three streams, a whole 1 MiB message each, none read
        stream_id = peer.call(b"", path=STREAM_PATH, end=False)
        upload(peer, stream_id, big)
        calls.append(stream_id)
    assert all(len(peer.of(wire.MessageReceived, s)) == 1 for s in calls)
    assert peer.server._admitted == 3 * len(big)
    late = peer.call(b"", path=STREAM_PATH, end=False)
    peer.send(late, big[: wire.STREAM_WINDOW], pump=False)
    peer.pump()
    assert list(peer.server._waiting) == [late]
    assert peer.client.local_flow_control_window(late) == 0
    peer.server.consumed(calls[0], peer.of(wire.MessageReceived, calls[0])[0].size)
    peer.pump()
    # One read: the waiting message is admitted and its client may go on.
    assert not peer.server._waiting
    assert peer.client.local_flow_control_window(late) == wire.STREAM_WINDOW
    for stream_id in [*calls, late]:
        peer.client.reset_stream(stream_id)
    peer.pump()
    assert peer.server._admitted == 0


def test_a_unary_request_stays_admitted_until_it_ends(monkeypatch) -> None:
    """A unary call's whole message is held for it until the request ends: counted,
    so that calls that never end their request hold the others to their windows."""
    monkeypatch.setattr(wire, "PARTIAL_BYTES", 1 << 20)
    peer = Peer()
    first = peer.call(b"", end=False)
    upload(peer, first, prefixed(b"a" * (1 << 20)))  # whole, not ended
    second = peer.call(b"", end=False)
    peer.send(second, prefixed(b"b" * (1 << 20))[: wire.STREAM_WINDOW], pump=False)
    peer.pump()
    assert list(peer.server._waiting) == [second]
    peer.client.end_stream(first)
    peer.pump()
    assert peer.of(wire.RequestEnded, first) and not peer.server._waiting
    assert peer.server._admitted == 1 << 20  # the second's announced size


def test_request_trailers_end_the_request_once() -> None:
    """A client may end its request with trailers (HEADERS with END_STREAM): one
    RequestEnded, not one for the trailers and one for the end of the stream."""
    peer = Peer()
    stream_id = peer.call(prefixed(b"x"), end=False)
    peer.client.send_headers(stream_id, [(b"x-trailer", b"1")], end_stream=True)
    peer.pump()
    assert len(peer.of(wire.RequestEnded, stream_id)) == 1


def test_answers_held_by_the_windows_go_on_when_they_open() -> None:
    """Answers stopped by the stream windows go on when a SETTINGS frame raises the
    initial window; answers stopped by the connection's window go on with the
    client's WINDOW_UPDATEs (the calls waiting for window are kept apart)."""
    peer = Peer(window=1000)
    calls = [peer.call(prefixed(b"")) for _ in range(3)]
    for stream_id in calls:
        peer.server.send_message(stream_id, b"s" * 5000)
        peer.server.end_call(stream_id, wire.OK)
    peer.pump()
    assert all(len(peer.body(s)) == 1000 for s in calls)  # held by the stream windows
    peer.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    peer.pump()
    assert all(peer.status(s) == (0, "") for s in calls)

    peer = Peer()  # the connection's window: 65,535 bytes for all the answers
    calls = [peer.call(prefixed(b"")) for _ in range(3)]
    for stream_id in calls:
        peer.server.send_message(stream_id, b"c" * 50_000)
        peer.server.end_call(stream_id, wire.OK)
    peer.pump()
    received = {s: b"" for s in calls}
    for _ in range(10):  # the client takes what came: its WINDOW_UPDATEs
        for stream_id in calls:
            received[stream_id] += peer.body(stream_id)
        peer.pump()
    assert all(len(data) == 5 + 50_000 for data in received.values())
    assert all(peer.status(s) == (0, "") for s in calls)
