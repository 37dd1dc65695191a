"""A copy of the jobs as of one instant, taken a slice at a time while they change.

Compaction writes a snapshot of the jobs as they were at a log rotation
(storage/compaction.py). The command actor used to copy them in one step, the
jobs dict and the ids in snapshot order: 0.10-0.15 s a million jobs, 1.7-2.5 s at
ten million, every client waiting (docs/benchmarks.md, "A compaction of a
million jobs"). A Checkpoint takes the same copy a slice at a
time, with the actor serving requests between slices.

The algorithm is copy-on-update (Cao, Vaz Salles, Sowell, Yue, Gehrke, Demers and
White, "Fast Checkpoint Recovery Algorithms for Frequently Consistent
Applications", SIGMOD 2011, section 3.2):

- The copy walks the state's sorted id index of each status, in the order a
  snapshot stores its jobs (grouped by status in Status order, each group in id
  order), COPY_SLICE ids a call, from a cursor (the status being walked and the
  last id taken). The order comes free with the walk.
- State calls `save(id, job)` before it changes a job (set, status change,
  delete), with the job as it is. The first change of an id since the cut
  marks it: if the walk has not reached it yet, its job is kept, and copied in
  its place (its status group, its id) when the walk gets there; the live index
  no longer says where, since the change may have moved or removed it.
- The walk skips every marked id: those it reaches in their new place (a job
  whose status changed moves to a later group, a new id appears anywhere) are
  either copied already or not part of the cut.

Each job of the cut is copied exactly once, as it was at the cut: a job not
changed since is read live, a changed one from what was kept. Memory: one
reference a job for the copy (the one-step copy also held a dict), plus one
entry an id changed during the copy. The actor makes both containers old while
they are empty (gc.collect(1)), so that young collections do not walk them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from itertools import filterfalse, islice
from operator import attrgetter

from sortedcontainers import SortedList

from kairoi_trio.core.release import drop_some
from kairoi_trio.model import Job, Status

# Ids a call of copy_some (an actor step): ~0.8 µs an id at a million jobs (a
# look-up in the jobs dict an id, in id order, not the dict's: cache misses), so
# ~2 ms a slice. A request waits for a few slices (one a scheduler round).
COPY_SLICE = 2048
_id_of = attrgetter("id")


def ids_after(index: SortedList, after: str | None, budget: int) -> list[str]:
    """Up to `budget` ids of a sorted id index that come after `after` (from its
    start when None), in order: a walk of the index resumed from a cursor, which
    stays right while ids are added and removed between calls."""
    walked: Iterable[str] = (
        iter(index) if after is None else index.irange(after, inclusive=(False, True))
    )
    return list(islice(walked, budget))


class Checkpoint:
    """The jobs as of the cut (when it was made), copied by `copy_some` calls.

    `ids` is the state's sorted id index of each status and `jobs` its jobs by
    id, both live: the state changes them after calling `save`. Once `done`,
    `jobs_in_order` holds every job of the cut, grouped by status (in Status
    order), each group in id order: what a snapshot stores."""

    __slots__ = (
        "_jobs",
        "_groups",
        "_rank",
        "_group",
        "_after",
        "_kept",
        "_pending",
        "done",
        "jobs_in_order",
    )

    def __init__(self, jobs: Mapping[str, Job], ids: Mapping[Status, SortedList]) -> None:
        self._jobs = jobs
        self._groups: Sequence[SortedList] = [ids[status] for status in Status]
        self._rank = {status: rank for rank, status in enumerate(Status)}
        self._group = 0  # the status group being walked (its rank)
        self._after: str | None = None  # the last id the walk took in it; None: none yet
        # Ids changed since the cut: their job at the cut if the walk had not
        # reached it when they changed, else None (copied already, or not in the cut).
        self._kept: dict[str, Job | None] = {}
        # Per status group: the ids of the kept jobs not yet copied (a heap)
        self._pending: list[list[str]] = [[] for _ in Status]
        self.done = False
        self.jobs_in_order: list[Job] = []

    def save(self, job_id: str, job: Job | None) -> None:
        """Called before the state changes `job_id`, with its job (None: no job)."""
        if job_id in self._kept or self.done:
            return  # changed before: `_kept` has what it was at the cut
        if job is not None and not self._passed(job.status, job_id):
            self._kept[job_id] = job
            heapq.heappush(self._pending[self._rank[job.status]], job_id)
        else:
            self._kept[job_id] = None

    def _passed(self, status: Status, job_id: str) -> bool:
        """Whether the walk has taken `job_id` from `status`'s group."""
        rank = self._rank[status]
        if rank != self._group:
            return rank < self._group
        return self._after is not None and job_id <= self._after

    def copy_some(self, budget: int) -> None:
        """Copy the next `budget` ids of the walk (fewer at the end of a status
        group), with the kept jobs that belong among them."""
        if self.done:
            return
        ids = ids_after(self._groups[self._group], self._after, budget)
        ended = len(ids) < budget
        kept = self._kept
        live = list(filterfalse(kept.__contains__, ids)) if kept else ids
        jobs = list(map(self._jobs.__getitem__, live))
        pending = self._pending[self._group]
        if pending:
            bound = None if ended else ids[-1]
            taken = []
            while pending and (bound is None or pending[0] <= bound):
                job = kept[heapq.heappop(pending)]
                assert job is not None  # (pending: kept jobs only)
                taken.append(job)
            if taken:  # two sorted runs: one linear merge
                jobs = sorted(jobs + taken, key=_id_of)
        self.jobs_in_order += jobs
        if ended:
            self._group += 1
            self._after = None
            self.done = self._group == len(self._groups)
            if self.done:
                self._kept = {}  # (save() keeps nothing more once done)
        else:
            self._after = ids[-1]

    def release_some(self, budget: int) -> bool:
        """Drop up to `budget` references of the copy, from its end; whether some
        remain. Once the snapshot is written: freeing the whole copy at once is one
        step that grows with the store."""
        return drop_some([self.jobs_in_order], budget)
