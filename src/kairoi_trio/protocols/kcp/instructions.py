"""KCP instructions <-> core commands (pure: no sockets, no Trio).

`translate` turns the arguments of one request into a command for the actor,
or into an immediate answer for the instructions the connection answers itself
(PING, VERSION, AUTH). `render` turns the actor's result back into the
arguments that follow `OK`.
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
    SetJob,
    SetRule,
)
from kairoi_trio.model import (
    MICROS,
    AmqpRunner,
    HttpRunner,
    Job,
    Rule,
    RunnerSpec,
    ShellRunner,
)
from kairoi_trio.model import format_time as model_format_time

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


def render(result: object) -> tuple[str, ...]:
    """A successful result -> the arguments after OK."""
    if isinstance(result, Job):
        if result.payload:
            payload = result.payload.decode("utf-8", "replace")
            return (result.status.value, format_time(result.execute_at), payload)
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
    """Whether the command's OK carries data (GET, RULE GET); SET answers a bare OK."""
    return isinstance(command, _DATA_COMMANDS)


_DATA_COMMANDS = (GetJob, GetRule)
