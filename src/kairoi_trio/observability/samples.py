"""The last hour, minute by minute: what the dashboard's charts draw.

Prometheus keeps totals since start-up; a chart of "the last hour" needs the
totals' changes per minute. `MinuteRing` keeps them in a fixed ring of
`MINUTES` bins (bounded memory: 60 bins of a few integers, whatever the load),
each for one wall-clock minute:

    set        jobs set (SetJob, ScheduleJob: from KCP, gRPC, HTTP, batches)
    triggered  jobs handed to a runner
    executed   runs that succeeded
    failed     runs that failed, and jobs failed without a run (no rule, stale...)
    lateness   trigger lateness in seconds (count, sum, max): the observations of
               the kairoi_trigger_lateness_seconds histogram

The metrics observer feeds them (observability/metrics.py: MetricsObserver and
observe_run, already called once per commit or run: a dict increment more,
no I/O). A bin is reset when its minute comes round again, so nothing needs a
timer: `series` shows bins of minutes older than the hour as empty. No lock:
everything runs in the Trio thread.

`SAMPLES` is the server's ring (one process, one ring, like metrics.REGISTRY).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MINUTES = 60
KINDS = ("set", "triggered", "executed", "failed")


@dataclass
class Bin:
    """One minute's changes. minute: whole minutes since the epoch (UTC)."""

    minute: int = -1
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    lateness_count: int = 0
    lateness_sum_s: float = 0.0
    lateness_max_s: float = 0.0

    @property
    def lateness_mean_s(self) -> float:
        return self.lateness_sum_s / self.lateness_count if self.lateness_count else 0.0


class MinuteRing:
    """MINUTES bins of per-minute changes (module docstring). clock: seconds since
    the epoch (time.time; a fake in tests)."""

    def __init__(self, clock: Callable[[], float] = time.time, minutes: int = MINUTES) -> None:
        self._clock = clock
        self._bins = [Bin() for _ in range(minutes)]

    def _bin(self) -> Bin:
        minute = int(self._clock() // 60)
        slot = self._bins[minute % len(self._bins)]
        if slot.minute != minute:
            slot.minute = minute
            slot.counts = dict.fromkeys(KINDS, 0)
            slot.lateness_count = 0
            slot.lateness_sum_s = 0.0
            slot.lateness_max_s = 0.0
        return slot

    def record(self, kind: str, count: int = 1) -> None:
        """`count` changes of `kind` (one of KINDS) in this minute's bin."""
        self._bin().counts[kind] += count

    def record_lateness(self, seconds: list[float]) -> None:
        """Triggers' lateness (seconds, each >= 0), all in this minute's bin."""
        if not seconds:
            return
        slot = self._bin()
        slot.lateness_count += len(seconds)
        slot.lateness_sum_s += sum(seconds)
        worst = max(seconds)
        if worst > slot.lateness_max_s:
            slot.lateness_max_s = worst

    def series(self) -> list[Bin]:
        """The last MINUTES minutes, oldest first, the current minute last; a minute
        with nothing recorded is an empty Bin of that minute. O(MINUTES)."""
        now = int(self._clock() // 60)
        size = len(self._bins)
        out = []
        for minute in range(now - size + 1, now + 1):
            slot = self._bins[minute % size]
            out.append(slot if slot.minute == minute else Bin(minute=minute))
        return out


SAMPLES = MinuteRing()
