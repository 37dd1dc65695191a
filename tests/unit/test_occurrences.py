"""When a schedule's occurrences fall (scheduling/occurrences.py): pure functions,
no clock. Every instant is asserted in UTC, exactly, against the rules of
docs/recurring-jobs.md: a wall-clock time in a gap runs once at the first
instant after it, one that occurs twice runs once at its first occurrence, and
intervals are exact durations that ignore daylight-saving time."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from kairoi_trio.model import MICROS, Schedule, from_datetime
from kairoi_trio.scheduling.occurrences import (
    ScheduleError,
    compile_schedule,
    count_between,
    interval_of,
    iter_after,
    latest,
    next_after,
    parse_duration,
    preview,
)

SECOND = MICROS
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return from_datetime(datetime(year, month, day, hour, minute, second, tzinfo=UTC))


def between(schedule: Schedule, after: int, at_or_before: int) -> list[int]:
    """The occurrences in (after, at_or_before], walking forward."""
    found = []
    for at in iter_after(schedule, after):
        if at > at_or_before:
            break
        found.append(at)
    return found


# The transitions used below (checked by the first test, so that a wrong date here
# cannot make the others pass or fail for the wrong reason):
# Europe/Paris 2027: 03-28 01:00Z (02:00 CET -> 03:00 CEST),
#                    10-31 01:00Z (03:00 CEST -> 02:00 CET)
# America/New_York 2027: 03-14 07:00Z (02:00 EST -> 03:00 EDT),
#                         11-07 06:00Z (02:00 EDT -> 01:00 EST)
# Australia/Lord_Howe 2026: 04-04 15:00Z (02:00 +11 -> 01:30 +10:30),
#                           10-03 15:30Z (02:00 +10:30 -> 02:30 +11)
TRANSITIONS = [
    ("Europe/Paris", utc(2027, 3, 28, 1), timedelta(hours=1), timedelta(hours=2)),
    ("Europe/Paris", utc(2027, 10, 31, 1), timedelta(hours=2), timedelta(hours=1)),
    ("America/New_York", utc(2027, 3, 14, 7), timedelta(hours=-5), timedelta(hours=-4)),
    ("America/New_York", utc(2027, 11, 7, 6), timedelta(hours=-4), timedelta(hours=-5)),
    ("Australia/Lord_Howe", utc(2026, 4, 4, 15), timedelta(hours=11), timedelta(hours=10.5)),
    ("Australia/Lord_Howe", utc(2026, 10, 3, 15, 30), timedelta(hours=10.5), timedelta(hours=11)),
]


@pytest.mark.parametrize(("tz", "at", "before", "after"), TRANSITIONS)
def test_the_transitions_the_tests_rely_on(
    tz: str, at: int, before: timedelta, after: timedelta
) -> None:
    zone = ZoneInfo(tz)
    instant = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=at)
    assert (instant - timedelta(microseconds=1)).astimezone(zone).utcoffset() == before
    assert instant.astimezone(zone).utcoffset() == after


# -- spring forward: a wall-clock time in the gap runs once, at the gap's end ----------


@pytest.mark.parametrize(
    ("tz", "after", "expected"),
    [
        # 01:00 CET, then 02:00 (in the gap) and 03:00 CEST are one instant: once
        (
            "Europe/Paris",
            utc(2027, 3, 27, 23, 30),
            [utc(2027, 3, 28, 0), utc(2027, 3, 28, 1), utc(2027, 3, 28, 2)],
        ),
        # 01:00 EST, 02:00 (gap) = 03:00 EDT once, 04:00 EDT
        (
            "America/New_York",
            utc(2027, 3, 14, 5, 30),
            [utc(2027, 3, 14, 6), utc(2027, 3, 14, 7), utc(2027, 3, 14, 8)],
        ),
        # 01:00 +10:30, 02:00 (gap) -> 02:30 +11, 03:00 +11: the 30-minute shift
        (
            "Australia/Lord_Howe",
            utc(2026, 10, 3, 14),
            [
                utc(2026, 10, 3, 14, 30),
                utc(2026, 10, 3, 15, 30),
                utc(2026, 10, 3, 16),
                utc(2026, 10, 3, 17),
            ],
        ),
    ],
)
def test_hourly_across_spring_forward(tz: str, after: int, expected: list[int]) -> None:
    assert preview(Schedule("0 * * * *", tz), after, len(expected)) == expected


@pytest.mark.parametrize(
    ("expression", "tz", "expected"),
    [
        # the documented example: 03:00 CEST (01:00 UTC) that day, 02:30 the others
        (
            "30 2 * * *",
            "Europe/Paris",
            [utc(2027, 3, 27, 1, 30), utc(2027, 3, 28, 1), utc(2027, 3, 29, 0, 30)],
        ),
        (
            "30 2 * * *",
            "America/New_York",
            [utc(2027, 3, 13, 7, 30), utc(2027, 3, 14, 7), utc(2027, 3, 15, 6, 30)],
        ),
        # the documented example: 02:15 does not exist on 2026-10-04: runs at 02:30 +11
        (
            "15 2 * * *",
            "Australia/Lord_Howe",
            [utc(2026, 10, 2, 15, 45), utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 15)],
        ),
        # 02:30 itself is the first instant after Lord Howe's gap: it exists, once
        (
            "30 2 * * *",
            "Australia/Lord_Howe",
            [utc(2026, 10, 2, 16), utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 30)],
        ),
    ],
)
def test_daily_time_in_the_gap_runs_once_at_its_end(
    expression: str, tz: str, expected: list[int]
) -> None:
    assert preview(Schedule(expression, tz), expected[0] - DAY + HOUR, 3) == expected


def test_every_minute_of_the_gap_is_one_run() -> None:
    # 02:00, 02:15, 02:30, 02:45 (none exist) and 03:00 CEST are one instant
    expected = [
        utc(2027, 3, 28, 0, 30),  # 01:30 CET
        utc(2027, 3, 28, 0, 45),
        utc(2027, 3, 28, 1),  # the gap and 03:00 CEST, once
        utc(2027, 3, 28, 1, 15),  # 03:15 CEST
    ]
    assert preview(Schedule("*/15 * * * *", "Europe/Paris"), utc(2027, 3, 28, 0, 20), 4) == (
        expected
    )


# -- fall back: a wall-clock time that occurs twice runs once, the first time ----------


@pytest.mark.parametrize(
    ("tz", "after", "expected"),
    [
        # 01:00 CEST, 02:00 CEST, (02:00 CET = 01:00Z does not run), 03:00 CET
        (
            "Europe/Paris",
            utc(2027, 10, 30, 22, 30),
            [utc(2027, 10, 30, 23), utc(2027, 10, 31, 0), utc(2027, 10, 31, 2)],
        ),
        # 00:00 EDT, 01:00 EDT, (01:00 EST = 06:00Z does not run), 02:00 EST
        (
            "America/New_York",
            utc(2027, 11, 7, 3, 30),
            [utc(2027, 11, 7, 4), utc(2027, 11, 7, 5), utc(2027, 11, 7, 7)],
        ),
        # 00:00 +11, 01:00 +11, then 01:30..02:00 repeats (no full hour in it), 02:00 +10:30
        (
            "Australia/Lord_Howe",
            utc(2026, 4, 4, 12, 30),
            [utc(2026, 4, 4, 13), utc(2026, 4, 4, 14), utc(2026, 4, 4, 15, 30)],
        ),
    ],
)
def test_hourly_across_fall_back(tz: str, after: int, expected: list[int]) -> None:
    assert preview(Schedule("0 * * * *", tz), after, len(expected)) == expected


@pytest.mark.parametrize(
    ("expression", "tz", "expected"),
    [
        # the documented example: 02:30 CEST (00:30Z), not again at 02:30 CET (01:30Z)
        (
            "30 2 * * *",
            "Europe/Paris",
            [utc(2027, 10, 30, 0, 30), utc(2027, 10, 31, 0, 30), utc(2027, 11, 1, 1, 30)],
        ),
        # New York repeats 01:00-02:00: 01:30 EDT (05:30Z), not 01:30 EST (06:30Z)
        (
            "30 1 * * *",
            "America/New_York",
            [utc(2027, 11, 6, 5, 30), utc(2027, 11, 7, 5, 30), utc(2027, 11, 8, 6, 30)],
        ),
        # 02:30 is not repeated in New York: 02:30 EST, once
        (
            "30 2 * * *",
            "America/New_York",
            [utc(2027, 11, 6, 6, 30), utc(2027, 11, 7, 7, 30), utc(2027, 11, 8, 7, 30)],
        ),
        # Lord Howe repeats 01:30-02:00: 01:45 +11 (14:45Z), not 01:45 +10:30 (15:15Z)
        (
            "45 1 * * *",
            "Australia/Lord_Howe",
            [utc(2026, 4, 3, 14, 45), utc(2026, 4, 4, 14, 45), utc(2026, 4, 5, 15, 15)],
        ),
        (
            "30 2 * * *",
            "Australia/Lord_Howe",
            [utc(2026, 4, 3, 15, 30), utc(2026, 4, 4, 16), utc(2026, 4, 5, 16)],
        ),
    ],
)
def test_daily_time_that_occurs_twice_runs_once_the_first_time(
    expression: str, tz: str, expected: list[int]
) -> None:
    assert preview(Schedule(expression, tz), expected[0] - HOUR, 3) == expected


@pytest.mark.parametrize(
    ("tz", "after", "expected"),
    [
        # 02:00..02:45 CEST, then nothing during the repeated hour, then 03:00 CET
        (
            "Europe/Paris",
            utc(2027, 10, 30, 23, 50),
            [
                utc(2027, 10, 31, 0),
                utc(2027, 10, 31, 0, 15),
                utc(2027, 10, 31, 0, 30),
                utc(2027, 10, 31, 0, 45),
                utc(2027, 10, 31, 2),
                utc(2027, 10, 31, 2, 15),
            ],
        ),
        (
            "America/New_York",
            utc(2027, 11, 7, 4, 50),
            [
                utc(2027, 11, 7, 5),
                utc(2027, 11, 7, 5, 15),
                utc(2027, 11, 7, 5, 30),
                utc(2027, 11, 7, 5, 45),
                utc(2027, 11, 7, 7),
                utc(2027, 11, 7, 7, 15),
            ],
        ),
        # 01:30 and 01:45 +11, then the repeated half hour is silent, then 02:00 +10:30
        (
            "Australia/Lord_Howe",
            utc(2026, 4, 4, 14, 20),
            [
                utc(2026, 4, 4, 14, 30),
                utc(2026, 4, 4, 14, 45),
                utc(2026, 4, 4, 15, 30),
                utc(2026, 4, 4, 15, 45),
            ],
        ),
    ],
)
def test_quarter_hours_do_not_run_again_in_the_repeated_hour(
    tz: str, after: int, expected: list[int]
) -> None:
    assert preview(Schedule("*/15 * * * *", tz), after, len(expected)) == expected


def test_starting_inside_the_repeated_hour_does_not_rerun_its_wall_clock_times() -> None:
    # 01:20Z is 02:20 CET, the second pass: 02:30 and 02:45 already ran (CEST)
    schedule = Schedule("*/15 * * * *", "Europe/Paris")
    assert next_after(schedule, utc(2027, 10, 31, 1, 20)) == utc(2027, 10, 31, 2)
    assert next_after(Schedule("30 2 * * *", "Europe/Paris"), utc(2027, 10, 31, 1, 20)) == (
        utc(2027, 11, 1, 1, 30)
    )


def _simple_match(expression: str, wall: datetime) -> bool:
    """`M H * * *` with M, H each `*`, `*/n` or a comma list: enough for an oracle."""

    def field(text: str, value: int) -> bool:
        if text == "*":
            return True
        if text.startswith("*/"):
            return value % int(text[2:]) == 0
        return value in {int(part) for part in text.split(",")}

    minute, hour, *rest = expression.split()
    assert rest == ["*", "*", "*"]
    return field(minute, wall.minute) and field(hour, wall.hour)


def _oracle(expression: str, tz: str, after: int, at_or_before: int) -> list[int]:
    """The rule, brute force: an occurrence is the first instant (minute by minute)
    at which the zone's wall clock reaches a matching wall-clock time it has not
    reached before. That is the time itself when it exists once, its first pass
    when it exists twice, and the gap's end when it does not exist."""
    zone = ZoneInfo(tz)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    found: list[int] = []
    at = after - after % MINUTE
    reached = (epoch + timedelta(microseconds=at)).astimezone(zone).replace(tzinfo=None)
    while True:
        at += MINUTE
        if at > at_or_before:
            return found
        wall = (epoch + timedelta(microseconds=at)).astimezone(zone).replace(tzinfo=None)
        if wall <= reached:
            continue  # the second pass of a repeated hour
        candidate = reached + timedelta(minutes=1)
        while candidate <= wall:
            if _simple_match(expression, candidate):
                found.append(at)
                break
            candidate += timedelta(minutes=1)
        reached = wall


