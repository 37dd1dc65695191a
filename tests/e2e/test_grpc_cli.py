"""The `kairoi-trio job/rule/watch/info` client subcommands, run as a user runs them.

Each command is a `python -m kairoi_trio` process talking gRPC to a real
server process; KCP cross-checks what reached the server.

Most tests share the module's server (`shared_server`, tests/e2e/conftest.py),
each with job and rule ids of its own (`prefix`); a test that configures its
server or reads what is global (`info` counts, a list of every rule) starts a
fresh one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi_trio.cli import main
from kairoi_trio.client_cli import SNAPSHOT_END_TEXT, add_client_commands

pytestmark = pytest.mark.backends("log", "postgres")

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def cli(
    server: ServerProcess, *args: str, stdin: bytes = b"", **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `kairoi-trio ARGS` against the server; stdin as bytes, stdout/stderr as text."""
    done = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", *args],
        input=stdin,
        capture_output=True,
        env=dict(_env(server), **env),
        timeout=60,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def cli_json(server: ServerProcess, *args: str, **kwargs: object) -> object:
    done = cli(server, *args, "--json", **kwargs)  # type: ignore[arg-type]
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _env(server: ServerProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAIROI_SERVER", "KAIROI_TOKEN")}
    return dict(env, KAIROI_SERVER=f"127.0.0.1:{server.grpc_port}", PYTHONIOENCODING="utf-8")


# -- text output ----------------------------------------------------------------------------


def test_job_and_rule_subcommands(server: ServerProcess) -> None:
    set_job = cli(server, "job", "set", "app.1", "2099-01-01 00:00:00", "--payload", "hi")
    assert (set_job.returncode, set_job.stdout) == (0, "OK\n")
    got = cli(server, "job", "get", "app.1")
    assert got.returncode == 0
    assert got.stdout == "app.1\tplanned\t2099-01-01 00:00:00\tattempts=0\tpayload=hi\n"
    assert "app.1\tplanned" in cli(server, "job", "list", "--prefix", "app.").stdout
    assert cli(server, "job", "list", "--status", "failed").stdout == ""
    assert cli(server, "rule", "set", "r", "app.", "shell", "run.sh").stdout == "OK\n"
    assert cli(server, "rule", "list").stdout == "r\tapp.\tshell\trun.sh\n"
    assert cli(server, "rule", "get", "r").stdout == "r\tapp.\tshell\trun.sh\n"
    info = cli(server, "info").stdout
    assert "jobs.planned\t1\n" in info and "rules\t1\n" in info
    assert cli(server, "job", "unset", "app.1").stdout == "OK\n"
    assert cli(server, "rule", "unset", "r").stdout == "OK\n"
    missing = cli(server, "job", "get", "app.1")
    assert missing.returncode == 1 and missing.stderr.startswith("kairoi-trio: NOT_FOUND: ")
    assert missing.stdout == ""


def test_times_in_either_form_and_payloads_from_a_file(
    shared_server: ServerProcess, prefix: str
) -> None:
    server, job = shared_server, f"{prefix}app.bin"
    # RFC 3339 with an offset is converted to UTC; the payload comes from stdin as bytes.
    done = cli(
        server,
        *("job", "set", job, "2099-01-01T10:00:00.5+01:00", "--payload-file", "-"),
        stdin=b"\xff\x00raw",
    )
    assert done.returncode == 0, done.stderr
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", job)[2] == "2099-01-01 09:00:00.500000"
    line = cli(server, "job", "get", job).stdout
    assert (
        line == f"{job}\tplanned\t2099-01-01 09:00:00.500000\tattempts=0\tpayload_base64=/wByYXc=\n"
    )


def test_text_output_keeps_one_line_per_job_whatever_the_id(
    shared_server: ServerProcess, prefix: str
) -> None:
    server, p = shared_server, prefix  # a plain prefix: [a-z0-9_.-], shown as it is
    hostile = f"{p}app.\x1b[31mred\tand\nnewline\\"
    assert cli(server, "job", "set", hostile, "2099-01-01 00:00:00").returncode == 0
    listed = cli(server, "job", "list", "--prefix", f"{p}app.").stdout
    assert listed.splitlines() == [
        f"{p}app.\\x1b[31mred\\tand\\nnewline\\\\\tplanned\t2099-01-01 00:00:00\tattempts=0"
    ]
    assert cli_json(server, "job", "get", hostile)["id"] == hostile  # type: ignore[index]


# -- --json ---------------------------------------------------------------------------------


def test_json_documents(server: ServerProcess) -> None:
    job = cli_json(server, "job", "set", "j.1", "2099-01-02 03:04:05", "--payload", "héllo")
    assert isinstance(job, dict)
    assert {k: job[k] for k in ("id", "status", "execute_at", "payload", "attempts")} == {
        "id": "j.1",
        "status": "planned",
        "execute_at": "2099-01-02T03:04:05.000000Z",
        "payload": "héllo",
        "attempts": 0,
    }
    assert job["last_outcome"] == "" and RFC3339.fullmatch(job["updated_at"])
    assert cli_json(server, "job", "get", "j.1") == job
    cli(server, "job", "set", "j.2", "0001-01-01 00:00:00", "--payload-file", "-", stdin=b"\x80")
    listed = cli_json(server, "job", "list", "--prefix", "j.")
    assert isinstance(listed, list) and [j["id"] for j in listed] == ["j.1", "j.2"]
    assert listed[1]["execute_at"] == "0001-01-01T00:00:00.000000Z"  # four-digit years
    assert listed[1]["payload_base64"] == "gA==" and "payload" not in listed[1]
    assert cli_json(server, "job", "list", "--prefix", "none.") == []
    assert cli_json(server, "job", "unset", "j.2") == {"id": "j.2", "deleted": True}

    rule = cli_json(server, "rule", "set", "r.amqp", "q.", "amqp", "amqp://h/", "ex", "key")
    assert rule == {
        "id": "r.amqp",
        "pattern": "q.",
        "runner": {"kind": "amqp", "dsn": "amqp://h/", "exchange": "ex", "routing_key": "key"},
        "policy": {
            "timeout_s": None,
            "max_attempts": 1,
            "backoff_initial_s": 1.0,
            "backoff_max_s": 300.0,
            "stale_after_s": None,
        },
    }
    assert cli_json(server, "rule", "get", "r.amqp") == rule
    assert cli_json(server, "rule", "list") == [rule]
    assert cli_json(server, "rule", "unset", "r.amqp") == {"id": "r.amqp", "deleted": True}

    info = cli_json(server, "info")
    assert isinstance(info, dict) and info["rules"] == 0
    assert info["jobs"] == {"planned": 1, "triggered": 0, "executed": 0, "failed": 0}
    assert RFC3339.fullmatch(info["started_at"]) and info["version"]


# -- rule policies --------------------------------------------------------------------------


def test_rule_set_takes_the_policy(shared_server: ServerProcess, prefix: str) -> None:
    server, rule = shared_server, f"{prefix}r"
    done = cli(
        server,
        *("rule", "set", rule, f"{prefix}app.", "http", "http://127.0.0.1:1/hook"),
        *("--timeout", "1.5", "--max-attempts", "4", "--backoff-initial", "250ms"),
        *("--backoff-max", "2m", "--stale-after", "1h"),
    )
    assert (done.returncode, done.stdout) == (0, "OK\n"), done.stderr
    assert cli_json(server, "rule", "get", rule)["policy"] == {  # type: ignore[index]
        "timeout_s": 1.5,
        "max_attempts": 4,
        "backoff_initial_s": 0.25,
        "backoff_max_s": 120.0,
        "stale_after_s": 3600.0,
    }
    assert cli(server, "rule", "get", rule).stdout == (
        f"{rule}\t{prefix}app.\thttp\thttp://127.0.0.1:1/hook\ttimeout=1.5s\tmax_attempts=4"
        "\tbackoff=0.25s..120s\tstale_after=3600s\n"
    )


def test_the_policy_set_from_the_terminal_governs_retries(
    shared_server: ServerProcess, prefix: str, tmp_path: Path
) -> None:
    server, p = shared_server, prefix
    failing = tmp_path / "fail.sh"
    failing.write_text("exit 3\n")
    policy = ("--max-attempts", "2", "--backoff-initial", "10ms", "--backoff-max", "10ms")
    rule = ("rule", "set", f"{p}r", f"{p}retry.", "shell", str(failing), *policy)
    assert cli(server, *rule).returncode == 0
    assert cli(server, "job", "set", f"{p}retry.1", "2020-01-01 00:00:00").returncode == 0
    with KcpClient(server.kcp_port) as kcp:
        wait_for(lambda: kcp.request("GET", f"{p}retry.1")[1] == "failed")
    job = cli_json(server, "job", "get", f"{p}retry.1")
    assert isinstance(job, dict) and job["attempts"] == 2 and job["last_outcome"]


# -- bad input, tokens, help --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("job", "set", "x", "2020-02-30 00:00:00"), "argument TIME: invalid date '2020-02-30'"),
        (("job", "set", "x", "tomorrow"), "argument TIME: invalid time 'tomorrow': expected"),
        (
            ("rule", "set", "r", "p.", "amqp", "amqp://h/"),
            "the amqp runner takes 3 arguments (DSN EXCHANGE ROUTING_KEY), not 1",
        ),
        (("rule", "set", "r", "p.", "shell", "a", "b"), "the shell runner takes 1 argument "),
        (("rule", "set", "r", "p.", "ftp", "x"), "argument RUNNER: invalid choice: 'ftp'"),
        (("rule", "set", "r", "p.", "shell", "a", "--timeout", "-1"), "must be more than 0"),
        (("rule", "set", "r", "p.", "shell", "a", "--timeout", "5 minutes"), "invalid duration"),
        (  # the server's bound (core/validation.py), not protobuf's 10,000 years
            ("rule", "set", "r", "p.", "shell", "a", "--stale-after", "3153600001"),
            "at most 100 years",
        ),
        (("rule", "set", "r", "p.", "shell", "a", "--max-attempts", "0"), "from 1 to"),
        (("job", "list", "--status", "done"), "argument --status: invalid choice: 'done'"),
        (("job", "get", "a\udcff"), "argument ID: 'a\\xff' is not valid UTF-8"),  # argv bytes
    ],
)
def test_bad_input_is_a_usage_error(
    args: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused while parsing, before any connection: the real entry point, in-process.
    with pytest.raises(SystemExit) as exited:
        main([*args, "--server", "127.0.0.1:1"])
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and reason in stderr, stderr


def test_tokens_from_the_option_or_the_environment(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server('[auth]\ntokens = ["s3cret"]')
    refused = cli(server, "info")
    assert refused.returncode == 1
    assert refused.stderr.startswith("kairoi-trio: UNAUTHENTICATED: ")
    assert "--token, KAIROI_TOKEN" in refused.stderr
    assert cli(server, "info", "--token", "s3cret").returncode == 0
    assert cli(server, "info", KAIROI_TOKEN="s3cret").returncode == 0
    assert cli(server, "info", "--token", "wrong", KAIROI_TOKEN="s3cret").returncode == 1


def test_an_unreachable_server_is_named(shared_server: ServerProcess) -> None:
    done = cli(shared_server, "info", "--server", "127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.startswith("kairoi-trio: UNAVAILABLE: ")
    assert "is a server listening at 127.0.0.1:1?" in done.stderr


def _client_parsers() -> list[argparse.ArgumentParser]:
    root = argparse.ArgumentParser(prog="kairoi-trio")
    add_client_commands(root.add_subparsers(dest="command"))
    found, todo = [], [root]
    while todo:
        parser = todo.pop()
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
                names = {choice.dest for choice in action._choices_actions}
                assert names == set(action.choices), f"{parser.prog}: a subcommand lacks help"
                assert all(choice.help for choice in action._choices_actions), parser.prog
    return found[1:]


def test_every_subcommand_and_option_has_help() -> None:
    parsers = _client_parsers()
    assert {p.prog for p in parsers} >= {"kairoi-trio job set", "kairoi-trio watch"}
    for parser in parsers:
        assert parser.description, parser.prog
        assert "KAIROI_SERVER" in (parser.epilog or ""), parser.prog
        assert "KAIROI_TOKEN" in (parser.epilog or ""), parser.prog
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.dest}: no help"


def test_help_names_the_environment() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "job", "set", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0
    for text in ("--token", "KAIROI_SERVER", "KAIROI_TOKEN", "--payload-file", "RFC 3339"):
        assert text in shown.stdout


# -- watch ----------------------------------------------------------------------------------


class Watch:
    """A `kairoi-trio watch` process whose stdout lines are collected as they come."""

    def __init__(self, server: ServerProcess, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", "watch", *args],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(server),
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        threading.Thread(target=self.lines.extend, args=(self.process.stdout,), daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_watch_prints_the_snapshot_a_marker_then_changes(
    shared_server: ServerProcess, prefix: str
) -> None:
    server, p = shared_server, prefix
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", f"{p}app.a", "2099-01-01 00:00:00") == ["OK"]
        watch = Watch(server, "--prefix", f"{p}app.", "--snapshot")
        try:
            # The marker comes before any change: the snapshot is known to be whole.
            wait_for(lambda: f"{SNAPSHOT_END_TEXT}\n" in watch.lines)
            assert kcp.request("SET", f"{p}app.b", "2099-01-01 00:00:00") == ["OK"]
            assert kcp.request("SET", f"{p}other", "2099-01-01 00:00:00") == ["OK"]
            assert kcp.request("UNSET", f"{p}app.a") == ["OK"]
            wait_for(lambda: len(watch.lines) >= 4)
        finally:
            watch.stop()
    assert [line.split("\t")[:2] for line in watch.lines] == [
        ["set", f"{p}app.a"],
        [SNAPSHOT_END_TEXT + "\n"],
        ["set", f"{p}app.b"],
        ["deleted", f"{p}app.a"],
    ]


def test_watch_json_lines(shared_server: ServerProcess, prefix: str) -> None:
    server, p = shared_server, prefix
    with KcpClient(server.kcp_port) as kcp:
        watch = Watch(server, "--prefix", f"{p}app.", "--snapshot", "--json")
        try:
            wait_for(lambda: watch.lines)  # an empty snapshot, then its end
            assert kcp.request("SET", f"{p}app.b", "2099-01-01 00:00:00", "data") == ["OK"]
            wait_for(lambda: len(watch.lines) >= 2)
        finally:
            watch.stop()
    end, change = (json.loads(line) for line in watch.lines)
    assert end == {"type": "snapshot_end"}
    assert change["type"] == "set" and change["snapshot"] is False
    assert RFC3339.fullmatch(change["at"])
    assert change["job"]["id"] == f"{p}app.b" and change["job"]["payload"] == "data"
