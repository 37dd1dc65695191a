"""Protobuf messages <-> the project's commands and model, at the edge only.

The core never sees generated code: requests are turned into typed commands
here, and results back into messages. What the wire allows but the model
cannot hold (an enum number we do not know, a missing runner, a negative
duration, a timestamp outside 0001..9999) is refused here with a CommandError,
so the same error path as the actor's own validation reports it.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from kairoi.v1 import scheduler_pb2 as pb
from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.validation import MAX_SHOWN_CHARS, check_attempts, check_seconds
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
)

DEFAULT_JOB_PAGE = 100
MAX_JOB_PAGE = 1000
DEFAULT_RULE_PAGE = 1000
MAX_RULE_PAGE = 1000

# A gRPC status message is at most this long (the trailer that carries it is bounded).
MAX_DETAILS_CHARS = 1000

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
_MIN_TS_SECONDS = -62_135_596_800
_MAX_TS_SECONDS = 253_402_300_799
# google.protobuf.Duration's valid range: +-10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000

# PreviewJob's count: 1..MAX_PREVIEW occurrences (the PreviewJob command's bound).
MAX_PREVIEW = 1000

STATUS_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}

_TO_PB_STATUS = {
    Status.PLANNED: pb.JOB_STATUS_PLANNED,
    Status.TRIGGERED: pb.JOB_STATUS_TRIGGERED,
    Status.EXECUTED: pb.JOB_STATUS_EXECUTED,
    Status.FAILED: pb.JOB_STATUS_FAILED,
}
_FROM_PB_STATUS = {v: k for k, v in _TO_PB_STATUS.items()}

# Unspecified enums (0) mean the model's defaults: coalesce, skip.
_FROM_PB_MISFIRE = {
    pb.MISFIRE_POLICY_UNSPECIFIED: Misfire.COALESCE,
    pb.MISFIRE_POLICY_COALESCE: Misfire.COALESCE,
    pb.MISFIRE_POLICY_ALL: Misfire.ALL,
    pb.MISFIRE_POLICY_SKIP: Misfire.SKIP,
}
_TO_PB_MISFIRE = {
    Misfire.COALESCE: pb.MISFIRE_POLICY_COALESCE,
    Misfire.ALL: pb.MISFIRE_POLICY_ALL,
    Misfire.SKIP: pb.MISFIRE_POLICY_SKIP,
}
_FROM_PB_OVERLAP = {
    pb.OVERLAP_POLICY_UNSPECIFIED: Overlap.SKIP,
    pb.OVERLAP_POLICY_SKIP: Overlap.SKIP,
    pb.OVERLAP_POLICY_BUFFER_ONE: Overlap.BUFFER_ONE,
}
_TO_PB_OVERLAP = {
    Overlap.SKIP: pb.OVERLAP_POLICY_SKIP,
    Overlap.BUFFER_ONE: pb.OVERLAP_POLICY_BUFFER_ONE,
}

_EVENT_TYPES = {
    Status.PLANNED: pb.JOB_EVENT_TYPE_SET,
    Status.TRIGGERED: pb.JOB_EVENT_TYPE_TRIGGERED,
    Status.EXECUTED: pb.JOB_EVENT_TYPE_EXECUTED,
    Status.FAILED: pb.JOB_EVENT_TYPE_FAILED,
}


def invalid(message: str) -> CommandError:
    return CommandError(ErrorCode.INVALID_ARGUMENT, message)


def status_code(error: CommandError) -> grpc.StatusCode:
    """The gRPC status for a command error (UNKNOWN for a code added later and not mapped)."""
    return STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN)


def error_status(error: CommandError, *values: str) -> pb.Status:
    """A batch entry's error as a google.rpc-like Status (code number + message);
    `values`: the client's strings the message may quote (its id), cut as in
    status_details."""
    return pb.Status(
        code=status_code(error).value[0], message=status_details(error.message, *values)
    )


def status_details(message: str, *values: str) -> str:
    """An error message fit for a gRPC status: every one of `values` (what the client
    sent: ids, commands, URLs) longer than MAX_SHOWN_CHARS is cut where the message
    quotes it, with a marker, and the whole to MAX_DETAILS_CHARS.

    The status message travels in a trailer, whose size is limited (8 KiB by
    default): a message quoting an id of 16,000 bytes or more exceeded it, and the
    client got RESOURCE_EXHAUSTED instead of the error.
    """
    for value in values:
        if len(value) > MAX_SHOWN_CHARS and value in message:
            cut = f"{value[:MAX_SHOWN_CHARS]}... ({len(value) - MAX_SHOWN_CHARS} more characters)"
            message = message.replace(value, cut)
    if len(message) > MAX_DETAILS_CHARS:
        more = len(message) - MAX_DETAILS_CHARS
        message = f"{message[:MAX_DETAILS_CHARS]}... ({more} more characters)"
    return message


def client_strings(request: object) -> list[str]:
    """The strings of a request message and of the messages in it (not of repeated
    fields): what an error about this request may quote."""
    if not isinstance(request, Message):
        return []
    found: list[str] = []
    for _field, value in request.ListFields():
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Message):
            found.extend(client_strings(value))
    return found


# -- times ---------------------------------------------------------------------


def micros_from_timestamp(ts: Timestamp, field: str) -> int:
    """Microseconds since the epoch; nanoseconds below a microsecond are dropped."""
    if not (_MIN_TS_SECONDS <= ts.seconds <= _MAX_TS_SECONDS) or not (0 <= ts.nanos < 10**9):
        raise invalid(f"{field} is not a valid timestamp (years 0001 to 9999)")
    return ts.seconds * MICROS + ts.nanos // 1000


def timestamp_from_micros(us: int) -> Timestamp:
    return Timestamp(seconds=us // MICROS, nanos=(us % MICROS) * 1000)


def seconds_from_duration(d: Duration, field: str) -> float:
    if d.seconds < 0 or d.nanos < 0 or d.nanos >= 10**9:
        raise invalid(f"{field} must be a non-negative duration")
    return d.seconds + d.nanos / 1e9


def duration_from_seconds(s: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(s * 1e9))
    return d


def micros_from_duration(d: Duration, field: str) -> int:
    """A non-negative Duration in microseconds; nanoseconds below a microsecond are
    dropped. INVALID_ARGUMENT naming `field` for a negative or malformed one (nanos
    outside 0..999,999,999, or beyond the 10,000 years a Duration may hold)."""
    if d.seconds < 0 or d.nanos < 0:
        raise invalid(f"{field} must be a non-negative duration")
    if d.nanos >= 10**9 or d.seconds > _MAX_DURATION_SECONDS:
        raise invalid(f"{field} is not a valid duration (at most 10,000 years)")
    return d.seconds * MICROS + d.nanos // 1000


def duration_from_micros(us: int) -> Duration:
    """Microseconds as a Duration, exactly."""
    seconds, micros = divmod(us, MICROS)
    return Duration(seconds=seconds, nanos=micros * 1000)


# -- jobs ------------------------------------------------------------------------


def job_status_from_pb(value: int) -> Status | None:
    """A status filter: UNSPECIFIED means any status (None)."""
    if value == pb.JOB_STATUS_UNSPECIFIED:
        return None
    try:
        return _FROM_PB_STATUS[value]  # type: ignore[index]
    except KeyError:
        raise invalid(f"unknown job status {value}") from None


def set_job_from_pb(request: pb.SetJobRequest) -> c.SetJob:
    # Hot path of SetJobs (one call per job): read the timestamp once, and ask
    # HasField only when it looks unset.
    ts = request.execute_at
    seconds, nanos = ts.seconds, ts.nanos
    if seconds == 0 and nanos == 0 and not request.HasField("execute_at"):
        raise invalid("execute_at is required")
    if not (_MIN_TS_SECONDS <= seconds <= _MAX_TS_SECONDS) or not (0 <= nanos < 10**9):
        raise invalid("execute_at is not a valid timestamp (years 0001 to 9999)")
    return c.SetJob(request.id, seconds * MICROS + nanos // 1000, request.payload)


def job_to_pb(job: Job) -> pb.Job:
    """A job as the API shows it; `schedule` is set for a recurring job only."""
    message = pb.Job(
        id=job.id,
        execute_at=timestamp_from_micros(job.execute_at),
        status=_TO_PB_STATUS.get(job.status, pb.JOB_STATUS_UNSPECIFIED),
        payload=job.payload,
        attempts=job.attempts,
        last_outcome=job.last_outcome,
    )
    if job.updated_at:
        message.updated_at.CopyFrom(timestamp_from_micros(job.updated_at))
    if job.recurrence is not None:
        message.schedule.CopyFrom(schedule_to_pb(job.recurrence))
    return message


def list_jobs_from_pb(request: pb.ListJobsRequest) -> c.ListJobs:
    return c.ListJobs(
        prefix=request.prefix,
        status=job_status_from_pb(request.status),
        after=request.page_token,
        limit=page_size(request.page_size, DEFAULT_JOB_PAGE, MAX_JOB_PAGE),
    )


def page_size(requested: int, default: int, maximum: int) -> int:
    if requested < 0:
        raise invalid("page_size must not be negative")
    return min(requested or default, maximum)


def job_event_to_pb(event: JobEvent) -> pb.JobEvent:
    kind = pb.JOB_EVENT_TYPE_DELETED if event.deleted else _EVENT_TYPES[event.job.status]
    message = pb.JobEvent(type=kind, job=job_to_pb(event.job))
    if event.at:
        message.at.CopyFrom(timestamp_from_micros(event.at))
    return message


def snapshot_event_to_pb(job: Job) -> pb.JobEvent:
    return pb.JobEvent(type=_EVENT_TYPES[job.status], job=job_to_pb(job))


# -- recurring jobs ----------------------------------------------------------------


def schedule_from_pb(message: pb.Schedule) -> Schedule:
    """A client's Schedule as the model's, its syntax checked (the actor checks the
    rest: the expression, the zone, the bounds of each option).

    Unset fields take the defaults: time_zone "" is UTC, max_runs 0 no limit, an
    unset jitter none, an unset catchup_window no bound, unspecified policies
    coalesce and skip. The output-only fields (paused, runs, skipped,
    scheduled_at) are ignored. INVALID_ARGUMENT naming the field (`schedule.X`)
    for an empty expression, a timestamp outside years 0001..9999, a negative
    duration or an enum value this server does not know.
    """
    if not message.expression.strip():
        raise invalid(
            "schedule.expression is required: a cron expression (*/15 * * * *), a macro "
            "(@daily) or an interval (every 15m, PT15M)"
        )
    try:
        misfire = _FROM_PB_MISFIRE[message.misfire]  # type: ignore[index]
    except KeyError:
        raise invalid(f"unknown schedule.misfire policy {message.misfire}") from None
    try:
        overlap = _FROM_PB_OVERLAP[message.overlap]  # type: ignore[index]
    except KeyError:
        raise invalid(f"unknown schedule.overlap policy {message.overlap}") from None

    def time(name: str) -> int | None:
        if not message.HasField(name):
            return None
        return micros_from_timestamp(getattr(message, name), f"schedule.{name}")

    def span(name: str) -> int | None:
        if not message.HasField(name):
            return None
        return micros_from_duration(getattr(message, name), f"schedule.{name}")

    return Schedule(
        expression=message.expression,
        tz=message.time_zone or "UTC",
        start=time("start"),
        end=time("end"),
        max_runs=message.max_runs or None,
        jitter_us=span("jitter") or 0,
        misfire=misfire,
        catchup_window_us=span("catchup_window"),
        overlap=overlap,
    )


def schedule_to_pb(recurrence: Recurrence) -> pb.Schedule:
    """A recurring job's schedule as the client gave it (completed by the server:
    an interval's start, the defaults), and where it stands."""
    schedule = recurrence.schedule
    message = pb.Schedule(
        expression=schedule.expression,
        time_zone=schedule.tz,
        max_runs=schedule.max_runs or 0,
        misfire=_TO_PB_MISFIRE[schedule.misfire],
        overlap=_TO_PB_OVERLAP[schedule.overlap],
        paused=recurrence.paused,
        runs=recurrence.runs,
        skipped=recurrence.skipped,
        scheduled_at=timestamp_from_micros(recurrence.nominal),
    )
    if schedule.start is not None:
        message.start.CopyFrom(timestamp_from_micros(schedule.start))
    if schedule.end is not None:
        message.end.CopyFrom(timestamp_from_micros(schedule.end))
    if schedule.jitter_us:
        message.jitter.CopyFrom(duration_from_micros(schedule.jitter_us))
    if schedule.catchup_window_us is not None:
        message.catchup_window.CopyFrom(duration_from_micros(schedule.catchup_window_us))
    return message


