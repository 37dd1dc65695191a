"""gRPC held bytes and unread answers, in process: a sixth review, of db0322c.

An in-process transport.GrpcServer (support.h2client.serve_in_process) and raw
h2 clients on Trio sockets, so that the counters 6c68f87..db0322c added
(GrpcServer.held, queued_answers, room_waiters, answer_waiters; a connection's
_held, _kept, queued_answers) can be read once calls and connections end every way,
and StreamSetJobs (server.SchedulerServicer, with a fake actor) be driven
frame by frame. The tests under "what held at db0322c" pass and guard the
accounting; each test under "faults found in db0322c" fails on it, and its
docstring says why. The end-to-end side is tests/e2e/test_grpc_abuse6.py.
"""

from __future__ import annotations

from typing import Any

import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from support.h2client import H2Client, serve_in_process, small_bounds, watch_forever
from support.h2pair import prefixed

from kairoi.v1 import scheduler_pb2 as pb
from kairoi_trio.commands import CommandError, ErrorCode, Request
from kairoi_trio.protocols.grpc import server as grpc_server
from kairoi_trio.protocols.grpc import transport

MiB = 1 << 20
WINDOW = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
STREAM_SET_JOBS = "/kairoi.v1.Scheduler/StreamSetJobs"


async def _settled(server: transport.GrpcServer, wait_s: float = 5) -> None:
    """Until every counter of the server and its connections is back to zero (or
    fail after `wait_s`, saying which is not)."""

    def counters() -> dict[str, int]:
        found = {
            "held": server.held,
            "queued_answers": server.queued_answers,
            "room_waiters": server.room_waiters,
            "answer_waiters": server.answer_waiters,
            "calls": server._calls,  # noqa: SLF001
        }
        for k, connection in enumerate(server._connections):  # noqa: SLF001
            found[f"{k}._held"] = connection._held  # noqa: SLF001
            found[f"{k}._kept"] = connection._kept  # noqa: SLF001
            found[f"{k}.queued_answers"] = connection.grpc.queued_answers
        return found

    with trio.move_on_after(wait_s):
        while any(counters().values()):  # noqa: ASYNC110 - counters, no event
            await trio.sleep(0.01)
    assert not any(counters().values()), counters()


def _answer(client: H2Client, stream_id: int) -> bytes:
    """The answer bytes the client got on the call (gRPC prefixes included)."""
    return b"".join(
        e.data
        for e in client.events
        if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
    )


def _message(client: H2Client, stream_id: int) -> bytes:
    data = _answer(client, stream_id)
    assert len(data) >= 5 and int.from_bytes(data[1:5], "big") == len(data) - 5, data[:20]
    return data[5:]


def _details(client: H2Client, stream_id: int) -> bytes:
    """The grpc-message of the call's status (b"" if none)."""
    for event in client.events:
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            headers = dict(event.headers or ())
            if event.stream_id == stream_id and b"grpc-status" in headers:
                return headers.get(b"grpc-message", b"")
    return b""


async def _fake_actor(
    requests: trio.MemoryReceiveChannel[Request], delay_s: float, applied: list[str]
) -> None:
    """Applies each batch after `delay_s`: a job whose id starts "bad" fails."""
    async for request in requests:
        await trio.sleep(delay_s)
        results: list[Any] = []
        for command in request.commands:
            job_id = command.id  # type: ignore[union-attr]
            applied.append(job_id)
            if job_id.startswith("bad"):
                results.append(CommandError(ErrorCode.FAILED_PRECONDITION, "bad job"))
            else:
                results.append(None)
        request.reply(results)


def _batch(*ids: str) -> bytes:
    jobs = []
    for job_id in ids:
        job = pb.SetJobRequest(id=job_id, payload=b"p" * 1000)
        job.execute_at.seconds = 4_000_000_000
        jobs.append(job)
    return prefixed(pb.SetJobsRequest(jobs=jobs).SerializeToString())


# -- what held at db0322c ------------------------------------------------------------------


