"""JSON <-> the project's commands and model, at the HTTP edge only.

The JSON API's documents (docs/http-api.md): times are RFC 3339 text in UTC
("2030-01-01T09:00:00.000000Z"; any offset on input), payloads base64,
durations seconds (numbers), enums lower-case names. What JSON allows but the
model cannot hold (a string where a number goes, an unknown key, a time
outside 0001..9999, bad base64) is refused here with a CommandError
(INVALID_ARGUMENT) naming the field, so the same error path as the actor's own
validation reports it. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from datetime import datetime
from typing import Any

from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.validation import check_attempts, check_seconds, shown
from kairoi_trio.model import (
    MICROS,
    AmqpRunner,
    HttpRunner,
    Job,
    JobEvent,
    Misfire,
    Overlap,
    Recurrence,
    Rule,
    RulePolicy,
    RunnerSpec,
    Schedule,
    ShellRunner,
    Status,
    check_time,
    format_time,
    from_datetime,
)

DEFAULT_JOB_PAGE = 100
MAX_JOB_PAGE = 1000
DEFAULT_RULE_PAGE = 1000
MAX_RULE_PAGE = 1000
MAX_PREVIEW = 1000  # PreviewJob's bound
_MAX_DURATION_S = 315_576_000_000  # 10,000 years: what gRPC's Duration may hold

# RFC 3339 date-time (section 5.6), with the seconds' fraction optional and an offset
# required: a time without one is ambiguous, so it is refused rather than guessed.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z", re.ASCII
)
_STATUSES = {status.value: status for status in Status}
_MISFIRES = {misfire.value: misfire for misfire in Misfire}
_OVERLAPS = {overlap.value: overlap for overlap in Overlap}


def invalid(message: str) -> CommandError:
    return CommandError(ErrorCode.INVALID_ARGUMENT, message)


# -- scalars ---------------------------------------------------------------------


def parse_time(value: object, field: str) -> int:
    """RFC 3339 text -> microseconds since the epoch (UTC); digits below a microsecond
    are dropped. INVALID_ARGUMENT naming `field` for anything else, a missing
    offset, or a time outside 0001-01-01..9999-12-31 (UTC)."""
    if not isinstance(value, str) or _RFC3339.match(value) is None:
        raise invalid(
            f"{field} must be an RFC 3339 time with an offset "
            f'("2030-01-01T09:00:00Z"), not {_show(value)}'
        )
    text = value.upper().replace(" ", "T")
    if "." in text:  # fromisoformat takes at most 6 digits of fraction in 3.11
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        us = from_datetime(datetime.fromisoformat(text.replace("Z", "+00:00")))
        return check_time(us, field)
    except ValueError as error:
        raise invalid(f"{field} is not a valid time: {_show(value)} ({error})") from None


def time_text(us: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC, six fraction digits."""
    return format_time(us)


