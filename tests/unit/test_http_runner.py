"""The http runner (runners/http.py) against a real HTTP endpoint on a real socket.

The endpoint is a Trio task in the test: h11 parses each request exactly as it
arrived on the wire, and each test writes the answer byte by byte, so that it
can be slow, endless, oversized or cut short. Time is Trio's autojump clock:
the 1.5 s between two bytes of a slow body pass at once, in the order they
would have, so that the tests are about outcomes and never about speed.
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import h11
import pytest
import trio
import trio.testing
from support.certificates import self_signed

from kairoi_trio.model import MAX_TIME_US, MIN_TIME_US, HttpRunner, Job, Recurrence, Rule, Schedule
from kairoi_trio.runners.base import RunFailed
from kairoi_trio.runners.http import (
    MAX_ID_HEADER_BYTES,
    HttpRunnerBackend,
    header_job_id,
    redacted,
)
from kairoi_trio.runners.http_client import KEEPALIVE_EXPIRY_S

# Ids every protocol accepts (NUL too, until the protocols refuse it at input:
# the runner must not be where it fails).
HOSTILE_IDS = [
    "h.é",
    "h.with space",
    "h.\"double\" 'single' `back`",
    "h.cr\rlf\nend\r\n",
    "h.ctl\x01\x07\x1b[31m\x7f",
    "-h.leading-dash",
    "h.percent%41+plus&amp;=",
    "h.\u2028\u200b\ufeff\U0001f600",
    "h.nul\x00inside",
    "h." + "x" * 65_533,  # 65,535 bytes, the longest id
    "h." + "é" * 32_766,  # 65,534 bytes of two-byte characters
]


@dataclass
class Request:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    body: bytes


Respond = Callable[[trio.abc.Stream, Request], Awaitable[bool]]  # True: keep the connection


class Endpoint:
    """An HTTP/1.1 server on 127.0.0.1 that records requests and answers with `respond`."""

    def __init__(self, respond: Respond, tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.tls = tls
        self.requests: list[Request] = []
        self.connections = 0
        self.closed = 0  # connections ended (either side)
        self.url = ""

    async def start(self, nursery: trio.Nursery) -> Endpoint:
        serve = functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/hook"
        return self

    async def _handle(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(stream, conn)
                if request is None:
                    return
                self.requests.append(request)
                if not await self.respond(stream, request):
                    return
                leftover, _ = conn.trailing_data
                conn = h11.Connection(h11.SERVER)  # the answer was written raw: a new cycle
                if leftover:  # (b"" would tell h11 the peer closed)
                    conn.receive_data(leftover)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the runner hung up, as it should on a timeout or an oversized body
        finally:
            self.closed += 1
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {name: value for name, value in head.headers}
                return Request(head.method, head.target, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None


def answer(status: int = 200, body: bytes = b"", reason: bytes = b"OK") -> Respond:
    async def respond(stream: trio.abc.Stream, request: Request) -> bool:
        head = b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n" % (status, reason, len(body))
        await stream.send_all(head + body)
        return True

    return respond


def slow_body(length: int, every_s: float) -> Respond:
    """200 with Content-Length `length`, then one byte every `every_s` seconds."""

    async def respond(stream: trio.abc.Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        for _ in range(length):
            await trio.sleep(every_s)
            await stream.send_all(b"x")
        return True

    return respond


def endless_body(chunk: bytes, every_s: float, status: int = 200) -> Respond:
    """A chunked body that never ends: `chunk` every `every_s` seconds (0: flat out)."""

    async def respond(stream: trio.abc.Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n" % status)
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        while True:
            await stream.send_all(frame)
            await trio.sleep(every_s)

    return respond


async def no_answer(stream: trio.abc.Stream, request: Request) -> bool:
    await trio.sleep_forever()
    return False


async def cut_short(stream: trio.abc.Stream, request: Request) -> bool:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    return False


def rule_for(url: str) -> Rule:
    return Rule("r", "", HttpRunner(url))


def job(job_id: str = "j", payload: bytes = b"", execute_at: int = 0) -> Job:
    return Job(job_id, execute_at, payload=payload, attempts=1)


async def start_runner(nursery: trio.Nursery, **options: float) -> HttpRunnerBackend:
    runner = HttpRunnerBackend(**options)  # type: ignore[arg-type]
    await nursery.start(runner.serve)
    return runner


async def failure_of(runner: HttpRunnerBackend, url: str, the_job: Job | None = None) -> str:
    with pytest.raises(RunFailed) as failure:
        await runner.run(the_job or job(), rule_for(url))
    reason = failure.value.message
    assert "\n" not in reason and "Traceback" not in reason
    return reason


# --- what is sent ---------------------------------------------------------------


@pytest.mark.parametrize("job_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
async def test_every_id_is_delivered_exactly_in_the_body_and_decodably_in_the_header(
    nursery: trio.Nursery, job_id: str
) -> None:
    endpoint = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery)
    assert await runner.run(job(job_id), rule_for(endpoint.url)) == "HTTP 200"
    [request] = endpoint.requests
    assert json.loads(request.body)["id"] == job_id
    encoded = request.headers.get(b"x-kairoi-job-id")
    if len(job_id.encode()) < MAX_ID_HEADER_BYTES // 3:  # fits even if every byte is escaped
        assert encoded is not None
        assert all(0x21 <= byte <= 0x7E for byte in encoded)  # visible ASCII only
        assert unquote(encoded.decode("ascii"), errors="strict") == job_id
    else:
        assert encoded is None  # too long for a header: the body alone carries it
    assert request.headers[b"x-kairoi-attempt"] == b"1"


def test_the_header_form_of_an_id() -> None:
    assert header_job_id("web.1") == "web.1"  # common ids stay readable
    assert header_job_id("app:invoice/42?x=1") == "app:invoice/42?x=1"
    assert header_job_id("a b+c%d") == "a%20b%2Bc%25d"
    assert header_job_id("é\r\n\x00") == "%C3%A9%0D%0A%00"
    assert header_job_id("x" * MAX_ID_HEADER_BYTES) == "x" * MAX_ID_HEADER_BYTES
    assert header_job_id("x" * (MAX_ID_HEADER_BYTES + 1)) is None
    assert header_job_id("é" * (MAX_ID_HEADER_BYTES // 6 + 1)) is None  # 6 bytes encoded each


async def test_the_json_body(nursery: trio.Nursery) -> None:
    endpoint = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery)
    rule = rule_for(endpoint.url)
    await runner.run(job("t", payload='données \x00 "q"'.encode(), execute_at=500), rule)
    await runner.run(job("b", payload=b"\xff\xfe\x00binary"), rule)
    await runner.run(job("n"), rule)
    text, binary, none = (json.loads(r.body) for r in endpoint.requests)
    assert text == {
        "id": "t",
        "execute_at": "1970-01-01T00:00:00.000500Z",
        "scheduled_at": "1970-01-01T00:00:00.000500Z",
        "attempt": 1,
        "payload": 'données \x00 "q"',
    }
    assert binary["payload"] is None
    assert base64.b64decode(binary["payload_base64"]) == b"\xff\xfe\x00binary"
    assert none["payload"] is None and "payload_base64" not in none
    request = endpoint.requests[0]
    assert request.method == b"POST" and request.target == b"/hook"
    assert request.headers[b"content-type"] == b"application/json"
    assert request.headers[b"user-agent"].startswith(b"kairoi-trio/")


@pytest.mark.parametrize(
    ("execute_at", "text"),
    [
        (MIN_TIME_US, "0001-01-01T00:00:00.000000Z"),
        (-1, "1969-12-31T23:59:59.999999Z"),
        (MAX_TIME_US, "9999-12-31T23:59:59.999999Z"),
    ],
)
async def test_execute_at_is_rfc3339_with_four_digit_years(
    nursery: trio.Nursery, execute_at: int, text: str
) -> None:
    endpoint = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery)
    await runner.run(job(execute_at=execute_at), rule_for(endpoint.url))
    body = json.loads(endpoint.requests[0].body)
    assert body["execute_at"] == body["scheduled_at"] == text


# 2026-12-01T09:00:00Z; the scheduled_at tests of every runner use the same times.
NOMINAL = 1_796_115_600_000_000
HOUR = 3_600_000_000


def recurring(nominal: int, execute_at: int, attempts: int = 1) -> Job:
    """A run of an hourly job's occurrence `nominal`, due at `execute_at` (jitter, a retry)."""
    recurrence = Recurrence(Schedule("every 1h", start=NOMINAL), nominal)
    return Job("r.hourly", execute_at, attempts=attempts, recurrence=recurrence)


