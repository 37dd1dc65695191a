"""model.py: the time range, the one time formatter and the retry arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kairoi_trio.model import (
    MAX_TIME_US,
    MICROS,
    MIN_TIME_US,
    RulePolicy,
    check_time,
    format_time,
    from_datetime,
    to_datetime,
)


def test_the_range_is_years_0001_to_9999() -> None:
    assert to_datetime(MIN_TIME_US) == datetime(1, 1, 1, tzinfo=UTC)
    assert to_datetime(MAX_TIME_US) == datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert from_datetime(datetime(1, 1, 1)) == MIN_TIME_US


def test_format_time_writes_four_digit_years_at_both_edges() -> None:
    # strftime("%Y") writes year 1 as "1" on Linux: the formatter must not.
    assert format_time(MIN_TIME_US) == "0001-01-01T00:00:00.000000Z"
    assert format_time(MAX_TIME_US) == "9999-12-31T23:59:59.999999Z"
    assert format_time(from_datetime(datetime(999, 5, 6, 7, 8, 9))) == "0999-05-06T07:08:09.000000Z"
    assert format_time(-1) == "1969-12-31T23:59:59.999999Z"


def test_format_time_in_kcp_form() -> None:
    assert format_time(0, sep=" ", zone="", fraction=False) == "1970-01-01 00:00:00"
    assert format_time(250_000, sep=" ", zone="", fraction=False) == "1970-01-01 00:00:00.250000"
    assert format_time(MIN_TIME_US, sep=" ", zone="", fraction=False) == "0001-01-01 00:00:00"


@pytest.mark.parametrize("us", [MIN_TIME_US - 1, MAX_TIME_US + 1, 10**30, -(10**30)])
def test_times_outside_the_range_are_a_clear_value_error(us: int) -> None:
    with pytest.raises(ValueError, match="outside the supported range 0001-01-01 to 9999-12-31"):
        format_time(us)
    with pytest.raises(ValueError, match="outside the supported range"):
        to_datetime(us)
    with pytest.raises(ValueError, match="execute_at is outside"):
        check_time(us, "execute_at")


@given(st.integers(MIN_TIME_US, MAX_TIME_US))
def test_format_time_is_rfc3339_and_agrees_with_datetime(us: int) -> None:
    text = format_time(us)
    assert len(text) == 27 and text[4] == "-" and text[10] == "T" and text.endswith("Z")
    assert datetime.fromisoformat(text) == to_datetime(us)


@pytest.mark.parametrize("attempt", [1, 2, 1024, 1025, 1026, 10**6, 10**30])
def test_retry_delay_never_overflows(attempt: int) -> None:
    # The issue: max_attempts = 1026 with zero backoff raised OverflowError at 1025.
    assert RulePolicy(backoff_initial_s=0, backoff_max_s=0).retry_delay_us(attempt) == 0
    expected_s = (
        2 ** (attempt - 1) if attempt < 10 else 300
    )  # default backoff: 1 s doubling, 300 s cap
    assert RulePolicy().retry_delay_us(attempt) == expected_s * MICROS


def test_retry_delay_doubles_up_to_the_cap() -> None:
    policy = RulePolicy(backoff_initial_s=0.5, backoff_max_s=3)
    assert [policy.retry_delay_us(n) for n in (1, 2, 3, 4)] == [
        500_000,
        1_000_000,
        2_000_000,
        3_000_000,
    ]


@pytest.mark.parametrize(
    "policy",
    [
        RulePolicy(backoff_initial_s=1e308, backoff_max_s=1e308),
        RulePolicy(backoff_initial_s=1, backoff_max_s=float("inf")),
        RulePolicy(backoff_max_s=float("nan")),
        RulePolicy(backoff_initial_s=-1, backoff_max_s=-1),
    ],
)
def test_an_unvalidated_policy_gives_a_value_error_not_an_overflow(policy: RulePolicy) -> None:
    with pytest.raises(ValueError, match="retry delay .* is out of range"):
        policy.retry_delay_us(2000)
