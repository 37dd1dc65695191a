"""The command actor: the single writer of jobs, rules and the log.

Every front end (KCP, gRPC), the dispatcher and the runner pools send it
`Request`s over one bounded memory channel. It takes whatever requests are
waiting as one batch, applies them to the in-memory state, appends the
resulting records to the log with one write and one fsync (group commit), and
only then replies. While the fsync runs in a thread, new requests queue up and
form the next batch, so throughput grows with load instead of being capped by
one fsync per write.

Reads do not wait for an fsync. While an append (or a log rotation) runs in
its worker thread, the actor goes on taking requests: a request of reads
only, none of which touches a job or rule with an unacknowledged change (of
the batch being written, or of a write waiting for the next batch), is
answered at once; it reads state as of the last acknowledged commit, since
nothing else in memory differs from it. Every other request is held, in
arrival order, and forms the next batch. docs/architecture.md gives the
argument.

If the append fails (disk full, read-only), the batch's changes are undone in
memory, every command of the batch that changed something gets an UNAVAILABLE
error (StorageUnavailable: try again later), and the actor goes on serving:
reads still work, and writes work again once the disk does. While writes fail
the actor is not `writable` (/ready answers 503); when idle it probes the log
with a no-op record now and then, so that readiness comes back without client
traffic. Failures are logged once per kind per episode, with counts, not per
batch.
"""

from __future__ import annotations

import gc
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

from kairoi_trio import __version__
from kairoi_trio.commands import (
    SNAPSHOT_PAGE,
    Command,
    CommandError,
    DeleteJob,
    DeleteRule,
    Dispatch,
    ErrorCode,
    EventSink,
    ExpireFinished,
    GetInfo,
    GetJob,
    GetRule,
    JobPage,
    JobsChanged,
    ListJobs,
    ListRules,
    MatchRule,
    PauseJob,
    PreviewJob,
    RecordOutcome,
    Request,
    Result,
    ResumeJob,
    RunJobNow,
    ScheduleJob,
    ServerInfo,
    SetJob,
    SetRule,
    Subscribe,
    TriggerDue,
    TriggerResult,
    Unsubscribe,
)
from kairoi_trio.core.checkpoint import COPY_SLICE, Checkpoint
from kairoi_trio.core.failures import WINDOW_S, FailReason, FailureLog
from kairoi_trio.core.release import RELEASE_SLICE
from kairoi_trio.core.state import State, waits
from kairoi_trio.core.validation import RuleValidator, check_prefix, validate_job
from kairoi_trio.model import (
    MICROS,
    Job,
    JobEvent,
    Rule,
    Status,
    check_time,
    new_job,
    now_us,
)
from kairoi_trio.scheduling.occurrences import ScheduleError
from kairoi_trio.scheduling.planner import DEFAULT_MAX_CATCHUP_RUNS, MAX_PREVIEW, Planner
from kairoi_trio.storage.compaction import OrderedJobs
from kairoi_trio.storage.records import JobDelete, JobPut, JobStatus, Record, RuleDelete, RulePut

log = structlog.get_logger(__name__)

PLANNED, TRIGGERED = Status.PLANNED, Status.TRIGGERED

# After a failed compaction (disk full...), wait this long before the next try
# instead of trying again after every batch.
COMPACTION_RETRY_S = 60.0


# At most this many commands are applied per group commit, so one huge burst
# cannot delay every reply behind a single enormous write.
MAX_BATCH_COMMANDS = 8192

# Requests held while an append is in flight (they form the next batch). Past
# this many (or MAX_BATCH_COMMANDS commands), the actor stops taking requests
# until the append ends, so the bounded channel slows senders down again.
MAX_HELD_REQUESTS = 1024

# While writes fail and no request comes, probe the log with a no-op record
# after this long, doubling up to the maximum, so that readiness comes back
# without client traffic.
PROBE_INITIAL_S = 0.25
PROBE_MAX_S = 5.0

# A long storage outage is summed up in the log this often.
STORAGE_SUMMARY_S = 60.0

# The probe record: the deletion of a job that cannot exist (ids never hold
# NUL), so replaying it changes nothing. Longer than a 4 KiB block, so that it
# only succeeds if the file system can give the log a new block: a write into
# the free end of the last block would succeed on a full disk.
PROBE_ID = "\x00kairoi-trio storage probe\x00".ljust(4200, "\x00")

# What a failed write was for, by the command that made it (the `what` label).
_WHAT: dict[type, str] = {
    SetJob: "client",
    ScheduleJob: "client",
    PauseJob: "client",
    ResumeJob: "client",
    RunJobNow: "client",
    DeleteJob: "client",
    SetRule: "client",
    DeleteRule: "client",
    TriggerDue: "trigger",
    RecordOutcome: "outcome",
    ExpireFinished: "retention",
}


# Writes of one job by id, besides SetJob and DeleteJob.
_RECURRING_WRITES = frozenset((ScheduleJob, PauseJob, ResumeJob, RunJobNow))


