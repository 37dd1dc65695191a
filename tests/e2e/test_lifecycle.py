"""Shutdown, retention and compaction of a real server process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.waiting import wait_for

pytestmark = pytest.mark.backends("log", "postgres")

FUTURE = "2099-01-01 00:00:00"
PAST = "2020-01-01 00:00:00"


def test_sigint_stops_cleanly_too(server):
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(20) == 0


def test_run_outliving_the_grace_period_is_killed_and_runs_again(make_server, tmp_path):
    runs = tmp_path / "runs.txt"
    script = tmp_path / "slow.sh"
    script.write_text(
        f'#!/bin/sh\necho "$1" >> {runs}\nif [ "$(wc -l < {runs})" -eq 1 ]; then sleep 60; fi\n'
    )
    server = make_server("[shutdown]\ngrace_period_s = 0.5")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "app.slow", PAST) == ["OK"]
        wait_for(lambda: runs.exists())
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10  # the grace period, not the script's 60 s
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        wait_for(lambda: kcp.request("GET", "app.slow")[1] == "executed")
    assert runs.read_text().splitlines() == ["app.slow", "app.slow"]


def test_run_finishing_within_the_grace_period_is_recorded(make_server, tmp_path):
    started_flag = tmp_path / "started"
    script = tmp_path / "short.sh"
    script.write_text(f"#!/bin/sh\ntouch {started_flag}\nsleep 1\n")
    server = make_server("[shutdown]\ngrace_period_s = 10")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "app.short", PAST) == ["OK"]
        wait_for(started_flag.exists)
    assert server.stop() == 0
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "app.short")[1] == "executed"


def test_finished_jobs_are_dropped_after_retention(make_server, tmp_path):
    ok = tmp_path / "ok.sh"
    ok.write_text("exit 0\n")
    server = make_server("[storage]\nretention_s = 1.0")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(ok)) == ["OK"]
        assert kcp.request("SET", "app.done", PAST) == ["OK"]
        assert kcp.request("SET", "app.later", FUTURE) == ["OK"]
        wait_for(lambda: kcp.request("GET", "app.done")[1] == "executed")
        wait_for(lambda: kcp.request("GET", "app.done")[0] == "ERROR", timeout=10)
        assert kcp.request("GET", "app.later") == ["OK", "planned", FUTURE]
    server.kill()
    server.start()  # the removal is durable
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "app.done")[0] == "ERROR"


def settled_size(directory: Path) -> int | None:
    """The bytes in `directory` once nothing is being written in it (a compaction may
    still be renaming or deleting files after the last write was acknowledged): no
    *.tmp file, and the same files of the same sizes twice, 0.2 s apart; else None."""

    def listing() -> dict[str, int] | None:
        try:
            sizes = {f.name: f.stat().st_size for f in directory.iterdir()}
        except FileNotFoundError:  # gone between the listing and its stat
            return None
        return None if any(name.endswith(".tmp") for name in sizes) else sizes

    first = listing()
    time.sleep(0.2)
    second = listing()
    return sum(second.values()) if first is not None and first == second else None


@pytest.mark.backends("log")  # compaction of the log
def test_compaction_bounds_the_log_and_keeps_the_latest_state(make_server):
    server = make_server("[storage]\ncompact_after_bytes = 65536")
    with KcpClient(server.kcp_port) as kcp:
        for round_ in range(10):  # the same 500 jobs rewritten 10 times
            moment = f"2099-01-01 00:00:{round_:02d}"
            requests = [("SET", f"job.{i}", moment, "p" * 50) for i in range(500)]
            assert kcp.pipeline(requests) == [["OK"]] * 500
        wait_for(lambda: list(server.data_dir.glob("snapshot-*")))
    total = wait_for(lambda: settled_size(server.data_dir))
    assert total < 600_000, sorted(server.data_dir.iterdir())  # ~10 rounds of ~60 KiB would be more
    server.kill()
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        answers = kcp.pipeline([("GET", f"job.{i}") for i in range(500)])
    assert answers == [["OK", "planned", "2099-01-01 00:00:09", "p" * 50]] * 500


def test_a_port_in_use_is_a_one_line_start_error(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(
            f'[controller]\nlisten = "127.0.0.1:{port}"\n[grpc]\nlisten = "127.0.0.1:0"\n'
            f'[metrics]\nlisten = "127.0.0.1:0"\n[storage]\ndirectory = "{tmp_path / "data"}"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kairoi-trio: cannot start:") and f"127.0.0.1:{port}" in last
    assert "Traceback" not in result.stderr


def _connect(port: int, server: subprocess.Popen) -> KcpClient | None:
    if server.poll() is not None:
        raise AssertionError(f"the server exited with status {server.returncode}")
    try:
        return KcpClient(port)
    except OSError:  # not listening yet
        return None


def test_a_server_started_with_its_output_closed_serves_and_keeps_its_log_whole(tmp_path):
    """`kairoi-trio serve <&- >&- 2>&-` (a launcher that closes what it does not pass
    on): /dev/null goes on the closed descriptors. Before, the server stopped at its
    first log line without a word, and a data file could take descriptor 2."""
    import os

    from support.ports import free_port
    from support.server import ServerProcess

    port = free_port()  # fixed: with no stderr there is no "ready" line to read it from
    server = ServerProcess(tmp_path, f'[controller]\nlisten = "127.0.0.1:{port}"\n')
    server.config_path.write_text(server.config_text())
    command = [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(server.config_path)]
    closed = subprocess.Popen(["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh", *command])
    try:
        with wait_for(lambda: _connect(port, closed), timeout=30) as client:
            assert client.request("SET", "closed.1", FUTURE) == ["OK"]
            assert client.request("GET", "closed.1")[:2] == ["OK", "planned"]
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{closed.pid}/fd/{fd}") == os.devnull
        closed.send_signal(signal.SIGTERM)
        assert closed.wait(30) == 0
    finally:
        closed.kill()
        closed.wait()
    # The log holds the job and nothing else: the next start reads it without a warning.
    again = ServerProcess(tmp_path).start()
    try:
        with KcpClient(again.kcp_port) as client:
            assert client.request("GET", "closed.1")[:2] == ["OK", "planned"]
        assert again.stop() == 0
    finally:
        again.kill()
    noted = [e for e in again.events() if e.get("level") in ("warning", "error", "critical")]
    assert not noted, again.log_text()
