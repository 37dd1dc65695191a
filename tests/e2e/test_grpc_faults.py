"""gRPC faults against a real server: errors about huge ids, and malformed protobuf.

Raw bytes go through a real gRPC channel with an identity serializer, from a
second process, so that nothing in the test process's protobuf runtime fixes
them up on the way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

LONG_IDS = {
    "16,000 bytes": "j" * 16_000,
    "65,535 bytes": "x" * 65_535,
    "60,000 bytes of é": "\u00e9" * 30_000,
}
LATER = Timestamp(seconds=2_208_988_800)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def assert_cut(error: grpc.RpcError, code: grpc.StatusCode, value: str) -> None:
    details = error.details()  # type: ignore[attr-defined]
    assert error.code() is code, (error.code(), details[:300])  # type: ignore[attr-defined]
    assert f"... ({len(value) - 200} more characters)" in details
    assert value[:200] in details and value[:201] not in details
    assert len(details) <= 1100


@pytest.mark.parametrize("name", list(LONG_IDS))
def test_errors_about_huge_ids_keep_their_status(
    make_server: Callable[..., ServerProcess], tmp_path: Path, name: str
) -> None:
    long_id = LONG_IDS[name]
    slow = tmp_path / "slow.sh"
    slow.write_text("sleep 60\n")
    allowed = tmp_path / "allowed.sh"
    allowed.write_text("exit 0\n")
    server = make_server(f'[runners.shell]\nallowed_commands = ["{allowed}", "{slow}"]')
    with grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}", options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        not_found = grpc.StatusCode.NOT_FOUND
        assert_cut(rpc_error(lambda: stub.GetJob(pb.GetJobRequest(id=long_id))), not_found, long_id)
        assert_cut(
            rpc_error(lambda: stub.DeleteJob(pb.DeleteJobRequest(id=long_id))), not_found, long_id
        )
        assert_cut(
            rpc_error(lambda: stub.GetRule(pb.GetRuleRequest(id=long_id))), not_found, long_id
        )
        assert_cut(
            rpc_error(lambda: stub.DeleteRule(pb.DeleteRuleRequest(id=long_id))),
            not_found,
            long_id,
        )
        # a command that is not allowed, quoted by the core's own check
        command = "/" + long_id[1:]  # at most 65,535 bytes
        rule = pb.Rule(id="r", pattern="", shell=pb.ShellRunner(command=command))
        error = rpc_error(lambda: stub.SetRule(pb.SetRuleRequest(rule=rule)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "more characters) is not in the allowed list" in error.details()  # type: ignore[attr-defined]
        # a triggered job: SetJob, DeleteJob and a SetJobs entry refuse it by its id
        rule = pb.Rule(id="slow", pattern=long_id[:10], shell=pb.ShellRunner(command=str(slow)))
        stub.SetRule(pb.SetRuleRequest(rule=rule))
        stub.SetJob(pb.SetJobRequest(id=long_id, execute_at=Timestamp(seconds=1)))
        wait_for(lambda: _status(stub, long_id) == pb.JOB_STATUS_TRIGGERED)
        precondition = grpc.StatusCode.FAILED_PRECONDITION
        again = pb.SetJobRequest(id=long_id, execute_at=LATER)
        assert_cut(rpc_error(lambda: stub.SetJob(again)), precondition, long_id)
        assert_cut(
            rpc_error(lambda: stub.DeleteJob(pb.DeleteJobRequest(id=long_id))),
            precondition,
            long_id,
        )
        [result] = stub.SetJobs(pb.SetJobsRequest(jobs=[again])).results
        assert result.status.code == precondition.value[0]
        assert f"... ({len(long_id) - 200} more characters)" in result.status.message
        assert len(result.status.message) <= 1100
    with KcpClient(server.kcp_port) as kcp:  # KCP has no trailer: its answer quotes the id whole
        assert kcp.request("GET", "no." + long_id) == ["ERROR", f"no job no.{long_id}"]


def _status(stub: pb_grpc.SchedulerStub, job_id: str) -> int:
    return stub.GetJob(pb.GetJobRequest(id=job_id)).job.status


# -- malformed protobuf --------------------------------------------------------------------

RAW_CLIENT = """
import json, os, sys, grpc
channel = grpc.insecure_channel("127.0.0.1:" + os.environ["PORT"])
md = [("authorization", "Bearer " + os.environ["TOKEN"])] if os.environ.get("TOKEN") else []
raw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
GARBAGE = b"\\xff\\xff\\xff\\xff"