@pytest.mark.parametrize(
    "expression", ["0 * * * *", "30 2 * * *", "*/15 * * * *", "45 1 * * *", "7,37 * * * *"]
)
@pytest.mark.parametrize(("tz", "transition"), [(tz, at) for tz, at, _, _ in TRANSITIONS])
def test_cron_around_transitions_matches_a_brute_force_oracle(
    expression: str, tz: str, transition: int
) -> None:
    after, at_or_before = transition - 26 * HOUR, transition + 26 * HOUR
    expected = _oracle(expression, tz, after, at_or_before)
    assert expected  # the window is long enough for every expression here
    assert between(Schedule(expression, tz), after, at_or_before) == expected
    # walking back gives the same instants
    assert latest(Schedule(expression, tz), after, at_or_before, 10_000) == expected


# -- intervals: exact durations, whatever the zone -------------------------------------


def test_every_hour_is_exactly_3600_s_across_fall_back() -> None:
    # the Paris day of 2027-10-31 lasts 25 hours: 00:00 CEST (22:00Z) to 00:00 CET (23:00Z)
    day_start, next_day = utc(2027, 10, 30, 22), utc(2027, 10, 31, 23)
    schedule = Schedule("every 1h", "Europe/Paris", start=day_start)
    runs = between(schedule, day_start - 1, next_day - 1)
    assert runs == [day_start + k * HOUR for k in range(25)]
    assert {b - a for a, b in zip(runs, runs[1:], strict=False)} == {3600 * SECOND}
    assert count_between(schedule, day_start - 1, next_day - 1, 1000) == 25
    # a cron schedule of every full hour runs 24 times that day (02:00 once)
    assert len(between(Schedule("0 * * * *", "Europe/Paris"), day_start - 1, next_day - 1)) == 24


