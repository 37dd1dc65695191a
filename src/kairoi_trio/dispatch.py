"""The dispatcher: sleeps until the earliest planned job is due, then has the
command actor mark due jobs triggered (durably) and hands them to runner pools.

There is no polling tick. The actor tells the DueTimer the earliest due time
after every commit; the timer's sleep is a cancel scope whose deadline is moved
in place, so a job set for earlier than everything else wakes the dispatcher
at once, at no cost for the jobs that change nothing.

A trigger that cannot be written (the log's disk is full, read-only, failing)
leaves the jobs planned; the dispatcher then waits TRIGGER_RETRY_INITIAL_S,
doubling up to TRIGGER_RETRY_MAX_S, and tries again, instead of spinning on
jobs that are due (the actor logs and counts the failures).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from kairoi_trio.commands import MAX_TRIGGER, CommandError, TriggerDue, TriggerResult
from kairoi_trio.core.actor import ActorClient
from kairoi_trio.model import MICROS, now_us
from kairoi_trio.runners.pool import RunnerPools

# Sleep at most this long at a time, so that a wall-clock step (NTP, a VM
# resumed) delays a trigger by at most this much.
MAX_SLEEP_S = 1.0

# After a trigger that could not be written, wait this long before trying
# again, doubling after each failure up to the maximum.
TRIGGER_RETRY_INITIAL_S = 0.1
TRIGGER_RETRY_MAX_S = 5.0

# The first TriggerDue after a quiet spell takes at most FIRST_TRIGGER due jobs, so
# that the first runs start while later ones are still being marked (a burst of
# 15,000 due jobs: the first publish 0.15-0.2 s after the due time instead of
# 0.3-0.4 s with 4,096); each call that finds more due doubles it, up to
# MAX_TRIGGER, since larger batches cost less per job (one commit, one claim).
FIRST_TRIGGER = 512

log = structlog.get_logger(__name__)


class DueTimer:
    def __init__(self) -> None:
        self._next_due: int | None = None
        self._scope: trio.CancelScope | None = None

    def update(self, next_due: int | None) -> None:
        """Called by the actor after each commit with the earliest due time."""
        self._next_due = next_due
        if self._scope is not None:
            self._scope.deadline = self._deadline()

    def _deadline(self) -> float:
        if self._next_due is None:
            return trio.current_time() + MAX_SLEEP_S
        delay = (self._next_due - now_us()) / MICROS
        return trio.current_time() + min(max(delay, 0.0), MAX_SLEEP_S)

    async def wait_due(self) -> None:
        """Return once a planned job is due."""
        while self._next_due is None or self._next_due > now_us():
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self._scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._scope = None


class Dispatcher:
    def __init__(self, actor: ActorClient, timer: DueTimer, pools: RunnerPools) -> None:
        self._actor = actor
        self._timer = timer
        self._pools = pools
        self.failed_triggers = 0  # TriggerDue calls that could not be written

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backlog: frozenset[str] = frozenset()  # kinds whose due jobs wait for room
        retry_in = TRIGGER_RETRY_INITIAL_S
        limit = FIRST_TRIGGER
        while True:
            if not backlog:
                await self._timer.wait_due()
            elif not any(self._pools.capacity().get(kind) for kind in backlog):
                await self._first_of(self._timer.wait_due, self._pools.wait_for_capacity)
            try:
                result: TriggerResult = await self._actor.call(
                    TriggerDue(now_us(), self._pools.capacity(), limit)
                )
            except CommandError as error:
                # Nothing was triggered: the jobs stay planned, and due. Back off.
                self.failed_triggers += 1
                log.debug("trigger not written", error=error.message, retry_in_s=retry_in)
                await trio.sleep(retry_in)
                retry_in = min(retry_in * 2, TRIGGER_RETRY_MAX_S)
                backlog = frozenset()
                continue
            retry_in = TRIGGER_RETRY_INITIAL_S
            for dispatch in result.dispatches:
                self._pools.submit_nowait(dispatch)
            backlog = result.deferred
            if result.more_due:
                limit = min(limit * 2, MAX_TRIGGER)
                await trio.lowlevel.checkpoint()
            else:
                limit = FIRST_TRIGGER

    @staticmethod
    async def _first_of(*waits: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            for wait in waits:
                nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
