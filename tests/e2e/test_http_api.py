"""The HTTP JSON API (/api/v1) of a real server process, over real sockets with httpx.

One server per store for the whole module (tokens of every role configured,
small body and watch limits); each test uses ids under its own prefix. A test
that stops its server starts one of its own.
"""

from __future__ import annotations

import base64
import json
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import support.postgres as pg
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

pytestmark = [
    pytest.mark.backends("log", "postgres"),
    # One worker for the module: its server is started once per store, not once per worker.
    pytest.mark.xdist_group("http_api"),
]

ADMIN, CLIENT, READ = "admin-token", "client-token", "read-token"
MAX_BODY = 64 << 10
MAX_PAYLOAD = 40_000  # its base64 fits in MAX_BODY
WATCH_BUFFER = 256 << 10
FUTURE = "2030-01-01T00:00:00Z"
CONFIG = f"""
[auth]
tokens = ["{ADMIN}"]
client_tokens = ["{CLIENT}"]
read_tokens = ["{READ}"]
[jobs]
max_payload_bytes = {MAX_PAYLOAD}
[http]
listen = "127.0.0.1:0"
max_body_bytes = {MAX_BODY}
[grpc]
max_watch_buffer_bytes = {WATCH_BUFFER}
"""


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """Module-scoped (conftest parametrizes it by the module's `backends` mark)."""
    return getattr(request, "param", "log")


@pytest.fixture(scope="module")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    dsn = pg.fresh_database("http") if backend == "postgres" else None
    process = ServerProcess(tmp_path_factory.mktemp("http-api"), CONFIG, postgres_dsn=dsn)
    try:
        yield process.start()
    finally:
        process.kill()
        if dsn is not None:
            pg.drop_database(dsn)


@pytest.fixture(scope="module")
def base(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.metrics_port}"


@pytest.fixture
def api(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{base}/api/v1", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10
    ) as client:
        yield client


def as_role(base: str, token: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=f"{base}/api/v1", headers=headers, timeout=10)


def job_path(job_id: str) -> str:
    return f"/jobs/{quote(job_id, safe='')}"


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert response.headers["content-type"] == "application/json"
    return response.status_code, body["error"]["code"], body["error"]["message"]


def kcp(server: ServerProcess) -> KcpClient:
    client = KcpClient(server.kcp_port)
    assert client.request("AUTH", ADMIN) == ["OK"]
    return client


# -- jobs ---------------------------------------------------------------------------------


def test_a_job_set_over_http_is_the_job_kcp_sees_and_back(
    api: httpx.Client, server: ServerProcess
) -> None:
    job_id = "jobs1/a b/é?#%"  # a slash, a space, non-ASCII and URL syntax: all percent-encoded
    payload = bytes(range(256))  # not UTF-8: base64 carries any bytes
    put = api.put(
        job_path(job_id),
        json={"execute_at": "2030-01-01T01:00:00.123456789+01:00", "payload": b64(payload)},
    )
    assert put.status_code == 200
    job = put.json()
    assert job["id"] == job_id
    assert job["status"] == "planned"
    assert job["execute_at"] == "2030-01-01T00:00:00.123456Z"  # UTC, to the microsecond
    assert base64.b64decode(job["payload"]) == payload
    assert job["attempts"] == 0 and job["last_outcome"] == "" and job["schedule"] is None
    assert api.get(job_path(job_id)).json() == job

    with kcp(server) as client:
        assert client.request("GET", job_id)[:3] == ["OK", "planned", "2030-01-01 00:00:00.123456"]
        assert client.request("SET", "jobs1/kcp", "2031-05-06 07:08:09") == ["OK"]
    from_kcp = api.get(job_path("jobs1/kcp")).json()
    assert from_kcp["execute_at"] == "2031-05-06T07:08:09.000000Z"

    deleted = api.delete(job_path(job_id))
    assert deleted.status_code == 204 and deleted.content == b""
    assert error_of(api.get(job_path(job_id)))[:2] == (404, "not_found")
    assert error_of(api.delete(job_path(job_id)))[:2] == (404, "not_found")


