"""KCP SCHEDULE and the GET of a recurring job (protocols/kcp/instructions.py).

What a client relies on: every option reaches the ScheduleJob, every mistake is an
ERROR naming it, quoting works through the real codec, SCHEDULE answers the next
time, and GET of a one-shot job is byte for byte what Kairoi clients parse.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kairoi_trio.commands import (
    Command,
    CommandError,
    ErrorCode,
    GetJob,
    ScheduleJob,
    SetJob,
)
from kairoi_trio.model import (
    MICROS,
    Job,
    Misfire,
    Overlap,
    Recurrence,
    Schedule,
    Status,
    from_datetime,
)
from kairoi_trio.protocols.kcp.codec import KcpParser, Message, encode_message, ok
from kairoi_trio.protocols.kcp.instructions import (
    Answer,
    Authenticate,
    format_duration,
    render,
    renders_data,
    translate,
)
from kairoi_trio.scheduling.occurrences import parse_duration

NOON = from_datetime(datetime(2026, 12, 1, 12, 0, 0))
NINE = from_datetime(datetime(2026, 12, 1, 9, 0, 0))
NEW_YEAR = from_datetime(datetime(2027, 1, 1, 0, 0, 0))


def refused(*args: str) -> str:
    """The ERROR reason of a request that must not reach the actor."""
    with pytest.raises(CommandError) as error:
        translate(list(args))
    assert error.value.code is ErrorCode.INVALID_ARGUMENT
    return error.value.message


def over_the_wire(request: bytes) -> list[str]:
    """Parse one request line with the server's parser; its arguments after the id."""
    parser = KcpParser()
    parser.feed(request)
    (message,) = parser.events()
    assert isinstance(message, Message)
    return message.args


# -- translate ---------------------------------------------------------------------------


def test_defaults_are_utc_coalesce_skip_and_no_payload() -> None:
    assert translate(["SCHEDULE", "app.report", "0 9 * * 1-5"]) == ScheduleJob(
        "app.report", Schedule("0 9 * * 1-5"), b""
    )


def test_every_option_reaches_the_schedule() -> None:
    command = translate(
        [
            "SCHEDULE",
            "app.report",
            "0 9 * * 1-5",
            "tz=Europe/Paris",
            "start=2026-12-01 09:00:00",
            "end=2027-01-01 00:00:00",
            "max_runs=10",
            "jitter=90s",
            "misfire=all",
            "catchup_window=1h30m",
            "overlap=buffer_one",
            "payload=hello é=x",
        ]
    )
    assert command == ScheduleJob(
        "app.report",
        Schedule(
            "0 9 * * 1-5",
            tz="Europe/Paris",
            start=NINE,
            end=NEW_YEAR,
            max_runs=10,
            jitter_us=90 * MICROS,
            misfire=Misfire.ALL,
            catchup_window_us=90 * 60 * MICROS,
            overlap=Overlap.BUFFER_ONE,
        ),
        "hello é=x".encode(),
    )


@pytest.mark.parametrize(
    "expression",
    [
        "*/5 * * * *",
        "30 */5 * * * *",  # leading seconds
        "@yearly",
        "@annually",
        "@monthly",
        "@weekly",
        "@daily",
        "@midnight",
        "@hourly",
        "every 90s",
        "every 15m",
        "every 2h",
        "every 1d",
        "every 1h30m",
        "PT15M",
    ],
)
def test_schedule_forms_are_accepted_as_given(expression: str) -> None:
    command = translate(["SCHEDULE", "j", expression])
    assert isinstance(command, ScheduleJob)
    assert command.schedule.expression == expression


