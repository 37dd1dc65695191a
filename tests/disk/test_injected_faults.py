"""A real server whose log's file operations fail (storage/faults.py), with work going on.

Each test starts `kairoi-trio serve` with KAIROI_TEST_STORAGE_FAULTS naming a
plan file, then turns failures on and off while jobs come due, runs end,
retention and compaction run. What must hold (issue 8, items 1 and 2): the
server stays up, client writes fail cleanly and reads go on, the affected job
stays as it was and is done once writes work again, /ready and gRPC health say
NOT ready meanwhile and ready again afterwards without client traffic, and the
log says it once per kind, with counts.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from disk.faulty import FaultPlan, failures, figure, http_get, metric, run_script, runs_of
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

LATER = "2099-01-01 00:00:00"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def soon(seconds: float) -> str:
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return f"{at:%Y-%m-%d %H:%M:%S.%f}"


def health(server: ServerProcess) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return response.status  # type: ignore[no-any-return]


def status_of(kcp: KcpClient, job_id: str) -> str:
    answer = kcp.request("GET", job_id)
    assert answer[0] == "OK", answer
    return answer[1]


def alive(server: ServerProcess) -> bool:
    assert server.process is not None
    return server.process.poll() is None


@pytest.mark.parametrize("error", ["ENOSPC", "EROFS", "EIO"])
@pytest.mark.parametrize("op", ["pwrite", "fdatasync"])
def test_a_job_due_while_log_writes_fail_runs_once_they_work(
    make_server: Callable[..., ServerProcess],
    fault_plan: FaultPlan,
    tmp_path: Path,
    op: str,
    error: str,
) -> None:
    server = make_server()
    script, runs = run_script(tmp_path)
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "kept", LATER) == ["OK"]
        assert kcp.request("SET", "app.due", soon(1)) == ["OK"]
        fault_plan.set({"op": op, "path": "segment-", "errno": error})

        # The job comes due: every trigger fails, the server backs off and stays up.
        wait_for(lambda: failures(server, "trigger") >= 3)
        assert alive(server)
        refused = kcp.request("SET", "refused", LATER)
        assert refused[0] == "ERROR"
        assert "storage write failed" in refused[1] and f"[{error}]" in refused[1]
        assert status_of(kcp, "kept") == "planned"  # reads go on
        assert status_of(kcp, "app.due") == "planned"  # as it was
        code, body = http_get(server, "/ready")
        assert code == 503 and json.loads(body)["failing"] == "storage"
        assert json.loads(body)["reason"].startswith("storage writes fail") and error in body
        assert metric(server, "kairoi_storage_writable") == 0
        wait_for(lambda: health(server) == NOT_SERVING)
        assert runs_of(runs, "app.due") == 0

        tried = failures(server, "trigger")
        fault_plan.clear()
        cleared = time.monotonic()
        wait_for(lambda: http_get(server, "/ready")[0] == 200)
        ready_after = time.monotonic() - cleared
        wait_for(lambda: status_of(kcp, "app.due") == "executed")
        figure(
            f"{op} {error}: {tried:.0f} trigger writes failed, ready {ready_after:.2f} s and "
            f"the job run {time.monotonic() - cleared:.2f} s after the fault ended"
        )
        assert runs_of(runs, "app.due") == 1
        assert metric(server, "kairoi_storage_writable") == 1
        wait_for(lambda: health(server) == SERVING)
        assert kcp.request("GET", "refused")[0] == "ERROR"  # the failed SET left nothing

    # Logged once per kind for the whole episode, then once when it ended, with counts.
    failed = server.events("storage write failed")
    kinds = [e["what"] for e in failed]
    assert kinds.count("trigger") == 1 and kinds.count("client") == 1
    assert len(kinds) == len(set(kinds))
    (recovered,) = server.events("storage writes work again")
    assert recovered["failed_writes"]["trigger"] >= 3
    assert server.stop() == 0


def test_readiness_comes_back_without_client_traffic(
    make_server: Callable[..., ServerProcess], fault_plan: FaultPlan
) -> None:
    server = make_server()
    with KcpClient(server.kcp_port) as kcp:
        fault_plan.set({"op": "pwrite", "errno": "ENOSPC"})
        assert kcp.request("SET", "a", LATER)[0] == "ERROR"
        assert http_get(server, "/ready")[0] == 503
        fault_plan.clear()
        cleared = time.monotonic()
        # nothing is due and no client writes: the idle probe finds the log writable
        wait_for(lambda: http_get(server, "/ready")[0] == 200)
        assert json.loads(http_get(server, "/ready")[1])["ready"] is True
        figure(f"idle: ready {time.monotonic() - cleared:.2f} s after the fault ended (probe)")
        assert failures(server, "client") == 1
        assert kcp.request("SET", "a", LATER) == ["OK"]
    probes = [e for e in server.events("storage write failed") if e["what"] == "probe"]
    assert len(probes) <= 1  # probes that failed: counted, logged once
    assert server.stop() == 0


def test_an_outcome_that_cannot_be_written_is_kept_and_written_later(
    make_server: Callable[..., ServerProcess], fault_plan: FaultPlan, tmp_path: Path
) -> None:
    server = make_server()
    script, runs = run_script(tmp_path, seconds=1.0)
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "app.1", soon(0)) == ["OK"]
        wait_for(lambda: status_of(kcp, "app.1") == "triggered")
        fault_plan.set({"op": "fdatasync", "path": "segment-", "errno": "EIO"})  # while it runs
        wait_for(lambda: failures(server, "outcome") >= 2)
        assert runs_of(runs, "app.1") == 1
        assert status_of(kcp, "app.1") == "triggered"  # not lost, not faked
        assert metric(server, 'kairoi_runner_outcomes_unrecorded{kind="shell"}') == 1
        fault_plan.clear()
        wait_for(lambda: status_of(kcp, "app.1") == "executed")
        assert metric(server, 'kairoi_runner_outcomes_unrecorded{kind="shell"}') == 0
        assert runs_of(runs, "app.1") == 1  # recorded, not run again
    assert server.stop() == 0


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_run_whose_outcome_was_never_written_runs_again_after_a_restart(
    make_server: Callable[..., ServerProcess], fault_plan: FaultPlan, tmp_path: Path, stop: str
) -> None:
    server = make_server()
    script, runs = run_script(tmp_path, seconds=1.0)
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "app.1", soon(0)) == ["OK"]
        wait_for(lambda: status_of(kcp, "app.1") == "triggered")
        fault_plan.set({"op": "pwrite", "errno": "ENOSPC"})
        wait_for(lambda: failures(server, "outcome") >= 1)
    if stop == "sigterm":
        assert server.stop() == 0  # a clean stop even though the log cannot be written
        assert [e for e in server.events() if e["event"].startswith("outcomes not recorded")]
    else:
        server.kill()
    fault_plan.clear()
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        wait_for(lambda: status_of(kcp, "app.1") == "executed")
        assert kcp.request("GET", "app.1")[0] == "OK"
    assert runs_of(runs, "app.1") == 2  # at least once: run again, since never recorded
    assert server.stop() == 0


def test_retention_while_writes_fail_deletes_later(
    make_server: Callable[..., ServerProcess], fault_plan: FaultPlan, tmp_path: Path
) -> None:
    server = make_server("[storage]\nretention_s = 4\n")
    script, runs = run_script(tmp_path)
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "app.1", soon(0)) == ["OK"]
        wait_for(lambda: status_of(kcp, "app.1") == "executed")
        fault_plan.set({"op": "pwrite", "errno": "EROFS"})
        wait_for(lambda: failures(server, "retention") >= 2)
        assert alive(server)
        assert status_of(kcp, "app.1") == "executed"  # still kept
        fault_plan.clear()
        wait_for(lambda: kcp.request("GET", "app.1")[0] == "ERROR")  # expired now
    assert server.stop() == 0


@pytest.mark.parametrize(
    "fault",
    [
        {"op": "open", "path": ".log.tmp", "errno": "ENOSPC"},  # the next segment
        {"op": "fsync", "path": ".log.tmp", "errno": "EIO"},
        {"op": "fsync", "path": "snapshot-", "errno": "ENOSPC"},  # the snapshot
        {"op": "replace", "path": "snapshot-", "errno": "EROFS"},
    ],
    ids=["rotation-open", "rotation-fsync", "snapshot-fsync", "snapshot-rename"],
)
def test_a_compaction_that_fails_stops_nothing_and_loses_nothing(
    make_server: Callable[..., ServerProcess], fault_plan: FaultPlan, fault: dict[str, object]
) -> None:
    server = make_server("[storage]\ncompact_after_bytes = 4096\n")
    fault_plan.set(fault)
    payload = "p" * 300
    with KcpClient(server.kcp_port) as kcp:
        for i in range(40):  # 40 x ~350 bytes: past the threshold
            assert kcp.request("SET", f"job.{i}", LATER, payload) == ["OK"]
        wait_for(lambda: failures(server, "compaction") >= 1)
        assert alive(server)
        assert http_get(server, "/ready")[0] == 200  # appends still work
        assert kcp.request("SET", "job.after", LATER) == ["OK"]
    assert server.stop() == 0
    assert not list(server.data_dir.glob("*.tmp"))
    fault_plan.clear()
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        for job_id in [*(f"job.{i}" for i in range(40)), "job.after"]:
            assert status_of(kcp, job_id) == "planned"
    assert server.stop() == 0


def test_a_stop_during_start_up_does_not_wait_for_the_replay(
    tmp_path: Path, fault_plan: FaultPlan
) -> None:
    """SIGTERM while the log is being replayed (tens of seconds for ten million jobs;
    here the lock file's open is held for 60 s) ends the server at once, with nothing
    lost: it used to finish the replay first, then start and stop."""
    server = ServerProcess(tmp_path / "server")
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "kept", LATER, "payload") == ["OK"]
    assert server.stop() == 0
    fault_plan.set({"op": "open", "path": "LOCK", "delay_s": 60.0})
    server.start(wait_ready=False)
    try:
        assert server.wait_events("storage fault injection is on: for tests only"), (
            server.log_text()
        )
        time.sleep(0.5)  # the replay is under way: the lock's open sleeps in its thread
        started = time.monotonic()
        assert server.stop(timeout=30) == 0, server.log_text()
        assert time.monotonic() - started < 20  # not the 60 s the replay is held for
        assert server.events("stopped during start-up"), server.log_text()
        assert not server.events("ready")
    finally:
        server.kill()
    fault_plan.clear()
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", "kept")[:2] == ["OK", "planned"]
    assert server.stop() == 0
