"""runners/pool.py and the dispatcher's release, abused: start_nowait (a run started at
an armed job's due time when the pool has room) mixed with submit_nowait, runs that
end at any moment, runs started by the runner (Runner.start) and in tasks, and drain.

What a user relies on: never more than `concurrency` runs at once, every job handed
to a pool runs exactly once (or, after drain began, not at all), queued jobs start
in the order they were queued, a queued job never waits while the pool has room,
and a burst never starves the other tasks.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from support.dispatch_harness import MemoryLog, at, tie_wall_clock, timed_actor

from kairoi_trio import dispatch
from kairoi_trio.alarm import TrioAlarm
from kairoi_trio.commands import Dispatch, GetJob, SetJob, SetRule
from kairoi_trio.dispatch import Dispatcher
from kairoi_trio.model import Job, Rule, ShellRunner, Status
from kairoi_trio.runners.base import Runner
from kairoi_trio.runners.pool import TAKES_PER_CHECKPOINT, RunnerPool, RunnerPools

RULE = Rule("r", "app.", ShellRunner("/bin/ok.sh"))


def job(n: int) -> Dispatch:
    return Dispatch(Job(f"app.{n}", 0, attempts=1), RULE)


def number(job: Job) -> int:
    return int(job.id.rsplit(".", 1)[1])


class NoStorage:
    """The actor's client, as far as the pool sees it: every outcome is written."""

    def __init__(self) -> None:
        self.recorded: list[str] = []

    async def call_many(self, commands: list[object]) -> list[object]:
        await trio.lowlevel.checkpoint()
        self.recorded.extend(c.job_id for c in commands)  # type: ignore[attr-defined]
        return [None] * len(commands)


class Mixed(Runner):
    """Runs of `app.N` last durations[N] s; N % 3 == 0 runs in a task of the pool's
    (start() answers False), the others are started by the runner and end by callback
    from a task of its own; start() raises for N % 11 == 10 (a runner bug: the job
    fails at once). Checks the concurrency at every start."""

    kind = "shell"

    def __init__(self, nursery: trio.Nursery, durations: dict[int, float]) -> None:
        self.nursery = nursery
        self.durations = durations
        self.pool: RunnerPool | None = None
        self.order: list[int] = []  # start() calls: the order the pool starts runs in
        self.ran: list[int] = []  # runs that ended
        self.in_flight = self.most_in_flight = 0
        self.started_while_closing: list[int] = []

    def _begin(self, n: int) -> None:
        assert self.pool is not None
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        assert self.in_flight <= self.pool.concurrency, f"app.{n}: {self.in_flight} at once"
        assert self.pool.running <= self.pool.concurrency, f"running {self.pool.running}"

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        n = number(job)
        assert self.pool is not None
        if self.pool._closing:
            self.started_while_closing.append(n)
        self.order.append(n)
        if n % 11 == 10:
            raise RuntimeError("a runner bug")  # the pool fails the job: it ended
        if n % 3 == 0:
            return False
        self._begin(n)
        self.nursery.start_soon(self._end, n, done)
        return True

    async def _end(self, n: int, done: Callable[[bool, str], None]) -> None:
        await trio.sleep(self.durations.get(n, 0.0))
        self.in_flight -= 1
        self.ran.append(n)
        done(True, "ok")

    async def run(self, job: Job, rule: Rule) -> str:
        n = number(job)
        self._begin(n)
        try:
            await trio.sleep(self.durations.get(n, 0.0))
        finally:
            self.in_flight -= 1
        self.ran.append(n)
        return "ok"


@asynccontextmanager
async def mixed_pool(
    concurrency: int, durations: dict[int, float], queue_size: int = 1000
) -> AsyncIterator[tuple[RunnerPool, Mixed, NoStorage, trio.Nursery]]:
    storage = NoStorage()
    async with trio.open_nursery() as outside:
        runner = Mixed(outside, durations)
        pool = RunnerPool(
            runner,
            storage,  # type: ignore[arg-type]
            concurrency=concurrency,
            queue_size=queue_size,
        )
        runner.pool = pool
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            yield pool, runner, storage, nursery
            nursery.cancel_scope.cancel()
        outside.cancel_scope.cancel()


