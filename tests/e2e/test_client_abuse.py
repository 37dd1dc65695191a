"""Clients that abuse the KCP listener, against a real server process.

Memory held for a client is bounded in bytes (pipelined GETs never read, huge
ids), slow and idle clients are closed (a message trickled byte by byte, empty
lines as keep-alive, answers never read), one address cannot take every
connection, a connection that does not authenticate in time is closed, and a
process out of file descriptors refuses with an answer and recovers.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi_trio.protocols.kcp.codec import KcpParser, Message

pytestmark = pytest.mark.backends("log", "postgres")

FUTURE = "2099-01-01 00:00:00"


# -- helpers ------------------------------------------------------------------------------


def proc_status_kib(server: ServerProcess, key: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of the server process, in KiB."""
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


def fetch(server: ServerProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}{path}", timeout=5
        ) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def kcp_connections(server: ServerProcess) -> float:
    for line in fetch(server, "/metrics")[1].splitlines():
        if line.startswith("kairoi_kcp_connections "):
            return float(line.split()[1])
    raise AssertionError("no kairoi_kcp_connections")


def answers_until_closed(sock: socket.socket, timeout: float = 15.0) -> list[tuple[str, list[str]]]:
    """Every message the server sends until it closes the connection, as (id, args)."""
    sock.settimeout(timeout)
    parser = KcpParser()
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            break
        parser.feed(data)
    events = parser.close()
    assert all(isinstance(e, Message) for e in events), events
    return [(e.id, e.args) for e in events if isinstance(e, Message)]


def flood_without_reading(port: int, chunk: bytes, limit: int, source: str = "") -> int:
    """Send `chunk` over and over without ever reading, until `limit` bytes are sent
    or the server has taken nothing for a second (it stopped reading); returns the
    bytes sent. The socket stays open (returned in FLOODS, closed by the caller)."""
    flood = socket.create_connection(("127.0.0.1", port))
    FLOODS.append(flood)
    flood.setblocking(False)
    sent = offset = 0
    stalled_since: float | None = None
    while sent < limit:
        try:
            n = flood.send(chunk[offset:] or chunk)
        except BlockingIOError:
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 1.0:
                break
            time.sleep(0.01)
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        stalled_since = None
        sent += n
        offset = (offset + n) % len(chunk)
    return sent


FLOODS: list[socket.socket] = []


def close_floods() -> None:
    while FLOODS:
        FLOODS.pop().close()


# -- memory is bounded in bytes -------------------------------------------------------------


def test_pipelined_gets_never_read_hold_bounded_memory(server: ServerProcess) -> None:
    # The issue: 2.9 MB of "GET" of a 128 KiB job, never read, took the server
    # from 62 MB to 2.16 GB (each answer was encoded as soon as its result came).
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "big", FUTURE, "x" * (128 << 10)) == ["OK"]
    before = proc_status_kib(server, "VmRSS")
    try:
        flood_without_reading(server.kcp_port, b"1 GET big\n" * 30_000, 3 << 20)
        time.sleep(2)  # VmHWM is the peak: waiting can only catch more of it
        grown_mib = (proc_status_kib(server, "VmHWM") - before) / 1024
        print(f"server grew by {grown_mib:.0f} MiB")
        assert grown_mib < 100, f"the server grew by {grown_mib:.0f} MiB"
        with KcpClient(server.kcp_port) as other:  # everyone else is served meanwhile
            assert other.request("PING") == ["OK", "PONG"]
            assert other.request("GET", "big")[:2] == ["OK", "planned"]
    finally:
        close_floods()


def test_huge_ids_pipelined_and_never_read_hold_bounded_memory(server: ServerProcess) -> None:
    # Answered by the connection itself (no actor): each answer echoes its
    # 512 KiB id. These used to pile up to max_pipelined (4096) of them: 2 GiB.
    message = b"i" * (512 << 10) + b" PING\n"
    before = proc_status_kib(server, "VmRSS")
    try:
        flood_without_reading(server.kcp_port, message, 150 << 20)
        time.sleep(2)
        grown_mib = (proc_status_kib(server, "VmHWM") - before) / 1024
        print(f"server grew by {grown_mib:.0f} MiB")
        assert grown_mib < 100, f"the server grew by {grown_mib:.0f} MiB"
    finally:
        close_floods()


