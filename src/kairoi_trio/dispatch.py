"""The dispatcher: sleeps until the earliest planned job is due, then has the
command actor mark due jobs triggered (durably) and hands them to runner pools.

Fire-ahead (jobs.fire_ahead_s, 20 ms by default): the dispatcher wakes that
long before the earliest due time and triggers the jobs due within the window
then; once their `triggered` marks are synced it hands each to its runner at
its due time. The mark's fsync (~3 ms on a typical disk) is then not part of
a job's lateness, and a run still never starts before its mark is durable
(at-least-once: a crash before the run re-runs the job at the next start, at
its due time). The price: for that window before its time a job is already
`triggered`, so SET and UNSET of it are refused as for a run in flight.
Quartz's batchTriggerAcquisitionFireAheadTimeWindow is the same idea.

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

import heapq
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog
import trio

from kairoi_trio.alarm import Alarm, new_alarm
from kairoi_trio.commands import (
    MAX_TRIGGER,
    CommandError,
    Dispatch,
    TriggerDue,
    TriggerResult,
)
from kairoi_trio.core.actor import ActorClient, Observer
from kairoi_trio.model import MICROS, now_us
from kairoi_trio.runners.pool import TAKES_PER_CHECKPOINT, RunnerPools

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
    """When the next planned job is due; `ahead_us`: wake this long before it
    (the fire-ahead window, jobs.fire_ahead_s)."""

    def __init__(self, ahead_us: int = 0) -> None:
        self._ahead = ahead_us
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
        delay = (self._next_due - self._ahead - now_us()) / MICROS
        return trio.current_time() + min(max(delay, 0.0), MAX_SLEEP_S)

    async def wait_due(self) -> None:
        """Return once a planned job is due within the fire-ahead window."""
        while self._next_due is None or self._next_due - self._ahead > now_us():
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self._scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    self._scope = None


class Dispatcher:
    """`ahead_us`: the fire-ahead window (µs, the DueTimer's too). Jobs due within
    it are triggered now and handed to their runner at their due time by a task
    of their own (the release), while the dispatcher goes on triggering; their
    trigger lateness (release time - due time) goes to `observer.triggered`."""

    def __init__(
        self,
        actor: ActorClient,
        timer: DueTimer,
        pools: RunnerPools,
        *,
        ahead_us: int = 0,
        observer: Observer | None = None,
        alarm: Alarm | None = None,
    ) -> None:
        """alarm: wakes the release at a due time (default: alarm.new_alarm(), made
        when run() starts; run() closes it)."""
        self._actor = actor
        self._timer = timer
        self._pools = pools
        self._ahead = ahead_us
        self._observer = observer or Observer()
        # jobs triggered ahead of their time, not handed out yet: (due, seq, dispatch)
        self._armed: list[tuple[int, int, Dispatch]] = []
        self._armed_by_kind: Counter[str] = Counter()  # their room in the pools is taken
        self._armed_seq = 0
        self._armed_added = trio.Event()
        self._alarm: Alarm | None = alarm
        self.failed_triggers = 0  # TriggerDue calls that could not be written

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Trigger due jobs until cancelled. Cancelled, jobs armed and not handed out
        yet stay `triggered`, and run at the next start, as any run in flight would."""
        if self._alarm is None:
            self._alarm = new_alarm()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._release_armed, self._alarm)
            task_status.started()
            await self._trigger_forever()

    async def _trigger_forever(self) -> None:
        backlog: frozenset[str] = frozenset()  # kinds whose due jobs wait for room
        retry_in = TRIGGER_RETRY_INITIAL_S
        limit = FIRST_TRIGGER
        while True:
            if not backlog:
                await self._timer.wait_due()
            elif not any(self._capacity().get(kind, 0) > 0 for kind in backlog):
                await self._first_of(self._timer.wait_due, self._pools.wait_for_capacity)
            now = now_us()
            try:
                result: TriggerResult = await self._actor.call(
                    TriggerDue(now, self._capacity(), limit, self._ahead)
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
                if dispatch.job.execute_at > now:
                    self._arm(dispatch)
                else:
                    self._pools.submit_nowait(dispatch)
            backlog = result.deferred
            if result.more_due:
                limit = min(limit * 2, MAX_TRIGGER)
                await trio.lowlevel.checkpoint()
            else:
                limit = FIRST_TRIGGER

    def _capacity(self) -> dict[str, int]:
        """The pools' room, less what the jobs armed and not handed out yet will take."""
        capacity = self._pools.capacity()
        for kind, armed in self._armed_by_kind.items():
            if kind in capacity:
                capacity[kind] -= armed
        return capacity

    def _arm(self, dispatch: Dispatch) -> None:
        self._armed_seq += 1
        entry = (dispatch.job.execute_at, self._armed_seq, dispatch)
        heapq.heappush(self._armed, entry)
        self._armed_by_kind[dispatch.rule.runner.kind] += 1
        if self._armed[0] is entry and self._alarm is not None:  # the release waits for it
            self._alarm.set(entry[0])
        self._armed_added.set()

    async def _release_armed(self, alarm: Alarm) -> None:
        """Hand each armed job to its runner at its due time, on an alarm set for the
        earliest (an armed job due earlier than those waiting moves it: `_arm`)."""
        armed = self._armed
        try:
            while True:
                if not armed:
                    await self._armed_added.wait()
                    self._armed_added = trio.Event()
                    continue
                alarm.set(armed[0][0])
                await alarm.wait()
                # The alarm fired for the earliest: its time has come, even if the wall
                # clock reads a few µs short (TrioAlarm's clock is Trio's), which
                # would otherwise cost another whole millisecond of epoll's rounding.
                now = max(now_us(), armed[0][0])
                lateness = []
                while armed and armed[0][0] <= now:
                    due, _, dispatch = heapq.heappop(armed)
                    self._armed_by_kind[dispatch.rule.runner.kind] -= 1
                    # Started here, not queued for the pool's starter task: one trip
                    # through the scheduler less between the due time and the run.
                    self._pools.start_nowait(dispatch)
                    lateness.append((now - due) / MICROS)
                    if len(lateness) % TAKES_PER_CHECKPOINT == 0:
                        # a runner may start runs without blocking (amqp): let others in
                        await trio.lowlevel.checkpoint()
                if lateness:
                    self._observer.triggered(lateness)
        finally:
            alarm.close()

    @staticmethod
    async def _first_of(*waits: Callable[[], Awaitable[None]]) -> None:
        async with trio.open_nursery() as nursery:
            for wait in waits:
                nursery.start_soon(_then_cancel, wait, nursery.cancel_scope)


async def _then_cancel(wait: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()
