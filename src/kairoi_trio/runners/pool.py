"""Bounded runner pools: a queue and at most `concurrency` runs at once per runner kind.

A burst of due jobs waits in the queue instead of spawning without limit; the
dispatcher only triggers as many jobs of a kind as that kind's queue has room
for, so a slow or broken runner kind never holds up the others.

One task per pool takes queued jobs while fewer than `concurrency` run. A run
goes to its runner's `start` first: a runner whose runs wait on something
shared (amqp: a connection, the broker's confirm; shell: one task watching
every script) starts it there and calls back when it ends, with no task per
run (a task parked and woken per job was a fifth of the server's CPU per amqp
job). Other runs (an HTTP request, a script with a payload, the first publish
on a new connection) get a task of their own.

Outcomes go to the command actor in batches. One that cannot be written (the
log's disk is full, read-only, failing) is kept, and written again, in order,
after OUTCOME_RETRY_INITIAL_S, doubling up to OUTCOME_RETRY_MAX_S, while the
server runs; its job stays `triggered` meanwhile (and, if the server stops
first, runs again at the next start: at least once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import structlog
import trio

from kairoi_trio.commands import CommandError, Dispatch, RecordOutcome
from kairoi_trio.core.actor import ActorClient, StorageUnavailable
from kairoi_trio.observability.logging import InfoLine
from kairoi_trio.runners.base import RunFailed, Runner

log = structlog.get_logger(__name__)
log_run = InfoLine(log)  # a line per run: the direct path

# After outcomes could not be written, wait this long before writing them
# again, doubling after each failure up to the maximum.
OUTCOME_RETRY_INITIAL_S = 0.1
OUTCOME_RETRY_MAX_S = 5.0

# The pool takes at most this many queued jobs in a row without a checkpoint of its
# own: runs that never block (started by the runner, failing at once) yield this often.
TAKES_PER_CHECKPOINT = 16


class _Wakeup:
    """Wakes the one task waiting in wait(), if any: a set() with none waiting is not
    kept (the waiter looks at what it waits for before it waits)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    async def wait(self) -> None:
        self._event = trio.Event()
        await self._event.wait()

    def set(self) -> None:
        event = self._event
        if event is not None:
            self._event = None
            event.set()


