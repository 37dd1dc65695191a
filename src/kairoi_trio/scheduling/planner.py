"""A recurring job's life, as pure functions from a Job and `now` to its next Job.

The command actor calls these and logs what they return, in the same group
commit as the event that caused it (a run's outcome, a trigger, a client's
command): a crash between an outcome and the next occurrence cannot happen, so
no occurrence is lost or doubled by one. docs/recurring-jobs.md gives the
rules with examples; in short:

- after a run (executed, or failed once its retries are spent) the job is
  planned at its next occurrence, or ends `executed` (`failed` if that run
  failed) when its end or max_runs is reached;
- an occurrence that came due while the previous run was in flight follows
  the overlap policy: `skip` (counted), `buffer_one` (runs at once, the ones
  after it are skipped);
- occurrences that came due while the server was down (before it started),
  while the job was paused, or while it waited to run (for a runner, a retry,
  its re-run after a crash) follow the misfire policy: `coalesce` (one run now,
  for the latest), `all` (each, the latest max_catchup_runs of them, in
  order), `skip` (none); older than catchup_window, none runs;
- a run-now runs at once and then the job goes on with the occurrence that was
  planned.

Every function takes bounded time: what was missed is found by walking back
from now at most max_catchup_runs occurrences, and skipped occurrences are
counted up to MAX_COUNTED, so a per-second schedule that was down for a year
costs what a minute's outage does.
"""

from __future__ import annotations

import random
from dataclasses import replace

from kairoi_trio.model import (
    MAX_TIME_US,
    MICROS,
    Job,
    Misfire,
    Overlap,
    Recurrence,
    Schedule,
    Status,
    format_time,
    new_job,
)
from kairoi_trio.scheduling.occurrences import (
    ScheduleError,
    compile_schedule,
    count_between,
    latest,
    next_after,
    preview,
)

# Skipped occurrences are counted up to this many per event (a per-second
# schedule paused for a year skips 31 million: counting them is not worth a
# stalled scheduler).
MAX_COUNTED = 1000
# misfire=all runs at most this many missed occurrences (the latest ones); the
# server's [schedule] max_catchup_runs overrides it.
DEFAULT_MAX_CATCHUP_RUNS = 100
# Bounds of the options, as for every duration of the server: 100 years.
MAX_DURATION_US = 100 * 365 * 86_400 * MICROS
MAX_RUNS = 2**31 - 1
MAX_PREVIEW = 1000

PLANNED, TRIGGERED = Status.PLANNED, Status.TRIGGERED


