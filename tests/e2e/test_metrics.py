"""The HTTP metrics and health endpoint of a real server."""

from __future__ import annotations

import urllib.error
import urllib.request

from support.kcp_client import KcpClient
from support.waiting import wait_for


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
    assert fetch(server, "/ready") == (200, "ready\n")
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
    assert "kairoi_trigger_lateness_seconds_count 5.0" in text
    assert 'kairoi_run_duration_seconds_count{kind="shell",outcome="executed"} 5.0' in text
    assert 'kairoi_runner_queue_depth{kind="shell"} 0.0' in text
    assert "kairoi_log_append_seconds_count" in text
