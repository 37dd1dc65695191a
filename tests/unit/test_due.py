"""The due index (core/due.py): earliest first across buckets, few heap entries."""

from __future__ import annotations

import pytest

from kairoi_trio.core.due import BUCKET_SHIFT, DueIndex

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
