"""gRPC held bytes, in process: a fifth review, of 5e0f3e1.

An in-process transport.GrpcServer and an h2 client on a Trio socket, so that
the connection's counters (transport._Connection._held, wire's _admitted) can be
read once calls end every way, and what a handler's task keeps can be
measured (tracemalloc). The first part holds at 5e0f3e1 and guards the
accounting; each test of "faults found in 5e0f3e1" fails on it, and its
docstring says why. The end-to-end side is tests/e2e/test_grpc_abuse5.py.
"""

from __future__ import annotations

import gc
import gzip
import tracemalloc
import zlib
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from support.h2client import H2Client, serve_in_process, small_bounds, watch_forever
from support.h2pair import prefixed

from kairoi_trio.protocols.grpc import transport, wire

MiB = 1 << 20


def _connection(server: transport.GrpcServer) -> transport._Connection:
    [connection] = server._connections  # noqa: SLF001
    return connection


# -- what held at 5e0f3e1 ----------------------------------------------------------------


async def test_held_bytes_come_back_to_zero_whatever_ends_the_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On one connection, calls of every kind (a unary Method, a UnaryMethod answered
    at once or later, a response-streaming call that keeps its request, streaming
    requests kept two at a time) end every way: OK; a corrupt, a too-large-once-
    inflated or a second request message; no request message; the client's
    reset before, while and after the handler took its messages; the handler
    returning early or raising; a message past max_message_bytes mid-stream; a
    call refused for held bytes (the bound lowered to 3 MiB); request trailers.
    Held bytes never go below zero, on the connection or a call, and once every
    call is over the connection holds nothing, wire admits nothing, and a new
    call that takes 2.5 MiB inflated is served."""
    monkeypatch.setattr(transport, "HELD_BYTES", 3 * MiB)
    monkeypatch.setattr(transport, "HELD_MESSAGES", 0)
    lowest: list[int] = [0]
    hold, release = transport._Connection.hold, transport._Connection.release  # noqa: SLF001

    def checked_hold(self: Any, call: Any, size: int, **options: Any) -> None:
        hold(self, call, size, **options)
        lowest[0] = min(lowest[0], self._held, call.held)  # noqa: SLF001

    def checked_release(self: Any, call: Any, size: int) -> None:
        release(self, call, size)
        lowest[0] = min(lowest[0], self._held, call.held)  # noqa: SLF001

    monkeypatch.setattr(transport._Connection, "hold", checked_hold)  # noqa: SLF001
    monkeypatch.setattr(transport._Connection, "release", checked_release)  # noqa: SLF001

    later: dict[int, transport.Call] = {}  # answered by the test

    async def unary(request: bytes, _call: transport.Call) -> bytes:
        return b"ok:" + str(len(request)).encode()

    async def stream(call: transport.Call, _: transport.Call) -> bytes:
        count = 0
        async for request in call.messages(keep=True):
            if request == b"stop":
                return b"stopped"
            if request == b"boom":
                raise ValueError("boom")
            count += 1
            if len(call.kept) > 2:  # the last two kept, as StreamSetJobs keeps batches
                call.let_go()
        return str(count).encode()

    methods = {
        "/t/Unary": transport.Method(False, False, bytes, unary),
        "/t/Fast": transport.UnaryMethod(bytes, lambda r, call: call.answer(b"fast")),
        "/t/Later": transport.UnaryMethod(
            bytes, lambda r, call: later.update({call.stream_id: call})
        ),
        "/t/Watch": transport.Method(False, True, bytes, watch_forever),
        "/t/Stream": transport.Method(True, False, bytes, stream),
    }
    mib = gzip.compress(b"\0" * MiB)
    huge = zlib.compress(b"\0" * (4 * MiB + 1))
    plans: list[tuple[str, str, list[bytes], str]] = [
        # (path, encoding, messages, how it ends: "end", "open" (reset later), "reset")
        ("/t/Unary", "", [prefixed(b"x" * 100_000)], "end"),
        ("/t/Unary", "gzip", [prefixed(mib, True)], "end"),
        ("/t/Unary", "gzip", [prefixed(b"not gzip", True)], "end"),
        ("/t/Unary", "deflate", [prefixed(huge, True)], "end"),
        ("/t/Unary", "", [prefixed(b"a"), prefixed(b"b")], "end"),
        ("/t/Unary", "", [], "end"),
        ("/t/Unary", "", [prefixed(b"x" * 200_000)[:100_000]], "reset"),
        ("/t/Fast", "gzip", [prefixed(mib, True)], "end"),
        ("/t/Later", "gzip", [prefixed(mib, True)], "end"),
        ("/t/Later", "", [prefixed(b"y" * 50_000)], "end"),
        ("/t/Later", "gzip", [prefixed(mib, True)], "end"),  # reset once begun
        ("/t/Watch", "", [prefixed(b"w" * 70_000)], "open"),
        ("/t/Watch", "gzip", [prefixed(mib, True)], "open"),
        ("/t/Stream", "gzip", [prefixed(gzip.compress(b"m" * 300_000), True)] * 5, "end"),
        ("/t/Stream", "", [prefixed(b"s" * 30_000)] * 2 + [prefixed(b"stop")] * 3, "open"),
        ("/t/Stream", "gzip", [prefixed(gzip.compress(b"boom"), True)] * 2, "open"),
        ("/t/Stream", "", [prefixed(b"p" * 40_000)] * 3, "reset"),
        ("/t/Stream", "", [prefixed(b"q"), b"\0" + (5 * MiB).to_bytes(4, "big")], "open"),
        # past 3 MiB kept: the handler waits for room (it keeps two), not refused
        ("/t/Stream", "gzip", [prefixed(mib, True)] * 4, "open"),
    ]
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(nursery, methods)
        client = H2Client(
            await trio.open_tcp_stream("127.0.0.1", grpc_port), connection_window=64 * MiB
        )
        streams = []
        for k, (path, encoding, messages, how) in enumerate(plans):
            stream_id = 2 * k + 1
            streams.append(stream_id)
            client.start(stream_id, path, encoding)
            for data in messages:
                await client.send(stream_id, data)
            if how == "end":
                await client.send(stream_id, b"", end=True)
            elif how == "reset":
                client.h2.reset_stream(stream_id)
            await client.flush()
            await trio.testing.wait_all_tasks_blocked(0.05)
        # request trailers end a streaming request
        client.start(101, "/t/Stream")
        await client.send(101, prefixed(b"t" * 10))
        client.h2.send_headers(101, [("grpc-status", "0")], end_stream=True)
        await client.flush()
        ending = [
            s for s, p in zip(streams, plans, strict=True) if p[3] == "end" and p[0] != "/t/Later"
        ]
        assert await client.read_until(lambda: all(client.status(s) for s in ending))
        assert [client.status(s) for s in ending] == [
            b"0",
            b"0",
            b"13",
            b"8",
            b"12",
            b"12",
            b"0",
            b"0",
        ]
        assert sorted(later) == [17, 19, 21]
        later[17].answer(b"late")
        later[19].fail(wire.NOT_FOUND, "late")
        assert await client.read_until(lambda: client.status(17) and client.status(19))
        assert [client.status(s) for s in (27, 29, 31, 35, 37)] == [b"0", b"0", b"2", b"8", None]
        for stream_id, plan in zip(streams, plans, strict=True):
            if (plan[3] == "open" or stream_id == 21) and not client.status(stream_id):
                client.h2.reset_stream(stream_id)
        await client.flush()
        await trio.testing.wait_all_tasks_blocked(0.05)
        later[21].answer(b"late, reset")
        with trio.fail_after(10):
            await server.wait_idle()
        connection = _connection(server)
        held = (connection._held, connection._kept, connection.grpc._admitted)  # noqa: SLF001
        assert (*held, connection.grpc.queued_answers, lowest[0]) == (0, 0, 0, 0, 0)
        client.start(201, "/t/Unary", "gzip")
        await client.send(201, prefixed(gzip.compress(b"\1" * (5 * MiB // 2)), True), end=True)
        assert await client.read_until(lambda: client.status(201))
        assert client.status(201) == b"0"
        assert connection._held == 0  # noqa: SLF001
        nursery.cancel_scope.cancel()


# -- faults found in 5e0f3e1 ---------------------------------------------------------------


async def test_a_streaming_handler_waiting_for_its_next_message_holds_none_of_the_last() -> None:
    """A streaming handler takes one plain message of 4 MiB, decodes it to its length
    (keeping nothing of it) and waits for the next. The message is counted no
    more (Call.messages released it when the handler took it), yet 4 MiB stay
    allocated for as long as the stream stays open: Call.messages' `data`, bound
    to the last message while it awaits the next (`async for data, size,
    encoding in self._inbox[1]`). A client's 1,024 idle streams a connection
    hold 4 GiB that nothing counts (tests/e2e/test_grpc_abuse5.py shows it with
    reflection and StreamSetJobs, which keep more). Call.messages should let go
    of it before it waits (`del data` after the yield)."""
    took = trio.Event()

    async def handler(call: transport.Call, _: transport.Call) -> bytes:
        async for _length in call.messages():
            took.set()
        return b""

    async with trio.open_nursery() as nursery:
        _, grpc_port = await serve_in_process(
            nursery, {"/t/Stream": transport.Method(True, False, len, handler)}
        )
        client = H2Client(
            await trio.open_tcp_stream("127.0.0.1", grpc_port), connection_window=64 * MiB
        )
        await trio.testing.wait_all_tasks_blocked(0.05)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            client.start(1, "/t/Stream")
            await client.send(1, prefixed(b"d" * (4 * MiB - 100)))
            with trio.fail_after(10):
                await took.wait()
            await trio.testing.wait_all_tasks_blocked(0.1)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    assert kept < MiB, f"{kept / MiB:.1f} MiB kept by a handler that waits for its next message"


async def test_answers_queued_for_a_client_that_does_not_read_are_bounded() -> None:
    """A UnaryMethod answers each call with 4 MiB at once; the client, its
    INITIAL_WINDOW_SIZE at 0, opens 60 calls and never opens a window. Each call
    is over as soon as it is answered (Call.answer, _Connection.finish), and its
    answer waits in wire's outbound queue for ever: 240 MiB queued for 60 small
    requests, 4 GiB with the 1,024 calls a connection may open, counted by
    nothing (MAX_PENDING_OUTPUT counts h2's buffer only). The answer bytes waiting
    on a connection should be bounded: past a bound, the connection not read or
    its new calls refused."""

    def begin(_request: bytes, call: transport.Call) -> None:
        call.answer(b"a" * (4 * MiB - 100))

    window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(
            nursery, {"/t/Big": transport.UnaryMethod(bytes, begin)}
        )
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port), {window: 0}, 64 * MiB)
        for k in range(60):
            client.start(2 * k + 1, "/t/Big")
            await client.send(2 * k + 1, prefixed(b""), end=True)
            with trio.move_on_after(0.02):
                await client.read_until(lambda: False)
        await client.read_until(lambda: False, 0.5)
        grpc = _connection(server).grpc
        queued = sum(grpc.buffered(2 * k + 1) for k in range(60))
        nursery.cancel_scope.cancel()
    assert queued <= 64 * MiB, f"{queued / MiB:.0f} MiB of answers queued on one connection"


async def test_the_bytes_held_on_every_connection_together_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection has its own held bytes, and one address may open 64
    connections: all of them together hold at most the server's
    (SERVER_HELD_BYTES; 2.5 MB here, 2 MB a connection). Two watches of 900 KB
    on one connection are held; a third on another connection would take the
    server past its bound and is refused RESOURCE_EXHAUSTED "too many request
    bytes held by the server", its connection whole. Once the first client resets
    its watches the bytes come back, and the refused client's next watch runs."""
    small_bounds(monkeypatch, 2_000_000, 2_500_000)

    methods = {"/t/Watch": transport.Method(False, True, bytes, watch_forever)}
    request = prefixed(b"w" * 900_000)
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(nursery, methods)
        first, second = [
            H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port), connection_window=64 * MiB)
            for _ in range(2)
        ]
        for stream_id in (1, 3):
            first.start(stream_id, "/t/Watch")
            await first.send(stream_id, request, end=True)
        assert await first.read_until(lambda: len(first.events) >= 4 and server.held > 1_800_000)
        second.start(1, "/t/Watch")
        await second.send(1, request, end=True)
        assert await second.read_until(lambda: second.status(1))
        [trailers] = [e for e in second.events if isinstance(e, h2.events.ResponseReceived)]
        assert (second.status(1), dict(trailers.headers)[b"grpc-message"]) == (
            b"8",
            b"too many request bytes held by the server (over 2500000)",
        )
        for stream_id in (1, 3):
            first.h2.reset_stream(stream_id)
        await first.flush()
        with trio.fail_after(5):
            while server.held:
                await trio.testing.wait_all_tasks_blocked()
        second.start(3, "/t/Watch")
        await second.send(3, request, end=True)
        assert await second.read_until(lambda: server.held > 900_000)
        assert second.status(3) is None  # running
        nursery.cancel_scope.cancel()