def test_every_hour_is_exactly_3600_s_across_spring_forward() -> None:
    # the Paris day of 2027-03-28 lasts 23 hours: 00:00 CET (23:00Z) to 00:00 CEST (22:00Z)
    day_start, next_day = utc(2027, 3, 27, 23), utc(2027, 3, 28, 22)
    schedule = Schedule("PT1H", "Europe/Paris", start=day_start)
    assert between(schedule, day_start - 1, next_day - 1) == [
        day_start + k * HOUR for k in range(23)
    ]


def test_an_interval_ignores_the_zone() -> None:
    start = utc(2027, 10, 30, 0, 7, 30)
    paris = preview(Schedule("every 90m", "Europe/Paris", start=start), start - 1, 40)
    assert paris == preview(Schedule("every 90m", "UTC", start=start), start - 1, 40)
    assert paris == [start + k * 90 * MINUTE for k in range(40)]


def test_interval_occurrences_are_start_plus_k_intervals() -> None:
    start = utc(2027, 1, 1, 0, 0, 0)
    schedule = Schedule("every 15m", start=start)
    assert next_after(schedule, start - 1) == start
    assert next_after(schedule, start) == start + 15 * MINUTE
    assert next_after(schedule, start + 20 * MINUTE) == start + 30 * MINUTE
    assert next_after(schedule, start - 10 * DAY) == start  # nothing before the start


