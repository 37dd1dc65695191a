"""The HTTP metrics and health endpoint of a real server."""

from __future__ import annotations

import json
import resource
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.kcp_client import KcpClient
from support.waiting import wait_for

pytestmark = pytest.mark.backends("log", "postgres")


def fetch(server, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}{path}", timeout=5
        ) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_endpoints(server):
    assert fetch(server, "/live") == (200, "ok\n")
    status, body = fetch(server, "/ready")
    assert status == 200
    assert json.loads(body) == {
        "ready": True,
        "failing": None,
        "reason": None,
        "checks": {
            "shutdown": {"ok": True, "reason": None},
            "storage": {"ok": True, "reason": None},
        },
    }
    assert fetch(server, "/nope")[0] == 404


def test_metrics_report_jobs_runs_and_lateness(server, tmp_path):
    ok = tmp_path / "ok.sh"
    ok.write_text("exit 0\n")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(ok)) == ["OK"]
        requests = [("SET", f"app.{i}", "2020-01-01 00:00:00") for i in range(5)]
        requests.append(("SET", "later", "2099-01-01 00:00:00"))
        assert kcp.pipeline(requests) == [["OK"]] * 6

        def executed() -> bool:
            return 'kairoi_jobs{status="executed"} 5.0' in fetch(server, "/metrics")[1]

        wait_for(executed)
    status, text = fetch(server, "/metrics")
    assert status == 200
    assert 'kairoi_jobs{status="planned"} 1.0' in text
    assert "kairoi_rules 1.0" in text
    assert "kairoi_jobs_set_total 6.0" in text  # the dashboard's "set" series, for Prometheus
    assert "kairoi_trigger_lateness_seconds_count 5.0" in text
    assert 'kairoi_run_duration_seconds_count{kind="shell",outcome="executed"} 5.0' in text
    assert 'kairoi_runner_queue_depth{kind="shell"} 0.0' in text
    assert "kairoi_log_append_seconds_count" in text
    assert "kairoi_storage_writable 1.0" in text
    assert 'kairoi_runner_outcomes_unrecorded{kind="shell"} 0.0' in text
    for what in ("client", "trigger", "outcome", "retention", "probe", "compaction"):
        assert f'kairoi_storage_write_failures_total{{what="{what}"}} 0.0' in text


def health(server) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.mark.backends(
    "log"
)  # the log's file faults (test_postgres_cluster covers a database outage)
def test_not_ready_while_storage_writes_fail_and_ready_again_without_traffic(server):
    """/ready means "can accept writes": the log's files may not grow (EFBIG, as on a full disk)."""
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "kept", "2099-01-01 00:00:00") == ["OK"]
        size = max(f.stat().st_size for f in server.data_dir.glob("segment-*.log"))
        pid = server.process.pid
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
        try:
            answer = kcp.request("SET", "lost", "2099-01-01 00:00:00", "x" * 100)
            assert answer[0] == "ERROR" and "storage write failed" in answer[1]
            status, body = fetch(server, "/ready")
            assert status == 503
            ready = json.loads(body)  # names the failing check and why
            assert ready["ready"] is False and ready["failing"] == "storage"
            assert (
                ready["reason"].startswith("storage writes fail: ") and "[EFBIG]" in ready["reason"]
            )
            assert ready["checks"]["shutdown"] == {"ok": True, "reason": None}
            text = fetch(server, "/metrics")[1]
            assert "kairoi_storage_writable 0.0" in text
            assert 'kairoi_storage_write_failures_total{what="client"} 1.0' in text
            wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert kcp.request("GET", "kept")[0] == "OK"  # reads go on
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        wait_for(lambda: fetch(server, "/ready")[0] == 200)  # no client write needed
        assert json.loads(fetch(server, "/ready")[1])["ready"] is True
        wait_for(lambda: health(server) == health_pb2.HealthCheckResponse.SERVING)
        assert "kairoi_storage_writable 1.0" in fetch(server, "/metrics")[1]