async def test_answers_unread_on_every_connection_together_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unread answers are bounded on each connection (2 MB here) and on every
    connection together (SERVER_HELD_BYTES, 2.5 MB here), one answer a connection
    always let through. Two clients with their windows at 0 ask for answers of
    900 KB: the first gets two queued, the second one; the second's next is
    refused RESOURCE_EXHAUSTED, since the server would then hold 3.6 MB its
    clients have not read. Once the first client goes away its answers are
    counted no more (and the server-wide count comes back to what is queued)."""
    small_bounds(monkeypatch, 2_000_000, 2_500_000)
    answer = b"a" * 900_000

    def begin(_request: bytes, call: transport.Call) -> None:
        call.answer(answer)

    window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(
            nursery, {"/t/Big": transport.UnaryMethod(bytes, begin)}
        )
        first, second = [
            H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port), {window: 0}, 64 * MiB)
            for _ in range(2)
        ]

        async def call(client: H2Client, stream_id: int) -> None:
            client.start(stream_id, "/t/Big")
            await client.send(stream_id, prefixed(b""), end=True)
            await client.read_until(lambda: False, 0.2)

        await call(first, 1)
        await call(first, 3)
        await call(second, 1)
        assert (first.status(3), second.status(1)) == (None, None)  # queued, unread
        assert server.queued_answers == 3 * (900_000 + 5)
        await call(second, 3)
        assert second.status(3) == b"8"
        await first.stream.aclose()
        with trio.fail_after(5):
            while server.queued_answers != 900_005:  # noqa: ASYNC110 - the reader sees the close
                await trio.sleep(0.01)
        await call(second, 5)
        assert second.status(5) is None and server.queued_answers == 2 * 900_005
        await second.stream.aclose()
        with trio.fail_after(5):
            while server.queued_answers:  # noqa: ASYNC110 - the reader sees the close
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
