"""Every runner tells its consumer which occurrence it delivers: the job's nominal time,
through the real server (KCP in, a real script, HTTP endpoint and broker out).

A consumer deduplicates at-least-once deliveries on (job id, scheduled_at), so the
value must be the job's time as the server stored it, to the microsecond (for a
recurring job, the occurrence's), and not when the run happened to start: the
one-shot jobs here are years overdue when they run, the recurring ones jittered.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import amqp_broker as broker
import pytest
from amqp_broker import Admin, Route
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

pytestmark = pytest.mark.backends("log", "postgres")

JOB_TIME = "2020-01-01 00:00:00.123456"  # KCP's form
SCHEDULED_AT = "2020-01-01T00:00:00.123456Z"  # RFC 3339, UTC, microseconds


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[tuple[dict[str, str], dict]]]]:
    """A local HTTP endpoint answering 204; the (headers, JSON body) of each POST."""
    received: list[tuple[dict[str, str], dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


def stored_time(kcp: KcpClient, job_id: str) -> str:
    """The job's time as the server answers GET, written as RFC 3339."""
    answer = kcp.request("GET", job_id)
    assert answer[0] == "OK", answer
    return answer[2].replace(" ", "T") + "Z"


def wait_executed(kcp: KcpClient, *job_ids: str) -> None:
    for job_id in job_ids:

        def finished(job_id: str = job_id) -> bool:
            return kcp.request("GET", job_id)[1] in ("executed", "failed")

        wait_for(finished)
        assert kcp.request("GET", job_id)[1] == "executed", kcp.request("GET", job_id)


def test_a_one_shot_job_is_delivered_with_its_time_to_the_microsecond(
    server: ServerProcess,
    endpoint: tuple[str, list[tuple[dict[str, str], dict]]],
    tmp_path: Path,
) -> None:
    url, received = endpoint
    out = tmp_path / "seen"
    script = tmp_path / "job.sh"
    script.write_text(f'printf "%s %s\\n" "$1" "$KAIROI_SCHEDULED_AT" >> {out}\n')
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "h", "web.", "http", url) == ["OK"]
        assert kcp.request("RULE", "SET", "s", "sh.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "web.1", JOB_TIME, "payload") == ["OK"]
        assert kcp.request("SET", "sh.1", JOB_TIME) == ["OK"]
        wait_executed(kcp, "web.1", "sh.1")
        assert stored_time(kcp, "web.1") == stored_time(kcp, "sh.1") == SCHEDULED_AT

    [(headers, body)] = received
    assert body["id"] == "web.1" and body["payload"] == "payload"
    assert body["scheduled_at"] == body["execute_at"] == SCHEDULED_AT
    assert headers["X-Kairoi-Scheduled-At"] == SCHEDULED_AT
    assert headers["X-Kairoi-Job-Id"] == "web.1"
    assert out.read_text() == f"sh.1 {SCHEDULED_AT}\n"


def test_an_amqp_delivery_carries_the_jobs_time_to_the_microsecond(
    server: ServerProcess, admin: Admin, route: Route
) -> None:
    with KcpClient(server.kcp_port) as kcp:
        rule = ("RULE", "SET", "q", "mq.", "amqp", broker.URL, route.exchange, route.routing_key)
        assert kcp.request(*rule) == ["OK"]
        assert kcp.request("SET", "mq.1", JOB_TIME, "payload") == ["OK"]
        wait_executed(kcp, "mq.1")
        assert stored_time(kcp, "mq.1") == SCHEDULED_AT
    [message] = admin.drain(route.queue)
    assert message.body == b"mq.1"
    headers = message.headers
    assert headers["scheduled_at"] == headers["kairoi-execute-at"] == SCHEDULED_AT
    assert headers["kairoi-payload"] == "payload" and headers["kairoi-attempt"] == 1


def test_a_recurring_job_is_delivered_with_each_occurrence_not_its_jittered_time(
    server: ServerProcess,
    endpoint: tuple[str, list[tuple[dict[str, str], dict]]],
    tmp_path: Path,
) -> None:
    """`every 2s` from a start with microseconds, with up to 1 s of jitter: each run
    carries its occurrence (start, start + 2 s) exactly, and execute_at says when it was due."""
    url, received = endpoint
    out = tmp_path / "seen"
    script = tmp_path / "job.sh"
    script.write_text(f'printf "%s %s\\n" "$1" "$KAIROI_SCHEDULED_AT" >> {out}\n')
    start = datetime.now(UTC).replace(microsecond=123456) + timedelta(seconds=2)
    occurrences = [start + timedelta(seconds=2 * k) for k in range(2)]
    expected = [at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for at in occurrences]
    options = ("jitter=1s", "max_runs=2", f"start={start:%Y-%m-%d %H:%M:%S.%f}")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "h", "web.", "http", url) == ["OK"]
        assert kcp.request("RULE", "SET", "s", "sh.", "shell", str(script)) == ["OK"]
        for job_id in ("web.every", "sh.every"):
            answer = kcp.request("SCHEDULE", job_id, "every 2s", *options)
            assert answer[0] == "OK", answer
        wait_for(lambda: len(received) == 2 and out.exists() and out.read_text().count("\n") == 2)
    assert [body["scheduled_at"] for _, body in received] == expected
    assert [headers["X-Kairoi-Scheduled-At"] for headers, _ in received] == expected
    assert [body["id"] for _, body in received] == ["web.every"] * 2
    jittered = [body["execute_at"] for _, body in received]
    assert jittered != expected  # jitter moved the runs (0 µs twice is a 1e-12 chance)
    assert all(later >= nominal for later, nominal in zip(jittered, expected, strict=True))
    assert out.read_text().splitlines() == [f"sh.every {at}" for at in expected]
