"""Recurring jobs in the command actor: what is logged, in which record, and what a
replay of the log gives back (the actor against the in-memory fake log)."""

from __future__ import annotations

from dataclasses import replace

from support.actor_harness import T0, running_actor

from kairoi_trio.commands import (
    CommandError,
    ErrorCode,
    GetJob,
    PauseJob,
    PreviewJob,
    RecordOutcome,
    ResumeJob,
    RunJobNow,
    ScheduleJob,
    SetJob,
    SetRule,
    TriggerDue,
)
from kairoi_trio.core.state import State
from kairoi_trio.model import (
    MICROS,
    Job,
    Misfire,
    Recurrence,
    Rule,
    Schedule,
    ShellRunner,
    Status,
)
from kairoi_trio.storage.records import (
    JobPut,
    apply_record,
    decode_records,
    encode_records,
)

RULE = Rule("r", "app.", ShellRunner("/bin/run.sh"))
CAPACITY = {"shell": 10, "amqp": 10, "http": 10}
MINUTE = 60 * MICROS
# T0 (2023-11-14T22:13:20Z) is 20 s after a minute boundary.
NEXT_MINUTE = T0 + 40 * MICROS


def replayed(records: list) -> dict[str, Job]:
    """The jobs a restart would load from these records, through their encoding."""
    jobs: dict[str, Job] = {}
    decoded = decode_records(encode_records(records))
    assert decoded.error is None
    for record in decoded.records:
        apply_record(jobs, {}, record)  # type: ignore[arg-type]
    return jobs


async def test_a_recurring_job_is_planned_at_its_first_occurrence_and_logged() -> None:
    async with running_actor() as h:
        job = await h.call(ScheduleJob("app.a", Schedule("* * * * *"), b"data"))
        assert job.execute_at == NEXT_MINUTE and job.status is Status.PLANNED
        assert job.recurrence == Recurrence(Schedule("* * * * *"), NEXT_MINUTE)
        assert job.scheduled_at == NEXT_MINUTE
        assert await h.call(GetJob("app.a")) == job
        assert h.log.records == [JobPut(job)]
        assert replayed(h.log.records) == {"app.a": job}


async def test_after_a_run_the_next_occurrence_is_in_the_outcomes_own_record() -> None:
    """The outcome and the next occurrence are one record: no crash can fall between."""
    async with running_actor() as h:
        await h.call(SetRule(RULE))
        await h.call(ScheduleJob("app.a", Schedule("* * * * *")))
        h.clock.now = NEXT_MINUTE + 5 * MICROS
        (dispatch,) = (await h.call(TriggerDue(h.clock.now, CAPACITY))).dispatches
        assert dispatch.job.scheduled_at == NEXT_MINUTE and dispatch.job.attempts == 1
        appended = len(h.log.batches)
        h.clock.now += 2 * MICROS
        await h.call(RecordOutcome("app.a", 1, True, "exit 0"))
        (batch,) = h.log.batches[appended:]
        (record,) = batch
        assert isinstance(record, JobPut)
        job = record.job
        assert job.status is Status.PLANNED and job.execute_at == NEXT_MINUTE + MINUTE
        assert job.attempts == 0 and job.last_outcome == "exit 0"
        assert job.recurrence is not None and job.recurrence.runs == 1
        assert job.recurrence.nominal == NEXT_MINUTE + MINUTE
        assert replayed(h.log.records)["app.a"] == job == h.state.jobs["app.a"]


async def test_a_run_in_flight_at_a_crash_runs_again_then_the_schedule_goes_on() -> None:
    """Replayed `triggered`, the occurrence runs again (at-least-once), for the same
    nominal time; its outcome plans the next occurrence once."""
    async with running_actor() as h:
        await h.call(SetRule(RULE))
        await h.call(ScheduleJob("app.a", Schedule("* * * * *")))
        h.clock.now = NEXT_MINUTE
        await h.call(TriggerDue(h.clock.now, CAPACITY))
        records = list(h.log.records)
    from kairoi_trio.core.state import recover_replayed

    jobs = replayed(records)
    assert jobs["app.a"].status is Status.TRIGGERED
    assert recover_replayed(jobs) == (1, 0)
    state = State(jobs.values(), [RULE])
    async with running_actor(state) as h:
        h.clock.now = NEXT_MINUTE + 30 * MICROS  # restarted within the minute
        (dispatch,) = (await h.call(TriggerDue(h.clock.now, CAPACITY))).dispatches
        assert dispatch.job.scheduled_at == NEXT_MINUTE
        await h.call(RecordOutcome("app.a", 2, True, "exit 0"))
        job = h.state.jobs["app.a"]
        assert job.execute_at == NEXT_MINUTE + MINUTE
        assert job.recurrence is not None and job.recurrence.runs == 1