def test_an_answer_larger_than_the_byte_bound_is_still_answered(make_server) -> None:
    server = make_server("[controller]\nmax_pending_bytes = 65536")
    payload = "y" * 1_000_000
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "big", FUTURE, payload) == ["OK"]
        answers = kcp.pipeline([("GET", "big")] * 5 + [("PING",)])
    assert answers == [["OK", "planned", FUTURE, payload]] * 5 + [["OK", "PONG"]]


# -- slow and idle clients ------------------------------------------------------------------


def test_a_message_trickled_byte_by_byte_times_out(make_server) -> None:
    # Each byte used to restart the idle clock: one byte a second held a
    # connection for ever. A message begun must now end within message_timeout_s.
    server = make_server("[controller]\nmessage_timeout_s = 1.0")
    with socket.create_connection(("127.0.0.1", server.kcp_port)) as sock:
        sock.sendall(b"1 SET app.slow ")
        sock.settimeout(0.1)
        received = b""
        deadline = time.monotonic() + 15
        while not received and time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
                received = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        parser = KcpParser()
        parser.feed(received)
        (answer,) = parser.events()
        assert isinstance(answer, Message)
        assert (answer.id, answer.args) == ("*", ["ERROR", "message timed out"])
        assert answers_until_closed(sock) == []  # and closed


def test_messages_that_end_in_time_keep_the_connection(make_server) -> None:
    server = make_server("[controller]\nmessage_timeout_s = 2.0")
    with KcpClient(server.kcp_port) as kcp:
        for i in range(6):  # 3 s in all, more than the limit, each message well within it
            kcp.send_raw(f"{i} PI".encode())
            time.sleep(0.25)
            kcp.send_raw(b"NG\n")
            answer = kcp.read_message()
            assert (answer.id, answer.args) == (str(i), ["OK", "PONG"])


def test_empty_lines_do_not_keep_an_idle_connection_open(make_server) -> None:
    server = make_server("[controller]\nidle_timeout_s = 1.0")
    with socket.create_connection(("127.0.0.1", server.kcp_port)) as sock:
        sock.settimeout(0.1)
        received = b""
        deadline = time.monotonic() + 15
        while not received and time.monotonic() < deadline:
            try:
                sock.sendall(b"\n")  # an empty line: no message, no answer
                received = sock.recv(65536)
            except TimeoutError:
                continue
        parser = KcpParser()
        parser.feed(received)
        (answer,) = parser.events()
        assert isinstance(answer, Message)
        assert (answer.id, answer.args) == ("*", ["ERROR", "idle timeout"])


def test_a_client_that_never_reads_its_answers_is_closed(make_server) -> None:
    server = make_server("[controller]\nidle_timeout_s = 1.0\nmax_pending_bytes = 65536")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "big", FUTURE, "x" * (128 << 10)) == ["OK"]
    wait_for(lambda: kcp_connections(server) == 0)
    try:
        # The server stops reading it (backpressure), then closes it: its answers
        # waited more than idle_timeout_s for the client to read them.
        flood_without_reading(server.kcp_port, b"1 GET big\n" * 1000, 64 << 20)
        wait_for(lambda: kcp_connections(server) == 0)
    finally:
        close_floods()


# -- connection limits ----------------------------------------------------------------------


def test_connections_are_limited_per_address(make_server) -> None:
    server = make_server("[controller]\nmax_connections_per_address = 3")
    held = [KcpClient(server.kcp_port) for _ in range(3)]
    try:
        assert all(client.request("PING") == ["OK", "PONG"] for client in held)
        with KcpClient(server.kcp_port) as fourth:
            refused = fourth.read_message()
            assert (refused.id, refused.args) == (
                "*",
                ["ERROR", "too many connections from your address"],
            )
        with KcpClient(server.kcp_port, source="127.0.0.2") as elsewhere:
            assert elsewhere.request("PING") == ["OK", "PONG"]
        held.pop().close()
        wait_for(lambda: kcp_connections(server) == 2)
        with KcpClient(server.kcp_port) as again:
            assert again.request("PING") == ["OK", "PONG"]
        assert grpc_info(server) == "OK"
    finally:
        for client in held:
            client.close()