def parse_payload(value: object, field: str = "payload") -> bytes:
    """Standard base64 (RFC 4648, with padding) -> bytes; absent (None) is empty."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise invalid(f"{field} must be base64 text, not {_show(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{field} is not valid base64 (RFC 4648, standard alphabet)") from None


def payload_text(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def _seconds(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"{field} must be a number of seconds, not {_show(value)}")
    return float(value)


def _micros(value: object, field: str) -> int:
    """A non-negative duration in seconds -> microseconds (at most 10,000 years)."""
    seconds = _seconds(value, field)
    if seconds < 0:
        raise invalid(f"{field} must be a non-negative duration")
    if seconds > _MAX_DURATION_S:
        raise invalid(f"{field} is not a valid duration (at most 10,000 years)")
    return round(seconds * MICROS)


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{field} must be a string, not {_show(value)}")
    return value


def _integer(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{field} must be an integer, not {_show(value)}")
    return value


def _object(value: object, field: str, allowed: frozenset[str]) -> dict[str, Any]:
    """A JSON object whose keys are all in `allowed` (a typo is refused, not ignored)."""
    if not isinstance(value, dict):
        raise invalid(f"{field} must be a JSON object, not {_show(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        where = f" in {field}" if field != "body" else ""
        raise invalid(
            f"unknown field {shown(unknown[0])}{where} (fields: {', '.join(sorted(allowed))})"
        )
    return value


def _show(value: object) -> str:
    return (
        shown(value)
        if isinstance(value, str)
        else type(value).__name__
        if value is not None
        else "null"
    )


# -- queries ---------------------------------------------------------------------


def page_size(text: str | None, default: int, maximum: int) -> int:
    """`page_size` of a query: absent or 0 is the default, larger values are capped."""
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise invalid(f"page_size must be a non-negative integer, not {shown(text)}")
    return min(int(text) or default, maximum)


def status_filter(text: str | None) -> Status | None:
    if text is None or text == "":
        return None
    try:
        return _STATUSES[text.lower()]
    except KeyError:
        raise invalid(
            f"unknown job status {shown(text)} (planned, triggered, executed or failed)"
        ) from None


def preview_count(text: str | None) -> int:
    if text is None or text == "":
        return 5
    if not text.isascii() or not text.isdigit() or not 1 <= int(text[:9]) <= MAX_PREVIEW:
        raise invalid(f"count must be 1 to {MAX_PREVIEW}, not {shown(text)}")
    return int(text)


def flag(text: str | None, field: str) -> bool:
    if text is None or text in ("", "false", "0"):
        return False
    if text in ("true", "1"):
        return True
    raise invalid(f"{field} must be true or false, not {shown(text)}")


# -- jobs ------------------------------------------------------------------------

_JOB_FIELDS = frozenset({"execute_at", "payload", "schedule"})
_SCHEDULE_IN = frozenset(
    {
        "expression",
        "time_zone",
        "start",
        "end",
        "max_runs",
        "jitter_s",
        "misfire",
        "catchup_window_s",
        "overlap",
    }
)
# What a schedule read back carries besides: ignored on input, so that a job's
# schedule can be sent again as it was read.
_SCHEDULE_OUT = frozenset({"paused", "runs", "skipped", "scheduled_at"})


def set_job_from_json(job_id: str, body: object) -> c.SetJob | c.ScheduleJob:
    """PUT /api/v1/jobs/{id}'s body -> SetJob ({"execute_at", "payload"?}) or, with a
    "schedule" instead of an "execute_at", ScheduleJob. INVALID_ARGUMENT for neither
    or both, and for any field that is not what it should be."""
    document = _object(body, "body", _JOB_FIELDS)
    payload = parse_payload(document.get("payload"))
    schedule = document.get("schedule")
    execute_at = document.get("execute_at")
    if schedule is not None and execute_at is not None:
        raise invalid(
            "execute_at and schedule go apart: execute_at for a one-shot job, schedule "
            "for a recurring one"
        )
    if schedule is not None:
        return c.ScheduleJob(job_id, schedule_from_json(schedule), payload)
    if execute_at is None:
        raise invalid(
            "execute_at is required (an RFC 3339 time), or a schedule for a recurring job"
        )
    return c.SetJob(job_id, parse_time(execute_at, "execute_at"), payload)


def job_to_json(job: Job) -> dict[str, Any]:
    """A job as the API shows it; `schedule` is null for a one-shot job."""
    return {
        "id": job.id,
        "status": job.status.value,
        "execute_at": format_time(job.execute_at),
        "payload": base64.b64encode(job.payload).decode("ascii"),
        "attempts": job.attempts,
        "last_outcome": job.last_outcome,
        "updated_at": format_time(job.updated_at) if job.updated_at else None,
        "schedule": schedule_to_json(job.recurrence) if job.recurrence is not None else None,
    }


def event_to_json(event: JobEvent, snapshot: bool = False) -> dict[str, Any]:
    """A watched change: `type` is the job's new status, or "deleted"."""
    return {
        "type": "deleted" if event.deleted else event.job.status.value,
        "job": job_to_json(event.job),
        "at": format_time(event.at) if event.at else None,
        "snapshot": snapshot,
    }