async def test_set_turns_a_recurring_job_into_a_one_shot_job() -> None:
    async with running_actor() as h:
        await h.call(ScheduleJob("app.a", Schedule("every 1h")))
        job = await h.call(SetJob("app.a", T0 + 5 * MICROS))
        assert job.recurrence is None
        assert replayed(h.log.records)["app.a"].recurrence is None


async def test_a_paused_job_fires_nothing_and_resuming_applies_the_misfire_policy() -> None:
    async with running_actor() as h:
        await h.call(SetRule(RULE))
        schedule = Schedule("* * * * *", misfire=Misfire.SKIP)
        await h.call(ScheduleJob("app.a", schedule))
        paused = await h.call(PauseJob("app.a"))
        assert paused.recurrence.paused and h.state.next_due() is None
        h.clock.now = NEXT_MINUTE + 3 * MINUTE + 1
        assert (await h.call(TriggerDue(h.clock.now, CAPACITY))).dispatches == []
        assert replayed(h.log.records)["app.a"].recurrence.paused  # type: ignore[union-attr]
        resumed = await h.call(ResumeJob("app.a"))
        # skip: the 4 occurrences that came due while paused are not run
        assert resumed.recurrence.paused is False and resumed.recurrence.skipped == 4
        assert resumed.execute_at == NEXT_MINUTE + 4 * MINUTE
        assert (await h.call(TriggerDue(h.clock.now, CAPACITY))).dispatches == []


async def test_an_occurrence_missed_while_the_server_was_down_coalesces_into_one_run() -> None:
    schedule = Schedule("* * * * *")
    old = T0 - 5 * MINUTE - 20 * MICROS  # a minute boundary, 5 minutes before the start
    job = Job("app.a", old, Status.PLANNED, b"", 0, "", old, Recurrence(schedule, old))
    async with running_actor(State([job], [RULE])) as h:
        result = await h.call(TriggerDue(h.clock.now, CAPACITY))
        (dispatch,) = result.dispatches
        # the latest missed occurrence (T0 - 20 s), once; the 5 before it are skipped
        assert dispatch.job.scheduled_at == T0 - 20 * MICROS
        assert dispatch.job.recurrence is not None and dispatch.job.recurrence.skipped == 5
        await h.call(RecordOutcome("app.a", 1, True, "exit 0"))
        assert h.state.jobs["app.a"].execute_at == NEXT_MINUTE


async def test_a_recurring_job_with_no_rule_fails_its_occurrence_and_goes_on() -> None:
    async with running_actor() as h:
        await h.call(ScheduleJob("other.a", Schedule("* * * * *")))
        h.clock.now = NEXT_MINUTE
        assert (await h.call(TriggerDue(h.clock.now, CAPACITY))).dispatches == []
        job = h.state.jobs["other.a"]
        assert job.status is Status.PLANNED and job.execute_at == NEXT_MINUTE + MINUTE
        assert job.last_outcome == "no rule matches this job"
        assert job.recurrence is not None and job.recurrence.last_failed


