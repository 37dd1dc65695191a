"""The command actor against an in-memory fake log: the harness of the actor's unit tests.

The fake records what is appended, can hold an append (to see that replies wait
for it and that waiting requests form one batch) and can be told to fail (to see
the rollback). Everything else is the real actor and the real State.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from kairoi_trio.commands import Request
from kairoi_trio.core.actor import ActorClient, CommandActor
from kairoi_trio.core.state import State
from kairoi_trio.model import MICROS, Job, Rule
from kairoi_trio.storage.compaction import OrderedJobs, snapshot_order

T0 = 1_700_000_000 * MICROS  # the fake clock's start


class FakeLog:
    """A log in memory: `fail` makes appends raise, `gate` holds them."""

    def __init__(self) -> None:
        self.batches: list[list] = []  # records of each successful append
        self.append_calls = 0
        self.fail = False
        self.error = OSError(errno.ENOSPC, "No space left on device")  # raised when failing
        self.gate: trio.Event | None = None
        self.bytes_since_snapshot = 0
        self.snapshot_bytes = 0
        self.record_bytes = 100
        self.rotations = 0
        self.snapshots: list[tuple[int, dict, dict]] = []
        self.snapshot_orders: list[list[str]] = []  # each snapshot's job ids, in its order
        self.snapshot_gate: trio.Event | None = None
        self.snapshot_fail = False
        self.rotate_gate: trio.Event | None = None
        self.rotate_error: Exception | None = None

    @property
    def records(self) -> list:
        return [r for batch in self.batches for r in batch]

    async def append(self, records: list) -> None:
        self.append_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise self.error
        self.batches.append(list(records))
        self.bytes_since_snapshot += self.record_bytes * len(records)

    async def rotate(self) -> int:
        if self.rotate_gate is not None:
            await self.rotate_gate.wait()
        if self.rotate_error is not None:
            raise self.rotate_error
        self.rotations += 1
        self.bytes_since_snapshot = 0
        return self.rotations

    async def write_snapshot(
        self, seq: int, jobs: Mapping[str, Job] | OrderedJobs, rules: Mapping[str, Rule]
    ) -> None:
        if self.snapshot_gate is not None:
            await self.snapshot_gate.wait()
        if self.snapshot_fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        in_order = list(snapshot_order(jobs))
        self.snapshot_orders.append([job.id for job in in_order])
        self.snapshots.append((seq, {job.id: job for job in in_order}, dict(rules)))


@dataclass
class Clock:
    now: int = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * MICROS)


@dataclass
class Harness:
    actor: CommandActor
    client: ActorClient
    log: FakeLog
    clock: Clock
    commits: list[int] = field(default_factory=list)

    @property
    def state(self) -> State:
        return self.actor.state

    async def call(self, command):  # noqa: ANN001, ANN201 - the command's result
        return await self.client.call(command)

    async def results(self, *commands) -> list:  # noqa: ANN002 - one batch of commands
        return await self.client.call_many(list(commands))


@asynccontextmanager
async def running_actor(state: State | None = None, **options: object) -> AsyncIterator[Harness]:
    log = FakeLog()
    clock = Clock()
    send, receive = trio.open_memory_channel[Request](1000)
    commits: list[int] = []
    actor = CommandActor(
        state or State(),
        log,
        receive,
        clock=clock,
        on_commit=lambda s: commits.append(len(s.jobs)),
        **options,  # type: ignore[arg-type]
    )
    harness = Harness(actor, ActorClient(send), log, clock, commits)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        yield harness
        await harness.client.aclose()
