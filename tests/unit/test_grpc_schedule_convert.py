"""Recurring jobs at the gRPC edge: Schedule messages <-> model.Schedule/Recurrence,
what the edge refuses before the actor sees it, and the new RPCs' wiring to the
commands (with a stand-in bridge: no server, no actor)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
import trio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from kairoi.v1 import scheduler_pb2 as pb
from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.auth import Role, permitted
from kairoi_trio.model import (
    MICROS,
    Job,
    Misfire,
    Overlap,
    Recurrence,
    Schedule,
    Status,
    from_datetime,
)
from kairoi_trio.protocols.grpc import convert
from kairoi_trio.protocols.grpc.server import (
    METHOD_COMMANDS,
    SchedulerServicer,
)

START = from_datetime(datetime(2030, 1, 1, 8, 0, 0, 123456, tzinfo=UTC))
END = from_datetime(datetime(2031, 1, 1, tzinfo=UTC))


def invalid(fn: Any, *args: Any) -> str:
    with pytest.raises(CommandError) as info:
        fn(*args)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value.message


def ts(us: int) -> Timestamp:
    return convert.timestamp_from_micros(us)


# -- Schedule in ---------------------------------------------------------------------------


def test_every_field_of_a_schedule_reaches_the_model() -> None:
    message = pb.Schedule(
        expression="*/15 9-17 * * MON-FRI",
        time_zone="Europe/Paris",
        start=Timestamp(seconds=START // MICROS, nanos=123_456_789),  # ns below a µs dropped
        end=ts(END),
        max_runs=10,
        jitter=Duration(seconds=30, nanos=500_000_999),
        misfire=pb.MISFIRE_POLICY_ALL,
        catchup_window=Duration(seconds=3600),
        overlap=pb.OVERLAP_POLICY_BUFFER_ONE,
    )
    assert convert.schedule_from_pb(message) == Schedule(
        expression="*/15 9-17 * * MON-FRI",
        tz="Europe/Paris",
        start=START,
        end=END,
        max_runs=10,
        jitter_us=30_500_000,
        misfire=Misfire.ALL,
        catchup_window_us=3600 * MICROS,
        overlap=Overlap.BUFFER_ONE,
    )


def test_unset_fields_take_the_defaults() -> None:
    """Only the expression is required; unspecified enums are coalesce and skip."""
    schedule = convert.schedule_from_pb(pb.Schedule(expression="@daily"))
    assert schedule == Schedule("@daily")
    assert (schedule.tz, schedule.start, schedule.end, schedule.max_runs) == (
        "UTC",
        None,
        None,
        None,
    )
    assert (schedule.jitter_us, schedule.catchup_window_us) == (0, None)
    assert (schedule.misfire, schedule.overlap) == (Misfire.COALESCE, Overlap.SKIP)


@pytest.mark.parametrize(
    ("value", "misfire"),
    [
        (pb.MISFIRE_POLICY_UNSPECIFIED, Misfire.COALESCE),
        (pb.MISFIRE_POLICY_COALESCE, Misfire.COALESCE),
        (pb.MISFIRE_POLICY_ALL, Misfire.ALL),
        (pb.MISFIRE_POLICY_SKIP, Misfire.SKIP),
    ],
)
def test_misfire_policies(value: int, misfire: Misfire) -> None:
    message = pb.Schedule(expression="@hourly", misfire=value)  # type: ignore[arg-type]
    assert convert.schedule_from_pb(message).misfire is misfire


@pytest.mark.parametrize(
    ("value", "overlap"),
    [
        (pb.OVERLAP_POLICY_UNSPECIFIED, Overlap.SKIP),
        (pb.OVERLAP_POLICY_SKIP, Overlap.SKIP),
        (pb.OVERLAP_POLICY_BUFFER_ONE, Overlap.BUFFER_ONE),
    ],
)
def test_overlap_policies(value: int, overlap: Overlap) -> None:
    message = pb.Schedule(expression="@hourly", overlap=value)  # type: ignore[arg-type]
    assert convert.schedule_from_pb(message).overlap is overlap


def test_a_zero_duration_is_kept_as_zero_not_as_unset() -> None:
    """An explicit catchup_window of 0 is a value the actor judges; unset is 'no bound'."""
    message = pb.Schedule(expression="@hourly", catchup_window=Duration(), jitter=Duration())
    schedule = convert.schedule_from_pb(message)
    assert (schedule.catchup_window_us, schedule.jitter_us) == (0, 0)


def test_output_only_fields_are_ignored_on_input() -> None:
    message = pb.Schedule(
        expression="every 15m", paused=True, runs=7, skipped=3, scheduled_at=ts(START)
    )
    assert convert.schedule_from_pb(message) == Schedule("every 15m")


def test_the_expression_is_passed_as_given_for_the_actor_to_judge() -> None:
    """The edge checks syntax only: a bad cron expression or zone is the actor's call."""
    message = pb.Schedule(expression="61 * * * *", time_zone="Mars/Olympus")
    assert convert.schedule_from_pb(message) == Schedule("61 * * * *", tz="Mars/Olympus")


