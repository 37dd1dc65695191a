"""The gRPC server (Trio over h2, since 011c705) against hostile or unusual clients.

A raw HTTP/2 client (h2 on a plain socket, `RawClient`) sends what no gRPC
library would: broken framing, floods, streams past the limits, a connection
that never reads. After each abuse the server must still answer a normal
grpcio client, keep its memory bounded and log no failure. The server is a
real `kairoi-trio serve` process (support.server); memory is its RSS.

Tests that need a fresh process (memory, shutdown, logs) start their own; the
others share the module's (`shared`), and each checks that the server is still
healthy when it is done. The first part holds on 011c705; each test of the
second ("faults found in 011c705") failed on it, and its docstring says why.
The last part is a second review, of e3612a2: its "faults found" failed on it.
A few of its tests run an in-process transport.GrpcServer, where a bound must
be shortened to be tested or the call count read.
The sans-io side of some of them is in tests/unit/test_grpc_wire.py.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import json
import os
import signal
import socket
import ssl
import sys
import termios
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame as frames
import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.certificates import self_signed
from support.h2client import H2Client, serve_in_process
from support.server import ServerProcess

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.protocols.grpc import transport, wire

ROOT = Path(__file__).resolve().parents[2]
SCHEDULER = "/kairoi.v1.Scheduler"
MiB = 1 << 20
MAX_MESSAGE = 4 * MiB  # [grpc] max_message_bytes, the default

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    # One worker runs them: a few measure time or memory, and some load a CPU.
    pytest.mark.xdist_group("grpc-abuse"),
]


# -- servers ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server process imports this checkout's code: the virtualenv's editable
    install may point at another one (a relative PYTHONPATH does not reach the
    server, which runs in its own directory)."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    )


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a server of its own for the test (memory, shutdown and log checks)."""
    started: list[ServerProcess] = []

    def start(extra_config: str = "") -> ServerProcess:
        server = ServerProcess(tmp_path / f"server{len(started)}", extra_config)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    server = ServerProcess(tmp_path_factory.mktemp("abuse-shared"))
    try:
        server.start()
        yield server
    finally:
        server.kill()
        mp.undo()


@pytest.fixture
def shared(_shared: ServerProcess) -> Iterator[ServerProcess]:
    """The module's server; the test must leave it healthy, and it must log no failure."""
    before = len(_shared.lines)
    yield _shared
    assert _shared.process is not None and _shared.process.poll() is None, "the server died"
    assert healthy(port(_shared)), "the server no longer answers"
    assert_no_failure(_shared, since=before)


def port(server: ServerProcess) -> int:
    assert server.grpc_port is not None
    return server.grpc_port


def rss_mib(server: ServerProcess) -> float:
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def healthy(grpc_port: int, timeout: float = 10.0) -> bool:
    """A normal client's call is answered correctly (and in time)."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        info = pb_grpc.SchedulerStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=timeout
        )
    return bool(info.version)


def answer_time(grpc_port: int) -> float:
    """Seconds a normal client waits for an answer (a new connection, one call)."""
    start = time.monotonic()
    assert healthy(grpc_port, timeout=120)
    return time.monotonic() - start


def assert_no_failure(server: ServerProcess, since: int = 0) -> None:
    """No ERROR in the server's log since its `since`th line (a traceback is one)."""
    server.wait_quiet()
    events = [server._parse(line) for line in list(server.lines)[since:]]  # noqa: SLF001
    failures = [e for e in events if e.get("level") in ("error", "critical")]
    assert not failures, json.dumps(failures)[:3000]


# -- a raw HTTP/2 client ------------------------------------------------------------------


def message(data: bytes, compressed: bool = False) -> bytes:
    """A gRPC message: the compressed flag, a 4-byte length, the bytes."""
    return bytes([compressed]) + len(data).to_bytes(4, "big") + data


class RawClient:
    """An h2 client on a plain socket that sends what the test says, how it says it."""

    def __init__(
        self,
        grpc_port: int,
        settings: dict[int, int] | None = None,
        *,
        wait_settings: bool = True,
        receive_buffer: int | None = None,
    ) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", grpc_port))
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.h2.increment_flow_control_window(64 * MiB)
        self.flush()
        self.events: list[object] = []
        self.closed = False
        if wait_settings:
            self.read(lambda: self.got(h2.events.RemoteSettingsChanged))

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def start(
        self,
        stream_id: int,
        method: str = "GetServerInfo",
        *,
        path: str | None = None,
        extra: list[tuple[str, str]] | None = None,
        end: bool = False,
    ) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path or f"{SCHEDULER}/{method}"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self.flush()

    def send(self, stream_id: int, data: bytes, *, end: bool = False, wait_s: float = 5) -> int:
        """Send `data` as the windows allow; the bytes sent (fewer if the server stops
        granting window for `wait_s`, or ends the call)."""
        view = memoryview(data)
        sent = 0
        while sent < len(data):
            window = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if window <= 0:
                if self.status(stream_id) is not None:
                    return sent
                if not self.read(
                    lambda: (
                        self.h2.local_flow_control_window(stream_id) > 0
                        or self.status(stream_id) is not None
                    ),
                    timeout=wait_s,
                ):
                    return sent
                continue
            chunk = bytes(view[sent : sent + window])
            try:
                self.h2.send_data(
                    stream_id, chunk, end_stream=end and sent + len(chunk) == len(data)
                )
            except h2.exceptions.StreamClosedError:
                return sent  # the server ended the call
            sent += len(chunk)
            self.flush()
        if end and not data:
            self.h2.end_stream(stream_id)
            self.flush()
        return sent

    def read(self, until: Callable[[], object], timeout: float = 10.0) -> bool:
        """Take what the server sends until `until()` holds (True) or `timeout` (False)."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return bool(until())
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return bool(until())
            except OSError:
                data = b""
            if not data:
                self.closed = True
                continue
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                continue
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.events += events
            try:
                self.flush()
            except OSError:
                self.closed = True
        return True

    def got(self, kind: type, stream_id: int | None = None) -> list:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def status(self, stream_id: int) -> tuple[str, str] | None:
        """("grpc-status", "grpc-message") of the call, ("RST", code) if it was reset,
        ("HTTP", status) for a plain HTTP answer; None while it goes on."""
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers: dict[Any, Any] = dict(event.headers or [])  # str: header_encoding
                if "grpc-status" in headers:
                    return headers["grpc-status"], headers.get("grpc-message", "")
                if headers.get(":status", "200") != "200":
                    return "HTTP", headers[":status"]
            if isinstance(event, h2.events.StreamReset):
                return "RST", str(int(event.error_code))
        return None

    def outcome(self, stream_id: int) -> tuple[str, str]:
        """The call's status (see `status`), which must have come."""
        status = self.status(stream_id)
        assert status is not None, f"call {stream_id} is not over"
        return status

    def call(
        self, stream_id: int, body: bytes, method: str = "GetServerInfo", **start: Any
    ) -> tuple[str, str]:
        self.start(stream_id, method, **start)
        self.send(stream_id, body, end=True)
        assert self.read(lambda: self.status(stream_id) or self.closed), "no answer"
        return self.outcome(stream_id)

    def terminated(self) -> list[h2.events.ConnectionTerminated]:
        return self.got(h2.events.ConnectionTerminated)


