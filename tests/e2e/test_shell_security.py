"""What a shell rule may run, against a real server: the allow-list at input and at
run time, commands that are options to `sh`, and scripts that die with the server."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import trio
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.model import Rule, ShellRunner
from kairoi_trio.storage.log import DurableLog
from kairoi_trio.storage.records import RulePut

NOW = '"2000-01-01 00:00:00"'[1:-1]  # long past: due at once


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def job_status(server: ServerProcess, job: str) -> list[str]:
    with KcpClient(server.kcp_port) as kcp:
        return kcp.request("GET", job)


def finished(server: ServerProcess, job: str) -> list[str] | None:
    answer = job_status(server, job)
    return answer if answer[1] in ("executed", "failed") else None


def test_a_command_that_is_an_option_to_sh_is_refused_at_input(server: ServerProcess) -> None:
    with KcpClient(server.kcp_port) as kcp:
        for command in ("-c", "-", "+x", "--help"):
            answer = kcp.request("RULE", "SET", "r", "pre.", "shell", command)
            assert answer[0] == "ERROR"
            assert answer[1].startswith(f"shell command {command!r} starts with {command[0]!r}")
            assert "sh would take it for an option" in answer[1]
        assert kcp.request("RULE", "GET", "r")[0] == "ERROR"  # nothing stored
        assert kcp.request("RULE", "SET", "r", "pre.", "shell", "./-c") == ["OK"]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        rule = pb.Rule(id="g", pattern="pre.", shell=pb.ShellRunner(command="-c"))
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.SchedulerStub(channel).SetRule(pb.SetRuleRequest(rule=rule))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "starts with '-'" in refused.value.details()  # type: ignore[attr-defined]


def test_a_rule_stored_with_c_from_an_older_release_runs_no_job_id_as_code(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # Kairoi ran `sh -c <job_id>` for such a rule: SET "pre.;touch f" created f.
    data = tmp_path / "server" / "data"

    async def write_old_rule() -> None:
        log = DurableLog(data)
        await trio.to_thread.run_sync(log.load)
        await log.append([RulePut(Rule("old", "pre.", ShellRunner("-c")))])
        await log.aclose()

    trio.run(write_old_rule)
    server = make_server()
    marker = server.workdir / "f"
    job = "pre.;touch f"
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "GET", "old") == ["OK", "pre.", "shell", "-c"]
        assert kcp.request("SET", job, NOW) == ["OK"]
    answer = wait_for(lambda: finished(server, job))
    assert answer[1] == "failed"  # sh found no script named "-c"
    assert not marker.exists()


def test_a_rule_no_longer_allowed_fails_after_a_restart_with_the_list(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    script = tmp_path / "job.sh"
    script.write_text(f'echo "$1" >> {ran}\n')
    allowed = tmp_path / "allowed.sh"
    allowed.write_text("exit 0\n")
    server = make_server()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "old", "app.", "shell", str(script)) == ["OK"]
    server.stop()
    server.extra_config = f'[runners.shell]\nallowed_commands = ["{allowed}"]'
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "app.1", NOW) == ["OK"]
        # and the list is enforced at input too
        refused = kcp.request("RULE", "SET", "new", "x.", "shell", str(script))
        assert refused == [
            "ERROR",
            f"shell command {str(script)!r} is not in the allowed list "
            "([runners.shell] allowed_commands)",
        ]
    assert wait_for(lambda: finished(server, "app.1"))[1] == "failed"
    [run] = server.wait_events("job run", lambda e: e["job"] == "app.1")
    assert run["outcome"] == refused[1]
    assert not ran.exists()


def test_scripts_die_with_a_server_killed_by_sigkill(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    script = tmp_path / "long.sh"
    # A child that is not exec'd (as `php job.php` in a script): PR_SET_PDEATHSIG on
    # sh alone would leave it running.
    script.write_text(f'sleep 300 &\necho $$ $! >> {pids}\nwait\necho "done $1" >> {pids}\n')
    server = make_server()
    due = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "long", "long.", "shell", str(script)) == ["OK"]
        assert kcp.pipeline([("SET", f"long.{i}", due) for i in range(3)]) == [["OK"]] * 3
    lines = wait_for(lambda: len(_lines(pids)) == 3 and _lines(pids))
    started = [int(pid) for line in lines for pid in line.split()]
    assert not any(gone(pid) for pid in started)
    server.kill()  # SIGKILL: no shutdown code runs
    try:
        wait_for(lambda: all(gone(pid) for pid in started))
    finally:
        for pid in started:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert not any(line.startswith("done") for line in _lines(pids))
    # At the next start the jobs run again (at least once), with nothing left of the old runs.
    server.start()
    lines = wait_for(lambda: len(_lines(pids)) == 6 and _lines(pids))
    again = [int(pid) for line in lines[3:] for pid in line.split()]
    server.kill()
    wait_for(lambda: all(gone(pid) for pid in again))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
