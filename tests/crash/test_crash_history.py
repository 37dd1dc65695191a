"""The crash driver's judge (history.py) must catch what it is there to catch:
a check that can never fail would make the crash suite worthless."""

from __future__ import annotations

import pytest
from crash.history import History, HistoryError, check

A, B = ("job", "a"), ("job", "b")


def history(*ops: tuple[tuple[str, str], object, bool], base: dict | None = None) -> History:
    h = History("w", base=dict(base or {}))
    for key, value, acked in ops:
        h.record(key, value).acked = acked
    return h


def test_everything_acknowledged_and_present() -> None:
    h = history((A, 1, True), (B, 2, True), (A, 3, True))
    assert check(h, {A: 3, B: 2}).prefix == 2


def test_unacknowledged_writes_may_be_missing_or_present() -> None:
    h = history((A, 1, True), (B, 2, False), (A, 3, False))
    assert check(h, {A: 1, B: None}).prefix == 0
    verdict = check(h, {A: 1, B: 2})
    assert (verdict.prefix, verdict.applied_unacked) == (1, 1)
    assert check(h, {A: 3, B: 2}).prefix == 2


def test_a_lost_acknowledged_write_is_reported() -> None:
    h = history((A, 1, True), (A, 2, True))
    with pytest.raises(HistoryError, match=r"acknowledged write #1 .* lost.*older write \(#0\)"):
        check(h, {A: 1})
    with pytest.raises(HistoryError, match="value before the cycle"):
        check(history((A, 1, True), base={A: 0}), {A: 0})


def test_a_value_nobody_sent_is_reported() -> None:
    with pytest.raises(HistoryError, match="nobody sent"):
        check(history((A, 1, True)), {A: 7})
    with pytest.raises(HistoryError, match="never sent"):
        check(history((A, 1, False)), {A: 7})


def test_a_later_write_kept_while_an_earlier_one_is_lost_is_reported() -> None:
    # Both unacknowledged, so each key alone is fine, but B's write came
    # after A's, so B=2 with A still absent is no prefix of what was sent.
    h = history((A, 1, False), (B, 2, False))
    with pytest.raises(HistoryError, match="no prefix"):
        check(h, {A: None, B: 2})


def test_deletes_and_the_state_before_the_cycle() -> None:
    h = history((A, None, True), (B, 5, False), base={A: 0, B: 4})
    assert check(h, {A: None, B: 4}).prefix == 0
    with pytest.raises(HistoryError):
        check(h, {A: 0, B: 4})
    h.next_cycle({A: None, B: 5})
    assert h.base == {A: None, B: 5} and h.ops == []
    assert check(h, {A: None, B: 5}).prefix == -1
