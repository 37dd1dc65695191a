"""Every runner delivers every id and payload the protocols accept, end to end.

The real `kairoi-trio serve` process; jobs go in over KCP (ids with spaces,
quotes, CR/LF, control characters, a leading "-", 65,535 bytes; UTF-8 text
payloads) and gRPC (binary payloads); what arrives is read where a user's own
code would read it: the argv, environment and payload file of a real `sh`
script, the requests of a real HTTP server (Python's http.server), the
messages of the real RabbitMQ (read with the independent pamqp admin client).
The HTTP endpoint also misbehaves the way the issue describes: a body that
trickles in, a body that never ends.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import amqp_broker as broker
import grpc
import pytest
from amqp_broker import Admin, Route
from google.protobuf.timestamp_pb2 import Timestamp
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = pytest.mark.backends("log", "postgres")

PAST = "2020-01-01 00:00:00"
PAST_SECONDS = 1_577_836_800
FINAL = ("executed", "failed")
MAX_ID = 65_535
TEXT_PAYLOAD = 'données\r\n"quoted" \\ \t end'
BINARY_PAYLOADS = [bytes(range(256)), b"\x00\xff" * 5000]


def hostile_ids(prefix: str) -> list[str]:
    """Ids every protocol accepts; all start with `prefix` or with "-" + `prefix`."""
    return [
        f"{prefix}é",  # the issue's `SET h.é "2000-01-01 00:00:00"`
        f"{prefix}with  spaces ",
        f"{prefix}\"double\" 'single' `back` $(echo no) ${{HOME}} \\",
        f"{prefix}cr\rlf\nend\r\n",
        f"{prefix}ctl\x01\x07\x1b[31m\x7f",
        f"-{prefix}leading-dash",
        f"{prefix}percent%41+plus&=;,",
        f"{prefix}\u2028\u200b\ufeff\U0001f600",
        prefix + "x" * (MAX_ID - len(prefix)),  # the longest id
        prefix + "é" * ((MAX_ID - len(prefix)) // 2),
    ]


@dataclass
class Jobs:
    """What was sent: id -> payload."""

    sent: dict[str, bytes] = field(default_factory=dict)

    def set_all(self, server: ServerProcess, prefix: str) -> None:
        """Half the hostile ids with a text payload over KCP; binary payloads over gRPC."""
        with KcpClient(server.kcp_port, timeout=30) as kcp:
            for i, job_id in enumerate(hostile_ids(prefix)):
                payload = TEXT_PAYLOAD if i % 2 else ""
                args = ("SET", job_id, PAST, payload) if payload else ("SET", job_id, PAST)
                assert kcp.request(*args) == ["OK"], job_id[:40]
                self.sent[job_id] = payload.encode()
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            for i, binary in enumerate(BINARY_PAYLOADS):
                job_id = f"{prefix}binary\n{i}"
                stub.SetJob(
                    pb.SetJobRequest(
                        id=job_id, execute_at=Timestamp(seconds=PAST_SECONDS), payload=binary
                    )
                )
                self.sent[job_id] = binary

    def wait_executed(self, server: ServerProcess) -> None:
        with KcpClient(server.kcp_port, timeout=30) as kcp:

            def finished() -> dict[str, str] | None:
                statuses = {job_id: kcp.request("GET", job_id)[1] for job_id in self.sent}
                return statuses if all(s in FINAL for s in statuses.values()) else None

            final = wait_for(finished, timeout=30, interval=0.1)
        outcomes = {e["job"][:40]: e["outcome"] for e in server.events("job run") if not e["ok"]}
        assert set(final.values()) == {"executed"}, outcomes
        text = server.log_text()
        assert "Traceback" not in text and "runner crashed" not in text


def rules(kcp: KcpClient, prefix: str, *runner: str) -> None:
    for pattern in (prefix, f"-{prefix}"):
        assert kcp.request("RULE", "SET", f"r{pattern}", pattern, *runner) == ["OK"]


# --- shell -----------------------------------------------------------------------------


def test_the_shell_runner_delivers_every_id_and_payload(server: ServerProcess, tmp_path: Path):
    out = tmp_path / "runs"
    out.mkdir()
    script = tmp_path / "record.sh"
    script.write_text(
        f'f=$(mktemp "{out}/run.XXXXXX")\n'
        'printf "%s" "$1" > "$f.arg"\n'
        'printf "%s" "$KAIROI_JOB_ID" > "$f.env"\n'
        'if [ -n "${KAIROI_PAYLOAD_FILE-}" ]; then cat "$KAIROI_PAYLOAD_FILE" > "$f.payload"; fi\n'
    )
    with KcpClient(server.kcp_port) as kcp:
        rules(kcp, "s.", "shell", str(script))
    jobs = Jobs()
    jobs.set_all(server, "s.")
    jobs.wait_executed(server)
    got = {}
    for run in out.glob("run.??????"):
        arg = Path(f"{run}.arg").read_bytes().decode()
        assert Path(f"{run}.env").read_bytes().decode() == arg
        payload = Path(f"{run}.payload")
        got[arg] = payload.read_bytes() if payload.exists() else b""
    assert got == jobs.sent


# --- http ------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: dict


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[Received]]]:
    """An http.server endpoint: POST /ok answers 204; /slow, /endless and /flood misbehave."""
    received: list[Received] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(Received(dict(self.headers), body))
            try:
                if self.path == "/slow":  # the issue's: 200, Content-Length 3, a byte every 1.5 s
                    self._head(200, 3)
                    for _ in range(3):
                        time.sleep(1.5)
                        self.wfile.write(b"x")
                        self.wfile.flush()
                elif self.path in ("/endless", "/flood"):  # no length: the body ends never
                    self.close_connection = True
                    self._head(200, None)
                    chunk, pause = (b"x", 0.2) if self.path == "/endless" else (b"x" * 65536, 0)
                    while True:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(pause)
                else:
                    self._head(204, 0)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the runner hung up: what it must do

        def _head(self, status: int, length: int | None) -> None:
            self.send_response(status)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.flush()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_the_http_runner_delivers_every_id_and_payload(server: ServerProcess, endpoint):
    url, received = endpoint
    with KcpClient(server.kcp_port) as kcp:
        rules(kcp, "h.", "http", f"{url}/ok")
    jobs = Jobs()
    jobs.set_all(server, "h.")
    jobs.wait_executed(server)
    got = {}
    for request in received:
        job_id = request.body["id"]
        header = request.headers.get("X-Kairoi-Job-Id")
        if len(job_id.encode()) <= 1000:
            assert header is not None and unquote(header, errors="strict") == job_id
        else:
            assert header is None  # too long for common servers' header limits: body only
        if "payload_base64" in request.body:
            assert request.body["payload"] is None
            got[job_id] = base64.b64decode(request.body["payload_base64"])
        else:
            got[job_id] = (request.body["payload"] or "").encode()
        assert request.body["execute_at"] == "2020-01-01T00:00:00.000000Z"
    assert got == jobs.sent


def test_http_times_have_four_digit_years(server: ServerProcess, endpoint):
    url, received = endpoint
    with KcpClient(server.kcp_port) as kcp:
        rules(kcp, "h.", "http", f"{url}/ok")
        assert kcp.request("SET", "h.old", "0001-01-01 00:00:00") == ["OK"]
        assert kcp.request("SET", "h.older", "0999-12-31 23:59:59.5") == ["OK"]
        wait_for(lambda: len(received) == 2)
    execute_at = {r.body["id"]: r.body["execute_at"] for r in received}
    assert execute_at == {
        "h.old": "0001-01-01T00:00:00.000000Z",
        "h.older": "0999-12-31T23:59:59.500000Z",
    }


def final_outcome(server: ServerProcess, kcp: KcpClient, job_id: str) -> tuple[str, str]:
    status = wait_for(lambda: (s := kcp.request("GET", job_id)[1]) in FINAL and s, timeout=30)
    [run] = server.wait_events("job run", lambda e: e["job"] == job_id)
    return status, run["outcome"]


def test_the_http_timeout_bounds_the_whole_answer(
    make_server: Callable[..., ServerProcess], endpoint
) -> None:
    """The issue's cases with timeout_s = 2: a body that trickles in and one that
    never ends both fail the job, instead of `executed` after 4.5 s and `triggered`
    for ever; the runner goes on serving."""
    url, _ = endpoint
    server = make_server("[runners.http]\ntimeout_s = 2.0\n")
    with KcpClient(server.kcp_port) as kcp:
        for name in ("slow", "endless", "ok"):
            assert kcp.request("RULE", "SET", name, f"{name}.", "http", f"{url}/{name}") == ["OK"]
        for job_id in ("slow.1", "endless.1"):
            assert kcp.request("SET", job_id, PAST) == ["OK"]
        status, outcome = final_outcome(server, kcp, "slow.1")
        assert status == "failed"
        assert outcome.startswith(f"no complete answer from {url}/slow within 2s (HTTP 200, ")
        status, outcome = final_outcome(server, kcp, "endless.1")
        assert status == "failed"
        assert outcome.startswith(f"no complete answer from {url}/endless within 2s (HTTP 200, ")
        assert kcp.request("SET", "ok.1", PAST) == ["OK"]
        assert final_outcome(server, kcp, "ok.1") == ("executed", "HTTP 204")


def test_the_http_answer_is_bounded_in_size(
    make_server: Callable[..., ServerProcess], endpoint
) -> None:
    """A body that never ends, sent flat out, is cut at 1 MiB: the job fails, the
    server's memory does not follow the endpoint."""
    url, _ = endpoint
    server = make_server("[runners.http]\ntimeout_s = 600.0\n")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "flood", "flood.", "http", f"{url}/flood") == ["OK"]
        assert kcp.request("SET", "flood.1", PAST) == ["OK"]
        status, outcome = final_outcome(server, kcp, "flood.1")
    assert status == "failed"
    assert outcome == f"answer from {url}/flood too large: HTTP 200 with a body over 1048576 bytes"


# --- amqp ------------------------------------------------------------------------------


def test_the_amqp_runner_delivers_every_id_and_payload(server: ServerProcess, route: Route):
    with KcpClient(server.kcp_port) as kcp:
        rules(kcp, "a.", "amqp", broker.URL, route.exchange, route.routing_key)
    jobs = Jobs()
    jobs.set_all(server, "a.")
    jobs.wait_executed(server)
    admin = Admin()
    try:
        messages = admin.consume(route.queue, len(jobs.sent), timeout=30)
    finally:
        admin.close()
    got = {}
    for message in messages:
        job_id = message.body.decode()
        props = message.properties
        assert props.message_id == (job_id if len(message.body) <= 255 else None)
        assert message.headers["kairoi-execute-at"] == "2020-01-01T00:00:00.000000Z"
        value = message.headers.get("kairoi-payload", b"")
        got[job_id] = value.encode() if isinstance(value, str) else bytes(value)
    assert got == jobs.sent
