"""Durability across crashes: SIGKILL the real server and start it again."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from support.kcp_client import KcpClient
from support.waiting import wait_for

FUTURE = "2099-01-01 00:00:00"
PAST = "2020-01-01 00:00:00"


def segments(server) -> list:
    return sorted(server.data_dir.glob("segment-*.log"))


def test_acknowledged_writes_survive_sigkill(make_server):
    server = make_server()
    with KcpClient(server.kcp_port) as kcp:
        requests = [("SET", f"app.{i}", FUTURE, f"payload {i}") for i in range(3000)]
        requests.append(("RULE", "SET", "r", "app.", "shell", "/bin/true"))
        assert all(r == ["OK"] for r in kcp.pipeline(requests))
    server.kill()
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        answers = kcp.pipeline([("GET", f"app.{i}") for i in range(3000)])
        assert answers == [["OK", "planned", FUTURE, f"payload {i}"] for i in range(3000)]
        assert kcp.request("RULE", "GET", "r") == ["OK", "app.", "shell", "/bin/true"]


def test_torn_tail_is_cut_off_with_a_warning(make_server):
    server = make_server()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.pipeline([("SET", f"a.{i}", FUTURE) for i in range(10)]) == [["OK"]] * 10
    server.kill()
    last = segments(server)[-1]
    with open(last, "ab") as f:  # half a frame: what a crash mid-write leaves
        f.write(b"\x40\x00\x00\x00\x12\x34")
    server.start()
    assert any("torn" in line or "repaired" in line for line in server.lines), server.log_text()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "a.9") == ["OK", "planned", FUTURE]
        assert kcp.request("SET", "a.10", FUTURE) == ["OK"]
    server.kill()
    server.start()  # the repaired log is clean for the next start
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "a.10") == ["OK", "planned", FUTURE]


def test_corruption_before_the_end_refuses_to_start_naming_file_and_offset(make_server):
    server = make_server()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.pipeline([("SET", f"a.{i}", FUTURE) for i in range(50)]) == [["OK"]] * 50
    server.stop()
    last = segments(server)[-1]
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(server.config_path)],
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert last.name in message and "offset" in message, result.stderr
    assert "Traceback" not in result.stderr


def test_job_triggered_at_crash_runs_again_after_restart(make_server, tmp_path):
    runs = tmp_path / "runs.txt"
    pid_file = tmp_path / "pid"
    script = tmp_path / "job.sh"
    # First run: record itself and hang (the server is killed meanwhile).
    # Second run: record itself and succeed.
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> {runs}\n'
        f'if [ "$(wc -l < {runs})" -eq 1 ]; then echo $$ > {pid_file}; sleep 60; fi\n'
    )
    server = make_server()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "app.crash", PAST) == ["OK"]
        wait_for(pid_file.exists)
        assert kcp.request("GET", "app.crash")[1] == "triggered"
    server.kill()
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # the orphaned first run
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        wait_for(lambda: kcp.request("GET", "app.crash")[1] == "executed")
    assert runs.read_text().splitlines() == ["app.crash", "app.crash"]


def test_jobs_due_while_down_run_at_start_oldest_first(make_server, tmp_path):
    out = tmp_path / "order.txt"
    script = tmp_path / "order.sh"
    script.write_text(f'#!/bin/sh\necho "$1" >> {out}\n')
    server = make_server("[runners.shell]\nconcurrency = 1")
    base = datetime.now(UTC) + timedelta(seconds=2)
    offsets = {"c": 300, "a": 100, "b": 200}  # milliseconds after base
    with KcpClient(server.kcp_port) as kcp:
        requests = [("RULE", "SET", "r", "late.", "shell", str(script))]
        for name, ms in offsets.items():
            moment = base + timedelta(milliseconds=ms)
            requests.append(("SET", f"late.{name}", moment.strftime("%Y-%m-%d %H:%M:%S.%f")))
        assert all(r == ["OK"] for r in kcp.pipeline(requests))
    assert server.stop() == 0  # down before any is due
    time.sleep(max(0.0, (base - datetime.now(UTC)).total_seconds() + 0.5))
    server.start()
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 3)
    assert out.read_text().splitlines() == ["late.a", "late.b", "late.c"]


def test_failed_writes_answer_error_and_the_server_keeps_serving(make_server):
    server = make_server()
    pid = server.process.pid
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "kept", FUTURE) == ["OK"]
        # Let the server's files grow no further: writes fail with EFBIG, as on a full disk.
        size = max(f.stat().st_size for f in segments(server))
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
        try:
            failed = kcp.request("SET", "lost", FUTURE, "x" * 100)
            assert failed[0] == "ERROR" and "storage" in failed[1], failed
            assert kcp.request("GET", "lost")[0] == "ERROR"  # nothing half-applied
            assert kcp.request("GET", "kept") == ["OK", "planned", FUTURE]  # reads still served
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        assert kcp.request("SET", "after", FUTURE) == ["OK"]  # writes work again
    server.kill()
    server.start()  # and the log has no hole or garbage in the middle
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "after") == ["OK", "planned", FUTURE]
        assert kcp.request("GET", "lost")[0] == "ERROR"
