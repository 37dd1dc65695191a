"""KCP instructions <-> core commands (pure: no sockets, no Trio).

`translate` turns the arguments of one request into a command for the actor,
or into an immediate answer for the instructions the connection answers itself
(PING, VERSION, AUTH). `render` turns the actor's result back into the
arguments that follow `OK`.

SCHEDULE (recurring jobs, docs/recurring-jobs.md) is checked here as far as
syntax goes: its options, their values, and the expression and zone (compiled
once, so a typo is an ERROR naming it); the actor checks the rest (a schedule
with no occurrence, a run in flight).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from kairoi_trio import __version__
from kairoi_trio.commands import (
    Command,
    CommandError,
    DeleteJob,
    DeleteRule,
    ErrorCode,
    GetJob,
    GetRule,
    ScheduleJob,
    SetJob,
    SetRule,
)
from kairoi_trio.core.validation import shown
from kairoi_trio.model import (
    MICROS,
    AmqpRunner,
    HttpRunner,
    Job,
    Misfire,
    Overlap,
    Recurrence,
    Rule,
    RunnerSpec,
    Schedule,
    ShellRunner,
)
from kairoi_trio.model import format_time as model_format_time
from kairoi_trio.scheduling.occurrences import ScheduleError, compile_schedule, parse_duration

_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?\Z", re.ASCII)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@dataclass(frozen=True, slots=True)
class Answer:
    """A response the connection gives without asking the actor."""

    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Authenticate:
    token: str


def invalid(message: str) -> CommandError:
    return CommandError(ErrorCode.INVALID_ARGUMENT, message)


def parse_time(text: str) -> int:
    """'Y-m-d H:i:s' or 'Y-m-d H:i:s.ffffff', UTC -> microseconds since the epoch."""
    match = _TIME.match(text)
    if match is None:
        raise invalid(f'invalid time {text!r}: expected "Y-m-d H:i:s[.ffffff]"')
    days = _days_since_epoch(text[:10])
    h, m, s = int(text[11:13]), int(text[14:16]), int(text[17:19])
    if h > 23 or m > 59 or s > 59:
        raise invalid(f"invalid time of day {text!r}")
    fraction = match.group(7)
    micros = int(fraction.ljust(6, "0")) if fraction else 0
    return (days * 86_400 + h * 3600 + m * 60 + s) * MICROS + micros


@functools.lru_cache(maxsize=4096)
def _days_since_epoch(day: str) -> int:
    """'Y-m-d' -> days since 1970-01-01; cached because jobs cluster on few days."""
    try:
        return date(int(day[0:4]), int(day[5:7]), int(day[8:10])).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise invalid(f"invalid date {day!r}") from None


def format_time(us: int) -> str:
    """The inverse of parse_time ("Y-m-d H:i:s", the fraction only when there is
    one, four-digit years); ValueError outside 0001..9999."""
    return model_format_time(us, sep=" ", zone="", fraction=False)


def _set(args: list[str]) -> Command:
    if len(args) >= 4 and args[0] == "RULE":
        # `SET RULE <id> <pattern> <runner> ...`, as Kairoi's runner documentation
        # writes it, is RULE SET (a job SET never has more than 3 arguments).
        return _rule_set(args[1:])
    if len(args) not in (2, 3):
        raise invalid("SET takes <job_id> <time> [<payload>]")
    payload = args[2].encode() if len(args) == 3 else b""
    return SetJob(args[0], parse_time(args[1]), payload)


def _one_id(name: str, make: Callable[[str], Command]) -> Callable[[list[str]], Command]:
    def translate(args: list[str]) -> Command:
        if len(args) != 1:
            raise invalid(f"{name} takes <id>")
        return make(args[0])

    return translate


# -- SCHEDULE -------------------------------------------------------------------------

SCHEDULE_USAGE = "SCHEDULE takes <job_id> <schedule> [<option>=<value> ...]"
SCHEDULE_OPTIONS = (
    "tz",
    "start",
    "end",
    "max_runs",
    "jitter",
    "misfire",
    "catchup_window",
    "overlap",
    "payload",
)
_DIGITS = re.compile(r"[0-9]+\Z", re.ASCII)
_SHOWN = 60  # characters of a client's value quoted back in an ERROR


def _shown(value: str) -> str:
    """A client's value as an ERROR quotes it: core.validation.shown, cut shorter."""
    return shown(value, _SHOWN)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


def _misfire_option(value: str) -> Misfire:
    allowed = tuple(member.value for member in Misfire)
    if value not in allowed:
        raise invalid(f"SCHEDULE option misfire must be {_choices(allowed)}, not {_shown(value)}")
    return Misfire(value)


def _overlap_option(value: str) -> Overlap:
    allowed = tuple(member.value for member in Overlap)
    if value not in allowed:
        raise invalid(f"SCHEDULE option overlap must be {_choices(allowed)}, not {_shown(value)}")
    return Overlap(value)