def test_option_values_in_every_form() -> None:
    def schedule(*options: str) -> Schedule:
        command = translate(["SCHEDULE", "j", "@daily", *options])
        assert isinstance(command, ScheduleJob)
        return command.schedule

    assert schedule("misfire=coalesce").misfire is Misfire.COALESCE
    assert schedule("misfire=skip").misfire is Misfire.SKIP
    assert schedule("overlap=skip").overlap is Overlap.SKIP
    assert schedule("jitter=PT0.5S").jitter_us == 500_000
    assert schedule("jitter=0s").jitter_us == 0
    assert schedule("catchup_window=1d").catchup_window_us == 86_400 * MICROS
    assert schedule("start=2026-12-01 09:00:00.25").start == NINE + 250_000
    assert schedule("max_runs=1").max_runs == 1
    assert schedule("tz=America/New_York").tz == "America/New_York"
    # options in any order; payload may be empty
    command = translate(["SCHEDULE", "j", "@daily", "payload=", "max_runs=3"])
    assert isinstance(command, ScheduleJob)
    assert command.payload == b"" and command.schedule.max_runs == 3


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["SCHEDULE"], "SCHEDULE takes <job_id> <schedule> [<option>=<value> ...]"),
        (["SCHEDULE", "j"], "SCHEDULE takes <job_id> <schedule> [<option>=<value> ...]"),
        (
            ["SCHEDULE", "j", "@daily", "color=red"],
            "SCHEDULE: unknown option 'color' (options: tz, start, end, max_runs, jitter, "
            "misfire, catchup_window, overlap, payload)",
        ),
        (["SCHEDULE", "j", "@daily", "tz=UTC", "tz=UTC"], "SCHEDULE: option tz is given twice"),
        (["SCHEDULE", "j", "@daily", "tz="], "SCHEDULE option tz needs a value: tz=<value>"),
        (
            ["SCHEDULE", "j", "@daily", "misfire=later"],
            "SCHEDULE option misfire must be coalesce, all or skip, not 'later'",
        ),
        (
            ["SCHEDULE", "j", "@daily", "overlap=queue"],
            "SCHEDULE option overlap must be skip or buffer_one, not 'queue'",
        ),
        (
            ["SCHEDULE", "j", "@daily", "max_runs=0"],
            "SCHEDULE option max_runs must be a positive integer, not '0'",
        ),
        (
            ["SCHEDULE", "j", "@daily", "max_runs=-1"],
            "SCHEDULE option max_runs must be a positive integer, not '-1'",
        ),
        (
            ["SCHEDULE", "j", "@daily", "max_runs=1e3"],
            "SCHEDULE option max_runs must be a positive integer, not '1e3'",
        ),
        (
            ["SCHEDULE", "j", "@daily", "jitter=soon"],
            "SCHEDULE option jitter: 'soon' is not a duration "
            "(examples: 90s, 15m, 2h, 1d, 1h30m, PT15M)",
        ),
        (
            ["SCHEDULE", "j", "@daily", "catchup_window=P1M"],
            "SCHEDULE option catchup_window: 'P1M': years and months have no fixed length; "
            "use days, or a cron expression",
        ),
    ],
)
def test_syntax_errors_name_the_problem(args: list[str], reason: str) -> None:
    assert refused(*args) == reason


def test_a_time_cut_by_a_missing_quote_says_to_quote_the_option() -> None:
    # `start=2026-12-01 09:00:00` sent unquoted arrives as two arguments
    assert refused("SCHEDULE", "j", "@daily", "start=2026-12-01", "09:00:00") == (
        "SCHEDULE: '09:00:00' is not an option <name>=<value>; a time holds a space: "
        'quote the whole option, "start=2026-12-01 09:00:00"'
    )
    reason = refused("SCHEDULE", "j", "@daily", "end=2026-12-01")
    assert reason.startswith("SCHEDULE option end: invalid time '2026-12-01'")
    assert '(quote the whole option: "end=2026-12-01 09:00:00")' in reason
    assert "invalid time '2026-13-01 09:00:00'" in refused(
        "SCHEDULE", "j", "@daily", "end=2026-13-01 09:00:00"
    )