def scheduled_at_of(request: Request) -> str:
    """The scheduled_at of a request's body, after checking that its header says the same."""
    scheduled_at = json.loads(request.body)["scheduled_at"]
    assert request.headers[b"x-kairoi-scheduled-at"] == scheduled_at.encode()
    return scheduled_at


async def test_a_one_shot_run_is_scheduled_at_its_execute_at(nursery: trio.Nursery) -> None:
    endpoint = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery)
    await runner.run(job("web.1", execute_at=NOMINAL + 123), rule_for(endpoint.url))
    [request] = endpoint.requests
    assert scheduled_at_of(request) == "2026-12-01T09:00:00.000123Z"
    assert json.loads(request.body)["execute_at"] == "2026-12-01T09:00:00.000123Z"


async def test_a_recurring_run_is_scheduled_at_its_occurrence_not_its_execute_at(
    nursery: trio.Nursery,
) -> None:
    """Jitter and retries move execute_at; the (id, scheduled_at) a receiver dedupes on stays."""
    endpoint = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery)
    rule = rule_for(endpoint.url)
    await runner.run(recurring(NOMINAL, NOMINAL + 37_000_123), rule)  # jittered
    await runner.run(recurring(NOMINAL, NOMINAL + 90_000_000, attempts=2), rule)  # its retry
    await runner.run(recurring(NOMINAL + HOUR, NOMINAL + HOUR), rule)  # the next occurrence
    jittered, retried, next_one = endpoint.requests
    assert scheduled_at_of(jittered) == scheduled_at_of(retried) == "2026-12-01T09:00:00.000000Z"
    assert scheduled_at_of(next_one) == "2026-12-01T10:00:00.000000Z"
    bodies = [json.loads(r.body) for r in endpoint.requests]
    assert [b["execute_at"] for b in bodies] == [
        "2026-12-01T09:00:37.000123Z",
        "2026-12-01T09:01:30.000000Z",
        "2026-12-01T10:00:00.000000Z",
    ]
    assert [b["attempt"] for b in bodies] == [1, 2, 1]
    keys = {(b["id"], b["scheduled_at"]) for b in bodies}
    assert len(keys) == 2  # the retry is the same delivery again; the next hour is a new one


