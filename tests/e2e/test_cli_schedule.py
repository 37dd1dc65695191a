"""`kairoi-trio job schedule/pause/resume/run-now/next`, run as a user runs them.

The first test runs each command as a `python -m kairoi_trio` process talking
gRPC to a real server process (helpers of test_grpc_cli.py's kind); the others
call the same `main` in this process (a new process costs a second per command,
the suite's time budget is 10 minutes), still against the real server: the
module's shared one (`shared_server`, tests/e2e/conftest.py), each test with
job and rule ids of its own (`prefix`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi_trio.cli import main

pytestmark = pytest.mark.backends("log", "postgres")


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The command's result, run by `main` in this process."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*args, "--server", f"127.0.0.1:{server.grpc_port}"])
        except SystemExit as exited:
            code = exited.code
    assert not isinstance(code, str), code  # main returns or exits with a status number
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def cli_process(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The command's result, run as a user runs it: a process of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("KAIROI_SERVER", "KAIROI_TOKEN")}
    env.update(KAIROI_SERVER=f"127.0.0.1:{server.grpc_port}", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def ok(server: ServerProcess, *args: str) -> str:
    done = cli(server, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def cli_json(server: ServerProcess, *args: str) -> dict:
    document = json.loads(ok(server, *args, "--json"))
    assert isinstance(document, dict)
    return document


# 2031-03-30 is the last Sunday of March: Paris moves from UTC+1 to UTC+2.
PARIS = ("--tz", "Europe/Paris", "--start", "2031-03-28T00:00:00Z")


def test_schedule_then_get_shows_the_schedule(shared_server: ServerProcess, prefix: str) -> None:
    server = shared_server
    scheduled = cli_process(
        server, "job", "schedule", f"{prefix}app.r", "0 9 * * *", *PARIS, "--payload", "hi"
    )
    assert scheduled.returncode == 0 and scheduled.stdout == "OK\n", scheduled.stderr
    assert cli_process(server, "job", "get", f"{prefix}app.r").stdout == (
        f"{prefix}app.r\tplanned\t2031-03-28 08:00:00\tattempts=0"
        "\tschedule=0 9 * * *\ttz=Europe/Paris"
        "\truns=0\tscheduled_at=2031-03-28 08:00:00\tstart=2031-03-28 00:00:00\tpayload=hi\n"
    )
    # A one-shot job's line is unchanged.
    ok(server, "job", "set", f"{prefix}app.once", "2031-01-01 00:00:00")
    assert ok(server, "job", "get", f"{prefix}app.once") == (
        f"{prefix}app.once\tplanned\t2031-01-01 00:00:00\tattempts=0\n"
    )
    assert cli_json(server, "job", "get", f"{prefix}app.once")["schedule"] is None


def test_every_option_reaches_the_server(shared_server: ServerProcess, prefix: str) -> None:
    server = shared_server
    job = cli_json(
        server,
        *("job", "schedule", f"{prefix}app.all", "*/15 * * * *", "--start", "2031-03-28 00:00:00"),
        *("--end", "2031-12-31T00:00:00Z", "--max-runs", "3", "--jitter", "1.5"),
        *("--misfire", "all", "--catchup-window", "1h30m", "--overlap", "buffer_one"),
    )
    assert job["id"] == f"{prefix}app.all" and job["status"] == "planned"
    assert job["schedule"] == {
        "expression": "*/15 * * * *",
        "time_zone": "UTC",
        "start": "2031-03-28T00:00:00.000000Z",
        "end": "2031-12-31T00:00:00.000000Z",
        "max_runs": 3,
        "jitter_s": 1.5,
        "misfire": "all",
        "catchup_window_s": 5400.0,
        "overlap": "buffer_one",
        "paused": False,
        "runs": 0,
        "skipped": 0,
        "scheduled_at": "2031-03-28T00:00:00.000000Z",
    }
    assert cli_json(server, "job", "get", f"{prefix}app.all") == job
    line = ok(server, "job", "get", f"{prefix}app.all").rstrip("\n").split("\t")
    assert line[4:] == [
        "schedule=*/15 * * * *",
        "tz=UTC",
        "runs=0",
        "scheduled_at=2031-03-28 00:00:00",
        "start=2031-03-28 00:00:00",
        "end=2031-12-31 00:00:00",
        "max_runs=3",
        "jitter=1.5s",
        "misfire=all",
        "catchup_window=5400s",
        "overlap=buffer_one",
    ]


def test_next_prints_utc_and_the_schedules_zone(shared_server: ServerProcess, prefix: str) -> None:
    server = shared_server
    ok(server, "job", "schedule", f"{prefix}app.r", "0 9 * * *", *PARIS)
    assert ok(server, "job", "next", f"{prefix}app.r", "-n", "5") == (
        "2031-03-28T08:00:00Z (2031-03-28T09:00:00+01:00 Europe/Paris)\n"
        "2031-03-29T08:00:00Z (2031-03-29T09:00:00+01:00 Europe/Paris)\n"
        "2031-03-30T07:00:00Z (2031-03-30T09:00:00+02:00 Europe/Paris)\n"
        "2031-03-31T07:00:00Z (2031-03-31T09:00:00+02:00 Europe/Paris)\n"
        "2031-04-01T07:00:00Z (2031-04-01T09:00:00+02:00 Europe/Paris)\n"
    )
    assert len(ok(server, "job", "next", f"{prefix}app.r").splitlines()) == 5  # the default
    document = cli_json(server, "job", "next", f"{prefix}app.r", "-n", "2")
    assert document == {
        "id": f"{prefix}app.r",
        "time_zone": "Europe/Paris",
        "occurrences": [
            {"at": "2031-03-28T08:00:00.000000Z", "local": "2031-03-28T09:00:00+01:00"},
            {"at": "2031-03-29T08:00:00.000000Z", "local": "2031-03-29T09:00:00+01:00"},
        ],
    }


def test_pause_resume_and_run_now(
    shared_server: ServerProcess, prefix: str, tmp_path: Path
) -> None:
    server = shared_server
    runs = tmp_path / "runs.txt"
    script = tmp_path / "record.sh"
    script.write_text(f'echo "$1" >> {runs}\n')
    ok(server, "rule", "set", f"{prefix}r", f"{prefix}app.", "shell", str(script))
    ok(server, "job", "schedule", f"{prefix}app.h", "every 1h")
    planned = cli_json(server, "job", "get", f"{prefix}app.h")

    assert ok(server, "job", "pause", f"{prefix}app.h") == "OK\n"
    assert "\tpaused=true" in ok(server, "job", "get", f"{prefix}app.h")
    assert cli_json(server, "job", "resume", f"{prefix}app.h")["schedule"]["paused"] is False
    assert "paused" not in ok(server, "job", "get", f"{prefix}app.h")
    assert cli_json(server, "job", "pause", f"{prefix}app.h")["schedule"]["paused"] is True
    assert ok(server, "job", "resume", f"{prefix}app.h") == "OK\n"

    assert ok(server, "job", "run-now", f"{prefix}app.h") == "OK\n"
    wait_for(lambda: runs.exists() and runs.read_text() == f"{prefix}app.h\n")
    after = wait_for(
        lambda: (
            (job := cli_json(server, "job", "get", f"{prefix}app.h"))["schedule"]["runs"] == 1
            and job["status"] == "planned"
            and job
        )
    )
    assert after["execute_at"] == planned["execute_at"]  # the schedule goes on as planned
    job = cli_json(server, "job", "run-now", f"{prefix}app.h")
    assert job["status"] in ("planned", "triggered")
    wait_for(lambda: runs.read_text() == f"{prefix}app.h\n{prefix}app.h\n")


def test_errors_of_the_server_are_named(shared_server: ServerProcess, prefix: str) -> None:
    server = shared_server
    bad = cli(server, "job", "schedule", f"{prefix}app.x", "61 * * * *")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("kairoi-trio: INVALID_ARGUMENT: bad cron expression '61 * * * *'")
    zone = cli(server, "job", "schedule", f"{prefix}app.x", "@daily", "--tz", "Mars/Olympus")
    assert zone.returncode == 1 and "unknown time zone 'Mars/Olympus'" in zone.stderr
    ok(server, "job", "set", f"{prefix}app.once", "2031-01-01 00:00:00")
    for args in (
        ("pause", f"{prefix}app.once"),
        ("run-now", f"{prefix}app.once"),
        ("next", f"{prefix}app.once"),
    ):
        done = cli(server, "job", *args)
        assert done.returncode == 1
        assert done.stderr.startswith("kairoi-trio: FAILED_PRECONDITION: "), done.stderr
    missing = cli(server, "job", "next", f"{prefix}app.none")
    assert missing.returncode == 1 and missing.stderr.startswith("kairoi-trio: NOT_FOUND: ")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("job", "schedule", "a", "@daily", "--misfire", "later"), "argument --misfire: invalid"),
        (("job", "schedule", "a", "@daily", "--overlap", "all"), "argument --overlap: invalid"),
        (("job", "schedule", "a", "@daily", "--max-runs", "0"), "from 1 to"),
        (("job", "schedule", "a", "@daily", "--jitter", "5x"), "invalid duration '5x'"),
        (("job", "schedule", "a", "@daily", "--jitter=-5s"), "must not be negative"),
        (("job", "schedule", "a", "@daily", "--start", "soon"), "invalid time 'soon'"),
        (("job", "schedule", "a"), "required: EXPRESSION"),
        (("job", "next", "a", "-n", "0"), "from 1 to 1000"),
        (("job", "next", "a", "-n", "1001"), "from 1 to 1000"),
    ],
)
def test_bad_input_is_a_usage_error(
    args: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--server", "127.0.0.1:1"])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and reason in stderr, stderr
