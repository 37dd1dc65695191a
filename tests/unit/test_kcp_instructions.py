"""KCP instructions <-> core commands (protocols/kcp/instructions.py, SPEC §2)."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairoi_trio import __version__
from kairoi_trio.commands import (
    Command,
    CommandError,
    DeleteJob,
    DeleteRule,
    ErrorCode,
    GetJob,
    GetRule,
    SetJob,
    SetRule,
)
from kairoi_trio.model import (
    MAX_TIME_US,
    MICROS,
    MIN_TIME_US,
    AmqpRunner,
    HttpRunner,
    Job,
    Rule,
    ShellRunner,
    Status,
    from_datetime,
)
from kairoi_trio.protocols.kcp.instructions import (
    Answer,
    Authenticate,
    format_time,
    parse_time,
    render,
    renders_data,
    translate,
)

NOON = from_datetime(datetime(2024, 3, 1, 12, 0, 0))


def refused(args: list[str]) -> CommandError:
    with pytest.raises(CommandError) as error:
        translate(args)
    assert error.value.code is ErrorCode.INVALID_ARGUMENT
    assert error.value.message
    return error.value


# -- translate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["SET", "job.1", "2024-03-01 12:00:00"], SetJob("job.1", NOON)),
        (["SET", "job.1", "2024-03-01 12:00:00.25"], SetJob("job.1", NOON + 250_000)),
        (["SET", "j", "2024-03-01 12:00:00", "hello é"], SetJob("j", NOON, "hello é".encode())),
        (["SET", "j", "2024-03-01 12:00:00", ""], SetJob("j", NOON, b"")),
        (["GET", "job.1"], GetJob("job.1")),
        (["UNSET", "job.1"], DeleteJob("job.1")),
        (
            ["RULE", "SET", "r1", "app.", "shell", "/opt/run.sh"],
            SetRule(Rule("r1", "app.", ShellRunner("/opt/run.sh"))),
        ),
        (
            ["RULE", "SET", "r2", "mail.", "amqp", "amqp://u:p@h:5672/v", "ex", "rk"],
            SetRule(Rule("r2", "mail.", AmqpRunner("amqp://u:p@h:5672/v", "ex", "rk"))),
        ),
        (
            ["RULE", "SET", "r3", "", "http", "https://h/hook"],
            SetRule(Rule("r3", "", HttpRunner("https://h/hook"))),
        ),
        (["RULE", "GET", "r1"], GetRule("r1")),
        (["RULE", "UNSET", "r1"], DeleteRule("r1")),
        (["PING"], Answer(("PONG",))),
        (["VERSION"], Answer((__version__,))),
        (["AUTH", "tok en"], Authenticate("tok en")),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_translate_every_instruction(args: list[str], command: object) -> None:
    assert translate(args) == command


@pytest.mark.parametrize(
    "args",
    [
        ["SET"],
        ["SET", "job.1"],
        ["SET", "job.1", "2024-03-01 12:00:00", "payload", "extra"],
        ["GET"],
        ["GET", "a", "b"],
        ["UNSET"],
        ["UNSET", "a", "b"],
        ["RULE"],
        ["RULE", "LIST"],
        ["RULE", "set", "r", "p", "shell", "x"],  # instructions are case-sensitive
        ["RULE", "SET"],
        ["RULE", "SET", "r1", "app."],
        ["RULE", "SET", "r1", "app.", "shell"],
        ["RULE", "SET", "r1", "app.", "shell", "a.sh", "extra"],
        ["RULE", "SET", "r1", "app.", "amqp", "amqp://h/", "ex"],
        ["RULE", "SET", "r1", "app.", "amqp", "amqp://h/", "ex", "rk", "x"],
        ["RULE", "SET", "r1", "app.", "http"],
        ["RULE", "SET", "r1", "app.", "http", "http://a", "http://b"],
        ["RULE", "SET", "r1", "app.", "ftp", "ftp://h/"],
        ["RULE", "GET"],
        ["RULE", "GET", "a", "b"],
        ["RULE", "UNSET"],
        ["PING", "x"],
        ["VERSION", "x"],
        ["AUTH"],
        ["AUTH", "a", "b"],
        ["HELLO"],
        ["set", "job.1", "2024-03-01 12:00:00"],
    ],
    ids=lambda args: " ".join(args),
)
def test_wrong_arity_and_unknown_instructions_are_errors(args: list[str]) -> None:
    refused(args)


def test_an_unknown_runner_kind_is_named_in_the_error() -> None:
    assert "ftp" in refused(["RULE", "SET", "r1", "app.", "ftp", "x"]).message


@pytest.mark.parametrize(
    "time",
    [
        "2020-02-30 10:00:00",
        "2021-02-29 00:00:00",
        "2021-13-01 00:00:00",
        "2021-00-10 00:00:00",
        "2021-01-00 00:00:00",
        "0000-01-01 00:00:00",
        "2020-01-01 24:00:00",
        "2020-01-01 23:60:00",
        "2020-01-01 23:59:60",
        "2020-01-01",
        "2020-01-01T10:00:00",
        "2020-01-01 10:00",
        "2020-1-01 10:00:00",
        "20-01-01 10:00:00",
        "2020-01-01 10:00:00.",
        "2020-01-01 10:00:00.1234567",
        "2020-01-01 10:00:00Z",
        "2020-01-01 10:00:00 ",
        " 2020-01-01 10:00:00",
        "2020-01-01  10:00:00",
        "now",
        "",
        "２０２０-01-01 10:00:00",  # fullwidth digits: Unicode digits, not ASCII
        "2020-01-01 1\u0660:00:00",  # an Arabic-Indic zero
    ],
)
def test_invalid_times_are_errors_and_nothing_is_set(time: str) -> None:
    error = refused(["SET", "job.1", time])
    assert "time" in error.message or "date" in error.message


def test_parse_time_examples() -> None:
    assert parse_time("1970-01-01 00:00:00") == 0
    assert parse_time("1970-01-01 00:00:01") == MICROS
    assert parse_time("1969-12-31 23:59:59") == -MICROS
    assert parse_time("2020-02-29 23:59:59.999999") == (
        from_datetime(datetime(2020, 2, 29, 23, 59, 59, 999_999))
    )
    assert parse_time("2024-03-01 12:00:00.5") == NOON + 500_000
    assert parse_time("2024-03-01 12:00:00.000001") == NOON + 1
    assert parse_time("0001-01-01 00:00:00") == from_datetime(datetime(1, 1, 1))
    assert parse_time("9999-12-31 23:59:59.999999") == from_datetime(
        datetime(9999, 12, 31, 23, 59, 59, 999_999)
    )


def test_format_time_examples() -> None:
    assert format_time(0) == "1970-01-01 00:00:00"
    assert format_time(NOON) == "2024-03-01 12:00:00"  # no fraction when there is none
    assert format_time(NOON + 250_000) == "2024-03-01 12:00:00.250000"
    assert format_time(-1) == "1969-12-31 23:59:59.999999"
    assert format_time(from_datetime(datetime(999, 5, 6, 7, 8, 9))) == "0999-05-06 07:08:09"
    assert format_time(from_datetime(datetime(1, 1, 1))) == "0001-01-01 00:00:00"
    assert format_time(MAX_TIME_US) == "9999-12-31 23:59:59.999999"


def test_times_outside_the_range_are_not_formatted_but_refused() -> None:
    for us in (MIN_TIME_US - 1, MAX_TIME_US + 1):
        with pytest.raises(ValueError, match="outside the supported range"):
            format_time(us)
    assert parse_time("9999-12-31 23:59:59.999999") == MAX_TIME_US
    assert refused(["SET", "a", "0000-12-31 23:59:59"]).message == "invalid date '0000-12-31'"


def test_render_jobs_at_the_edges_of_time() -> None:
    assert render(Job("j", MIN_TIME_US, Status.FAILED)) == ("failed", "0001-01-01 00:00:00")
    assert render(Job("j", MAX_TIME_US, Status.PLANNED)) == (
        "planned",
        "9999-12-31 23:59:59.999999",
    )


def kcp_text(dt: datetime) -> str:
    text = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} {dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    return f"{text}.{dt.microsecond:06d}" if dt.microsecond else text


@settings(max_examples=500)
@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
def test_parse_and_format_time_round_trip(dt: datetime) -> None:
    us = from_datetime(dt)
    text = format_time(us)
    assert text == kcp_text(dt)
    assert parse_time(text) == us
    # a shortened fraction means the same instant
    if dt.microsecond:
        short = text.rstrip("0")
        assert parse_time(short) == us


@given(st.integers(min_value=parse_time("0001-01-01 00:00:00"), max_value=10**17))
def test_format_then_parse_is_identity_on_microseconds(us: int) -> None:
    assert parse_time(format_time(us)) == us


# -- render ------------------------------------------------------------------------------


def test_render_jobs() -> None:
    assert render(Job("j", NOON, Status.PLANNED)) == ("planned", "2024-03-01 12:00:00")
    assert render(Job("j", NOON + 7, Status.TRIGGERED)) == (
        "triggered",
        "2024-03-01 12:00:00.000007",
    )
    assert render(Job("j", NOON, Status.EXECUTED, b"hello world")) == (
        "executed",
        "2024-03-01 12:00:00",
        "hello world",
    )
    # a payload set over gRPC need not be UTF-8: rendered, not an exception
    status, time, payload = render(Job("j", NOON, Status.FAILED, b"\xff\xfeok"))
    assert (status, time) == ("failed", "2024-03-01 12:00:00")
    assert payload.endswith("ok")


def test_render_rules() -> None:
    assert render(Rule("r", "app.", ShellRunner("/opt/a.sh"))) == ("app.", "shell", "/opt/a.sh")
    assert render(Rule("r", "m.", AmqpRunner("amqp://h/", "ex", "rk"))) == (
        "m.",
        "amqp",
        "amqp://h/",
        "ex",
        "rk",
    )
    assert render(Rule("r", "", HttpRunner("http://h/x"))) == ("", "http", "http://h/x")


def test_render_round_trips_through_translate() -> None:
    for rule in [
        Rule("r", "app.", ShellRunner("/opt/a.sh")),
        Rule("r", "m.", AmqpRunner("amqp://h/", "ex", "rk")),
        Rule("r", "w.", HttpRunner("http://h/x")),
    ]:
        assert translate(["RULE", "SET", "r", *render(rule)]) == SetRule(rule)
    job = Job("j", NOON + 123, Status.PLANNED, b"data")
    _, time, payload = render(job)
    assert translate(["SET", "j", time, payload]) == SetJob("j", NOON + 123, b"data")


def test_only_gets_answer_with_data() -> None:
    assert renders_data(GetJob("a"))
    assert renders_data(GetRule("a"))
    bare: list[Command] = [SetJob("a", 0), DeleteJob("a"), SetRule(Rule("r", "", HttpRunner("x")))]
    for command in bare:
        assert not renders_data(command)
    assert render(None) == ()


def test_set_rule_word_order_of_kairois_runner_docs_is_rule_set() -> None:
    from kairoi_trio.commands import SetRule
    from kairoi_trio.model import Rule, ShellRunner

    command = translate(["SET", "RULE", "app.default.rule", "app.job.0", "shell", "script.sh"])
    assert command == SetRule(Rule("app.default.rule", "app.job.0", ShellRunner("script.sh")))
    # A job whose id is RULE is still a job.
    job = translate(["SET", "RULE", "2020-01-01 00:00:00"])
    assert isinstance(job, SetJob)  # (for mypy: a SetJob has an id)
    assert job.id == "RULE"
