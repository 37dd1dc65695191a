"""The http runner against a real HTTP server in the test process."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support.kcp_client import KcpClient
from support.waiting import wait_for

pytestmark = pytest.mark.backends("log", "postgres")


# The endpoint's URL, the (path, headers, JSON body) of each POST, the status it answers.
Receiver = tuple[str, list[tuple[str, dict, dict]], dict[str, int]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    received: list[tuple[str, dict, dict]] = []
    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, dict(self.headers), body))
            self.send_response(status["code"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received, status
    server.shutdown()


def test_http_rule_posts_the_job_as_json(server, receiver):
    url, received, _ = receiver
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "h", "web.", "http", f"{url}/hook") == ["OK"]
        assert kcp.request("SET", "web.1", "2020-01-01 00:00:00.000500", "données") == ["OK"]
        wait_for(lambda: kcp.request("GET", "web.1")[1] == "executed")
    path, headers, body = received[0]
    assert path == "/hook"
    assert headers["X-Kairoi-Job-Id"] == "web.1" and headers["X-Kairoi-Attempt"] == "1"
    assert body == {
        "id": "web.1",
        "execute_at": "2020-01-01T00:00:00.000500Z",
        "scheduled_at": "2020-01-01T00:00:00.000500Z",
        "attempt": 1,
        "payload": "données",
    }


def test_non_2xx_and_unreachable_fail_the_job(server, receiver):
    url, _, status = receiver
    status["code"] = 503
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "h", "web.", "http", url) == ["OK"]
        assert kcp.request("RULE", "SET", "dead", "dead.", "http", "http://127.0.0.1:9/") == ["OK"]
        assert kcp.request("SET", "web.1", "2020-01-01 00:00:00") == ["OK"]
        assert kcp.request("SET", "dead.1", "2020-01-01 00:00:00") == ["OK"]
        wait_for(lambda: kcp.request("GET", "web.1")[1] == "failed")
        wait_for(lambda: kcp.request("GET", "dead.1")[1] == "failed")
    ran = server.wait_events("job run", lambda e: e["job"] in ("web.1", "dead.1"), count=2)
    runs = {e["job"]: e["outcome"] for e in ran}
    assert runs["web.1"] == f"HTTP 503 from {url}"
    assert runs["dead.1"].startswith("POST http://127.0.0.1:9/ failed")


def test_a_stored_http_rule_runs_after_a_restart(server, receiver):
    # The HTTP runner is built at its first use (app.OnFirstUse): after a restart
    # that is the run of a stored rule, which no RULE SET checked in this process.
    url, received, _ = receiver
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "h", "web.", "http", f"{url}/hook") == ["OK"]
    server.restart()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "web.1", "2020-01-01 00:00:00") == ["OK"]
        wait_for(lambda: kcp.request("GET", "web.1")[1] == "executed")
    assert [(path, body["id"]) for path, _, body in received] == [("/hook", "web.1")]