def schedule_job_from_pb(request: pb.ScheduleJobRequest) -> c.ScheduleJob:
    """ScheduleJobRequest -> ScheduleJob; INVALID_ARGUMENT without a schedule."""
    if not request.HasField("schedule"):
        raise invalid(
            "schedule is required (its expression: a cron expression, a macro or an interval)"
        )
    return c.ScheduleJob(request.id, schedule_from_pb(request.schedule), request.payload)


def preview_job_from_pb(request: pb.PreviewJobRequest) -> c.PreviewJob:
    """PreviewJobRequest -> PreviewJob; INVALID_ARGUMENT for a count outside 1..1000."""
    if not 1 <= request.count <= MAX_PREVIEW:
        raise invalid(f"count must be 1 to {MAX_PREVIEW}, not {request.count}")
    return c.PreviewJob(request.id, request.count)


def preview_to_pb(occurrences: list[int]) -> pb.PreviewJobResponse:
    """PreviewJob's times (µs since the epoch) as Timestamps, in their order."""
    return pb.PreviewJobResponse(occurrences=[timestamp_from_micros(at) for at in occurrences])


# -- rules -----------------------------------------------------------------------


def runner_from_pb(rule: pb.Rule) -> RunnerSpec:
    kind = rule.WhichOneof("runner")
    if kind == "shell":
        return ShellRunner(command=rule.shell.command)
    if kind == "amqp":
        return AmqpRunner(
            dsn=rule.amqp.dsn, exchange=rule.amqp.exchange, routing_key=rule.amqp.routing_key
        )
    if kind == "http":
        return HttpRunner(url=rule.http.url)
    raise invalid("a rule needs a runner: shell, amqp or http")


