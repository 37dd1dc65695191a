"""The dispatcher on Trio's mock clock: the harness of the dispatcher's unit tests.

`tie_wall_clock` makes dispatch.now_us() follow Trio's autojumping clock (WALL_START
at trio time 0), so timing tests are exact and take no real time. `MemoryLog`
keeps appends in memory, takes `sync_s` per append (its fsync) and fails with
ENOSPC while `fail` is set. `timed_actor` is the real command actor and state on
that log, its commits feeding a DueTimer, as the server wires them.
"""

from __future__ import annotations

import errno

import pytest
import trio

from kairoi_trio import dispatch
from kairoi_trio.commands import Request
from kairoi_trio.core.actor import ActorClient, CommandActor, Observer
from kairoi_trio.core.state import State
from kairoi_trio.dispatch import DueTimer
from kairoi_trio.model import MICROS
from kairoi_trio.storage.records import Record

WALL_START = 1_700_000_000 * MICROS


def tie_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """dispatch.now_us() reads Trio's clock from now on: WALL_START at trio time 0."""
    monkeypatch.setattr(
        dispatch, "now_us", lambda: WALL_START + round(trio.current_time() * MICROS)
    )


def at(seconds: float) -> int:
    """The wall-clock time (µs) at trio time `seconds`."""
    return WALL_START + round(seconds * MICROS)


class MemoryLog:
    """Appends kept in memory; `fail` makes them raise ENOSPC, as a full disk does."""

    def __init__(self, sync_s: float = 0.0) -> None:
        self.records: list[Record] = []
        self.fail = False
        self.sync_s = sync_s  # how long an append takes (its fsync)
        self.failed_appends = 0
        self.bytes_since_snapshot = 0
        self.snapshot_bytes = 0

    async def append(self, records: list[Record]) -> None:
        await trio.sleep(self.sync_s)
        if self.fail:
            self.failed_appends += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records.extend(records)

    async def rotate(self) -> int:
        raise AssertionError("no compaction here")

    async def write_snapshot(self, seq: int, jobs: object, rules: object) -> None:
        raise AssertionError("no compaction here")


def timed_actor(
    log: MemoryLog, ahead_us: int, observer: Observer | None = None
) -> tuple[DueTimer, CommandActor, ActorClient]:
    """A command actor on `log` whose commits update a DueTimer (woken `ahead_us`
    early), on the tied wall clock; start it with `nursery.start(actor.run)`."""
    timer = DueTimer(ahead_us)
    send, receive = trio.open_memory_channel[Request](100)
    actor = CommandActor(
        State(),
        log,  # type: ignore[arg-type]
        receive,
        on_commit=lambda state: timer.update(state.next_due()),
        clock=dispatch.now_us,
        observer=observer,
    )
    return timer, actor, ActorClient(send)