class RunnerPool:
    def __init__(
        self,
        runner: Runner,
        actor: ActorClient,
        *,
        concurrency: int,
        queue_size: int,
        observe_run: Callable[[str, bool, float], None] | None = None,
    ) -> None:
        self.runner = runner
        self.kind = runner.kind
        self.concurrency = concurrency
        self.queue_size = queue_size
        self._actor = actor
        self._observe_run = observe_run
        self._send, self._receive = trio.open_memory_channel[Dispatch](queue_size)
        self.running = 0
        self.capacity_changed = trio.Event()
        # Cancelled at the end of the grace period: stops the runs still going.
        self._runs_scope = trio.CancelScope()
        self._closing = False
        # Outcomes wait here for the recorder task, which sends them to the actor in
        # batches: a run ends without waiting for an fsync.
        self._outcomes: list[RecordOutcome] = []
        self._outcomes_waiting = trio.Event()
        self._sending = trio.Lock()  # one batch of outcomes at a time, so they stay in order
        self.outcome_retries = 0  # batches of outcomes that could not be written
        self._room = _Wakeup()  # a run ended: the starter may wait for room
        self._abandoned = False  # past the grace period: runs that end are not recorded
        self._runs: trio.Nursery | None = None  # where runs get their task, once running
        self._queued = _Wakeup()  # a job was queued: the starter may wait for one

    @property
    def unrecorded(self) -> int:
        """Outcomes of finished runs not written yet (waiting, or failed and kept)."""
        return len(self._outcomes)

    @property
    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    @property
    def free(self) -> int:
        return self.queue_size - self.queued

    def submit_nowait(self, dispatch: Dispatch) -> None:
        """Queue a job for the starter task. Raises trio.WouldBlock if the queue is full."""
        self._send.send_nowait(dispatch)
        self._queued.set()

    def start_nowait(self, dispatch: Dispatch) -> None:
        """Start the run now if the pool has room and nothing queued ahead of it, else
        queue it (as submit_nowait): for an armed job at its due time, this saves the
        starter task's turn through the scheduler (~0.1 ms at p50 on the benchmark
        machine). Raises trio.WouldBlock if it must queue and the queue is full."""
        runs = self._runs
        if runs is None or self._closing or self.running >= self.concurrency or self.queued:
            self.submit_nowait(dispatch)
            return
        self._launch(dispatch, runs)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the runner's own service and the runs until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.runner.serve)
            nursery.start_soon(self._record_outcomes)
            with self._runs_scope:
                async with trio.open_nursery() as runs:
                    self._runs = runs
                    runs.start_soon(self._start_runs, runs)
                    task_status.started()
            if not await self._send_outcomes():  # those of the runs that ended in the grace period
                log.error(
                    "outcomes not recorded at shutdown; their jobs run again at the next start",
                    kind=self.kind,
                    jobs=len(self._outcomes),
                )
            with trio.move_on_after(5):  # e.g. close broker connections politely
                await self.runner.aclose()
            nursery.cancel_scope.cancel()

    async def _record_outcomes(self) -> None:
        retry_in = OUTCOME_RETRY_INITIAL_S
        while True:
            await self._outcomes_waiting.wait()
            self._outcomes_waiting = trio.Event()
            if await self._send_outcomes():
                retry_in = OUTCOME_RETRY_INITIAL_S
                continue
            # Not written (the actor logs and counts it): kept, tried again later.
            self.outcome_retries += 1
            await trio.sleep(retry_in)
            retry_in = min(retry_in * 2, OUTCOME_RETRY_MAX_S)
            self._outcomes_waiting.set()

    async def _send_outcomes(self) -> bool:
        """Send the waiting outcomes as one batch; False if storage failed.

        Those that storage failed to write are put back in front of any that
        came meanwhile, in their order. Other errors are bugs: logged, dropped
        (the job stays triggered and runs again at the next start).
        """
        async with self._sending:
            batch, self._outcomes = self._outcomes, []
            if not batch:
                return True
            results = await self._actor.call_many(batch)
            kept = []
            for outcome, result in zip(batch, results, strict=True):
                if isinstance(result, StorageUnavailable):
                    kept.append(outcome)
                elif isinstance(result, CommandError):
                    log.error("could not record outcome", job=outcome.job_id, error=result.message)
            if kept:
                self._outcomes[:0] = kept
                return False
            return True

    async def drain(self, grace_s: float) -> None:
        """Stop taking queued jobs, give running ones `grace_s`, then cancel them.

        Jobs still queued, cancelled, or started by the runner and not ended by
        then stay `triggered` in the log and run again at the next start
        (at-least-once)."""
        self._closing = True
        self._send.close()
        self._queued.set()  # the starter ends once the queue is empty
        with trio.move_on_after(grace_s):
            while self.running:
                await self.capacity_changed.wait()
        if self.running:
            log.warning(
                "cancelling runs at the end of the grace period",
                kind=self.kind,
                running=self.running,
            )
        self._abandoned = True  # a started run that ends from now on is not recorded
        self._runs_scope.cancel()

    async def _start_runs(self, runs: trio.Nursery) -> None:
        """Take queued jobs while fewer than `concurrency` run, and start each: by the
        runner without a task (Runner.start), else in a task of its own in `runs`.

        A job stays in the queue until this task takes it and starts it in the same
        step, so that `queued` is exact for start_nowait. Queued jobs are taken
        without a checkpoint each (a full trip through the scheduler per job), but
        at most TAKES_PER_CHECKPOINT in a row: runs that start or fail without
        blocking cannot starve the loop.
        """
        taken = 0  # jobs taken since the last checkpoint
        while True:
            while self.running >= self.concurrency:  # start_nowait may take freed room first
                self._signal()  # room in the queue: the dispatcher may be waiting for it
                await self._room.wait()
                taken = 0
            if taken >= TAKES_PER_CHECKPOINT:
                await trio.lowlevel.checkpoint()
                taken = 0
                continue
            try:
                dispatch = self._receive.receive_nowait()
            except trio.WouldBlock:
                self._signal()
                await self._queued.wait()
                taken = 0
                continue
            except trio.EndOfChannel:  # drain: wait for the started runs (its grace bounds it)
                while self.running:
                    await self._room.wait()
                return
            taken += 1
            if self._closing:  # shutting down: leave it triggered for the next start
                continue
            self._launch(dispatch, runs)

    def _launch(self, dispatch: Dispatch, runs: trio.Nursery) -> None:
        """Count the run and start it: by the runner, or in a task of its own in `runs`."""
        self.running += 1
        if not self._start(dispatch):
            runs.start_soon(self._run_task, dispatch)

    def _start(self, dispatch: Dispatch) -> bool:
        """Runner.start for `dispatch`; False when the runner needs a task for it."""
        started = time.monotonic()
        ended = False

        def done(ok: bool, message: str) -> None:
            nonlocal ended
            if ended:  # a runner bug: counted once, or `running` would drift
                log.error("run ended twice", kind=self.kind, job=dispatch.job.id)
                return
            ended = True
            self._ended(dispatch, ok, message, started)

        try:
            return self.runner.start(
                dispatch.job, dispatch.rule, dispatch.rule.policy.timeout_s, done
            )
        except Exception as error:  # a runner bug fails the job, not the server
            log.exception("runner crashed", kind=self.kind, job=dispatch.job.id)
            done(False, f"runner error: {error!r}")
            return True

    async def _run_task(self, dispatch: Dispatch) -> None:
        job, rule = dispatch.job, dispatch.rule
        timeout = rule.policy.timeout_s
        started = time.monotonic()
        ok = False
        try:
            if timeout is None:  # no cancel scope: measurably cheaper per run
                message = await self.runner.run(job, rule)
                ok = True
            else:
                message = f"timed out after {timeout}s"
                with trio.move_on_after(timeout):
                    message = await self.runner.run(job, rule)
                    ok = True
        except RunFailed as failure:
            message = failure.message
        except Exception as error:  # a runner bug fails the job, not the server
            log.exception("runner crashed", kind=self.kind, job=job.id)
            message = f"runner error: {error!r}"
        except BaseException:  # cancelled at the end of the grace period: not recorded
            self._free()
            raise
        self._ended(dispatch, ok, message, started)

    def _ended(self, dispatch: Dispatch, ok: bool, message: str, started: float) -> None:
        """A run ended (in its task, or by the runner's callback): count it, log it,
        and queue its outcome for the recorder."""
        self._free()
        if self._abandoned:
            return
        job, rule = dispatch.job, dispatch.rule
        elapsed = time.monotonic() - started
        if self._observe_run is not None:
            self._observe_run(self.kind, ok, elapsed)
        log_run(
            "job run",
            {
                "job": job.id,
                "rule": rule.id,
                "kind": self.kind,
                "ok": ok,
                "outcome": message,
                "seconds": round(elapsed, 6),
                "attempt": job.attempts,
            },
        )
        self._outcomes.append(RecordOutcome(job.id, job.attempts, ok, message, rule.policy))
        self._outcomes_waiting.set()

    def _free(self) -> None:
        self.running -= 1
        self._room.set()
        if self._closing:  # only drain waits for each run to end
            self._signal()

    def _signal(self) -> None:
        self.capacity_changed.set()
        self.capacity_changed = trio.Event()


class RunnerPools:
    """All pools, by kind, as the dispatcher sees them."""

    def __init__(self, pools: Mapping[str, RunnerPool]) -> None:
        self.pools = dict(pools)

    def capacity(self) -> dict[str, int]:
        return {kind: pool.free for kind, pool in self.pools.items()}

    def submit_nowait(self, dispatch: Dispatch) -> None:
        self.pools[dispatch.rule.runner.kind].submit_nowait(dispatch)

    def start_nowait(self, dispatch: Dispatch) -> None:
        self.pools[dispatch.rule.runner.kind].start_nowait(dispatch)

    async def wait_for_capacity(self) -> None:
        """Return once any pool took a job from its queue (room freed up)."""
        async with trio.open_nursery() as nursery:
            for pool in self.pools.values():
                nursery.start_soon(self._first_signal, pool, nursery.cancel_scope)

    @staticmethod
    async def _first_signal(pool: RunnerPool, scope: trio.CancelScope) -> None:
        await pool.capacity_changed.wait()
        scope.cancel()

    async def drain(self, grace_s: float) -> None:
        async with trio.open_nursery() as nursery:
            for pool in self.pools.values():
                nursery.start_soon(pool.drain, grace_s)