def test_an_unquoted_schedule_says_to_quote_it() -> None:
    # `SCHEDULE j */5 * * * *` sent unquoted: "*" is not an option
    reason = refused("SCHEDULE", "j", "*/5", "*", "*", "*", "*")
    assert reason.startswith("SCHEDULE: '*' is not an option <name>=<value>")
    assert "quote a schedule that contains spaces" in reason
    assert "'15m' is not an option" in refused("SCHEDULE", "j", "every", "15m")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["SCHEDULE", "j", "0 0 * *"], "is not a schedule: a cron expression has 5 fields"),
        (["SCHEDULE", "j", "61 * * * *"], "bad cron expression '61 * * * *'"),
        (["SCHEDULE", "j", "@fortnightly"], "unknown macro '@fortnightly'"),
        (["SCHEDULE", "j", "every 0s"], "the interval must be at least 1 second"),
        (["SCHEDULE", "j", ""], "'' is not a schedule"),
        (["SCHEDULE", "j", "@daily", "tz=Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_bad_expressions_and_zones_answer_the_schedule_error(args: list[str], reason: str) -> None:
    assert reason in refused(*args)


def test_values_past_any_bound_are_refused_not_crashed() -> None:
    huge = "9" * 5000
    assert "max_runs must be a positive integer" in refused(
        "SCHEDULE", "j", "@daily", f"max_runs={huge}"
    )
    assert "a duration is at most 64 characters" in refused(
        "SCHEDULE", "j", "@daily", f"jitter={huge}s"
    )
    assert "a duration is at most 64 characters" in refused("SCHEDULE", "j", f"every {huge}s")
    # the value quoted back is cut
    assert len(refused("SCHEDULE", "j", "@daily", f"misfire={huge}")) < 200


# -- quoting through the real codec --------------------------------------------------------


def test_quoted_schedule_and_options_round_trip_through_the_codec() -> None:
    args = [
        "SCHEDULE",
        "app.my report",
        "0 9 * * 1-5",
        "tz=Europe/Paris",
        "start=2026-12-01 09:00:00",
        'payload=say "hi"\nbye',
    ]
    wire = encode_message("7", args)
    assert wire == (
        b'7 SCHEDULE "app.my report" "0 9 * * 1-5" tz=Europe/Paris '
        b'"start=2026-12-01 09:00:00" "payload=say \\"hi\\"\nbye"\n'
    )
    assert over_the_wire(wire) == args
    command = translate(over_the_wire(wire))
    assert command == ScheduleJob(
        "app.my report",
        Schedule("0 9 * * 1-5", tz="Europe/Paris", start=NINE),
        b'say "hi"\nbye',
    )


def test_the_documented_request_lines_parse() -> None:
    lines = [
        b'1 SCHEDULE app.report "0 9 * * 1-5" tz=Europe/Paris misfire=skip\n',
        b'2 SCHEDULE app.poll "every 15m" jitter=30s "start=2026-12-01 09:00:00"\n',
        b"3 SCHEDULE app.sync PT15M overlap=buffer_one max_runs=100 payload=full\n",
    ]
    for line in lines:
        assert isinstance(translate(over_the_wire(line)), ScheduleJob), line


# -- answers -------------------------------------------------------------------------------


def recurring(**changes: object) -> Job:
    schedule = Schedule("0 12 * * *", tz="Europe/Paris")
    recurrence = Recurrence(schedule, nominal=NOON, runs=3, skipped=1)
    fields: dict[str, object] = {
        "id": "app.report",
        "execute_at": NOON + 1_500_000,
        "status": Status.PLANNED,
        "payload": b"",
        "recurrence": recurrence,
    }
    fields.update(changes)
    return Job(**fields)  # type: ignore[arg-type]


def command_of(args: list[str]) -> Command:
    """translate() of a request that is a command (neither an answer nor AUTH)."""
    command = translate(args)
    assert not isinstance(command, Answer | Authenticate), command
    return command


def test_schedule_answers_the_next_time_only() -> None:
    command = command_of(["SCHEDULE", "app.report", "0 12 * * *", "payload=x"])
    assert renders_data(command)
    job = recurring(payload=b"x")
    assert render(job, command) == ("2026-12-01 12:00:01.500000",)
    assert ok("9", *render(job, command)) == b'9 OK "2026-12-01 12:00:01.500000"\n'


def test_get_of_a_one_shot_job_is_unchanged_byte_for_byte() -> None:
    get = GetJob("a")
    assert ok("1", *render(Job("a", NOON, Status.PLANNED), get)) == (
        b'1 OK planned "2026-12-01 12:00:00"\n'
    )
    assert ok("1", *render(Job("a", NOON + 250_000, Status.EXECUTED, b"hi there"), get)) == (
        b'1 OK executed "2026-12-01 12:00:00.250000" "hi there"\n'
    )
    # and without the request (the form used before SCHEDULE existed)
    assert render(Job("a", NOON, Status.FAILED, b"p")) == ("failed", "2026-12-01 12:00:00", "p")
    # a finished run that recorded an outcome changes nothing either
    assert render(Job("a", NOON, Status.FAILED, last_outcome="exit 3"), get) == (
        "failed",
        "2026-12-01 12:00:00",
    )


def test_get_of_a_recurring_job_shows_its_schedule() -> None:
    assert render(recurring(), GetJob("app.report")) == (
        "planned",
        "2026-12-01 12:00:01.500000",
        "",  # the payload is always there
        "0 12 * * *",
        "tz=Europe/Paris",
        "runs=3",
        "skipped=1",
        "paused=false",
        "misfire=coalesce",
        "overlap=skip",
        "scheduled_at=2026-12-01 12:00:00",
    )
    assert ok("4", *render(recurring(), GetJob("app.report"))) == (
        b'4 OK planned "2026-12-01 12:00:01.500000" "" "0 12 * * *" tz=Europe/Paris runs=3 '
        b'skipped=1 paused=false misfire=coalesce overlap=skip "scheduled_at=2026-12-01 12:00:00"\n'
    )


def test_get_of_a_recurring_job_with_every_option() -> None:
    schedule = Schedule(
        "every 15m",
        start=NINE,
        end=NEW_YEAR,
        max_runs=10,
        jitter_us=90 * MICROS,
        misfire=Misfire.ALL,
        catchup_window_us=9000 * MICROS,
        overlap=Overlap.BUFFER_ONE,
    )
    job = recurring(
        status=Status.TRIGGERED,
        payload=b"data",
        last_outcome="exit status 1",
        recurrence=Recurrence(schedule, nominal=NOON, runs=7, paused=True),
    )
    answer = render(job, GetJob("app.report"))
    assert answer == (
        "triggered",
        "2026-12-01 12:00:01.500000",
        "data",
        "every 15m",
        "tz=UTC",
        "runs=7",
        "skipped=0",
        "paused=true",
        "misfire=all",
        "overlap=buffer_one",
        "scheduled_at=2026-12-01 12:00:00",
        "start=2026-12-01 09:00:00",
        "end=2027-01-01 00:00:00",
        "max_runs=10",
        "jitter=1m30s",
        "catchup_window=2h30m",
        "last_outcome=exit status 1",
    )


def test_get_answer_of_a_recurring_job_schedules_it_again() -> None:
    """The options GET shows are SCHEDULE options: feeding them back gives the same schedule."""
    schedule = Schedule(
        "every 15m",
        tz="Europe/Paris",
        start=NINE,
        end=NEW_YEAR,
        max_runs=10,
        jitter_us=500_000,
        misfire=Misfire.SKIP,
        catchup_window_us=86_400 * MICROS,
        overlap=Overlap.BUFFER_ONE,
    )
    job = recurring(payload=b"p", recurrence=Recurrence(schedule, nominal=NOON))
    _, _, payload, expression, *pairs = render(job, GetJob("j"))
    options = [
        pair
        for pair in pairs
        if pair.split("=", 1)[0] not in ("runs", "skipped", "paused", "scheduled_at")
    ]
    command = translate(["SCHEDULE", "j", expression, *options, f"payload={payload}"])
    assert command == ScheduleJob("j", schedule, b"p")


@given(st.integers(min_value=0, max_value=200 * 365 * 86_400 * MICROS))
def test_durations_render_in_a_form_parse_duration_reads(us: int) -> None:
    assert parse_duration(format_duration(us)) == us


def test_duration_forms() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(90 * MICROS) == "1m30s"
    assert format_duration(15 * 60 * MICROS) == "15m"
    assert format_duration(9000 * MICROS) == "2h30m"
    assert format_duration(86_400 * MICROS) == "1d"
    assert format_duration(500_000) == "PT0.5S"
    assert format_duration(90 * MICROS + 1) == "PT90.000001S"


def test_set_and_unset_are_left_as_they_are() -> None:
    assert translate(["SET", "app.report", "2026-12-01 12:00:00"]) == SetJob("app.report", NOON)
    assert not renders_data(SetJob("a", 0))


def test_the_server_writes_schedule_and_get_answers_by_their_request() -> None:
    """The KCP server keeps the request of an answer with data: a SCHEDULE and a GET
    of the same recurring job answer differently."""
    from kairoi_trio.protocols.kcp.server import _Slot

    answers = []
    for request in (["SCHEDULE", "app.report", "0 12 * * *"], ["GET", "app.report"]):
        command = command_of(request)
        assert renders_data(command)
        slot = _Slot("5")
        slot.with_data, slot.command, slot.result = True, command, recurring()
        answers.append(slot.encode())
    assert answers[0] == b'5 OK "2026-12-01 12:00:01.500000"\n'
    assert answers[1].startswith(b'5 OK planned "2026-12-01 12:00:01.500000" "" "0 12 * * *" ')