def schedule_from_json(value: object) -> Schedule:
    """A client's schedule as the model's, its syntax checked (the actor checks the
    rest: the expression, the zone, each option's bounds). Absent or null fields
    take the defaults (UTC, no bounds, no limit, no jitter, coalesce, skip)."""
    document = _object(value, "schedule", _SCHEDULE_IN | _SCHEDULE_OUT)
    expression = document.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise invalid(
            "schedule.expression is required: a cron expression (*/15 * * * *), a macro "
            "(@daily) or an interval (every 15m, PT15M)"
        )

    def time(name: str) -> int | None:
        raw = document.get(name)
        return None if raw is None else parse_time(raw, f"schedule.{name}")

    def span(name: str) -> int | None:
        raw = document.get(name)
        return None if raw is None else _micros(raw, f"schedule.{name}")

    def choice(name: str, names: dict[str, Any], default: Any) -> Any:
        raw = document.get(name)
        if raw is None:
            return default
        if not isinstance(raw, str) or raw.lower() not in names:
            raise invalid(f"unknown schedule.{name} policy {_show(raw)} ({', '.join(names)})")
        return names[raw.lower()]

    max_runs = document.get("max_runs")
    if max_runs is not None:
        max_runs = _integer(max_runs, "schedule.max_runs")
        if max_runs < 0:
            raise invalid("schedule.max_runs must not be negative")
    zone = document.get("time_zone")
    return Schedule(
        expression=expression,
        tz=_string(zone, "schedule.time_zone") if zone is not None else "UTC",
        start=time("start"),
        end=time("end"),
        max_runs=max_runs or None,
        jitter_us=span("jitter_s") or 0,
        misfire=choice("misfire", _MISFIRES, Misfire.COALESCE),
        catchup_window_us=span("catchup_window_s"),
        overlap=choice("overlap", _OVERLAPS, Overlap.SKIP),
    )


def schedule_to_json(recurrence: Recurrence) -> dict[str, Any]:
    """A recurring job's schedule as the client gave it (completed by the server:
    an interval's start, the defaults), and where it stands."""
    schedule = recurrence.schedule
    return {
        "expression": schedule.expression,
        "time_zone": schedule.tz,
        "start": format_time(schedule.start) if schedule.start is not None else None,
        "end": format_time(schedule.end) if schedule.end is not None else None,
        "max_runs": schedule.max_runs,
        "jitter_s": schedule.jitter_us / MICROS,
        "misfire": schedule.misfire.value,
        "catchup_window_s": (
            schedule.catchup_window_us / MICROS if schedule.catchup_window_us is not None else None
        ),
        "overlap": schedule.overlap.value,
        "paused": recurrence.paused,
        "runs": recurrence.runs,
        "skipped": recurrence.skipped,
        "scheduled_at": format_time(recurrence.nominal),
    }


# -- rules -----------------------------------------------------------------------

_RULE_FIELDS = frozenset({"pattern", "runner", "policy"})
_RUNNER_FIELDS = {
    "shell": frozenset({"kind", "command"}),
    "amqp": frozenset({"kind", "dsn", "exchange", "routing_key"}),
    "http": frozenset({"kind", "url"}),
}
_POLICY_FIELDS = frozenset(
    {"timeout_s", "max_attempts", "backoff_initial_s", "backoff_max_s", "stale_after_s"}
)


