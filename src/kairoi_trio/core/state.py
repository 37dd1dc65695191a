"""The in-memory index of jobs and rules (pure: no I/O, no Trio).

Costs, with n planned jobs and r rules:
- set / get / delete a job: O(log n) (dict, a heap push, a sorted-id insert
  only for a new id);
- "what is due next" and popping due jobs: O(log n) each, from the due index
  (core/due.py: a heap of the jobs due within the next ~4.8 hours, bare ids in
  buckets for the later ones, ~9 bytes a job instead of a 72-byte heap entry).
  It uses lazy deletion: a re-SET pushes a new entry and leaves the old one,
  which is recognised as stale when it surfaces (its job is gone, not planned,
  or has another time). It is rebuilt when stale entries outnumber live ones,
  a slice after each commit (_rebuild_some), as its buckets are opened;
- pairing a job with a rule: one dict look-up per distinct pattern length, not
  a scan of all rules;
- listing by id prefix, with or without a status filter: O(log n + page).
  The ordered id index is one sorted list of ids per status: a filtered page
  reads its status's list only, an unfiltered one merges the four (a merge of
  four sorted streams: O(log n) to start, then O(page)). A new id costs one
  sorted insert, as a single index would; a status change moves the id from
  one list to another (two O(log n) operations), which a SET of an existing
  planned job (the common re-SET) does not do.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import compress, islice, repeat
from operator import attrgetter, is_
from typing import Any

from sortedcontainers import SortedList

from kairoi_trio.core.checkpoint import Checkpoint, ids_after
from kairoi_trio.core.due import DueIndex
from kairoi_trio.core.release import RELEASE_SLICE, drop_some
from kairoi_trio.model import MAX_TIME_US, MIN_TIME_US, Job, Rule, Status, new_job

# The due index opens a bucket at most this many ids an actor step (a Python step
# each, ~1-1.5 µs at a million jobs: ~5 ms); a million jobs due within the same 4.8
# hours took the actor 0.7-0.9 s in one step before.
OPEN_SLICE = 4096
# While the due index is rebuilt, each push adds this many planned jobs to the next
# slice (State._rebuild_some): the rebuild outruns the stale entries it is for.
REBUILD_PER_PUSH = 4
# next_due while the due index is still opening a bucket: no job's time is earlier
OPENING = MIN_TIME_US
_PLANNED = Status.PLANNED
_TRIGGERED = Status.TRIGGERED
_FINISHED = frozenset((Status.EXECUTED, Status.FAILED))
_status_of = attrgetter("status")
_execute_at_of = attrgetter("execute_at")
_recurrence_of = attrgetter("recurrence")


class _Rebuild:
    """A due index being built (State._rebuild_some): the planned jobs up to `after`
    (by id; None: none yet) are in it, and those of them set since; `owed`: the jobs
    the next slice adds on top of OPEN_SLICE, for the pushes since the last one."""

    __slots__ = ("index", "after", "owed")

    def __init__(self, index: DueIndex) -> None:
        self.index = index
        self.after: str | None = None
        self.owed = 0


def waits(job: Job) -> bool:
    """Planned and not paused (a run-now of a paused job runs): in the due heap."""
    if job.status is not _PLANNED:
        return False
    recurrence = job.recurrence
    return recurrence is None or not recurrence.paused or recurrence.manual


class State:
    def __init__(
        self,
        jobs: Iterable[Job] | dict[str, Job] = (),
        rules: Iterable[Rule] = (),
        *,
        replayed: bool = False,
    ) -> None:
        """Index `jobs` and `rules`. A dict of jobs by id (the replayed log) is
        adopted, not copied: a second dict of n entries would be most of the
        peak RSS at start-up above the state itself (~34 bytes a job).

        `replayed`: the jobs come from a log; recover_replayed is applied first
        (its counts in `recovered`), at no cost when nothing needs it.
        """
        self.jobs: dict[str, Job] = (
            jobs if isinstance(jobs, dict) else {job.id: job for job in jobs}
        )
        self.recovered = (0, 0)
        self.rules: dict[str, Rule] = {}
        self.checkpoint: Checkpoint | None = None  # a compaction's copy being taken
        # A few C-level passes over the jobs (n is 10 million at start-up), no
        # Python code a job: the status and time of each, then each status's ids.
        statuses = list(map(_status_of, self.jobs.values()))
        times = list(map(_execute_at_of, self.jobs.values()))
        bounds = (min(times), max(times)) if replayed and times else None
        if replayed and (
            _TRIGGERED in statuses
            or (bounds and not (MIN_TIME_US <= bounds[0] and bounds[1] <= MAX_TIME_US))
        ):
            self.recovered = recover_replayed(self.jobs)
            statuses = list(map(_status_of, self.jobs.values()))
            times = list(map(_execute_at_of, self.jobs.values()))
            bounds = None
        counts = dict.fromkeys(Status, 0)
        left = len(statuses)
        for status in Status:  # (most often all planned: one pass, not four)
            if left:
                counts[status] = count = statuses.count(status)
                left -= count
        ids = list(self.jobs)
        by_status = {status: _where(ids, statuses, status, counts[status]) for status in Status}
        del ids
        # the due index: every planned job (but the paused recurring ones)
        planned_ids = by_status[_PLANNED]
        planned_count = counts[_PLANNED]
        if planned_count != len(statuses):
            times = _where(times, statuses, _PLANNED, planned_count)
            bounds = None
        planned = _where(list(self.jobs.values()), statuses, _PLANNED, planned_count)
        if set(map(_recurrence_of, planned)) - {None}:  # some may be paused
            waiting = list(map(waits, planned))
            times = list(compress(times, waiting))
            planned_ids = list(compress(planned_ids, waiting))
            bounds = None
        del planned
        self._due = due = DueIndex(self._due_at)
        due.fill(times, planned_ids, bounds)
        del times, planned_ids
        self._rebuild: _Rebuild | None = None  # a new due index being built (_rebuild_some)
        self._retired: list[list[Any]] = []  # what the rebuilt index replaced, let go of
        finished: list[tuple[int, str]] = []
        if counts[Status.EXECUTED] or counts[Status.FAILED]:
            finished = [
                (job.updated_at, job.id)
                for job in compress(self.jobs.values(), map(_FINISHED.__contains__, statuses))
            ]
        del statuses
        self.counts: dict[Status, int] = {status: len(ids) for status, ids in by_status.items()}
        # the ordered id index, one sorted list per status (see the module's docstring)
        self._ids: dict[Status, SortedList] = {status: SortedList() for status in Status}
        for status, ids in by_status.items():
            self._ids[status].update(ids)
        del by_status
        finished.sort()
        # a heap, not a queue: a rollback can put back a job that finished earlier
        self._finished: list[tuple[int, str]] = finished
        # due jobs popped from the heap whose runner kind was full, per kind
        self.waiting: dict[str, deque[Job]] = {}
        # pattern -> ids of the rules with that pattern, sorted (ties: smallest id wins)
        self._patterns: dict[str, list[str]] = {}
        self._pattern_lengths: list[int] = []  # distinct lengths, longest first
        self._rule_ids = SortedList()  # for list_rules: O(log r + page)
        for rule in rules:
            self.put_rule(rule)

    # -- jobs -------------------------------------------------------------------

    def put_job(self, job: Job) -> Job | None:
        """Insert or replace a job; returns the job it replaced."""
        job_id, status = job.id, job.status
        old = self.jobs.get(job_id)
        if self.checkpoint is not None:
            self.checkpoint.save(job_id, old)
        self.jobs[job_id] = job
        counts = self.counts
        if old is None:
            self._ids[status].add(job_id)
        else:
            old_status = old.status
            counts[old_status] -= 1
            if old_status is not status:
                self._ids[old_status].remove(job_id)
                self._ids[status].add(job_id)
        counts[status] += 1
        # (the recurrence test first: waits() is a call, and SET is the hot path)
        if status is _PLANNED and (job.recurrence is None or waits(job)):
            if old is None or old.execute_at != job.execute_at or not waits(old):
                self._due.push(job.execute_at, job_id)
                rebuild = self._rebuild
                if rebuild is not None:
                    rebuild.owed += REBUILD_PER_PUSH
                    if rebuild.after is not None and job_id <= rebuild.after:  # passed already
                        rebuild.index.push(job.execute_at, job_id)
                elif len(self._due) > 2 * counts[_PLANNED] + 1024:
                    self._rebuild = _Rebuild(DueIndex(self._due_at))
        elif status in _FINISHED and (old is None or old.status not in _FINISHED):
            heapq.heappush(self._finished, (job.updated_at, job_id))
        return old

    def begin_checkpoint(self) -> Checkpoint:
        """A copy of the jobs as they are now, in the order a snapshot stores them
        (core/checkpoint.py): taken by its copy_some calls, while put_job and
        delete_job save what they change into it, until end_checkpoint."""
        self.checkpoint = Checkpoint(self.jobs, self._ids)
        return self.checkpoint

    def end_checkpoint(self) -> None:
        self.checkpoint = None

    def delete_job(self, job_id: str) -> Job | None:
        if self.checkpoint is not None:
            self.checkpoint.save(job_id, self.jobs.get(job_id))
        old = self.jobs.pop(job_id, None)
        if old is not None:
            self._ids[old.status].remove(job_id)
            self.counts[old.status] -= 1
        return old

    def next_due(self) -> int | None:
        """The earliest execute_at among planned jobs (paused ones aside), or None.

        While the due index opens a large bucket (core/due.py), OPEN_SLICE ids a call,
        the earliest is not known yet: the answer is then OPENING (the earliest time
        a job can have), so that the dispatcher asks again at once. Its call
        (pop_due) and the commit after it open the next slices, and requests from
        the clients are served between them."""
        if self._rebuild is not None:
            self._rebuild_some(OPEN_SLICE + self._rebuild.owed)
        if self._retired:  # (a call after each commit: memory is let go as it comes)
            drop_some(self._retired, RELEASE_SLICE)
        due = self._due
        budget = due.prepare(OPEN_SLICE)
        while budget is not None:
            entry = due.first()
            if entry is None:
                return None
            at, job_id = entry
            if self._is_live(at, job_id):
                return at
            due.pop()
            budget = due.prepare(budget)
        return OPENING

    def pop_due(self, now: int) -> Iterator[Job]:
        """Yield planned jobs with execute_at <= now, earliest first, removing them
        from the due index. The caller must change each yielded job's status (or
        `hold` it) before asking again. Stops early, once it has opened OPEN_SLICE
        ids of a large bucket (see next_due)."""
        due = self._due
        budget = due.prepare(OPEN_SLICE)
        while budget is not None:
            entry = due.first()
            if entry is None or entry[0] > now:
                return
            at, job_id = due.pop()
            if self._is_live(at, job_id):
                yield self.jobs[job_id]
            budget = due.prepare(budget)

    def hold(self, kind: str, job: Job) -> None:
        """Keep a due job popped by pop_due in its runner kind's line (FIFO) until
        that kind has room. It stays planned; whoever takes it from the line
        checks that it still is (it may have been re-set or deleted meanwhile,
        which also gave it a new heap entry when needed)."""
        self.waiting.setdefault(kind, deque()).append(job)

    def _is_live(self, at: int, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.execute_at == at and waits(job)

    def _due_at(self, job_id: str) -> int | None:
        """The job's execute_at if it waits in the due index, else None (for DueIndex)."""
        job = self.jobs.get(job_id)
        return job.execute_at if job is not None and waits(job) else None

    def _rebuild_some(self, budget: int) -> None:
        """Drop the due index's stale entries once they outnumber the live ones (a job
        re-set to another time leaves its old entry): put_job starts a new index,
        and each call adds `budget` planned jobs to it, in id order, from the planned
        id index. Meanwhile the old index answers, and a job set whose id was passed
        already is pushed into both. Once every planned job is in, the new index
        takes the old one's place. In slices: in one step it took the actor ~0.5 µs
        a job, 1.5 s at 3 million. next_due (after each commit) asks for OPEN_SLICE
        jobs and REBUILD_PER_PUSH for each push since, so that a rebuild ends within
        a fraction of the planned jobs' number of pushes, however fast they come."""
        rebuild = self._rebuild
        assert rebuild is not None
        rebuild.owed = 0
        ids = ids_after(self._ids[_PLANNED], rebuild.after, budget)
        jobs, push = self.jobs, rebuild.index.push
        for job_id in ids:
            job = jobs[job_id]
            if job.recurrence is None or waits(job):  # (planned: the paused ones wait not)
                push(job.execute_at, job_id)
        if len(ids) < budget:
            self._retired += self._due.lists()  # let go of a slice at a time (next_due)
            self._due, self._rebuild = rebuild.index, None
        else:
            rebuild.after = ids[-1]

    def expired_finished(self, before: int, limit: int) -> list[str]:
        """Ids of up to `limit` executed/failed jobs last changed before `before`."""
        expired: dict[
            str, None
        ] = {}  # ordered, and an id restored by a rollback can be queued twice
        finished = self._finished
        while finished and finished[0][0] < before and len(expired) < limit:
            at, job_id = heapq.heappop(finished)
            job = self.jobs.get(job_id)
            if job is not None and job.status.finished and job.updated_at == at:
                expired[job_id] = None
        return list(expired)

    def list_jobs(
        self, prefix: str, status: Status | None, after: str, limit: int
    ) -> tuple[list[Job], str]:
        """A page of at most `limit` jobs whose id starts with `prefix` and is
        greater than `after` (with `status` only, unless None), in id order. The
        second value is the id to continue after, or "" when no further job
        matches. O(log n + limit): one more matching id is looked at to tell.
        A limit below 1 gives an empty page (the actor refuses it before)."""
        if limit < 1:
            return [], ""
        ids = islice(self._ids_from(prefix, after, status), limit + 1)
        jobs = self.jobs
        page = [jobs[job_id] for job_id in ids]
        if len(page) > limit:
            del page[limit:]
            return page, page[-1].id
        return page, ""

    def _ids_from(self, prefix: str, after: str, status: Status | None) -> Iterator[str]:
        """Ids starting with `prefix`, greater than `after`, of `status` (any when
        None), in order."""
        start = max(prefix, after)
        inclusive = (after == "" or start != after, True)
        if status is not None:
            ids: Iterator[str] = self._ids[status].irange(minimum=start, inclusive=inclusive)
        else:
            ids = heapq.merge(
                *(
                    index.irange(minimum=start, inclusive=inclusive)
                    for index in self._ids.values()
                    if index
                )
            )
        for job_id in ids:
            if not job_id.startswith(prefix):
                return
            yield job_id

    # -- rules ------------------------------------------------------------------

    def put_rule(self, rule: Rule) -> Rule | None:
        old = self.delete_rule(rule.id)
        self.rules[rule.id] = rule
        self._rule_ids.add(rule.id)
        ids = self._patterns.setdefault(rule.pattern, [])
        if not ids:
            self._pattern_lengths = sorted(
                {*self._pattern_lengths, len(rule.pattern)}, reverse=True
            )
        ids.append(rule.id)
        ids.sort()
        return old

    def delete_rule(self, rule_id: str) -> Rule | None:
        old = self.rules.pop(rule_id, None)
        if old is not None:
            self._rule_ids.remove(rule_id)
            ids = self._patterns[old.pattern]
            ids.remove(rule_id)
            if not ids:
                del self._patterns[old.pattern]
                length = len(old.pattern)
                if not any(len(p) == length for p in self._patterns):
                    self._pattern_lengths.remove(length)
        return old

    def match_rule(self, job_id: str) -> Rule | None:
        """The rule whose pattern is the longest prefix of job_id (smallest rule id on ties)."""
        patterns = self._patterns
        size = len(job_id)
        for length in self._pattern_lengths:
            if length <= size:
                ids = patterns.get(job_id[:length])
                if ids:
                    return self.rules[ids[0]]
        return None

    def list_rules(self, prefix: str, after: str, limit: int) -> list[Rule]:
        """Up to `limit` rules whose id starts with `prefix` and is greater than
        `after`, in id order: O(log r + limit)."""
        start = max(prefix, after)
        ids = self._rule_ids.irange(minimum=start, inclusive=(after == "" or start != after, True))
        page: list[Rule] = []
        for rule_id in ids:
            if len(page) >= limit or not rule_id.startswith(prefix):
                break
            page.append(self.rules[rule_id])
        return page