def _duration_option(name: str, value: str) -> int:
    try:
        return parse_duration(value)
    except ScheduleError as error:
        raise invalid(f"SCHEDULE option {name}: {error}") from None
    except ValueError:  # digits past int()'s limit
        raise invalid(f"SCHEDULE option {name}: {_shown(value)} is too long") from None


def _time_option(name: str, value: str) -> int:
    try:
        return parse_time(value)
    except CommandError:
        raise invalid(
            f"SCHEDULE option {name}: invalid time {_shown(value)}: expected "
            f'"Y-m-d H:i:s[.ffffff]", UTC (quote the whole option: "{name}=2026-12-01 09:00:00")'
        ) from None


def _max_runs_option(value: str) -> int:
    # 19 digits and fewer are converted; the actor bounds the count.
    if _DIGITS.match(value) is None or len(value) > 19 or int(value) == 0:
        raise invalid(f"SCHEDULE option max_runs must be a positive integer, not {_shown(value)}")
    return int(value)


def parse_schedule_options(options: list[str]) -> dict[str, str]:
    """`name=value` arguments -> {name: value}. Raises CommandError for an argument
    without `=`, an unknown option or one given twice."""
    found: dict[str, str] = {}
    previous = ""
    for option in options:
        name, equals, value = option.partition("=")
        if not equals and previous in ("start", "end") and " " not in found[previous]:
            raise invalid(
                f"SCHEDULE: {_shown(option)} is not an option <name>=<value>; a time holds "
                f'a space: quote the whole option, "{previous}={found[previous]} {option}"'
            )
        if not equals:
            raise invalid(
                f"SCHEDULE: {_shown(option)} is not an option <name>=<value> "
                '(quote a schedule that contains spaces: "0 9 * * 1-5", "every 15m")'
            )
        if name not in SCHEDULE_OPTIONS:
            raise invalid(
                f"SCHEDULE: unknown option {_shown(name)} (options: {', '.join(SCHEDULE_OPTIONS)})"
            )
        if name in found:
            raise invalid(f"SCHEDULE: option {name} is given twice")
        if not value and name != "payload":
            raise invalid(f"SCHEDULE option {name} needs a value: {name}=<value>")
        found[name] = value
        previous = name
    return found


def _schedule(args: list[str]) -> Command:
    """SCHEDULE <job_id> <schedule> [<option>=<value> ...] -> ScheduleJob."""
    if len(args) < 2:
        raise invalid(SCHEDULE_USAGE)
    job_id, expression, *rest = args
    options = parse_schedule_options(rest)
    tz = options.get("tz", "UTC")
    start = _time_option("start", options["start"]) if "start" in options else None
    end = _time_option("end", options["end"]) if "end" in options else None
    max_runs = _max_runs_option(options["max_runs"]) if "max_runs" in options else None
    jitter = _duration_option("jitter", options["jitter"]) if "jitter" in options else 0
    catchup = options.get("catchup_window")
    catchup_us = None if catchup is None else _duration_option("catchup_window", catchup)
    misfire = _misfire_option(options["misfire"]) if "misfire" in options else Misfire.COALESCE
    overlap = _overlap_option(options["overlap"]) if "overlap" in options else Overlap.SKIP
    try:
        compile_schedule(expression, tz)
    except ScheduleError as error:
        raise invalid(str(error)) from None
    except ValueError:  # digits past int()'s limit in an interval
        raise invalid(f"{_shown(expression)} is not a schedule") from None
    schedule = Schedule(
        expression,
        tz=tz,
        start=start,
        end=end,
        max_runs=max_runs,
        jitter_us=jitter,
        misfire=misfire,
        catchup_window_us=catchup_us,
        overlap=overlap,
    )
    return ScheduleJob(job_id, schedule, options.get("payload", "").encode())


def format_duration(us: int) -> str:
    """A duration (µs, >= 0) as SCHEDULE options write it, read back by parse_duration:
    `0s`, `90s` -> `1m30s`, `2h30m`, `1d`; with a fraction of a second, ISO 8601
    seconds (`PT0.5S`, `PT90.000001S`)."""
    if us < 0:
        raise ValueError(f"negative duration {us}")
    seconds, micros = divmod(us, MICROS)
    if micros:
        return f"PT{seconds}.{micros:06d}".rstrip("0") + "S"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    text = "".join(
        f"{value}{unit}"
        for value, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s"))
        if value
    )
    return text or "0s"


