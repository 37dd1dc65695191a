# ruff: noqa: F811 - pytest fixtures imported from test_grpc_abuse are used by name
"""The gRPC server against hostile or heavy clients: a third review, of 67421c5.

A real `kairoi-trio serve` process (support.server), real grpcio clients and a
raw h2 client (RawClient, from tests/e2e/test_grpc_abuse.py). The first part
holds at 67421c5 and guards likely regressions; each test of "faults found in
67421c5" failed on it, and its docstring says what went wrong and why. They
were fixed in b308847 (the GOAWAY) and the commit after it (compressed
messages wait compressed; a message held counts 128 bytes more). The sans-io
side is tests/unit/test_grpc_wire3.py.
"""

from __future__ import annotations

import gzip
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import h2.events
import h2.settings
import pytest
from e2e.test_grpc_abuse import (  # noqa: F401 - the fixtures are used by name
    RawClient,
    _this_checkout,
    assert_no_failure,
    fresh,
    healthy,
    message,
    port,
    rss_mib,
)

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.xdist_group("grpc-abuse"),  # memory and time are measured: one worker
]


def _job(job_id: str, payload: bytes) -> pb.SetJobRequest:
    return pb.SetJobRequest(id=job_id, execute_at={"seconds": 4_000_000_000}, payload=payload)


def _in_threads(*targets: Callable[[], None]) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a call hangs"


# -- what held at 67421c5 ----------------------------------------------------------------


def test_large_unary_and_streaming_requests_share_one_channel(fresh) -> None:
    """Eight StreamSetJobs of four 3 MB batches and eight SetJobs of 3 MB at once,
    on one grpcio channel (one connection): past the 32 MiB a connection admits,
    the messages wait their turn; every call ends OK, none stalls."""
    server = fresh()
    payload = os.urandom(1_000_000)  # incompressible, uncompressed anyway
    outcomes: dict[str, object] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)

        def stream(s: int) -> Callable[[], None]:
            def run() -> None:
                batches = [
                    pb.SetJobsRequest(jobs=[_job(f"a3.s.{s}.{k}.{j}", payload) for j in range(3)])
                    for k in range(4)
                ]
                try:
                    outcomes[f"stream {s}"] = stub.StreamSetJobs(iter(batches), timeout=60).accepted
                except grpc.RpcError as error:
                    outcomes[f"stream {s}"] = error.code().name

            return run

        def unary(s: int) -> Callable[[], None]:
            def run() -> None:
                request = pb.SetJobsRequest(jobs=[_job(f"a3.u.{s}.{j}", payload) for j in range(3)])
                try:
                    outcomes[f"unary {s}"] = len(stub.SetJobs(request, timeout=60).results)
                except grpc.RpcError as error:
                    outcomes[f"unary {s}"] = error.code().name

            return run

        _in_threads(*(stream(s) for s in range(8)), *(unary(s) for s in range(8)))
    assert outcomes == {
        **{f"stream {s}": 12 for s in range(8)},
        **{f"unary {s}": 3 for s in range(8)},
    }


# -- faults found in 67421c5 -------------------------------------------------------------


def test_a_client_goaway_in_the_write_that_carries_its_data_is_no_failure(fresh) -> None:
    """A client sends 32 KiB of a streaming call's message and its GOAWAY in one
    write (a client closing its connection while it uploads). The server's h2
    closes its connection state at the GOAWAY while it parses the read; then
    wire._data credits the stream back (_credit: h2.increment_flow_control_window)
    and h2 raises ProtocolError ("Invalid input ConnectionInputs.SEND_WINDOW_UPDATE
    in state ConnectionState.CLOSED") out of GrpcConnection.receive_data, through
    transport._Connection._receive: "grpc connection failed" with a traceback at
    ERROR, which any client can cause at will (a refusal's HEADERS before the
    GOAWAY does the same). The connection should just end, as it does for a
    GOAWAY alone (tests/unit/test_grpc_wire3.py has each path)."""
    server = fresh()
    before = len(server.lines)
    client = RawClient(port(server))
    try:
        client.start(1, path=REFLECTION)
        body = message(b"\0" * 100_000)
        client.h2.send_data(1, body[:16_384])
        client.h2.send_data(1, body[16_384:32_768])
        client.h2.close_connection()
        client.flush()  # one write: one read on the server's side
        client.read(lambda: client.closed, timeout=3)
    finally:
        client.close()
    assert healthy(port(server))
    assert_no_failure(server, since=before)