def closes_after(grpc_port: int, data: bytes) -> bool:
    """Send bytes on a new connection: whether the server closes it (within 10 s)."""
    with socket.create_connection(("127.0.0.1", grpc_port), timeout=10) as sock:
        sock.sendall(data)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
    return True


GET_INFO = message(b"")


# -- abuse the server takes in its stride ------------------------------------------------------


def test_garbage_and_http1_instead_of_the_preface_close_that_connection(shared) -> None:
    for junk in (b"\x00GARBAGE\r\n" * 20, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert closes_after(port(shared), junk)


@pytest.mark.parametrize(
    ("name", "headers", "body", "expected"),
    [
        ("GET", [(":method", "GET")], GET_INFO, ("HTTP", "405")),
        ("text/plain", [("content-type", "text/plain")], GET_INFO, ("HTTP", "415")),
        ("unknown encoding", [("grpc-encoding", "br")], GET_INFO, ("12", None)),
        ("compressed, no encoding", [], message(gzip.compress(b""), True), ("13", None)),
        ("bad gzip", [("grpc-encoding", "gzip")], message(b"not gzip", True), ("13", None)),
        ("4 GiB prefix", [], b"\x00\xff\xff\xff\xff" + b"x" * 100, ("8", None)),
        ("two messages, unary", [], GET_INFO + GET_INFO, ("12", None)),
        ("no message, unary", [], b"", ("12", None)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_malformed_calls_get_an_error_status(shared, name, headers, body, expected) -> None:
    client = RawClient(port(shared))
    try:
        base = {
            ":method": "POST",
            ":scheme": "http",
            ":path": f"{SCHEDULER}/GetServerInfo",
            ":authority": "localhost",
            "content-type": "application/grpc",
            "te": "trailers",
        }
        base.update(dict(headers))
        client.h2.send_headers(1, list(base.items()))
        client.flush()
        client.send(1, body, end=True)
        assert client.read(lambda: client.status(1))
        status = client.status(1)
        assert status is not None and status[0] == expected[0], status
        if expected[1] is not None:
            assert status[1] == expected[1], status
        # the connection is still good for a normal call
        assert client.call(3, GET_INFO)[0] == "0"
    finally:
        client.close()


def test_a_message_past_the_limit_ends_the_call_not_the_connection(shared) -> None:
    client = RawClient(port(shared))
    try:
        client.start(1)
        sent = client.send(1, message(b"x" * (MAX_MESSAGE + MiB)))
        assert client.read(lambda: client.status(1))
        assert client.outcome(1)[0] == "8", client.status(1)  # RESOURCE_EXHAUSTED
        assert sent < MAX_MESSAGE + MiB  # told to stop before it sent it all
        assert client.call(3, GET_INFO)[0] == "0"
    finally:
        client.close()


def test_a_gzip_bomb_is_stopped_at_the_limit(shared) -> None:
    bomb = gzip.compress(b"\0" * (100 * MiB))  # ~100 KB
    client = RawClient(port(shared))
    try:
        status = client.call(1, message(bomb, True), extra=[("grpc-encoding", "gzip")])
        assert status[0] in ("8", "13"), status  # refused; see test_a_compressed_message_...
        assert client.call(3, GET_INFO)[0] == "0"
    finally:
        client.close()


def test_data_after_the_end_of_a_call_resets_that_call_only(shared) -> None:
    client = RawClient(port(shared))
    try:
        client.start(1, "WatchJobs")
        client.send(
            1, message(pb.WatchJobsRequest(prefix="abuse.none.").SerializeToString()), end=True
        )
        assert client.read(lambda: client.got(h2.events.ResponseReceived, 1))
        extra = frames.DataFrame(1)
        extra.data = GET_INFO
        client.sock.sendall(extra.serialize())  # past END_STREAM: h2 would not send it
        assert client.read(lambda: client.got(h2.events.StreamReset, 1))
        assert client.call(3, GET_INFO)[0] == "0"
    finally:
        client.close()


def test_calls_reset_mid_way_end_their_handlers(fresh) -> None:
    server = fresh("[shutdown]\ngrace_period_s = 20.0")
    client = RawClient(port(server))
    try:
        watch = message(pb.WatchJobsRequest(prefix="abuse.reset.").SerializeToString())
        for stream_id in range(1, 400, 2):
            client.start(stream_id, "WatchJobs")
            client.send(stream_id, watch, end=True)
        for stream_id in range(401, 800, 2):
            client.start(stream_id, "StreamSetJobs")
            client.send(stream_id, message(pb.SetJobsRequest().SerializeToString()))
        assert client.read(lambda: len(client.got(h2.events.ResponseReceived)) >= 200)
        for stream_id in range(1, 800, 2):
            client.h2.reset_stream(stream_id)
        client.flush()
        assert client.call(801, GET_INFO)[0] == "0"
    finally:
        client.close()
    # No call is left in flight: the shutdown does not wait out its 20 s grace.
    start = time.monotonic()
    assert server.stop(timeout=30) == 0
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "headers",
    [
        [("x-bad", "a\x00b")],
        [("X-Upper", "1")],
        [("x-big", "y" * 70_000)],  # past the 64 KiB h2 enforces
    ],
    ids=["NUL in a value", "uppercase name", "70 KB header"],
)
def test_invalid_headers_close_that_connection_only(shared, headers) -> None:
    client = RawClient(port(shared))
    try:
        client.h2.config.validate_outbound_headers = False
        client.h2.config.normalize_outbound_headers = False
        block = hpack.Encoder().encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"{SCHEDULER}/GetServerInfo"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                *headers,
            ]
        )
        chunks = [block[i : i + 16_000] for i in range(0, len(block), 16_000)]
        first = frames.HeadersFrame(1)
        first.data = chunks[0]
        sent: list[frames.Frame] = [first]
        for chunk in chunks[1:]:
            more = frames.ContinuationFrame(1)
            more.data = chunk
            sent.append(more)
        sent[-1].flags.add("END_HEADERS")
        client.sock.sendall(b"".join(f.serialize() for f in sent))
        assert client.read(lambda: client.terminated() or client.closed)
    finally:
        client.close()


def test_a_continuation_flood_is_cut_short(shared) -> None:
    client = RawClient(port(shared))
    try:
        start = frames.HeadersFrame(1)
        start.data = hpack.Encoder().encode([(":method", "POST")])
        flood = b"".join(
            frames.ContinuationFrame(1, data=b"\x00" * 16_000).serialize() for _ in range(40)
        )
        client.sock.sendall(start.serialize())
        try:
            for _ in range(10):  # 6.4 MB of header block that never ends
                client.sock.sendall(flood)
        except OSError:
            pass  # the server closed the connection
        assert client.read(lambda: client.terminated() or client.closed)
    finally:
        client.close()


def test_window_overflow_and_a_zero_initial_window(shared) -> None:
    client = RawClient(port(shared), {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    try:
        client.start(1)
        client.send(1, GET_INFO, end=True)
        client.read(lambda: False, timeout=0.3)
        assert client.status(1) is None  # its message waits for window
        for _ in range(30):  # a few bytes of window at a time
            client.h2.increment_flow_control_window(3, stream_id=1)
            client.flush()
            if client.read(lambda: client.status(1), timeout=0.05):
                break
        assert client.outcome(1)[0] == "0"
        overflow = frames.WindowUpdateFrame(0, window_increment=(1 << 31) - 1)
        client.sock.sendall(overflow.serialize() * 2)
        assert client.read(lambda: client.terminated() or client.closed)
    finally:
        client.close()


def test_a_client_that_closes_mid_answer(shared) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port(shared)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        jobs = [
            pb.SetJobRequest(
                id=f"abuse.mid.{i}", execute_at={"seconds": 4_000_000_000}, payload=b"p" * 900_000
            )
            for i in range(4)
        ]
        stub.SetJobs(pb.SetJobsRequest(jobs=jobs), timeout=10)
    request = message(pb.ListJobsRequest(prefix="abuse.mid.").SerializeToString())
    for _ in range(5):
        client = RawClient(port(shared))
        client.start(1, "ListJobs")
        client.send(1, request, end=True)
        assert client.read(functools.partial(client.got, h2.events.DataReceived, 1))
        client.sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client.close()  # RST, with most of the answer unsent


def test_many_concurrent_calls_and_gzip_from_a_grpc_client(shared) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port(shared)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        gz = grpc.Compression.Gzip
        job = pb.SetJobRequest(
            id="abuse.gz", execute_at={"seconds": 4_000_000_000}, payload=b"z" * 200_000
        )
        assert stub.SetJob(job, timeout=10, compression=gz).job.id == "abuse.gz"
        batches = [
            pb.SetJobsRequest(
                jobs=[
                    pb.SetJobRequest(id=f"abuse.gz.{b}.{i}", execute_at={"seconds": 1})
                    for i in range(10)
                ]
            )
            for b in range(10)
        ]
        assert stub.StreamSetJobs(iter(batches), timeout=10, compression=gz).accepted == 100
        calls = [
            stub.GetJob.future(pb.GetJobRequest(id="abuse.gz.0.0"), timeout=30) for _ in range(1000)
        ]
        assert all(call.result().job.id == "abuse.gz.0.0" for call in calls)
        big = [
            pb.SetJobRequest(
                id=f"abuse.big.{i}", execute_at={"seconds": 4_000_000_000}, payload=b"b" * 1_000_000
            )
            for i in range(4)
        ]
        stub.SetJobs(pb.SetJobsRequest(jobs=big), timeout=10)
        pages = [
            stub.ListJobs.future(pb.ListJobsRequest(prefix="abuse.big."), timeout=30)
            for _ in range(8)
        ]
        for page in pages:  # ~4 MiB answers, 8 at once, through the default windows
            assert [len(job.payload) for job in page.result().jobs] == [1_000_000] * 4
        try:
            for _ in stub.WatchJobs(pb.WatchJobsRequest(prefix="abuse.none."), timeout=0.5):
                pass
            raise AssertionError("the watch outlived its deadline")
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED


# -- faults found in 011c705 -------------------------------------------------------------------


def test_many_large_requests_at_once_do_not_deadlock(shared) -> None:
    """20 calls, each sending a message just under the 4 MiB limit, the bytes of each
    sent as the windows allow (a call after another, as HTTP/2 clients interleave
    them). 011c705: past 32 MiB of messages not yet whole on the connection, the
    server credits no bytes back (wire._credit), yet no message can be completed
    inside the window left: every call stalls for ever."""
    size = MAX_MESSAGE - 1000
    # GetServerInfo takes any message (an unknown field): each call is answered OK once read.
    request = message(pb.GetJobRequest(id="x" * (size - 20)).SerializeToString())
    client = RawClient(port(shared))
    try:
        streams = {2 * k + 1: memoryview(request) for k in range(20)}
        for stream_id in streams:
            client.start(stream_id)
        while any(len(left) for left in streams.values()):
            progress = False
            for stream_id, left in streams.items():
                window = min(client.h2.local_flow_control_window(stream_id), 16_384, len(left))
                if window > 0:
                    client.h2.send_data(
                        stream_id, bytes(left[:window]), end_stream=window == len(left)
                    )
                    streams[stream_id] = left[window:]
                    progress = True
            client.flush()
            if not progress:
                granted = client.read(
                    lambda: any(
                        len(left) and client.h2.local_flow_control_window(sid) > 0
                        for sid, left in streams.items()
                    ),
                    timeout=5,
                )
                unsent = sum(len(left) for left in streams.values())
                assert granted, f"deadlock: no window granted, {unsent} bytes still to send"
        assert client.read(lambda: all(client.status(sid) for sid in streams), timeout=30)
        assert {client.outcome(sid)[0] for sid in streams} == {"0"}
    finally:
        client.close()


def test_unary_requests_waiting_for_their_end_are_bounded(fresh) -> None:
    """40 calls each send a whole message (3.9 MiB) and never end their request. 011c705
    credits a whole message back at once and keeps it until the request ends
    (transport._Connection._unary), outside the 32 MiB the connection may hold of
    messages not yet whole: the server holds 40 x 3.9 MiB (1024 x 4 MiB a connection)."""
    server = fresh()
    before = rss_mib(server)
    request = message(pb.GetJobRequest(id="x" * (MAX_MESSAGE - 100_000)).SerializeToString())
    client = RawClient(port(server))
    try:
        for k in range(40):
            client.start(2 * k + 1, "GetJob")
            if client.send(2 * k + 1, request, wait_s=2) < len(request):
                break  # the server stopped granting window: bounded
        grown = rss_mib(server) - before
        assert grown < 100, f"the server holds {grown:.0f} MiB more for one connection"
        assert healthy(port(server))
    finally:
        client.close()


def test_compressed_requests_waiting_for_their_end_are_bounded(fresh) -> None:
    """40 calls each send a deflated message of 4 KB that inflates to 4 MiB, and do
    not end their request. 011c705 inflates each on arrival (wire._data) and counts
    it at its wire size: 160 KB sent, 160 MiB held (4 GiB with 1024 calls). They
    now wait compressed, inflated only when their call takes them."""
    server = fresh()
    before = rss_mib(server)
    bomb = message(zlib.compress(b"\0" * (MAX_MESSAGE - 100), 9), True)
    client = RawClient(port(server))
    try:
        for k in range(40):
            client.start(2 * k + 1, "SetJob", extra=[("grpc-encoding", "deflate")])
            client.send(2 * k + 1, bomb, wait_s=2)
        client.read(lambda: False, timeout=1)
        grown = rss_mib(server) - before
        assert grown < 100, f"the server holds {grown:.0f} MiB more for 160 KB received"
        assert healthy(port(server))
    finally:
        client.close()


def test_calls_that_fail_do_not_stay_in_memory(fresh) -> None:
    """GetJob of an id that does not exist, 30 times, each request 2 MiB. A failed
    command's CommandError sits in two reference cycles: the actor returns it as a
    result with its traceback (core/actor.py _apply_safely: `return error`; the
    traceback's frames hold the batch, whose reply holds the error), and
    SchedulerServicer._one raises it from its local `result` (frame -> result ->
    traceback -> frame). Either keeps the command, the request and the Call (since
    011c705 the whole connection: h2 state, the messages of its other calls) until
    a full collection, which the server's GC_THRESHOLDS make rare: RSS grows by
    every failed call (~6 MiB each here; it stays flat with both cycles broken).
    (Both cycles predate 011c705.)"""
    server = fresh()
    before = rss_mib(server)
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        for k in range(30):
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetJob(pb.GetJobRequest(id=f"{k}" + "x" * (2 * MiB)), timeout=10)
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    grown = rss_mib(server) - before
    assert grown < 64, f"{grown:.0f} MiB kept after 30 failed calls of 2 MiB"


def test_a_long_unknown_method_name_is_unimplemented(shared) -> None:
    """011c705 echoes the path in grpc-message ("Method not found: <path>"),
    percent-encoded: 3,000 'é' make a 18 KB trailer, past what grpc clients take
    (16 KiB), so the client sees RESOURCE_EXHAUSTED instead of UNIMPLEMENTED."""
    with grpc.insecure_channel(f"127.0.0.1:{port(shared)}") as channel:
        method = channel.unary_unary(f"{SCHEDULER}/" + "\u00e9" * 3000)
        with pytest.raises(grpc.RpcError) as caught:
            method(b"", timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED, caught.value.details()[:200]


def test_a_request_with_a_long_undecodable_path_does_not_stall_the_server(shared) -> None:
    """One call (20 KB of headers, unauthenticated) for a path of invalid UTF-8. 011c705
    answers "Method not found: <path>" with each byte as U+FFFD, percent-encoded
    (9 bytes: a 180 KB grpc-message), and hpack's Huffman encoder is quadratic:
    the Trio thread (the actor, every protocol) is busy for seconds (~1 min for
    32 KB of path; h2 takes header lists up to 64 KiB)."""
    block = hpack.Encoder().encode(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/" + b"\xff" * 20_000),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
        ],
        huffman=False,
    )
    request = frames.HeadersFrame(1, data=block[:16_000])
    request.flags.add("END_STREAM")
    rest = frames.ContinuationFrame(1, data=block[16_000:])
    rest.flags.add("END_HEADERS")
    client = RawClient(port(shared))
    try:
        client.sock.sendall(request.serialize() + rest.serialize())
        time.sleep(0.1)
        waited = answer_time(port(shared))
        assert waited < 1.0, f"a normal call waited {waited:.1f} s"
    finally:
        client.close()


def test_streams_past_the_limit_are_refused_not_the_connection(shared) -> None:
    """1,025 calls opened at once, before the server's SETTINGS (MAX_CONCURRENT_STREAMS
    1024) could arrive. RFC 9113 5.1.2: the stream past the limit gets RST_STREAM
    (REFUSED_STREAM or PROTOCOL_ERROR). 011c705 closes the whole connection
    (h2's TooManyStreamsError becomes a connection error in wire.receive_data),
    so the 1,024 calls within the limit are lost too."""
    client = RawClient(port(shared), wait_settings=False)
    watch = message(pb.WatchJobsRequest(prefix="abuse.limit.").SerializeToString())
    try:
        streams = [2 * k + 1 for k in range(1025)]
        for stream_id in streams:
            client.h2.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", f"{SCHEDULER}/WatchJobs"),
                    (":authority", "localhost"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            client.h2.send_data(stream_id, watch, end_stream=True)
        client.flush()
        client.read(
            lambda: (
                client.closed
                or len(client.got(h2.events.ResponseReceived))
                + len(client.got(h2.events.StreamReset))
                >= 1025
            ),
            timeout=20,
        )
        assert not [t for t in client.terminated() if t.error_code], client.terminated()
        answered = {e.stream_id for e in client.got(h2.events.ResponseReceived)}
        refused = {e.stream_id for e in client.got(h2.events.StreamReset)}
        assert len(answered) >= 1024, (len(answered), len(refused))
        assert answered | refused == set(streams)
    finally:
        client.close()


def test_failed_tls_handshakes_do_not_leak_connections(fresh, tmp_path: Path) -> None:
    """TCP connections closed before or during the TLS handshake (a TCP health check, a
    client that rejects the certificate, a scanner) must be let go. 011c705 starts the
    connection's writer and reader together (transport._Connection.run); both wait for
    trio.SSLStream's one handshake, and when it fails in the reader, the reader returns
    but the writer waits for ever for a handshake that will not end (trio's _Once never
    sets its event when the handshake raises): ~1 connection in 2 stays, with its file
    descriptor and tasks, until the server stops. Enough of them exhaust the process's
    file descriptors (the store's too)."""
    cert, key = self_signed(tmp_path)
    server = fresh(f'[grpc]\ntls_cert = "{cert}"\ntls_key = "{key}"')
    fds = Path(f"/proc/{server.pid}/fd")
    before = len(list(fds.iterdir()))
    for _ in range(20):  # a TCP health check: connect, close
        socket.create_connection(("127.0.0.1", port(server))).close()
    for _ in range(10):  # a client that does not trust the certificate
        with pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(
                socket.create_connection(("127.0.0.1", port(server))), server_hostname="localhost"
            )
    stalled = []
    for _ in range(10):  # half a ClientHello, then the client goes
        sock = socket.create_connection(("127.0.0.1", port(server)))
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        stalled.append(sock)
    time.sleep(0.3)
    for sock in stalled:
        sock.close()
    deadline = time.monotonic() + 5
    while len(list(fds.iterdir())) > before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    left = len(list(fds.iterdir())) - before
    assert left <= 3, f"{left} of 40 connections whose handshake failed are still open"
    credentials = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port(server)}", credentials) as channel:
        info = pb_grpc.SchedulerStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.version


def test_the_shutdown_lets_a_call_still_sending_its_request_finish(fresh) -> None:
    """SIGTERM while a SetJobs' request is half sent. The GOAWAY says the call will
    be processed (last stream id 1), and [shutdown] grace_period_s gives it 20 s.
    011c705 counts a unary call in flight only once its request is whole
    (transport._Connection._run): wait_idle() returns at once, the connection is
    closed, the call lost."""
    server = fresh("[shutdown]\ngrace_period_s = 20.0")
    job = pb.SetJobRequest(id="abuse.upload", execute_at={"seconds": 4_000_000_000})
    job.payload = b"p" * 100_000
    request = message(pb.SetJobsRequest(jobs=[job]).SerializeToString())  # a short answer
    client = RawClient(port(server))
    try:
        client.start(1, "SetJobs")
        client.send(1, request[:50_000])
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # The rest as raw DATA frames: h2's client state ends at the GOAWAY.
        rest = request[50_000:]
        tail = b""
        for offset in range(0, len(rest), 16_000):
            frame = frames.DataFrame(1, data=rest[offset : offset + 16_000])
            if offset + 16_000 >= len(rest):
                frame.flags.add("END_STREAM")
            tail += frame.serialize()
        try:
            client.sock.sendall(tail)
        except OSError:
            pass
        received = b""
        client.sock.settimeout(15)
        try:
            while chunk := client.sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        trailers = _grpc_statuses(received)
        assert trailers == ["0"], f"the call got {trailers or 'no answer'}"
    finally:
        client.close()


def _grpc_statuses(data: bytes) -> list[str]:
    """The grpc-status values in the HEADERS frames of raw server bytes."""
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 20
    statuses: list[str] = []
    buffer = frames.Frame
    position = 0
    block = b""
    while position + 9 <= len(data):
        frame, length = buffer.parse_frame_header(memoryview(data[position : position + 9]))
        if position + 9 + length > len(data):
            break
        frame.parse_body(memoryview(data[position + 9 : position + 9 + length]))
        position += 9 + length
        if isinstance(frame, (frames.HeadersFrame, frames.ContinuationFrame)):
            block += frame.data
            if "END_HEADERS" in frame.flags:
                for name, value in decoder.decode(block):
                    if name == "grpc-status":
                        statuses.append(str(value))
                block = b""
    return statuses


def test_a_client_goaway_while_an_answer_waits_is_no_failure(fresh) -> None:
    """The client sends WINDOW_UPDATE and GOAWAY together while an answer waits for
    window. h2 closes its state at the GOAWAY; 011c705's writer then hands the answer
    to h2 (wire._flush: send_data) and dies of h2's ProtocolError: "grpc connection
    failed" with a traceback at ERROR, which any client can cause at will."""
    server = fresh()
    before = len(server.lines)
    client = RawClient(port(server), {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    try:
        client.start(1)
        client.send(1, GET_INFO, end=True)
        assert client.read(lambda: client.got(h2.events.ResponseReceived, 1))
        update = frames.WindowUpdateFrame(1, window_increment=10)
        goaway = frames.GoAwayFrame(0, last_stream_id=0, error_code=0)
        client.sock.sendall(update.serialize() + goaway.serialize())
        client.read(lambda: client.closed, timeout=2)
    finally:
        client.close()
    assert healthy(port(server))
    assert_no_failure(server, since=before)


def _cut_between_jobs(request: pb.SetJobsRequest) -> bytes:
    """The request gzipped (stored, not deflated: the bytes come out as they go in),
    cut after its 30th job, as a connection cut short would leave it."""
    stored = gzip.compress(request.SerializeToString(), compresslevel=0, mtime=0)
    first = pb.SetJobsRequest(jobs=request.jobs[:30]).SerializeToString()
    return stored[: 10 + 5 + len(first)]  # gzip header, stored block header, 30 jobs


CORRUPTIONS: dict[str, Callable[[pb.SetJobsRequest], bytes]] = {
    "no-trailer": lambda request: gzip.compress(request.SerializeToString())[:-8],
    "trailing-junk": lambda request: gzip.compress(request.SerializeToString()) + b"junk",
    "cut-between-jobs": _cut_between_jobs,
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_gzip_is_refused(shared, name) -> None:
    """grpc-core answers INTERNAL ("Decompression failed"). 011c705 (wire._inflate)
    checks neither the end of the gzip stream (its CRC and length) nor what follows
    it: a message cut short is decoded from the bytes that did arrive (a SetJobs
    cut after 30 of its 50 jobs sets those 30 and answers OK)."""
    ids = [f"abuse.gz.{name}.{i:02d}" for i in range(50)]
    request = pb.SetJobsRequest(
        jobs=[pb.SetJobRequest(id=i, execute_at={"seconds": 4_000_000_000}) for i in ids]
    )
    body = CORRUPTIONS[name](request)
    client = RawClient(port(shared))
    try:
        status = client.call(1, message(body, True), "SetJobs", extra=[("grpc-encoding", "gzip")])
        assert status[0] == "13", status  # INTERNAL
    finally:
        client.close()
    with grpc.insecure_channel(f"127.0.0.1:{port(shared)}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.SchedulerStub(channel).GetJob(pb.GetJobRequest(id=ids[0]), timeout=10)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND  # nothing was set


def test_a_compressed_message_too_large_once_inflated_is_resource_exhausted(shared) -> None:
    """As an uncompressed one is, and as grpc-core answers ("Decompressed message
    larger than max"); 011c705 answers INTERNAL (wire._data maps _inflate's
    ValueError to INTERNAL)."""
    jobs = [
        pb.SetJobRequest(
            id=f"abuse.gz5.{k}", execute_at={"seconds": 4_000_000_000}, payload=b"\0" * 1_000_000
        )
        for k in range(5)
    ]
    with grpc.insecure_channel(f"127.0.0.1:{port(shared)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        for compression in (None, grpc.Compression.Gzip):
            with pytest.raises(grpc.RpcError) as caught:
                stub.SetJobs(pb.SetJobsRequest(jobs=jobs), timeout=10, compression=compression)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (
                compression,
                caught.value.details(),
            )


def test_a_client_that_never_reads_cannot_make_the_server_buffer_without_bound(fresh) -> None:
    """A client floods PINGs and never reads the ACKs. The server's writer blocks on the
    full socket; 011c705's reader goes on (transport._Connection._read), and h2 queues
    an ACK for each PING in its own buffer: memory grows as long as the client sends
    (~1 MB/s here, for ever). The server should stop reading such a connection, or
    close it (as grpc-core's ping policy does)."""
    server = fresh()
    client = RawClient(port(server), receive_buffer=4096)
    ping = frames.PingFrame(0, opaque_data=b"12345678").serialize() * 3855  # 64 KiB
    sock = client.sock
    sent = 0
    consumed: list[tuple[float, int]] = []  # (time, bytes the server took from the socket)
    deadline = time.monotonic() + 9
    try:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                sent += sock.send(ping)
            except TimeoutError:
                pass
            except OSError:
                return  # the server closed the connection: bounded
            taken = sent - _unsent(sock) - _server_backlog(port(server), sock.getsockname()[1])
            consumed.append((time.monotonic(), taken))
            recent = [c for t, c in consumed if t > time.monotonic() - 2]
            if (
                len(consumed) > 10
                and consumed[0][0] < time.monotonic() - 3
                and recent[0] == recent[-1]
            ):
                break  # the server has read nothing for 2 s: it stopped reading
        else:
            pytest.fail(
                f"the server took {consumed[-1][1] / MiB:.1f} MiB of PINGs from a client that"
                f" read none of its answers, and was still reading"
            )
    finally:
        client.close()
    assert consumed[-1][1] < 16 * MiB


def _unsent(sock: socket.socket) -> int:
    """Bytes in this socket's send queue (not yet acknowledged by the peer)."""
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4), "little")


def _server_backlog(server_port: int, client_port: int) -> int:
    """Bytes waiting in the server socket's receive queue (/proc/net/tcp)."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16)
    return 0


# -- the second review (of e3612a2) ----------------------------------------------------


def _watch(client: RawClient, stream_id: int) -> None:
    client.start(stream_id, "WatchJobs")
    client.send(
        stream_id, message(pb.WatchJobsRequest(prefix="abuse2.").SerializeToString()), end=True
    )
    assert client.read(lambda: client.got(h2.events.ResponseReceived, stream_id))


# -- faults found in e3612a2 ------------------------------------------------------------


def _data_then_reset(client: RawClient) -> None:
    client.start(3, "SetJobs")
    body = message(b"\0" * 200_000)
    client.h2.send_data(3, body[:16_384])
    client.h2.send_data(3, body[16_384:32_768])


def _get_then_reset(client: RawClient) -> None:
    client.h2.send_headers(
        3, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    )


def _too_large_then_reset(client: RawClient) -> None:
    client.start(3, "SetJobs")
    client.h2.send_data(3, b"\0" + (64 * MiB).to_bytes(4, "big"))


RESET_IN_THE_SAME_READ: dict[str, Callable[[RawClient], None]] = {
    "DATA past CREDIT_BYTES": _data_then_reset,
    "a GET (405)": _get_then_reset,
    "a message past the limit": _too_large_then_reset,
}


@pytest.mark.parametrize("name", list(RESET_IN_THE_SAME_READ))
def test_a_call_reset_in_the_read_that_brought_it_ends_only_that_call(shared, name) -> None:
    """The client's RST_STREAM arrives in the same read as what wire.py answers
    with an h2 call on that stream: a WINDOW_UPDATE credit (wire._credit), a
    refusal's HEADERS (wire._refuse, end_call) . h2 has closed the stream by then
    (it parses the whole read before wire.py walks its events) and raises
    StreamClosedError out of GrpcConnection.receive_data: at e3612a2 the
    connection fails ("grpc connection failed", a traceback at ERROR) and the
    other calls on it (a WatchJobs here) are lost."""
    server = shared
    before = len(server.lines)
    client = RawClient(port(server))
    try:
        _watch(client, 1)
        RESET_IN_THE_SAME_READ[name](client)
        client.h2.reset_stream(3, h2.errors.ErrorCodes.CANCEL)
        client.flush()  # one write: one read on the server's side
        assert client.call(5, GET_INFO)[0] == "0", "the connection was lost"
        assert client.status(1) is None, "the watch on the same connection ended"
    finally:
        client.close()
    assert_no_failure(server, since=before)


def test_grpcio_cancelling_large_uploads_keeps_the_channel(shared) -> None:
    """A grpcio client cancels SetJobs calls of 3 MB while they upload (a user's
    cancel, or a deadline): grpc-core writes its last DATA frames and the
    RST_STREAM together, so the server meets the fault above. At e3612a2 about one
    cancel in four kills the connection: the channel's other calls (a WatchJobs
    here) fail UNAVAILABLE and the server logs "grpc connection failed"."""
    server = shared
    before = len(server.lines)
    job = pb.SetJobRequest(
        id="abuse2.big", execute_at={"seconds": 4_000_000_000}, payload=b"p" * 1_000_000
    )
    request = pb.SetJobsRequest(jobs=[job, job, job])
    watch_end: list[str] = []
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        watch = stub.WatchJobs(pb.WatchJobsRequest(prefix="abuse2.none."), timeout=60)

        def follow() -> None:
            try:
                for _ in watch:
                    pass
                watch_end.append("OK")
            except grpc.RpcError as error:
                watch_end.append(error.code().name)

        follower = threading.Thread(target=follow)
        follower.start()
        try:
            outcomes: dict[str, int] = {}
            for k in range(60):
                future = stub.SetJobs.future(request, timeout=30)
                time.sleep(0.002 * (k % 10))
                future.cancel()
                try:
                    future.result()
                    outcome = "OK"
                except grpc.FutureCancelledError:
                    outcome = "CANCELLED"
                except grpc.RpcError as error:
                    outcome = error.code().name
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            time.sleep(0.3)
            assert not watch_end, f"the watch on the channel ended: {watch_end}"
            assert set(outcomes) <= {"OK", "CANCELLED"}, outcomes
        finally:
            watch.cancel()
            follower.join(10)
    assert_no_failure(server, since=before)


async def test_a_client_that_never_finishes_the_preface_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PREFACE_TIMEOUT_S is "to finish a TLS handshake and send the HTTP/2 preface";
    _Connection._read times only the first receive_some, so a client that sends
    one byte of the 24-byte preface (16 here) and then nothing holds its
    connection, its two tasks and its descriptor for ever (grpc-core's server
    closes a connection without the client's SETTINGS after its handshake
    timeout). The timeout is shortened to 0.5 s here; the server has 5 s."""
    monkeypatch.setattr(transport, "PREFACE_TIMEOUT_S", 0.5)
    async with trio.open_nursery() as nursery:
        _, grpc_port = await serve_in_process(nursery, {})
        stream = await trio.open_tcp_stream("127.0.0.1", grpc_port)
        await stream.send_all(b"PRI * HTTP/2.0\r\n")
        closed = False
        with trio.move_on_after(5):
            while await stream.receive_some(65536):  # the server's SETTINGS, then EOF
                pass
            closed = True
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert closed, "a connection that never sent its preface is still open"


# -- what held in e3612a2 ---------------------------------------------------------------------


async def test_unary_answers_after_a_reset_or_the_connection_end_go_nowhere() -> None:
    """A UnaryMethod answered (Call.answer, Call.fail) after its client reset it or
    after its connection closed: nothing sent, nothing raised, each call counted
    off once (wait_idle returns)."""
    calls: list[transport.Call] = []
    both_begun = trio.Event()

    def begin(_request: bytes, call: transport.Call) -> None:
        calls.append(call)
        if len(calls) == 2:
            both_begun.set()

    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(
            nursery,
            {"/t/Unary": transport.UnaryMethod(lambda data: data, begin)},
        )
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        for stream_id in (1, 3):
            client.start(stream_id, "/t/Unary")
            client.h2.send_data(stream_id, wire.PREFIX_BYTES * b"\0", end_stream=True)
        await client.flush()
        with trio.fail_after(10):
            await both_begun.wait()
        client.h2.reset_stream(1)
        await client.flush()
        await trio.testing.wait_all_tasks_blocked(0.1)  # the server has read the reset
        assert calls[0].done and server._calls == 1  # noqa: SLF001
        calls[0].answer(b"late")
        await client.stream.aclose()
        with trio.fail_after(10):
            await server.wait_idle()
        calls[1].answer(b"late")
        calls[1].fail(wire.CANCELLED, "again")
        assert server._calls == 0  # noqa: SLF001
        nursery.cancel_scope.cancel()


async def test_unread_streaming_messages_slow_their_calls_rather_than_fail_them() -> None:
    """Ten streaming calls each send two 3.9 MiB messages to a handler that reads one
    and waits: 39 MiB unread on one connection. e3612a2 refused the calls past its
    32 MiB of held requests (RESOURCE_EXHAUSTED); now the messages past the bound
    wait, their clients held to their windows, and every call ends OK once the
    handlers read on."""
    go_on = trio.Event()

    async def handler(call: transport.Call, _: transport.Call) -> bytes:
        count = 0
        async for _message in call.messages():
            count += 1
            await go_on.wait()
        return str(count).encode()

    streams = [1 + 2 * k for k in range(10)]
    body = message(b"m" * (MAX_MESSAGE - 100_000)) * 2
    async with trio.open_nursery() as nursery:
        _, grpc_port = await serve_in_process(
            nursery, {"/t/Stream": transport.Method(True, False, lambda data: data, handler)}
        )
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        for stream_id in streams:
            client.start(stream_id, "/t/Stream")
        pending = dict.fromkeys(streams, body)

        async def send_what_fits() -> int:
            sent = 0
            for stream_id, data in pending.items():
                while data:
                    size = min(
                        client.h2.local_flow_control_window(stream_id),
                        client.h2.max_outbound_frame_size,
                        len(data),
                    )
                    if size <= 0:
                        break
                    client.h2.send_data(stream_id, data[:size])
                    data = data[size:]
                    sent += size
                pending[stream_id] = data
            await client.flush()
            with trio.move_on_after(0.2):
                await client.read_some()  # window updates
            return sent

        with trio.fail_after(60):
            while await send_what_fits() or await send_what_fits():
                pass
        left = sum(map(len, pending.values()))
        assert left > 0, "the server took 39 MiB of unread messages"
        assert not any(client.statuses(s) for s in streams), "a call was refused"
        go_on.set()
        with trio.fail_after(60):
            while any(pending.values()):
                await send_what_fits()
        for stream_id in streams:
            client.h2.end_stream(stream_id)
        await client.flush()
        assert await client.read_until(lambda: all(client.statuses(s) for s in streams), 30)
        assert {status for s in streams for status in client.statuses(s)} == {b"0"}
        nursery.cancel_scope.cancel()


async def test_a_streaming_call_refused_for_held_bytes_while_its_handler_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its handler (not reading) is stopped, the client gets one status
    (RESOURCE_EXHAUSTED) and the call is counted off."""
    monkeypatch.setattr(transport, "HELD_BYTES", 30_000)
    monkeypatch.setattr(transport, "HELD_MESSAGES", 0)
    started, stopped = trio.Event(), trio.Event()

    async def handler(call: transport.Call, _: transport.Call) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(
            nursery, {"/t/Stream": transport.Method(True, False, lambda data: data, handler)}
        )
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        client.start(1, "/t/Stream")
        await client.flush()
        with trio.fail_after(10):
            await started.wait()
        for _ in range(5):
            client.h2.send_data(1, b"\0" + (10_000).to_bytes(4, "big") + b"x" * 10_000)
        await client.flush()
        assert await client.read_until(lambda: client.statuses(1))
        with trio.fail_after(10):
            await stopped.wait()
            await server.wait_idle()
        assert client.statuses(1) == [b"8"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("keep", [False, True])
async def test_what_a_streaming_handler_keeps_stays_counted(
    monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    """`Call.messages(keep=True)`: the messages a handler keeps stay counted, inflated,
    against the connection's held bytes (3.5 MB here) until it lets go of them
    (`Call.let_go`), and past those it waits for room: slowed, not refused. Ten
    gzip messages of 1 KB that inflate to 1 MiB each: a handler that keeps them
    (as StreamSetJobs keeps its batches in flight) takes three, then waits; as
    it lets go of them it takes the rest and ends OK. One that does not keep
    takes all ten at once. Before, what a handler took was counted no more:
    compressed, a few KB held gigabytes."""
    monkeypatch.setattr(transport, "HELD_BYTES", 3_500_000)
    monkeypatch.setattr(transport, "HELD_MESSAGES", 0)
    taken: list[int] = []
    calls: list[transport.Call] = []

    async def handler(call: transport.Call, _: transport.Call) -> bytes:
        calls.append(call)
        async for request in call.messages(keep=keep):
            taken.append(len(request))
        return b""

    body = gzip.compress(bytes(MiB))
    async with trio.open_nursery() as nursery:
        server, grpc_port = await serve_in_process(
            nursery, {"/t/Stream": transport.Method(True, False, lambda data: data, handler)}
        )
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        client.start(1, "/t/Stream", encoding="gzip")
        for _ in range(10):
            client.h2.send_data(1, b"\1" + len(body).to_bytes(4, "big") + body)
        client.h2.end_stream(1)
        await client.flush()
        if keep:
            await client.read_until(lambda: client.statuses(1), 0.5)
            assert (client.statuses(1), taken) == ([], [MiB] * 3)
            with trio.fail_after(10):
                while not client.statuses(1):
                    calls[0].let_go()
                    await client.read_until(lambda: client.statuses(1), 0.05)
        assert await client.read_until(lambda: client.statuses(1))
        with trio.fail_after(10):
            await server.wait_idle()
        assert (client.statuses(1), taken) == ([b"0"], [MiB] * 10)
        nursery.cancel_scope.cancel()


def test_sigterm_with_calls_in_flight_answers_each_and_exits_in_the_grace(fresh) -> None:
    """SIGTERM ([shutdown] grace_period_s = 2) with, on one channel, a WatchJobs with
    its snapshot, a health Watch, a StreamSetJobs still sending and a loop of
    SetJob: the watch ends UNAVAILABLE, the health watch says NOT_SERVING and ends
    OK, the stream and the SetJobs get OK or UNAVAILABLE, nothing hangs, and the
    process exits within the grace period (and a margin)."""
    server = fresh()
    outcomes: dict[str, object] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def watch() -> None:
            try:
                for _ in stub.WatchJobs(pb.WatchJobsRequest(include_snapshot=True), timeout=30):
                    pass
                outcomes["watch"] = "OK"
            except grpc.RpcError as error:
                outcomes["watch"] = error.code().name

        def health_watch() -> None:
            seen: list[int] = []
            try:
                for answer in health.Watch(health_pb2.HealthCheckRequest(), timeout=30):
                    seen.append(answer.status)
                outcomes["health"] = ("OK", seen[-1])
            except grpc.RpcError as error:
                outcomes["health"] = (error.code().name, seen)

        def stream() -> None:
            def batches() -> Iterator[pb.SetJobsRequest]:
                for k in range(100):
                    job = pb.SetJobRequest(
                        id=f"abuse2.s.{k}", execute_at={"seconds": 4_000_000_000}
                    )
                    yield pb.SetJobsRequest(jobs=[job])
                    time.sleep(0.1)

            try:
                stub.StreamSetJobs(batches(), timeout=30)
                outcomes["stream"] = "OK"
            except grpc.RpcError as error:
                outcomes["stream"] = error.code().name

        def unary() -> None:
            seen: set[str] = set()
            end = time.monotonic() + 6
            while time.monotonic() < end:
                try:
                    stub.SetJob(
                        pb.SetJobRequest(id="abuse2.u", execute_at={"seconds": 4_000_000_000}),
                        timeout=10,
                    )
                    seen.add("OK")
                except grpc.RpcError as error:
                    seen.add(error.code().name)
                    time.sleep(0.01)
            outcomes["unary"] = seen

        threads = [threading.Thread(target=f) for f in (watch, health_watch, stream, unary)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        took = time.monotonic() - start
        for thread in threads:
            thread.join(20)
            assert not thread.is_alive(), "a call hangs"
    assert took < 2.0 + 3.0, took
    assert outcomes["watch"] == "UNAVAILABLE", outcomes
    assert outcomes["health"] == ("OK", health_pb2.HealthCheckResponse.NOT_SERVING), outcomes
    assert outcomes["stream"] in ("OK", "UNAVAILABLE"), outcomes
    unary_codes = outcomes["unary"]
    assert isinstance(unary_codes, set) and unary_codes <= {"OK", "UNAVAILABLE"}, outcomes


# -- idle connections and vanished clients ------------------------------------------------


class _Forever:
    """A streaming method whose handlers run until they are cancelled, counted."""

    def __init__(self) -> None:
        self.started = self.stopped = 0
        self._changed = trio.Event()

    def method(self) -> transport.Method:
        async def handler(call: transport.Call, _: transport.Call) -> None:
            self.started += 1
            self._note()
            try:
                await trio.sleep_forever()
            finally:
                self.stopped += 1
                self._note()

        return transport.Method(True, False, lambda data: data, handler)

    def _note(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def until(self, started: int, stopped: int) -> None:
        with trio.fail_after(5):
            while (self.started, self.stopped) != (started, stopped):
                await self._changed.wait()


async def _closed_by_server(client: H2Client, wait_s: float) -> bool:
    """Whether the server closes the connection within `wait_s` (the client reads
    and answers PINGs meanwhile)."""
    with trio.move_on_after(wait_s):
        try:
            while await client.read_some():
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_a_vanished_client_is_found_by_keepalive_and_its_calls_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that stops answering (a host gone without a FIN: here, one that no
    longer reads) is PINGed after keepalive_s of silence and closed when nothing
    answers within KEEPALIVE_TIMEOUT_S; its call's handler is stopped. A client
    that answers PINGs (h2 does it as it reads) keeps its connection and call,
    silent as they are."""
    monkeypatch.setattr(transport, "KEEPALIVE_TIMEOUT_S", 0.3)
    calls = _Forever()
    async with trio.open_nursery() as nursery:
        _, grpc_port = await serve_in_process(
            nursery, {"/t/Stream": calls.method()}, keepalive_s=0.3
        )
        alive = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        alive.start(1, "/t/Stream")
        await alive.flush()
        await calls.until(started=1, stopped=0)
        assert not await _closed_by_server(alive, 2.0)  # ~6 keepalive periods, answered
        assert any(isinstance(e, h2.events.PingReceived) for e in alive.events)
        assert calls.stopped == 0
        gone = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        gone.start(1, "/t/Stream")
        await gone.flush()
        await gone.read_some()  # the server's SETTINGS, then never a read again
        await calls.until(started=2, stopped=1)  # closed: its call's handler stopped
        nursery.cancel_scope.cancel()


async def test_an_idle_connection_is_closed_with_a_goaway() -> None:
    """A connection without a call for idle_timeout_s gets a GOAWAY and is closed;
    one with a call in flight is not, however long the call."""
    calls = _Forever()
    async with trio.open_nursery() as nursery:
        _, grpc_port = await serve_in_process(
            nursery, {"/t/Stream": calls.method()}, idle_timeout_s=0.3
        )
        busy = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        busy.start(1, "/t/Stream")
        await busy.flush()
        idle = H2Client(await trio.open_tcp_stream("127.0.0.1", grpc_port))
        await idle.flush()
        assert await _closed_by_server(idle, 5.0)
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in idle.events)
        assert not await _closed_by_server(busy, 1.0)
        assert (calls.started, calls.stopped) == (1, 0)
        nursery.cancel_scope.cancel()


def test_a_grpc_channel_outlives_the_idle_close_of_its_connection(fresh) -> None:
    """[grpc] idle_timeout_s: the server closes a connection left without a call
    (GOAWAY); the client's channel opens a new one at its next call, which the
    user does not see fail."""
    server = fresh("[grpc]\nidle_timeout_s = 0.5")
    before = len(server.lines)
    with grpc.insecure_channel(f"127.0.0.1:{port(server)}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        for _ in range(3):
            assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).version
            time.sleep(1.5)  # closed meanwhile
            state = channel._channel.check_connectivity_state(False)  # noqa: SLF001
            assert state != grpc.ChannelConnectivity.READY.value[0], state
    assert_no_failure(server, since=before)
