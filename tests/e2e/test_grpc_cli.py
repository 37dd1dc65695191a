"""The `kairoi-trio job/rule/watch/info` client subcommands against a real server."""

from __future__ import annotations

import os
import subprocess
import sys


def cli(server, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KAIROI_SERVER=f"127.0.0.1:{server.grpc_port}")
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_job_and_rule_subcommands(server):
    assert (
        cli(server, "job", "set", "app.1", "2099-01-01 00:00:00", "--payload", "hi").stdout
        == "OK\n"
    )
    got = cli(server, "job", "get", "app.1")
    assert got.returncode == 0
    assert got.stdout.split("\t")[:3] == ["app.1", "planned", "2099-01-01 00:00:00"]
    assert "app.1\tplanned" in cli(server, "job", "list", "--prefix", "app.").stdout
    assert cli(server, "rule", "set", "r", "app.", "shell", "run.sh").stdout == "OK\n"
    assert cli(server, "rule", "list").stdout == "r\tapp.\tshell\trun.sh\n"
    info = cli(server, "info").stdout
    assert "jobs.planned\t1" in info and "rules\t1" in info
    assert cli(server, "job", "unset", "app.1").stdout == "OK\n"
    missing = cli(server, "job", "get", "app.1")
    assert missing.returncode == 1 and missing.stderr.startswith("kairoi-trio: NOT_FOUND")
    bad = cli(server, "job", "set", "x", "2020-02-30 00:00:00")
    assert bad.returncode == 1 and "invalid date" in bad.stderr and "Traceback" not in bad.stderr


def test_watch_prints_the_snapshot_then_changes(server):
    import threading

    from support.kcp_client import KcpClient
    from support.waiting import wait_for

    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "app.a", "2099-01-01 00:00:00") == ["OK"]
        env = dict(os.environ, KAIROI_SERVER=f"127.0.0.1:{server.grpc_port}")
        watch = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", "watch", "--prefix", "app.", "--snapshot"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True).start()
        try:
            wait_for(lambda: lines)  # the snapshot: the watch is registered
            assert kcp.request("SET", "app.b", "2099-01-01 00:00:00") == ["OK"]
            assert kcp.request("SET", "other", "2099-01-01 00:00:00") == ["OK"]
            assert kcp.request("UNSET", "app.a") == ["OK"]
            wait_for(lambda: len(lines) >= 3)
        finally:
            watch.terminate()
            watch.wait(10)
    assert [line.split("\t")[:2] for line in lines] == [
        ["set", "app.a"],
        ["set", "app.b"],
        ["deleted", "app.a"],
    ]
