"""Token roles ([auth] tokens, client_tokens, read_tokens) against a real server.

KCP `AUTH` and gRPC bearer metadata grant the same rights: admin everything,
client jobs (and reading rules), read only reads and watches. Failed AUTH is
logged without the token and slowed down on its connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.kcp_client import KcpClient
from support.server import ServerProcess

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = pytest.mark.backends("log", "postgres")

ADMIN, CLIENT, READ = "adm-7f3a9c", "cli-51be0d", "rd-c44e12"
AUTH_CONFIG = f"""
[auth]
tokens = ["{ADMIN}"]
client_tokens = ["{CLIENT}"]
read_tokens = ["{READ}"]
"""
LATER = '"2040-01-01 00:00:00"'


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server(AUTH_CONFIG)


def kcp_answers(server: ServerProcess, token: str | None) -> dict[str, list[str]]:
    """What each instruction answers on a connection authenticated with `token`."""
    with KcpClient(server.kcp_port) as kcp:
        if token is not None:
            assert kcp.request("AUTH", token) == ["OK"]
        job, rule = f"roles.{token}", f"rule.{token}"
        return {
            "SET": kcp.request("SET", job, LATER[1:-1]),
            "GET": kcp.request("GET", job),
            "UNSET": kcp.request("UNSET", job),
            "RULE SET": kcp.request("RULE", "SET", rule, "roles.", "shell", "/srv/job.sh"),
            "RULE GET": kcp.request("RULE", "GET", rule),
            "RULE UNSET": kcp.request("RULE", "UNSET", rule),
            "PING": kcp.request("PING"),
            "VERSION": kcp.request("VERSION")[:1],
        }


def outcome(answer: list[str]) -> str:
    if answer[0] == "OK":
        return "ok"
    return "denied" if answer[1].startswith("permission denied") else answer[1]


def test_kcp_roles(server: ServerProcess) -> None:
    admin = {name: outcome(a) for name, a in kcp_answers(server, ADMIN).items()}
    assert set(admin.values()) == {"ok"}

    client = {name: outcome(a) for name, a in kcp_answers(server, CLIENT).items()}
    assert client == {
        "SET": "ok",
        "GET": "ok",
        "UNSET": "ok",
        "RULE SET": "denied",
        "RULE GET": "no rule rule." + CLIENT,  # may read rules: the rule just does not exist
        "RULE UNSET": "denied",
        "PING": "ok",
        "VERSION": "ok",
    }

    with KcpClient(server.kcp_port) as kcp:  # a job and a rule for the read token to see
        kcp.request("AUTH", ADMIN)
        assert kcp.request("SET", f"roles.{READ}", LATER[1:-1]) == ["OK"]
        assert kcp.request("RULE", "SET", f"rule.{READ}", "roles.", "shell", "/x.sh") == ["OK"]
    read = kcp_answers(server, READ)
    assert {name: outcome(a) for name, a in read.items()} == {
        "SET": "denied",
        "GET": "ok",
        "UNSET": "denied",
        "RULE SET": "denied",
        "RULE GET": "ok",
        "RULE UNSET": "denied",
        "PING": "ok",
        "VERSION": "ok",
    }
    assert read["SET"] == [
        "ERROR",
        "permission denied: a read token may not set jobs (needs a client token)",
    ]
    assert read["RULE SET"][1] == (
        "permission denied: a read token may not set rules (needs an admin token)"
    )
    assert read["GET"] == ["OK", "planned", "2040-01-01 00:00:00"]  # nothing was changed


def test_kcp_without_auth_only_answers_ping_and_version(server: ServerProcess) -> None:
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("PING") == ["OK", "PONG"]
        assert kcp.request("GET", "x") == [
            "ERROR",
            "authentication required: send AUTH <token>",
        ]
        # A failed AUTH keeps the role the connection had; a good one changes it.
        assert kcp.request("AUTH", READ) == ["OK"]
        assert kcp.request("AUTH", "wrong") == ["ERROR", "invalid token"]
        assert outcome(kcp.request("GET", "x")) == "no job x"
        assert outcome(kcp.request("SET", "x", LATER[1:-1])) == "denied"
        assert kcp.request("AUTH", CLIENT) == ["OK"]
        assert kcp.request("SET", "x", LATER[1:-1]) == ["OK"]


def test_failed_auth_is_logged_without_the_token_and_slowed_down(server: ServerProcess) -> None:
    guesses = [f"guess-{i}-zz" for i in range(5)]
    with KcpClient(server.kcp_port) as kcp:
        # the 4th and 5th answers come later (0.5 s, 1 s), with the same reason
        for guess in guesses:
            assert kcp.request("AUTH", guess) == ["ERROR", "invalid token"]
        assert kcp.request("AUTH", ADMIN) == ["OK"]  # the right token still works
        assert kcp.request("PING") == ["OK", "PONG"]
    server.stop()
    failures = server.events("kcp auth failed")
    assert [e["failures"] for e in failures] == [1, 5]  # the first, then the connection's sum
    assert all(e["peer"].startswith("127.0.0.1:") for e in failures)
    text = server.log_text()
    for token in (*guesses, ADMIN):
        assert token not in text


# -- gRPC ----------------------------------------------------------------------------------

JOB = "roles.grpc"
AT = Timestamp(seconds=2_208_988_800)


def grpc_calls(stub: pb_grpc.SchedulerStub, md: list[tuple[str, str]]) -> dict[str, str]:
    """The status code name of each kairoi.v1 call made with metadata `md`."""
    rule = pb.Rule(id="grpc.rule", pattern="roles.", shell=pb.ShellRunner(command="/x.sh"))
    calls: dict[str, Callable[[], object]] = {
        "SetJob": lambda: stub.SetJob(pb.SetJobRequest(id=JOB, execute_at=AT), metadata=md),
        "SetJobs": lambda: stub.SetJobs(
            pb.SetJobsRequest(jobs=[pb.SetJobRequest(id=JOB, execute_at=AT)]), metadata=md
        ),
        "StreamSetJobs": lambda: stub.StreamSetJobs(
            iter([pb.SetJobsRequest(jobs=[pb.SetJobRequest(id=JOB, execute_at=AT)])]), metadata=md
        ),
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(id=JOB), metadata=md),
        "ListJobs": lambda: stub.ListJobs(pb.ListJobsRequest(), metadata=md),
        "SetRule": lambda: stub.SetRule(pb.SetRuleRequest(rule=rule), metadata=md),
        "GetRule": lambda: stub.GetRule(pb.GetRuleRequest(id="grpc.rule"), metadata=md),
        "ListRules": lambda: stub.ListRules(pb.ListRulesRequest(), metadata=md),
        "DeleteRule": lambda: stub.DeleteRule(pb.DeleteRuleRequest(id="grpc.rule"), metadata=md),
        "GetServerInfo": lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md),
        "WatchJobs": lambda: next(
            iter(stub.WatchJobs(pb.WatchJobsRequest(include_snapshot=True), metadata=md))
        ),
        "DeleteJob": lambda: stub.DeleteJob(pb.DeleteJobRequest(id=JOB), metadata=md),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = "OK"
        except grpc.RpcError as error:
            codes[name] = error.code().name  # type: ignore[attr-defined]
            if error.code() is grpc.StatusCode.PERMISSION_DENIED:  # type: ignore[attr-defined]
                assert error.details().startswith("permission denied: ")  # type: ignore[attr-defined]
    return codes


def test_grpc_roles(server: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)

        def bearer(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        admin = grpc_calls(stub, bearer(ADMIN))
        assert set(admin.values()) == {"OK"}, admin

        client = grpc_calls(stub, bearer(CLIENT))
        denied = {name for name, code in client.items() if code == "PERMISSION_DENIED"}
        assert denied == {"SetRule", "DeleteRule"}
        assert client["GetRule"] == "NOT_FOUND"  # it may read rules; this one is gone
        assert {client[n] for n in client if n not in denied | {"GetRule"}} == {"OK"}

        stub.SetJob(pb.SetJobRequest(id=JOB, execute_at=AT), metadata=bearer(ADMIN))
        read = grpc_calls(stub, bearer(READ))
        denied = {name for name, code in read.items() if code == "PERMISSION_DENIED"}
        assert denied == {
            "SetJob",
            "SetJobs",
            "StreamSetJobs",
            "SetRule",
            "DeleteRule",
            "DeleteJob",
        }
        assert read["WatchJobs"] == "OK" and read["GetJob"] == "OK"
        got = stub.GetJob(pb.GetJobRequest(id=JOB), metadata=bearer(READ))
        assert got.job.execute_at == AT  # the read token's SetJob changed nothing

        for md in ([], bearer("wrong"), [("authorization", ADMIN)]):
            assert set(grpc_calls(stub, md).values()) == {"UNAUTHENTICATED"}

        health = health_pb2_grpc.HealthStub(channel)  # probes need no token
        assert health.Check(health_pb2.HealthCheckRequest()).status == 1
    assert ADMIN not in server.log_text() and "wrong" not in server.log_text()


def test_terminal_client_says_permission_denied(server: ServerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KAIROI_SERVER", "KAIROI_TOKEN")}
    env.update(KAIROI_SERVER=f"127.0.0.1:{server.grpc_port}", KAIROI_TOKEN=READ)
    done = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "rule", "set", "r", "app.", "shell", "/x.sh"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(
        "kairoi-trio: PERMISSION_DENIED: permission denied: a read token may not set rules"
    ), done.stderr
    env["KAIROI_TOKEN"] = CLIENT
    done = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "job", "set", "a.b", "2040-01-01 00:00:00"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
