# ruff: noqa: F811 - pytest fixtures imported from test_grpc_abuse are used by name
"""The gRPC server against legitimate and hostile clients: a sixth review, of db0322c.

It looks at what 6c68f87..db0322c changed: the answers a connection's client has
not read (wire.GrpcConnection.queued_answers, bounded per connection and server
wide), the server-wide held bytes and StreamSetJobs' settler. A real
`kairoi-trio serve` process and real grpcio clients. Each test under "faults
found in db0322c" fails on it; its docstring says what goes wrong and why.
The in-process side is tests/unit/test_grpc_wire6.py.
"""

from __future__ import annotations

import functools
import gzip
import sys
from typing import Any

import grpc
import h2.events
import pytest
from e2e.test_grpc_abuse import (  # noqa: F401 - the fixtures are used by name
    RawClient,
    _this_checkout,
    fresh,
    healthy,
    message,
    port,
)
from e2e.test_grpc_abuse5 import _padded

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.xdist_group("grpc-abuse"),
]


def _job(job_id: str, payload: bytes = b"") -> Any:
    job = pb.SetJobRequest(id=job_id, payload=payload)
    job.execute_at.seconds = 4_000_000_000
    return job


# -- faults found in db0322c ---------------------------------------------------------------


def test_concurrent_large_unary_answers_to_a_reading_grpcio_client_are_not_refused(
    fresh,
) -> None:
    """A grpcio client that reads everything issues 24 ListJobs at once on one
    channel (futures), each answered by a ~4 MB page. The actor answers them in
    one go, before the connection's writer ran: Call.answer then sees the
    earlier answers queued and not yet sent (wire queued_answers) and, past
    48 MiB (the held bytes), refuses the rest RESOURCE_EXHAUSTED "the client
    has not read ... bytes of answers". The client did nothing wrong: its answers
    simply had not had a chance to leave. Every call should be answered OK (a
    unary answer could wait for room, as a streaming write does, or only the
    bytes a client's windows have refused for a while be counted)."""
    server = fresh()
    with grpc.insecure_channel(
        f"127.0.0.1:{port(server)}",
        options=[("grpc.max_receive_message_length", 8 << 20)],
    ) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        jobs = [_job(f"a6.big.{k}", b"b" * 1_000_000) for k in range(4)]
        stub.SetJobs(pb.SetJobsRequest(jobs=jobs), timeout=10)
        request = pb.ListJobsRequest(prefix="a6.big.")
        futures = [stub.ListJobs.future(request, timeout=30) for _ in range(24)]
        for future in futures:
            future.exception(timeout=40)
        codes = [f.code() for f in futures]
        refused = [f.details() for f in futures if f.code() != grpc.StatusCode.OK]
    assert codes.count(grpc.StatusCode.OK) == 24, (
        f"{len(refused)} of 24 concurrent ListJobs refused: {refused[:1]}"
    )
    assert healthy(port(server))


def test_gzip_watches_on_a_few_connections_do_not_lock_every_client_out(fresh) -> None:
    """One client opens 22 connections (an address may open 64) and on each 12
    WatchJobs whose request is 4 KB of gzip inflating to 4 MiB (an unknown field
    protobuf keeps), and on one more watches of halving sizes that fill what
    the refused ones left: ~1 MB sent. A watch keeps its request, inflated, for its
    whole life, so together they hold the server's SERVER_HELD_BYTES (1 GiB,
    529030d), and from then on every call of every other client, an empty
    GetServerInfo of a grpcio client on a channel of its own, is refused
    RESOURCE_EXHAUSTED "too many request bytes held by the server", for as long as
    the watches stay open (keepalive PINGs are answered). Before 529030d the
    bound was per connection and other clients were served. A call on a
    connection that holds nothing (or a request small enough that flow control
    bounds it) should be let through, or the bound kept per address."""
    server = fresh()
    body = _padded(pb.WatchJobsRequest(prefix="a6.held.").SerializeToString(), 4 * MiB - 100)
    watch = message(gzip.compress(body), compressed=True)
    gz = [("grpc-encoding", "gzip")]
    clients: list[RawClient] = []
    try:
        for _ in range(22):
            client = RawClient(port(server))
            clients.append(client)
            for k in range(12):
                client.start(2 * k + 1, "WatchJobs", extra=gz)
                client.send(2 * k + 1, watch, end=True)
        for client in clients:

            def answered(c: RawClient = client) -> bool:
                return all(c.got(h2.events.ResponseReceived, 2 * k + 1) for k in range(12))

            client.read(answered, 10)
        # What the last refused watches left: filled, greedily, by smaller ones.
        fill = RawClient(port(server))
        clients.append(fill)
        base = pb.WatchJobsRequest(prefix="a6.held.").SerializeToString()
        sizes = [(4 * MiB - 200) >> j for j in range(23)] + [0] * 4
        for k, size in enumerate(sizes):
            body = _padded(base, size) if size > 64 else base
            fill.start(2 * k + 1, "WatchJobs", extra=gz)
            fill.send(2 * k + 1, message(gzip.compress(body), compressed=True), end=True)
            fill.read(functools.partial(fill.got, h2.events.ResponseReceived, 2 * k + 1), 10)
        with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
            try:
                pb_grpc.SchedulerStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
                refused = None
            except grpc.RpcError as error:
                refused = (error.code(), error.details())
    finally:
        for client in clients:
            client.close()
    assert refused is None, f"an innocent client's GetServerInfo: {refused}"
