"""protobuf <-> commands and model: what the gRPC edge accepts, refuses and sends back."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from kairoi.v1 import scheduler_pb2 as pb
from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.validation import MAX_ATTEMPTS, MAX_POLICY_SECONDS
from kairoi_trio.model import (
    AmqpRunner,
    HttpRunner,
    Job,
    JobEvent,
    Rule,
    RulePolicy,
    ShellRunner,
    Status,
    from_datetime,
)
from kairoi_trio.protocols.grpc import convert


def invalid(fn, *args) -> str:
    with pytest.raises(CommandError) as info:
        fn(*args)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value.message


# -- times ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "us", [0, 1, 1_590_531_978_123_456, -1, -1_000_001, 253_402_300_799_999_999]
)
def test_timestamp_round_trip_is_exact_to_the_microsecond(us: int) -> None:
    ts = convert.timestamp_from_micros(us)
    assert 0 <= ts.nanos < 10**9
    assert convert.micros_from_timestamp(ts, "t") == us


def test_timestamp_drops_nanoseconds_below_a_microsecond() -> None:
    assert convert.micros_from_timestamp(Timestamp(seconds=1, nanos=1_999), "t") == 1_000_001


def test_timestamp_matches_the_models_datetime_conversion() -> None:
    from datetime import UTC, datetime

    dt = datetime(2020, 5, 26, 22, 26, 18, 5, tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(dt)
    assert convert.micros_from_timestamp(ts, "t") == from_datetime(dt)


@pytest.mark.parametrize(
    "ts",
    [
        Timestamp(seconds=253_402_300_800),  # year 10000
        Timestamp(seconds=-62_135_596_801),  # before year 1
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=10**9),
    ],
)
def test_out_of_range_timestamps_are_invalid(ts: Timestamp) -> None:
    assert "execute_at" in invalid(convert.micros_from_timestamp, ts, "execute_at")


# -- jobs -------------------------------------------------------------------------------


def test_set_job_request_becomes_a_set_job_command() -> None:
    request = pb.SetJobRequest(
        id="app.x", execute_at=Timestamp(seconds=10, nanos=5000), payload=b"p"
    )
    assert convert.set_job_from_pb(request) == c.SetJob("app.x", 10_000_005, b"p")


def test_set_job_without_a_time_is_invalid() -> None:
    assert "execute_at is required" in invalid(convert.set_job_from_pb, pb.SetJobRequest(id="a"))


def test_empty_id_is_left_to_the_core_to_refuse() -> None:
    # The actor validates ids for both protocols; the edge only converts.
    command = convert.set_job_from_pb(pb.SetJobRequest(execute_at=Timestamp()))
    assert command.id == ""


def test_job_to_pb_carries_every_field() -> None:
    job = Job("a", 1_500_000, Status.FAILED, b"\x00\xff", 3, "exit 2", 2_000_001)
    message = convert.job_to_pb(job)
    assert message.id == "a"
    assert (message.execute_at.seconds, message.execute_at.nanos) == (1, 500_000_000)
    assert message.status == pb.JOB_STATUS_FAILED
    assert message.payload == b"\x00\xff"
    assert message.attempts == 3
    assert message.last_outcome == "exit 2"
    assert (message.updated_at.seconds, message.updated_at.nanos) == (2, 1000)


def test_job_never_changed_has_no_updated_at() -> None:
    assert not convert.job_to_pb(Job("a", 0)).HasField("updated_at")


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (pb.JOB_STATUS_UNSPECIFIED, None),
        (pb.JOB_STATUS_PLANNED, Status.PLANNED),
        (pb.JOB_STATUS_TRIGGERED, Status.TRIGGERED),
        (pb.JOB_STATUS_EXECUTED, Status.EXECUTED),
        (pb.JOB_STATUS_FAILED, Status.FAILED),
    ],
)
def test_status_filter(value: int, status: Status | None) -> None:
    assert convert.job_status_from_pb(value) is status


def test_unknown_status_number_is_invalid() -> None:
    # proto3 enums are open: a newer client can send a number this server does not know.
    assert "unknown job status 42" in invalid(convert.job_status_from_pb, 42)


def test_list_jobs_request() -> None:
    request = pb.ListJobsRequest(prefix="app.", status=pb.JOB_STATUS_PLANNED, page_token="app.9")
    assert convert.list_jobs_from_pb(request) == c.ListJobs("app.", Status.PLANNED, "app.9", 100)


@pytest.mark.parametrize(("asked", "got"), [(0, 100), (1, 1), (1000, 1000), (5000, 1000)])
def test_page_size_defaults_and_cap(asked: int, got: int) -> None:
    assert convert.list_jobs_from_pb(pb.ListJobsRequest(page_size=asked)).limit == got


def test_negative_page_size_is_invalid() -> None:
    invalid(convert.list_jobs_from_pb, pb.ListJobsRequest(page_size=-1))


@pytest.mark.parametrize(
    ("status", "deleted", "kind"),
    [
        (Status.PLANNED, False, pb.JOB_EVENT_TYPE_SET),
        (Status.TRIGGERED, False, pb.JOB_EVENT_TYPE_TRIGGERED),
        (Status.EXECUTED, False, pb.JOB_EVENT_TYPE_EXECUTED),
        (Status.FAILED, False, pb.JOB_EVENT_TYPE_FAILED),
        (Status.PLANNED, True, pb.JOB_EVENT_TYPE_DELETED),
    ],
)
def test_event_type_follows_the_status(status: Status, deleted: bool, kind: int) -> None:
    message = convert.job_event_to_pb(JobEvent(Job("a", 0, status), deleted=deleted, at=7))
    assert message.type == kind
    assert message.at.nanos == 7000


def test_snapshot_events_have_no_time() -> None:
    message = convert.snapshot_event_to_pb(Job("a", 0, Status.EXECUTED))
    assert message.type == pb.JOB_EVENT_TYPE_EXECUTED
    assert not message.HasField("at")


# -- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "runner",
    [
        ShellRunner("/bin/job.sh"),
        AmqpRunner("amqp://u:p@h:5672/v", "ex", "rk"),
        HttpRunner("http://h/hook"),
    ],
)
def test_rule_round_trip(runner) -> None:
    rule = Rule("r1", "app.", runner)
    assert convert.rule_from_pb(convert.rule_to_pb(rule)) == rule


def test_rule_without_runner_is_invalid() -> None:
    assert "runner" in invalid(convert.rule_from_pb, pb.Rule(id="r", pattern="a"))


def test_policy_defaults_when_unset() -> None:
    rule = pb.Rule(id="r", pattern="a", shell=pb.ShellRunner(command="x"))
    assert convert.rule_from_pb(rule).policy == RulePolicy()


def test_policy_round_trip() -> None:
    policy = RulePolicy(
        timeout_s=2.5, max_attempts=4, backoff_initial_s=0.25, backoff_max_s=60, stale_after_s=3600
    )
    rule = Rule("r", "a", ShellRunner("x"), policy)
    message = convert.rule_to_pb(rule)
    assert message.policy.timeout == Duration(seconds=2, nanos=500_000_000)
    assert convert.rule_from_pb(message) == rule


def test_negative_duration_is_invalid() -> None:
    rule = pb.Rule(
        id="r",
        pattern="a",
        shell=pb.ShellRunner(command="x"),
        policy=pb.RulePolicy(timeout=Duration(seconds=-1)),
    )
    assert "policy.timeout" in invalid(convert.rule_from_pb, rule)


def test_list_rules_request() -> None:
    request = pb.ListRulesRequest(prefix="r", page_size=5, page_token="r3")
    assert convert.list_rules_from_pb(request) == c.ListRules("r", "r3", 5)


# -- errors and info ------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_a_grpc_status(code: ErrorCode) -> None:
    status = convert.status_code(CommandError(code, "m"))
    assert status.name == code.name


def test_error_status_in_a_batch_uses_the_grpc_code_number() -> None:
    status = convert.error_status(CommandError(ErrorCode.FAILED_PRECONDITION, "triggered"))
    assert (status.code, status.message) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "triggered",
    )


def test_server_info() -> None:
    info = c.ServerInfo("1.2.3", 5_000_000, {Status.PLANNED: 3, Status.FAILED: 1}, 2)
    message = convert.server_info_to_pb(info)
    assert message.version == "1.2.3"
    assert message.started_at.seconds == 5
    assert (message.jobs.planned, message.jobs.triggered, message.jobs.failed) == (3, 0, 1)
    assert message.rules == 2


YEAR_S = 365 * 86_400


def shell_rule_with(policy: pb.RulePolicy) -> pb.Rule:
    return pb.Rule(id="r", pattern="a", shell=pb.ShellRunner(command="x"), policy=policy)


@pytest.mark.parametrize(
    ("policy", "named"),
    [
        # the issue: a 10,000-year backoff planned a retry in year ~12027
        (
            pb.RulePolicy(backoff_initial=Duration(seconds=10_000 * YEAR_S)),
            "policy.backoff_initial",
        ),
        (pb.RulePolicy(backoff_max=Duration(seconds=10_000 * YEAR_S)), "policy.backoff_max"),
        (pb.RulePolicy(timeout=Duration(seconds=101 * YEAR_S)), "policy.timeout"),
        (pb.RulePolicy(timeout=Duration()), "policy.timeout"),  # set to 0: not "none"
        (pb.RulePolicy(stale_after=Duration(seconds=101 * YEAR_S)), "policy.stale_after"),
        (pb.RulePolicy(max_attempts=1001), "policy.max_attempts"),
        (pb.RulePolicy(max_attempts=4_294_967_295), "policy.max_attempts"),
    ],
    ids=lambda v: str(v).replace("\n", " ")[:40],
)
def test_policy_values_beyond_the_bounds_are_invalid_and_named(
    policy: pb.RulePolicy, named: str
) -> None:
    reason = invalid(convert.rule_from_pb, shell_rule_with(policy))
    assert named in reason
    assert "100 years" in reason or "1 to 1000" in reason


def test_policy_values_at_the_bounds_are_accepted() -> None:
    most = Duration(seconds=MAX_POLICY_SECONDS)
    policy = pb.RulePolicy(
        timeout=most, max_attempts=MAX_ATTEMPTS, backoff_initial=most, backoff_max=most
    )
    converted = convert.rule_from_pb(shell_rule_with(policy)).policy
    assert (converted.max_attempts, converted.backoff_max_s) == (MAX_ATTEMPTS, MAX_POLICY_SECONDS)
    zero = pb.RulePolicy(backoff_initial=Duration(), backoff_max=Duration(), stale_after=Duration())
    converted = convert.rule_from_pb(shell_rule_with(zero)).policy
    assert (converted.backoff_initial_s, converted.stale_after_s) == (0, 0)