def test_an_interval_needs_a_start() -> None:
    with pytest.raises(ScheduleError, match="start"):
        next_after(Schedule("every 15m"), utc(2027, 1, 1))


# -- calendars -------------------------------------------------------------------------


def test_february_29_runs_only_in_leap_years() -> None:
    runs = preview(Schedule("0 0 29 2 *"), utc(2025, 1, 1), 3)
    assert runs == [utc(2028, 2, 29), utc(2032, 2, 29), utc(2036, 2, 29)]
    assert preview(Schedule("0 0 29 2 *"), utc(2099, 3, 1), 1) == [utc(2104, 2, 29)]  # 2100 is not


def test_the_31st_skips_the_short_months() -> None:
    runs = preview(Schedule("0 0 31 * *"), utc(2027, 1, 1), 7)
    assert runs == [
        utc(2027, 1, 31),
        utc(2027, 3, 31),
        utc(2027, 5, 31),
        utc(2027, 7, 31),
        utc(2027, 8, 31),
        utc(2027, 10, 31),
        utc(2027, 12, 31),
    ]


@pytest.mark.parametrize(
    ("macro", "after", "expected"),
    [
        # 2027-01-03 is a Sunday
        ("@weekly", utc(2027, 1, 1, 5), [utc(2027, 1, 3), utc(2027, 1, 10), utc(2027, 1, 17)]),
        ("@yearly", utc(2027, 6, 1), [utc(2028, 1, 1), utc(2029, 1, 1), utc(2030, 1, 1)]),
        ("@annually", utc(2027, 6, 1), [utc(2028, 1, 1), utc(2029, 1, 1), utc(2030, 1, 1)]),
        ("@monthly", utc(2027, 1, 15), [utc(2027, 2, 1), utc(2027, 3, 1), utc(2027, 4, 1)]),
        ("@daily", utc(2027, 1, 1, 5), [utc(2027, 1, 2), utc(2027, 1, 3), utc(2027, 1, 4)]),
        ("@midnight", utc(2027, 1, 1, 5), [utc(2027, 1, 2), utc(2027, 1, 3), utc(2027, 1, 4)]),
        (
            "@hourly",
            utc(2027, 1, 1, 5, 1),
            [utc(2027, 1, 1, 6), utc(2027, 1, 1, 7), utc(2027, 1, 1, 8)],
        ),
    ],
)
def test_macros(macro: str, after: int, expected: list[int]) -> None:
    assert preview(Schedule(macro), after, 3) == expected