def grpc_connections(server: ServerProcess) -> float:
    for line in fetch(server, "/metrics")[1].splitlines():
        if line.startswith("kairoi_grpc_connections "):
            return float(line.split()[1])
    raise AssertionError("no kairoi_grpc_connections")


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("max_connections_per_address = 3", "too many connections from your address"),
        ("max_connections = 3\nmax_connections_per_address = 0", "too many connections"),
    ],
)
def test_grpc_connections_are_limited(make_server, config: str, reason: str) -> None:
    """Past [grpc] max_connections or max_connections_per_address, a connection gets a
    GOAWAY saying why and is closed: a grpcio client fails at once (UNAVAILABLE,
    not a wait until its deadline; grpc-core does not show the GOAWAY's reason, so
    the server logs it), the held ones and KCP go on, and a connection closed
    makes room again."""
    server = make_server(f"[grpc]\n{config}")
    held = [socket.create_connection(("127.0.0.1", server.grpc_port)) for _ in range(3)]
    try:
        wait_for(lambda: grpc_connections(server) == 3)
        started = time.monotonic()
        assert grpc_info(server).startswith("UNAVAILABLE")
        assert time.monotonic() - started < 8  # grpc_info's deadline is 10 s
        wait_for(lambda: server.events("grpc connection refused"))
        [logged] = server.events("grpc connection refused")
        assert (logged["reason"], logged["level"]) == (reason, "warning")
        with KcpClient(server.kcp_port) as kcp:
            assert kcp.request("PING") == ["OK", "PONG"]
        held.pop().close()
        wait_for(lambda: grpc_connections(server) == 2)
        assert grpc_info(server) == "OK"
    finally:
        for sock in held:
            sock.close()


def test_slow_clients_from_one_address_do_not_lock_out_the_others(make_server) -> None:
    # The issue: 50 one-byte-a-second connections took max_connections = 50 and a
    # legitimate client got "too many connections". Here 12 from one address
    # against max_connections = 12: that address gets its share of 10 only.
    server = make_server("[controller]\nmax_connections = 12\nmax_connections_per_address = 10")
    slow = [socket.create_connection(("127.0.0.1", server.kcp_port)) for _ in range(12)]
    try:
        for sock in slow:
            sock.sendall(b"1 PI")  # a message begun, never ended
        wait_for(lambda: kcp_connections(server) == 10)
        with KcpClient(server.kcp_port, source="127.0.0.2") as legitimate:
            assert legitimate.request("PING") == ["OK", "PONG"]
    finally:
        for sock in slow:
            sock.close()


def test_a_connection_must_authenticate_in_time(make_server) -> None:
    server = make_server('[auth]\ntokens = ["s3cret"]\n[controller]\nauth_timeout_s = 1.0')
    with KcpClient(server.kcp_port) as late, KcpClient(server.kcp_port) as prompt:
        assert prompt.request("AUTH", "s3cret") == ["OK"]
        assert late.request("PING") == ["OK", "PONG"]  # allowed, but does not count as AUTH
        assert answers_until_closed(late.sock) == [("*", ["ERROR", "authentication timed out"])]
        time.sleep(0.5)  # past the deadline: an authenticated connection stays
        assert prompt.request("PING") == ["OK", "PONG"]
        assert prompt.request("SET", "app.a", FUTURE) == ["OK"]


@pytest.mark.backends("log")  # the KCP front end's own timing: the store plays no part
def test_the_auth_deadline_answers_a_held_guess_then_gives_its_reason(make_server) -> None:
    # Twelve wrong AUTH at once: the 4th to 7th answers come 0.5, 1, 2 and 4 s late and the
    # 8th is held for 8 s (7.5 s to 15.5 s), past the deadline at 8 s and the 5 s given
    # to the last answers then. It was never written, nor the reason: the client got
    # only EOF, at 13 s. The held answer now goes at the deadline, then the reason, and
    # nothing after it.
    server = make_server('[auth]\ntokens = ["s3cret"]\n[controller]\nauth_timeout_s = 8.0')
    with KcpClient(server.kcp_port) as guesser:
        guesser.sock.sendall(b"".join(b"%d AUTH bad\n" % i for i in range(1, 13)))
        started = time.monotonic()
        answers = answers_until_closed(guesser.sock)
        elapsed = time.monotonic() - started
    wrong = ["ERROR", "invalid token"]
    assert answers == [(str(i), wrong) for i in range(1, 9)] + [
        ("*", ["ERROR", "authentication timed out"])
    ]
    assert elapsed < 12.0  # at the deadline, not after the 8th guess's full delay


def test_idle_clients_of_the_metrics_port_cannot_take_every_descriptor(
    server: ServerProcess,
) -> None:
    # Each used to hold its connection for 5 s, with no limit on how many.
    idle = [socket.create_connection(("127.0.0.1", server.metrics_port)) for _ in range(64)]
    try:
        wait_for(lambda: fetch(server, "/live") == (503, "too many connections\n"))
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: fetch(server, "/live") == (200, "ok\n"))


