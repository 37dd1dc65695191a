"""Bounded runner pools: a queue and a fixed number of workers per runner kind.

A burst of due jobs waits in the queue instead of spawning without limit; the
dispatcher only triggers as many jobs of a kind as that kind's queue has room
for, so a slow or broken runner kind never holds up the others.

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

# A worker takes at most this many queued jobs in a row without a checkpoint of
# its own: a run that never blocks (one failing at once) yields at least this often.
TAKES_PER_CHECKPOINT = 16


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
        # batches: a worker takes its next job without waiting for an fsync.
        self._outcomes: list[RecordOutcome] = []
        self._outcomes_waiting = trio.Event()
        self._sending = trio.Lock()  # one batch of outcomes at a time, so they stay in order
        self.outcome_retries = 0  # batches of outcomes that could not be written

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
        self._send.send_nowait(dispatch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the runner's own service and the workers until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.runner.serve)
            nursery.start_soon(self._record_outcomes)
            with self._runs_scope:
                async with trio.open_nursery() as workers:
                    for _ in range(self.concurrency):
                        workers.start_soon(self._worker)
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

        Jobs still queued or cancelled stay `triggered` in the log and run again
        at the next start (at-least-once)."""
        self._closing = True
        self._send.close()
        with trio.move_on_after(grace_s):
            while self.running:
                await self.capacity_changed.wait()
        if self.running:
            log.warning(
                "cancelling runs at the end of the grace period",
                kind=self.kind,
                running=self.running,
            )
        self._runs_scope.cancel()

    async def _worker(self) -> None:
        taken = 0  # jobs taken since receive() last checkpointed
        while True:
            try:
                if taken < TAKES_PER_CHECKPOINT:
                    # A queued job is taken without receive()'s checkpoint (a full trip
                    # through the scheduler per job): the run itself checkpoints.
                    try:
                        dispatch = self._receive.receive_nowait()
                        taken += 1
                    except trio.WouldBlock:
                        dispatch = await self._receive.receive()
                        taken = 0
                else:  # runs that return without one (fail fast) cannot starve the loop
                    dispatch = await self._receive.receive()
                    taken = 0
            except trio.EndOfChannel:
                return
            if self._closing:  # shutting down: leave it triggered for the next start
                continue
            self.running += 1
            self._signal()  # room in the queue: the dispatcher may be waiting for it
            try:
                await self._run_one(dispatch)
            finally:
                self.running -= 1
                # Only drain waits for runs to end; no signal per run otherwise.
                if self._closing:
                    self._signal()

    def _signal(self) -> None:
        self.capacity_changed.set()
        self.capacity_changed = trio.Event()

    async def _run_one(self, dispatch: Dispatch) -> None:
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


class RunnerPools:
    """All pools, by kind, as the dispatcher sees them."""

    def __init__(self, pools: Mapping[str, RunnerPool]) -> None:
        self.pools = dict(pools)

    def capacity(self) -> dict[str, int]:
        return {kind: pool.free for kind, pool in self.pools.items()}

    def submit_nowait(self, dispatch: Dispatch) -> None:
        self.pools[dispatch.rule.runner.kind].submit_nowait(dispatch)

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
