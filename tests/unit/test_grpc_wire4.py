"""wire.GrpcConnection, sans-io: a fourth review, of 03c2cb1.

An in-memory h2 client (support.h2pair: it keeps the connection window h2 starts
with, 65,535, and acknowledges what it gets while `ack` is set) drives the
server connection, so frame sequences and window sizes are exact. These guard
what 03c2cb1 and b308847 changed and held: calls waiting for window kept in
`_blocked` and made ready once a read, with the client's SETTINGS lowering the
windows to zero or below and raising them again, stream and connection
WINDOW_UPDATEs in either order, trailers queued while blocked, and tiny writer
budgets. The faults this review found are end-to-end
(tests/e2e/test_grpc_abuse4.py).
"""

from __future__ import annotations

import random

import h2.exceptions
import h2.settings
import pytest
from support.h2pair import H2Pair

from kairoi_trio.protocols.grpc import wire

WINDOW = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE


def test_trailers_queued_while_the_window_is_zero_go_once_settings_open_it() -> None:
    pair = H2Pair()
    pair.client.update_settings({WINDOW: 0})
    pair.pump()
    pair.unary(1)
    pair.pump()
    pair.server.send_message(1, b"a" * 100_000)
    pair.server.end_call(1, wire.OK)
    pair.pump()
    assert pair.received(1) == (0, False)
    pair.client.update_settings({WINDOW: 200_000})
    pair.client.increment_flow_control_window(1 << 20)
    pair.pump()
    assert pair.received(1) == (100_005, True)
    assert not pair.server._streams  # noqa: SLF001


def test_a_window_below_zero_then_stream_credit_then_settings() -> None:
    """The client lowers its initial window under what was sent (the stream's
    window goes to -64,535), credits the stream less than that (still below
    zero), the call ends, then SETTINGS raise the window: all goes."""
    pair = H2Pair()
    pair.ack = False
    pair.client.increment_flow_control_window(1 << 20)
    pair.unary(1)
    pair.pump()
    pair.server.send_message(1, b"a" * 200_000)
    pair.pump()
    assert pair.received(1) == (65_535, False)
    pair.client.update_settings({WINDOW: 1000})
    pair.pump()
    pair.client.increment_flow_control_window(1000, stream_id=1)
    pair.pump()
    assert pair.server._h2.local_flow_control_window(1) < 0  # noqa: SLF001
    pair.server.end_call(1, wire.OK)
    pair.pump()
    pair.ack = True
    pair.client.update_settings({WINDOW: 300_000})
    pair.pump()
    assert pair.received(1) == (200_005, True)


@pytest.mark.parametrize("stream_first", [True, False])
def test_the_connection_window_and_the_streams_opened_in_either_order(stream_first) -> None:
    """Stream windows large, the connection's spent (the client does not
    acknowledge): two calls wait. Stream credit alone moves nothing; once the
    connection's window opens, both answers and their trailers go."""
    pair = H2Pair()
    pair.ack = False
    pair.client.update_settings({WINDOW: 1 << 30})
    pair.pump()
    for stream_id in (1, 3):
        pair.unary(stream_id)
    pair.pump()
    for stream_id in (1, 3):
        pair.server.send_message(stream_id, b"a" * 100_000)
        pair.server.end_call(stream_id, wire.OK)
    pair.pump()
    assert pair.received(1)[0] + pair.received(3)[0] == 65_535
    if stream_first:
        pair.client.increment_flow_control_window(10, stream_id=3)
        pair.pump()
    pair.ack = True
    pair.client.increment_flow_control_window(300_000)
    pair.pump()
    assert pair.received(1) == (100_005, True) and pair.received(3) == (100_005, True)


def test_answers_always_get_out_whatever_the_windows_do() -> None:
    """Random walks (150) of calls, answers of 1 B to 200 KB, statuses, the client's
    SETTINGS (initial window 0, 100 to 200,000, down and up), stream and connection
    WINDOW_UPDATEs, acknowledging or not, and writer budgets of 1 B to 64 KiB:
    once the client opens its windows, every call has all its answer and its
    trailers, and the server forgets it (nothing left in _ready or _blocked)."""
    for seed in range(150):
        rnd = random.Random(seed)
        pair = H2Pair()
        calls: list[int] = []
        ended: set[int] = set()
        for _ in range(40):
            action = rnd.randrange(8)
            try:
                if action == 0 or not calls:
                    stream_id = 2 * len(calls) + 1
                    pair.unary(stream_id)
                    calls.append(stream_id)
                elif action == 1:
                    stream_id = rnd.choice(calls)
                    size = rnd.choice([1, 1000, 20_000, 70_000, 200_000])
                    pair.server.send_message(stream_id, b"m" * size)
                elif action == 2:
                    stream_id = rnd.choice(calls)
                    pair.server.end_call(stream_id, wire.OK)
                    ended.add(stream_id)
                elif action == 3:
                    pair.client.update_settings(
                        {WINDOW: rnd.choice([0, 100, 1000, 65_535, 200_000])}
                    )
                elif action == 4:
                    pair.client.increment_flow_control_window(rnd.choice([1, 1000, 70_000]))
                elif action == 5:
                    stream_id = rnd.choice(calls)
                    if (
                        pair.client.streams.get(stream_id)
                        and not pair.client.streams[stream_id].closed
                    ):
                        pair.client.increment_flow_control_window(1000, stream_id=stream_id)
                elif action == 6:
                    pair.ack = not pair.ack
                pair.pump(rnd.choice([1, 100, 16_384, 65_536]))
            except h2.exceptions.FlowControlError:
                pass  # the client's own windows past 2^31-1: not the server's business
        for stream_id in calls:
            pair.server.end_call(stream_id, wire.OK)
        pair.ack = True
        pair.client.update_settings({WINDOW: 1 << 22})
        pair.client.increment_flow_control_window(1 << 26)
        pair.pump()
        stuck = [s for s in calls if not pair.received(s)[1]]
        assert not stuck, (seed, stuck)
        server = pair.server
        assert not server._streams and not server._ready and not server._blocked, seed  # noqa: SLF001
