"""Letting go of large lists a slice at a time (core/release.py)."""

from __future__ import annotations

from kairoi_trio.core.release import drop_some


def test_lists_are_emptied_last_first_from_their_ends_within_the_budget() -> None:
    first, second, empty = [1, 2, 3], [4, 5, 6, 7, 8], list[int]()
    lists = [first, empty, second]
    assert drop_some(lists, 3)
    assert second == [4, 5] and first == [1, 2, 3]
    assert drop_some(lists, 3)  # the rest of the second, the empty one, one of the first
    assert lists == [[1, 2]] and lists[0] is first and second == []
    assert not drop_some(lists, 5)
    assert lists == [] and first == []
    assert not drop_some(lists, 5)