def test_weekly_is_sunday_midnight_in_the_schedule_zone() -> None:
    # Sunday 00:00 in New York (EST) is 05:00Z
    assert preview(Schedule("@weekly", "America/New_York"), utc(2027, 1, 1), 2) == [
        utc(2027, 1, 3, 5),
        utc(2027, 1, 10, 5),
    ]


def test_six_fields_lead_with_seconds() -> None:
    start = utc(2027, 1, 1)
    assert preview(Schedule("*/10 * * * * *"), start, 7) == [
        start + k * 10 * SECOND for k in range(1, 8)
    ]
    # second 15 of minute 30 of hour 2: the seconds field leads, it is not the last one
    assert preview(Schedule("15 30 2 * * *"), start, 2) == [
        utc(2027, 1, 1, 2, 30, 15),
        utc(2027, 1, 2, 2, 30, 15),
    ]


def test_seconds_across_the_gap_run_once_at_its_end() -> None:
    # every second of 02:00:00..02:59:59 on 2027-03-28 in Paris is in the gap
    schedule = Schedule("*/20 * * * * *", "Europe/Paris")
    gap_end = utc(2027, 3, 28, 1)
    assert preview(schedule, gap_end - 30 * SECOND, 4) == [
        gap_end - 20 * SECOND,
        gap_end,
        gap_end + 20 * SECOND,
        gap_end + 40 * SECOND,
    ]


