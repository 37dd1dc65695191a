"""KCP SCHEDULE against a real server process: recurring jobs as a KCP client makes them.

Most tests share the module's server (`shared_server`, tests/e2e/conftest.py),
each with job ids of its own (`prefix`); a test that configures its server, or
leaves a job running every second, starts a fresh one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

pytestmark = pytest.mark.backends("log", "postgres")

# 2099-01-01 is a Thursday; Paris is at UTC+1 in winter.
START = "2099-01-01 00:00:00"
FIRST = "2099-01-01 08:00:00"  # 09:00 in Paris


def script(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    return str(path)


def test_schedule_answers_the_next_time_and_get_shows_the_schedule(
    shared_kcp: KcpClient, prefix: str
) -> None:
    kcp = shared_kcp
    answer = kcp.request(
        "SCHEDULE",
        f"{prefix}app.report",
        "0 9 * * *",
        "tz=Europe/Paris",
        f"start={START}",
        "end=2099-12-31 23:59:59",
        "max_runs=5",
        "misfire=skip",
        "catchup_window=1h30m",
        "overlap=buffer_one",
        "payload=weekly report",
    )
    assert answer == ["OK", FIRST]
    assert kcp.request("GET", f"{prefix}app.report") == [
        "OK",
        "planned",
        FIRST,
        "weekly report",
        "0 9 * * *",
        "tz=Europe/Paris",
        "runs=0",
        "skipped=0",
        "paused=false",
        "misfire=skip",
        "overlap=buffer_one",
        f"scheduled_at={FIRST}",
        f"start={START}",
        "end=2099-12-31 23:59:59",
        "max_runs=5",
        "catchup_window=1h30m",
    ]
    # the same request on the wire, as a client would type it
    kcp.send_raw(
        b"A SCHEDULE "
        + prefix.encode()
        + b'app.weekly "0 9 * * 1-5" tz=Europe/Paris "start=2099-01-02 00:00:00"\n'
    )
    reply = kcp.read_message()
    assert (reply.id, reply.args) == ("A", ["OK", "2099-01-02 08:00:00"])  # a Friday


def test_a_job_without_payload_still_shows_an_empty_one(shared_kcp: KcpClient, prefix: str) -> None:
    kcp = shared_kcp
    assert kcp.request("SCHEDULE", f"{prefix}app.t", "@daily", f"start={START}") == [
        "OK",
        "2099-01-01 00:00:00",
    ]
    answer = kcp.request("GET", f"{prefix}app.t")
    assert answer[:5] == ["OK", "planned", "2099-01-01 00:00:00", "", "@daily"]
    assert "tz=UTC" in answer and "misfire=coalesce" in answer and "overlap=skip" in answer


def test_an_interval_without_start_begins_one_interval_later(
    shared_kcp: KcpClient, prefix: str
) -> None:
    kcp = shared_kcp
    before = datetime.now(UTC).replace(tzinfo=None)
    ok, first = kcp.request("SCHEDULE", f"{prefix}app.i", "PT1H")
    after = datetime.now(UTC).replace(tzinfo=None)
    assert ok == "OK"
    planned = datetime.strptime(first, "%Y-%m-%d %H:%M:%S.%f")
    assert before + timedelta(hours=1) - timedelta(seconds=1) <= planned
    assert planned <= after + timedelta(hours=1) + timedelta(seconds=1)


def test_mistakes_answer_error_with_the_reason_and_store_nothing(
    shared_kcp: KcpClient, prefix: str
) -> None:
    kcp = shared_kcp
    cases = {
        ("SCHEDULE", f"{prefix}app.x", "61 * * * *"): "bad cron expression '61 * * * *'",
        (
            "SCHEDULE",
            f"{prefix}app.x",
            "@daily",
            "tz=Mars/Olympus",
        ): "unknown time zone 'Mars/Olympus'",
        ("SCHEDULE", f"{prefix}app.x", "@daily", "color=red"): "unknown option 'color'",
        ("SCHEDULE", f"{prefix}app.x", "@daily", "misfire=later"): "must be coalesce, all or skip",
        ("SCHEDULE", f"{prefix}app.x", "every 0s"): "at least 1 second",
        ("SCHEDULE", f"{prefix}app.x", "*/5", "*", "*", "*", "*"): "quote a schedule",
        ("SCHEDULE", f"{prefix}app.x"): "SCHEDULE takes <job_id> <schedule>",
        # a day no month has is a bad expression already
        (
            "SCHEDULE",
            f"{prefix}app.x",
            "0 0 30 2 *",
        ): "bad cron expression '0 0 30 2 *': Bad day-of-month",
        # schedules without any occurrence: the server's own check
        (
            "SCHEDULE",
            f"{prefix}app.x",
            "0 0 29 2 *",
            "start=2097-03-01 00:00:00",
            "end=2099-12-31 00:00:00",
        ): "has no occurrence",
        (
            "SCHEDULE",
            f"{prefix}app.x",
            "@daily",
            "start=2099-01-01 00:00:01",
            "end=2099-01-01 23:59:59",
        ): "has no occurrence",
    }
    for request, reason in cases.items():
        answer = kcp.request(*request)
        assert answer[0] == "ERROR" and reason in answer[1], (request, answer)
    assert kcp.request("GET", f"{prefix}app.x") == ["ERROR", f"no job {prefix}app.x"]
    # a start or end cut in two by a missing quote
    kcp.send_raw(b"B SCHEDULE " + prefix.encode() + b"app.x @daily start=2099-01-01 00:00:00\n")
    reply = kcp.read_message()
    assert reply.args[0] == "ERROR" and '"start=2099-01-01 00:00:00"' in reply.args[1]


def test_set_makes_it_one_shot_and_unset_deletes_it(shared_kcp: KcpClient, prefix: str) -> None:
    kcp = shared_kcp
    assert (
        kcp.request("SCHEDULE", f"{prefix}app.r", "@hourly", f"start={START}", "payload=p")[0]
        == "OK"
    )
    assert len(kcp.request("GET", f"{prefix}app.r")) > 4
    assert kcp.request("SET", f"{prefix}app.r", "2099-06-01 12:00:00") == ["OK"]
    assert kcp.request("GET", f"{prefix}app.r") == ["OK", "planned", "2099-06-01 12:00:00"]
    assert kcp.request("SET", f"{prefix}app.r", "2099-06-01 12:00:00", "again") == ["OK"]
    assert kcp.request("GET", f"{prefix}app.r") == ["OK", "planned", "2099-06-01 12:00:00", "again"]

    assert kcp.request("SCHEDULE", f"{prefix}app.r", "@hourly", f"start={START}") == ["OK", START]
    assert kcp.request("UNSET", f"{prefix}app.r") == ["OK"]
    assert kcp.request("GET", f"{prefix}app.r") == ["ERROR", f"no job {prefix}app.r"]


def test_a_read_token_may_not_schedule(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(
        '[auth]\ntokens = ["adm-1"]\nclient_tokens = ["cli-1"]\nread_tokens = ["rd-1"]'
    )
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SCHEDULE", "app.s", "@daily")[1].startswith("authentication required")
        assert kcp.request("AUTH", "rd-1") == ["OK"]
        assert kcp.request("SCHEDULE", "app.s", "@daily") == [
            "ERROR",
            "permission denied: a read token may not schedule jobs (needs a client token)",
        ]
        assert kcp.request("GET", "app.s") == ["ERROR", "no job app.s"]
        assert kcp.request("AUTH", "cli-1") == ["OK"]
        assert kcp.request("SCHEDULE", "app.s", "@daily", f"start={START}") == ["OK", START]


def test_every_second_runs_about_once_a_second(kcp: KcpClient, tmp_path: Path) -> None:
    out = tmp_path / "runs.txt"
    run = script(tmp_path, "tick.sh", f'echo "$KAIROI_SCHEDULED_AT $1" >> {out}')
    assert kcp.request("RULE", "SET", "r", "app.", "shell", run) == ["OK"]
    start = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0)
    started = time.monotonic()
    answer = kcp.request("SCHEDULE", "app.tick", "every 1s", f"start={start:%Y-%m-%d %H:%M:%S}")
    assert answer == ["OK", f"{start:%Y-%m-%d %H:%M:%S}"]

    def lines() -> list[str]:
        return out.read_text().splitlines() if out.exists() else []

    wait_for(lambda: len(lines()) >= 3, timeout=4.5)
    assert time.monotonic() - started < 5.0
    runs = lines()
    # each run is one occurrence: start + k seconds, in order, none twice
    times = [line.split(" ")[0] for line in runs]
    assert all(line.endswith(" app.tick") for line in runs), runs
    moments = [datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) for t in times]
    assert moments == sorted(set(moments)), times
    assert all(m.microsecond == 0 and m >= start for m in moments), times
    assert moments[0] == start

    def after_three_runs() -> list[str] | None:
        answer = kcp.request("GET", "app.tick")
        runs_field = next(arg for arg in answer if arg.startswith("runs="))
        return answer if int(runs_field.removeprefix("runs=")) >= 3 else None

    # The script writes its line before it exits; the run counts once its outcome is
    # recorded, a moment later.
    answer = wait_for(after_three_runs, timeout=5)
    assert "last_outcome=exit status 0" in answer