def check_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError naming the first option that cannot be used."""
    compile_schedule(schedule.expression, schedule.tz)
    if schedule.start is not None and schedule.end is not None and schedule.end < schedule.start:
        raise ScheduleError("end is before start")
    if schedule.max_runs is not None and not 1 <= schedule.max_runs <= MAX_RUNS:
        raise ScheduleError(f"max_runs must be 1 to {MAX_RUNS}")
    if not 0 <= schedule.jitter_us <= MAX_DURATION_US:
        raise ScheduleError("jitter must be 0 to 100 years")
    window = schedule.catchup_window_us
    if window is not None and not 0 < window <= MAX_DURATION_US:
        raise ScheduleError("catchup_window must be more than 0 and at most 100 years")


class Planner:
    """The policies of recurring jobs, for one server run.

    started_at: when this server started (µs): a planned occurrence earlier
        than this came due while the server was down.
    max_catchup_runs: bound of misfire=all.
    rng: draws the jitter (a seeded one in tests).
    """

    def __init__(
        self,
        *,
        started_at: int,
        max_catchup_runs: int = DEFAULT_MAX_CATCHUP_RUNS,
        rng: random.Random | None = None,
    ) -> None:
        self.started_at = started_at
        self.max_catchup_runs = max_catchup_runs
        self._rng = rng or random.Random()

    # -- planning -------------------------------------------------------------------

    def _execute_at(self, schedule: Schedule, nominal: int) -> int:
        """The occurrence's run time: nominal plus its jitter, drawn once here."""
        if not schedule.jitter_us:
            return nominal
        return min(nominal + self._rng.randrange(schedule.jitter_us + 1), MAX_TIME_US)

    def first(self, job_id: str, schedule: Schedule, payload: bytes, now: int) -> Job:
        """A new recurring job, planned at its first occurrence from now on.

        An interval without a start starts one interval from now. Raises
        ScheduleError for a schedule that cannot be used or has no occurrence.
        """
        check_schedule(schedule)
        every = compile_schedule(schedule.expression, schedule.tz).every_us
        if every and schedule.start is None:
            schedule = replace(schedule, start=min(now + every, MAX_TIME_US))
        nominal = next_after(schedule, now - 1)
        if nominal is None:
            raise ScheduleError(_no_occurrence(schedule, now))
        recurrence = Recurrence(schedule, nominal)
        return new_job(
            job_id, self._execute_at(schedule, nominal), PLANNED, payload, 0, "", now, recurrence
        )

    def after_run(self, job: Job, now: int, ok: bool, outcome: str) -> Job:
        """The job once a run ended (ok, or failed with its retries spent): planned at
        its next occurrence, or finished."""
        r = job.recurrence
        assert r is not None
        r = replace(r, runs=r.runs + 1, last_failed=not ok)
        schedule = r.schedule
        if schedule.max_runs is not None and r.runs >= schedule.max_runs:
            return self._finished(job, r, now, outcome)
        if r.manual:
            # The schedule goes on with the occurrence the run-now came before: as it
            # was if it is not due yet (or is being caught up), else it came due during
            # this run and follows the overlap policy below.
            resume, resume_at = r.resume, r.resume_at
            r = replace(r, manual=False, resume=0, resume_at=0)
            if resume_at > now or r.catchup_left > 0:
                return _planned(job, replace(r, nominal=resume), resume_at, now, outcome)
            base = resume - 1
            r = replace(r, nominal=base, cursor=min(r.cursor, base))
        elif r.catchup_left > 0:
            following = next_after(schedule, r.nominal)
            if following is not None and following <= r.cursor:
                r = replace(r, nominal=following, catchup_left=r.catchup_left - 1)
                return _planned(job, r, now, now, outcome)
            base = max(r.nominal, r.cursor)
        else:
            base = max(r.nominal, r.cursor)
        following = next_after(schedule, base)
        if following is None:
            return self._finished(job, r, now, outcome)
        if following > now or r.paused:
            # not due yet; or paused: what comes due meanwhile is decided about at
            # resume, by the misfire policy (the occurrence is left after the cursor)
            r = replace(r, nominal=following, catchup_left=0)
            return _planned(job, r, self._execute_at(schedule, following), now, outcome)
        # When this run started (its last attempt was triggered); no run: now.
        started = job.updated_at if job.status is TRIGGERED else now
        if following < self.started_at or following < started:
            # came due while the server was down, or while the job waited to run (for
            # a runner, a retry, its re-run after a crash): missed, not overlapping
            r = replace(r, nominal=following, catchup_left=0)
            return self.misfire(_with(job, r, outcome, now), now)
        # came due while this run was in flight
        if schedule.overlap is Overlap.BUFFER_ONE:
            later = latest(schedule, following, now, 1)
            skipped = count_between(schedule, following, now, MAX_COUNTED)
            r = replace(
                r,
                nominal=following,
                skipped=r.skipped + skipped,
                cursor=later[-1] if later else following,
                catchup_left=0,
            )
            return _planned(job, r, now, now, outcome)
        skipped = count_between(schedule, base, now, MAX_COUNTED)
        r = replace(r, skipped=r.skipped + skipped, catchup_left=0)
        return self._plan_after(job, r, now, outcome)

    def _plan_after(self, job: Job, r: Recurrence, now: int, outcome: str) -> Job:
        """Planned at the first occurrence later than now, or finished."""
        following = next_after(r.schedule, now)
        if following is None:
            return self._finished(job, r, now, outcome)
        r = replace(r, nominal=following, cursor=now, catchup_left=0)
        return _planned(job, r, self._execute_at(r.schedule, following), now, outcome)

    def _finished(self, job: Job, r: Recurrence, now: int, outcome: str) -> Job:
        status = Status.FAILED if r.last_failed else Status.EXECUTED
        return new_job(job.id, job.execute_at, status, job.payload, job.attempts, outcome, now, r)

    # -- misfire -------------------------------------------------------------------------

    def is_misfire(self, job: Job) -> bool:
        """A planned occurrence whose time (jitter included) came before this server
        started, not decided about yet (no run of it started, not being caught up)."""
        r = job.recurrence
        return (
            r is not None
            and job.attempts == 0
            and not r.manual
            and r.cursor < r.nominal
            and job.execute_at < self.started_at
        )

    def misfire(self, job: Job, now: int) -> Job:
        """Apply the misfire policy to the occurrences from the job's nominal time
        up to now, which were missed (server down, job paused)."""
        r = job.recurrence
        assert r is not None
        schedule = r.schedule
        floor = r.nominal - 1
        if schedule.catchup_window_us is not None:
            floor = max(floor, now - schedule.catchup_window_us - 1)
        missed = count_between(schedule, r.nominal - 1, now, MAX_COUNTED)
        if schedule.misfire is Misfire.SKIP:
            chosen: list[int] = []
        elif schedule.misfire is Misfire.COALESCE:
            chosen = latest(schedule, floor, now, 1)
        else:
            chosen = latest(schedule, floor, now, self.max_catchup_runs)
        r = replace(r, skipped=r.skipped + max(0, missed - len(chosen)))
        if not chosen:
            return self._plan_after(job, r, now, job.last_outcome)
        r = replace(r, nominal=chosen[0], cursor=chosen[-1], catchup_left=len(chosen) - 1)
        return _planned(job, r, now, now, job.last_outcome)

    # -- client operations -----------------------------------------------------------------

    def pause(self, job: Job) -> Job:
        r = _recurrence(job)
        return _with(job, replace(r, paused=True), job.last_outcome, job.updated_at)

    def resume(self, job: Job, now: int) -> Job:
        """Unpaused; a planned occurrence that came due meanwhile is a misfire."""
        r = replace(_recurrence(job), paused=False)
        resumed = _with(job, r, job.last_outcome, job.updated_at)
        if (
            job.status is PLANNED
            and job.attempts == 0
            and not r.manual
            and r.cursor < r.nominal
            and job.execute_at <= now
        ):
            return self.misfire(resumed, now)
        return resumed

    def run_now(self, job: Job, now: int) -> Job:
        """Planned to run at once; the planned occurrence waits for it."""
        r = _recurrence(job)
        if r.manual:
            return job
        r = replace(r, manual=True, resume=r.nominal, resume_at=job.execute_at, nominal=now)
        return new_job(job.id, now, PLANNED, job.payload, 0, job.last_outcome, now, r)

    def upcoming(self, job: Job, count: int) -> list[int]:
        """The occurrences that will run next, up to `count`: the planned one first
        while no run of it has started, then the ones after it (past those already
        counted as skipped, and through the ones being caught up)."""
        r = _recurrence(job)
        if job.status.finished:
            return []
        if r.manual:
            return preview(r.schedule, r.resume - 1, count)
        after = r.nominal if r.catchup_left > 0 else max(r.nominal, r.cursor)
        if job.status is PLANNED and job.attempts == 0:
            return [r.nominal, *preview(r.schedule, after, count - 1)] if count > 1 else [r.nominal]
        return preview(r.schedule, after, count)


def _recurrence(job: Job) -> Recurrence:
    if job.recurrence is None:
        raise ValueError("not a recurring job")
    return job.recurrence


def _with(job: Job, r: Recurrence, outcome: str, updated_at: int) -> Job:
    return new_job(
        job.id, job.execute_at, job.status, job.payload, job.attempts, outcome, updated_at, r
    )


def _planned(job: Job, r: Recurrence, execute_at: int, now: int, outcome: str) -> Job:
    return new_job(job.id, execute_at, PLANNED, job.payload, 0, outcome, now, r)


def _no_occurrence(schedule: Schedule, now: int) -> str:
    reason = f"the schedule {schedule.expression!r} has no occurrence after {format_time(now)}"
    if schedule.end is not None:
        reason += f" up to its end ({format_time(schedule.end)})"
    return reason