# -- start and end ---------------------------------------------------------------------


def test_start_and_end_are_inclusive_for_cron() -> None:
    start, end = utc(2027, 1, 1, 10), utc(2027, 1, 1, 13)
    schedule = Schedule("0 * * * *", start=start, end=end)
    assert preview(schedule, utc(2026, 1, 1), 100) == [
        utc(2027, 1, 1, 10),
        utc(2027, 1, 1, 11),
        utc(2027, 1, 1, 12),
        utc(2027, 1, 1, 13),
    ]
    assert next_after(schedule, end) is None
    # bounds between occurrences: the first one at or after start, the last at or before end
    narrower = Schedule("0 * * * *", start=start + 1, end=end - 1)
    assert preview(narrower, 0, 100) == [utc(2027, 1, 1, 11), utc(2027, 1, 1, 12)]


def test_start_and_end_are_inclusive_for_intervals() -> None:
    start = utc(2027, 1, 1)
    schedule = Schedule("every 1h", start=start, end=start + 3 * HOUR)
    assert preview(schedule, 0, 100) == [start + k * HOUR for k in range(4)]
    assert latest(schedule, 0, start + 10 * HOUR, 100) == [start + k * HOUR for k in range(4)]
    assert count_between(schedule, 0, start + 10 * HOUR, 100) == 4
    assert next_after(replace(schedule, end=start + 3 * HOUR - 1), start + 2 * HOUR) is None


def test_latest_and_count_respect_start_and_end_for_cron() -> None:
    schedule = Schedule("0 * * * *", start=utc(2027, 1, 1, 10), end=utc(2027, 1, 1, 13))
    assert latest(schedule, 0, utc(2027, 1, 2), 100) == [
        utc(2027, 1, 1, 10),
        utc(2027, 1, 1, 11),
        utc(2027, 1, 1, 12),
        utc(2027, 1, 1, 13),
    ]
    assert count_between(schedule, 0, utc(2027, 1, 2), 100) == 4


# -- latest and count_between ----------------------------------------------------------


def test_latest_takes_the_latest_ones_in_order_bounds_as_documented() -> None:
    schedule = Schedule("0 * * * *")
    # (after, at_or_before]: after excluded, at_or_before included
    assert latest(schedule, utc(2027, 1, 1, 0), utc(2027, 1, 1, 5), 3) == [
        utc(2027, 1, 1, 3),
        utc(2027, 1, 1, 4),
        utc(2027, 1, 1, 5),
    ]
    assert latest(schedule, utc(2027, 1, 1, 0), utc(2027, 1, 1, 5), 100) == [
        utc(2027, 1, 1, h) for h in range(1, 6)
    ]
    assert latest(schedule, utc(2027, 1, 1, 0), utc(2027, 1, 1, 0, 59), 10) == []
    assert latest(schedule, utc(2027, 1, 1, 5), utc(2027, 1, 1, 0), 10) == []
    assert latest(schedule, utc(2027, 1, 1, 0), utc(2027, 1, 1, 5), 0) == []