@pytest.mark.parametrize("expression", ["", "   "])
def test_an_empty_expression_is_refused(expression: str) -> None:
    message = invalid(convert.schedule_from_pb, pb.Schedule(expression=expression))
    assert message.startswith("schedule.expression is required")


@pytest.mark.parametrize("name", ["jitter", "catchup_window"])
@pytest.mark.parametrize(
    "duration",
    [Duration(seconds=-1), Duration(seconds=0, nanos=-1), Duration(seconds=-1, nanos=-5)],
)
def test_negative_durations_are_refused(name: str, duration: Duration) -> None:
    message = pb.Schedule(expression="@hourly", **{name: duration})
    assert invalid(convert.schedule_from_pb, message) == (
        f"schedule.{name} must be a non-negative duration"
    )


@pytest.mark.parametrize(
    "duration", [Duration(seconds=1, nanos=10**9), Duration(seconds=315_576_000_001)]
)
def test_malformed_durations_are_refused(duration: Duration) -> None:
    message = pb.Schedule(expression="@hourly", jitter=duration)
    assert "schedule.jitter is not a valid duration" in invalid(convert.schedule_from_pb, message)


@pytest.mark.parametrize("name", ["start", "end"])
@pytest.mark.parametrize(
    "bad",
    [Timestamp(seconds=253_402_300_800), Timestamp(seconds=-62_135_596_801), Timestamp(nanos=-1)],
)
def test_timestamps_outside_the_supported_range_are_refused(name: str, bad: Timestamp) -> None:
    message = pb.Schedule(expression="@hourly", **{name: bad})
    assert invalid(convert.schedule_from_pb, message).startswith(
        f"schedule.{name} is not a valid timestamp"
    )


@pytest.mark.parametrize(("name", "value"), [("misfire", 9), ("overlap", 7)])
def test_unknown_enum_values_are_refused(name: str, value: int) -> None:
    # An enum value the stubs do not know, on purpose.
    message = pb.Schedule(expression="@hourly", **{name: value})  # type: ignore[arg-type]
    assert invalid(convert.schedule_from_pb, message) == f"unknown schedule.{name} policy {value}"


# -- requests --------------------------------------------------------------------------------


def test_schedule_job_request_becomes_a_schedule_job_command() -> None:
    request = pb.ScheduleJobRequest(
        id="app.report",
        schedule=pb.Schedule(expression="0 9 * * *", time_zone="America/New_York"),
        payload=b"\x00p",
    )
    assert convert.schedule_job_from_pb(request) == c.ScheduleJob(
        "app.report", Schedule("0 9 * * *", tz="America/New_York"), b"\x00p"
    )


def test_a_schedule_job_request_without_a_schedule_is_refused() -> None:
    message = invalid(convert.schedule_job_from_pb, pb.ScheduleJobRequest(id="a"))
    assert message.startswith("schedule is required")


@pytest.mark.parametrize("count", [1, 5, 1000])
def test_preview_counts_from_1_to_1000(count: int) -> None:
    request = pb.PreviewJobRequest(id="a", count=count)
    assert convert.preview_job_from_pb(request) == c.PreviewJob("a", count)