async def test_stream_set_jobs_in_process_every_ending_leaves_nothing_counted() -> None:
    """StreamSetJobs with its settler, an actor that takes 20 ms a batch. A stream of
    six batches (one failing job in the third) is answered with every job in
    stream order: 11 accepted, one failure at index 5. A stream the client resets
    while three batches are in flight, and one whose third message is malformed
    (INVALID_ARGUMENT), end; the actor still applies what was handed to it. Once
    all are over, nothing stays held, kept or waited on, anywhere."""
    send, receive = trio.open_memory_channel[Request](100)
    servicer = grpc_server.SchedulerServicer(send, 4 * MiB)
    applied: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_actor, receive, 0.02, applied)
        server, grpc_port = await serve_in_process(nursery, servicer.methods())
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))

        client.start(1, STREAM_SET_JOBS)
        for k in range(6):
            ids = [f"j{k}.a", "bad.x" if k == 2 else f"j{k}.b"]
            await client.send(1, _batch(*ids))
        await client.send(1, b"", end=True)

        client.start(3, STREAM_SET_JOBS)
        for k in range(3):
            await client.send(3, _batch(f"r{k}"))
        await client.read_until(lambda: False, 0.01)
        client.h2.reset_stream(3)

        client.start(5, STREAM_SET_JOBS)
        await client.send(5, _batch("m0"))
        await client.send(5, _batch("m1"))
        await client.send(5, prefixed(b"\xff\xff\xff"))
        await client.flush()

        assert await client.read_until(lambda: client.status(1) and client.status(5))
        response = pb.StreamSetJobsResponse.FromString(_message(client, 1))
        assert response.accepted == 11
        assert [(f.index, f.id) for f in response.failures] == [(5, "bad.x")]
        assert client.status(5) == b"3"
        await _settled(server)
        nursery.cancel_scope.cancel()


