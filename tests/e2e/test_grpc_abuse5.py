# ruff: noqa: F811 - pytest fixtures imported from test_grpc_abuse are used by name
"""The gRPC server against hostile or heavy clients: a fifth review, of 5e0f3e1.

It looks at what d1506e6 and 5e0f3e1 changed: the bytes a connection holds for
its calls ("held bytes", transport._Connection.hold/release, 48 MiB a
connection), counted after a call takes its request only for what flow
control does not bound (compressed requests inflated while their calls keep
them, the request of a response-streaming call for its whole life). A real
`kairoi-trio serve` process (support.server), real grpcio clients and a raw h2
client (RawClient, from test_grpc_abuse.py). Each test of "faults found in
5e0f3e1" fails on it, and its docstring says what goes wrong and why; the ones
under "what held at 5e0f3e1" pass and guard cases no earlier test covers. The
sans-io and in-process side is tests/unit/test_grpc_wire5.py.
"""

from __future__ import annotations

import base64
import gzip
import os
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import h2.events
import h2.settings
import pytest
from e2e.test_grpc_abuse import (  # noqa: F401 - the fixtures are used by name
    RawClient,
    _this_checkout,
    answer_time,
    assert_no_failure,
    fresh,
    healthy,
    message,
    port,
    rss_mib,
)
from grpc_reflection.v1alpha import reflection_pb2

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

MiB = 1 << 20
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
RESOURCE_EXHAUSTED = "8"
HELD = "too many request bytes held on this connection (over 50333184)"  # 12 x (4 MiB + 128)
WINDOW = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.xdist_group("grpc-abuse"),  # memory and time are measured: one worker
]


def _job(job_id: str, payload: bytes = b"", execute_at: int | None = 4_000_000_000) -> Any:
    job = pb.SetJobRequest(id=job_id, payload=payload)
    if execute_at is not None:
        job.execute_at.seconds = execute_at
    return job


def _padded(body: bytes, size: int) -> bytes:
    """A serialized message grown to `size` bytes with an unknown field (1000), which
    protobuf keeps when it parses it."""
    payload = b"z" * (size - len(body) - 8)
    length, varint = len(payload), bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return body + b"\xc2\x3e" + bytes(varint) + payload


def _in_threads(*targets: Callable[[], None], wait_s: float = 60) -> None:
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(wait_s)
        assert not thread.is_alive(), "a call hangs"


# -- what held at 5e0f3e1 ----------------------------------------------------------------


def test_a_call_refused_for_held_bytes_leaves_its_connection_whole(fresh) -> None:
    """16 gzip WatchJobs on one connection, each 4 KB inflating to 4 MiB: the ones past
    the 48 MiB are refused RESOURCE_EXHAUSTED, the others run. On that same
    connection a GetServerInfo is then answered; once the client resets the
    running watches, their held bytes come back in full: 10 more such watches all
    run, and the connection is never ended."""
    server = fresh()
    body = _padded(pb.WatchJobsRequest(prefix="a5.held.").SerializeToString(), 4 * MiB - 100)
    watch = message(gzip.compress(body), compressed=True)
    gz = [("grpc-encoding", "gzip")]
    client = RawClient(port(server))
    try:
        first = [2 * k + 1 for k in range(16)]
        for sid in first:
            client.start(sid, "WatchJobs", extra=gz)
            client.send(sid, watch, end=True)
        client.read(lambda: all(client.got(h2.events.ResponseReceived, s) for s in first), 5)
        running = [s for s in first if client.status(s) is None]
        refused = {client.status(s) for s in first if s not in running}
        assert 8 <= len(running) <= 12 and refused == {(RESOURCE_EXHAUSTED, HELD)}, refused
        assert client.call(101, message(b"")) == ("0", "")  # GetServerInfo, same connection
        for sid in running:
            client.h2.reset_stream(sid)
        client.flush()
        client.read(lambda: False, timeout=0.5)
        again = [201 + 2 * k for k in range(10)]
        for sid in again:
            client.start(sid, "WatchJobs", extra=gz)
            client.send(sid, watch, end=True)
        assert client.read(lambda: all(client.got(h2.events.ResponseReceived, s) for s in again))
        client.read(lambda: False, timeout=0.5)
        assert [client.status(s) for s in again] == [None] * 10
        assert not client.terminated()
    finally:
        client.close()
    assert healthy(port(server))
    assert_no_failure(server)


# -- faults found in 5e0f3e1 ---------------------------------------------------------------