def test_latest_walks_back_across_the_gap_once() -> None:
    schedule = Schedule("*/15 * * * *", "Europe/Paris")
    assert latest(schedule, utc(2027, 3, 28, 0), utc(2027, 3, 28, 1, 40), 100) == [
        utc(2027, 3, 28, 0, 15),
        utc(2027, 3, 28, 0, 30),
        utc(2027, 3, 28, 0, 45),
        utc(2027, 3, 28, 1),  # 02:00..02:45 (gap) and 03:00 CEST: one instant
        utc(2027, 3, 28, 1, 15),
        utc(2027, 3, 28, 1, 30),
    ]
    hourly = Schedule("0 * * * *", "Europe/Paris")
    assert latest(hourly, utc(2027, 3, 27, 23, 30), utc(2027, 3, 28, 2), 2) == [
        utc(2027, 3, 28, 1),
        utc(2027, 3, 28, 2),
    ]
    assert latest(hourly, utc(2027, 3, 27, 23, 30), utc(2027, 3, 28, 2), 100) == [
        utc(2027, 3, 28, 0),
        utc(2027, 3, 28, 1),
        utc(2027, 3, 28, 2),
    ]


def test_latest_walks_back_across_the_fold_with_no_repeated_instant() -> None:
    schedule = Schedule("*/15 * * * *", "Europe/Paris")
    first_pass = [utc(2027, 10, 31, 0, m) for m in (0, 15, 30, 45)]  # 02:00..02:45 CEST
    after = utc(2027, 10, 30, 23, 50)
    assert latest(schedule, after, utc(2027, 10, 31, 2, 40), 100) == [
        *first_pass,
        utc(2027, 10, 31, 2),  # 03:00 CET
        utc(2027, 10, 31, 2, 15),
        utc(2027, 10, 31, 2, 30),
    ]
    # from inside the second pass (02:40 CET): nothing of the repeated hour again
    assert latest(schedule, after, utc(2027, 10, 31, 1, 40), 100) == first_pass
    assert latest(schedule, after, utc(2027, 10, 31, 1, 40), 1) == [utc(2027, 10, 31, 0, 45)]
    # a daily 02:30 across the fold: the CEST one, once
    daily = Schedule("30 2 * * *", "Europe/Paris")
    assert latest(daily, utc(2027, 10, 29, 12), utc(2027, 11, 1, 12), 100) == [
        utc(2027, 10, 30, 0, 30),
        utc(2027, 10, 31, 0, 30),
        utc(2027, 11, 1, 1, 30),
    ]


def test_count_between_is_capped_for_cron() -> None:
    schedule = Schedule("* * * * *")
    assert count_between(schedule, utc(2027, 1, 1), utc(2027, 1, 1, 1), 1000) == 60
    assert count_between(schedule, utc(2027, 1, 1), utc(2027, 1, 1, 1), 7) == 7
    assert count_between(schedule, utc(2027, 1, 1, 1), utc(2027, 1, 1), 7) == 0


def test_count_between_is_exact_for_intervals() -> None:
    start = utc(2027, 1, 1)
    schedule = Schedule("every 1s", start=start)
    year = 365 * DAY
    # (start - 1, start + year]: start itself and each second of the year
    assert count_between(schedule, start - 1, start + year, 10**9) == 365 * 86_400 + 1
    assert count_between(schedule, start, start + year, 10**9) == 365 * 86_400
    assert count_between(schedule, start, start + year, 1000) == 1000
    assert count_between(schedule, start + 500_000, start + 3 * SECOND, 100) == 3  # 1s, 2s, 3s
    assert count_between(schedule, start - DAY, start - 1, 100) == 0


def test_a_per_second_schedule_over_a_year_takes_bounded_work() -> None:
    schedule = Schedule("* * * * * *", "Europe/Paris")
    after, now = utc(2027, 1, 1), utc(2028, 1, 1)
    assert count_between(schedule, after, now, 1000) == 1000
    missed = latest(schedule, after, now, 100)
    assert missed == [now - k * SECOND for k in range(99, -1, -1)]


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", "Bad minute"),
        ("* 24 * * *", "Bad hour"),
        ("a b c d e", "bad cron expression 'a b c d e'"),
        ("* * * *", "5 fields"),
        ("* * * * * * *", "5 fields"),
        ("", "5 fields"),
        ("0 0 30 2 *", "bad cron expression"),  # can never match
        ("@fortnightly", "unknown macro '@fortnightly'"),
        ("every", "every <duration>"),
        ("every15m", "every <duration>"),
        ("every 0s", "at least 1 second"),
        ("PT0.5S", "at least 1 second"),
        ("every 1w", "'1w' is not a duration"),
        ("every 1.5h", "is not a duration"),
        ("every -1h", "is not a duration"),
        ("P1Y", "years and months have no fixed length"),
        ("P1M", "years and months have no fixed length"),
        ("P1Y2M3DT4H", "years and months have no fixed length"),
        ("every P1M", "years and months have no fixed length"),
        ("P", "is not a duration"),
        ("PT", "is not a duration"),
        ("P1DT", "is not a duration"),
    ],
)
def test_bad_expressions_are_refused_with_the_reason(expression: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=re.escape(message)):
        compile_schedule(expression, "UTC")


