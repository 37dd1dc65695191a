"""An alarm at a wall-clock time, for handing out jobs armed ahead of their time.

`trio.sleep` wakes up to a millisecond late: Trio waits in `epoll_wait`, whose
timeout Python rounds up to the next whole millisecond (0.5-0.6 ms late at p50
on the benchmark machine, against 0.19 ms for `time.sleep`). `TimerfdAlarm`
waits instead for a Linux timerfd (timerfd_create(2)) on CLOCK_REALTIME with an
absolute expiry, which Trio sees as a readable descriptor: it fires within the
kernel's timer slack (50 µs), 0.32 ms late at p50 on the same machine, and at
the wall-clock time even if the clock is stepped meanwhile. Python has no
binding before 3.13 (`os.timerfd_create`), hence ctypes. Its timer fires SPIN_US
early and `wait()` then yields, a checkpoint at a time, until the time itself:
an idle CPU of a VM takes ~0.4 ms to wake on a timer (p50; over 2 ms at p99).

`TrioAlarm` does the same on Trio's clock: the fallback where there is no
timerfd, and what the unit tests use with Trio's mock clock.

Both: `set(at_us)` (re)arms the alarm for `at_us` µs since the epoch; `wait()`
returns once that time has come (at once if it has). One task waits at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Protocol

import trio

from kairoi_trio.model import MICROS, now_us


class Alarm(Protocol):
    def set(self, at_us: int) -> None: ...

    async def wait(self) -> None: ...

    def close(self) -> None: ...


class TrioAlarm:
    """On Trio's clock: the deadline of the waiting task's cancel scope is moved in place."""

    def __init__(self, clock: Callable[[], int] = now_us) -> None:
        """clock: the wall clock in µs (the tests tie it to Trio's mock clock)."""
        self._clock = clock
        self._at: int | None = None
        self._scope: trio.CancelScope | None = None

    def set(self, at_us: int) -> None:
        self._at = at_us
        if self._scope is not None:
            self._scope.deadline = self._deadline(at_us)

    def _deadline(self, at_us: int) -> float:
        return trio.current_time() + max(at_us - self._clock(), 0) / MICROS

    async def wait(self) -> None:
        if self._at is None:
            raise RuntimeError("the alarm is not set")
        with trio.CancelScope(deadline=self._deadline(self._at)) as scope:
            self._scope = scope
            try:
                await trio.sleep_forever()
            finally:
                self._scope = None

    def close(self) -> None:
        pass


# <sys/timerfd.h>, <time.h> (Linux, every architecture Python runs on)
# TimerfdAlarm's timer fires this long (µs) before the alarm's time, and wait()
# yields to the other tasks (a checkpoint at a time) until the time itself: a VM's
# idle CPU takes ~0.4 ms at p50 (over 2 ms at p99) to wake up on a timer, which
# this absorbs for the price of at most SPIN_US of a busy event loop per alarm.
SPIN_US = 500

_CLOCK_REALTIME = 0
_TFD_TIMER_ABSTIME = 1
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_NONBLOCK = os.O_NONBLOCK


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerfdAlarm:
    """On the wall clock, to the kernel's timer slack: a timerfd read through Trio.

    Raises OSError when the kernel or libc has no timerfd (use `new_alarm`)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
        create = libc.timerfd_create
        create.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = create(_CLOCK_REALTIME, _TFD_CLOEXEC | _TFD_NONBLOCK)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"timerfd_create: {os.strerror(code)}")
        self._fd = fd
        self._spec = _Itimerspec()
        self._at = 0
        self._armed = False  # set, and not fired (read) since

    def set(self, at_us: int) -> None:
        self._at = at_us
        # An expiry of 0 would disarm the timer: a time in the past is 1 ns after the epoch.
        seconds, micros = divmod(max(at_us - SPIN_US, 0), MICROS)
        self._spec.it_value.tv_sec = seconds
        self._spec.it_value.tv_nsec = micros * 1000 or (0 if seconds else 1)
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"timerfd_settime: {os.strerror(code)}")
        self._armed = True  # (re-arming also drops an expiry not read yet)

    async def wait(self) -> None:
        while True:
            left = self._at - now_us()
            if left <= 0:
                return
            if left <= SPIN_US:  # woken early (or called late): yield until the time itself
                await trio.lowlevel.checkpoint()
                continue
            if not self._armed:  # it fired and the wall clock went back since, or a wait
                self.set(self._at)  # was cancelled after it fired: arm it again
            await trio.lowlevel.wait_readable(self._fd)
            try:
                os.read(self._fd, 8)  # the expirations count; reading resets readiness
                self._armed = False
            except BlockingIOError:
                pass  # re-armed (set) after it became readable: look again

    def close(self) -> None:
        if self._fd >= 0:
            try:  # a task waiting on it gets ClosedResourceError, not a hang
                trio.lowlevel.notify_closing(self._fd)
            except RuntimeError:  # not in Trio: nobody can be waiting
                pass
            os.close(self._fd)
            self._fd = -1


def new_alarm() -> Alarm:
    """A TimerfdAlarm where the system has timerfd (Linux), else a TrioAlarm."""
    try:
        return TimerfdAlarm()
    except (OSError, AttributeError):  # no such function in this libc, or refused
        return TrioAlarm()
