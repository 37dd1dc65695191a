"""The due index (core/due.py): earliest first across buckets, few heap entries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairoi_trio.core import due
from kairoi_trio.core.due import BUCKET_SHIFT, DueIndex
from kairoi_trio.model import MAX_TIME_US, MIN_TIME_US

BUCKET = 1 << BUCKET_SHIFT


def drain(index: DueIndex) -> list[tuple[int, str]]:
    out = []
    while index.first() is not None:
        out.append(index.pop())
    return out


def test_only_the_earliest_bucket_becomes_heap_entries() -> None:
    """Later jobs cost a list slot, not a heap tuple, until their bucket comes up."""
    times = {f"j{i}": (i % 50) * BUCKET + i for i in range(1000)}
    index = DueIndex(times.get)
    for job_id, at in times.items():
        index.push(at, job_id)
    assert len(index) == 1000
    assert index._heap == []  # nothing is a heap entry before it is asked for
    assert index.first() == (0, "j0")
    assert len(index._heap) == 20  # the first bucket's jobs only
    assert drain(index) == sorted((at, job_id) for job_id, at in times.items())
    assert len(index) == 0 and index.first() is None


def test_a_push_before_the_horizon_goes_to_the_heap_in_order() -> None:
    times = {"late": 3 * BUCKET, "first": 10}
    index = DueIndex(times.get)
    index.push(times["late"], "late")
    index.push(times["first"], "first")
    assert index.pop() == (10, "first")  # the bucket of 0..BUCKET is open now
    times["now"] = 20
    times["before"] = -5 * BUCKET  # earlier than the open bucket: into the heap too
    index.push(20, "now")
    index.push(times["before"], "before")
    assert drain(index) == [(-5 * BUCKET, "before"), (20, "now"), (3 * BUCKET, "late")]


def test_stale_bucket_entries_are_dropped_when_the_bucket_opens() -> None:
    times: dict[str, int | None] = {
        "moved": 5 * BUCKET + 1,
        "gone": 2 * BUCKET,
        "kept": 2 * BUCKET + 7,
    }
    index = DueIndex(times.get)
    index.push(2 * BUCKET + 3, "moved")  # then re-set to a later bucket: a second entry
    index.push(5 * BUCKET + 1, "moved")
    index.push(2 * BUCKET, "gone")
    index.push(2 * BUCKET + 7, "kept")
    times["gone"] = None  # deleted, or no longer planned
    assert index.first() == (2 * BUCKET + 7, "kept")
    assert drain(index) == [(2 * BUCKET + 7, "kept"), (5 * BUCKET + 1, "moved")]


def test_pop_from_an_empty_index_raises() -> None:
    with pytest.raises(IndexError):
        DueIndex(lambda _: None).pop()


# -- fill(): the start-up's bulk load, kept cold ---------------------------------------

WINDOW = BUCKET << 6  # fill() takes its entries ~12.7 days of buckets at a time

# Times: clustered (several per bucket), spread over windows with gaps between them,
# negative (before 1970) and at the edges of the supported range.
times_strategy = st.one_of(
    st.integers(min_value=-3 * WINDOW, max_value=3 * WINDOW),
    st.integers(min_value=0, max_value=40 * BUCKET).map(lambda t: 1_800_000_000_000_000 + t),
    st.sampled_from([MIN_TIME_US, MAX_TIME_US, -1, 0, BUCKET - 1, WINDOW, 50 * WINDOW]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(times_strategy, max_size=60),
    st.lists(st.tuples(times_strategy, st.booleans()), max_size=20),
    st.integers(min_value=0, max_value=20),
)
def test_fill_gives_what_pushing_one_by_one_gives(
    filled: list[int], later: list[tuple[int, bool]], pops: int
) -> None:
    """A filled index pops the same entries as one pushed an entry at a time, with
    pushes after the fill (before and after pops: into cold windows, the heap, new
    buckets) and entries gone stale."""
    times: dict[str, int | None] = {f"f{i}": at for i, at in enumerate(filled)}
    bulk = DueIndex(times.get)
    single = DueIndex(times.get)
    bulk.fill(list(times.values()), list(times))  # type: ignore[arg-type]
    for job_id, at in list(times.items()):
        assert at is not None
        single.push(at, job_id)
    assert len(bulk) == len(single) == len(filled)
    popped: tuple[list[tuple[int, str]], list[tuple[int, str]]] = ([], [])
    for _ in range(pops):
        for index, out in zip((bulk, single), popped, strict=True):
            if index.first() is not None:
                out.append(index.pop())
    for i, (at, stale) in enumerate(later):
        job_id = f"l{i}"
        times[job_id] = at
        bulk.push(at, job_id)
        single.push(at, job_id)
        if stale and filled:
            times[f"f{i % len(filled)}"] = None  # deleted, or re-set elsewhere
    assert popped[0] == popped[1]
    assert drain(bulk) == drain(single)
    assert len(bulk) == len(single) == 0


def test_fill_keeps_entries_cold_and_takes_one_window_at_a_time() -> None:
    times = {f"j{i}": (i % 300) * BUCKET + i for i in range(3000)}  # ~4.7 windows
    index = DueIndex(times.get)
    index.fill(list(times.values()), list(times))
    assert index._cold is not None and not index._buckets and index._keys == [0]
    assert index.first() == (0, "j0")
    assert len(index._buckets) == 63  # the first window's other buckets, as lists
    assert drain(index) == sorted((at, job_id) for job_id, at in times.items())
    assert index._cold is None and len(index) == 0


def test_fill_jumps_the_gaps_between_windows() -> None:
    times = {"a": 5, "b": 100 * WINDOW + 3, "c": 100 * WINDOW + 2 * BUCKET, "d": 10**6 * WINDOW}
    index = DueIndex(times.get)
    index.fill(list(times.values()), list(times))
    assert drain(index) == sorted((at, job_id) for job_id, at in times.items())


def test_a_dense_fill_is_pushed_into_buckets_not_kept_cold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More than COLD_MAX_PER_WINDOW jobs a window on average: taking such a window
    would cost the actor a Python step an id at once, so they go to buckets now."""
    monkeypatch.setattr(due, "COLD_MAX_PER_WINDOW", 10)
    dense = {f"d{i}": 7 * WINDOW + (i % 3) * BUCKET + i for i in range(40)}  # one window
    index = DueIndex(dense.get)
    index.fill(list(dense.values()), list(dense))
    assert index._cold is None and sorted(index._buckets) == [7 * 64, 7 * 64 + 1, 7 * 64 + 2]
    assert drain(index) == sorted((at, job_id) for job_id, at in dense.items())
    sparse = {f"s{i}": i * WINDOW for i in range(40)}  # one a window: cold
    index = DueIndex(sparse.get)
    index.fill(list(sparse.values()), list(sparse))
    assert index._cold is not None
    assert drain(index) == sorted((at, job_id) for job_id, at in sparse.items())