def test_unary_answers_a_client_does_not_read_are_bounded(fresh) -> None:
    """A client (a read token is enough) opens 100 ListJobs calls on one connection
    with its INITIAL_WINDOW_SIZE at 0, and never opens a window: each call's
    answer is a page of four 1 MB jobs, 4 MB, queued in its stream's outbound
    (wire.GrpcConnection.send_message) for ever. The calls themselves are over
    (Call.answer, _Connection.finish), so nothing counts those bytes: neither the
    held bytes (requests only) nor MAX_PENDING_OUTPUT (h2's own buffer only),
    and the reader goes on starting calls. 2 KB of requests made the server grow
    by ~390 MiB here; 1,024 calls a connection make 4 GiB, 64 connections an
    address 256 GiB. docs/grpc.md says answers wait "bounded by the calls' own
    bounds": a unary call's only bound is the message size. The answer bytes
    queued on a connection should be counted (wire.GrpcConnection: a sum of
    `_Stream.buffered`) and, past a bound (the held bytes, say), the connection
    not read (as _drained does for MAX_PENDING_OUTPUT) or new calls refused
    RESOURCE_EXHAUSTED."""
    server = fresh()
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        jobs = [_job(f"a5.big.{k}", b"b" * 1_000_000) for k in range(4)]
        pb_grpc.SchedulerStub(channel).SetJobs(pb.SetJobsRequest(jobs=jobs), timeout=10)
    time.sleep(0.5)
    before = rss_mib(server)
    client = RawClient(port(server), {WINDOW: 0})
    request = message(pb.ListJobsRequest(prefix="a5.big.").SerializeToString())
    try:
        for k in range(100):
            client.start(2 * k + 1, "ListJobs")
            client.send(2 * k + 1, request, end=True)
        client.read(lambda: False, timeout=2)
        grown = rss_mib(server) - before
        assert healthy(port(server))
    finally:
        client.close()
    assert grown < 150, f"the server grew by {grown:.0f} MiB for 100 ListJobs it could not send"


def test_plain_reflection_requests_kept_by_idle_streams_are_bounded(fresh) -> None:
    """A client opens 60 reflection streams (no token needed) and sends on each one
    plain request of 2 MiB (list_services, and 2 MiB in an unknown field that
    protobuf keeps), reads every answer, and leaves the streams open. 5e0f3e1
    counts a plain streaming message no more once its handler took it (Call.messages
    releases it): flow control is said to bound it. But the handler keeps it
    while it waits for the next message, for ever: `data` in Call.messages, the
    decoded `request` in reflection's handler, and the answer, which echoes it
    (`original_request`). The server grew by 390-470 MiB for 120 MiB sent here
    (~7 MiB a stream), with nothing counted: 1,024 streams of 4 MiB a
    connection make 13 GiB. It is what 5e0f3e1 closed for plain WatchJobs requests (40 x 4 MiB are
    refused past 48 MiB, test_grpc_abuse4), on another response-streaming method.
    A streaming call's last plain message should stay counted while its handler
    keeps it (or Call.messages and the handler let go of it before they wait for
    the next: `del data` in Call.messages, `del request, response` in reflection's
    `info`)."""
    server = fresh()
    before = rss_mib(server)
    body = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    request = message(_padded(body, 2 * MiB))
    client = RawClient(port(server))
    try:
        for k in range(60):
            client.start(2 * k + 1, path=REFLECTION)
            client.send(2 * k + 1, request)
        client.read(lambda: False, timeout=1)
        statuses = [client.status(2 * k + 1) for k in range(60)]
        grown = rss_mib(server) - before
        assert healthy(port(server))
    finally:
        client.close()
    refused = {status for status in statuses if status is not None}
    assert refused <= {(RESOURCE_EXHAUSTED, HELD)}, refused
    # Counted, the streams past 48 MiB would be refused: ~24 x 7 MiB at most.
    assert grown < 200, f"the server grew by {grown:.0f} MiB for 120 MiB sent ({statuses})"


def test_plain_batches_kept_by_an_idle_stream_set_jobs_are_bounded(fresh) -> None:
    """A client opens 30 StreamSetJobs on one connection and sends on each three plain
    batches of one job of 1.5 MB (no execute_at: refused at the edge, so neither
    the actor nor the disk is involved), then sends nothing more and leaves the
    streams open. StreamSetJobs keeps up to STREAM_WINDOW - 1 batches in flight
    until a fourth comes or the stream ends (server.py, `in_flight`), and
    Call.messages the last message's bytes: a stream holds its three batches and
    a copy for ever, counted nowhere, since 5e0f3e1 counts plain kept messages
    no more ("bounded by flow control and their calls' windows": they were
    credited back when taken). ~135 MB sent made the server hold ~180 MiB; a
    connection's 1,024 streams can hold 16 GiB. In-flight batches should be
    settled when no next message is ready (an idle stream then holds none), or
    plain kept batches counted again (with the handler waiting for room rather
    than the call refused)."""
    server = fresh()
    before = rss_mib(server)
    batch = message(
        pb.SetJobsRequest(jobs=[_job("a5.idle", b"p" * 1_500_000, None)]).SerializeToString()
    )
    client = RawClient(port(server))
    try:
        for k in range(30):
            client.start(2 * k + 1, "StreamSetJobs")
            client.send(2 * k + 1, batch * 3)
        client.read(lambda: False, timeout=1)
        statuses = [client.status(2 * k + 1) for k in range(30)]
        grown = rss_mib(server) - before
        assert healthy(port(server))
    finally:
        client.close()
    assert grown < 100, f"the server grew by {grown:.0f} MiB for 135 MB sent ({statuses})"


