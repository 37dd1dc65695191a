"""dispatch.py: the DueTimer wakes when the earliest job is due, no earlier; the
Dispatcher backs off while triggers cannot be written, and never stops.

Most tests run on Trio's autojumping mock clock with the wall clock (`now_us`)
tied to it, so they are exact and take no real time; one runs on real clocks.
The Dispatcher tests use the real command actor and state, with a log in
memory that can be told to fail and stand-in runner pools that record what
they are handed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from support.dispatch_harness import MemoryLog, at, tie_wall_clock, timed_actor

from kairoi_trio import dispatch
from kairoi_trio.alarm import TrioAlarm
from kairoi_trio.commands import CommandError, Dispatch, GetJob, SetJob, SetRule
from kairoi_trio.core import state as state_module
from kairoi_trio.core.actor import ActorClient, CommandActor, Observer
from kairoi_trio.core.due import BUCKET_SHIFT, DueIndex
from kairoi_trio.dispatch import (
    TRIGGER_RETRY_INITIAL_S,
    TRIGGER_RETRY_MAX_S,
    Dispatcher,
    DueTimer,
)
from kairoi_trio.model import MICROS, Rule, ShellRunner, Status, now_us
from kairoi_trio.storage.records import JobStatus


@pytest.fixture
def wall(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> trio.testing.MockClock:
    """now_us() follows the mock clock: WALL_START at trio time 0.

    The test takes this clock as an argument, so pytest-trio runs it on it."""
    tie_wall_clock(monkeypatch)
    return autojump_clock


async def woken_at(timer: DueTimer) -> float:
    await timer.wait_due()
    return trio.current_time()


async def test_wakes_at_the_due_time(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.75))
    assert await woken_at(timer) == pytest.approx(0.75, abs=1e-6)


async def test_a_due_time_in_the_past_returns_at_once(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    await trio.sleep(5)
    timer.update(at(1))
    assert await woken_at(timer) == pytest.approx(5)


async def test_wakes_at_a_due_time_further_than_the_longest_sleep(
    wall: trio.testing.MockClock,
) -> None:
    timer = DueTimer()
    timer.update(at(3.5 * dispatch.MAX_SLEEP_S))
    assert await woken_at(timer) == pytest.approx(3.5 * dispatch.MAX_SLEEP_S, abs=1e-6)


async def test_does_not_wake_before_the_due_time(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.8))
    with trio.move_on_after(0.799) as scope:
        await timer.wait_due()
    assert scope.cancelled_caught


async def test_nothing_planned_waits_until_something_is(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(None)
    with trio.move_on_after(30) as scope:
        await timer.wait_due()
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: set_later(timer, 31.0, at(31.5)))
        assert await woken_at(timer) == pytest.approx(31.5, abs=1e-6)


async def set_later(timer: DueTimer, when: float, due: int | None) -> None:
    await trio.sleep_until(when)
    timer.update(due)


async def test_update_to_an_earlier_time_wakes_early(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.9))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.1, at(0.3))
        assert await woken_at(timer) == pytest.approx(0.3, abs=1e-6)


async def test_update_to_now_wakes_at_once(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.9))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.2, at(0.2))
        assert await woken_at(timer) == pytest.approx(0.2, abs=1e-6)


async def test_update_to_a_later_time_does_not_wake_at_the_old_one(
    wall: trio.testing.MockClock,
) -> None:
    timer = DueTimer()
    timer.update(at(0.3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.1, at(0.7))
        assert await woken_at(timer) == pytest.approx(0.7, abs=1e-6)


async def test_the_last_job_going_away_stops_the_wake_up(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.1, None)
        with trio.move_on_after(10) as scope:
            await timer.wait_due()
        assert scope.cancelled_caught


async def test_wakes_the_fire_ahead_window_before_the_due_time(
    wall: trio.testing.MockClock,
) -> None:
    timer = DueTimer(ahead_us=20_000)
    timer.update(at(0.75))
    assert await woken_at(timer) == pytest.approx(0.73, abs=1e-6)


async def test_wakes_at_the_due_time_on_real_clocks() -> None:
    timer = DueTimer()
    timer.update(now_us() + 300_000)
    start = time.monotonic()
    with trio.fail_after(5):
        await timer.wait_due()
    elapsed = time.monotonic() - start
    assert elapsed >= 0.29
    assert elapsed < 2.0  # generous: a loaded machine may be late, not early


# -- the Dispatcher while storage fails (issue 8, item 1) ----------------------------------


class Pools:
    """Stands in for RunnerPools: room for everything, and a record of what it was given."""

    def __init__(self, log: MemoryLog) -> None:
        self.log = log
        self.dispatched: list[Dispatch] = []
        self.handed_at: list[float] = []  # trio time of each submit
        self.marks_written: list[bool] = []  # was the job's trigger in the log by then?

    room = 100  # runs that may be queued in all

    def capacity(self) -> dict[str, int]:
        return {"shell": self.room - len(self.dispatched)}

    def submit_nowait(self, dispatch: Dispatch) -> None:
        assert self.capacity()["shell"] > 0, "more handed out than the pool has room for"
        self.dispatched.append(dispatch)
        self.handed_at.append(trio.current_time())
        job = dispatch.job
        self.marks_written.append(
            any(
                isinstance(r, JobStatus)
                and (r.id, r.status, r.attempts) == (job.id, Status.TRIGGERED, job.attempts)
                for r in self.log.records
            )
        )

    start_nowait = submit_nowait  # the real pools start a run at once when they have room

    async def wait_for_capacity(self) -> None:
        await trio.sleep_forever()


@dataclass
class Scheduler:
    client: ActorClient
    log: MemoryLog
    pools: Pools
    dispatcher: Dispatcher
    actor: CommandActor


class Lateness(Observer):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def triggered(self, lateness_s: list[float]) -> None:
        self.seen.extend(lateness_s)


class BoundedAlarm(TrioAlarm):
    """A TrioAlarm that fails the test instead of letting a release spin on it."""

    waits = 0

    async def wait(self) -> None:
        self.waits += 1
        assert self.waits < 1000, "the release keeps waiting on an alarm that fired"
        await super().wait()


@asynccontextmanager
async def scheduler(
    wall: trio.testing.MockClock,
    ahead_s: float = 0.0,
    observer: Observer | None = None,
    alarm_lead_us: int = 0,
) -> AsyncIterator[Scheduler]:
    """alarm_lead_us: the alarm's clock runs this far ahead of the wall clock."""
    log = MemoryLog()
    ahead_us = round(ahead_s * MICROS)
    timer, actor, client = timed_actor(log, ahead_us, observer)
    pools = Pools(log)
    dispatcher = Dispatcher(
        client.clone(),
        timer,
        pools,  # type: ignore[arg-type]
        ahead_us=ahead_us,
        observer=observer,
        alarm=BoundedAlarm(clock=lambda: dispatch.now_us() + alarm_lead_us),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await nursery.start(dispatcher.run)
        yield Scheduler(client, log, pools, dispatcher, actor)
        nursery.cancel_scope.cancel()


RULE = Rule("r", "app.", ShellRunner("/bin/true.sh"))


async def test_a_job_due_while_the_log_cannot_be_written_runs_once_it_can(
    wall: trio.testing.MockClock,
) -> None:
    async with scheduler(wall) as s:
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.1", at(1)))
        s.log.fail = True
        await trio.sleep(30)  # due at 1 s; every trigger fails meanwhile
        assert s.pools.dispatched == []
        assert (await s.client.call(GetJob("app.1"))).status is Status.PLANNED
        # backed off (0.1, 0.2, 0.4 ... 5 s apart), not spinning on the due job
        # 0.1 s apart, then 0.2, 0.4 ... up to 5 s: 11 tries in 29 s, not thousands
        assert 5 <= s.dispatcher.failed_triggers <= 12
        s.log.fail = False
        await trio.sleep(TRIGGER_RETRY_MAX_S)
        assert [d.job.id for d in s.pools.dispatched] == ["app.1"]
        job = await s.client.call(GetJob("app.1"))
        assert (job.status, job.attempts) == (Status.TRIGGERED, 1)
        assert s.log.records[-1] == JobStatus("app.1", Status.TRIGGERED, 1, "", job.updated_at)


async def test_the_backoff_starts_again_small_after_a_trigger_is_written(
    wall: trio.testing.MockClock,
) -> None:
    async with scheduler(wall) as s:
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.1", at(0)))
        await s.client.call(SetJob("app.2", at(100)))
        s.log.fail = True
        await trio.sleep(60)  # app.1 is due: the pause grows to its maximum
        s.log.fail = False
        await trio.sleep(TRIGGER_RETRY_MAX_S)
        assert [d.job.id for d in s.pools.dispatched] == ["app.1"]
        s.log.fail = True
        failed = s.dispatcher.failed_triggers
        await trio.sleep_until(100 + TRIGGER_RETRY_INITIAL_S * 1.5)
        assert s.dispatcher.failed_triggers == failed + 2  # at 100 s and 0.1 s later


# -- fire-ahead: the trigger's sync off the job's path (issue 12) ---------------------------


DUE = [1.0, 1.001, 1.005, 1.03, 2.0]


@pytest.mark.parametrize("sync_s", [0.003, 0.019])
async def test_a_job_is_handed_out_at_its_due_time_after_its_mark_was_written(
    wall: trio.testing.MockClock, sync_s: float
) -> None:
    """With a 20 ms window and a sync shorter than it, the runner gets the job at its
    due time exactly, never before, and only once its `triggered` mark is written;
    the dispatcher arms the next jobs while earlier ones wait for their time."""
    lateness = Lateness()
    async with scheduler(wall, ahead_s=0.02, observer=lateness) as s:
        s.log.sync_s = sync_s
        await s.client.call(SetRule(RULE))
        for n, due in enumerate(DUE):
            await s.client.call(SetJob(f"app.{n}", at(due)))
        await trio.sleep(3)
        assert [d.job.id for d in s.pools.dispatched] == [f"app.{n}" for n in range(5)]
        if sync_s < 0.005:  # each sync ends before the next job's window opens
            assert s.pools.handed_at == pytest.approx(DUE, abs=1e-6)
            assert lateness.seen == pytest.approx([0.0] * 5, abs=1e-6)
        else:  # the syncs follow each other: a job is late by what they overran its window
            assert s.pools.handed_at == pytest.approx([1.0, 1.018, 1.018, 1.037, 2.0], abs=1e-6)
            assert lateness.seen == pytest.approx([0.0, 0.017, 0.013, 0.007, 0.0], abs=1e-6)
        assert all(handed >= due - 1e-9 for handed, due in zip(s.pools.handed_at, DUE, strict=True))
        assert s.pools.marks_written == [True] * 5
        for n in range(5):
            job = await s.client.call(GetJob(f"app.{n}"))
            assert (job.status, job.attempts) == (Status.TRIGGERED, 1)


async def test_a_job_armed_later_for_an_earlier_time_is_handed_out_first(
    wall: trio.testing.MockClock,
) -> None:
    async with scheduler(wall, ahead_s=0.5) as s:
        s.log.sync_s = 0.003
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.late", at(1.4)))
        await trio.sleep_until(1.0)  # app.late is armed (at 0.9), waiting for 1.4
        assert s.pools.dispatched == []
        await s.client.call(SetJob("app.early", at(1.1)))
        await trio.sleep(1)
        assert [d.job.id for d in s.pools.dispatched] == ["app.early", "app.late"]
        assert s.pools.handed_at == pytest.approx([1.1, 1.4], abs=1e-6)


async def test_armed_jobs_take_their_room_in_the_pools(wall: trio.testing.MockClock) -> None:
    """A pool's room counts the jobs armed for it: never more handed out than it has."""
    async with scheduler(wall, ahead_s=0.5) as s:
        s.pools.room = 3
        await s.client.call(SetRule(RULE))
        for n in range(5):
            await s.client.call(SetJob(f"app.{n}", at(1.0 + n / 100)))
        await trio.sleep_until(0.9)
        assert s.dispatcher._capacity() == {"shell": 0}
        states = [(await s.client.call(GetJob(f"app.{n}"))).status for n in range(5)]
        assert states == [Status.TRIGGERED] * 3 + [Status.PLANNED] * 2
        await trio.sleep(2)
        assert [d.job.id for d in s.pools.dispatched] == ["app.0", "app.1", "app.2"]


@pytest.mark.parametrize(
    ("ahead_s", "sync_s", "handed_at", "lateness_s"),
    [
        # no fire-ahead: the mark's sync is on the job's path; lateness counted at the trigger
        (0.0, 0.003, 1.003, 0.0),
        # woken at 0.98, written at 1.03: late by the overrun only, counted when handed out
        (0.02, 0.05, 1.03, 0.03),
    ],
    ids=["no-window", "sync-longer-than-the-window"],
)
async def test_a_job_waits_for_its_marks_sync_when_the_window_does_not_cover_it(
    wall: trio.testing.MockClock, ahead_s: float, sync_s: float, handed_at: float, lateness_s: float
) -> None:
    lateness = Lateness()
    async with scheduler(wall, ahead_s=ahead_s, observer=lateness) as s:
        s.log.sync_s = sync_s
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.1", at(1.0)))
        await trio.sleep(2)
        assert s.pools.handed_at == pytest.approx([handed_at], abs=1e-6)
        assert s.pools.marks_written == [True]
        assert lateness.seen == pytest.approx([lateness_s], abs=1e-6)


async def test_a_job_armed_ahead_refuses_set_as_a_run_in_flight(
    wall: trio.testing.MockClock,
) -> None:
    async with scheduler(wall, ahead_s=0.02) as s:
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.1", at(1.0)))
        await trio.sleep_until(0.99)
        assert s.pools.dispatched == []
        with pytest.raises(CommandError, match="triggered"):
            await s.client.call(SetJob("app.1", at(5.0)))
        await trio.sleep(1)
        assert [d.job.execute_at for d in s.pools.dispatched] == [at(1.0)]


async def test_the_alarm_firing_is_the_due_time_even_if_the_wall_clock_lags(
    wall: trio.testing.MockClock,
) -> None:
    """An alarm on another clock (Trio's) fires when the wall clock still reads a few
    µs short of the due time: the job goes out then, instead of the release waiting
    again (a whole millisecond of epoll's rounding on real clocks; here, a hang)."""
    async with scheduler(wall, ahead_s=0.02, alarm_lead_us=5) as s:
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.1", at(1.0)))
        await trio.sleep(2)
        assert s.pools.handed_at == pytest.approx([1.0], abs=1e-5)


async def test_a_large_bucket_is_opened_between_client_requests(
    wall: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs of a later bucket, more than OPEN_SLICE of them, are opened a slice an
    actor step once the earlier jobs have gone: a client's request is answered while
    the bucket is open in part, and each job is still handed out at its due time."""
    monkeypatch.setattr(state_module, "OPEN_SLICE", 8)
    later_s = (1 << BUCKET_SHIFT) / MICROS  # a bucket later: ~4.8 hours
    due = [later_s + 60 + n / 100 for n in range(80)]
    async with scheduler(wall) as s:
        await s.client.call(SetRule(RULE))
        await s.client.call(SetJob("app.first", at(1)))  # its bucket is open (the heap)
        for n, seconds in enumerate(reversed(due)):  # a bucket's list, latest first
            await s.client.call(SetJob(f"app.{79 - n:02d}", at(seconds)))
        opening = trio.Event()  # the first slice is done
        prepare = DueIndex.prepare

        def prepare_and_tell(index: DueIndex, budget: int) -> int | None:
            left = prepare(index, budget)
            if left is None:
                opening.set()
            return left

        monkeypatch.setattr(DueIndex, "prepare", prepare_and_tell)
        answered_while_open: list[bool] = []

        async def ask() -> None:
            with trio.move_on_after(later_s + 100):
                await opening.wait()
            openings = s.actor.state._due._openings  # type: ignore[union-attr]
            job = await s.client.call(GetJob("app.first"))
            answered_while_open.append(bool(openings) and job.status is Status.TRIGGERED)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(later_s + 120)
        assert answered_while_open == [True]
        assert [d.job.id for d in s.pools.dispatched] == ["app.first"] + [
            f"app.{n:02d}" for n in range(80)
        ]
        assert s.pools.handed_at == pytest.approx([1.0, *due], abs=1e-6)
