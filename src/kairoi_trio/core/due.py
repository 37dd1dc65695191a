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

The start-up's bulk load (`fill`) does not sort its ids into buckets: an append
to one of 18,000 buckets (10 years) in the order the jobs come (by id, times at
random) misses the cache and the TLB at almost every step, 0.8 µs a job, 8 s for
10 million. It keeps them *cold* instead: the list of ids as given and, beside it,
each one's bucket number (2 or 4 bytes), made by C-level passes in ~0.1 µs a job.
A cold bucket's ids are found when it is opened, by searching the numbers for its
own (bytes.find: a few ms for 10 million), in the order given. Cold entries cost
~10-12 bytes a job instead of ~9, until every cold bucket was opened.
"""

from __future__ import annotations

import heapq
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from itertools import repeat
from operator import lt, rshift

BUCKET_SHIFT = 34  # 2**34 µs: ~4.8 hours a bucket
_NO_HORIZON = -(1 << 80)  # before any time: nothing is in the heap yet
_FILL_SLICE = 1 << 20  # fill() converts the bucket numbers a slice of jobs at a time
_NUMBER = "i"  # a bucket number: int32 (every supported time's is, 2**34 µs buckets)
_NUMBER_SIZE = array(_NUMBER).itemsize
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend


class _Cold:
    """Bulk-loaded entries (see the module docstring): `ids[i]` is in bucket
    `numbers[i]` (int32, native byte order); `next` is the first bucket number not
    opened yet that holds one, None when none is left."""

    __slots__ = ("ids", "numbers", "next")

    def __init__(self, times: list[int], ids: list[str], low: int) -> None:
        self.ids = ids
        numbers = array(_NUMBER)
        for start in range(0, len(times), _FILL_SLICE):
            numbers.extend(map(rshift, times[start : start + _FILL_SLICE], repeat(BUCKET_SHIFT)))
        if len(numbers) != len(ids):
            raise ValueError("fill(): times and job_ids differ in length")
        self.numbers = numbers.tobytes()
        self.next: int | None = low

    def take(self, key: int) -> list[str]:
        """The ids of bucket `key` (the next one), in order; then finds the next."""
        found: list[str] = []
        pattern = array(_NUMBER, [key]).tobytes()
        numbers, ids = self.numbers, self.ids
        at = numbers.find(pattern)
        while at >= 0:
            if at % _NUMBER_SIZE:  # straddles two numbers
                at = numbers.find(pattern, at + 1)
                continue
            found.append(ids[at // _NUMBER_SIZE])
            at = numbers.find(pattern, at + _NUMBER_SIZE)
        self.next = self._after(key)
        return found

    def _after(self, key: int) -> int | None:
        """The first bucket number after `key` that holds an id, or None."""
        if self._holds(key + 1):  # the usual case: jobs every 4.8 hours
            return key + 1
        # a gap: one C-level pass for the smallest number above `key`
        return min(filter(partial(lt, key), array(_NUMBER, self.numbers)), default=None)

    def _holds(self, key: int) -> bool:
        pattern = array(_NUMBER, [key]).tobytes()
        at = self.numbers.find(pattern)
        while at >= 0 and at % _NUMBER_SIZE:
            at = self.numbers.find(pattern, at + 1)
        return at >= 0


class DueIndex:
    """(execute_at µs, job id) entries, earliest first; see the module docstring.

    `when(job_id)` gives a job's current due time, or None when it waits for
    none (deleted, not planned, paused): used when a bucket becomes heap entries.
    """

    __slots__ = ("_when", "_heap", "_buckets", "_keys", "_horizon", "_bucketed", "_cold")

    def __init__(self, when: Callable[[str], int | None]) -> None:
        self._when = when
        self._heap: list[tuple[int, str]] = []
        self._buckets: dict[int, list[str]] = {}  # bucket number -> ids, in push order
        self._keys: list[int] = []  # heap of the bucket numbers in _buckets
        self._horizon = _NO_HORIZON  # times before it go to the heap
        self._bucketed = 0  # ids in buckets, stale ones included (cold ones too)
        self._cold: _Cold | None = None  # fill()'s entries not yet in a bucket's list

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
            if self._cold is None or key != self._cold.next:  # else in _keys already
                heapq.heappush(self._keys, key)
        else:
            ids.append(job_id)
        self._bucketed += 1

    def fill(
        self, times: list[int], job_ids: list[str], bounds: tuple[int, int] | None = None
    ) -> None:
        """push(at, job_id) for each pair of `times` and `job_ids` (of equal length), in
        order, into a new index: the start-up's bulk load, kept cold (see the module
        docstring). `job_ids` is kept: the caller must not change it afterwards.
        `bounds`: (min(times), max(times)) when the caller has them."""
        if self._heap or self._horizon != _NO_HORIZON or self._keys:  # not new
            for at, job_id in zip(times, job_ids, strict=True):
                self.push(at, job_id)
            return
        if not times:
            return
        first, last = bounds or (min(times), max(times))
        low, high = first >> BUCKET_SHIFT, last >> BUCKET_SHIFT
        if not -(1 << 31) <= low <= high < 1 << 31:  # beyond any supported time
            for at, job_id in zip(times, job_ids, strict=True):
                self.push(at, job_id)
            return
        self._cold = _Cold(times, job_ids, low)
        self._keys = [low]
        self._bucketed = len(job_ids)

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
        ids = self._buckets.pop(key, [])
        cold = self._cold
        if cold is not None and key == cold.next:
            ids = cold.take(key) + ids  # pushed before the others
            following = cold.next
            if following is None:
                self._cold = None
            elif following not in self._buckets:  # else in _keys already
                heapq.heappush(self._keys, following)
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
