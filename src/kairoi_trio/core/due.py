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
the upper 32 bits of each one's time (4 bytes, big-endian), made by C-level
passes (~0.07 µs a job). Cold ids are sorted into buckets a *window* of 64
buckets (~12.7 days) at a time, when the index reaches it: one bytes.find scan
for the 3 bytes the window's numbers share (~0.1 s for 10 million), then a
Python step per id of the window. Between windows without any job (a gap), one
C-level pass finds the next. Dense loads (more than COLD_MAX_PER_WINDOW jobs a
window on average: few buckets, so appends stay in the cache) are pushed instead:
taking a window of millions would pause the actor for seconds. Cold entries cost
12 bytes a job (list slot and number) instead of ~9, until the last window is taken.
"""

from __future__ import annotations

import heapq
import sys
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from operator import lt

BUCKET_SHIFT = 34  # 2**34 µs: ~4.8 hours a bucket
# fill() keeps entries cold only when a window (~12.7 days) holds at most this many on
# average: taking a window costs the actor ~2.5 µs an entry (0.25 s at this bound).
COLD_MAX_PER_WINDOW = 100_000
_NO_HORIZON = -(1 << 80)  # before any time: nothing is in the heap yet
# The cold index keeps time >> 32 (int32 for every supported time), 2**_SUB a bucket.
_NUMBER = "i"  # (memoryview.cast below names it too)
_NUMBER_SIZE = array(_NUMBER).itemsize
_SUB = BUCKET_SHIFT - 32  # (time >> 32) >> _SUB is the bucket number
_WINDOW_BITS = 8 - _SUB  # a window: the numbers sharing their upper 3 bytes
if _NUMBER_SIZE != 4:  # pragma: no cover
    raise ImportError("no 4-byte array type code 'i' on this platform")
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend


class _Cold:
    """Bulk-loaded entries (see the module docstring): `ids[i]` is due at a time
    whose upper 32 bits (time >> 32, int32, big-endian) are `numbers[i]`. They are
    taken a *window* of 2**_WINDOW_BITS buckets (~12.7 days) at a time, by one scan
    for the three bytes the numbers of a window share. `start` is the first bucket
    of the first window not taken yet that holds one, None when none is left."""

    __slots__ = ("ids", "numbers", "start")

    def __init__(self, times: list[int], ids: list[str], low: int) -> None:
        if len(times) != len(ids):
            raise ValueError("fill(): times and job_ids differ in length")
        self.ids = ids
        # The upper halves of the times as int64, copied out in C. Big-endian: a
        # window's three common bytes come first.
        values = array("q")
        values.fromlist(times)
        if sys.byteorder == "little":
            values.byteswap()  # each int64 big-endian: its upper int32 first
        self.numbers = memoryview(values).cast("B").cast("i")[::2].tobytes()
        self.start: int | None = low >> _WINDOW_BITS << _WINDOW_BITS

    def _positions(self, window: int, first_only: bool = False) -> list[int]:
        """Where the numbers of `window` are (byte offsets; all, or the first)."""
        prefix = (window << 8).to_bytes(_NUMBER_SIZE, "big", signed=True)[:3]
        numbers = self.numbers
        found: list[int] = []
        at = numbers.find(prefix)
        while at >= 0:
            if at % _NUMBER_SIZE:  # straddles two numbers
                at = numbers.find(prefix, at + 1)
                continue
            found.append(at)
            if first_only:
                break
            at = numbers.find(prefix, at + _NUMBER_SIZE)
        return found

    def take(self) -> dict[int, list[str]]:
        """The ids of the window at `start`, by bucket number; then finds the next."""
        assert self.start is not None
        window = self.start >> _WINDOW_BITS
        base = window << 8  # the window's first number (4 a bucket)
        numbers, ids = self.numbers, self.ids
        buckets: dict[int, list[str]] = {}
        for at in self._positions(window):
            key = (base | numbers[at + 3]) >> _SUB
            ids_of = buckets.get(key)
            if ids_of is None:
                buckets[key] = [ids[at // _NUMBER_SIZE]]
            else:
                ids_of.append(ids[at // _NUMBER_SIZE])
        following = window + 1
        if self._positions(following, True):  # the usual case: jobs every 12.7 days
            self.start = following << _WINDOW_BITS
        else:  # a gap: one C-level pass for the smallest number beyond this window
            values = array(_NUMBER, numbers)
            if sys.byteorder == "little":
                values.byteswap()
            number = min(filter(partial(lt, (following << 8) - 1), values), default=None)
            self.start = None if number is None else number >> 8 << _WINDOW_BITS
        return buckets


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
            if self._cold is None or key != self._cold.start:  # else in _keys already
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
        if not times:
            return
        first, last = bounds or (min(times), max(times))
        low = first >> BUCKET_SHIFT
        windows = ((last >> BUCKET_SHIFT) >> _WINDOW_BITS) - (low >> _WINDOW_BITS) + 1
        if (
            self._heap
            or self._horizon != _NO_HORIZON
            or self._keys  # not new
            or not -(1 << 63) <= first <= last < 1 << 63  # beyond any supported time
            # Dense: few buckets, so pushing stays in the cache, and a cold window of
            # millions would cost the actor seconds when taken (a Python step an id).
            or len(times) > COLD_MAX_PER_WINDOW * windows
        ):
            for at, job_id in zip(times, job_ids, strict=True):
                self.push(at, job_id)
            return
        self._cold = cold = _Cold(times, job_ids, low)
        assert cold.start is not None
        self._keys = [cold.start]
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
        cold = self._cold
        if cold is not None and key == cold.start:  # the first bucket of a cold window
            buckets = self._buckets
            for number, ids in cold.take().items():
                warm = buckets.get(number)
                if warm is None:
                    buckets[number] = ids
                    if number != key:
                        heapq.heappush(self._keys, number)
                else:  # pushed after fill(): its number is in _keys already (or is `key`)
                    warm[:0] = ids
            following = cold.start
            if following is None:
                self._cold = None
            elif following not in buckets:  # else in _keys already
                heapq.heappush(self._keys, following)
        ids = self._buckets.pop(key, [])
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
