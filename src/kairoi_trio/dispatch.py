"""The dispatcher: sleeps until the earliest planned job is due, then has the
command actor mark due jobs triggered (durably) and hands them to runner pools.

There is no polling tick. The actor tells the DueTimer the earliest due time
after every commit; the timer's sleep is a cancel scope whose deadline is moved
in place, so a job set for earlier than everything else wakes the dispatcher
at once, at no cost for the jobs that change nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from kairoi_trio.commands import TriggerDue, TriggerResult
from kairoi_trio.core.actor import ActorClient
from kairoi_trio.model import MICROS, now_us
from kairoi_trio.runners.pool import RunnerPools

# Sleep at most this long at a time, so that a wall-clock step (NTP, a VM
# resumed) delays a trigger by at most this much.
MAX_SLEEP_S = 1.0


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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backlog: frozenset[str] = frozenset()  # kinds whose due jobs wait for room
        while True:
            if not backlog:
                await self._timer.wait_due()
            elif not any(self._pools.capacity().get(kind) for kind in backlog):
                await self._first_of(self._timer.wait_due, self._pools.wait_for_capacity)
            result: TriggerResult = await self._actor.call(
                TriggerDue(now_us(), self._pools.capacity())
            )
            for dispatch in result.dispatches:
                self._pools.submit_nowait(dispatch)
            backlog = result.deferred
            if result.more_due:
                await trio.lowlevel.checkpoint()

    @staticmethod
    async def _first_of(*waits: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            for wait in waits:
                nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
