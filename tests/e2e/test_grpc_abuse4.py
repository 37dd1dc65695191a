# ruff: noqa: F811 - pytest fixtures imported from test_grpc_abuse are used by name
"""The gRPC server against hostile or heavy clients: a fourth review, of 03c2cb1.

It looks at what the last commits changed: compressed requests passed on
compressed and inflated when their call takes them, the connection limits
([grpc] max_connections, max_connections_per_address), the rate limit on the
client's SETTINGS frames. A real `kairoi-trio serve` process (support.server),
real grpcio clients and a raw h2 client (RawClient, from test_grpc_abuse.py);
one test runs an in-process transport.GrpcServer to count frames. The first
part holds at 03c2cb1 and guards likely regressions; each test of "faults found
in 03c2cb1" failed on it, and its docstring says what went wrong and why. They
were fixed together: requests count against the connection's held bytes while
their calls keep them, inflated; the pending-output bound holds before the
client's SETTINGS; the held bytes grow with max_message_bytes. The sans-io side
is tests/unit/test_grpc_wire4.py.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import hyperframe.frame as frames
import pytest
import trio
from e2e.test_grpc_abuse import (  # noqa: F401 - the fixtures are used by name
    RawClient,
    _server_backlog,
    _this_checkout,
    _unsent,
    assert_no_failure,
    fresh,
    message,
    port,
    rss_mib,
)
from support.certificates import self_signed
from support.server import ServerProcess

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.protocols.grpc import transport, wire

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.xdist_group("grpc-abuse"),  # memory and time are measured: one worker
]


def _job(job_id: str, payload: bytes = b"") -> pb.SetJobRequest:
    return pb.SetJobRequest(id=job_id, execute_at={"seconds": 4_000_000_000}, payload=payload)


def _gzip_batch(prefix: str, count: int = 3, payload: bytes = b"") -> bytes:
    request = pb.SetJobsRequest(jobs=[_job(f"{prefix}.{j}", payload) for j in range(count)])
    return message(gzip.compress(request.SerializeToString()), compressed=True)


def _gauge(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def _wait_gauge(server: ServerProcess, name: str, value: float, wait_s: float = 5) -> float:
    deadline = time.monotonic() + wait_s
    while (found := _gauge(server, name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- what held at 03c2cb1 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("corrupt", "13"), ("too-large-inflated", "8"), ("empty-compressed", "13")],
)
def test_a_bad_compressed_message_mid_stream_ends_the_call_cleanly(fresh, name, expected) -> None:
    """A gzip StreamSetJobs whose third message is corrupt (INTERNAL), inflates past
    max_message_bytes (RESOURCE_EXHAUSTED) or is an empty body with the compressed
    flag (INTERNAL): since 03c2cb1 the error comes from wire.inflate in the
    handler's iteration (Call.messages), not from wire.py. The call ends with
    that status, once; the two batches before it are set; no ERROR is logged
    (no "grpc handler failed" traceback); the connection goes on."""
    server = fresh()
    bad = {
        "corrupt": message(gzip.compress(b"\x0a\x03abc" * 100)[:-8], compressed=True),
        "too-large-inflated": _gzip_batch("a4.big", 5, b"\0" * 1_000_000),
        "empty-compressed": message(b"", compressed=True),
    }[name]
    body = _gzip_batch(f"a4.{name}.0") + _gzip_batch(f"a4.{name}.1") + bad + _gzip_batch("a4.x")
    client = RawClient(port(server))
    try:
        client.start(1, "StreamSetJobs", extra=[("grpc-encoding", "gzip")])
        client.send(1, body, end=True)
        assert client.read(lambda: client.status(1), timeout=10)
        assert client.outcome(1)[0] == expected, client.outcome(1)
        assert client.call(3, message(b"")) == ("0", "")  # the connection goes on
    finally:
        client.close()
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        assert stub.GetJob(pb.GetJobRequest(id=f"a4.{name}.1.2"), timeout=10).job.id
        missing = _code(lambda: stub.GetJob(pb.GetJobRequest(id="a4.x.0"), timeout=10))
        assert missing is grpc.StatusCode.NOT_FOUND  # nothing after the bad message
    assert_no_failure(server)


def test_grpcio_uploads_and_downloads_are_not_cut_off_by_the_settings_limit() -> None:
    """grpc-core sizes its windows by BDP probing and tells the server with SETTINGS
    frames (INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE); wire._H2Connection ends a
    connection past SETTINGS_BURST at once or SETTINGS_PER_S on average. Eight
    threads on one grpcio channel mix 1 MiB downloads, multi-MiB uploads,
    unary calls of up to 3 MB and pauses for a few seconds: no call fails, and
    grpcio 1.85 sends a handful of SETTINGS in all (3 in a 25 s run), far under
    the limit."""
    seen: list[float] = []
    original = wire._H2Connection._receive_settings_frame  # noqa: SLF001

    def counting(self, frame):  # type: ignore[no-untyped-def]
        if "ACK" not in frame.flags:
            seen.append(time.monotonic())
        return original(self, frame)

    async def down(request: bytes, call: transport.Call) -> None:
        for _ in range(int(request)):
            await call.write(b"d" * MiB)

    async def up(call: transport.Call, _: transport.Call) -> bytes:
        return str(sum([len(m) async for m in call.messages()])).encode()

    async def unary(request: bytes, _: transport.Call) -> bytes:
        return b"x" * int(request)

    failures: list[str] = []

    def worker(channel: grpc.Channel, seed: int, until: float) -> None:
        download = channel.unary_stream("/t/Down")
        upload = channel.stream_unary("/t/Up")
        echo = channel.unary_unary("/t/Unary")
        k = seed
        try:
            while time.monotonic() < until:
                k += 1
                if k % 4 == 0:
                    for _ in download(b"%d" % (k % 9 + 1), timeout=30):
                        pass
                elif k % 4 == 1:
                    upload(iter([b"u" * (k % 7 * 400_000 + 10)] * (k % 5 + 1)), timeout=30)
                elif k % 4 == 2:
                    echo(b"%d" % (k * 7919 % 3_000_000), timeout=30)
                else:
                    time.sleep(0.05 * (k % 5))
        except grpc.RpcError as error:
            failures.append(f"{error.code().name}: {error.details()}")

    def client(grpc_port: int) -> None:
        options = [("grpc.max_receive_message_length", 8 * MiB)]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
            until = time.monotonic() + 4
            threads = [
                threading.Thread(target=worker, args=(channel, seed, until)) for seed in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = transport.GrpcServer(
                {
                    "/t/Down": transport.Method(False, True, lambda data: data, down),
                    "/t/Up": transport.Method(True, False, lambda data: data, up),
                    "/t/Unary": transport.Method(False, False, lambda data: data, unary),
                },
                max_message_bytes=8 * MiB,
            )
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, listeners)
            await trio.to_thread.run_sync(client, listeners[0].socket.getsockname()[1])
            nursery.cancel_scope.cancel()

    mp = pytest.MonkeyPatch()
    mp.setattr(wire._H2Connection, "_receive_settings_frame", counting)  # noqa: SLF001
    try:
        trio.run(main)
    finally:
        mp.undo()
    assert not failures, failures
    assert 1 <= len(seen) < wire.SETTINGS_BURST // 4, len(seen)


def test_connection_limits_with_grpcio_refuse_at_once_and_count_back_to_zero(fresh) -> None:
    """max_connections_per_address = 1: a second grpcio channel fails at once
    UNAVAILABLE (the GOAWAY in place of SETTINGS), not at its deadline; with
    wait_for_ready it waits and gets in once the first channel closes; the
    kairoi_grpc_connections gauge is back to 0 once all are closed."""
    server = fresh("[grpc]\nmax_connections_per_address = 1")
    target = f"127.0.0.1:{port(server)}"
    request = pb.GetServerInfoRequest()
    first = grpc.insecure_channel(target, options=[("test.channel", 1)])
    pb_grpc.SchedulerStub(first).GetServerInfo(request, timeout=5)
    with grpc.insecure_channel(target, options=[("test.channel", 2)]) as second:
        stub = pb_grpc.SchedulerStub(second)
        start = time.monotonic()
        assert _code(lambda: stub.GetServerInfo(request, timeout=5)) is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 2
        threading.Timer(0.5, first.close).start()
        assert stub.GetServerInfo(request, timeout=15, wait_for_ready=True).version
    assert _wait_gauge(server, "kairoi_grpc_connections", 0) == 0
    assert_no_failure(server)


def test_connection_limits_under_tls_refuse_at_once_and_count_back_to_zero(
    fresh, tmp_path: Path
) -> None:
    """Under TLS a refused connection is closed before its handshake (a GOAWAY in
    clear would be garbage to the client): grpcio fails the call at once
    UNAVAILABLE, and the count goes back to 0 (handshakes failed or refused)."""
    cert, key = self_signed(tmp_path)
    server = fresh(
        f'[grpc]\ntls_cert = "{cert}"\ntls_key = "{key}"\nmax_connections_per_address = 1'
    )
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    target = f"localhost:{port(server)}"
    request = pb.GetServerInfoRequest()
    with grpc.secure_channel(target, credentials, options=[("test.channel", 1)]) as first:
        pb_grpc.SchedulerStub(first).GetServerInfo(request, timeout=5)
        for k in range(3):
            with grpc.secure_channel(target, credentials, options=[("test.k", k)]) as other:
                start = time.monotonic()
                code = _code(lambda: pb_grpc.SchedulerStub(other).GetServerInfo(request, timeout=5))  # noqa: B023
                assert code is grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - start < 2
        with pytest.raises(ssl.SSLError):  # a client that rejects the certificate
            with socket.create_connection(("127.0.0.1", port(server))) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    assert _wait_gauge(server, "kairoi_grpc_connections", 0) == 0
    assert_no_failure(server)


# -- faults found in 03c2cb1 --------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
def test_watch_requests_cannot_make_the_server_hold_gigabytes(fresh, compressed) -> None:
    """A client opens 40 WatchJobs on one connection, each request a 4 MiB
    WatchJobsRequest (a short prefix and 4 MiB in an unknown field, which protobuf
    keeps), gzip-compressed to 4 KB or not. At 03c2cb1 the server grew by ~160
    MiB for 170 KB sent (a connection may open 1,024 calls, an address 64
    connections): a unary request was inflated once it ended and handed to its
    handler, where nothing counted it, and WatchJobs keeps its request for the
    watch's whole life (plain, the client paid for each byte, but 1,024 calls a
    connection made 4 GiB). A compressed request now stays counted against the
    connection's held bytes (48 MiB), inflated, until its call ends, and so does
    the request of a call that answers with a stream: the calls past them are
    refused RESOURCE_EXHAUSTED, and those before them run."""
    server = fresh()
    payload = b"z" * (4 * MiB - 200)
    field_1000 = b"\xc2\x3e"  # field 1000, length-delimited
    length = len(payload)
    varint = bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    body = pb.WatchJobsRequest(prefix="a4.amp.").SerializeToString() + field_1000
    body += bytes(varint) + payload
    assert len(body) <= 4 * MiB
    sent = message(gzip.compress(body), compressed=True) if compressed else message(body)
    extra = [("grpc-encoding", "gzip")] if compressed else []
    before = rss_mib(server)
    client = RawClient(port(server))
    try:
        for k in range(40):
            client.start(2 * k + 1, "WatchJobs", extra=extra)
            client.send(2 * k + 1, sent, end=True)
        client.read(lambda: False, timeout=2)
        statuses = [client.status(2 * k + 1) for k in range(40)]
        grown = rss_mib(server) - before
    finally:
        client.close()
    running = statuses.count(None)
    assert 8 <= running <= 12, statuses  # 48 MiB of 4 MiB requests
    refused = {status[0] for status in statuses if status is not None}
    assert refused == {"8"}, statuses
    assert statuses[:running] == [None] * running  # the first ones run
    assert grown < 80, f"the server grew by {grown:.0f} MiB for {40 * len(sent)} bytes sent"


def test_a_client_that_never_sends_settings_nor_reads_is_not_read_either(fresh) -> None:
    """The preface, then PINGs (h2 takes PING before the client's SETTINGS) and no
    reads. At 03c2cb1, during the preface phase (up to PREFACE_TIMEOUT_S, 20 s)
    the reader looped on _Connection._receive until the client's SETTINGS
    without the MAX_PENDING_OUTPUT check the main loop has: h2 queues a 17-byte
    ACK for each 17-byte PING, so the server kept reading and buffered all the
    client sent, 1:1, for 20 s (~35 MB here), on each connection. The server
    stops reading such a connection, as it does once SETTINGS came
    (test_a_client_that_never_reads_cannot_make_the_server_buffer_without_bound)."""
    server = fresh()
    ping = frames.PingFrame(0, opaque_data=b"12345678").serialize() * 3855  # 64 KiB
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port(server)))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # and no SETTINGS
    sent = 0
    consumed: list[tuple[float, int]] = []  # (time, bytes the server took from the socket)
    start = time.monotonic()
    try:
        sock.settimeout(0.2)
        while time.monotonic() < start + 8:
            try:
                sent += sock.send(ping)
            except TimeoutError:
                pass
            except OSError:
                return  # the server closed the connection: bounded
            taken = sent - _unsent(sock) - _server_backlog(port(server), sock.getsockname()[1])
            consumed.append((time.monotonic(), taken))
            recent = [c for t, c in consumed if t > time.monotonic() - 2]
            if time.monotonic() > start + 3 and recent[0] == recent[-1]:
                return  # the server has read nothing for 2 s: it stopped reading
    finally:
        sock.close()
    pytest.fail(
        f"the server took {consumed[-1][1] / MiB:.1f} MiB of PINGs before the client's"
        " SETTINGS, from a client that read none of its answers, and was still reading"
    )


def test_a_request_within_a_raised_max_message_bytes_is_not_refused(fresh) -> None:
    """[grpc] max_message_bytes may be raised, say to 64 MiB for SetJobs batches of
    60 jobs of 1 MB (jobs.max_payload_bytes). At 03c2cb1 such a batch, 60 MB, one
    request on a connection of its own, was refused RESOURCE_EXHAUSTED "too many
    request bytes held on this connection (over 50331648)": HELD_BYTES (48 MiB)
    capped one message below the limit the user set. The held bytes are now
    HELD_MESSAGES (12) of the largest message, 48 MiB at least."""
    server = fresh("[grpc]\nmax_message_bytes = 67108864")
    jobs = [_job(f"a4.wide.{k}", b"w" * 1_000_000) for k in range(60)]
    options = [("grpc.max_send_message_length", 64 * MiB)]
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}", options=options) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        failure = ""
        try:
            stub.SetJobs(pb.SetJobsRequest(jobs=jobs), timeout=30)
        except grpc.RpcError as error:
            failure = f"{error.code().name}: {error.details()}"
    assert not failure, failure