def test_gzip_stream_set_jobs_at_once_on_one_channel_are_not_refused(fresh) -> None:
    """Six StreamSetJobs of six 3 MB batches (three jobs of 1 MB of base64 text) at
    once on one grpcio channel, compressed with gzip: what test_grpc_abuse3 does
    with eight plain streams, which pass. 5e0f3e1 counts the last four batches
    each stream took (Call.messages(kept=4)), inflated, until its handler ends:
    6 x 4 x 3 MB = 72 MB, past the 48 MiB, and streams are refused
    RESOURCE_EXHAUSTED "too many request bytes held on this connection" (two of
    six here). Compressed or not is the only difference: gzip takes the batches
    to 76%, so the client paid for three quarters of each byte on the wire, and
    the server holds what it holds for a plain stream, which is not counted.
    (With random bytes grpc-core sends the messages plain, since gzip does not
    shrink them, and nothing is refused.) The policy counts only "what flow
    control does not bound": a compressed message should count by what it
    inflates to beyond its wire size (max(0, inflated - wire size)), or the
    handler wait for room rather than the stream be refused."""
    server = fresh()
    payload = base64.b64encode(os.urandom(750_000))  # gzip takes it to ~76%
    outcomes: dict[int, object] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)

        def stream(s: int) -> Callable[[], None]:
            def run() -> None:
                batches = [
                    pb.SetJobsRequest(jobs=[_job(f"a5.gz.{s}.{k}.{j}", payload) for j in range(3)])
                    for k in range(6)
                ]
                try:
                    outcomes[s] = stub.StreamSetJobs(
                        iter(batches), timeout=60, compression=grpc.Compression.Gzip
                    ).accepted
                except grpc.RpcError as error:
                    outcomes[s] = f"{error.code().name}: {error.details()}"

            return run

        _in_threads(*(stream(s) for s in range(6)))
    assert outcomes == dict.fromkeys(range(6), 18), outcomes


def _reset_flood(block: bytes, first: int, count: int) -> bytes:
    """`count` calls opened (HEADERS, its block `block`) and reset at once (RST_STREAM
    CANCEL), from stream `first` on: 28 bytes a call, frames built by hand."""
    head = len(block).to_bytes(3, "big") + b"\x01\x04"  # HEADERS, END_HEADERS
    rst = b"\x00\x00\x04\x03\x00"
    cancel = b"\x00\x00\x00\x08"
    return b"".join(
        head + struct.pack(">I", sid) + block + rst + struct.pack(">I", sid) + cancel
        for sid in range(first, first + 2 * count, 2)
    )


def test_a_rapid_reset_flood_does_not_starve_the_other_clients(fresh) -> None:
    """HTTP/2 "rapid reset" (CVE-2023-44487): one connection opens StreamSetJobs calls
    and resets each at once, 28 bytes a call (the header block is 6 bytes of
    HPACK indexes). A reset call frees its slot at once, so MAX_CONCURRENT_STREAMS
    does not bound the work, and the server reads on: each 64 KiB read brings
    ~2,300 calls, each a Call, a task started and cancelled (~90 us), handled
    in one go without a checkpoint. The one Trio thread spends itself on that
    connection (~11,000 calls a second here): a grpcio client's GetServerInfo on
    a new channel, ~10 ms otherwise, took 1-2 s (a PING flood, read as fast,
    costs it ~0.2 s). grpc-core and nghttp2 bound it: streams a read may open,
    and a client resetting its calls faster than a rate gets GOAWAY
    ENHANCE_YOUR_CALM (as wire._H2Connection already does for SETTINGS floods)."""
    server = fresh()
    client = RawClient(port(server))
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/kairoi.v1.Scheduler/StreamSetJobs"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    client.h2.send_headers(1, headers)
    client.h2.reset_stream(1)
    client.flush()
    block = client.h2.encoder.encode(headers)  # now every header is in the table
    assert len(block) < 10
    stop = threading.Event()
    closed: list[BaseException] = []

    def flood() -> None:
        sid = 3
        client.sock.settimeout(2)
        while not stop.is_set():
            data = _reset_flood(block, sid, 2_000)
            sid += 4_000
            try:
                client.sock.sendall(data)
            except TimeoutError:
                continue  # the server does not read as fast: it is busy
            except OSError as error:  # the server closed the connection
                closed.append(error)
                return

    attacker = threading.Thread(target=flood)
    attacker.start()
    try:
        time.sleep(1)
        waits = [answer_time(port(server)) for _ in range(5)]
    finally:
        stop.set()
        attacker.join(10)
        client.close()
    assert closed or statistics.median(waits) < 0.5, (
        f"a grpcio client waited {[round(w, 2) for w in waits]} s for GetServerInfo during"
        " one connection's reset flood"
    )