def test_gzip_batches_sent_back_to_back_are_not_refused(fresh) -> None:
    """One StreamSetJobs, compressed with gzip (as grpcio's compression=Gzip sends it):
    seventeen batches of three jobs with a 1 MB payload of zeros (3 MB a message,
    under the 4 MiB limit; 3 KB once compressed), sent back to back, as a client
    does when its network is quicker than the server. At 67421c5 the call ends
    RESOURCE_EXHAUSTED "too many request bytes held on this connection": a
    compressed message is admitted and credited by its size on the wire
    (wire._whole, _credit: the 64 KiB window holds seventeen of them), so flow
    control never holds the client back, and the messages the handler has not
    read yet, inflated (51 MB), pass transport.HELD_BYTES (48 MiB) within one
    read (transport._Connection._hold refuses the call). grpcio clients meet it
    too: four to eight gzip StreamSetJobs of such batches at once on one channel
    see some of them refused, as often as not. docs/grpc.md promises that a
    handler that reads slowly slows its clients and does not fail them; a
    legitimate client that turns compression on is failed instead. A message
    should count by its inflated size once inflated, against its stream's credit
    and the admission (wire._whole), so that compressed requests wait like the
    others and HELD_BYTES is only a backstop against hostile ones."""
    server = fresh()
    zeros = b"\0" * 1_000_000
    body = b"".join(
        message(
            gzip.compress(
                pb.SetJobsRequest(
                    jobs=[_job(f"a3.gz.{k}.{j}", zeros) for j in range(3)]
                ).SerializeToString()
            ),
            compressed=True,
        )
        for k in range(17)
    )
    assert len(body) < 60_000  # all within the stream's first window
    client = RawClient(port(server))
    try:
        client.start(1, "StreamSetJobs", extra=[("grpc-encoding", "gzip")])
        client.send(1, body, end=True)
        assert client.read(lambda: client.status(1), timeout=30)
        assert client.outcome(1) == ("0", ""), client.outcome(1)
    finally:
        client.close()


def test_tiny_messages_a_streaming_handler_has_not_read_stay_bounded(fresh) -> None:
    """A client (no token needed: reflection is open) opens 100 reflection streams,
    stops reading (INITIAL_WINDOW_SIZE 0, so each handler blocks on its first
    answer and reads no further), and fills each stream's 64 KiB window with empty
    messages (5 bytes each): 6.2 MiB sent. The server grows by ~80 MiB, 13 times
    what it was sent, and would by ~850 MiB for the 1,024 streams a connection
    may open, far past what docs/operations.md says one connection can hold
    (32 MiB of messages by their announced size, 48 MiB inflated). Each message
    waits in its call's inbox as Python objects (a tuple, a bytes object, the
    channel's slot: ~70 bytes, plus the MessageReceived on the way) while
    transport.HELD_BYTES counts its payload (0 bytes) and wire.py its 5 wire
    bytes, and the stream window bounds wire bytes only. What a message costs to
    hold should be counted, at least a fixed overhead a message (say 64 bytes)
    in _hold and in the admission, so that a client of tiny messages is held to
    its window (or refused) at the same memory as one of large ones."""
    server = fresh()
    before = rss_mib(server)
    client = RawClient(port(server), {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    empty = message(b"") * (65_535 // 5)
    sent = 0
    try:
        for k in range(100):
            client.start(2 * k + 1, path=REFLECTION)
            sent += client.send(2 * k + 1, empty, wait_s=0.5)
        client.read(lambda: False, timeout=1)  # the server takes in the last ones
        grown = rss_mib(server) - before
        assert healthy(port(server))
        assert not client.got(h2.events.ConnectionTerminated)
    finally:
        client.close()
    assert grown < 3 * sent / MiB + 16, (
        f"the server grew by {grown:.0f} MiB for {sent / MiB:.1f} MiB of messages on one connection"
    )
