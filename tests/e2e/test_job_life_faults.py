"""The job life's faults of issue 7, each reproduced against a real server process.

- retry arithmetic: 1026 attempts, a 1e308 s backoff, a 10,000-year backoff;
- times at the edges of the supported range (0001-01-01 .. 9999-12-31), and a
  log holding a time beyond it (written by a release without policy bounds);
- NUL in ids, patterns and commands, refused at input by both protocols;
- jobs failed without a run (no rule, stale): logged aggregated, counted by prefix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import trio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.core.validation import MAX_POLICY_SECONDS
from kairoi_trio.model import MAX_TIME_US, MICROS, Job, Rule, ShellRunner, Status, now_us
from kairoi_trio.storage.log import DurableLog
from kairoi_trio.storage.records import JobPut, RulePut

pytestmark = pytest.mark.backends("log", "postgres")

YEAR_S = 365 * 86_400
FIRST = "0001-01-01 00:00:00"
LAST = "9999-12-31 23:59:59.999999"


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.SchedulerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.SchedulerStub(channel)


def grpc_stub(server: ServerProcess) -> pb_grpc.SchedulerStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return pb_grpc.SchedulerStub(channel)


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body + "\n")
    return str(path)


def refused_code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()  # type: ignore[attr-defined]


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def metrics(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


# -- retry arithmetic ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        # the case: stuck `triggered` at attempt 1025
        (
            "max_attempts = 1026\nbackoff_initial_s = 0\nbackoff_max_s = 0",
            "policy.max_attempts must be from 1 to 1000, not 1026",
        ),
        # stuck after the first failure
        (
            "max_attempts = 3\nbackoff_initial_s = 1e308\nbackoff_max_s = 1e308",
            "policy.backoff_initial_s must be from 0 to 3,153,600,000 s (100 years), not 1e+308",
        ),
    ],
    ids=["1026-attempts", "1e308-backoff"],
)
def test_a_policy_beyond_the_bounds_stops_the_server_at_start_with_the_reason(
    tmp_path: Path, policy: str, reason: str
) -> None:
    checked = check_config(tmp_path, f"[policy]\n{policy}\n")
    assert checked.returncode != 0
    assert reason in checked.stderr
    server = ServerProcess(tmp_path / "server", f"[policy]\n{policy}\n")
    with pytest.raises(RuntimeError, match="server exited with"):
        server.start()
    assert reason in server.log_text()


def test_the_most_attempts_with_no_backoff_end_failed_never_stuck_triggered(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # 1,000 attempts: the most a policy allows, which is the edge checked. No fsync
    # on the log (durability is not what this test is about): the fsyncs of each
    # attempt's records were half the test's time there (14 s -> 7 s, load 6).
    server = make_server(
        "[database]\nfsync_on_persist = false\n"
        "[policy]\nmax_attempts = 1000\nbackoff_initial_s = 0\nbackoff_max_s = 0\n"
        "[runners.shell]\nconcurrency = 4"
    )
    failing = script(tmp_path, "fail.sh", "exit 1")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", failing) == ["OK"]
        assert kcp.request("SET", "app.1", "2020-01-01 00:00:00") == ["OK"]
        wait_for(lambda: kcp.request("GET", "app.1")[1] == "failed", timeout=600, interval=0.2)
        # no longer triggered: SET is accepted again
        assert kcp.request("SET", "app.1", "2090-01-01 00:00:00") == ["OK"]
    runs = server.wait_events("job run", lambda e: e.get("job") == "app.1", count=1000)
    assert len(runs) == 1000
    assert runs[-1]["attempt"] == 1000


def test_a_ten_thousand_year_backoff_over_grpc_is_refused(
    stub: pb_grpc.SchedulerStub,
) -> None:
    # It used to plan a retry in year ~12027, which a KCP GET could not show.
    def set_rule(policy: pb.RulePolicy) -> tuple[grpc.StatusCode, str]:
        rule = pb.Rule(id="r", pattern="app.", shell=pb.ShellRunner(command="x.sh"), policy=policy)
        return refused_code(lambda: stub.SetRule(pb.SetRuleRequest(rule=rule)))

    ten_thousand_years = Duration(seconds=10_000 * YEAR_S)
    for field in ("backoff_initial", "backoff_max"):
        code, details = set_rule(pb.RulePolicy(max_attempts=3, **{field: ten_thousand_years}))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert f"policy.{field} must be from 0 to 3,153,600,000 s (100 years)" in details
    code, details = set_rule(pb.RulePolicy(max_attempts=1026))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "policy.max_attempts must be from 1 to 1000, not 1026",
    )
    assert refused_code(lambda: stub.GetRule(pb.GetRuleRequest(id="r")))[0] is (
        grpc.StatusCode.NOT_FOUND
    )


# -- the edges of time ------------------------------------------------------------------


def test_get_at_the_edges_of_time_over_kcp_grpc_and_the_cli(
    server: ServerProcess, kcp: KcpClient, stub: pb_grpc.SchedulerStub
) -> None:
    assert kcp.request("SET", "edge.first", FIRST) == ["OK"]
    assert kcp.request("SET", "edge.last", LAST) == ["OK"]
    # year 1 is long due, and no rule matches it: failed, and shown with four digits
    wait_for(lambda: kcp.request("GET", "edge.first") == ["OK", "failed", FIRST])
    assert kcp.request("GET", "edge.last") == ["OK", "planned", LAST]
    assert kcp.request("SET", "edge.none", "0000-12-31 23:59:59")[0] == "ERROR"
    assert kcp.request("SET", "edge.none", "10000-01-01 00:00:00")[0] == "ERROR"

    first = stub.GetJob(pb.GetJobRequest(id="edge.first")).job
    assert first.execute_at.ToDatetime(tzinfo=UTC) == datetime(1, 1, 1, tzinfo=UTC)
    last = stub.GetJob(pb.GetJobRequest(id="edge.last")).job
    assert last.execute_at == Timestamp(seconds=253_402_300_799, nanos=999_999_000)
    beyond = pb.SetJobRequest(id="edge.none", execute_at=Timestamp(seconds=253_402_300_800))
    assert refused_code(lambda: stub.SetJob(beyond))[0] is grpc.StatusCode.INVALID_ARGUMENT

    for job_id, text in (("edge.first", FIRST), ("edge.last", LAST)):
        shown = subprocess.run(
            [sys.executable, "-m", "kairoi_trio", "job", "get", job_id],
            env=dict(os.environ, KAIROI_SERVER=f"127.0.0.1:{server.grpc_port}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert text in shown.stdout


def test_a_log_holding_a_time_beyond_9999_does_not_wedge_the_start(tmp_path: Path) -> None:
    # What a release without policy bounds wrote after a 10,000-year backoff:
    # a job planned in year ~12027. GET then closed the KCP connection.
    server = ServerProcess(tmp_path / "server")
    year_12027 = MAX_TIME_US + 2027 * YEAR_S * MICROS
    failed_at = now_us()  # kept: the job expires with the retention from then
    far = Job("app.far", year_12027, Status.PLANNED, b"", 1, "attempt 1 failed: x", failed_at)
    rule = Rule("r", "app.", ShellRunner("x.sh"))

    async def write() -> None:
        store = DurableLog(server.data_dir)
        await trio.to_thread.run_sync(store.load)
        await store.append([RulePut(rule), JobPut(far)])
        await store.aclose()

    trio.run(write)
    server.start()
    try:
        with KcpClient(server.kcp_port) as kcp:
            assert kcp.request("GET", "app.far") == ["OK", "failed", LAST]
            assert kcp.request("PING") == ["OK", "PONG"]  # the connection goes on
            assert kcp.request("SET", "app.far", "2090-01-01 00:00:00") == ["OK"]
        (recovered,) = server.events("recovered")
        assert recovered["failed_out_of_range"] == 1
        stub = grpc_stub(server)
        job = stub.GetJob(pb.GetJobRequest(id="app.far")).job
        assert job.execute_at.ToDatetime(tzinfo=UTC).year == 2090
    finally:
        server.kill()


def test_a_huge_retention_keeps_finished_jobs_and_the_server_up(
    make_server: Callable[..., ServerProcess],
) -> None:
    # retention_s = 1e308 made the first retention pass overflow and stop the server; the
    # configuration now refuses more than 100 years, and the longest allowed one works.
    server = make_server(f"[storage]\nretention_s = {MAX_POLICY_SECONDS}")
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("SET", "orphan.1", "2020-01-01 00:00:00") == ["OK"]
        wait_for(lambda: kcp.request("GET", "orphan.1")[1] == "failed")
        assert kcp.request("PING") == ["OK", "PONG"]
    assert server.process is not None and server.process.poll() is None
    assert server.stop() == 0
    assert "OverflowError" not in server.log_text()


# -- NUL ------------------------------------------------------------------------------


def test_nul_is_refused_in_ids_patterns_and_commands_by_both_protocols(
    kcp: KcpClient, stub: pb_grpc.SchedulerStub
) -> None:
    # It used to be accepted, and then every run of such a job failed.
    answers = {
        "job id": kcp.request("SET", "app.\x00x", "2030-01-01 00:00:00"),
        "rule id": kcp.request("RULE", "SET", "r\x00", "app.", "shell", "x.sh"),
        "pattern": kcp.request("RULE", "SET", "r", "app.\x00", "shell", "x.sh"),
        "shell command": kcp.request("RULE", "SET", "r", "app.", "shell", "x\x00.sh"),
    }
    for what, answer in answers.items():
        assert answer == ["ERROR", f"{what} must not contain the NUL character (U+0000)"]
    assert kcp.request("GET", "app.\x00x")[0] == "ERROR"

    job = pb.SetJobRequest(id="app.\x00x", execute_at=Timestamp(seconds=1_900_000_000))
    code, details = refused_code(lambda: stub.SetJob(job))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "job id must not contain the NUL character (U+0000)",
    )
    rule = pb.Rule(id="r", pattern="app.", shell=pb.ShellRunner(command="x\x00.sh"))
    code, details = refused_code(lambda: stub.SetRule(pb.SetRuleRequest(rule=rule)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "NUL" in details
    assert stub.ListRules(pb.ListRulesRequest()).rules == []


# -- jobs failed without a run ------------------------------------------------------------


def test_a_flood_of_unmatched_jobs_is_logged_aggregated_and_counted_by_prefix(
    server: ServerProcess, kcp: KcpClient
) -> None:
    count = 10_000
    answers = kcp.pipeline([("SET", f"flood.{i}", "2020-01-01 00:00:00") for i in range(count)])
    assert all(answer == ["OK"] for answer in answers)
    series = 'kairoi_jobs_failed_without_run_total{prefix="flood.",reason="no_rule"}'
    wait_for(lambda: f"{series} {float(count)}" in metrics(server), timeout=120, interval=0.2)
    assert kcp.request("GET", f"flood.{count - 1}")[1] == "failed"

    assert server.stop() == 0  # the last window's summary is written on the way out
    singles = server.events("job failed without running")
    assert len(singles) == 1
    assert (singles[0]["reason"], singles[0]["prefix"]) == ("no_rule", "flood.")
    assert singles[0]["outcome"] == "no rule matches this job"
    summaries = server.events("jobs failed without running")
    assert 1 <= len(summaries) <= 3  # one per 10 s window, not one per job
    assert sum(s["count"] for s in summaries) == count - 1
    assert all(set(s["prefixes"]) == {"flood."} for s in summaries)


def test_a_stale_job_is_logged_and_counted_too(
    server: ServerProcess, stub: pb_grpc.SchedulerStub
) -> None:
    stale = pb.RulePolicy(stale_after=Duration(seconds=1))
    rule = pb.Rule(id="r", pattern="old.", shell=pb.ShellRunner(command="x.sh"), policy=stale)
    stub.SetRule(pb.SetRuleRequest(rule=rule))
    an_hour_ago = Timestamp(seconds=int(datetime.now(UTC).timestamp()) - 3600)
    stub.SetJob(pb.SetJobRequest(id="old.report.1", execute_at=an_hour_ago))
    series = 'kairoi_jobs_failed_without_run_total{prefix="old.report.",reason="stale"} 1.0'
    wait_for(lambda: series in metrics(server), timeout=60, interval=0.2)
    job = stub.GetJob(pb.GetJobRequest(id="old.report.1")).job
    assert job.status == pb.JOB_STATUS_FAILED
    assert job.last_outcome.startswith("stale: overdue by ")
    (line,) = wait_for(lambda: server.events("job failed without running"))
    assert (line["job"], line["reason"]) == ("old.report.1", "stale")


@pytest.mark.parametrize(
    ("dsn", "exchange", "reason"),
    [
        ("amqp://guest:guest@127.0.0.1:1/?hearbeat=5", "ex", "unknown query parameter 'hearbeat'"),
        (
            "amqp://guest:guest@127.0.0.1:1/?mandatory=maybe",
            "ex",
            "mandatory must be true or false",
        ),
        ("amqp://guest:guest@127.0.0.1:1/", "caf\u00e9$", "cannot publish to exchange"),
    ],
)
def test_amqp_rules_that_could_never_publish_are_refused_at_input(
    kcp: KcpClient, dsn: str, exchange: str, reason: str
) -> None:
    """The AMQP runner's own checks run when the rule is set, not at every failing run."""
    answer = kcp.request("RULE", "SET", "r.amqp", "q.", "amqp", dsn, exchange, "rk")
    assert answer[0] == "ERROR" and reason in answer[1], answer
    assert kcp.request("RULE", "GET", "r.amqp")[0] == "ERROR"  # nothing stored
    fine = "amqp://guest:guest@127.0.0.1:1/?heartbeat=5&mandatory=false"
    assert kcp.request("RULE", "SET", "r.amqp", "q.", "amqp", fine, "amq.direct", "rk") == ["OK"]
