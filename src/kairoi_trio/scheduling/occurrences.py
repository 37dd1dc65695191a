"""When a schedule's occurrences fall: pure functions of a Schedule and an instant.

Instants are integers of microseconds since the epoch (UTC), as everywhere in
the server. Cron fields are matched by cronsim (the evaluator healthchecks.io
runs; 2-7x faster than croniter here, see docs/benchmarks.md), on the naive
wall-clock times of the schedule's zone; this module turns those wall-clock
times into instants with the daylight-saving rules of docs/recurring-jobs.md:

- a wall-clock time that does not exist (the clock springs forward over it)
  runs once, at the first instant after the gap: 02:30 in Europe/Paris on
  2027-03-28 runs at 03:00 CEST (01:00 UTC);
- a wall-clock time that occurs twice (the clock falls back) runs once, at its
  first occurrence: 02:30 in Europe/Paris on 2027-10-31 runs at 02:30 CEST
  (00:30 UTC), not again at 02:30 CET;
- several wall-clock times that map to one instant (all the minutes of a gap)
  run once.

Interval schedules (`every 15m`, `PT15M`) are exact durations from their
start, k * interval after it, and ignore zones and daylight-saving time.

Every function takes bounded time whatever the span it looks at: cron
iteration moves field by field (cronsim gives up after 50 years without a
match), and callers bound how many occurrences they ask for.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from kairoi_trio.model import MAX_TIME_US, MICROS, MIN_TIME_US, Schedule

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# `every 90s` / `every 15m` / `every 2h` / `every 1d` (units may be combined: 1h30m).
_EVERY = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
# ISO 8601 durations of exact length: weeks, days, hours, minutes, seconds (with
# a fraction). Years and months are not fixed durations and are refused. The
# lookaheads refuse "P", "PT" and a "T" with nothing after it.
_ISO_DURATION = re.compile(
    r"P(?=\d|T\d)(?:(\d+)W)?(?:(\d+)D)?"
    r"(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:[.,]\d{1,6})?)S)?)?"
)
_UNIT_US = (7 * 86_400 * MICROS, 86_400 * MICROS, 3_600 * MICROS, 60 * MICROS)

# An interval shorter than this would fire faster than any runner can start.
MIN_INTERVAL_US = 1 * MICROS
# ...and one longer than this (100 years, every duration's bound) never fires.
MAX_INTERVAL_US = 100 * 365 * 86_400 * MICROS
# Longer duration texts are refused before any number in them is converted.
MAX_DURATION_TEXT = 64

_EPOCH = datetime(1970, 1, 1)  # naive UTC
_ONE_SECOND = timedelta(seconds=1)


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message says why, for the client."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """An expression made ready to evaluate: a cron text (macros expanded) and a
    zone (None: UTC), or an interval in microseconds."""

    cron: str | None
    zone: ZoneInfo | None
    every_us: int


def parse_duration(text: str) -> int:
    """Microseconds in `90s`, `15m`, `2h`, `1d`, `1h30m` or an ISO 8601 duration
    (`PT15M`, `P1D`, `PT0.5S`). Raises ScheduleError for anything else, and for
    ISO years and months, which have no fixed length."""
    text = text.strip()
    if len(text) > MAX_DURATION_TEXT:
        raise ScheduleError(
            f"{text[:40]!r}...: a duration is at most {MAX_DURATION_TEXT} characters"
        )
    upper = text.upper()
    iso = _ISO_DURATION.fullmatch(upper)
    if iso is not None:
        weeks, days, hours, minutes, seconds = iso.groups()
        total = 0
        for value, unit in zip((weeks, days, hours, minutes), _UNIT_US, strict=True):
            total += int(value or 0) * unit
        if seconds:
            whole, _, fraction = seconds.replace(",", ".").partition(".")
            total += int(whole) * MICROS + int(fraction.ljust(6, "0") or 0)
        return total
    if upper.startswith("P") and re.search(r"\d+[YM]", upper.partition("T")[0]):
        raise ScheduleError(
            f"{text!r}: years and months have no fixed length; use days, or a cron expression"
        )
    every = _EVERY.fullmatch(text.lower()) if text else None
    if every is None:
        raise ScheduleError(
            f"{text!r} is not a duration (examples: 90s, 15m, 2h, 1d, 1h30m, PT15M)"
        )
    days, hours, minutes, seconds = (int(v or 0) for v in every.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 * MICROS + seconds * MICROS


def interval_of(expression: str) -> int | None:
    """The interval in microseconds if `expression` is `every <duration>` or an ISO
    8601 duration, None if it is a cron expression. Raises ScheduleError."""
    text = expression.strip()
    if text.lower().startswith("every"):
        rest = text[5:]
        if not rest[:1].isspace():
            raise ScheduleError(f"{expression!r}: write `every <duration>`, e.g. `every 15m`")
        return parse_duration(rest)
    if text[:1] in ("P", "p"):
        return parse_duration(text)
    return None


@functools.lru_cache(maxsize=1024)
def compile_schedule(expression: str, tz: str) -> Compiled:
    """Parse and check an expression and a zone once (cached: schedules repeat).

    Raises ScheduleError naming what is wrong: the expression (cronsim's reason
    for a cron one), the zone (not an IANA name known here; the tzdata package
    provides them all when the system has none), an interval below one second.
    """
    zone = _zone(tz)
    every = interval_of(expression)
    if every is not None:
        if not MIN_INTERVAL_US <= every <= MAX_INTERVAL_US:
            raise ScheduleError(
                f"{expression!r}: the interval must be at least 1 second and at most 100 years"
            )
        return Compiled(None, None, every)
    text = " ".join(expression.split())
    if text.startswith("@"):
        expanded = MACROS.get(text.lower())
        if expanded is None:
            raise ScheduleError(f"unknown macro {text!r} (known: {', '.join(sorted(MACROS))})")
        text = expanded
    if len(text.split()) not in (5, 6):
        raise ScheduleError(
            f"{expression!r} is not a schedule: a cron expression has 5 fields (or 6 with "
            "leading seconds); an interval is written `every 15m` or PT15M"
        )
    try:
        CronSim(text, datetime(2000, 1, 1))
    except CronSimError as error:
        raise ScheduleError(f"bad cron expression {expression!r}: {error}") from None
    except (ValueError, IndexError, KeyError) as error:  # cronsim on some odd inputs
        raise ScheduleError(f"bad cron expression {expression!r}: {error}") from None
    return Compiled(text, zone, 0)


def _zone(tz: str) -> ZoneInfo | None:
    if tz in ("UTC", "Etc/UTC", "Z"):
        return None
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown time zone {tz!r} (an IANA name, e.g. Europe/Paris)") from None


# -- instants and wall-clock times --------------------------------------------------


def _naive_utc(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _us(naive_utc: datetime) -> int:
    delta = naive_utc - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS + delta.microseconds


def _offset_us(zone: ZoneInfo, us: int) -> int:
    local = _naive_utc(us).replace(tzinfo=UTC).astimezone(zone)
    offset = local.utcoffset()
    assert offset is not None
    return offset // timedelta(microseconds=1)


def _transition(zone: ZoneInfo, lo: int, hi: int) -> int:
    """The first instant in (lo, hi] whose UTC offset is the one at hi (bisection:
    the offset changes once in between)."""
    target = _offset_us(zone, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset_us(zone, mid) == target:
            hi = mid
        else:
            lo = mid
    return hi


def _to_instant(naive: datetime, zone: ZoneInfo | None) -> tuple[int, bool]:
    """The instant a wall-clock time runs at, and False when it lies in a gap (then
    the instant is the gap's end: the first instant after it)."""
    if zone is None:
        return _us(naive), True
    first = naive.replace(tzinfo=zone, fold=0).utcoffset()
    second = naive.replace(tzinfo=zone, fold=1).utcoffset()
    assert first is not None and second is not None
    if first == second:
        return _us(naive - first), True
    if first > second:  # occurs twice (fall back): the first occurrence
        return _us(naive - first), True
    # does not exist (spring forward): fold=0 reads it with the offset before the
    # gap (an instant after the transition), fold=1 with the one after (before it)
    return _transition(zone, _us(naive - second), _us(naive - first)), False


def _fold_end(zone: ZoneInfo, local: datetime, us: int) -> datetime:
    """For an instant in the second pass of a repeated hour: the wall-clock time
    at which the repetition ends (naive), the first one that is not repeated."""
    before = local.replace(fold=0).utcoffset()
    after = local.utcoffset()
    assert before is not None and after is not None
    span = (before - after) // timedelta(microseconds=1)
    transition = _transition(zone, us - span, us)
    return _naive_utc(transition) + before


def _local(zone: ZoneInfo, us: int) -> datetime:
    return _naive_utc(us).replace(tzinfo=UTC).astimezone(zone)


def _wall_clock(zone: ZoneInfo | None, us: int) -> tuple[datetime, datetime | None]:
    """The naive wall-clock time of an instant, and, when the instant lies in the
    second pass of a repeated hour, the wall-clock time at which the repetition
    ends (else None)."""
    if zone is None:
        return _naive_utc(us), None
    local = _local(zone, us)
    if local.fold and local.replace(fold=0).utcoffset() != local.utcoffset():
        return local.replace(tzinfo=None), _fold_end(zone, local, us)
    return local.replace(tzinfo=None), None


# -- cron ---------------------------------------------------------------------------


def _cron_forward(compiled: Compiled, after: int) -> Iterator[int]:
    """Instants > after, increasing, no repeats."""
    cron, zone = compiled.cron, compiled.zone
    assert cron is not None
    cursor = after
    while True:
        wall, fold_end = _wall_clock(zone, cursor)
        # in the second pass of a repeated hour, its wall-clock times already ran
        start = wall if fold_end is None else fold_end - _ONE_SECOND
        restarted = False
        try:
            for naive in CronSim(cron, start):
                at, exact = _to_instant(naive, zone)
                if at <= cursor:
                    continue
                if at > MAX_TIME_US:
                    return
                yield at
                cursor = at
                if not exact:  # in a gap: go on from its end, not minute by minute
                    restarted = True
                    break
        except (OverflowError, ValueError):  # past year 9999
            return
        if not restarted:
            return  # cronsim found no match within 50 years


def _cron_backward(compiled: Compiled, at_or_before: int) -> Iterator[int]:
    """Instants <= at_or_before, decreasing, no repeats."""
    cron, zone = compiled.cron, compiled.zone
    assert cron is not None
    cursor = at_or_before
    last: int | None = None
    while True:
        wall, fold_end = _wall_clock(zone, cursor)
        end = wall.replace(microsecond=0) + _ONE_SECOND if fold_end is None else fold_end
        restarted = False
        try:
            for naive in CronSim(cron, end, reverse=True):
                at, exact = _to_instant(naive, zone)
                if at > cursor or (last is not None and at >= last):
                    continue
                if at < MIN_TIME_US:
                    return
                yield at
                last = at
                if not exact:  # in a gap: go on from before it
                    cursor = at - 1
                    restarted = True
                    break
        except (OverflowError, ValueError):  # before year 1
            return
        if not restarted:
            return


# -- the schedule's occurrences ---------------------------------------------------------


def _anchor(schedule: Schedule) -> int:
    if schedule.start is None:
        raise ScheduleError("an interval schedule needs a start (the server sets one)")
    return schedule.start


def iter_after(schedule: Schedule, after: int) -> Iterator[int]:
    """The schedule's occurrences later than `after`, earliest first, within its
    start and end (inclusive). The caller bounds how many it takes."""
    compiled = compile_schedule(schedule.expression, schedule.tz)
    end = MAX_TIME_US if schedule.end is None else min(schedule.end, MAX_TIME_US)
    if compiled.every_us:
        every, anchor = compiled.every_us, _anchor(schedule)
        k = 0 if after < anchor else (after - anchor) // every + 1
        at = anchor + k * every
        while at <= end:
            yield at
            at += every
        return
    if schedule.start is not None and schedule.start - 1 > after:
        after = schedule.start - 1
    for at in _cron_forward(compiled, after):
        if at > end:
            return
        yield at


@functools.lru_cache(maxsize=4096)
def next_after(schedule: Schedule, after: int) -> int | None:
    """The first occurrence later than `after`, or None when there is none (the end,
    or no match in cronsim's 50-year horizon). Cached: jobs that share a schedule
    (100,000 jobs `* * * * *`) share its next occurrence."""
    return next(iter_after(schedule, after), None)


def latest(schedule: Schedule, after: int, at_or_before: int, limit: int) -> list[int]:
    """Up to `limit` of the latest occurrences in (after, at_or_before], earliest first."""
    if limit <= 0 or at_or_before <= after:
        return []
    compiled = compile_schedule(schedule.expression, schedule.tz)
    low = after if schedule.start is None else max(after, schedule.start - 1)
    high = at_or_before if schedule.end is None else min(at_or_before, schedule.end)
    if high <= low:
        return []
    found: list[int] = []
    if compiled.every_us:
        every, anchor = compiled.every_us, _anchor(schedule)
        if high < anchor:
            return []
        at = anchor + (high - anchor) // every * every
        while at > low and len(found) < limit:
            found.append(at)
            at -= every
    else:
        for at in _cron_backward(compiled, high):
            if at <= low or len(found) >= limit:
                break
            found.append(at)
    found.reverse()
    return found


def count_between(schedule: Schedule, after: int, at_or_before: int, cap: int) -> int:
    """How many occurrences lie in (after, at_or_before], counting at most `cap`
    (exact for intervals)."""
    if at_or_before <= after:
        return 0
    compiled = compile_schedule(schedule.expression, schedule.tz)
    if compiled.every_us:
        low = after if schedule.start is None else max(after, schedule.start - 1)
        high = at_or_before if schedule.end is None else min(at_or_before, schedule.end)
        anchor = _anchor(schedule)
        if high < anchor or high <= low:
            return 0
        last_k = (high - anchor) // compiled.every_us
        first_k = 0 if low < anchor else (low - anchor) // compiled.every_us + 1
        return max(0, min(cap, last_k - first_k + 1))
    count = 0
    for at in iter_after(schedule, after):
        if at > at_or_before or count >= cap:
            break
        count += 1
    return count


def preview(schedule: Schedule, after: int, count: int) -> list[int]:
    """The next `count` occurrences later than `after`."""
    found = []
    for at in iter_after(schedule, after):
        found.append(at)
        if len(found) >= count:
            break
    return found