def test_intervals_are_bounded_by_100_years() -> None:
    assert compile_schedule("every 36500d", "UTC").every_us == 36_500 * DAY
    with pytest.raises(ScheduleError, match="at most 100 years"):
        compile_schedule("every 36501d", "UTC")
    with pytest.raises(ScheduleError, match="at most 64 characters"):
        parse_duration("1" * 5000 + "s")


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "europe/paris", "+02:00", "../etc/passwd"])
def test_unknown_zones_are_refused(tz: str) -> None:
    with pytest.raises(ScheduleError, match="unknown time zone"):
        compile_schedule("0 * * * *", tz)


@pytest.mark.parametrize("tz", ["UTC", "Etc/UTC", "Europe/Paris", "Australia/Lord_Howe"])
def test_known_zones_are_accepted(tz: str) -> None:
    assert compile_schedule("0 * * * *", tz).cron == "0 * * * *"


def test_a_bad_schedule_raises_when_evaluated() -> None:
    with pytest.raises(ScheduleError):
        next_after(Schedule("0 0 30 2 *"), utc(2027, 1, 1))
    with pytest.raises(ScheduleError):
        latest(Schedule("0 * * * *", "Nowhere/City"), 0, utc(2027, 1, 1), 1)


# -- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("90s", 90 * SECOND),
        ("15m", 15 * MINUTE),
        ("2h", 2 * HOUR),
        ("1d", DAY),
        ("1h30m", 90 * MINUTE),
        ("1d2h3m4s", DAY + 2 * HOUR + 3 * MINUTE + 4 * SECOND),
        (" 15m ", 15 * MINUTE),
        ("15M", 15 * MINUTE),
        ("PT15M", 15 * MINUTE),
        ("pt15m", 15 * MINUTE),
        ("P1D", DAY),
        ("P1W", 7 * DAY),
        ("P1DT2H", 26 * HOUR),
        ("PT1H30M", 90 * MINUTE),
        ("PT0.5S", 500_000),
        ("PT1,25S", 1_250_000),
        ("PT0.000001S", 1),
    ],
)
def test_parse_duration_forms(text: str, micros: int) -> None:
    assert parse_duration(text) == micros


@pytest.mark.parametrize("text", ["", "15", "m", "15 m", "1.5h", "1m30h", "P1.5D", "-1h", "1y"])
def test_parse_duration_refusals(text: str) -> None:
    with pytest.raises(ScheduleError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["P1Y", "P2M", "P1Y1D", "P1MT1M"])
def test_iso_years_and_months_are_refused(text: str) -> None:
    with pytest.raises(ScheduleError, match="years and months have no fixed length"):
        parse_duration(text)


def test_iso_minutes_are_not_months() -> None:
    assert parse_duration("PT1M") == MINUTE


def test_interval_of_tells_intervals_from_cron() -> None:
    assert interval_of("every 15m") == 15 * MINUTE
    assert interval_of("EVERY 2h") == 2 * HOUR
    assert interval_of("PT15M") == 15 * MINUTE
    assert interval_of("*/15 * * * *") is None
    assert interval_of("@hourly") is None
    assert compile_schedule("every 1d", "Europe/Paris").every_us == DAY
    assert compile_schedule("every 1d", "Europe/Paris").cron is None