@pytest.mark.parametrize("count", [0, 1001, 2**32 - 1])
def test_preview_counts_outside_1_to_1000_are_refused(count: int) -> None:
    message = invalid(convert.preview_job_from_pb, pb.PreviewJobRequest(id="a", count=count))
    assert message == f"count must be 1 to 1000, not {count}"


def test_preview_times_keep_their_order_and_microseconds() -> None:
    times = [START, START + 1, START + 15 * 60 * MICROS, -1]
    response = convert.preview_to_pb(times)
    assert [convert.micros_from_timestamp(t, "t") for t in response.occurrences] == times


# -- Schedule out ------------------------------------------------------------------------------


def _recurring(schedule: Schedule, **state: Any) -> Job:
    recurrence = Recurrence(schedule, nominal=state.pop("nominal", START), **state)
    return Job("app.r", START + 7, Status.PLANNED, b"p", 0, "", 1, recurrence)


def test_a_recurring_job_shows_its_schedule_and_where_it_stands() -> None:
    schedule = Schedule(
        "0 9 * * *",
        tz="Europe/Paris",
        start=START,
        end=END,
        max_runs=3,
        jitter_us=1_500_001,
        misfire=Misfire.SKIP,
        catchup_window_us=60 * MICROS,
        overlap=Overlap.BUFFER_ONE,
    )
    message = convert.job_to_pb(_recurring(schedule, runs=2, skipped=5, paused=True))
    assert message.HasField("schedule")
    shown = message.schedule
    assert (shown.expression, shown.time_zone, shown.max_runs) == ("0 9 * * *", "Europe/Paris", 3)
    assert convert.micros_from_timestamp(shown.start, "start") == START
    assert convert.micros_from_timestamp(shown.end, "end") == END
    assert (shown.jitter.seconds, shown.jitter.nanos) == (1, 500_001_000)
    assert (shown.catchup_window.seconds, shown.catchup_window.nanos) == (60, 0)
    assert (shown.misfire, shown.overlap) == (pb.MISFIRE_POLICY_SKIP, pb.OVERLAP_POLICY_BUFFER_ONE)
    assert (shown.paused, shown.runs, shown.skipped) == (True, 2, 5)
    assert convert.micros_from_timestamp(shown.scheduled_at, "scheduled_at") == START
    assert convert.micros_from_timestamp(message.execute_at, "execute_at") == START + 7


def test_defaults_are_sent_explicitly_and_absent_bounds_unset() -> None:
    """Policies are sent by name (never UNSPECIFIED); no start, end, jitter or window: unset."""
    shown = convert.job_to_pb(_recurring(Schedule("@hourly"))).schedule
    assert (shown.misfire, shown.overlap) == (pb.MISFIRE_POLICY_COALESCE, pb.OVERLAP_POLICY_SKIP)
    assert shown.time_zone == "UTC" and shown.max_runs == 0
    for name in ("start", "end", "jitter", "catchup_window"):
        assert not shown.HasField(name), name
    assert not shown.paused and shown.HasField("scheduled_at")


def test_a_one_shot_job_has_no_schedule() -> None:
    message = convert.job_to_pb(Job("app.once", START))
    assert not message.HasField("schedule")


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule("@daily"),
        Schedule("every 90s", start=START),
        Schedule(
            "PT15M",
            tz="Asia/Tokyo",
            start=START,
            end=END,
            max_runs=1,
            jitter_us=1,
            misfire=Misfire.ALL,
            catchup_window_us=0,
            overlap=Overlap.BUFFER_ONE,
        ),
    ],
)
def test_a_schedule_sent_back_reads_as_the_same_schedule(schedule: Schedule) -> None:
    """A client may pass the schedule it got back into ScheduleJob unchanged."""
    shown = convert.job_to_pb(_recurring(schedule, runs=4, paused=True)).schedule
    assert convert.schedule_from_pb(shown) == schedule


def test_watch_events_carry_the_schedule() -> None:
    from kairoi_trio.model import JobEvent

    event = convert.job_event_to_pb(JobEvent(_recurring(Schedule("@hourly")), at=5))
    assert event.job.schedule.expression == "@hourly"


# -- the RPCs, with a stand-in bridge ----------------------------------------------------------