async def test_counters_come_back_to_zero_when_a_connection_drops_with_writes_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unread answers bounded at 2 MB a connection: a client with its windows at 0
    opens three streaming calls that each write 900 KB messages, so that writes wait
    for answers to go out (answer_waiters), and a watch that keeps its request
    (held); a second client on its own connection does the same. The first
    client then goes away, the second resets its calls: every counter comes
    back to zero, and a third client is answered."""
    monkeypatch.setattr(transport, "HELD_BYTES", 2_000_000)
    monkeypatch.setattr(transport, "HELD_MESSAGES", 0)
    monkeypatch.setattr(transport, "SERVER_HELD_BYTES", 4_000_000)

    async def writer(_request: bytes, call: transport.Call) -> None:
        for _ in range(5):
            await call.write(b"a" * 900_000)

    async def unary(request: bytes, _call: transport.Call) -> bytes:
        return b"ok" + request

    methods = {
        "/t/Write": transport.Method(False, True, bytes, writer),
        "/t/Watch": transport.Method(False, True, bytes, watch_forever),
        "/t/Unary": transport.Method(False, False, bytes, unary),
    }
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(nursery, methods)
        clients = [
            H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port), {WINDOW: 0}, 64 * MiB)
            for _ in range(2)
        ]
        for client in clients:
            for stream_id in (1, 3, 5):
                client.start(stream_id, "/t/Write")
                await client.send(stream_id, prefixed(b""), end=True)
            client.start(7, "/t/Watch")
            await client.send(7, prefixed(b"w" * 300_000), end=True)
            await client.read_until(lambda: False, 0.2)
        assert server.answer_waiters >= 2 and server.held > 600_000, (
            server.answer_waiters,
            server.held,
        )
        assert server.queued_answers > 0
        await clients[0].stream.aclose()
        for stream_id in (1, 3, 5, 7):
            clients[1].h2.reset_stream(stream_id)
        await clients[1].flush()
        await _settled(server)
        third = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        third.start(1, "/t/Unary")
        await third.send(1, prefixed(b"!"), end=True)
        assert await third.read_until(lambda: third.status(1))
        assert (third.status(1), _message(third, 1)) == (b"0", b"ok!")
        nursery.cancel_scope.cancel()


# -- faults found in db0322c ----------------------------------------------------------------


async def test_a_client_that_holds_nothing_is_served_while_others_hold_the_server_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """529030d bounds the request bytes every connection holds together
    (SERVER_HELD_BYTES, 1 GiB; 2.5 MB here, 2 MB a connection) and refuses any
    call past it, however small, on any connection. Watches keep their requests
    for their whole life (and a gzip request is held inflated: 4 KB on the wire
    hold 4 MiB), so one client that opens watches on a few connections (22 of
    the 64 an address may open, with 12 gzip WatchJobs of 4 KB each: ~1 MB sent,
    see tests/e2e/test_grpc_abuse6.py) holds the server's bound for as long as
    it likes, and from then on every other client's every call (an empty
    GetServerInfo on a fresh connection) is refused RESOURCE_EXHAUSTED "too many
    request bytes held by the server". A memory bound became a lockout of every
    client. A call on a connection that holds nothing (or a small request, one
    flow control bounds) should be let through, as `keep` lets a call that keeps
    nothing go on and `unread_answers` one answer a connection; or the bound
    should be per address."""
    small_bounds(monkeypatch, 2_000_000, 2_500_000)

    async def unary(_request: bytes, _call: transport.Call) -> bytes:
        return b"info"

    methods = {
        "/t/Watch": transport.Method(False, True, bytes, watch_forever),
        "/t/Info": transport.Method(False, False, bytes, unary),
    }
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(nursery, methods)
        hostile = [
            H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port), connection_window=64 * MiB)
            for _ in range(2)
        ]
        for stream_id in (1, 3):
            hostile[0].start(stream_id, "/t/Watch")
            await hostile[0].send(stream_id, prefixed(b"w" * 999_800), end=True)
        hostile[1].start(1, "/t/Watch")
        await hostile[1].send(1, prefixed(b"w" * 500_000), end=True)
        with trio.fail_after(5):
            while server.held < 2_499_000:  # noqa: ASYNC110 - the readers take the requests
                await trio.sleep(0.01)
        assert [c.status(s) for c, s in ((hostile[0], 1), (hostile[0], 3), (hostile[1], 1))] == [
            None
        ] * 3  # all three watches run

        innocent = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        innocent.start(1, "/t/Info")
        await innocent.send(1, prefixed(b""), end=True)
        assert await innocent.read_until(lambda: innocent.status(1))
        details = _details(innocent, 1)
        assert innocent.status(1) == b"0", f"an empty call on a fresh connection: {details!r}"
        nursery.cancel_scope.cancel()


async def test_stream_set_jobs_too_many_failures_and_a_closed_actor_end_cleanly() -> None:
    """StreamSetJobs whose failures list may take ~150 bytes (max_message_bytes
    1,174): a stream of ten batches of two failing jobs ends RESOURCE_EXHAUSTED
    "too many failed jobs", its counts in stream order, the rest not handed to
    the actor. Then the actor's channel closes (shutdown) while a stream is in
    flight: the stream ends UNAVAILABLE. Nothing stays counted either way."""
    send, receive = trio.open_memory_channel[Request](100)
    servicer = grpc_server.SchedulerServicer(send, 1024 + 150)
    applied: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fake_actor, receive, 0.01, applied)
        server, grpc_port = await serve_in_process(nursery, servicer.methods())
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        client.start(1, STREAM_SET_JOBS)
        for k in range(10):
            await client.send(1, _batch(f"bad.{k}.a", f"bad.{k}.b"))
        await client.send(1, b"", end=True)
        assert await client.read_until(lambda: client.status(1))
        details = _details(client, 1)
        assert client.status(1) == b"8" and b"too many failed jobs" in details, details
        assert len(applied) < 20, applied
        assert applied == [f"bad.{k}.{s}" for k in range(len(applied) // 2) for s in "ab"]
        await _settled(server)

        client.start(3, STREAM_SET_JOBS)
        await client.send(3, _batch("s0"))
        await client.read_until(lambda: False, 0.05)
        await send.aclose()
        await client.send(3, _batch("s1"))
        await client.send(3, _batch("s2"), end=True)
        assert await client.read_until(lambda: client.status(3))
        assert client.status(3) == b"14"
        await _settled(server)
        nursery.cancel_scope.cancel()
