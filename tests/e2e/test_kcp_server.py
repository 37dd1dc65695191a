"""The legacy text protocol against a real server process, as Kairoi clients use it.

Most tests share the module's server (`shared_server`, tests/e2e/conftest.py),
each with ids of its own (`prefix`); a test that configures, stops or floods
its server starts a fresh one.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.waiting import wait_for

pytestmark = pytest.mark.backends("log", "postgres")

PAST = "2020-05-26 22:26:18"
FUTURE = "2099-01-01 00:00:00"


def at(delta_s: float) -> str:
    """A KCP time `delta_s` seconds from now, with microseconds."""
    moment = datetime.now(UTC) + timedelta(seconds=delta_s)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def script(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    return str(path)


def status_of(kcp: KcpClient, job_id: str) -> str:
    response = kcp.request("GET", job_id)
    return response[1] if response[0] == "OK" else "missing"


def test_ping_and_version(shared_kcp):
    kcp = shared_kcp
    assert kcp.request("PING") == ["OK", "PONG"]
    ok, version = kcp.request("VERSION")
    assert ok == "OK" and version


def test_pipelined_sets_are_answered_in_order_and_stored(shared_kcp, prefix):
    kcp = shared_kcp
    requests = [("SET", f"{prefix}app.job.{i}", FUTURE) for i in range(2000)]
    assert kcp.pipeline(requests) == [["OK"]] * 2000
    assert kcp.request("GET", f"{prefix}app.job.1999") == ["OK", "planned", FUTURE]


def test_spec_examples_parse_over_the_wire(shared_kcp, prefix):
    kcp = shared_kcp
    p = prefix.encode()
    kcp.send_raw(b'    Id   VERSION toto   32t\\ata titi 111   \n"123" "UNSET" ' + p + b"x\n")
    first = kcp.read_message()
    assert first.id == "Id" and first.args[0] == "ERROR"  # VERSION takes no argument
    second = kcp.read_message()
    assert (second.id, second.args) == ("123", ["ERROR", f"no job {prefix}x"])
    kcp.send_raw(b"A SET " + p + b'app.domain.example_job.0 "2020-05-26 22:26:18"\n')
    assert kcp.read_message().args == ["OK"]
    # A universal string spanning lines is one argument.
    kcp.send_raw(b'B SET "' + p + b'multi\nline" "2099-01-01 00:00:00"\n')
    assert kcp.read_message().args == ["OK"]
    assert kcp.request("GET", f"{prefix}multi\nline") == ["OK", "planned", FUTURE]


def test_fractional_seconds_and_payload_round_trip(shared_kcp, prefix):
    kcp = shared_kcp
    job = f"{prefix}app.p"
    assert kcp.request("SET", job, "2099-01-01 00:00:00.000250", "hello world") == ["OK"]
    assert kcp.request("GET", job) == [
        "OK",
        "planned",
        "2099-01-01 00:00:00.000250",
        "hello world",
    ]


def test_unset_and_rules_crud(shared_kcp, prefix):
    kcp, p = shared_kcp, prefix
    assert kcp.request("SET", f"{p}app.u", FUTURE) == ["OK"]
    assert kcp.request("UNSET", f"{p}app.u") == ["OK"]
    assert kcp.request("GET", f"{p}app.u")[0] == "ERROR"
    assert kcp.request("UNSET", f"{p}app.u")[0] == "ERROR"
    assert kcp.request("RULE", "SET", f"{p}r1", f"{p}app.", "shell", "run.sh") == ["OK"]
    assert kcp.request("RULE", "GET", f"{p}r1") == ["OK", f"{p}app.", "shell", "run.sh"]
    assert kcp.request(
        "RULE", "SET", f"{p}r2", f"{p}q.", "amqp", "amqp://guest:guest@localhost:5672/", "ex", "rk"
    ) == ["OK"]
    assert kcp.request("RULE", "GET", f"{p}r2") == [
        "OK",
        f"{p}q.",
        "amqp",
        "amqp://guest:guest@localhost:5672/",
        "ex",
        "rk",
    ]
    assert kcp.request("RULE", "UNSET", f"{p}r1") == ["OK"]
    assert kcp.request("RULE", "GET", f"{p}r1")[0] == "ERROR"


def test_bad_requests_get_a_reason_and_store_nothing(shared_kcp, prefix):
    kcp, p = shared_kcp, prefix
    cases = {
        ("SET", f"{p}app.x"): "SET takes",
        ("SET", f"{p}app.x", "2020-02-30 10:00:00"): "invalid date",
        ("SET", f"{p}app.x", "tomorrow"): "invalid time",
        ("SET", "", FUTURE): "empty",
        ("FOO",): "unknown instruction FOO",
        ("RULE", "SET", f"{p}r", f"{p}app.", "ftp", "x"): "unknown runner",
        ("RULE", "SET", f"{p}r", f"{p}app.", "amqp", "amqp://h/"): "amqp takes",
        ("RULE", "SET", f"{p}r", f"{p}app.", "amqp", "nonsense", "ex", "rk"): "amqp dsn",
    }
    for request, reason in cases.items():
        response = kcp.request(*request)
        assert response[0] == "ERROR" and reason in response[1], (request, response)
    assert kcp.request("GET", f"{p}app.x")[0] == "ERROR"
    assert kcp.request("RULE", "GET", f"{p}r")[0] == "ERROR"


def test_malformed_lines_do_not_break_the_connection(shared_kcp):
    kcp = shared_kcp
    kcp.send_raw(b"lonely\n")
    assert kcp.read_message().args[0] == "ERROR"
    kcp.send_raw(b'X SET "bad \\q escape" now\n')
    bad = kcp.read_message()
    assert bad.id == "X" and bad.args[0] == "ERROR"
    kcp.send_raw(b"\xff\xfe PING\n")
    invalid = kcp.read_message()
    assert invalid.id == "*" and invalid.args[0] == "ERROR"
    assert kcp.request("PING") == ["OK", "PONG"]


def test_oversize_message_gets_error_then_close(make_server):
    server = make_server("[controller]\nmax_message_bytes = 1024")
    with KcpClient(server.kcp_port) as kcp:
        kcp.send_raw(b"1 SET " + b"x" * 5000 + b" now\n")
        response = kcp.read_message()
        assert response.id == "*" and response.args[0] == "ERROR" and "1024" in response.args[1]
        assert kcp.sock.recv(100) == b""  # closed
    with KcpClient(server.kcp_port) as other:
        assert other.request("PING") == ["OK", "PONG"]


def test_client_that_never_reads_does_not_grow_server_memory(shared_server):
    server = shared_server

    def rss_kib() -> int:
        for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    before = rss_kib()
    flood = socket.create_connection(("127.0.0.1", server.kcp_port))
    flood.setblocking(False)
    chunk = b"1 PING\n" * 10_000
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sent < 200 << 20:
        try:
            sent += flood.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    # The server stopped reading long before 200 MiB: its memory stays bounded.
    assert sent < 200 << 20
    assert rss_kib() - before < 100 << 10
    with KcpClient(server.kcp_port) as other:
        assert other.request("PING") == ["OK", "PONG"]
    flood.close()


def test_shell_rule_runs_script_with_job_id_and_environment(shared_kcp, prefix, tmp_path):
    kcp, p = shared_kcp, prefix
    out = tmp_path / "out.txt"
    run = script(
        tmp_path,
        "job.sh",
        f'echo "$1 $KAIROI_JOB_ID $(cat "$KAIROI_PAYLOAD_FILE")" > {out}',
    )
    assert kcp.request("RULE", "SET", f"{p}rule.app", f"{p}app.", "shell", run) == ["OK"]
    assert kcp.request("SET", f"{p}app.job.0", PAST, "the payload") == ["OK"]
    wait_for(lambda: status_of(kcp, f"{p}app.job.0") == "executed")
    assert out.read_text() == f"{p}app.job.0 {p}app.job.0 the payload\n"


def test_longest_prefix_wins_and_unmatched_jobs_fail(shared_kcp, prefix, tmp_path):
    kcp, p = shared_kcp, prefix
    out = tmp_path / "out.txt"
    general = script(tmp_path, "general.sh", f'echo "general $1" >> {out}')
    specific = script(tmp_path, "specific.sh", f'echo "specific $1" >> {out}')
    assert kcp.request("RULE", "SET", f"{p}a", f"{p}app.", "shell", general) == ["OK"]
    assert kcp.request("RULE", "SET", f"{p}b", f"{p}app.invoice.", "shell", specific) == ["OK"]
    for job in ("app.invoice.1", "app.other", "appx", "other"):
        assert kcp.request("SET", f"{p}{job}", PAST) == ["OK"]
    wait_for(lambda: status_of(kcp, f"{p}app.other") == "executed")
    wait_for(lambda: status_of(kcp, f"{p}app.invoice.1") == "executed")
    assert status_of(kcp, f"{p}appx") == "failed"  # "app." does not match "appx"
    assert status_of(kcp, f"{p}other") == "failed"
    assert sorted(out.read_text().splitlines()) == [
        f"general {p}app.other",
        f"specific {p}app.invoice.1",
    ]


def test_failed_script_marks_failed_and_reset_plans_again(shared_kcp, prefix, tmp_path):
    kcp, job = shared_kcp, f"{prefix}app.flaky"
    marker = tmp_path / "second"
    run = script(tmp_path, "flaky.sh", f"if [ -e {marker} ]; then exit 0; fi; exit 3")
    assert kcp.request("RULE", "SET", f"{prefix}r", f"{prefix}app.", "shell", run) == ["OK"]
    assert kcp.request("SET", job, PAST) == ["OK"]
    wait_for(lambda: status_of(kcp, job) == "failed")
    marker.touch()
    assert kcp.request("SET", job, PAST) == ["OK"]
    wait_for(lambda: status_of(kcp, job) == "executed")


def test_set_is_refused_while_the_job_runs(shared_kcp, prefix, tmp_path):
    kcp, job = shared_kcp, f"{prefix}app.slow"
    started, release = tmp_path / "started", tmp_path / "release"
    run = script(
        tmp_path, "slow.sh", f"touch {started}; while [ ! -e {release} ]; do sleep 0.05; done"
    )
    assert kcp.request("RULE", "SET", f"{prefix}r", f"{prefix}app.", "shell", run) == ["OK"]
    assert kcp.request("SET", job, PAST) == ["OK"]
    wait_for(started.exists)
    assert status_of(kcp, job) == "triggered"
    refused = kcp.request("SET", job, FUTURE)
    assert refused[0] == "ERROR" and "triggered" in refused[1]
    assert kcp.request("UNSET", job)[0] == "ERROR"
    release.touch()
    wait_for(lambda: status_of(kcp, job) == "executed")
    assert kcp.request("SET", job, FUTURE) == ["OK"]


def test_due_jobs_run_in_time_order(make_server, tmp_path):
    server = make_server("[runners.shell]\nconcurrency = 1")
    out = tmp_path / "order.txt"
    run = script(tmp_path, "order.sh", f'echo "$1" >> {out}')
    with KcpClient(server.kcp_port) as kcp:
        # Set the jobs in the future first so they all become due together.
        base = datetime.now(UTC) + timedelta(seconds=1.5)
        order = [7, 2, 9, 0, 5, 3, 8, 1, 6, 4]
        requests = [("RULE", "SET", "r", "job.", "shell", run)]
        for i in order:
            moment = base + timedelta(milliseconds=i)
            requests.append(("SET", f"job.{i}", moment.strftime("%Y-%m-%d %H:%M:%S.%f")))
        assert all(r == ["OK"] for r in kcp.pipeline(requests))
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 10)
    assert out.read_text().splitlines() == [f"job.{i}" for i in range(10)]


def test_future_job_fires_close_to_its_time(shared_kcp, prefix, tmp_path):
    kcp, job = shared_kcp, f"{prefix}app.soon"
    out = tmp_path / "when.txt"
    run = script(tmp_path, "when.sh", f"date +%s.%N > {out}")
    assert kcp.request("RULE", "SET", f"{prefix}r", f"{prefix}app.", "shell", run) == ["OK"]
    due = time.time() + 1.0
    assert kcp.request(
        "SET", job, datetime.fromtimestamp(due, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    ) == ["OK"]
    assert status_of(kcp, job) == "planned"
    wait_for(lambda: out.exists() and out.read_text().endswith("\n"))
    ran = float(out.read_text())
    assert due <= ran < due + 2.0  # not early; late only by process start-up


def test_burst_of_due_jobs_all_execute(make_server, tmp_path):
    server = make_server("[runners.shell]\nconcurrency = 8\nqueue_size = 50")
    out_dir = tmp_path / "done"
    out_dir.mkdir()
    run = script(tmp_path, "mark.sh", f'touch "{out_dir}/$1"')
    with KcpClient(server.kcp_port) as kcp:
        requests = [("RULE", "SET", "r", "burst.", "shell", run)]
        requests += [("SET", f"burst.{i}", PAST) for i in range(400)]
        assert all(r == ["OK"] for r in kcp.pipeline(requests))
        wait_for(lambda: len(os.listdir(out_dir)) == 400, timeout=60)
        wait_for(lambda: all(status_of(kcp, f"burst.{i}") == "executed" for i in range(0, 400, 37)))


def test_auth_tokens_guard_instructions(make_server):
    server = make_server('[auth]\ntokens = ["s3cret"]')
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("PING") == ["OK", "PONG"]
        denied = kcp.request("SET", "app.a", FUTURE)
        assert denied[0] == "ERROR" and "AUTH" in denied[1]
        assert kcp.request("AUTH", "wrong")[0] == "ERROR"
        assert kcp.request("AUTH", "s3cret") == ["OK"]
        assert kcp.request("SET", "app.a", FUTURE) == ["OK"]


def test_sigterm_stops_cleanly_with_status_zero(server, kcp):
    assert kcp.request("SET", "app.a", FUTURE) == ["OK"]
    assert server.stop() == 0
    assert not [e for e in server.events() if e.get("level") in ("error", "critical")]


def test_configured_default_policy_retries_kcp_rules(make_server, tmp_path):
    server = make_server("[policy]\nmax_attempts = 3\nbackoff_initial_s = 0.1\nbackoff_max_s = 0.2")
    runs = tmp_path / "runs.txt"
    run = script(tmp_path, "flaky.sh", f'echo "$1" >> {runs}; [ "$(wc -l < {runs})" -ge 3 ]')
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", run) == ["OK"]
        assert kcp.request("SET", "app.retry", PAST) == ["OK"]
        wait_for(lambda: status_of(kcp, "app.retry") == "executed")
    assert runs.read_text().splitlines() == ["app.retry"] * 3
    runs = server.wait_events("job run", lambda e: e["job"] == "app.retry", count=3)
    outcomes = [e["outcome"] for e in runs]
    assert outcomes == ["exit status 1", "exit status 1", "exit status 0"]


def test_rule_timeout_kills_the_run_and_fails_the_job(make_server, tmp_path):
    server = make_server("[policy]\ntimeout_s = 0.5")
    pid_file = tmp_path / "pid"
    run = script(tmp_path, "hang.sh", f"echo $$ > {pid_file}; sleep 30")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", run) == ["OK"]
        assert kcp.request("SET", "app.hang", PAST) == ["OK"]
        wait_for(lambda: status_of(kcp, "app.hang") == "failed")
    runs = server.wait_events("job run", lambda e: e["job"] == "app.hang")
    outcome = [e["outcome"] for e in runs]
    assert outcome == ["timed out after 0.5s"]
    pid = int(pid_file.read_text())
    wait_for(
        lambda: (
            not os.path.exists(f"/proc/{pid}")
            or "zombie" in open(f"/proc/{pid}/status").read().lower()
        )
    )


def test_connections_beyond_the_limit_are_refused_with_a_reason(make_server):
    server = make_server("[controller]\nmax_connections = 2")
    first, second = KcpClient(server.kcp_port), KcpClient(server.kcp_port)
    assert first.request("PING") == ["OK", "PONG"] and second.request("PING") == ["OK", "PONG"]
    with KcpClient(server.kcp_port) as third:
        refused = third.read_message()
        assert (refused.id, refused.args) == ("*", ["ERROR", "too many connections"])
    first.close()
    wait_for(lambda: _ping_works(server.kcp_port))
    second.close()


def _ping_works(port: int) -> bool:
    with KcpClient(port) as client:
        try:
            return client.request("PING") == ["OK", "PONG"]
        except (AssertionError, ConnectionError):
            return False


def test_idle_connections_are_closed_with_a_reason(make_server):
    server = make_server("[controller]\nidle_timeout_s = 0.3")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("PING") == ["OK", "PONG"]
        closing = kcp.read_message()  # after 0.3 s of silence
        assert (closing.id, closing.args) == ("*", ["ERROR", "idle timeout"])
        assert kcp.sock.recv(10) == b""