def policy_from_pb(policy: pb.RulePolicy) -> RulePolicy:
    """Unset fields keep RulePolicy's defaults (Kairoi's behaviour); set ones are
    bounded as core/validation.py says (max_attempts 1..1000, durations up to
    100 years, a timeout more than 0), named by their proto field."""
    defaults = RulePolicy()

    def seconds(name: str, default: float | None) -> float | None:
        if not policy.HasField(name):
            return default
        value = seconds_from_duration(getattr(policy, name), f"policy.{name}")
        check_seconds(value, f"policy.{name}", positive=name == "timeout")
        return value

    backoff_initial = seconds("backoff_initial", defaults.backoff_initial_s)
    backoff_max = seconds("backoff_max", defaults.backoff_max_s)
    assert backoff_initial is not None and backoff_max is not None
    if policy.max_attempts:  # 0: unset
        check_attempts(policy.max_attempts, "policy.max_attempts")
    return RulePolicy(
        timeout_s=seconds("timeout", defaults.timeout_s),
        max_attempts=policy.max_attempts or defaults.max_attempts,
        backoff_initial_s=backoff_initial,
        backoff_max_s=backoff_max,
        stale_after_s=seconds("stale_after", defaults.stale_after_s),
    )


def rule_from_pb(rule: pb.Rule) -> Rule:
    return Rule(
        id=rule.id,
        pattern=rule.pattern,
        runner=runner_from_pb(rule),
        policy=policy_from_pb(rule.policy),
    )


