"""Recurring jobs over gRPC against a real `kairoi-trio serve` process.

The typed Python client (clients/python) calls the server process; the raw
generated stubs send what the typed client would never build. Shell rules
write one line per run to a file, so the tests see the runs themselves.

Most tests share the module's server (`shared_server`, tests/e2e/conftest.py),
each with job and rule ids of its own (`prefix`); a test that restarts or
configures its server starts a fresh one.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = pytest.mark.backends("log", "postgres")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))  # the client package, uninstalled

from kairoi_client import (  # noqa: E402
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    JobStatus,
    KairoiError,
    Misfire,
    Overlap,
    Rule,
    Schedule,
    ShellRunner,
)

# 2031-03-30 is the last Sunday of March: Paris moves from UTC+1 to UTC+2.
START = datetime(2031, 3, 28, tzinfo=UTC)
END = datetime(2031, 12, 31, tzinfo=UTC)


@pytest.fixture
def client(shared_server: ServerProcess) -> Iterator[Client]:
    """A client of the module's shared server: ids start with the test's `prefix`."""
    with Client(f"127.0.0.1:{shared_server.grpc_port}") as c:
        yield c


@pytest.fixture
def stub(shared_server: ServerProcess) -> Iterator[pb_grpc.SchedulerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.grpc_port}") as channel:
        yield pb_grpc.SchedulerStub(channel)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """The file a `record` rule appends one line (the job id) to per run."""
    return tmp_path / "runs.txt"


@pytest.fixture
def record(tmp_path: Path, runs: Path) -> str:
    script = tmp_path / "record.sh"
    script.write_text(f'echo "$1" >> {runs}\n')
    return str(script)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# -- ScheduleJob and GetJob --------------------------------------------------------------------


def test_schedule_job_returns_the_first_occurrence_and_get_job_shows_the_schedule(
    client: Client,
    prefix: str,
) -> None:
    job = client.schedule_job(
        f"{prefix}app.report", "0 9 * * *", time_zone="Europe/Paris", start=START, payload=b"p"
    )
    first = datetime(2031, 3, 28, 8, 0, tzinfo=UTC)  # 09:00 in Paris, UTC+1
    assert (job.id, job.status, job.execute_at, job.payload) == (
        f"{prefix}app.report",
        JobStatus.PLANNED,
        first,
        b"p",
    )
    assert job.schedule == Schedule(
        "0 9 * * *",
        time_zone="Europe/Paris",
        start=START,
        misfire=Misfire.COALESCE,
        overlap=Overlap.SKIP,
        scheduled_at=first,
    )
    assert client.get_job(f"{prefix}app.report") == job
    assert client.preview_job(f"{prefix}app.report", 4)[1:] == [
        datetime(2031, 3, 29, 8, 0, tzinfo=UTC),
        datetime(2031, 3, 30, 7, 0, tzinfo=UTC),  # 09:00 in Paris, now UTC+2
        datetime(2031, 3, 31, 7, 0, tzinfo=UTC),
    ]


def test_every_option_is_stored_and_shown(client: Client, prefix: str) -> None:
    jitter = timedelta(minutes=10, microseconds=1)
    job = client.schedule_job(
        f"{prefix}app.all",
        "*/15 * * * *",
        start=START,
        end=END,
        max_runs=3,
        jitter=jitter,
        misfire="all",
        catchup_window=timedelta(hours=6),
        overlap=Overlap.BUFFER_ONE,
    )
    assert job.schedule == Schedule(
        "*/15 * * * *",
        time_zone="UTC",
        start=START,
        end=END,
        max_runs=3,
        jitter=jitter,
        misfire=Misfire.ALL,
        catchup_window=timedelta(hours=6),
        overlap=Overlap.BUFFER_ONE,
        scheduled_at=START,
    )
    assert START <= job.execute_at <= START + jitter  # the jitter, drawn once
    assert client.get_job(f"{prefix}app.all") == job


def test_an_interval_without_a_start_starts_one_interval_from_now(
    client: Client, prefix: str
) -> None:
    before = datetime.now(UTC)
    job = client.schedule_job(f"{prefix}app.hourly", "every 1h")
    after = datetime.now(UTC)
    assert job.schedule is not None and job.schedule.start is not None
    assert before + timedelta(hours=1) <= job.schedule.start <= after + timedelta(hours=1)
    assert job.execute_at == job.schedule.scheduled_at == job.schedule.start


@pytest.mark.parametrize(
    ("expression", "zone", "reason"),
    [
        ("61 * * * *", "UTC", "bad cron expression '61 * * * *'"),
        ("every day", "UTC", "not a duration"),
        ("0 9 * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("", "UTC", "schedule.expression is required"),
    ],
)
def test_bad_schedules_are_invalid_argument_with_the_reason(
    client: Client, prefix: str, expression: str, zone: str, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.schedule_job(f"{prefix}app.bad", expression, time_zone=zone)
    assert reason in info.value.message
    with pytest.raises(KairoiError, match=f"no job {prefix}app.bad"):
        client.get_job(f"{prefix}app.bad")


def test_requests_the_typed_client_would_not_send(stub: pb_grpc.SchedulerStub, prefix: str) -> None:
    no_schedule = rpc_error(lambda: stub.ScheduleJob(pb.ScheduleJobRequest(id=f"{prefix}app.x")))
    assert no_schedule.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert no_schedule.details().startswith("schedule is required")

    empty = pb.ScheduleJobRequest(id=f"{prefix}app.x", schedule=pb.Schedule())
    error = rpc_error(lambda: stub.ScheduleJob(empty))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("schedule.expression is required")

    negative = pb.Schedule(expression="@daily", jitter=Duration(seconds=-5))
    error = rpc_error(
        lambda: stub.ScheduleJob(pb.ScheduleJobRequest(id=f"{prefix}x", schedule=negative))
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "schedule.jitter must be a non-negative duration"

    unknown = pb.Schedule(expression="@daily", misfire=42)  # type: ignore[arg-type]
    error = rpc_error(
        lambda: stub.ScheduleJob(pb.ScheduleJobRequest(id=f"{prefix}x", schedule=unknown))
    )
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown schedule.misfire policy 42",
    )

    # Unspecified enums are the defaults: coalesce, skip.
    plain = pb.ScheduleJobRequest(id=f"{prefix}app.x", schedule=pb.Schedule(expression="@daily"))
    shown = stub.ScheduleJob(plain).job.schedule
    assert (shown.misfire, shown.overlap) == (pb.MISFIRE_POLICY_COALESCE, pb.OVERLAP_POLICY_SKIP)
    assert shown.time_zone == "UTC"

    for count in (0, 1001):
        request = pb.PreviewJobRequest(id=f"{prefix}app.x", count=count)
        error = rpc_error(lambda: stub.PreviewJob(request))  # noqa: B023
        assert (error.code(), error.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"count must be 1 to 1000, not {count}",
        )


def test_a_schedule_with_no_occurrence_is_invalid(client: Client, prefix: str) -> None:
    past = datetime(2020, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidArgument):
        client.schedule_job(f"{prefix}app.over", "@daily", start=past, end=past + timedelta(days=3))


# -- PreviewJob -------------------------------------------------------------------------------


def test_preview_returns_n_increasing_times(client: Client, prefix: str) -> None:
    job = client.schedule_job(f"{prefix}app.q", "*/15 * * * *", start=START)
    times = client.preview_job(f"{prefix}app.q", 5)
    assert len(times) == 5
    assert all(t.tzinfo is not None for t in times)
    assert times[0] >= job.execute_at
    assert [b - a for a, b in zip(times, times[1:], strict=False)] == [timedelta(minutes=15)] * 4
    assert len(client.preview_job(f"{prefix}app.q", 1000)) == 1000
    assert len(client.preview_job(f"{prefix}app.q")) == 5  # the default


def test_preview_stops_at_the_end_of_the_schedule(client: Client, prefix: str) -> None:
    client.schedule_job(f"{prefix}app.few", "@daily", start=START, end=START + timedelta(days=2))
    assert client.preview_job(f"{prefix}app.few", 10) == [
        START + timedelta(days=d) for d in range(3)
    ]


# -- SetJob on a recurring id ------------------------------------------------------------------


def test_set_job_on_a_recurring_id_makes_it_one_shot(client: Client, prefix: str) -> None:
    client.schedule_job(f"{prefix}app.r", "@hourly", start=START)
    at = datetime(2040, 1, 1, tzinfo=UTC)
    job = client.set_job(f"{prefix}app.r", at)
    assert (job.execute_at, job.schedule) == (at, None)
    assert client.get_job(f"{prefix}app.r").schedule is None
    with pytest.raises(FailedPrecondition, match="not recurring"):
        client.pause_job(f"{prefix}app.r")
    with pytest.raises(FailedPrecondition, match="not recurring"):
        client.preview_job(f"{prefix}app.r")


# -- pause, resume, run now ----------------------------------------------------------------------


def test_pause_survives_a_restart_and_resume_runs_again(
    make_server: Callable[..., ServerProcess], record: str, runs: Path
) -> None:
    server = make_server()
    with Client(f"127.0.0.1:{server.grpc_port}") as client:
        client.set_rule(Rule("tick", "tick.", ShellRunner(record)))
        client.schedule_job("tick.1", "every 1s")
        wait_for(lambda: len(lines(runs)) >= 1)
        paused = client.pause_job("tick.1")
        assert paused.schedule is not None and paused.schedule.paused
        assert client.get_job("tick.1").schedule.paused  # type: ignore[union-attr]
        time.sleep(1.0)  # a run in flight when it was paused ends meanwhile
        count = len(lines(runs))
        time.sleep(1.5)  # an `every 1s` job would have run
        assert len(lines(runs)) == count, "a paused job ran"

    server.restart()  # SIGTERM, then a new process on the same data directory
    with Client(f"127.0.0.1:{server.grpc_port}") as client:
        job = client.get_job("tick.1")
        assert job.schedule is not None and job.schedule.paused
        time.sleep(1.5)
        assert len(lines(runs)) == count, "a paused job ran after a restart"
        resumed = client.resume_job("tick.1")
        assert resumed.schedule is not None and not resumed.schedule.paused
        wait_for(lambda: len(lines(runs)) >= count + 2)
        assert not client.get_job("tick.1").schedule.paused  # type: ignore[union-attr]


def test_run_now_runs_at_once_and_keeps_the_next_occurrence(
    client: Client, prefix: str, record: str, runs: Path
) -> None:
    client.set_rule(Rule(f"{prefix}hourly", f"{prefix}hourly.", ShellRunner(record)))
    planned = client.schedule_job(f"{prefix}hourly.1", "every 1h")
    client.run_job_now(f"{prefix}hourly.1")
    wait_for(lambda: lines(runs) == [f"{prefix}hourly.1"])
    job = wait_for(
        lambda: (
            (j := client.get_job(f"{prefix}hourly.1")).status is JobStatus.PLANNED
            and j.schedule is not None
            and j.schedule.runs == 1
            and j
        )
    )
    assert job.execute_at == planned.execute_at
    assert job.schedule is not None and job.schedule.scheduled_at == planned.execute_at
    assert client.preview_job(f"{prefix}hourly.1", 2) == [
        planned.execute_at,
        planned.execute_at + timedelta(hours=1),
    ]
    time.sleep(0.5)
    assert lines(runs) == [f"{prefix}hourly.1"]  # once


def test_run_now_and_pause_on_one_shot_jobs_are_refused(client: Client, prefix: str) -> None:
    client.set_job(f"{prefix}app.once", datetime(2040, 1, 1, tzinfo=UTC))
    for call in (client.pause_job, client.resume_job, client.run_job_now):
        with pytest.raises(FailedPrecondition):
            call(f"{prefix}app.once")
    with pytest.raises(KairoiError) as info:
        client.pause_job(f"{prefix}app.missing")
    assert info.value.code is grpc.StatusCode.NOT_FOUND


# -- the asyncio twin and roles ------------------------------------------------------------------


def test_async_client_has_the_same_calls(shared_server: ServerProcess, prefix: str) -> None:
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{shared_server.grpc_port}") as client:
            job = await client.schedule_job(f"{prefix}app.a", "@daily", start=START, misfire="skip")
            assert job.schedule is not None and job.schedule.misfire is Misfire.SKIP
            assert (await client.preview_job(f"{prefix}app.a", 2))[1] == START + timedelta(days=1)
            paused = await client.pause_job(f"{prefix}app.a")
            assert paused.schedule is not None and paused.schedule.paused
            resumed = await client.resume_job(f"{prefix}app.a")
            assert resumed.schedule is not None and not resumed.schedule.paused
            assert (await client.get_job(f"{prefix}app.a")).schedule == resumed.schedule

    asyncio.run(main())


def test_a_read_token_may_preview_but_not_schedule(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server('[auth]\nclient_tokens = ["c"]\nread_tokens = ["r"]')
    target = f"127.0.0.1:{server.grpc_port}"
    with Client(target, token="c") as writer, Client(target, token="r") as reader:
        writer.schedule_job("app.x", "@daily", start=START)
        assert reader.preview_job("app.x", 1) == [START]
        for call in (
            lambda: reader.schedule_job("app.y", "@daily"),
            lambda: reader.pause_job("app.x"),
            lambda: reader.resume_job("app.x"),
            lambda: reader.run_job_now("app.x"),
        ):
            with pytest.raises(KairoiError) as info:
                call()
            assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
        writer.pause_job("app.x")
        writer.resume_job("app.x")


def test_typed_client_refuses_what_it_cannot_send(client: Client, prefix: str) -> None:
    with pytest.raises(ValueError, match="misfire must be one of coalesce, all, skip"):
        client.schedule_job(f"{prefix}app.x", "@daily", misfire="sometimes")
    with pytest.raises(ValueError, match="max_runs must be at least 1"):
        client.schedule_job(f"{prefix}app.x", "@daily", max_runs=0)