# --- what counts as an answer -----------------------------------------------------------


async def test_a_complete_2xx_answer_is_success_and_the_connection_is_kept(
    nursery: trio.Nursery,
) -> None:
    endpoint = await Endpoint(answer(204, b"")).start(nursery)
    runner = await start_runner(nursery)
    for _ in range(3):
        assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 204"
    assert endpoint.connections == 1


async def test_a_non_2xx_answer_fails_with_the_start_of_its_body(nursery: trio.Nursery) -> None:
    body = b"Service\r\n  down \x1b[0m for maintenance" + b"." * 1000
    endpoint = await Endpoint(answer(503, body, b"Unavailable")).start(nursery)
    runner = await start_runner(nursery)
    reason = await failure_of(runner, endpoint.url)
    assert reason.startswith(f"HTTP 503 from {endpoint.url}: Service down [0m for maintenance..")
    assert len(reason) < 300
    redirect = await Endpoint(answer(302, b"")).start(nursery)
    assert await failure_of(runner, redirect.url) == f"HTTP 302 from {redirect.url}"


async def test_the_timeout_bounds_a_slow_body(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The issue's case: 200, Content-Length 3, one byte every 1.5 s, timeout 2 s."""
    endpoint = await Endpoint(slow_body(3, 1.5)).start(nursery)
    runner = await start_runner(nursery, timeout_s=2)
    started = trio.current_time()
    reason = await failure_of(runner, endpoint.url)
    assert reason == (
        f"no complete answer from {endpoint.url} within 2s "
        "(HTTP 200, body unfinished after 1 bytes)"
    )
    assert trio.current_time() - started == pytest.approx(2)  # virtual time: the deadline


async def test_the_timeout_bounds_an_endless_slow_body(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = await Endpoint(endless_body(b"tick", 0.5)).start(nursery)
    runner = await start_runner(nursery, timeout_s=2)
    reason = await failure_of(runner, endpoint.url)
    assert reason.startswith(f"no complete answer from {endpoint.url} within 2s (HTTP 200")


async def test_the_timeout_bounds_waiting_for_the_headers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = await Endpoint(no_answer).start(nursery)
    runner = await start_runner(nursery, timeout_s=2)
    assert await failure_of(runner, endpoint.url) == f"no answer from {endpoint.url} within 2s"


async def test_a_slow_failing_answer_still_says_its_status(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = await Endpoint(endless_body(b"error ", 0.5, status=500)).start(nursery)
    runner = await start_runner(nursery, timeout_s=2)
    reason = await failure_of(runner, endpoint.url)
    assert reason.startswith(f"HTTP 500 from {endpoint.url}: error error")


async def test_an_endless_fast_body_is_cut_at_the_size_bound(nursery: trio.Nursery) -> None:
    endpoint = await Endpoint(endless_body(b"x" * 65536, 0)).start(nursery)
    runner = await start_runner(nursery, timeout_s=3600, max_response_bytes=1 << 20)
    reason = await failure_of(runner, endpoint.url)
    assert reason == (
        f"answer from {endpoint.url} too large: HTTP 200 with a body over 1048576 bytes"
    )
    # The connection was dropped, not left half read: the next run gets a fresh one.
    endpoint.respond = answer()
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"
    assert endpoint.connections == 2


async def test_a_declared_oversized_body_is_not_read(nursery: trio.Nursery) -> None:
    async def huge(stream: trio.abc.Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000001\r\n\r\n")
        await trio.sleep_forever()
        return False

    endpoint = await Endpoint(huge).start(nursery)
    runner = await start_runner(nursery, timeout_s=3600, max_response_bytes=1_000_000)
    reason = await failure_of(runner, endpoint.url)
    assert reason.endswith("too large: HTTP 200 with a body over 1000000 bytes")


async def test_a_body_at_the_bound_is_fine(nursery: trio.Nursery) -> None:
    endpoint = await Endpoint(answer(200, b"y" * 1000)).start(nursery)
    runner = await start_runner(nursery, max_response_bytes=1000)
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"


async def test_an_answer_cut_short_fails(nursery: trio.Nursery) -> None:
    endpoint = await Endpoint(cut_short).start(nursery)
    runner = await start_runner(nursery)
    reason = await failure_of(runner, endpoint.url)
    assert reason.startswith(f"POST {endpoint.url} failed: ")


async def test_outcomes_never_show_the_urls_password(nursery: trio.Nursery) -> None:
    endpoint = await Endpoint(answer(401, b"")).start(nursery)
    runner = await start_runner(nursery)
    url = endpoint.url.replace("http://", "http://kairoi:s3cret@")
    assert await failure_of(runner, url) == f"HTTP 401 from {url.replace(':s3cret', '')}"
    assert endpoint.requests[0].headers[b"authorization"].startswith(b"Basic ")
    assert redacted("http://u:p@h:1/x?y") == "http://u@h:1/x?y"
    assert redacted("http://u@h/") == "http://u@h/"
    refused = await failure_of(runner, "http://kairoi:s3cret@127.0.0.1:9/")
    assert refused.startswith("POST http://kairoi@127.0.0.1:9/ failed: ")


async def test_nothing_listening_fails(nursery: trio.Nursery) -> None:
    runner = await start_runner(nursery)
    reason = await failure_of(runner, "http://127.0.0.1:9/")
    assert reason.startswith("POST http://127.0.0.1:9/ failed: ")


async def test_a_cancelled_run_leaves_the_runner_usable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The pool's rule timeout cancels a run from outside, at any point."""
    endpoint = await Endpoint(slow_body(3, 1.5)).start(nursery)
    runner = await start_runner(nursery)
    with trio.move_on_after(2) as scope:
        await runner.run(job(), rule_for(endpoint.url))
    assert scope.cancelled_caught
    endpoint.respond = answer()
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"


# --- connections: kept alive, bounded, dropped when unfit ---------------------------------


async def test_concurrent_runs_share_at_most_max_connections(nursery: trio.Nursery) -> None:
    async def slow_ok(stream: trio.abc.Stream, request: Request) -> bool:
        await trio.sleep(0.01)  # keeps each connection busy, so that runs must wait
        return await answer(204)(stream, request)

    endpoint = await Endpoint(slow_ok).start(nursery)
    runner = await start_runner(nursery, max_connections=3)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        outcomes.append(await runner.run(job(f"j{i}"), rule_for(endpoint.url)))

    async with trio.open_nursery() as runs:
        for i in range(12):
            runs.start_soon(one, i)
    assert outcomes == ["HTTP 204"] * 12
    assert len(endpoint.requests) == 12
    assert endpoint.connections == 3  # kept alive and reused, never over the bound


async def test_at_the_bound_an_idle_connection_to_another_host_makes_room(
    nursery: trio.Nursery,
) -> None:
    first = await Endpoint(answer()).start(nursery)
    second = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery, max_connections=1)
    assert await runner.run(job(), rule_for(first.url)) == "HTTP 200"
    with trio.fail_after(5):
        assert await runner.run(job(), rule_for(second.url)) == "HTTP 200"
        await trio.testing.wait_all_tasks_blocked()
    assert first.closed == 1  # closed for the other host, not left open past the bound


async def test_a_connection_the_endpoint_closed_after_its_answer_is_not_reused(
    nursery: trio.Nursery,
) -> None:
    """No `Connection: close`: the endpoint just hangs up after a complete answer. Reused
    at once, the connection fails without an answer; the run goes on a new one."""

    async def answer_and_hang_up(stream: trio.abc.Stream, request: Request) -> bool:
        await answer(204)(stream, request)
        return False

    endpoint = await Endpoint(answer_and_hang_up).start(nursery)
    runner = await start_runner(nursery)
    for _ in range(3):
        assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 204"
        await trio.testing.wait_all_tasks_blocked()  # the endpoint's close is done
    assert endpoint.connections == 3


async def test_an_unasked_answer_on_an_idle_connection_is_not_taken_for_the_next_one(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Some servers time an idle connection out with a "408" nobody asked for, then close."""

    async def answer_then_time_out(stream: trio.abc.Stream, request: Request) -> bool:
        await answer(204)(stream, request)
        await trio.sleep(0.5)
        await stream.send_all(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        return False

    endpoint = await Endpoint(answer_then_time_out).start(nursery)
    runner = await start_runner(nursery)
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 204"
    await trio.sleep(1)
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 204"
    assert endpoint.connections == 2


async def test_connection_close_from_the_endpoint_is_honoured(nursery: trio.Nursery) -> None:
    async def close_after(stream: trio.abc.Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep(3600)  # the runner must not wait for the endpoint to close
        return False

    endpoint = await Endpoint(close_after).start(nursery)
    runner = await start_runner(nursery)
    with trio.fail_after(5):
        assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"
        endpoint.respond = answer()
        assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"
    assert endpoint.connections == 2


async def test_a_half_sent_head_fails_at_the_deadline_and_the_connection_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def half_head(stream: trio.abc.Stream, request: Request) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-")
        await trio.sleep_forever()
        return False

    endpoint = await Endpoint(half_head).start(nursery)
    runner = await start_runner(nursery, timeout_s=2)
    assert await failure_of(runner, endpoint.url) == f"no answer from {endpoint.url} within 2s"
    endpoint.respond = answer()
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"
    assert endpoint.connections == 2


async def test_an_idle_connection_is_closed_after_its_keep_alive_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    endpoint = await Endpoint(answer()).start(nursery)
    runner = await start_runner(nursery)
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"
    await trio.sleep(KEEPALIVE_EXPIRY_S * 2)
    assert endpoint.closed == 1  # the runner closed it: no socket held for nothing
    assert await runner.run(job(), rule_for(endpoint.url)) == "HTTP 200"
    assert endpoint.connections == 2


async def test_https_is_verified_against_the_trust_store(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    endpoint = await Endpoint(answer(204), tls=server_side).start(nursery)
    url = endpoint.url.replace("http://127.0.0.1", "https://localhost")
    untrusting = await start_runner(nursery)
    reason = await failure_of(untrusting, url)
    assert reason.startswith(f"POST {url} failed: ") and "certificate verify failed" in reason
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's own variable, read per context
    runner = await start_runner(nursery)
    for _ in range(2):
        assert await runner.run(job(), rule_for(url)) == "HTTP 204"
    assert endpoint.requests[-1].headers[b"host"] == f"localhost:{url.split(':')[2][:-5]}".encode()
    assert endpoint.connections == 2  # the refused handshake, then one kept alive