def policy_to_pb(policy: RulePolicy) -> pb.RulePolicy:
    message = pb.RulePolicy(
        max_attempts=policy.max_attempts,
        backoff_initial=duration_from_seconds(policy.backoff_initial_s),
        backoff_max=duration_from_seconds(policy.backoff_max_s),
    )
    if policy.timeout_s is not None:
        message.timeout.CopyFrom(duration_from_seconds(policy.timeout_s))
    if policy.stale_after_s is not None:
        message.stale_after.CopyFrom(duration_from_seconds(policy.stale_after_s))
    return message


def rule_to_pb(rule: Rule) -> pb.Rule:
    message = pb.Rule(id=rule.id, pattern=rule.pattern, policy=policy_to_pb(rule.policy))
    runner = rule.runner
    if isinstance(runner, ShellRunner):
        message.shell.command = runner.command
    elif isinstance(runner, AmqpRunner):
        message.amqp.CopyFrom(
            pb.AmqpRunner(dsn=runner.dsn, exchange=runner.exchange, routing_key=runner.routing_key)
        )
    else:
        message.http.url = runner.url
    return message


def list_rules_from_pb(request: pb.ListRulesRequest) -> c.ListRules:
    return c.ListRules(
        prefix=request.prefix,
        after=request.page_token,
        limit=page_size(request.page_size, DEFAULT_RULE_PAGE, MAX_RULE_PAGE),
    )


# -- server ----------------------------------------------------------------------


def server_info_to_pb(info: c.ServerInfo) -> pb.GetServerInfoResponse:
    counts = info.jobs_by_status
    return pb.GetServerInfoResponse(
        version=info.version,
        started_at=timestamp_from_micros(info.started_at),
        jobs=pb.JobCounts(
            planned=counts.get(Status.PLANNED, 0),
            triggered=counts.get(Status.TRIGGERED, 0),
            executed=counts.get(Status.EXECUTED, 0),
            failed=counts.get(Status.FAILED, 0),
        ),
        rules=info.rules,
    )