# -- out of file descriptors ----------------------------------------------------------------


def with_open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limit


def open_files(server: ServerProcess) -> int:
    assert server.process is not None
    return len(list(Path(f"/proc/{server.process.pid}/fd").iterdir()))


def test_start_up_raises_the_soft_open_files_limit(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "s", preexec_fn=with_open_files_limit(256, 4096))
    try:
        server.start()
        [limits] = server.events("open files limit")
        assert (limits["soft"], limits["hard"], limits["raised_from"]) == (4096, 4096, 256)
        assert not server.events("open files limit too low for the configuration")
        assert server.process is not None
        proc_limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        assert [line.split()[3:5] for line in proc_limits.splitlines() if "open files" in line] == [
            ["4096", "4096"]
        ]
    finally:
        server.kill()


def test_start_up_warns_when_the_limits_do_not_fit(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "s", preexec_fn=with_open_files_limit(1024, 1024))
    try:
        server.start()  # with max_connections = 1024 by default
        [warning] = server.events("open files limit too low for the configuration")
        assert warning["limit"] == 1024 and warning["needed"] > 1024
        assert warning["level"] == "warning"
    finally:
        server.kill()


GRPC_INFO = """
import sys, grpc
from kairoi.v1 import scheduler_pb2 as pb, scheduler_pb2_grpc as pb_grpc
with grpc.insecure_channel("127.0.0.1:" + sys.argv[1]) as channel:
    try:
        pb_grpc.SchedulerStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        print("OK")
    except grpc.RpcError as error:
        print(error.code().name, error.details())
"""


def grpc_info(server: ServerProcess) -> str:
    """GetServerInfo from a gRPC client in another process: "OK", or "CODE details"."""
    done = subprocess.run(
        [sys.executable, "-c", GRPC_INFO, str(server.grpc_port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    return done.stdout.strip()


def test_out_of_file_descriptors_refuses_with_an_answer_and_recovers(tmp_path: Path) -> None:
    # The issue: with `ulimit -n 1024`, new clients hung at ~1,002 connections,
    # /metrics went dark and the log got ~10 EMFILE tracebacks a second.
    server = ServerProcess(
        tmp_path / "s",
        "[controller]\nmax_connections_per_address = 0",  # every client is 127.0.0.1
        preexec_fn=with_open_files_limit(160, 160),
    )
    clients: list[KcpClient] = []
    try:
        server.start()
        refused: list[list[str]] = []
        for _ in range(400):  # far more than the limit allows
            client = KcpClient(server.kcp_port)
            clients.append(client)
            client.send_raw(b"1 PING\n")
            answer = client.read_message()  # an answer, never a hang
            if answer.args != ["OK", "PONG"]:
                refused.append(answer.args)
                if len(refused) == 20:
                    break
        assert refused == [["ERROR", "server has too many open files"]] * 20
        served = len(clients) - len(refused)
        assert served > 50
        # /metrics answers too: refused with the reason, or served if a descriptor
        # happened to be free (the server opens and closes files of its own).
        status, body = fetch(server, "/metrics")
        assert status == 200 or (status, body) == (503, "server has too many open files\n")
        # gRPC too: UNAVAILABLE at once (the server's GOAWAY), or served.
        during = grpc_info(server)
        assert during == "OK" or during.startswith("UNAVAILABLE"), during
        time.sleep(1.0)  # let a flood of log lines show, if any
        for client in clients:
            client.close()
        clients.clear()
        wait_for(lambda: fetch(server, "/metrics")[0] == 200)
        with KcpClient(server.kcp_port) as again:
            assert again.request("PING") == ["OK", "PONG"]
        assert grpc_info(server) == "OK"

        # One warning per listener when it began, one line when it is over (at the
        # first connection accepted some seconds after the last refusal).
        def episode_over() -> list[dict]:
            with KcpClient(server.kcp_port) as client:
                assert client.request("PING") == ["OK", "PONG"]
            return [
                e for e in server.events("accepting connections again") if e["listener"] == "kcp"
            ]

        [end] = wait_for(episode_over, timeout=30, interval=0.5)
        assert end["refused"] >= 20
        starts = server.events("out of file descriptors: refusing connections")
        listeners = sorted(start["listener"] for start in starts)
        assert listeners in (["kcp"], ["http", "kcp"], ["grpc", "kcp"], ["grpc", "http", "kcp"])
        assert "Traceback" not in server.log_text()
        assert len(server.lines) < 40, server.log_text()
    finally:
        for client in clients:
            client.close()
        server.kill()