def outcome(call):
    try:
        result = call()
        if not isinstance(result, bytes):  # a stream: read it
            result = list(result)
        return {"code": "OK"}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details()}

kw = dict(metadata=md, timeout=10)
kinds = {
    "/kairoi.v1.Scheduler/GetJob": "unary_unary",
    "/kairoi.v1.Scheduler/SetJob": "unary_unary",
    "/grpc.health.v1.Health/Check": "unary_unary",
    "/kairoi.v1.Scheduler/WatchJobs": "unary_stream",
    "/grpc.health.v1.Health/Watch": "unary_stream",
    "/kairoi.v1.Scheduler/StreamSetJobs": "stream_unary",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "stream_stream",
}
results = {}
for method, kind in kinds.items():
    call = getattr(channel, kind)(method, **raw)
    request = iter([GARBAGE]) if kind.startswith("stream") else GARBAGE
    results[method] = outcome(lambda: call(request, **kw))
# a valid request still works on the same channel
from kairoi.v1 import scheduler_pb2 as pb
info = channel.unary_unary("/kairoi.v1.Scheduler/GetServerInfo", **raw)
results["valid"] = outcome(lambda: info(pb.GetServerInfoRequest().SerializeToString(), **kw))
print(json.dumps(results))
"""


def run_raw_client(server: ServerProcess, token: str = "") -> dict[str, dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RAW_CLIENT)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PORT=str(server.grpc_port), TOKEN=token),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_malformed_protobuf_is_invalid_argument_and_one_json_log_line(
    server: ServerProcess,
) -> None:
    results = run_raw_client(server)
    assert results.pop("valid") == {"code": "OK"}
    for method, result in results.items():
        assert result["code"] == "INVALID_ARGUMENT", (method, result)
        assert result["details"].startswith("malformed request: Error parsing message"), result
    server.stop()
    # Every line the server wrote is one JSON object: no plain-text traceback.
    for line in server.lines:
        assert isinstance(json.loads(line), dict), line
    assert "Traceback" not in server.log_text()
    logged = server.events("grpc malformed request")
    assert logged[0]["count"] == 1 and logged[0]["method"] == "/kairoi.v1.Scheduler/GetJob"
    assert logged[0]["peer"].startswith("ipv")
    assert sum(e["count"] for e in logged) <= len(results)  # the rest of the window is summed


def test_malformed_protobuf_without_a_token_is_unauthenticated(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server('[auth]\ntokens = ["tok-1"]')
    results = run_raw_client(server)
    assert results["/kairoi.v1.Scheduler/GetJob"]["code"] == "UNAUTHENTICATED"
    assert results["/kairoi.v1.Scheduler/StreamSetJobs"]["code"] == "UNAUTHENTICATED"
    assert results["/grpc.health.v1.Health/Check"]["code"] == "INVALID_ARGUMENT"  # open service
    with_token = run_raw_client(server, token="tok-1")
    assert with_token["/kairoi.v1.Scheduler/GetJob"]["code"] == "INVALID_ARGUMENT"
    assert with_token["valid"] == {"code": "OK"}


LIBRARY_ERROR = """
import logging
from kairoi_trio.observability.logging import configure_logging
configure_logging("info", "{fmt}")
try:
    raise ValueError("deep inside")
except ValueError:
    logging.getLogger("grpc._cython.cygrpc").exception("Unexpected [%s] raised", "ValueError")
logging.getLogger("trio").debug("below the level")
"""


def test_a_librarys_traceback_is_one_json_line_with_json_logs() -> None:
    # grpc and trio log through the standard library; with format = "json" their
    # records, tracebacks included, are rendered like kairoi-trio's own.
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_ERROR.format(fmt="json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    [line] = done.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "Unexpected [ValueError] raised"
    assert record["level"] == "error" and record["logger"] == "grpc._cython.cygrpc"
    assert record["exception"].startswith("Traceback") and "deep inside" in record["exception"]
    assert record["timestamp"].endswith("Z")
    console = subprocess.run(
        [sys.executable, "-c", LIBRARY_ERROR.format(fmt="console")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unexpected [ValueError] raised" in console.stderr and "deep inside" in console.stderr
