"""runners/pool.py: outcomes that storage failed to write are kept and written again.

The real command actor and state, a log in memory that can be told to fail
(ENOSPC), and a runner that succeeds at once: a unit test of the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing
from support.dispatch_harness import MemoryLog

from kairoi_trio.commands import Dispatch, GetJob, Request, SetJob, SetRule, TriggerDue
from kairoi_trio.core.actor import ActorClient, CommandActor
from kairoi_trio.core.state import State
from kairoi_trio.model import Job, Rule, ShellRunner, Status
from kairoi_trio.runners.base import RunFailed, Runner
from kairoi_trio.runners.pool import OUTCOME_RETRY_MAX_S, TAKES_PER_CHECKPOINT, RunnerPool
from kairoi_trio.storage.records import JobStatus

RULE = Rule("r", "app.", ShellRunner("/bin/ok.sh"))


class Quick(Runner):
    kind = "shell"

    async def run(self, job: Job, rule: Rule) -> str:
        await trio.sleep(0.01 * int(job.id.rsplit(".", 1)[1]))  # app.1 ends first, then app.2
        return f"ran {job.id}"


@dataclass
class Harness:
    client: ActorClient
    log: MemoryLog
    pool: RunnerPool

    async def trigger(self, *ids: str) -> None:
        for job_id in ids:
            await self.client.call(SetJob(job_id, 0))
        result = await self.client.call(TriggerDue(1, {"shell": 100}))
        assert sorted(d.job.id for d in result.dispatches) == sorted(ids)
        for dispatch in result.dispatches:
            self.pool.submit_nowait(dispatch)

    async def status(self, job_id: str) -> Status:
        job = await self.client.call(GetJob(job_id))
        return job.status  # type: ignore[no-any-return]


@asynccontextmanager
async def running_pool(
    runner: Runner | None = None, concurrency: int = 4
) -> AsyncIterator[Harness]:
    log = MemoryLog()
    send, receive = trio.open_memory_channel[Request](100)
    actor = CommandActor(State(), log, receive, clock=lambda: 2)
    client = ActorClient(send)
    pool = RunnerPool(runner or Quick(), client.clone(), concurrency=concurrency, queue_size=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await nursery.start(pool.run)
        await client.call(SetRule(RULE))
        yield Harness(client, log, pool)
        nursery.cancel_scope.cancel()


async def test_an_outcome_storage_failed_to_write_is_written_once_it_can(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_pool() as h:
        await h.trigger("app.1")
        h.log.fail = True
        await trio.sleep(30)
        assert await h.status("app.1") is Status.TRIGGERED  # not lost, not faked
        assert h.pool.unrecorded == 1
        assert 5 <= h.pool.outcome_retries <= 12  # backed off, not spinning
        h.log.fail = False
        await trio.sleep(OUTCOME_RETRY_MAX_S)
        assert await h.status("app.1") is Status.EXECUTED
        assert h.pool.unrecorded == 0


async def test_kept_outcomes_are_written_in_order_before_later_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_pool() as h:
        await h.trigger("app.1", "app.2")
        h.log.fail = True
        await trio.sleep(1)  # both ran; their outcomes are kept
        assert h.pool.unrecorded == 2
        h.log.fail = False
        await h.trigger("app.3")  # a later run, while the kept ones wait for their retry
        await trio.sleep(OUTCOME_RETRY_MAX_S)
        executed = [
            r.id for r in h.log.records if isinstance(r, JobStatus) and r.status is Status.EXECUTED
        ]
        assert executed == ["app.1", "app.2", "app.3"]


class FailsAtOnce(Runner):
    """A run that never blocks (as one failing before any I/O does)."""

    kind = "shell"

    async def run(self, job: Job, rule: Rule) -> str:
        raise RunFailed("fails at once")


class NoStorage:
    async def call_many(self, commands: list[object]) -> list[object]:
        await trio.lowlevel.checkpoint()
        return [None] * len(commands)


async def test_runs_that_never_block_still_let_other_tasks_run() -> None:
    """Queued jobs are taken without a checkpoint each, but never more than
    TAKES_PER_CHECKPOINT in a row: a burst of failing runs does not starve the loop."""
    jobs = 50 * TAKES_PER_CHECKPOINT
    pool = RunnerPool(FailsAtOnce(), NoStorage(), concurrency=1, queue_size=jobs)  # type: ignore[arg-type]
    for i in range(jobs):
        pool.submit_nowait(Dispatch(Job(f"app.{i}", 0, attempts=1), RULE))
    turns = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        while pool.queued:
            await trio.lowlevel.checkpoint()
            turns += 1
        nursery.cancel_scope.cancel()
    assert turns >= jobs // (TAKES_PER_CHECKPOINT + 1) - 1  # one per 16 taken and 1 received


class Starting(Runner):
    """A runner that starts runs without a task (as amqp's publish_nowait does) and
    ends each from a task of its own: `app.N` after N * 10 ms, ok unless N is odd and
    `odd_fail`; `app.0` makes start() raise (a runner bug)."""

    kind = "shell"

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.in_flight = self.most_in_flight = self.started = 0
        self.ran_in_task: list[str] = []

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        n = int(job.id.rsplit(".", 1)[1])
        if n == 0:
            raise RuntimeError("a bug")
        if n >= 1000:
            return False  # the pool gives this one a task: run() below
        self.started += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.nursery.start_soon(self._end, n, done)
        return True

    async def _end(self, n: int, done: Callable[[bool, str], None]) -> None:
        await trio.sleep(0.01 * n)
        self.in_flight -= 1
        done(n % 3 != 2, f"ended {n}")

    async def run(self, job: Job, rule: Rule) -> str:
        self.ran_in_task.append(job.id)
        await trio.sleep(0.01)
        return "in a task"


async def test_runs_started_by_the_runner_end_by_callback_within_the_concurrency(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        runner = Starting(nursery)
        async with running_pool(runner, concurrency=3) as h:
            ids = [f"app.{n}" for n in (5, 1, 8, 2, 7, 3, 1000, 4, 6, 9, 0)]
            await h.trigger(*ids)
            await trio.sleep(5)
            statuses = {job_id: await h.status(job_id) for job_id in ids}
            nursery.cancel_scope.cancel()
    assert runner.started == 9 and runner.ran_in_task == ["app.1000"]
    assert runner.most_in_flight == 3  # never more than `concurrency` at once
    failed = {"app.2", "app.5", "app.8", "app.0"}  # n % 3 == 2, and the one whose start() raised
    assert statuses == {
        job_id: Status.FAILED if job_id in failed else Status.EXECUTED for job_id in ids
    }
    outcomes = {r.id: r.last_outcome for r in h.log.records if isinstance(r, JobStatus)}
    assert outcomes["app.5"] == "ended 5" and outcomes["app.1000"] == "in a task"
    assert outcomes["app.0"] == "runner error: RuntimeError('a bug')"


async def test_a_started_run_ending_after_the_grace_period_is_not_recorded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At-least-once: it stays triggered and runs again at the next start."""
    async with trio.open_nursery() as nursery:
        runner = Starting(nursery)
        async with running_pool(runner) as h:
            await h.trigger("app.1", "app.300")  # 10 ms and 3 s
            await trio.sleep(0.001)  # both started (a job still queued at drain stays so)
            assert runner.started == 2
            await h.pool.drain(grace_s=1)
            await trio.sleep(5)  # app.300 ends now, after the grace period
            assert await h.status("app.1") is Status.EXECUTED
            assert await h.status("app.300") is Status.TRIGGERED
            assert h.pool.running == 0
            nursery.cancel_scope.cancel()


class EndsTwice(Runner):
    """A buggy runner: every started run calls done twice."""

    kind = "shell"

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        done(True, "once")
        done(False, "twice")
        return True

    async def run(self, job: Job, rule: Rule) -> str:
        raise AssertionError("never: every run starts")


async def test_a_run_ended_twice_counts_once(autojump_clock: trio.testing.MockClock) -> None:
    """`running` must not drift (it bounds the runs at once), and the first outcome stands."""
    async with running_pool(EndsTwice(), concurrency=1) as h:
        await h.trigger("app.1", "app.2", "app.3")
        await trio.sleep(1)
        assert h.pool.running == 0
        for job_id in ("app.1", "app.2", "app.3"):
            assert await h.status(job_id) is Status.EXECUTED


class Recording(Runner):
    """Records the order runs start in; each takes 10 ms."""

    kind = "shell"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.in_flight = self.most_in_flight = 0

    async def run(self, job: Job, rule: Rule) -> str:
        self.started.append(job.id)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await trio.sleep(0.01)
        self.in_flight -= 1
        return "ok"


async def test_start_nowait_starts_at_once_with_room_and_queues_behind_waiting_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An armed job's run starts without waiting for the starter task when the pool
    has room; otherwise it queues, behind the jobs already waiting, and the
    concurrency holds either way."""
    runner = Recording()
    async with running_pool(runner, concurrency=2) as h:
        for n in range(1, 6):
            await h.client.call(SetJob(f"app.{n}", 0))
        result = await h.client.call(TriggerDue(1, {"shell": 100}))
        first, *rest = sorted(result.dispatches, key=lambda d: d.job.id)
        h.pool.start_nowait(first)
        assert h.pool.running == 1 and h.pool.queued == 0  # started, not queued
        h.pool.start_nowait(rest[0])
        h.pool.start_nowait(rest[1])  # no room left: queued
        assert h.pool.running == 2 and h.pool.queued == 1
        h.pool.submit_nowait(rest[2])
        h.pool.start_nowait(rest[3])  # behind app.4, although the pool has room soon
        await trio.sleep(1)
        # runs started in the same step start in any order: compare by waves of two
        waves = [set(runner.started[i : i + 2]) for i in range(0, 5, 2)]
        assert waves == [{"app.1", "app.2"}, {"app.3", "app.4"}, {"app.5"}]
        assert runner.most_in_flight == 2
        for n in range(1, 6):
            assert await h.status(f"app.{n}") is Status.EXECUTED