class _Bridge:
    """A stand-in actor: answers each batch with `answer(command)` and records the commands."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[c.Command] = []

    async def run(self, receive: trio.MemoryReceiveChannel[c.Request]) -> None:
        async for request in receive:
            self.sent.extend(request.commands)
            request.reply([self.answer(command) for command in request.commands])


class _Call:
    """Stands in for transport.Call: records how the servicer ended the call."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.answered: Any = None
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.ended = trio.Event()

    def answer(self, message: Any) -> None:
        self.answered = message
        self.ended.set()

    def fail(self, code: int, details: str) -> None:
        self.status = (next(s for s in grpc.StatusCode if s.value[0] == code), details)
        self.ended.set()


def _call(answer: Any, method: str, request: Any) -> tuple[Any, _Bridge, _Call]:
    """Call unary `method` of a SchedulerServicer whose actor answers with `answer`."""
    bridge = _Bridge(answer)
    call = _Call(method)

    async def run() -> Any:
        send, receive = trio.open_memory_channel[c.Request](16)
        servicer = SchedulerServicer(send, 4 << 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run, receive)
            servicer.begin(method, request, call)  # type: ignore[arg-type]
            await call.ended.wait()
            nursery.cancel_scope.cancel()
        return call.answered

    return trio.run(run), bridge, call


def test_schedule_job_rpc_sends_the_command_and_returns_the_job() -> None:
    job = _recurring(Schedule("@hourly", tz="Europe/Paris"))
    request = pb.ScheduleJobRequest(
        id="app.r", schedule=pb.Schedule(expression="@hourly", time_zone="Europe/Paris")
    )
    response, bridge, _ = _call(lambda command: job, "ScheduleJob", request)
    assert bridge.sent == [c.ScheduleJob("app.r", Schedule("@hourly", tz="Europe/Paris"))]
    assert response.job == convert.job_to_pb(job)


@pytest.mark.parametrize(
    ("method", "request_type", "command"),
    [
        ("PauseJob", pb.PauseJobRequest, c.PauseJob),
        ("ResumeJob", pb.ResumeJobRequest, c.ResumeJob),
        ("RunJobNow", pb.RunJobNowRequest, c.RunJobNow),
    ],
)
def test_pause_resume_and_run_now_rpcs(method: str, request_type: Any, command: type) -> None:
    job = _recurring(Schedule("@hourly"), paused=method == "PauseJob")
    response, bridge, _ = _call(lambda _: job, method, request_type(id="app.r"))
    assert bridge.sent == [command("app.r")]
    assert response.job.schedule.paused is (method == "PauseJob")


def test_preview_rpc_returns_the_occurrences() -> None:
    times = [START, START + 3600 * MICROS]
    response, bridge, _ = _call(
        lambda _: times, "PreviewJob", pb.PreviewJobRequest(id="a", count=2)
    )
    assert bridge.sent == [c.PreviewJob("a", 2)]
    assert [convert.micros_from_timestamp(t, "t") for t in response.occurrences] == times


def test_edge_errors_never_reach_the_actor() -> None:
    _, bridge, context = _call(lambda _: [], "PreviewJob", pb.PreviewJobRequest(id="a"))
    assert bridge.sent == []
    assert context.status == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "count must be 1 to 1000, not 0",
    )
    _, bridge, context = _call(lambda _: None, "ScheduleJob", pb.ScheduleJobRequest(id="a"))
    assert bridge.sent == [] and context.status is not None
    assert context.status[0] is grpc.StatusCode.INVALID_ARGUMENT


def test_actor_errors_become_their_status() -> None:
    def refuse(command: c.Command) -> CommandError:
        return CommandError(ErrorCode.FAILED_PRECONDITION, "job app.once is not recurring")

    _, _, context = _call(refuse, "PauseJob", pb.PauseJobRequest(id="app.once"))
    assert context.status == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "job app.once is not recurring",
    )


def test_the_new_rpcs_need_the_roles_of_their_commands() -> None:
    for method in ("ScheduleJob", "PauseJob", "ResumeJob", "RunJobNow"):
        assert permitted(Role.CLIENT, METHOD_COMMANDS[method]), method
        assert not permitted(Role.READ, METHOD_COMMANDS[method]), method
    assert permitted(Role.READ, METHOD_COMMANDS["PreviewJob"])
