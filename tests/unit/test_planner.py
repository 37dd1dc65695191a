"""A recurring job's life (scheduling/planner.py): pure functions from a Job and
`now` to the next Job, no clock. A run is simulated as the actor does it: the
job is triggered (attempts + 1), then after_run records its end."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from kairoi_trio.model import (
    MICROS,
    Job,
    Misfire,
    Overlap,
    Schedule,
    Status,
    from_datetime,
    new_job,
)
from kairoi_trio.scheduling.occurrences import ScheduleError
from kairoi_trio.scheduling.planner import Planner

SECOND = MICROS
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
YEAR = 365 * DAY


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return from_datetime(datetime(year, month, day, hour, minute, second, tzinfo=UTC))


T0 = utc(2027, 1, 1, 12, 0, 0)


def planner(started_at: int = T0 - HOUR, seed: int = 1, **options: int) -> Planner:
    return Planner(started_at=started_at, rng=random.Random(seed), **options)


def triggered(job: Job) -> Job:
    """What the actor hands to a runner: triggered, one more attempt."""
    assert job.status is Status.PLANNED
    return new_job(
        job.id,
        job.execute_at,
        Status.TRIGGERED,
        job.payload,
        job.attempts + 1,
        "",
        job.updated_at,
        job.recurrence,
    )


def run(p: Planner, job: Job, ends_at: int, ok: bool = True, outcome: str = "ok") -> Job:
    """Trigger the job and end its run at `ends_at`."""
    return p.after_run(triggered(job), ends_at, ok, outcome)


def nominal(job: Job) -> int:
    assert job.recurrence is not None
    return job.recurrence.nominal


def runs_until_caught_up(p: Planner, job: Job, now: int, step: int = SECOND) -> tuple[list, Job]:
    """Run the job while it is due (each run taking `step`); the nominal times run."""
    ran: list[int] = []
    for _ in range(10_000):
        if job.status is not Status.PLANNED or job.execute_at > now:
            return ran, job
        ran.append(nominal(job))
        now += step
        job = run(p, job, now)
    raise AssertionError("the catch-up did not end")


# -- the first occurrence --------------------------------------------------------------


def test_first_occurrence_of_a_cron_schedule() -> None:
    now = T0 + 7 * MINUTE
    job = planner().first("app.a", Schedule("*/15 * * * *"), b"data", now)
    assert job.id == "app.a"
    assert job.status is Status.PLANNED
    assert job.execute_at == T0 + 15 * MINUTE
    assert nominal(job) == T0 + 15 * MINUTE
    assert job.payload == b"data"
    assert job.attempts == 0
    assert job.updated_at == now
    assert job.recurrence is not None
    assert (job.recurrence.runs, job.recurrence.skipped, job.recurrence.paused) == (0, 0, False)


def test_first_occurrence_of_a_cron_schedule_in_its_zone() -> None:
    # 09:00 in Paris (CET) is 08:00Z
    job = planner().first("a", Schedule("0 9 * * *", "Europe/Paris"), b"", T0)
    assert nominal(job) == utc(2027, 1, 2, 8)


def test_an_occurrence_at_now_is_the_first() -> None:
    job = planner().first("a", Schedule("0 * * * *"), b"", T0)
    assert nominal(job) == T0


def test_an_interval_without_start_starts_one_interval_later() -> None:
    p = planner()
    job = p.first("a", Schedule("every 15m"), b"", T0 + 123)
    assert nominal(job) == job.execute_at == T0 + 123 + 15 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.schedule.start == T0 + 123 + 15 * MINUTE  # stored: the anchor
    job = run(p, job, job.execute_at + SECOND)
    assert nominal(job) == T0 + 123 + 30 * MINUTE


def test_an_interval_with_start_in_the_past_goes_on_at_the_next_multiple() -> None:
    start = T0 - 100 * MINUTE
    job = planner().first("a", Schedule("every 15m", start=start), b"", T0)
    assert nominal(job) == start + 7 * 15 * MINUTE == T0 + 5 * MINUTE


def test_an_interval_with_start_now_starts_now() -> None:
    job = planner().first("a", Schedule("PT15M", start=T0), b"", T0)
    assert nominal(job) == job.execute_at == T0


def test_an_interval_with_start_in_the_future_starts_then() -> None:
    job = planner().first("a", Schedule("every 15m", start=T0 + DAY), b"", T0)
    assert nominal(job) == T0 + DAY


def test_a_cron_schedule_with_start_waits_for_it() -> None:
    job = planner().first("a", Schedule("0 * * * *", start=T0 + 90 * MINUTE), b"", T0)
    assert nominal(job) == T0 + 2 * HOUR


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (Schedule("0 0 * * *", end=T0 + HOUR), "no occurrence"),  # next midnight is past end
        (Schedule("0 * * * *", end=T0 - DAY), "no occurrence"),
        (Schedule("every 1h", end=T0 + 30 * MINUTE), "no occurrence"),  # first: T0 + 1h
        (Schedule("every 1h", start=T0 + HOUR, end=T0), "end is before start"),
        (Schedule("0 * * * *", max_runs=0), "max_runs"),
        (Schedule("0 * * * *", jitter_us=-1), "jitter"),
        (Schedule("0 * * * *", catchup_window_us=0), "catchup_window"),
        (Schedule("0 0 30 2 *"), "bad cron expression"),
        (Schedule("0 * * * *", "Nowhere/City"), "unknown time zone"),
    ],
)
def test_a_schedule_that_cannot_be_used_is_refused(schedule: Schedule, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        planner().first("a", schedule, b"", T0)


def test_the_refusal_of_an_empty_schedule_names_its_end() -> None:
    with pytest.raises(ScheduleError, match="up to its end \\(2027-01-01T13:00:00"):
        planner().first("a", Schedule("0 0 * * *", end=T0 + HOUR), b"", T0)


# -- jitter ----------------------------------------------------------------------------


def _offsets(seed: int, jitter: int, count: int) -> list[int]:
    p = planner(seed=seed)
    job = p.first("a", Schedule("every 1m", jitter_us=jitter), b"", T0)
    offsets = []
    for _ in range(count):
        offsets.append(job.execute_at - nominal(job))
        job = run(p, job, job.execute_at + 1)
    return offsets


def test_jitter_is_a_delay_within_its_bound_drawn_per_occurrence() -> None:
    jitter = 30 * SECOND
    offsets = _offsets(seed=7, jitter=jitter, count=200)
    assert all(0 <= offset <= jitter for offset in offsets)
    assert len(set(offsets)) > 150  # drawn again for each occurrence
    assert max(offsets) > jitter * 0.9 and min(offsets) < jitter * 0.1


def test_jitter_bound_is_inclusive() -> None:
    assert set(_offsets(seed=3, jitter=1, count=100)) == {0, 1}


def test_jitter_comes_from_the_planner_rng() -> None:
    assert _offsets(seed=11, jitter=HOUR, count=20) == _offsets(seed=11, jitter=HOUR, count=20)
    assert _offsets(seed=11, jitter=HOUR, count=20) != _offsets(seed=12, jitter=HOUR, count=20)


def test_no_jitter_runs_at_the_nominal_time() -> None:
    assert set(_offsets(seed=7, jitter=0, count=20)) == {0}


def test_a_restart_keeps_the_drawn_jitter() -> None:
    before = planner(started_at=T0 - DAY, seed=1)
    job = before.first("a", Schedule("0 * * * *", jitter_us=10 * MINUTE), b"", T0 + MINUTE)
    execute_at = job.execute_at
    assert nominal(job) == T0 + HOUR
    assert execute_at > nominal(job)  # seed 1 draws a delay
    # the server restarts before the occurrence, with another rng
    after = planner(started_at=T0 + 30 * MINUTE, seed=999)
    assert not after.is_misfire(job)  # not missed: the actor runs it at its execute_at
    # due at last, still not a misfire (nothing re-plans it)
    assert not after.is_misfire(replace(job, updated_at=execute_at))
    # pausing and resuming before it came due changes nothing of it
    resumed = after.resume(after.pause(job), T0 + 40 * MINUTE)
    assert resumed.execute_at == execute_at
    assert nominal(resumed) == nominal(job)
    # nor does a run-now in between: the occurrence keeps its execute_at
    manual = after.run_now(job, T0 + 45 * MINUTE)
    back = run(after, manual, T0 + 46 * MINUTE)
    assert (nominal(back), back.execute_at) == (nominal(job), execute_at)


def test_a_jittered_occurrence_due_after_the_restart_is_not_missed() -> None:
    before = planner(started_at=T0 - DAY, seed=1)
    schedule = Schedule("0 * * * *", jitter_us=30 * MINUTE, misfire=Misfire.SKIP)
    job = before.first("a", schedule, b"", T0 + MINUTE)
    assert nominal(job) == T0 + HOUR
    assert job.execute_at > nominal(job) + 2 * MINUTE  # seed 1 draws a delay of minutes
    # down from before the nominal time until a minute after it, back before execute_at:
    # the run was due (at execute_at) while the server was up
    after = planner(started_at=nominal(job) + MINUTE, seed=2)
    now = job.execute_at
    # what the actor does when the job comes due
    due = after.misfire(job, now) if after.is_misfire(job) else job
    assert nominal(due) == T0 + HOUR
    assert due.execute_at <= now


# -- after a run -----------------------------------------------------------------------


def test_after_a_successful_run_the_next_occurrence_is_planned() -> None:
    p = planner()
    job = p.first("a", Schedule("*/10 * * * *"), b"x", T0 - MINUTE)
    assert nominal(job) == T0
    done = run(p, job, T0 + 3 * MINUTE, True, "exit 0")
    assert done.status is Status.PLANNED
    assert nominal(done) == done.execute_at == T0 + 10 * MINUTE
    assert done.attempts == 0
    assert done.last_outcome == "exit 0"
    assert done.updated_at == T0 + 3 * MINUTE
    assert done.payload == b"x"
    assert done.recurrence is not None
    assert (done.recurrence.runs, done.recurrence.last_failed, done.recurrence.skipped) == (
        1,
        False,
        0,
    )


def test_after_a_failed_run_the_next_occurrence_is_planned_too() -> None:
    p = planner()
    job = p.first("a", Schedule("*/10 * * * *"), b"", T0 - MINUTE)
    retried = new_job(
        job.id, T0 + MINUTE, Status.TRIGGERED, b"", 3, "", T0, job.recurrence
    )  # the third attempt of this occurrence
    done = p.after_run(retried, T0 + 2 * MINUTE, False, "exit 1")
    assert done.status is Status.PLANNED
    assert nominal(done) == T0 + 10 * MINUTE
    assert done.attempts == 0  # the next occurrence has its own attempts
    assert done.last_outcome == "exit 1"
    assert done.recurrence is not None
    assert (done.recurrence.runs, done.recurrence.last_failed) == (1, True)
    ok = run(p, done, T0 + 11 * MINUTE)
    assert ok.recurrence is not None
    assert (ok.recurrence.runs, ok.recurrence.last_failed) == (2, False)


@pytest.mark.parametrize(("ok", "status"), [(True, Status.EXECUTED), (False, Status.FAILED)])
def test_max_runs_ends_the_job(ok: bool, status: Status) -> None:
    p = planner()
    job = p.first("a", Schedule("every 1m", max_runs=3), b"", T0)
    job = run(p, job, job.execute_at + SECOND)
    job = run(p, job, job.execute_at + SECOND, ok=False)
    assert job.status is Status.PLANNED
    last = nominal(job)
    job = run(p, job, job.execute_at + SECOND, ok=ok, outcome="last")
    assert job.status is status
    assert job.last_outcome == "last"
    assert job.recurrence is not None
    assert job.recurrence.runs == 3
    assert nominal(job) == last


@pytest.mark.parametrize(("ok", "status"), [(True, Status.EXECUTED), (False, Status.FAILED)])
def test_the_end_ends_the_job(ok: bool, status: Status) -> None:
    p = planner()
    job = p.first("a", Schedule("0 * * * *", end=T0 + 2 * HOUR), b"", T0)
    ran = []
    while job.status is Status.PLANNED:
        ran.append(nominal(job))
        job = run(p, job, job.execute_at + MINUTE, ok=ok if len(ran) == 3 else not ok)
    assert ran == [T0, T0 + HOUR, T0 + 2 * HOUR]  # the end is inclusive
    assert job.status is status
    assert job.recurrence is not None
    assert job.recurrence.runs == 3


def test_the_end_passed_during_a_run_ends_the_job() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0, end=T0 + 25 * MINUTE), b"", T0)
    job = run(p, job, T0 + HOUR)  # T0 + 10m and + 20m came due during the run, then the end
    assert job.status is Status.EXECUTED


# -- overlap ---------------------------------------------------------------------------


def test_overlap_skip_plans_the_first_future_occurrence() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0), b"", T0)
    job = run(p, job, T0 + 35 * MINUTE)  # 3.5 intervals: +10m, +20m, +30m came due
    assert job.status is Status.PLANNED
    assert nominal(job) == job.execute_at == T0 + 40 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 3
    assert job.recurrence.runs == 1


def test_overlap_skip_with_cron() -> None:
    p = planner()
    job = p.first("a", Schedule("*/10 * * * *"), b"", T0)
    job = run(p, job, T0 + 35 * MINUTE)
    assert nominal(job) == T0 + 40 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 3


def test_overlap_buffer_one_runs_the_first_overlapped_occurrence_once() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0, overlap=Overlap.BUFFER_ONE), b"", T0)
    ran = [nominal(job)]
    job = run(p, job, T0 + 35 * MINUTE)
    # the first one that came due (+10m) runs at once; +20m and +30m are skipped
    assert job.status is Status.PLANNED
    assert nominal(job) == T0 + 10 * MINUTE
    assert job.execute_at == T0 + 35 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 2
    ran.append(nominal(job))
    # after THAT run: the first future occurrence, not +20m or +30m again
    job = run(p, job, T0 + 36 * MINUTE)
    assert nominal(job) == job.execute_at == T0 + 40 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 2
    assert job.recurrence.runs == 2
    ran.append(nominal(job))
    job = run(p, job, T0 + 41 * MINUTE)
    ran.append(nominal(job))
    assert ran == [T0, T0 + 10 * MINUTE, T0 + 40 * MINUTE, T0 + 50 * MINUTE]


def test_overlap_buffer_one_when_the_buffered_run_overlaps_too() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0, overlap=Overlap.BUFFER_ONE), b"", T0)
    job = run(p, job, T0 + 35 * MINUTE)  # buffers +10m, skips +20m +30m
    job = run(p, job, T0 + 52 * MINUTE)  # +40m and +50m came due: buffers +40m, skips +50m
    assert nominal(job) == T0 + 40 * MINUTE
    assert job.execute_at == T0 + 52 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 3
    job = run(p, job, T0 + 53 * MINUTE)
    assert nominal(job) == T0 + 60 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 3


def test_overlap_buffer_one_with_a_single_overlapped_occurrence() -> None:
    p = planner()
    job = p.first("a", Schedule("*/10 * * * *", overlap=Overlap.BUFFER_ONE), b"", T0)
    job = run(p, job, T0 + 15 * MINUTE)
    assert (nominal(job), job.execute_at) == (T0 + 10 * MINUTE, T0 + 15 * MINUTE)
    assert job.recurrence is not None
    assert job.recurrence.skipped == 0
    job = run(p, job, T0 + 16 * MINUTE)
    assert nominal(job) == T0 + 20 * MINUTE


# -- misfire: occurrences that came due while the server was down ----------------------


def _down_for_five(misfire: Misfire, **options: Any) -> tuple[Planner, Job, int]:
    """A per-minute job planned at T0 + 1m; the server is down until 4.5 minutes
    later: T0+1m .. T0+5m (five occurrences) came due while it was down."""
    job = planner(started_at=T0 - DAY).first(
        "a", Schedule("every 1m", misfire=misfire, **options), b"", T0
    )
    assert nominal(job) == T0 + MINUTE
    started_at = T0 + 5 * MINUTE + 30 * SECOND
    p = planner(started_at=started_at, seed=2)
    assert p.is_misfire(job)
    return p, job, started_at


def test_misfire_coalesce_runs_once_for_the_latest() -> None:
    p, job, now = _down_for_five(Misfire.COALESCE)
    job = p.misfire(job, now)
    assert job.status is Status.PLANNED
    assert nominal(job) == T0 + 5 * MINUTE
    assert job.execute_at == now
    assert job.recurrence is not None
    assert job.recurrence.skipped == 4
    assert not p.is_misfire(job)  # decided: a restart now would not decide again
    ran, job = runs_until_caught_up(p, job, now)
    assert ran == [T0 + 5 * MINUTE]
    assert nominal(job) == T0 + 6 * MINUTE


def test_misfire_is_the_default_coalesce() -> None:
    assert Schedule("* * * * *").misfire is Misfire.COALESCE
    assert Schedule("* * * * *").overlap is Overlap.SKIP


def test_misfire_all_runs_each_in_order() -> None:
    p, job, now = _down_for_five(Misfire.ALL)
    job = p.misfire(job, now)
    assert job.execute_at == now
    ran, job = runs_until_caught_up(p, job, now)
    assert ran == [T0 + k * MINUTE for k in range(1, 6)]
    assert nominal(job) == job.execute_at == T0 + 6 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.runs == 5
    assert job.recurrence.skipped == 0


def test_misfire_skip_runs_none() -> None:
    p, job, now = _down_for_five(Misfire.SKIP)
    job = p.misfire(job, now)
    assert nominal(job) == job.execute_at == T0 + 6 * MINUTE
    assert job.recurrence is not None
    assert job.recurrence.skipped == 5
    assert job.recurrence.runs == 0


@pytest.mark.parametrize(
    ("misfire", "expected_runs", "next_nominal"),
    [
        (Misfire.COALESCE, [5], 6),
        (Misfire.ALL, [1, 2, 3, 4, 5], 6),
        (Misfire.SKIP, [], 6),
    ],
)
def test_the_documented_example(misfire: Misfire, expected_runs: list, next_nominal: int) -> None:
    # `every 1s` down from 10:00:00.5 to 10:00:05.7: 10:00:01 .. 10:00:05 missed
    ten = utc(2027, 1, 1, 10)
    job = planner(started_at=ten - DAY).first(
        "a", Schedule("every 1s", start=ten, misfire=misfire), b"", ten
    )
    job = run(planner(started_at=ten - DAY), job, ten + 500_000)  # ran at 10:00:00, ended at .5
    assert nominal(job) == ten + SECOND
    now = ten + 5 * SECOND + 700_000
    p = planner(started_at=now)
    assert p.is_misfire(job)
    job = p.misfire(job, now)
    ran, job = runs_until_caught_up(p, job, now, step=1)  # runs of 1 µs: no overlap
    assert ran == [ten + k * SECOND for k in expected_runs]
    assert nominal(job) == ten + next_nominal * SECOND


def test_a_run_in_flight_at_the_crash_reruns_then_the_misfire_policy_applies() -> None:
    before = planner(started_at=T0 - DAY)
    job = before.first("a", Schedule("every 1m", start=T0, misfire=Misfire.ALL), b"", T0)
    in_flight = triggered(job)  # nominal T0, running when the server died
    started_at = T0 + 4 * MINUTE + 30 * SECOND
    p = planner(started_at=started_at)
    assert not p.is_misfire(in_flight)  # it runs again (at least once), it is not missed
    job = p.after_run(in_flight, started_at + 10 * SECOND, True, "ok")
    ran, job = runs_until_caught_up(p, job, started_at + 10 * SECOND)
    assert ran == [T0 + k * MINUTE for k in range(1, 5)]  # missed while down: each of them
    assert nominal(job) == T0 + 5 * MINUTE


@pytest.mark.parametrize(
    ("misfire", "window", "expected_runs", "skipped"),
    [
        (Misfire.COALESCE, 5 * MINUTE, [10], 10),
        (Misfire.COALESCE, 20 * SECOND, [], 11),  # the latest is 30 s old: none
        (Misfire.ALL, 150 * SECOND, [8, 9, 10], 8),  # 150 s: +8m (exactly 150 s old) and later
        (Misfire.ALL, 149 * SECOND, [9, 10], 9),
        (Misfire.ALL, YEAR, list(range(11)), 0),
    ],
)
def test_catchup_window_bounds_how_old_a_missed_occurrence_may_be(
    misfire: Misfire, window: int, expected_runs: list, skipped: int
) -> None:
    job = planner(started_at=T0 - DAY).first(
        "a", Schedule("every 1m", start=T0, misfire=misfire, catchup_window_us=window), b"", T0
    )
    now = T0 + 10 * MINUTE + 30 * SECOND  # T0 .. T0+10m missed (11)
    p = planner(started_at=now)
    assert p.is_misfire(job)
    job = p.misfire(job, now)
    assert job.recurrence is not None
    assert job.recurrence.skipped == skipped
    ran, job = runs_until_caught_up(p, job, now, step=1)
    assert ran == [T0 + k * MINUTE for k in expected_runs]
    assert nominal(job) == T0 + 11 * MINUTE


@pytest.mark.parametrize("misfire", [Misfire.ALL, Misfire.COALESCE, Misfire.SKIP])
def test_a_per_second_schedule_missed_for_a_year_takes_bounded_work(misfire: Misfire) -> None:
    job = planner(started_at=T0 - DAY).first("a", Schedule("* * * * * *", misfire=misfire), b"", T0)
    now = T0 + YEAR
    p = planner(started_at=now, max_catchup_runs=50)
    assert p.is_misfire(job)
    job = p.misfire(job, now)
    ran, job = runs_until_caught_up(p, job, now, step=1)
    expected = {Misfire.ALL: 50, Misfire.COALESCE: 1, Misfire.SKIP: 0}[misfire]
    assert ran == [now - k * SECOND for k in range(expected - 1, -1, -1)]  # the latest ones
    assert nominal(job) == now + SECOND
    assert job.recurrence is not None
    assert 0 < job.recurrence.skipped <= 1000  # counted up to 1000 per event


def test_misfire_all_takes_the_latest_max_catchup_runs_with_cron() -> None:
    job = planner(started_at=T0 - DAY).first(
        "a", Schedule("0 * * * *", "Europe/Paris", misfire=Misfire.ALL), b"", T0
    )
    now = T0 + 10 * HOUR + MINUTE
    p = planner(started_at=now, max_catchup_runs=3)
    job = p.misfire(job, now)
    ran, job = runs_until_caught_up(p, job, now)
    assert ran == [T0 + 8 * HOUR, T0 + 9 * HOUR, T0 + 10 * HOUR]
    assert nominal(job) == T0 + 11 * HOUR
    assert job.recurrence is not None
    assert job.recurrence.skipped == 8


def test_an_occurrence_planned_after_the_start_is_not_missed() -> None:
    job = planner(started_at=T0 - DAY).first("a", Schedule("every 1m"), b"", T0)
    assert not planner(started_at=nominal(job)).is_misfire(job)
    assert planner(started_at=nominal(job) + 1).is_misfire(job)


# -- pause and resume ------------------------------------------------------------------


def test_pause_changes_nothing_but_the_flag() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", jitter_us=MINUTE), b"", T0)
    paused = p.pause(job)
    assert paused.recurrence is not None
    assert paused.recurrence.paused
    assert (paused.execute_at, nominal(paused), paused.status) == (
        job.execute_at,
        nominal(job),
        job.status,
    )
    resumed = p.resume(paused, T0 + MINUTE)  # before the occurrence: as it was
    assert resumed.recurrence is not None
    assert not resumed.recurrence.paused
    assert (resumed.execute_at, nominal(resumed)) == (job.execute_at, nominal(job))


def test_resume_between_the_nominal_time_and_the_jittered_one_keeps_the_run() -> None:
    p = planner(seed=1)
    schedule = Schedule("0 * * * *", jitter_us=30 * MINUTE, misfire=Misfire.SKIP)
    job = p.first("a", schedule, b"", T0 + MINUTE)
    assert job.execute_at > nominal(job) + 2 * MINUTE
    resumed = p.resume(p.pause(job), nominal(job) + MINUTE)  # its run time has not come
    assert (nominal(resumed), resumed.execute_at) == (nominal(job), job.execute_at)


@pytest.mark.parametrize(
    ("misfire", "expected_runs"),
    [(Misfire.COALESCE, [3]), (Misfire.ALL, [1, 2, 3]), (Misfire.SKIP, [])],
)
def test_resume_applies_the_misfire_policy_to_what_came_due_while_paused(
    misfire: Misfire, expected_runs: list
) -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0 + 10 * MINUTE, misfire=misfire), b"", T0)
    paused = p.pause(job)
    now = T0 + 35 * MINUTE  # +10m, +20m, +30m came due while paused
    resumed = p.resume(paused, now)
    assert resumed.recurrence is not None
    assert not resumed.recurrence.paused
    ran, resumed = runs_until_caught_up(p, resumed, now)
    assert ran == [T0 + k * 10 * MINUTE for k in expected_runs]
    assert nominal(resumed) == T0 + 40 * MINUTE


def test_a_run_in_flight_when_paused_ends_normally() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0), b"", T0)
    paused = p.pause(triggered(job))
    done = p.after_run(paused, T0 + MINUTE, True, "ok")
    assert done.recurrence is not None
    assert done.recurrence.paused
    assert done.recurrence.runs == 1
    assert nominal(done) == T0 + 10 * MINUTE


def test_resume_after_a_pause_begun_during_a_run_applies_the_misfire_policy() -> None:
    p = planner()
    schedule = Schedule("every 10m", start=T0, overlap=Overlap.BUFFER_ONE, misfire=Misfire.SKIP)
    job = p.first("a", schedule, b"", T0)
    paused = p.pause(triggered(job))  # paused while the T0 run is in flight
    done = p.after_run(paused, T0 + 15 * MINUTE, True, "ok")  # +10m came due during it
    now = T0 + DAY + 5 * MINUTE  # resumed a day later
    ran, job = runs_until_caught_up(p, p.resume(done, now), now)
    # the buffered +10m may run (it came due during the run); nothing that came due
    # during the pause after the run ended may (misfire=skip)
    assert ran in ([], [T0 + 10 * MINUTE])
    assert nominal(job) == T0 + DAY + 10 * MINUTE


# -- run now ---------------------------------------------------------------------------


def test_run_now_runs_once_and_the_schedule_goes_on() -> None:
    p = planner()
    job = p.first("a", Schedule("0 * * * *", jitter_us=10 * MINUTE), b"", T0 + MINUTE)
    planned_at, planned_nominal = job.execute_at, nominal(job)
    assert planned_nominal == T0 + HOUR
    now = T0 + 5 * MINUTE
    manual = p.run_now(job, now)
    assert manual.status is Status.PLANNED
    assert manual.execute_at == now
    assert nominal(manual) == now  # runners get the instant it was asked for
    assert manual.attempts == 0
    assert p.run_now(manual, now + 1) == manual  # a second run-now changes nothing
    done = run(p, manual, now + MINUTE)
    assert done.status is Status.PLANNED
    assert (nominal(done), done.execute_at) == (planned_nominal, planned_at)
    assert done.recurrence is not None
    assert done.recurrence.runs == 1
    assert not done.recurrence.manual
    # and the occurrence then runs as planned
    after = run(p, done, planned_at + MINUTE)
    assert nominal(after) == T0 + 2 * HOUR


def test_run_now_of_a_paused_job_keeps_it_paused() -> None:
    p = planner()
    job = p.pause(p.first("a", Schedule("0 * * * *"), b"", T0 + MINUTE))
    done = run(p, p.run_now(job, T0 + 2 * MINUTE), T0 + 3 * MINUTE)
    assert done.recurrence is not None
    assert done.recurrence.paused
    assert nominal(done) == T0 + HOUR


def test_an_occurrence_due_during_a_run_now_follows_the_overlap_policy() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0 + 5 * MINUTE), b"", T0)
    manual = p.run_now(job, T0 + MINUTE)
    done = run(p, manual, T0 + 32 * MINUTE)  # +5m, +15m, +25m came due during the run
    assert nominal(done) == T0 + 35 * MINUTE
    assert done.recurrence is not None
    assert done.recurrence.skipped == 3


# -- upcoming --------------------------------------------------------------------------


def test_upcoming_starts_with_the_planned_occurrence() -> None:
    p = planner()
    job = p.first("a", Schedule("*/10 * * * *"), b"", T0 + MINUTE)
    assert p.upcoming(job, 3) == [T0 + 10 * MINUTE, T0 + 20 * MINUTE, T0 + 30 * MINUTE]
    # while it runs: the ones after it
    assert p.upcoming(triggered(job), 2) == [T0 + 20 * MINUTE, T0 + 30 * MINUTE]
    # during a run-now: the planned occurrence first
    manual = p.run_now(job, T0 + 2 * MINUTE)
    assert p.upcoming(manual, 2) == [T0 + 10 * MINUTE, T0 + 20 * MINUTE]


def test_upcoming_after_a_buffered_overlap_lists_what_will_run() -> None:
    p = planner()
    job = p.first("a", Schedule("every 10m", start=T0, overlap=Overlap.BUFFER_ONE), b"", T0)
    job = run(p, job, T0 + 35 * MINUTE)  # +10m buffered, +20m and +30m skipped
    will_run = []
    simulated = job
    for _ in range(3):
        will_run.append(nominal(simulated))
        simulated = run(p, simulated, simulated.execute_at + MINUTE)
    assert will_run == [T0 + 10 * MINUTE, T0 + 40 * MINUTE, T0 + 50 * MINUTE]
    assert p.upcoming(job, 3) == will_run


def test_upcoming_of_an_ended_job_is_empty() -> None:
    p = planner()
    job = p.first("a", Schedule("every 1m", max_runs=1), b"", T0)
    done = run(p, job, job.execute_at + SECOND)
    assert done.status is Status.EXECUTED
    assert p.upcoming(done, 5) == []


def test_upcoming_stops_at_the_end() -> None:
    p = planner()
    job = p.first("a", Schedule("0 * * * *", end=T0 + 2 * HOUR), b"", T0 + MINUTE)
    assert p.upcoming(job, 10) == [T0 + HOUR, T0 + 2 * HOUR]


def test_a_one_shot_job_has_no_schedule() -> None:
    p = planner()
    one_shot = new_job("a", T0, Status.PLANNED, b"", 0, "", T0)
    with pytest.raises(ValueError, match="not a recurring job"):
        p.upcoming(one_shot, 1)
    with pytest.raises(ValueError, match="not a recurring job"):
        p.run_now(one_shot, T0)