def test_fill_of_an_index_in_use_pushes() -> None:
    times = {"a": 3 * BUCKET, "b": 1}
    index = DueIndex(times.get)
    index.push(3 * BUCKET, "a")
    index.fill([1], ["b"])
    assert index._cold is None
    assert drain(index) == [(1, "b"), (3 * BUCKET, "a")]


# -- prepare(): a large bucket opened in slices ------------------------------------------


def prepare_until_known(index: DueIndex, budget: int) -> int:
    """Calls of prepare(budget) until the earliest entry is known."""
    calls = 1
    while index.prepare(budget) is None:
        calls += 1
        assert calls < 10_000
    return calls


def test_a_large_bucket_is_opened_a_slice_at_a_time() -> None:
    """Each call takes at most `budget` ids; pushes into the bucket meanwhile (entries
    at once: no more work for the slices) and an earlier bucket pushed meanwhile are
    served in order, and no work is done twice."""
    times: dict[str, int | None] = {f"j{i:04}": 9 * BUCKET + 1000 - i for i in range(1000)}
    index = DueIndex(times.get)
    looked_up: list[str] = []

    def when(job_id: str) -> int | None:
        looked_up.append(job_id)
        return times.get(job_id)

    index._when = when
    for job_id, at in times.items():
        assert at is not None
        index.push(at, job_id)
    assert index.prepare(300) is None  # 300 of the 1000 ids
    assert len(looked_up) == 300 and index._heap == []
    times["late"] = 9 * BUCKET + 5000  # into the bucket being opened: an entry at once
    index.push(9 * BUCKET + 5000, "late")
    assert len(index) == 1001
    times["j0999"] = None  # not looked at yet: left out when it is
    times["earlier"] = 4 * BUCKET  # an earlier bucket: opened first, at once
    index.push(4 * BUCKET, "earlier")
    assert index.prepare(300) == 299
    assert index.pop() == (4 * BUCKET, "earlier")
    assert index.prepare(300) is None and index.prepare(300) is None
    assert index.prepare(300) == 200  # the bucket's 1000 ids, each looked up once
    assert sorted(looked_up) == sorted(set(times) - {"late"})
    assert drain(index) == sorted(
        (at, job_id) for job_id, at in times.items() if at is not None and job_id != "earlier"
    )


