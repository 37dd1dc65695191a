"""The due index: which planned job comes due next, at ~9 bytes a job (pure).

A heap of (execute_at, id) tuples costs a 64-byte tuple and an 8-byte slot per
planned job: a fifth of what a job costs in memory. Here only the jobs due
before the *horizon* have a heap entry. Later ones are kept as bare ids (an
8-byte list slot) in buckets of 2**BUCKET_SHIFT µs (~4.8 hours); when the heap
runs dry, the earliest bucket is turned into heap entries and the horizon moves
to its end. So the heap's top is always the earliest entry of all: every
bucketed time lies at or after the horizon, every heap entry before it.

Entries may be stale (the job was re-set to another time, deleted, or is no
longer planned): the caller checks each entry it takes, as with a plain heap
(lazy deletion), and buckets drop theirs when turned into heap entries, by
asking `when(id)` for the job's current due time.

Costs: push O(1) for a later bucket, O(log h) into the heap (h: entries before
the horizon); first/pop O(log h), plus, once per bucket, O(bucket) to turn it
into heap entries (a bucket of a million jobs due within the same 4.8 hours:
~0.5 s once, when the jobs before it are all gone).
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from itertools import repeat
from operator import rshift

BUCKET_SHIFT = 34  # 2**34 µs: ~4.8 hours a bucket
_NO_HORIZON = -(1 << 80)  # before any time: nothing is in the heap yet
# fill() makes a list for every bucket number between the first and the last when
# they are at most this far apart (~36 years of 4.8-hour buckets, 3.6 MB at most)
_DENSE_SPAN = 1 << 16
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend
_append = list.append


class DueIndex:
    """(execute_at µs, job id) entries, earliest first; see the module docstring.

    `when(job_id)` gives a job's current due time, or None when it waits for
    none (deleted, not planned, paused): used when a bucket becomes heap entries.
    """

    __slots__ = ("_when", "_heap", "_buckets", "_keys", "_horizon", "_bucketed")

    def __init__(self, when: Callable[[str], int | None]) -> None:
        self._when = when
        self._heap: list[tuple[int, str]] = []
        self._buckets: dict[int, list[str]] = {}  # bucket number -> ids, in push order
        self._keys: list[int] = []  # heap of the bucket numbers in _buckets
        self._horizon = _NO_HORIZON  # times before it go to the heap
        self._bucketed = 0  # ids in buckets, stale ones included

    def __len__(self) -> int:
        """Entries held, stale ones included (the caller rebuilds when they dominate)."""
        return len(self._heap) + self._bucketed

    def push(self, at: int, job_id: str) -> None:
        """Add an entry: `job_id` is due at `at` (µs since the epoch)."""
        if at < self._horizon:
            heapq.heappush(self._heap, (at, job_id))
            return
        key = at >> BUCKET_SHIFT
        ids = self._buckets.get(key)
        if ids is None:
            self._buckets[key] = [job_id]
            heapq.heappush(self._keys, key)
        else:
            ids.append(job_id)
        self._bucketed += 1

    def fill(self, times: list[int], job_ids: list[str]) -> None:
        """push(at, job_id) for each pair of `times` and `job_ids` (of equal length), in
        order: the start-up's bulk load, C-level passes instead of a call a job."""
        if self._heap or self._horizon != _NO_HORIZON:  # not fresh: some go to the heap
            for at, job_id in zip(times, job_ids, strict=True):
                self.push(at, job_id)
            return
        if not times:
            return
        low, high = min(times) >> BUCKET_SHIFT, max(times) >> BUCKET_SHIFT
        buckets: dict[int, list[str]]
        if high - low <= _DENSE_SPAN:
            # One list for each bucket number of the span, made in one go: the
            # look-ups compare a key with the dict's own keys, which then sit
            # together in memory (keys first seen in the data would lie all over
            # it, a cache miss a job).
            buckets = {key: [] for key in range(low, high + 1)}
        else:
            buckets = defaultdict(list)
        for key, ids in self._buckets.items():
            buckets.setdefault(key, []).extend(ids)
        # buckets[at >> BUCKET_SHIFT].append(job_id), all in C
        keys = map(rshift, times, repeat(BUCKET_SHIFT))
        _consume(map(_append, map(buckets.__getitem__, keys), job_ids))
        self._buckets = {key: ids for key, ids in buckets.items() if ids}
        self._keys = list(self._buckets)
        heapq.heapify(self._keys)
        self._bucketed = sum(map(len, self._buckets.values()))

    def first(self) -> tuple[int, str] | None:
        """The earliest entry (possibly stale), or None when there is none."""
        while not self._heap:
            if not self._keys:
                return None
            self._open_bucket()
        return self._heap[0]

    def pop(self) -> tuple[int, str]:
        """Remove and return the entry first() gave. Raises IndexError when empty."""
        if self.first() is None:
            raise IndexError("pop from an empty DueIndex")
        return heapq.heappop(self._heap)

    def _open_bucket(self) -> None:
        """Turn the earliest bucket into heap entries (its live ones) and move the horizon."""
        key = heapq.heappop(self._keys)
        ids = self._buckets.pop(key)
        self._bucketed -= len(ids)
        self._horizon = (key + 1) << BUCKET_SHIFT
        when = self._when
        entries = []
        for job_id in ids:
            at = when(job_id)
            # a job re-set to another bucket has an entry there (or in the heap)
            if at is not None and at >> BUCKET_SHIFT == key:
                entries.append((at, job_id))
        heapq.heapify(entries)
        self._heap = entries