async def test_run_now_runs_at_once_and_keeps_the_planned_occurrence() -> None:
    async with running_actor() as h:
        await h.call(SetRule(RULE))
        await h.call(ScheduleJob("app.a", Schedule("0 * * * *", jitter_us=30 * MICROS)))
        planned = h.state.jobs["app.a"]
        manual = await h.call(RunJobNow("app.a"))
        assert manual.execute_at == T0 and manual.scheduled_at == T0
        (dispatch,) = (await h.call(TriggerDue(h.clock.now, CAPACITY))).dispatches
        assert dispatch.job.scheduled_at == T0
        refused = (await h.results(RunJobNow("app.a")))[0]
        assert isinstance(refused, CommandError)
        assert refused.code is ErrorCode.FAILED_PRECONDITION
        await h.call(RecordOutcome("app.a", 1, True, "exit 0"))
        after = h.state.jobs["app.a"]
        assert after.execute_at == planned.execute_at  # the same draw of the jitter
        assert after.recurrence is not None and planned.recurrence is not None
        assert after.recurrence.nominal == planned.recurrence.nominal
        assert after.recurrence.runs == 1


async def test_preview_lists_the_next_occurrences_from_the_planned_one() -> None:
    async with running_actor() as h:
        await h.call(ScheduleJob("app.a", Schedule("* * * * *")))
        times = await h.call(PreviewJob("app.a", 3))
        assert times == [NEXT_MINUTE, NEXT_MINUTE + MINUTE, NEXT_MINUTE + 2 * MINUTE]


async def test_the_operations_refuse_what_they_cannot_do_and_change_nothing() -> None:
    async with running_actor() as h:
        await h.call(SetJob("app.once", T0 + MICROS))
        before = len(h.log.records)
        results = await h.results(
            PauseJob("app.once"),
            ResumeJob("missing"),
            PreviewJob("app.once", 3),
            ScheduleJob("app.b", Schedule("0 0 30 2 *")),
            ScheduleJob("app.b", Schedule("* * * * *", tz="Mars/Olympus_Mons")),
            ScheduleJob("app.b", Schedule("* * * * *", end=T0 - MICROS)),
            ScheduleJob("app.b", Schedule("* * * * *", max_runs=0)),
        )
        codes = [r.code if isinstance(r, CommandError) else r for r in results]
        assert codes == [
            ErrorCode.FAILED_PRECONDITION,
            ErrorCode.NOT_FOUND,
            ErrorCode.FAILED_PRECONDITION,
            *[ErrorCode.INVALID_ARGUMENT] * 4,
        ]
        assert "Mars/Olympus_Mons" in results[4].message  # type: ignore[union-attr]
        assert "no occurrence" in results[5].message  # type: ignore[union-attr]
        assert len(h.log.records) == before


async def test_a_recurring_job_ends_when_its_runs_are_spent() -> None:
    async with running_actor() as h:
        await h.call(SetRule(RULE))
        await h.call(ScheduleJob("app.a", Schedule("* * * * *", max_runs=2)))
        for run, ok in ((1, True), (2, False)):
            h.clock.now = NEXT_MINUTE + (run - 1) * MINUTE
            await h.call(TriggerDue(h.clock.now, CAPACITY))
            await h.call(RecordOutcome("app.a", 1, ok, "exit 0" if ok else "exit 1"))
        job = h.state.jobs["app.a"]
        assert job.status is Status.FAILED and job.last_outcome == "exit 1"
        assert job.recurrence is not None
        assert job.recurrence == replace(job.recurrence, runs=2, last_failed=True)  # kept, for GET
        refused = (await h.results(RunJobNow("app.a")))[0]
        assert isinstance(refused, CommandError) and "ended" in refused.message


def test_zones_work_without_system_zone_files() -> None:
    """The tzdata package provides the IANA zones: a machine without /usr/share/zoneinfo
    (a slim container) computes the same Paris occurrence."""
    import subprocess
    import sys

    code = (
        "import zoneinfo, sys; assert zoneinfo.TZPATH == (), zoneinfo.TZPATH\n"
        "from kairoi_trio.model import Schedule\n"
        "from kairoi_trio.scheduling.occurrences import next_after\n"
        "print(next_after(Schedule('30 2 * * *', 'Europe/Paris'), 1_837_598_400_000_000))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONTZPATH": "", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # after 2028-03-25T12:00Z: 2028-03-26 is Paris's spring-forward day, 02:30 does
    # not exist and the occurrence is 03:00 CEST, 2028-03-26T01:00Z
    assert int(done.stdout) == 1_837_645_200_000_000