def test_a_cold_window_is_taken_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window holding most of a fill (cold on average, dense in one window) is taken
    in slices too, with pushes into its buckets meanwhile."""
    monkeypatch.setattr(due, "COLD_MAX_PER_WINDOW", 1000)
    times: dict[str, int | None] = {f"s{i}": (i + 1) * WINDOW for i in range(40)}
    times |= {f"d{i}": (i % 5) * BUCKET + i for i in range(2000)}  # the first window
    index = DueIndex(times.get)
    index.fill(list(times.values()), list(times))  # type: ignore[arg-type]
    assert index._cold is not None
    assert index.prepare(500) is None and index._cold.start == 0  # still in the window
    times["pushed"] = 2 * BUCKET + 1
    index.push(2 * BUCKET + 1, "pushed")
    calls = prepare_until_known(index, 500)
    assert 4 <= calls <= 6  # 2000 ids to take, then the first bucket's 400 to open
    assert index.first() == (0, "d0")
    assert drain(index) == sorted((at, job_id) for job_id, at in times.items() if at is not None)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(times_strategy, max_size=60),
    st.lists(st.tuples(st.sampled_from(["push", "pop", "prepare", "stale"]), times_strategy)),
    st.integers(min_value=0, max_value=7),
    st.booleans(),
)
def test_opening_in_slices_gives_what_opening_at_once_gives(
    filled: list[int], steps: list[tuple[str, int]], budget: int, bulk: bool
) -> None:
    """prepare() with any budget, between pushes and pops and entries gone stale, never
    changes what the index pops: the live entries, earliest first."""
    times: dict[str, int | None] = {f"f{i}": at for i, at in enumerate(filled)}
    index = DueIndex(times.get)
    if bulk:
        index.fill(list(times.values()), list(times))  # type: ignore[arg-type]
    else:
        for job_id, at in list(times.items()):
            assert at is not None
            index.push(at, job_id)

    def live() -> list[tuple[int, str]]:
        return sorted((at, job_id) for job_id, at in times.items() if at is not None)

    for n, (step, at) in enumerate(steps):
        if step == "push":
            times[f"p{n}"] = at
            index.push(at, f"p{n}")
        elif step == "stale" and times:
            times[sorted(times)[at % len(times)]] = None
        elif step == "prepare":
            index.prepare(budget)
        else:  # pop the earliest live entry, as the state does (stale ones are skipped)
            while index.prepare(budget) is not None and index.first() is not None:
                entry = index.pop()
                if times.get(entry[1]) == entry[0]:
                    assert entry == live()[0]
                    times[entry[1]] = None  # it ran: no longer waiting
                    break
    rest = [entry for entry in drain(index) if times.get(entry[1]) == entry[0]]
    assert rest == live()