def rule_from_json(rule_id: str, body: object) -> Rule:
    """PUT /api/v1/rules/{id}'s body {"pattern", "runner": {"kind", ...}, "policy"?}.

    A missing policy, or missing fields of one, keep RulePolicy's defaults, which
    the server replaces by its [policy] when the whole policy is the default (as
    for KCP and gRPC rules). Values are bounded as core/validation.py says."""
    document = _object(body, "body", _RULE_FIELDS)
    pattern = document.get("pattern")
    if pattern is None:
        raise invalid("pattern is required: the job id prefix the rule runs")
    return Rule(
        id=rule_id,
        pattern=_string(pattern, "pattern"),
        runner=runner_from_json(document.get("runner")),
        policy=policy_from_json(document.get("policy")),
    )


def runner_from_json(value: object) -> RunnerSpec:
    if value is None:
        raise invalid('a rule needs a runner: {"kind": "shell", "command": ...}, amqp or http')
    if not isinstance(value, dict):
        raise invalid(f"runner must be a JSON object, not {_show(value)}")
    kind = value.get("kind")
    if kind not in _RUNNER_FIELDS:
        raise invalid(f"runner.kind must be shell, amqp or http, not {_show(kind)}")
    runner = _object(value, "runner", _RUNNER_FIELDS[kind])

    def text(name: str) -> str:
        raw = runner.get(name)
        return "" if raw is None else _string(raw, f"runner.{name}")

    if kind == "shell":
        return ShellRunner(command=text("command"))
    if kind == "amqp":
        return AmqpRunner(
            dsn=text("dsn"), exchange=text("exchange"), routing_key=text("routing_key")
        )
    return HttpRunner(url=text("url"))


def policy_from_json(value: object) -> RulePolicy:
    defaults = RulePolicy()
    if value is None:
        return defaults
    document = _object(value, "policy", _POLICY_FIELDS)

    def seconds(name: str, default: float | None, *, positive: bool = False) -> float | None:
        raw = document.get(name)
        if raw is None:
            return default
        number = _seconds(raw, f"policy.{name}")
        check_seconds(number, f"policy.{name}", positive=positive)
        return number

    attempts = document.get("max_attempts")
    if attempts is not None:
        check_attempts(_integer(attempts, "policy.max_attempts"), "policy.max_attempts")
    backoff_initial = seconds("backoff_initial_s", defaults.backoff_initial_s)
    backoff_max = seconds("backoff_max_s", defaults.backoff_max_s)
    assert backoff_initial is not None and backoff_max is not None
    return RulePolicy(
        timeout_s=seconds("timeout_s", defaults.timeout_s, positive=True),
        max_attempts=attempts if attempts is not None else defaults.max_attempts,
        backoff_initial_s=backoff_initial,
        backoff_max_s=backoff_max,
        stale_after_s=seconds("stale_after_s", defaults.stale_after_s),
    )


def rule_to_json(rule: Rule) -> dict[str, Any]:
    runner = rule.runner
    described: dict[str, Any]
    if isinstance(runner, ShellRunner):
        described = {"kind": "shell", "command": runner.command}
    elif isinstance(runner, AmqpRunner):
        described = {
            "kind": "amqp",
            "dsn": runner.dsn,
            "exchange": runner.exchange,
            "routing_key": runner.routing_key,
        }
    else:
        described = {"kind": "http", "url": runner.url}
    policy = rule.policy
    return {
        "id": rule.id,
        "pattern": rule.pattern,
        "runner": described,
        "policy": {
            "timeout_s": policy.timeout_s,
            "max_attempts": policy.max_attempts,
            "backoff_initial_s": policy.backoff_initial_s,
            "backoff_max_s": policy.backoff_max_s,
            "stale_after_s": policy.stale_after_s,
        },
    }


# -- server ----------------------------------------------------------------------


def info_to_json(info: c.ServerInfo) -> dict[str, Any]:
    counts = info.jobs_by_status
    return {
        "version": info.version,
        "started_at": format_time(info.started_at),
        "jobs": {status.value: counts.get(status, 0) for status in Status},
        "rules": info.rules,
    }
