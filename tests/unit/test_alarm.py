"""alarm.py: an alarm at a wall-clock time never fires before it, fires once it has
come, and moves when set again (earlier or later). Real clocks: the timerfd is the
kernel's, so bounds above are generous (a loaded machine may be late, never early)."""

from __future__ import annotations

import time

import pytest
import trio

from kairoi_trio.alarm import SPIN_US, Alarm, TimerfdAlarm, TrioAlarm, new_alarm
from kairoi_trio.model import now_us


@pytest.fixture(params=["timerfd", "trio"])
def alarm(request: pytest.FixtureRequest) -> Alarm:
    made: Alarm = TimerfdAlarm() if request.param == "timerfd" else TrioAlarm()
    request.addfinalizer(made.close)
    return made


async def fired_at(alarm: Alarm) -> int:
    with trio.fail_after(5):
        await alarm.wait()
    return now_us()


async def test_fires_at_its_time_never_before(alarm: Alarm) -> None:
    for _ in range(20):
        due = now_us() + 3_000
        alarm.set(due)
        assert due <= await fired_at(alarm) < due + 1_000_000


async def test_a_time_in_the_past_fires_at_once(alarm: Alarm) -> None:
    alarm.set(now_us() - 5_000_000)
    before = now_us()
    assert await fired_at(alarm) < before + 1_000_000
    alarm.set(0)  # the epoch itself: not "disarmed"
    await fired_at(alarm)


async def set_later(alarm: Alarm, after_s: float, due: int) -> None:
    await trio.sleep(after_s)
    alarm.set(due)


async def test_set_again_earlier_while_waiting_fires_at_the_new_time(alarm: Alarm) -> None:
    start = now_us()
    alarm.set(start + 10_000_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, alarm, 0.05, start + 200_000)
        fired = await fired_at(alarm)
    assert start + 200_000 <= fired < start + 5_000_000


async def test_set_again_later_while_waiting_does_not_fire_at_the_old_time(
    alarm: Alarm,
) -> None:
    start = now_us()
    alarm.set(start + 100_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(set_later, alarm, 0.02, start + 400_000)
        fired = await fired_at(alarm)
    assert fired >= start + 400_000


async def test_an_expiry_not_read_before_it_is_set_again_is_not_taken_for_the_new_one() -> None:
    alarm = TimerfdAlarm()
    try:
        alarm.set(now_us() - 1)  # expired: the descriptor is readable
        await trio.sleep(0.01)
        due = now_us() + 200_000
        alarm.set(due)  # re-armed before anyone read it
        assert await fired_at(alarm) >= due
    finally:
        alarm.close()


def test_new_alarm_is_a_timerfd_on_linux() -> None:
    made = new_alarm()
    try:
        assert isinstance(made, TimerfdAlarm)
    finally:
        made.close()


async def test_set_later_while_it_waits_out_its_last_moments_does_not_fire_early() -> None:
    """The timerfd fires SPIN_US early and wait() yields until the time itself: a set()
    for a later time in that window moves it, as before the timer fired, and the
    wait for the new time is on the timer again, not a busy loop."""
    alarm = TimerfdAlarm()
    moved_in_time = 0

    async def move_later(due: int, later: int, fired: list[int], moved: list[bool]) -> None:
        while now_us() < due - SPIN_US // 3:  # inside the window, before the time
            await trio.lowlevel.checkpoint()
        alarm.set(later)
        moved.append(not fired)

    try:
        for _ in range(10):
            due = now_us() + 20_000
            later = due + 300_000
            alarm.set(due)
            fired: list[int] = []
            moved: list[bool] = []
            cpu = time.process_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(move_later, due, later, fired, moved)
                fired.append(await fired_at(alarm))
            cpu = time.process_time() - cpu
            if moved[0]:  # moved before it fired: it must fire at the new time
                moved_in_time += 1
                assert fired[0] >= later
                assert cpu < 0.15  # 0.3 s of waiting: a busy loop would use all of it
    finally:
        alarm.close()
    assert moved_in_time >= 3  # the window was hit, not only missed