class StorageUnavailable(CommandError):
    """A write was not done because the log could not be written (disk full,
    read-only, I/O error): UNAVAILABLE, nothing of it is kept; try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


class Log(Protocol):
    """What the actor needs of storage: the seam between the core and a store.

    Two stores provide it:
    - the embedded log (storage/log.py, DurableLog): the whole state lives in
      memory (core/state.py) and the log only makes it durable. The actor
      applies commands to the State it was given and answers reads from
      memory, even while an append runs.
    - PostgreSQL (storage/postgres/): the database is shared by several
      instances, so memory holds only what a batch needs. The actor is given
      the store's `begin` as well: before each batch it calls
      `begin(commands)`, which opens a transaction, locks and reads the rows
      the commands name (and claims due jobs for a TriggerDue) and returns
      them as a State-like view; the actor applies the batch to that view, and
      `append` writes its records and commits. Every read goes through a batch.

    `append` (and `begin`) raise one of the actor's `storage_errors` when
    nothing of the batch was kept.
    """

    async def append(self, records: list[Record]) -> None: ...

    @property
    def bytes_since_snapshot(self) -> int: ...

    @property
    def snapshot_bytes(self) -> int: ...

    async def rotate(self) -> int: ...

    async def write_snapshot(
        self, seq: int, jobs: Mapping[str, Job] | OrderedJobs, rules: Mapping[str, Rule]
    ) -> None: ...


class Observer:
    """Hooks for metrics; the default does nothing, so the core needs no metrics library."""

    def appended(self, seconds: float, records: int) -> None:
        pass

    def append_failed(self) -> None:
        pass

    def write_failed(self, what: str) -> None:
        """A write failed; `what` it was for: client, trigger, outcome, retention, probe,
        compaction (one count per kind per failed group commit)."""

    def writable(self, ok: bool, reason: str) -> None:
        """Storage writes began to fail (False, with the error) or work again (True)."""

    def triggered(self, lateness_s: list[float]) -> None:
        """The batch just committed triggered these jobs, this late each (seconds)."""

    def jobs_set(self, count: int) -> None:
        """The batch just committed set `count` jobs (SetJob, ScheduleJob; count > 0)."""

    def failed_without_run(self, reason: FailReason, job_id: str) -> None:
        """The actor failed a job itself: no rule, stale, no runner, an error."""


@dataclass
class _Subscriber:
    prefix: str
    sink: EventSink
    start: int  # index in the batch's event list from which it sees events
    # While its snapshot is given a page at a time: the last id given so far. The
    # changes of later ids are left out (their page will show them); None: none are.
    cursor: str | None = None
    # The cursor's moves in this batch: (index in the batch's events when it moved,
    # the cursor before, whether the batch had written anything by then)
    moved: list[tuple[int, str | None, bool]] = field(default_factory=list)


class CommandActor:
    def __init__(
        self,
        state: State,
        log_: Log,
        receive: trio.MemoryReceiveChannel[Request],
        *,
        max_payload_bytes: int = 1 << 20,
        max_catchup_runs: int = DEFAULT_MAX_CATCHUP_RUNS,
        rule_validator: RuleValidator | None = None,
        storage_errors: tuple[type[BaseException], ...] = (OSError,),
        on_commit: Callable[[State], None] | None = None,
        compact_after_bytes: int = 0,
        compact_ratio: float = 0.25,  # [storage] compact_ratio's default
        observer: Observer | None = None,
        clock: Callable[[], int] = now_us,
        planner: Planner | None = None,
        begin: Callable[[Sequence[Command]], Awaitable[State]] | None = None,
    ) -> None:
        self.state = state
        self._log = log_
        self._begin_batch = begin
        self._loads_per_batch = begin is not None
        self._receive = receive
        self._max_payload = max_payload_bytes
        self._validate_rule = rule_validator or RuleValidator()
        self._storage_errors = storage_errors
        self._on_commit = on_commit
        self._clock = clock
        self._subscribers: list[_Subscriber] = []
        self._observer = observer or Observer()
        self._compact_after = compact_after_bytes  # 0: never
        self._compact_ratio = compact_ratio
        self._compacting = False
        self._compaction_retry_at = 0.0  # trio clock; after a failure, wait before trying again
        self._background: trio.Nursery | None = None
        self._failures = FailureLog()
        self.started_at = clock()
        # Recurring jobs' policies; "came due while the server was down" is before this start.
        self._planner = planner or Planner(
            started_at=self.started_at, max_catchup_runs=max_catchup_runs
        )
        self.batches = 0  # for metrics and tests
        self.commands = 0
        # Requests that came while the log was busy and could not be answered at
        # once, in arrival order: the next batch. The ids their writes name.
        self._open = True  # False once every sender closed the channel
        self._held: deque[Request] = deque()
        self._held_commands = 0
        self._held_jobs: set[str] = set()
        self._held_rules: set[str] = set()
        self._busy = False  # an append or rotation is in flight
        # Per batch: ids changed by it (unacknowledged until its append returns)...
        self._batch_jobs: set[str] = set()
        self._batch_rules: set[str] = set()
        # ...and the committed figures GetInfo answers with meanwhile.
        self._committed_counts: dict[Status, int] = dict(state.counts)
        self._committed_rules = len(state.rules)
        self._uncommitted = False  # the state holds changes not yet on disk
        self._immediate = False  # the request being applied is answered before the commit
        self._notes: list[tuple[FailReason, str, str]] = []  # jobs failed without a run
        self._lateness: list[float] = []  # of the jobs triggered
        self._sets = 0  # jobs set by the batch (Observer.jobs_set)
        # Storage health: writable until a write fails, again after one succeeds.
        self.writable = True
        self.storage_error = ""
        self._probe_delay = PROBE_INITIAL_S
        self._episode: Counter[str] = Counter()  # failed writes by kind, this episode
        self._episode_started = 0.0
        self._episode_summarised = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve requests until every sender has closed its end of the channel."""
        receive = self._receive
        async with receive, trio.open_nursery() as self._background:
            flushing = trio.CancelScope()
            self._background.start_soon(self._flush_failures, flushing)
            task_status.started()
            while True:
                batch = await self._next_batch()
                if batch is None:
                    break
                await self._process(batch, probe=not batch)
                if self._should_compact():
                    await self._start_compaction()
            flushing.cancel()

    async def _next_batch(self) -> list[Request] | None:
        """The held requests first, then whatever waits in the channel, up to
        MAX_BATCH_COMMANDS. Waits for a request when there is none; [] means: probe
        the storage (writes fail, and nothing came for a while); None: the end."""
        batch: list[Request] = []
        size = 0
        held = self._held
        while held and size < MAX_BATCH_COMMANDS:
            request = held.popleft()
            batch.append(request)
            size += len(request.commands)
        if batch:
            self._held_commands -= size
            self._held_jobs.clear()
            self._held_rules.clear()
            for request in held:  # what stays held comes after this batch
                self._note_held_keys(request)
            if held:
                return batch
        elif not self._open:
            return None
        else:
            wait = math.inf if self.writable else self._probe_delay
            try:
                with trio.move_on_after(wait) as waiting:
                    first = await self._receive.receive()
            except trio.EndOfChannel:
                self._open = False
                return None
            if waiting.cancelled_caught:
                return []
            batch.append(first)
            size = len(first.commands)
        while size < MAX_BATCH_COMMANDS and self._open:
            try:
                request = self._receive.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                self._open = False
                break
            batch.append(request)
            size += len(request.commands)
        return batch

    async def _flush_failures(self, scope: trio.CancelScope) -> None:
        """Log the aggregated failures once per window, and what is left at the end."""
        try:
            with scope:
                while True:
                    await trio.sleep(WINDOW_S)
                    self._failures.flush()
                    now = trio.current_time()
                    if not self.writable and now - self._episode_summarised >= STORAGE_SUMMARY_S:
                        self._episode_summarised = now
                        log.error(
                            "storage writes still failing",
                            error=self.storage_error,
                            failed_writes=dict(self._episode),
                            seconds=round(now - self._episode_started, 1),
                        )
        finally:
            self._failures.flush()

    # -- while the log is busy: answer reads that touch nothing unacknowledged ----------

    async def _while_serving(self, operation: Callable[[], Awaitable[None]]) -> None:
        """Run a storage operation (which must not raise); meanwhile answer the
        requests that can be answered from committed state and hold the others."""
        serving = trio.CancelScope()

        async def run_operation() -> None:
            try:
                await operation()
            finally:
                serving.cancel()

        self._busy = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_operation)
                with serving:
                    while self._room_to_hold():
                        try:
                            request = await self._receive.receive()
                        except trio.EndOfChannel:
                            self._open = False
                            break
                        self._arrived(request)
                        while self._room_to_hold():  # what came meanwhile, with no wake-up each
                            try:
                                request = self._receive.receive_nowait()
                            except trio.WouldBlock:
                                break
                            except trio.EndOfChannel:
                                self._open = False
                                break
                            self._arrived(request)
                    await trio.sleep_forever()  # held is full: wait for the operation
        finally:
            self._busy = False

    def _room_to_hold(self) -> bool:
        return (
            self._open
            and len(self._held) < MAX_HELD_REQUESTS
            and self._held_commands < MAX_BATCH_COMMANDS
        )

    def _arrived(self, request: Request) -> None:
        if self._answerable_now(request):
            self._answer_now(request)
        else:
            self._hold(request)

    def _answerable_now(self, request: Request) -> bool:
        """Reads only, and none touches a job or rule with an unacknowledged change.

        Unacknowledged: changed by the batch being applied or written, or (while
        the log is busy) named by a held write, which must not be overtaken by a
        read of the same id (a connection's pipelined SET then GET).
        """
        if self._loads_per_batch:
            return False  # nothing is in memory between batches: reads go with the next one
        busy = self._busy
        jobs, rules = self._batch_jobs, self._batch_rules
        held_jobs = self._held_jobs if busy else ()
        held_rules = self._held_rules if busy else ()
        for command in request.commands:
            kind = type(command)
            if kind is GetJob or kind is PreviewJob:
                job_id = command.id  # type: ignore[union-attr]
                if job_id in jobs or job_id in held_jobs:
                    return False
            elif kind is ListJobs or kind is Subscribe:
                prefix = command.prefix  # type: ignore[union-attr]
                if _any_prefixed(jobs, prefix) or _any_prefixed(held_jobs, prefix):
                    return False
            elif kind is GetRule:
                rule_id = command.id  # type: ignore[union-attr]
                if rule_id in rules or rule_id in held_rules:
                    return False
            elif kind is ListRules:
                prefix = command.prefix  # type: ignore[union-attr]
                if _any_prefixed(rules, prefix) or _any_prefixed(held_rules, prefix):
                    return False
            elif kind is MatchRule:
                if rules or held_rules:  # any rule change may change the pairing
                    return False
            elif kind is not GetInfo and kind is not Unsubscribe:
                return False  # a write
        return True

    def _answer_now(self, request: Request) -> None:
        self._immediate = True
        try:
            results = [self._apply_safely(command) for command in request.commands]
        finally:
            self._immediate = False
        self.commands += len(request.commands)
        try:
            request.reply(results)
        except Exception:
            log.exception("reply callback failed")

    def _hold(self, request: Request) -> None:
        self._held.append(request)
        self._held_commands += len(request.commands)
        self._note_held_keys(request)

    def _note_held_keys(self, request: Request) -> None:
        for command in request.commands:
            kind = type(command)
            if kind is SetJob or kind is DeleteJob or kind in _RECURRING_WRITES:
                self._held_jobs.add(command.id)  # type: ignore[union-attr]
            elif kind is RecordOutcome:
                self._held_jobs.add(command.job_id)  # type: ignore[union-attr]
            elif kind is SetRule:
                self._held_rules.add(command.rule.id)  # type: ignore[union-attr]
            elif kind is DeleteRule:
                self._held_rules.add(command.id)  # type: ignore[union-attr]
            # TriggerDue and ExpireFinished come from the server itself, never
            # pipelined behind a client's read: reads may go before them.

    # -- compaction ---------------------------------------------------------------

    def _should_compact(self) -> bool:
        return (
            self._compact_after > 0
            and not self._compacting
            and trio.current_time() >= self._compaction_retry_at
            # the log since the snapshot at least compact_ratio times the snapshot, and
            # at least the configured size
            and self._log.bytes_since_snapshot
            >= max(self._compact_after, self._compact_ratio * self._log.snapshot_bytes)
        )

    async def _start_compaction(self) -> None:
        """Rotate the log between two appends, then, in the background, copy the
        jobs as they were at the rotation a slice at a time (core/checkpoint.py;
        Jobs and Rules are immutable: a copy holds references) and write the
        snapshot from the copy.

        Reads are answered while the rotation runs; writes wait for it. Any
        failure is logged, counted and tried again after COMPACTION_RETRY_S:
        compaction never stops the server.
        """
        sealed: list[int] = []

        async def rotate() -> None:
            try:
                sealed.append(await self._log.rotate())
            except Exception as error:
                self._compaction_failed("log rotation failed", error)

        await self._while_serving(rotate)
        if not sealed:
            return
        self._compacting = True
        assert self._background is not None
        # The jobs as of the rotation, taken COPY_SLICE at a time by a task of their
        # own while this one goes on serving (core/checkpoint.py): in one step, the
        # copy held every client ~0.1 s a million jobs. The rules are few: copied now.
        checkpoint = self.state.begin_checkpoint()
        # Its list of the copy (and its dict of kept jobs) made old while empty: the
        # collector walks a young container's items at each young collection (a young
        # list of 3M jobs: 0.29 s; a GET waited 459 ms during a 10M compaction), an
        # old one's only at a full collection. A young collection's cost, once.
        gc.collect(1)
        self._background.start_soon(
            self._write_snapshot, sealed[0], checkpoint, dict(self.state.rules)
        )

    async def _write_snapshot(
        self, seq: int, checkpoint: Checkpoint, rules: dict[str, Rule]
    ) -> None:
        try:
            started, slices = time.perf_counter(), 0
            # A stop during the copy ends the compaction (seconds of copying at ten
            # million jobs; the segments keep everything), one while the snapshot is
            # written waits for it (DurableLog.aclose).
            try:
                while not checkpoint.done:
                    checkpoint.copy_some(COPY_SLICE)
                    slices += 1
                    await trio.lowlevel.checkpoint()  # the actor serves clients meanwhile
            finally:
                self.state.end_checkpoint()
            jobs = OrderedJobs(checkpoint.jobs_in_order)
            copied_s = round(time.perf_counter() - started, 3)
            await self._log.write_snapshot(seq, jobs, rules)
            log.info(
                "log compacted",
                segment=seq,
                jobs=len(jobs),
                rules=len(rules),
                copy_slices=slices,
                copy_seconds=copied_s,
            )
        except Exception as error:
            self._compaction_failed("compaction failed", error)
        finally:
            self._compacting = False
        # The copy's references, dropped a slice at a time (the writer's are gone)
        while checkpoint.release_some(RELEASE_SLICE):
            await trio.lowlevel.checkpoint()

    def _compaction_failed(self, event: str, error: Exception) -> None:
        if isinstance(error, self._storage_errors):
            log.error(event, error=str(error), retry_in_s=COMPACTION_RETRY_S)
        else:
            log.exception(event, retry_in_s=COMPACTION_RETRY_S)
        self._observer.write_failed("compaction")
        self._compaction_retry_at = trio.current_time() + COMPACTION_RETRY_S

    # -- one group commit ---------------------------------------------------------

    async def _process(self, batch: list[Request], *, probe: bool = False) -> None:
        if self._loads_per_batch and not await self._begin(batch):
            return
        self._now = self._clock()
        self._records: list[Record] = []
        self._undo: list[tuple[str, str, Any]] = []
        self._events: list[JobEvent] = []
        self._new_subscribers: list[_Subscriber] = []
        self._subscribers_before_write = 0  # new subscribers answered before the first change
        self._committed_counts = dict(self.state.counts)
        self._committed_rules = len(self.state.rules)
        self._uncommitted = True
        self._notes = []
        self._lateness = []
        self._sets = 0
        deferred: list[tuple[Request, list[Result]]] = []  # answered once the batch is written
        first_write: tuple[int, int] | None = None  # (deferred request, command) of the 1st change
        writers: set[str] = set()  # what the batch's writes are for
        records = self._records
        handlers = self._handlers
        for request in batch:
            if self._answerable_now(request):
                self._answer_now(request)
                continue
            results: list[Result] = []
            for c, command in enumerate(request.commands):
                before = len(records)
                try:  # _apply_safely, inline: this loop is the hot path of every write
                    results.append(handlers[type(command)](self, command))
                except CommandError as error:
                    results.append(error)
                except Exception as error:  # a bug must not take the scheduler down
                    log.exception("command failed", command=type(command).__name__)
                    results.append(CommandError(ErrorCode.UNAVAILABLE, f"internal error: {error}"))
                if len(records) != before:
                    writers.add(_WHAT.get(type(command), "client"))
                    if first_write is None:
                        first_write = (len(deferred), c)
                        self._subscribers_before_write = len(self._new_subscribers)
            deferred.append((request, results))
            self.commands += len(request.commands)
        if probe:
            self._records.append(JobDelete(PROBE_ID))
            writers.add("probe")

        if self._records or self._loads_per_batch:  # (a per-batch store ends its transaction)
            reason = await self._write(self._records)
            if reason is None:
                self._storage_works()
                self._report_committed()
            else:
                self._rollback()
                self._storage_fails(writers, reason)
                # Everything from the first change on failed: the writes, and the
                # reads that saw them (no dirty reads of what was rolled back).
                failure = StorageUnavailable(f"storage write failed: {reason}")
                first_r, first_c = first_write or (len(deferred), 0)
                for r in range(first_r, len(deferred)):
                    results = deferred[r][1]
                    for c in range(first_c if r == first_r else 0, len(results)):
                        results[c] = failure
        else:
            self._report_committed()
        self.batches += 1
        self._uncommitted = False
        self._batch_jobs.clear()
        self._batch_rules.clear()

        for request, results in deferred:
            try:
                request.reply(results)
            except Exception:
                log.exception("reply callback failed")
        self._publish()
        # Published: a Subscribe answered before the next batch (during a rotation)
        # sees that batch's events from the first, not from this one's count.
        self._events = []
        if self._on_commit is not None:
            self._on_commit(self.state)

    async def _begin(self, batch: list[Request]) -> bool:
        """Have a per-batch store load what the batch needs (self.state becomes
        that view). If it cannot, every command of the batch fails UNAVAILABLE:
        False."""
        commands = [command for request in batch for command in request.commands]
        failure: list[str] = []

        async def begin() -> None:
            try:
                assert self._begin_batch is not None
                self.state = await self._begin_batch(commands)
            except self._storage_errors as error:
                failure.append(str(error))
            except Exception as error:
                log.exception("loading a batch failed", commands=len(commands))
                failure.append(f"internal error: {error!r}")

        await self._while_serving(begin)
        if not failure:
            return True
        writers = {_WHAT.get(type(command), "client") for command in commands if command}
        self._storage_fails(writers or {"probe"}, failure[0])
        error = StorageUnavailable(f"storage unavailable: {failure[0]}")
        self.batches += 1
        self.commands += len(commands)
        for request in batch:
            try:
                request.reply([error] * len(request.commands))
            except Exception:
                log.exception("reply callback failed")
        return False

    def _apply_safely(self, command: Command) -> Result:
        try:
            return self._apply(command)
        except CommandError as error:
            # Without its traceback: the frames it holds would hold it (a cycle only a
            # full collection frees), and the error goes to the client, not a log.
            return error.with_traceback(None)
        except Exception as error:  # a bug must not take the scheduler down
            log.exception("command failed", command=type(command).__name__)
            return CommandError(ErrorCode.UNAVAILABLE, f"internal error: {error}")

    async def _write(self, records: list[Record]) -> str | None:
        """Append the batch's records, answering reads meanwhile; the error, or None."""
        failure: list[str] = []

        async def append() -> None:
            started = time.perf_counter()
            try:
                await self._log.append(records)
            except self._storage_errors as error:
                failure.append(str(error))
            except Exception as error:  # e.g. a record that cannot be encoded: refuse, go on
                log.exception("appending to the log failed", records=len(records))
                failure.append(f"internal error: {error!r}")
            else:
                self._observer.appended(time.perf_counter() - started, len(records))

        await self._while_serving(append)
        return failure[0] if failure else None

    def _report_committed(self) -> None:
        """Log and count what the batch did, now that it is on disk."""
        observer = self._observer
        try:  # metrics must not stop the actor: what they failed to count is done
            if self._lateness:
                observer.triggered(self._lateness)
            if self._sets:
                observer.jobs_set(self._sets)
        except Exception:
            log.exception("observer failed")
        for reason, job_id, outcome in self._notes:
            self._failures.note(reason, job_id, outcome)
            try:
                observer.failed_without_run(reason, job_id)
            except Exception:
                log.exception("observer failed")

    # -- storage health -------------------------------------------------------------------

    def _storage_fails(self, writers: set[str], error: str) -> None:
        """One failed group commit: counted per kind; logged once per kind per episode."""
        observer = self._observer
        observer.append_failed()
        if self.writable:
            self.writable = False
            self._episode = Counter()
            self._episode_started = self._episode_summarised = trio.current_time()
            observer.writable(False, error)
        else:
            self._probe_delay = min(self._probe_delay * 2, PROBE_MAX_S)
        self.storage_error = error
        for what in sorted(writers):
            observer.write_failed(what)
            if what not in self._episode:
                log.error(
                    "storage write failed",
                    what=what,
                    error=error,
                    note="later failures are counted until a write succeeds",
                )
            self._episode[what] += 1

    def _storage_works(self) -> None:
        if self.writable:
            return
        self.writable = True
        self._probe_delay = PROBE_INITIAL_S
        log.warning(
            "storage writes work again",
            failed_writes=dict(self._episode),
            seconds=round(trio.current_time() - self._episode_started, 1),
            last_error=self.storage_error,
        )
        self.storage_error = ""
        self._observer.writable(True, "")

    def _rollback(self) -> None:
        state = self.state
        for kind, key, old in reversed(self._undo):
            if kind == "job":
                if old is None:
                    state.delete_job(key)
                else:
                    state.put_job(old)
            elif old is None:
                state.delete_rule(key)
            else:
                state.put_rule(old)
        self._events.clear()
        self._notes.clear()
        self._lateness.clear()
        self._sets = 0
        # Subscriptions answered with an error (after the first change) are dropped;
        # the ones answered before it stand. So do the snapshot pages.
        failed = self._new_subscribers[self._subscribers_before_write :]
        self._subscribers = [s for s in self._subscribers if s not in failed]
        for sub in self._subscribers:
            for _, cursor, wrote in sub.moved:
                if wrote:  # the first page answered with an error
                    sub.cursor = cursor
                    break
            sub.moved = []

    def _publish(self) -> None:
        if not self._subscribers:
            return
        events = self._events
        kept = []
        for sub in self._subscribers:
            if sub.cursor is None and not sub.moved:
                batch = [e for e in events[sub.start :] if e.job.id.startswith(sub.prefix)]
            else:
                batch = _given(sub, events)
                sub.moved = []
            sub.start = 0
            try:
                keep = sub.sink(batch) if batch else True
            except Exception:
                log.exception("watch sink failed")
                keep = False
            if keep:
                kept.append(sub)
        self._subscribers = kept

    # -- state changes (each records its undo, its log record and its event) -----------

    def _put_job(self, job: Job, record: Record | None = None) -> None:
        old = self.state.put_job(job)
        self._undo.append(("job", job.id, old))
        self._batch_jobs.add(job.id)
        self._records.append(record if record is not None else JobPut(job))
        if self._subscribers:
            self._events.append(JobEvent(job, at=self._now))

    def _change_status(self, job: Job, status: Status, outcome: str, attempts: int) -> Job:
        now = self._now
        changed = new_job(
            job.id, job.execute_at, status, job.payload, attempts, outcome, now, job.recurrence
        )
        self._put_job(changed, JobStatus(job.id, status, attempts, outcome, now))
        return changed

    def _delete_job(self, job: Job) -> None:
        self.state.delete_job(job.id)
        self._undo.append(("job", job.id, job))
        self._batch_jobs.add(job.id)
        self._records.append(JobDelete(job.id))
        if self._subscribers:
            self._events.append(JobEvent(job, deleted=True, at=self._now))

    def _put_rule(self, rule: Rule) -> None:
        self._undo.append(("rule", rule.id, self.state.put_rule(rule)))
        self._batch_rules.add(rule.id)
        self._records.append(RulePut(rule))

    # -- commands ---------------------------------------------------------------

    def _apply(self, command: Command) -> Result:
        handler = self._handlers[type(command)]
        return handler(self, command)

    def _set_job(self, command: SetJob) -> Job:
        validate_job(command.id, command.payload, self._max_payload, command.execute_at)
        old = self.state.jobs.get(command.id)
        if old is not None and old.status is TRIGGERED:
            raise CommandError(
                ErrorCode.FAILED_PRECONDITION, f"job {command.id} is triggered: a run is in flight"
            )
        # A re-set keeps the id string the jobs dict holds as its key: one copy, not two.
        job_id = command.id if old is None else old.id
        job = new_job(job_id, command.execute_at, PLANNED, command.payload, 0, "", self._now)
        self._put_job(job)
        self._sets += 1
        return job

    def _get_job(self, command: GetJob) -> Job:
        job = self.state.jobs.get(command.id)
        if job is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no job {command.id}")
        return job

    def _delete_job_command(self, command: DeleteJob) -> None:
        job = self._get_job(GetJob(command.id))
        if job.status is Status.TRIGGERED:
            raise CommandError(
                ErrorCode.FAILED_PRECONDITION, f"job {command.id} is triggered: a run is in flight"
            )
        self._delete_job(job)

    def _list_jobs(self, command: ListJobs) -> JobPage:
        check_prefix(command.prefix)
        if command.limit <= 0:
            raise CommandError(ErrorCode.INVALID_ARGUMENT, "page size must be positive")
        sub = None
        if command.watch is not None:  # the next page of a subscription's snapshot
            sub = self._subscriber(command.watch)
            if sub is None:
                raise CommandError(ErrorCode.UNAVAILABLE, "the watch has ended")
            where = (command.prefix, command.status, command.after)
            if sub.cursor is None or where != (sub.prefix, None, sub.cursor):
                raise CommandError(
                    ErrorCode.INVALID_ARGUMENT, "not the next page of the watch's snapshot"
                )
        jobs, next_after = self.state.list_jobs(
            command.prefix, command.status, command.after, command.limit
        )
        if sub is not None:
            if not self._immediate:  # (read now: none of the batch's events is its prefix's)
                sub.moved.append((len(self._events), sub.cursor, bool(self._records)))
            sub.cursor = next_after or None
        return JobPage(jobs, next_after)

    def _subscriber(self, sink: EventSink) -> _Subscriber | None:
        # == and not `is`: a sink is often a bound method, a new object at each access
        return next((sub for sub in self._subscribers if sub.sink == sink), None)

    def _set_rule(self, command: SetRule) -> Rule:
        rule = self._validate_rule.with_default_policy(command.rule)
        self._validate_rule(rule)
        self._put_rule(rule)
        return rule

    def _get_rule(self, command: GetRule) -> Rule:
        rule = self.state.rules.get(command.id)
        if rule is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no rule {command.id}")
        return rule

    def _delete_rule(self, command: DeleteRule) -> None:
        self._get_rule(GetRule(command.id))
        self._undo.append(("rule", command.id, self.state.delete_rule(command.id)))
        self._batch_rules.add(command.id)
        self._records.append(RuleDelete(command.id))

    def _list_rules(self, command: ListRules) -> list[Rule]:
        check_prefix(command.prefix)
        return self.state.list_rules(command.prefix, command.after, command.limit)

    def _match_rule(self, command: MatchRule) -> Rule | None:
        return self.state.match_rule(command.job_id)

    def _get_info(self, command: GetInfo) -> ServerInfo:
        if self._immediate and self._uncommitted:  # as of the last commit, not the batch
            return ServerInfo(
                __version__, self.started_at, dict(self._committed_counts), self._committed_rules
            )
        return ServerInfo(
            __version__, self.started_at, dict(self.state.counts), len(self.state.rules)
        )

    def _subscribe(self, command: Subscribe) -> JobPage:
        # From the batch's events after this point on: while the log is busy, none
        # of the batch in flight (none of them matches the prefix, or the request
        # would have been held).
        check_prefix(command.prefix)
        sub = _Subscriber(command.prefix, command.sink, start=len(self._events))
        self._subscribers.append(sub)
        if not self._immediate:  # answered with the batch: dropped if the batch fails
            self._new_subscribers.append(sub)
        if not command.snapshot:
            return JobPage([], "")
        jobs, next_after = self.state.list_jobs(command.prefix, None, "", SNAPSHOT_PAGE)
        sub.cursor = next_after or None
        return JobPage(jobs, next_after)

    def _unsubscribe(self, command: Unsubscribe) -> None:
        # == and not `is`: a sink is often a bound method, a new object at each access
        self._subscribers = [s for s in self._subscribers if s.sink != command.sink]

    def _trigger_due(self, command: TriggerDue) -> TriggerResult:
        """Pair due jobs with rules and mark them triggered, oldest first.

        A due job whose runner kind is full waits, still planned, in that kind's
        line (State.waiting) instead of going back into the due heap, so each
        job is popped once however long the backlog: the next calls serve each
        kind's line first, then newly due jobs.
        """
        state = self.state
        capacity = dict(command.capacity)
        dispatches: list[Dispatch] = []
        until = command.now + command.ahead  # the fire-ahead window's end
        for kind, line in state.waiting.items():
            while line and capacity.get(kind, 0) > 0:
                job = state.jobs.get(line.popleft().id)
                if job is not None and waits(job) and job.execute_at <= until:
                    self._dispatch(job, command.now, capacity, dispatches)
        popped = 0
        more_due = False
        for job in state.pop_due(until):
            self._dispatch(job, command.now, capacity, dispatches)
            popped += 1
            if popped >= command.limit:
                more_due = True  # bounded, so that one call keeps the actor short
                break
        deferred = frozenset(kind for kind, line in state.waiting.items() if line)
        return TriggerResult(dispatches, deferred=deferred, more_due=more_due)

    def _dispatch(
        self, job: Job, now: int, capacity: dict[str, int], dispatches: list[Dispatch]
    ) -> None:
        """Trigger one due job, fail it, or hold it in its kind's line.

        An exception fails the job with the reason: a job popped from the due
        heap and left planned would be forgotten until the next start.
        """
        try:
            self._dispatch_one(job, now, capacity, dispatches)
        except Exception as error:
            log.exception("triggering a job failed", job=job.id)
            # The dispatch is appended last, so a job that raised was not handed out.
            current = self.state.jobs.get(job.id, job)
            self._fail(current, FailReason.ERROR, f"internal error while triggering: {error!r}")

    def _dispatch_one(
        self, job: Job, now: int, capacity: dict[str, int], dispatches: list[Dispatch]
    ) -> None:
        if job.recurrence is not None and self._planner.is_misfire(job):
            # came due while the server was down: the misfire policy decides (a run
            # now, for the latest or the first of the ones to catch up; or none)
            job = self._planner.misfire(job, now)
            self._put_job(job)
            if job.execute_at > now:
                return
        rule = self.state.match_rule(job.id)
        if rule is None:
            self._fail(job, FailReason.NO_RULE, "no rule matches this job")
            return
        kind = rule.runner.kind
        if not self._fresh(job, rule, now):
            overdue = (now - job.execute_at) / MICROS
            self._fail(job, FailReason.STALE, f"stale: overdue by {overdue:.3f}s")
        elif kind not in capacity:
            self._fail(job, FailReason.NO_RUNNER, f"no {kind} runner is available")
        elif capacity[kind] > 0:
            if job.execute_at <= now:
                # Late since the job became due: its time, or when it was set if later.
                # (A job armed ahead of its time is counted when the dispatcher releases it.)
                lateness = (now - max(job.execute_at, job.updated_at)) / MICROS
                self._lateness.append(lateness)
            log.debug("job triggered", job=job.id, rule=rule.id, execute_at=job.execute_at)
            triggered = self._change_status(job, TRIGGERED, "", job.attempts + 1)
            capacity[kind] -= 1
            dispatches.append(Dispatch(triggered, rule))  # last: nothing can fail after it
        else:
            self.state.hold(kind, job)

    def _fail(self, job: Job, reason: FailReason, outcome: str) -> None:
        """End a job `failed` without a runner's outcome: logged (aggregated) and counted.

        For a recurring job this fails the occurrence, and the schedule goes on
        (a rule may be set before the next one), unless planning it fails too.
        """
        self._notes.append((reason, job.id, outcome))  # reported once written
        if job.recurrence is not None and reason is not FailReason.ERROR:
            try:
                self._put_job(self._planner.after_run(job, self._now, False, outcome))
                return
            except Exception:
                log.exception("planning the next occurrence failed", job=job.id)
        self._change_status(job, Status.FAILED, outcome, job.attempts)

    @staticmethod
    def _fresh(job: Job, rule: Rule, now: int) -> bool:
        stale_after = rule.policy.stale_after_s
        return stale_after is None or now - job.execute_at <= stale_after * MICROS

    def _record_outcome(self, command: RecordOutcome) -> None:
        """Executed, planned again for a retry, or failed.

        Whatever goes wrong while recording the outcome or planning the retry
        (a retry time beyond 9999-12-31, a policy from an old log that gives no
        valid delay, a bug) fails the job with the reason: it is never left
        `triggered`, where it would refuse SET and UNSET and run again at every
        start.
        """
        job = self.state.jobs.get(command.job_id)
        if job is None or job.status is not Status.TRIGGERED or job.attempts != command.attempt:
            return  # the outcome of a run that no longer matters (e.g. replaced while it ran)
        try:
            self._apply_outcome(job, command)
        except Exception as error:
            log.exception("recording an outcome failed", job=job.id)
            run = "succeeded" if command.ok else f"failed: {command.message}"
            self._fail(
                self.state.jobs.get(job.id, job),
                FailReason.ERROR,
                f"attempt {job.attempts} {run}; the outcome could not be recorded: {error!r}",
            )

    def _apply_outcome(self, job: Job, command: RecordOutcome) -> None:
        if command.ok:
            self._end_run(job, True, command.message)
            return
        policy = command.policy
        if job.attempts >= policy.max_attempts:
            self._end_run(job, False, command.message)
            return
        outcome = f"attempt {job.attempts} failed: {command.message}"
        try:
            retry_at = check_time(
                self._now + policy.retry_delay_us(job.attempts), "the retry's time"
            )
        except ValueError as error:
            no_retry = f"{outcome}; no retry: {error}"
            if job.recurrence is not None:
                self._end_run(job, False, no_retry)
            else:
                self._fail(job, FailReason.ERROR, no_retry)
            return
        self._put_job(
            new_job(
                job.id,
                retry_at,
                PLANNED,
                job.payload,
                job.attempts,
                outcome,
                self._now,
                job.recurrence,
            )
        )

    def _end_run(self, job: Job, ok: bool, outcome: str) -> None:
        """A run ended for good: a one-shot job is executed or failed; a recurring
        one is planned at its next occurrence in the same record (or finished)."""
        if job.recurrence is None:
            status = Status.EXECUTED if ok else Status.FAILED
            self._change_status(job, status, outcome, job.attempts)
        else:
            self._put_job(self._planner.after_run(job, self._now, ok, outcome))

    # -- recurring jobs -----------------------------------------------------------------

    def _schedule_job(self, command: ScheduleJob) -> Job:
        validate_job(command.id, command.payload, self._max_payload)
        old = self.state.jobs.get(command.id)
        if old is not None and old.status is TRIGGERED:
            raise CommandError(
                ErrorCode.FAILED_PRECONDITION, f"job {command.id} is triggered: a run is in flight"
            )
        try:
            job_id = command.id if old is None else old.id  # one copy of the id (_set_job)
            job = self._planner.first(job_id, command.schedule, command.payload, self._now)
        except (ScheduleError, ValueError, OverflowError) as error:
            # ValueError/OverflowError: a value no check foresaw; still the client's input
            raise CommandError(ErrorCode.INVALID_ARGUMENT, str(error)) from None
        self._put_job(job)
        self._sets += 1
        return job

    def _recurring(self, job_id: str, action: str) -> Job:
        """The recurring job `job_id` whose schedule has not ended, for `action`."""
        job = self._get_job(GetJob(job_id))
        if job.recurrence is None:
            raise CommandError(
                ErrorCode.FAILED_PRECONDITION, f"job {job_id} is not recurring: cannot {action} it"
            )
        if job.status.finished:
            raise CommandError(
                ErrorCode.FAILED_PRECONDITION,
                f"job {job_id} has ended ({job.status.value}): its schedule has no more runs",
            )
        return job

    def _pause_job(self, command: PauseJob) -> Job:
        job = self._recurring(command.id, "pause")
        assert job.recurrence is not None
        if job.recurrence.paused:
            return job
        paused = self._planner.pause(job)
        self._put_job(paused)
        return paused

    def _resume_job(self, command: ResumeJob) -> Job:
        job = self._recurring(command.id, "resume")
        assert job.recurrence is not None
        if not job.recurrence.paused:
            return job
        resumed = self._planner.resume(job, self._now)
        self._put_job(resumed)
        return resumed

    def _run_job_now(self, command: RunJobNow) -> Job:
        job = self._recurring(command.id, "run")
        if job.status is TRIGGERED or job.attempts > 0:
            state = "a run is in flight" if job.status is TRIGGERED else "a retry is planned"
            raise CommandError(ErrorCode.FAILED_PRECONDITION, f"job {command.id}: {state}")
        planned = self._planner.run_now(job, self._now)
        if planned is not job:
            self._put_job(planned)
        return planned

    def _preview_job(self, command: PreviewJob) -> list[int]:
        if not 1 <= command.count <= MAX_PREVIEW:
            raise CommandError(
                ErrorCode.INVALID_ARGUMENT, f"count must be 1 to {MAX_PREVIEW}, not {command.count}"
            )
        job = self._get_job(GetJob(command.id))
        if job.recurrence is None:
            raise CommandError(ErrorCode.FAILED_PRECONDITION, f"job {command.id} is not recurring")
        return self._planner.upcoming(job, command.count)

    def _expire_finished(self, command: ExpireFinished) -> int:
        expired = self.state.expired_finished(command.before, command.limit)
        for job_id in expired:
            self._delete_job(self.state.jobs[job_id])
        return len(expired)

    def _jobs_changed(self, command: JobsChanged) -> None:
        """Events for this instance's watchers of jobs another instance changed
        (the store loaded them: a job missing now was deleted)."""
        if not self._subscribers:
            return
        for job_id in dict.fromkeys(command.ids):
            job = self.state.jobs.get(job_id)
            if job is None:
                stub = new_job(job_id, 0, PLANNED, b"", 0, "", self._now)
                self._events.append(JobEvent(stub, deleted=True, at=self._now))
            else:
                self._events.append(JobEvent(job, at=self._now))

    @property
    def watching(self) -> bool:
        """Some watcher is subscribed to job changes."""
        return bool(self._subscribers)

    _handlers: dict[type, Callable[[CommandActor, Any], Result]] = {
        SetJob: _set_job,
        GetJob: _get_job,
        DeleteJob: _delete_job_command,
        ListJobs: _list_jobs,
        ScheduleJob: _schedule_job,
        PauseJob: _pause_job,
        ResumeJob: _resume_job,
        RunJobNow: _run_job_now,
        PreviewJob: _preview_job,
        SetRule: _set_rule,
        GetRule: _get_rule,
        DeleteRule: _delete_rule,
        ListRules: _list_rules,
        MatchRule: _match_rule,
        GetInfo: _get_info,
        Subscribe: _subscribe,
        Unsubscribe: _unsubscribe,
        TriggerDue: _trigger_due,
        RecordOutcome: _record_outcome,
        ExpireFinished: _expire_finished,
        JobsChanged: _jobs_changed,
    }


