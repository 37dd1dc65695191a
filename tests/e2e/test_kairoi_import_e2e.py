"""`kairoi-trio import-kairoi` as a user runs it: the real command in a subprocess on
Kairoi files the test wrote (tests/support/kairoi_files.py), then the real server on
the imported store, checked over KCP.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import kairoi_files as k
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

PAST = "2020-11-15 16:30:00"
FUTURE = "2099-01-01 00:00:00"


def import_kairoi(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "import-kairoi", *map(str, args)],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_in_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a pseudo-terminal; return (status, what it showed)."""
    master, slave = pty.openpty()
    # 24 rows of 80 columns, as a terminal window has (a fresh pty says 0 x 0).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    shown = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        shown.append(data)
    os.close(master)
    return process.wait(120), b"".join(shown).decode("utf-8", "replace")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server set up (config written) but not started: the import runs first."""
    process = ServerProcess(tmp_path / "server")
    process.config_path.write_text(process.config_text())
    yield process
    process.kill()


def test_imported_jobs_and_rules_are_served_and_a_triggered_job_runs_again(
    tmp_path: Path, server: ServerProcess
) -> None:
    ran = tmp_path / "ran.txt"
    script = tmp_path / "run-job.sh"
    script.write_text(f'echo "$1" >> {ran}\n')
    kairoi = tmp_path / "kairoi"
    k.write(
        kairoi,
        "logfile.compressed",
        k.job("app.done", k.seconds(PAST), "executed"),
        k.job("app.broken", k.seconds(PAST), "failed"),
        k.job("app.later", k.seconds(FUTURE), "planned"),
        k.job("app.retried", k.seconds(PAST), "planned"),
        k.job("app.first", -(2**63), "executed"),
        k.job("app.last", 2**63 - 1, "planned"),
        k.shell_rule("run", "app.", "/bin/false"),
    )
    k.write(
        kairoi,
        "logfile.to_compress",
        k.shell_rule("run", "app.", str(script)),  # the newer rule wins
        k.amqp_rule("queue", "queue.", "amqp://guest:guest@127.0.0.1:5672/%2f", "jobs", "rk"),
    )
    # Kairoi had started running app.retried when it stopped, mid-way through
    # writing app.torn (never acknowledged).
    k.write(
        kairoi,
        "logfile",
        k.job("app.retried", k.seconds(PAST), "triggered"),
        k.job("app.torn", k.seconds(PAST))[:9],
    )

    result = import_kairoi(kairoi, "-c", server.config_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped a torn entry" in result.stderr
    assert f"Imported into {server.data_dir}: 6 jobs, 2 rules" in result.stdout
    assert "jobs by status: planned 2, triggered 1, executed 2, failed 1" in result.stdout
    assert "rules by runner: shell 1, amqp 1" in result.stdout

    server.start()
    with KcpClient(server.kcp_port) as kcp:
        wait_for(lambda: ran.exists() and "app.retried" in ran.read_text())
        wait_for(lambda: kcp.request("GET", "app.retried")[1] == "executed")
        assert kcp.request("GET", "app.done") == ["OK", "executed", PAST]
        assert kcp.request("GET", "app.broken") == ["OK", "failed", PAST]
        assert kcp.request("GET", "app.later") == ["OK", "planned", FUTURE]
        assert kcp.request("GET", "app.first") == ["OK", "executed", "1677-09-21 00:12:43.145225"]
        assert kcp.request("GET", "app.last") == ["OK", "planned", "2262-04-11 23:47:16.854776"]
        assert kcp.request("GET", "app.torn")[0] == "ERROR"
        assert kcp.request("RULE", "GET", "run") == ["OK", "app.", "shell", str(script)]
        assert kcp.request("RULE", "GET", "queue") == [
            "OK",
            "queue.",
            "amqp",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "jobs",
            "rk",
        ]
        # Kairoi's finished jobs do not run again.
        assert ran.read_text().split() == ["app.retried"]
        # The imported store takes new writes as any other.
        assert kcp.request("SET", "app.new", FUTURE) == ["OK"]
    assert server.stop() == 0
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "app.new") == ["OK", "planned", FUTURE]
        assert kcp.request("GET", "app.retried")[1] == "executed"


def test_a_data_directory_a_running_server_holds_is_refused(
    tmp_path: Path, server: ServerProcess
) -> None:
    kairoi = tmp_path / "kairoi"
    k.write(kairoi, "logfile", k.job("app.1", k.seconds(FUTURE)))
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "mine", FUTURE) == ["OK"]
        result = import_kairoi(kairoi, "-c", server.config_path, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == (
            f"kairoi-trio import-kairoi: the data directory {server.data_dir} is in use by a "
            "running kairoi-trio server: stop it, import, then start it again\n"
        )
        assert kcp.request("GET", "app.1")[0] == "ERROR"
        assert kcp.request("PING") == ["OK", "PONG"]
    assert server.stop() == 0
    # Stopped, the store holds data: --merge is needed, and then works.
    result = import_kairoi(kairoi, "-c", server.config_path, cwd=tmp_path)
    assert result.returncode == 1 and "use --merge" in result.stderr
    result = import_kairoi(kairoi, "-c", server.config_path, "--merge", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "app.1") == ["OK", "planned", FUTURE]
        assert kcp.request("GET", "mine") == ["OK", "planned", FUTURE]


def test_a_progress_bar_on_a_terminal_for_a_large_directory(tmp_path: Path) -> None:
    kairoi = tmp_path / "kairoi"
    at = k.seconds(FUTURE)
    padding = "x" * 200  # long ids: a large file from few entries, to keep the test quick
    k.write(
        kairoi,
        "logfile.compressed",
        b"".join(k.job(f"job.{i:05d}.{padding}", at) for i in range(20_000)),
    )
    assert (kairoi / "logfile.compressed").stat().st_size >= 4 << 20
    config = tmp_path / "configuration.toml"
    config.write_text(f'[storage]\ndirectory = "{tmp_path / "store"}"\n')
    argv = [sys.executable, "-m", "kairoi_trio", "import-kairoi", str(kairoi), "-c", str(config)]
    argv_dry = [*argv, "--dry-run"]

    status, shown = run_in_terminal(argv_dry, tmp_path)
    assert status == 0, shown
    assert "reading Kairoi's log files" in shown
    assert "Would import into" in shown

    piped = subprocess.run(argv_dry, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # no bar when stderr is not a terminal
    assert "Would import into" in piped.stdout and "20000 jobs" in piped.stdout