@pytest.mark.parametrize("seed", range(40))
async def test_a_random_mix_keeps_the_concurrency_runs_each_job_once_in_fifo_order(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    rng = random.Random(seed)
    concurrency = rng.randint(1, 5)
    jobs = rng.randint(10, 80)
    durations = {n: rng.choice([0.0, 0.0, 0.001, 0.003, 0.02]) for n in range(jobs)}
    queued_order: list[int] = []  # jobs that went to the queue, in the order they did
    direct: list[int] = []
    async with mixed_pool(concurrency, durations) as (pool, runner, storage, _):
        for n in range(jobs):
            if rng.random() < 0.5:
                pool.submit_nowait(job(n))
                queued_order.append(n)
            else:
                room = pool.running < pool.concurrency and pool.queued == 0
                calls = len(runner.order)
                pool.start_nowait(job(n))
                if room:  # started at once, by the caller's own step
                    assert runner.order[calls:] == [n], "start_nowait with room did not start"
                    direct.append(n)
                else:  # queued, behind the jobs already waiting
                    assert pool.queued >= 1 and n not in runner.order
                    queued_order.append(n)
            pause = rng.random()
            if pause < 0.3:
                await trio.lowlevel.checkpoint()
            elif pause < 0.5:
                await trio.sleep(rng.choice([0.0005, 0.001, 0.01]))
            elif pause < 0.6:
                await trio.testing.wait_all_tasks_blocked()
                # work-conserving: nothing waits in the queue while the pool has room
                assert not (pool.queued and pool.running < pool.concurrency), (
                    pool.queued,
                    pool.running,
                )
        await trio.sleep(5)
        assert pool.queued == 0 and pool.running == 0
    assert sorted(runner.order) == list(range(jobs)), "a job did not run, or ran twice"
    assert sorted(runner.ran) == [n for n in range(jobs) if n % 11 != 10]
    assert sorted(storage.recorded) == sorted(f"app.{n}" for n in range(jobs))
    assert [n for n in runner.order if n in set(queued_order)] == queued_order  # FIFO
    assert runner.most_in_flight <= concurrency


async def test_start_nowait_never_overtakes_a_job_queued_while_the_starter_waits_for_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A run ends and frees room; before the starter task gets its turn, an armed job
    comes due: the queued job, waiting longer, must start first."""
    durations = {1: 0.01, 2: 0.05, 4: 0.01}
    async with mixed_pool(1, durations) as (pool, runner, _, _):
        pool.start_nowait(job(1))  # room: started at once
        pool.submit_nowait(job(2))  # no room: queued
        await trio.sleep(0.01)  # app.1 ends: room, and the starter is woken
        pool.start_nowait(job(4))  # in the same step as app.1's end, before the starter
        await trio.sleep(1)
    assert runner.order == [1, 2, 4]
    assert runner.most_in_flight == 1


async def test_drain_with_jobs_queued_and_the_starter_waiting_for_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The runs going end and are recorded; the queued jobs never start (they stay
    triggered for the next start); nothing handed to the pool once drain began starts."""
    durations = {n: 0.1 for n in range(10)}
    async with mixed_pool(2, durations) as (pool, runner, storage, nursery):
        for n in (1, 2):
            pool.start_nowait(job(n))
        for n in (4, 5, 7):
            pool.submit_nowait(job(n))
        assert pool.running == 2 and pool.queued == 3
        nursery.start_soon(pool.drain, 1.0)
        await trio.testing.wait_all_tasks_blocked()  # drain began
        for handed in (pool.start_nowait, pool.submit_nowait):
            with pytest.raises(trio.ClosedResourceError):
                handed(job(8))
        assert pool.running == 2
        await trio.sleep(2)
        assert runner.order == [1, 2]
        assert sorted(storage.recorded) == ["app.1", "app.2"]
        assert pool.running == 0


async def test_drain_of_an_idle_pool_ends_its_run_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The starter waits for a job: drain wakes it, and the pool's run() returns."""
    storage = NoStorage()
    async with trio.open_nursery() as outside:
        runner = Mixed(outside, {})
        pool = RunnerPool(runner, storage, concurrency=2, queue_size=10)  # type: ignore[arg-type]
        runner.pool = pool
        ended = trio.Event()

        async def run_pool(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            await pool.run(task_status=task_status)
            ended.set()

        await outside.start(run_pool)
        pool.start_nowait(job(1))
        await trio.sleep(0.1)
        with trio.fail_after(1):
            await pool.drain(5.0)
            await ended.wait()
        outside.cancel_scope.cancel()
    assert runner.order == [1] and storage.recorded == ["app.1"]


async def test_no_run_starts_once_drain_began_even_in_the_middle_of_a_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The starter takes up to TAKES_PER_CHECKPOINT jobs in a row; drain starting at
    one of its checkpoints stops the rest of the burst."""
    jobs = 5 * TAKES_PER_CHECKPOINT
    async with mixed_pool(jobs, {}) as (pool, runner, _, nursery):
        for n in range(1, jobs + 1):
            pool.submit_nowait(job(n))

        async def drain_at_first_start() -> None:
            while not runner.order:
                await trio.lowlevel.checkpoint()
            await pool.drain(1.0)

        nursery.start_soon(drain_at_first_start)
        await trio.sleep(1)
        assert runner.started_while_closing == []
        assert 0 < len(runner.order) < jobs
        assert pool.running == 0


# -- the dispatcher's release of armed jobs through real pools ------------------------


@pytest.fixture
def wall(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> trio.testing.MockClock:
    tie_wall_clock(monkeypatch)
    return autojump_clock


class Publishing(Runner):
    """Starts every run without blocking (as amqp's publish does) and ends it 5 ms later
    from a task of its own; records the release's progress at each start."""

    kind = "shell"

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.pool: RunnerPool | None = None
        self.started: list[str] = []
        self.started_at: list[float] = []
        self.in_flight = self.most_in_flight = 0
        self.turns_at_start: list[int] = []
        self.turns = 0
        self.first = trio.Event()

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        assert self.pool is not None
        self.started.append(job.id)
        self.started_at.append(trio.current_time())
        self.turns_at_start.append(self.turns)
        self.first.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        assert self.pool.running <= self.pool.concurrency
        self.nursery.start_soon(self._end, done)
        return True

    async def _end(self, done: Callable[[bool, str], None]) -> None:
        await trio.sleep(0.005)
        self.in_flight -= 1
        done(True, "published")

    async def run(self, job: Job, rule: Rule) -> str:
        raise AssertionError("every run starts without a task")


@pytest.mark.parametrize(("concurrency", "queue_size"), [(7, 1000), (1000, 1000), (7, 50), (3, 20)])
async def test_a_burst_of_armed_jobs_due_at_once_runs_each_once_within_the_concurrency(
    wall: trio.testing.MockClock, concurrency: int, queue_size: int
) -> None:
    """200 jobs due at the same instant, armed 20 ms ahead: at their due time each is
    started once (none before its time), never more than `concurrency` at once, all end
    executed, and the release lets the other tasks in while it starts them."""
    jobs = 200
    ahead_us = 20_000
    timer, actor, client = timed_actor(MemoryLog(sync_s=0.003), ahead_us)
    async with trio.open_nursery() as outside:
        runner = Publishing(outside)
        pool = RunnerPool(runner, client.clone(), concurrency=concurrency, queue_size=queue_size)
        runner.pool = pool
        dispatcher = Dispatcher(
            client.clone(), timer, RunnerPools({"shell": pool}), ahead_us=ahead_us,
            alarm=TrioAlarm(clock=dispatch.now_us),
        )  # fmt: skip

        async def ticker() -> None:
            await runner.first.wait()
            while dispatcher._armed:  # until the release handed out the last
                await trio.lowlevel.checkpoint()
                runner.turns += 1

        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            await nursery.start(pool.run)
            await client.call(SetRule(RULE))
            for n in range(jobs):
                await client.call(SetJob(f"app.{n}", at(1.0)))
            nursery.start_soon(ticker)
            await nursery.start(dispatcher.run)
            await trio.sleep(5)
            statuses = [(await client.call(GetJob(f"app.{n}"))).status for n in range(jobs)]
            nursery.cancel_scope.cancel()
        outside.cancel_scope.cancel()
    assert sorted(runner.started) == sorted(f"app.{n}" for n in range(jobs))
    assert min(runner.started_at) >= 1.0 - 1e-9, "a run started before its due time"
    assert runner.started_at[: min(concurrency, queue_size, jobs)] == pytest.approx(
        [1.0] * min(concurrency, queue_size, jobs)
    )
    assert runner.most_in_flight == min(concurrency, jobs)
    assert statuses == [Status.EXECUTED] * jobs
    if (
        concurrency >= jobs and queue_size >= jobs
    ):  # all started by the release: TAKES_PER_CHECKPOINT in a row at most
        assert runner.turns >= jobs // (TAKES_PER_CHECKPOINT + 1) - 1