def _given(sub: _Subscriber, events: list[JobEvent]) -> list[JobEvent]:
    """The batch's events for `sub` while its snapshot is given a page at a time: those
    of the ids its pages had given when the event happened. The others are left out,
    since the page that gives their job is read after the event and shows it."""
    moved, cursor, prefix = sub.moved, sub.cursor, sub.prefix
    given = []
    m = 0
    for i in range(sub.start, len(events)):
        while m < len(moved) and moved[m][0] <= i:  # moves before this event
            m += 1
        upto = moved[m][1] if m < len(moved) else cursor  # the cursor when it happened
        event = events[i]
        job_id = event.job.id
        if job_id.startswith(prefix) and (upto is None or job_id <= upto):
            given.append(event)
    return given


def _any_prefixed(ids: set[str] | tuple[()], prefix: str) -> bool:
    if not prefix:
        return bool(ids)
    return any(i.startswith(prefix) for i in ids)


class ActorClient:
    """A sender's handle on the actor: awaitable calls for tasks inside Trio."""

    def __init__(self, send: trio.MemorySendChannel[Request]) -> None:
        self._send = send

    def clone(self) -> ActorClient:
        return ActorClient(self._send.clone())

    @property
    def channel(self) -> trio.MemorySendChannel[Request]:
        """The raw channel, for the gRPC bridge's send_nowait from another thread's callbacks."""
        return self._send

    async def submit(self, request: Request) -> None:
        await self._send.send(request)

    def submit_nowait(self, request: Request) -> None:
        self._send.send_nowait(request)

    async def call_many(self, commands: Sequence[Command]) -> list[Result]:
        done = trio.Event()
        box: list[list[Result]] = []

        def reply(results: list[Result]) -> None:
            box.append(results)
            done.set()

        await self._send.send(Request(commands, reply))
        await done.wait()
        return box[0]

    async def call(self, command: Command) -> Any:
        """Run one command; its CommandError is raised."""
        (result,) = await self.call_many([command])
        if isinstance(result, CommandError):
            try:
                raise result
            finally:
                del result  # else its traceback and this frame would hold each other
        return result

    async def aclose(self) -> None:
        await self._send.aclose()


def submit_nowait(channel: trio.MemorySendChannel[Request], request: Request) -> None:
    """Put `request` on the actor's channel now, for a front end that answers at
    once rather than wait (gRPC, the HTTP API): CommandError RESOURCE_EXHAUSTED
    when the channel is full, UNAVAILABLE once it is closed (shutdown)."""
    try:
        channel.send_nowait(request)
    except trio.WouldBlock:
        raise CommandError(
            ErrorCode.RESOURCE_EXHAUSTED, "server busy: too many requests, retry later"
        ) from None
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise CommandError(ErrorCode.UNAVAILABLE, "server is shutting down") from None