def render_recurrence(recurrence: Recurrence, last_outcome: str) -> tuple[str, ...]:
    """What GET adds after a recurring job's payload: the expression, then
    `<key>=<value>` arguments (the optional ones only when set)."""
    schedule = recurrence.schedule
    out = [
        schedule.expression,
        f"tz={schedule.tz}",
        f"runs={recurrence.runs}",
        f"skipped={recurrence.skipped}",
        f"paused={'true' if recurrence.paused else 'false'}",
        f"misfire={schedule.misfire.value}",
        f"overlap={schedule.overlap.value}",
        f"scheduled_at={format_time(recurrence.nominal)}",
    ]
    if schedule.start is not None:
        out.append(f"start={format_time(schedule.start)}")
    if schedule.end is not None:
        out.append(f"end={format_time(schedule.end)}")
    if schedule.max_runs is not None:
        out.append(f"max_runs={schedule.max_runs}")
    if schedule.jitter_us:
        out.append(f"jitter={format_duration(schedule.jitter_us)}")
    if schedule.catchup_window_us is not None:
        out.append(f"catchup_window={format_duration(schedule.catchup_window_us)}")
    if last_outcome:
        out.append(f"last_outcome={last_outcome}")
    return tuple(out)


_RUNNERS: dict[str, tuple[int, Callable[..., RunnerSpec], str]] = {
    "shell": (1, ShellRunner, "<command>"),
    "amqp": (3, AmqpRunner, "<dsn> <exchange> <routing_key>"),
    "http": (1, HttpRunner, "<url>"),
}


def _rule_set(args: list[str]) -> Command:
    if len(args) < 3:
        raise invalid("RULE SET takes <rule_id> <pattern> <runner> <runner arguments...>")
    rule_id, pattern, kind, *runner_args = args
    if kind not in _RUNNERS:
        raise invalid(f"unknown runner {kind!r}: expected shell, amqp or http")
    count, make, usage = _RUNNERS[kind]
    if len(runner_args) != count:
        raise invalid(f"RULE SET ... {kind} takes {usage}")
    return SetRule(Rule(rule_id, pattern, make(*runner_args)))


_RULE_INSTRUCTIONS: dict[str, Callable[[list[str]], Command]] = {
    "SET": _rule_set,
    "GET": _one_id("RULE GET", GetRule),
    "UNSET": _one_id("RULE UNSET", DeleteRule),
}


def _rule(args: list[str]) -> Command:
    if not args or args[0] not in _RULE_INSTRUCTIONS:
        raise invalid("RULE takes SET, GET or UNSET")
    return _RULE_INSTRUCTIONS[args[0]](args[1:])


_INSTRUCTIONS: dict[str, Callable[[list[str]], Command]] = {
    "SET": _set,
    "GET": _one_id("GET", GetJob),
    "UNSET": _one_id("UNSET", DeleteJob),
    "SCHEDULE": _schedule,
    "RULE": _rule,
}


def translate(args: list[str]) -> Command | Answer | Authenticate:
    """The arguments after the request id -> what to do. Raises CommandError."""
    name, rest = args[0], args[1:]
    handler = _INSTRUCTIONS.get(name)
    if handler is not None:
        return handler(rest)
    if name == "PING" and not rest:
        return Answer(("PONG",))
    if name == "VERSION" and not rest:
        return Answer((__version__,))
    if name == "AUTH":
        if len(rest) != 1:
            raise invalid("AUTH takes <token>")
        return Authenticate(rest[0])
    if name in ("PING", "VERSION"):
        raise invalid(f"{name} takes no argument")
    raise invalid(f"unknown instruction {name}")


def render(result: object, command: Command | None = None) -> tuple[str, ...]:
    """A successful result -> the arguments after OK.

    command: the request it answers, when known; a SCHEDULE answers only the
    job's next time (its execute_at), a GET the whole job. A one-shot job is
    `<status> <time> [<payload>]`, as Kairoi clients parse it; a recurring one
    `<status> <next time> <payload> <expression> <key>=<value> ...` with the
    payload always there (render_recurrence).
    """
    if isinstance(result, Job):
        if isinstance(command, ScheduleJob):
            return (format_time(result.execute_at),)
        recurrence = result.recurrence
        if result.payload or recurrence is not None:
            payload = result.payload.decode("utf-8", "replace")
            head = (result.status.value, format_time(result.execute_at), payload)
            if recurrence is None:
                return head
            return head + render_recurrence(recurrence, result.last_outcome)
        return (result.status.value, format_time(result.execute_at))
    if isinstance(result, Rule):
        runner = result.runner
        if isinstance(runner, ShellRunner):
            return (result.pattern, "shell", runner.command)
        if isinstance(runner, AmqpRunner):
            return (result.pattern, "amqp", runner.dsn, runner.exchange, runner.routing_key)
        return (result.pattern, "http", runner.url)
    return ()


def renders_data(command: Command) -> bool:
    """Whether the command's OK carries data (GET, RULE GET, SCHEDULE's next time);
    SET answers a bare OK. Such answers are made by render(result, command)."""
    return isinstance(command, _DATA_COMMANDS)


_DATA_COMMANDS = (GetJob, GetRule, ScheduleJob)