def test_listing_pages_through_a_prefix_in_id_order_and_filters_by_status(
    api: httpx.Client,
) -> None:
    ids = [f"list1.{n:02d}" for n in range(7)]
    for job_id in reversed(ids):
        assert api.put(job_path(job_id), json={"execute_at": FUTURE}).status_code == 200
    assert api.put(job_path("list10"), json={"execute_at": FUTURE}).status_code == 200  # no "."

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = api.get("/jobs", params={"prefix": "list1.", "page_size": 3, "page_token": token})
        assert page.status_code == 200
        body = page.json()
        assert set(body) == {"jobs", "next_page_token"}
        seen += [job["id"] for job in body["jobs"]]
        pages += 1
        token = body["next_page_token"]
        if not token:
            break
    assert seen == ids and pages == 3
    planned = api.get("/jobs", params={"prefix": "list1.", "status": "planned"}).json()
    assert [job["id"] for job in planned["jobs"]] == ids
    assert api.get("/jobs", params={"prefix": "list1.", "status": "failed"}).json() == {
        "jobs": [],
        "next_page_token": "",
    }
    assert error_of(api.get("/jobs", params={"status": "done"}))[:2] == (400, "invalid_argument")
    assert error_of(api.get("/jobs", params={"page_size": "-1"}))[:2] == (400, "invalid_argument")


def test_a_rare_status_comes_in_full_pages_with_a_token_to_go_on(api: httpx.Client) -> None:
    # Failed jobs (due, no rule matches "rare1.") scattered among planned ones: each
    # page of the failed ones is full until the last, on either store.
    failed = [f"rare1.{n:02d}" for n in range(0, 15, 5)]
    for n in range(15):
        job_id = f"rare1.{n:02d}"
        when = "2000-01-01T00:00:00Z" if job_id in failed else FUTURE
        assert api.put(job_path(job_id), json={"execute_at": when}).status_code == 200
    for job_id in failed:

        def has_failed(job_id: str = job_id) -> bool:
            return api.get(job_path(job_id)).json()["status"] == "failed"

        wait_for(has_failed)
    query: dict[str, str | int] = {"prefix": "rare1.", "status": "failed", "page_size": 2}
    first = api.get("/jobs", params=query).json()
    assert [job["id"] for job in first["jobs"]] == failed[:2]
    assert first["next_page_token"] == failed[1]
    rest = api.get("/jobs", params={**query, "page_token": first["next_page_token"]}).json()
    assert rest == {"jobs": [api.get(job_path(failed[2])).json()], "next_page_token": ""}