def _where(items: list, statuses: list[Status], status: Status, count: int) -> list:
    """The items whose status (same position in `statuses`) is `status`, of which
    there are `count`."""
    if count == len(statuses):
        return items
    if not count:
        return []
    return list(compress(items, map(is_, statuses, repeat(status))))


def recover_replayed(jobs: dict[str, Job]) -> tuple[int, int]:
    """Make the jobs of a replayed log servable, in place.

    Returns (retriggered, out_of_range):
    - `triggered` jobs are planned again (at-least-once: their run may or may
      not have happened);
    - a job whose execute_at lies outside the supported range (a retry that a
      release without policy bounds planned beyond 9999-12-31) could be neither
      run nor shown: it is failed, its time brought to the nearest edge of the
      range, with the reason as its outcome. Its updated_at is kept, so that it
      expires with the retention as it would have.
    """
    retriggered = out_of_range = 0
    for job_id, job in jobs.items():
        at = job.execute_at
        if not MIN_TIME_US <= at <= MAX_TIME_US:
            edge = MAX_TIME_US if at > MAX_TIME_US else MIN_TIME_US
            outcome = (
                f"failed at start-up: its time ({at} us since 1970) is outside the supported"
                " range 0001-01-01 to 9999-12-31"
            )
            jobs[job_id] = new_job(
                job_id,
                edge,
                Status.FAILED,
                job.payload,
                job.attempts,
                outcome,
                job.updated_at,
                job.recurrence,
            )
            out_of_range += 1
        elif job.status is Status.TRIGGERED:
            jobs[job_id] = new_job(
                job_id,
                at,
                Status.PLANNED,
                job.payload,
                job.attempts,
                job.last_outcome,
                job.updated_at,
                job.recurrence,
            )
            retriggered += 1
    return retriggered, out_of_range
