"""The dispatcher's DueTimer (dispatch.py): wakes when the earliest job is due, no earlier.

Most tests run on Trio's autojumping mock clock with the wall clock (`now_us`)
tied to it, so they are exact and take no real time; one runs on real clocks.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from kairoi_trio import dispatch
from kairoi_trio.dispatch import DueTimer
from kairoi_trio.model import MICROS, now_us

WALL_START = 1_700_000_000 * MICROS


@pytest.fixture
def wall(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> trio.testing.MockClock:
    """now_us() follows the mock clock: WALL_START at trio time 0.

    The test takes this clock as an argument, so pytest-trio runs it on it."""
    monkeypatch.setattr(
        dispatch, "now_us", lambda: WALL_START + round(trio.current_time() * MICROS)
    )
    return autojump_clock


def at(seconds: float) -> int:
    return WALL_START + round(seconds * MICROS)


async def woken_at(timer: DueTimer) -> float:
    await timer.wait_due()
    return trio.current_time()


async def test_wakes_at_the_due_time(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.75))
    assert await woken_at(timer) == pytest.approx(0.75, abs=1e-6)


async def test_a_due_time_in_the_past_returns_at_once(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    await trio.sleep(5)
    timer.update(at(1))
    assert await woken_at(timer) == pytest.approx(5)


async def test_wakes_at_a_due_time_further_than_the_longest_sleep(
    wall: trio.testing.MockClock,
) -> None:
    timer = DueTimer()
    timer.update(at(3.5 * dispatch.MAX_SLEEP_S))
    assert await woken_at(timer) == pytest.approx(3.5 * dispatch.MAX_SLEEP_S, abs=1e-6)


async def test_does_not_wake_before_the_due_time(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.8))
    with trio.move_on_after(0.799) as scope:
        await timer.wait_due()
    assert scope.cancelled_caught


async def test_nothing_planned_waits_until_something_is(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(None)
    with trio.move_on_after(30) as scope:
        await timer.wait_due()
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: set_later(timer, 31.0, at(31.5)))
        assert await woken_at(timer) == pytest.approx(31.5, abs=1e-6)


async def set_later(timer: DueTimer, when: float, due: int | None) -> None:
    await trio.sleep_until(when)
    timer.update(due)


async def test_update_to_an_earlier_time_wakes_early(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.9))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.1, at(0.3))
        assert await woken_at(timer) == pytest.approx(0.3, abs=1e-6)


async def test_update_to_now_wakes_at_once(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.9))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.2, at(0.2))
        assert await woken_at(timer) == pytest.approx(0.2, abs=1e-6)


async def test_update_to_a_later_time_does_not_wake_at_the_old_one(
    wall: trio.testing.MockClock,
) -> None:
    timer = DueTimer()
    timer.update(at(0.3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.1, at(0.7))
        assert await woken_at(timer) == pytest.approx(0.7, abs=1e-6)


async def test_the_last_job_going_away_stops_the_wake_up(wall: trio.testing.MockClock) -> None:
    timer = DueTimer()
    timer.update(at(0.3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, timer, 0.1, None)
        with trio.move_on_after(10) as scope:
            await timer.wait_due()
        assert scope.cancelled_caught


async def test_wakes_at_the_due_time_on_real_clocks() -> None:
    timer = DueTimer()
    timer.update(now_us() + 300_000)
    start = time.monotonic()
    with trio.fail_after(5):
        await timer.wait_due()
    elapsed = time.monotonic() - start
    assert elapsed >= 0.29
    assert elapsed < 2.0  # generous: a loaded machine may be late, not early