def test_the_overview_describes_the_store(base: str, backend: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as browser:
        signed_in = browser.post("/login", data={"token": READ, "next": "/"})
        assert signed_in.status_code == 303
        page = browser.get("/")
    assert page.status_code == 200
    if backend == "postgres":  # from PostgreSQL's catalog: tables and indexes, vacuum
        assert "tables and indexes" in page.text and "last vacuum of the jobs table" in page.text
    else:
        assert "size on disk" in page.text and "last compaction" in page.text


def test_a_triggered_job_cannot_be_replaced_or_deleted_409(
    api: httpx.Client, tmp_path: Path
) -> None:
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    rule = {"pattern": "busy1.", "runner": {"kind": "shell", "command": str(script)}}
    assert api.put("/rules/busy1", json=rule).status_code == 200
    assert (
        api.put(job_path("busy1.x"), json={"execute_at": "2020-01-01T00:00:00Z"}).status_code == 200
    )
    wait_for(lambda: api.get(job_path("busy1.x")).json()["status"] == "triggered")

    status, code, message = error_of(api.put(job_path("busy1.x"), json={"execute_at": FUTURE}))
    assert (status, code) == (409, "failed_precondition") and "busy1.x" in message
    assert error_of(api.delete(job_path("busy1.x")))[:2] == (409, "failed_precondition")
    assert api.get(job_path("busy1.x")).json()["status"] == "triggered"
    assert api.delete("/rules/busy1").status_code == 204


def test_recurring_jobs_schedule_pause_resume_run_and_preview(api: httpx.Client) -> None:
    path = job_path("rec1.report")
    schedule = {"expression": "0 9 * * MON-FRI", "time_zone": "Europe/Paris", "misfire": "skip"}
    job = api.put(path, json={"schedule": schedule, "payload": b64(b"hi")}).json()
    assert job["status"] == "planned" and job["execute_at"].endswith("T08:00:00.000000Z")
    assert job["schedule"]["expression"] == "0 9 * * MON-FRI"
    assert job["schedule"]["misfire"] == "skip" and job["schedule"]["overlap"] == "skip"
    # A schedule read back can be sent again as it is.
    again = api.put(path, json={"schedule": job["schedule"], "payload": job["payload"]})
    assert again.status_code == 200 and again.json()["schedule"] == job["schedule"]

    assert api.post(f"{path}/pause").json()["schedule"]["paused"] is True
    assert api.post(f"{path}/resume").json()["schedule"]["paused"] is False
    preview = api.get(f"{path}/preview", params={"count": 3}).json()["occurrences"]
    assert len(preview) == 3 and preview == sorted(preview)
    assert all(at.endswith("T08:00:00.000000Z") for at in preview)
    ran = api.post(f"{path}/run").json()
    assert ran["execute_at"] < job["execute_at"]  # now, before the next occurrence

    assert api.put(job_path("rec1.once"), json={"execute_at": FUTURE}).status_code == 200
    status, code, message = error_of(api.post(f"{job_path('rec1.once')}/pause"))
    assert (status, code) == (409, "failed_precondition") and "not recurring" in message
    bad = api.put(path, json={"schedule": {"expression": "61 * * * *"}})
    assert error_of(bad)[:2] == (400, "invalid_argument")
    both = api.put(path, json={"schedule": schedule, "execute_at": FUTURE})
    assert error_of(both)[:2] == (400, "invalid_argument")
    assert error_of(api.get(f"{path}/preview", params={"count": 0}))[:2] == (
        400,
        "invalid_argument",
    )
    assert error_of(api.post(f"{job_path('rec1.none')}/run"))[:2] == (404, "not_found")


# -- rules and info --------------------------------------------------------------------------


def test_rules_set_read_list_and_delete(api: httpx.Client) -> None:
    body = {
        "pattern": "rules1.",
        "runner": {"kind": "http", "url": "http://127.0.0.1:9/hook"},
        "policy": {"max_attempts": 3, "timeout_s": 2.5},
    }
    stored = api.put("/rules/rules1.web", json=body).json()
    assert stored["id"] == "rules1.web" and stored["pattern"] == "rules1."
    assert stored["runner"] == {"kind": "http", "url": "http://127.0.0.1:9/hook"}
    assert stored["policy"]["max_attempts"] == 3 and stored["policy"]["timeout_s"] == 2.5
    assert api.get("/rules/rules1.web").json() == stored
    shell = {"pattern": "rules1.x", "runner": {"kind": "shell", "command": "/bin/true"}}
    assert api.put("/rules/rules1.sh", json=shell).status_code == 200
    listed = api.get("/rules", params={"prefix": "rules1.", "page_size": 1}).json()
    assert [r["id"] for r in listed["rules"]] == ["rules1.sh"] and listed["next_page_token"]
    rest = api.get(
        "/rules",
        params={"prefix": "rules1.", "page_size": 1, "page_token": listed["next_page_token"]},
    ).json()
    # exactly one rule was left: a full page, and no token pointing at an empty one
    assert [r["id"] for r in rest["rules"]] == ["rules1.web"] and rest["next_page_token"] == ""

    no_runner = api.put("/rules/rules1.bad", json={"pattern": "x"})
    assert error_of(no_runner)[:2] == (400, "invalid_argument")
    bad_policy = dict(body, policy={"max_attempts": 1001})
    status, code, message = error_of(api.put("/rules/rules1.bad", json=bad_policy))
    assert (status, code) == (400, "invalid_argument") and "policy.max_attempts" in message
    assert api.delete("/rules/rules1.web").status_code == 204
    assert error_of(api.get("/rules/rules1.web"))[:2] == (404, "not_found")


def test_info_counts_jobs_by_status_and_rules(api: httpx.Client) -> None:
    before = api.get("/info").json()
    assert set(before["jobs"]) == {"planned", "triggered", "executed", "failed"}
    assert api.put(job_path("info1.a"), json={"execute_at": FUTURE}).status_code == 200
    after = api.get("/info").json()
    assert after["jobs"]["planned"] == before["jobs"]["planned"] + 1
    assert after["version"] and after["started_at"].endswith("Z")


# -- errors and limits -------------------------------------------------------------------------


def test_client_input_gets_a_json_error_and_never_harms_the_server(
    api: httpx.Client, base: str, server: ServerProcess
) -> None:
    path = job_path("err1.x")
    cases = [
        api.put(path, content=b"{not json"),
        api.put(path, content=b""),
        api.put(path, json=["a list"]),
        api.put(path, json={"execute_at": 5}),
        api.put(path, json={"execute_at": "2030-01-01 00:00:00"}),  # no offset
        api.put(path, json={"execute_at": "10000-01-01T00:00:00Z"}),
        api.put(path, json={"execute_at": FUTURE, "payload": "not base64!"}),
        api.put(path, json={"execute_at": FUTURE, "colour": "red"}),
        api.put(path, json={"payload": ""}),
        api.put("/jobs/err1%zz", json={"execute_at": FUTURE}),
        api.put("/jobs/err1%ff", json={"execute_at": FUTURE}),  # not UTF-8
    ]
    for response in cases:
        status, code, message = error_of(response)
        assert (status, code) == (400, "invalid_argument"), response.text
        assert len(message) < 1100
    assert "colour" in error_of(cases[7])[2]

    large = {"execute_at": FUTURE, "payload": b64(b"x" * MAX_BODY)}
    assert error_of(api.put(path, json=large))[:2] == (413, "payload_too_large")
    over = {"execute_at": FUTURE, "payload": b64(b"x" * (MAX_PAYLOAD + 1))}  # a body that fits
    status, code, message = error_of(api.put(path, json=over))
    assert (status, code) == (413, "payload_too_large") and "max_payload_bytes" in message

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it streams in
        yield b'{"execute_at": "2030-01-01T00:00:00Z", "payload": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"A" * 1024
        yield b'"}'

    assert error_of(api.put(path, content=chunks()))[:2] == (413, "payload_too_large")
    assert error_of(api.get("/nothing/here"))[:2] == (404, "not_found")
    with httpx.Client(base_url=base) as plain:
        assert error_of(plain.get("/nope"))[:2] == (404, "not_found")
    status, code, _ = error_of(api.post("/info"))
    assert (status, code) == (405, "method_not_allowed")
    assert error_of(api.patch(path, json={}))[:2] == (405, "method_not_allowed")

    assert api.get(path).status_code == 404  # nothing of the above was stored
    with httpx.Client(base_url=base) as plain:
        assert plain.get("/live").text == "ok\n"
    assert server.process is not None and server.process.poll() is None


def answer(sock: socket.socket) -> tuple[bytes, list[bytes]]:
    """One HTTP/1.1 answer read whole: its status and its head's lines, lower case."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection without an answer"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    length = next((int(line[15:]) for line in lines if line.startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(4096)
    return lines[0].split()[1], lines


def test_a_body_no_handler_reads_is_read_and_the_connection_kept(
    server: ServerProcess,
) -> None:
    """404 and 405 of the routing, 401, and handlers that need no body (pause,
    DELETE) answer once the body is in: the server read it, so the connection
    serves the next request. Hypercorn closed it without a word when the body came
    after the answer (a CI failure: httpx "Server disconnected without sending a
    response"). A body declared beyond max_body_bytes is not read: `close`."""
    port = server.metrics_port
    assert port is not None
    auth = f"Authorization: Bearer {ADMIN}\r\n"
    for head, status in [
        (f"PATCH /api/v1/jobs/x HTTP/1.1\r\n{auth}", b"405"),
        (f"PUT /api/v1/nothing HTTP/1.1\r\n{auth}", b"404"),
        ("PUT /api/v1/jobs/x HTTP/1.1\r\n", b"401"),
        (f"POST /api/v1/jobs/keep.nothing/pause HTTP/1.1\r\n{auth}", b"404"),
        (f"DELETE /api/v1/jobs/keep.nothing HTTP/1.1\r\n{auth}", b"404"),
    ]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"{head}Host: x\r\nContent-Length: 2\r\n\r\n".encode())
            time.sleep(0.05)  # the body comes after the head, as httpx sends it
            sock.sendall(b"{}")
            code, lines = answer(sock)
            assert code == status and b"connection: close" not in lines
            sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
            assert answer(sock)[0] == b"200"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        too_large = f"Content-Length: {MAX_BODY + 1}\r\n"
        sock.sendall(f"PATCH /api/v1/jobs/x HTTP/1.1\r\n{auth}Host: x\r\n{too_large}\r\n".encode())
        code, lines = answer(sock)
        assert code == b"405" and b"connection: close" in lines


def test_tokens_and_roles_are_those_of_kcp_and_grpc(base: str) -> None:
    job = {"execute_at": FUTURE}
    with as_role(base, None) as anonymous:
        response = anonymous.get(job_path("auth1.a"))
        assert error_of(response)[:2] == (401, "unauthenticated")
        assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/openapi.json").status_code == 200  # the contract is public
    with as_role(base, "wrong") as stranger:
        assert error_of(stranger.get("/info"))[:2] == (401, "unauthenticated")
    with as_role(base, READ) as reader:
        status, code, message = error_of(reader.put(job_path("auth1.a"), json=job))
        assert (status, code) == (403, "permission_denied")
        assert message == "permission denied: a read token may not set jobs (needs a client token)"
        assert reader.get("/info").status_code == 200
        assert error_of(reader.get(job_path("auth1.a")))[:2] == (404, "not_found")
    with as_role(base, CLIENT) as client:
        assert client.put(job_path("auth1.a"), json=job).status_code == 200
        rule = {"pattern": "auth1.", "runner": {"kind": "shell", "command": "/bin/true"}}
        assert error_of(client.put("/rules/auth1", json=rule))[:2] == (403, "permission_denied")
        assert client.get("/rules").status_code == 200
    with httpx.Client(base_url=base) as probe:  # the probes need no token
        assert probe.get("/ready").status_code == 200


# -- events ----------------------------------------------------------------------------------


def read_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) of a Server-Sent Events stream, comments skipped."""
    event, data = "", ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and event:
            yield event, json.loads(data)
            event, data = "", ""


def test_a_job_set_over_kcp_arrives_as_a_server_sent_event(
    api: httpx.Client, server: ServerProcess
) -> None:
    assert api.put(job_path("sse1.old"), json={"execute_at": FUTURE}).status_code == 200
    params = {"prefix": "sse1.", "snapshot": "true"}
    with (
        api.stream("GET", "/events", params=params) as stream,
        api.stream("GET", "/events", params={"prefix": "sse1.n"}) as second,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = read_events(stream.iter_lines())
        kind, snapshot = next(events)
        assert (kind, snapshot["job"]["id"], snapshot["snapshot"]) == ("planned", "sse1.old", True)
        assert next(events)[0] == "ready"  # registered: nothing set from now on is missed
        others = read_events(second.iter_lines())
        assert next(others)[0] == "ready"  # no snapshot asked: ready at once
        with kcp(server) as client:
            assert client.request("SET", "sse1.new", "2030-01-01 00:00:00", "hello") == ["OK"]
            assert client.request("SET", "other.new", "2030-01-01 00:00:00") == ["OK"]
            assert client.request("UNSET", "sse1.new") == ["OK"]
        kind, event = next(events)
        assert kind == "planned" and event["type"] == "planned" and not event["snapshot"]
        assert event["job"]["id"] == "sse1.new"
        assert base64.b64decode(event["job"]["payload"]) == b"hello"
        kind, event = next(events)
        assert (kind, event["job"]["id"]) == ("deleted", "sse1.new")  # other.new is not watched
        assert [(kind, event["job"]["id"]) for kind, event in (next(others), next(others))] == [
            ("planned", "sse1.new"),
            ("deleted", "sse1.new"),
        ]


def test_a_snapshot_of_many_pages_streams_each_job_once(
    api: httpx.Client, server: ServerProcess
) -> None:
    """10,000 jobs: three of the actor's snapshot pages (one actor step each), in id
    order, each job once, then "ready"."""
    ids = [f"sse2.{i:05d}" for i in range(10_000)]
    with kcp(server) as client:
        answers = client.pipeline([("SET", job_id, "2030-01-01 00:00:00") for job_id in ids])
    assert all(answer == ["OK"] for answer in answers)
    params = {"prefix": "sse2.", "snapshot": "true"}
    with api.stream("GET", "/events", params=params) as stream:
        streamed = []
        for kind, event in read_events(stream.iter_lines()):
            if kind == "ready":
                break
            assert (kind, event["snapshot"]) == ("planned", True)
            streamed.append(event["job"]["id"])
    assert streamed == ids


def test_a_watcher_that_stops_reading_is_dropped_not_buffered(
    api: httpx.Client, server: ServerProcess, base: str
) -> None:
    port = server.metrics_port
    assert port is not None
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(
        f"GET /api/v1/events?prefix=slow1. HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ADMIN}\r\n\r\n".encode()
    )
    head = b""
    while b"event: ready" not in head:
        head += stuck.recv(4096)
    # Far more changes than the watch may hold (WATCH_BUFFER) while nobody reads them.
    payload = b64(b"p" * 30_000)
    with httpx.Client(base_url=f"{base}/api/v1", headers=api.headers, timeout=10) as writer:
        for n in range(40):
            path = job_path(f"slow1.{n}")
            assert writer.put(path, json={"execute_at": FUTURE, "payload": payload}).is_success
    wait_for(lambda: server.events("http watch fell behind"))
    stuck.settimeout(10)
    received = 0
    try:
        while chunk := stuck.recv(1 << 16):  # what was in flight, then the end
            received += len(chunk)
    except ConnectionResetError:
        pass
    stuck.close()
    assert received < 40 * 40_000  # the stream was cut, not delivered in full
    assert api.get("/info").status_code == 200  # the server goes on


# -- the contract -----------------------------------------------------------------------------


def test_openapi_lists_exactly_the_routes_served(api: httpx.Client) -> None:
    from starlette.routing import Route

    from kairoi_trio.protocols.http.api import Api

    document = api.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    routes = Api(None, None, max_body_bytes=1, watch_buffer_bytes=1).routes()  # type: ignore[arg-type]
    served = {("GET", "/openapi.json")}
    for route in routes:
        assert isinstance(route, Route)
        served |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
    assert documented == served

    # And the real server answers each documented operation with a documented status.
    for method, path in sorted(documented - {("GET", "/events")}):
        url = path.replace("{id}", quote("oa1/none", safe=""))
        response = api.request(method, url, json={} if method == "PUT" else None)
        operation = document["paths"][path][method.lower()]
        assert str(response.status_code) in operation["responses"], (method, path, response.text)
        if response.status_code >= 400:
            error_of(response)


def test_stop_ends_event_streams_with_a_last_event(make_server) -> None:
    server = make_server(CONFIG)
    url = f"http://127.0.0.1:{server.metrics_port}/api/v1/events"
    headers = {"authorization": f"Bearer {READ}"}
    with httpx.stream("GET", url, headers=headers, timeout=10) as stream:
        events = read_events(stream.iter_lines())
        assert next(events)[0] == "ready"
        assert server.stop() == 0
        kind, last = next(events)
        assert kind == "error"
        assert last == {"error": {"code": "unavailable", "message": "server is shutting down"}}
        assert list(events) == []  # then the stream ends, cleanly


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
