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
into heap entries: a Python step an id (its `when`), ~1-1.5 µs at a million.
A bucket can hold millions (invoices all due at 09:00), so that work is done in
slices: `prepare(budget)` opens at most `budget` ids' worth and says whether the
earliest entry is known yet. Its progress (the entries made so far, where it
stopped in the bucket's list) is kept per bucket; pushes into that bucket
meanwhile become its entries at once (appended to its list, they could outrun
the slices for ever). `first()` finishes whatever is left at once, for callers
that need the answer now.

The start-up's bulk load (`fill`) does not sort its ids into buckets: an append
to one of 18,000 buckets (10 years) in the order the jobs come (by id, times at
random) misses the cache and the TLB at almost every step, 0.8 µs a job, 8 s for
10 million. It keeps them *cold* instead: the list of ids as given and, beside it,
the upper 32 bits of each one's time (4 bytes, big-endian), made by C-level
passes (~0.07 µs a job). Cold ids are sorted into buckets a *window* of 64
buckets (~12.7 days) at a time, when the index reaches it: one bytes.find scan
for the 3 bytes the window's numbers share (~0.1 s for 10 million), then a
Python step per id of the window. Between windows without any job (a gap), one
C-level pass finds the next. A window is taken in slices too, as buckets are
opened (`prepare`). Dense loads (more than COLD_MAX_PER_WINDOW jobs a window on
average: few buckets, so appends stay in the cache) are pushed instead: a window
costs ~2.5 µs an id to take, a push ~0.8. Cold entries cost 12 bytes a job (list
slot and number) instead of ~9, until the last window is taken.
"""

from __future__ import annotations

import heapq
import sys
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from operator import lt
from typing import Any

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
    taken a *window* of 2**_WINDOW_BITS buckets (~12.7 days) at a time, by a scan
    for the three bytes the numbers of a window share, in slices (`take`). `start`
    is the first bucket of the first window not taken yet that holds one, None
    when none is left."""

    __slots__ = ("ids", "numbers", "start", "_at", "_taken")

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
        self._at = 0  # where the scan of the window at `start` goes on (a byte offset)
        self._taken: dict[int, list[str]] = {}  # what it found so far, by bucket number

    def take(self, budget: int) -> tuple[dict[int, list[str]] | None, int]:
        """Take up to `budget` ids of the window at `start`: (its ids by bucket number,
        once the whole window is taken, else None; the ids taken by this call). Once
        a window is taken, `start` moves to the next one that holds any."""
        assert self.start is not None
        window = self.start >> _WINDOW_BITS
        prefix = _prefix(window)
        base = window << 8  # the window's first number (4 a bucket)
        numbers, ids, taken = self.numbers, self.ids, self._taken
        used = 0
        at = numbers.find(prefix, self._at)
        while at >= 0:
            if at % _NUMBER_SIZE:  # straddles two numbers
                at = numbers.find(prefix, at + 1)
                continue
            if used == budget:
                self._at = at
                return None, used
            key = (base | numbers[at + 3]) >> _SUB
            ids_of = taken.get(key)
            if ids_of is None:
                taken[key] = [ids[at // _NUMBER_SIZE]]
            else:
                ids_of.append(ids[at // _NUMBER_SIZE])
            used += 1
            at = numbers.find(prefix, at + _NUMBER_SIZE)
        self._at, self._taken = 0, {}
        following = window + 1
        if self._holds(following):  # the usual case: jobs every 12.7 days
            self.start = following << _WINDOW_BITS
        else:  # a gap: one C-level pass for the smallest number beyond this window
            values = array(_NUMBER, numbers)
            if sys.byteorder == "little":
                values.byteswap()
            number = min(filter(partial(lt, (following << 8) - 1), values), default=None)
            self.start = None if number is None else number >> 8 << _WINDOW_BITS
        return taken, used

    def _holds(self, window: int) -> bool:
        """Whether any number lies in `window`."""
        prefix = _prefix(window)
        at = self.numbers.find(prefix)
        while at >= 0 and at % _NUMBER_SIZE:  # straddles two numbers
            at = self.numbers.find(prefix, at + 1)
        return at >= 0


def _prefix(window: int) -> bytes:
    """The three bytes the (big-endian int32) numbers of `window` begin with."""
    return (window << 8).to_bytes(_NUMBER_SIZE, "big", signed=True)[:3]


class DueIndex:
    """(execute_at µs, job id) entries, earliest first; see the module docstring.

    `when(job_id)` gives a job's current due time, or None when it waits for
    none (deleted, not planned, paused): used when a bucket becomes heap entries.
    """

    __slots__ = (
        "_when",
        "_heap",
        "_buckets",
        "_keys",
        "_horizon",
        "_bucketed",
        "_cold",
        "_openings",
    )

    def __init__(self, when: Callable[[str], int | None]) -> None:
        self._when = when
        self._heap: list[tuple[int, str]] = []
        self._buckets: dict[int, list[str]] = {}  # bucket number -> ids, in push order
        self._keys: list[int] = []  # heap of the bucket numbers in _buckets
        self._horizon = _NO_HORIZON  # times before it go to the heap
        self._bucketed = 0  # ids in buckets, stale ones included (cold ones too)
        self._cold: _Cold | None = None  # fill()'s entries not yet in a bucket's list
        self._openings: dict[int, _Opening] = {}  # buckets opened in part, by number

    def __len__(self) -> int:
        """Entries held, stale ones included (the caller rebuilds when they dominate)."""
        return len(self._heap) + self._bucketed

    def lists(self) -> list[list[Any]]:
        """The lists that hold the entries: for a caller that lets go of the index
        a slice at a time (core/release.py)."""
        held: list[list[Any]] = [self._heap, *self._buckets.values()]
        held += [opening.entries for opening in self._openings.values()]
        if self._cold is not None:
            held += [self._cold.ids, *self._cold._taken.values()]
        return held

    def push(self, at: int, job_id: str) -> None:
        """Add an entry: `job_id` is due at `at` (µs since the epoch)."""
        if at < self._horizon:
            heapq.heappush(self._heap, (at, job_id))
            return
        key = at >> BUCKET_SHIFT
        opening = self._openings.get(key)
        if opening is not None:  # opened in part: an entry at once. Appended to its
            # list, SETs faster than the slices would keep it from ever being open.
            heapq.heappush(opening.entries, (at, job_id))
            opening.pushed += 1
            self._bucketed += 1
            return
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
            # Dense: few buckets, so pushing stays in the cache (~0.8 µs an id), where
            # taking a cold window costs ~2.5 µs an id (in slices, but 3x the work).
            or len(times) > COLD_MAX_PER_WINDOW * windows
        ):
            for at, job_id in zip(times, job_ids, strict=True):
                self.push(at, job_id)
            return
        self._cold = cold = _Cold(times, job_ids, low)
        assert cold.start is not None
        self._keys = [cold.start]
        self._bucketed = len(job_ids)

    def prepare(self, budget: int) -> int | None:
        """Work toward knowing the earliest entry, taking and opening at most `budget`
        bucketed ids (a Python step each): the budget left once first() is O(log h)
        (the heap holds the earliest entry, or the index is empty), None when it ran
        out before (the earliest bucket is opened in part; call again)."""
        while not self._heap and self._keys:
            left = self._open(budget)
            if left is None:
                return None
            budget = left
        return budget

    def first(self) -> tuple[int, str] | None:
        """The earliest entry (possibly stale), or None when there is none. Opens
        what is left of the earliest bucket at once (see `prepare`)."""
        self.prepare(sys.maxsize)
        return self._heap[0] if self._heap else None

    def pop(self) -> tuple[int, str]:
        """Remove and return the entry first() gave. Raises IndexError when empty."""
        if self.first() is None:
            raise IndexError("pop from an empty DueIndex")
        return heapq.heappop(self._heap)

    def _open(self, budget: int) -> int | None:
        """Go on opening the earliest bucket (the heap is empty), or taking the cold
        window that starts there: the budget left once it is done, else None."""
        key = self._keys[0]
        cold = self._cold
        if cold is not None and key == cold.start:  # the first bucket of a cold window
            taken, used = cold.take(budget)
            if taken is None:
                return None
            heapq.heappop(self._keys)
            buckets = self._buckets
            if key in buckets:  # pushed after fill(), so not in _keys (the window was)
                heapq.heappush(self._keys, key)
            for number, ids in taken.items():
                warm = buckets.get(number)
                if warm is None:
                    buckets[number] = ids
                    heapq.heappush(self._keys, number)
                else:  # pushed after fill(): its number is in _keys already. (It is not
                    # opened in part: the window's own number came first in _keys.)
                    warm[:0] = ids
            following = cold.start
            if following is None:
                self._cold = None
            elif following not in buckets:  # else in _keys already
                heapq.heappush(self._keys, following)
            return budget - used
        ids = self._buckets.get(key, [])
        opening = self._openings.get(key)
        if opening is None:
            opening = self._openings[key] = _Opening()
        done = opening.done
        end = min(len(ids), done + budget)
        when, entries, push = self._when, opening.entries, heapq.heappush
        for job_id in ids[done:end]:
            at = when(job_id)
            # a job re-set to another bucket has an entry there (or in the heap)
            if at is not None and at >> BUCKET_SHIFT == key:
                push(entries, (at, job_id))
        if end < len(ids):
            opening.done = end
            return None
        heapq.heappop(self._keys)
        self._buckets.pop(key, None)
        del self._openings[key]
        self._bucketed -= len(ids) + opening.pushed
        self._horizon = (key + 1) << BUCKET_SHIFT
        self._heap = entries
        return budget - (end - done)


class _Opening:
    """A bucket opened in part: its first `done` ids are in `entries` (a heap of
    (time, id), the stale ones left out); the rest of its list is not looked at yet.
    Entries pushed into the bucket since go straight into `entries` (`pushed` of them)."""

    __slots__ = ("done", "entries", "pushed")

    def __init__(self) -> None:
        self.done = 0
        self.entries: list[tuple[int, str]] = []
        self.pushed = 0
