"""The client's own plain types, errors, and their conversion to and from protobuf.

Callers work with datetimes, enums and dataclasses; only this module touches
the generated messages, so the two clients (sync and async) share it.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from kairoi_client._proto import scheduler_pb2 as pb

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

# -- values ----------------------------------------------------------------------


class JobStatus(enum.Enum):
    PLANNED = pb.JOB_STATUS_PLANNED
    TRIGGERED = pb.JOB_STATUS_TRIGGERED
    EXECUTED = pb.JOB_STATUS_EXECUTED
    FAILED = pb.JOB_STATUS_FAILED


class EventType(enum.Enum):
    SET = pb.JOB_EVENT_TYPE_SET
    TRIGGERED = pb.JOB_EVENT_TYPE_TRIGGERED
    EXECUTED = pb.JOB_EVENT_TYPE_EXECUTED
    FAILED = pb.JOB_EVENT_TYPE_FAILED
    DELETED = pb.JOB_EVENT_TYPE_DELETED


class Misfire(enum.StrEnum):
    """What a recurring job does about occurrences that came due while the server
    was down or the job was paused."""

    COALESCE = "coalesce"  # run once now for all of them
    ALL = "all"  # run each of them (the most recent ones, up to the server's bound), in order
    SKIP = "skip"  # run none: go on with the next future occurrence


class Overlap(enum.StrEnum):
    """What a recurring job does about an occurrence that comes due while its
    previous run is still in flight."""

    SKIP = "skip"  # the occurrence does not run (counted as skipped)
    BUFFER_ONE = "buffer_one"  # run it once the current run ends; further ones skip


@dataclass(frozen=True, slots=True)
class Schedule:
    """A recurring job's schedule as the server stores it, and where it stands.

    expression: cron ("*/15 * * * *", 6 fields with leading seconds), a macro
        ("@daily"), "every 15m" or an ISO 8601 duration ("PT15M").
    time_zone: the IANA zone cron fields are read in; intervals ignore it.
    start, end: inclusive bounds (UTC), or None. The server sets an interval's
        start when the client gave none.
    max_runs: stop after this many runs (None: no limit).
    jitter: each run starts up to this much later, at random (None: none).
    catchup_window: missed occurrences older than this are not caught up (None: no bound).
    paused, runs, skipped, scheduled_at: output only. scheduled_at is the
        nominal time of the run planned or in flight (before jitter or retries).
    """

    expression: str
    time_zone: str = "UTC"
    start: datetime | None = None
    end: datetime | None = None
    max_runs: int | None = None
    jitter: timedelta | None = None
    misfire: Misfire = Misfire.COALESCE
    catchup_window: timedelta | None = None
    overlap: Overlap = Overlap.SKIP
    paused: bool = False
    runs: int = 0
    skipped: int = 0
    scheduled_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A job as the server stores it; `schedule` is None for a one-shot job."""

    id: str
    execute_at: datetime
    status: JobStatus
    payload: bytes = b""
    attempts: int = 0
    last_outcome: str = ""
    updated_at: datetime | None = None
    schedule: Schedule | None = None


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to set: what set_jobs and set_jobs_batched take (plain tuples work too)."""

    id: str
    execute_at: datetime
    payload: bytes = b""


JobLike = NewJob | tuple[str, datetime] | tuple[str, datetime, bytes]


@dataclass(frozen=True, slots=True)
class ShellRunner:
    command: str


@dataclass(frozen=True, slots=True)
class AmqpRunner:
    dsn: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class HttpRunner:
    url: str


Runner = ShellRunner | AmqpRunner | HttpRunner


@dataclass(frozen=True, slots=True)
class RulePolicy:
    """None (or 0 attempts) leaves the server's default: one try, no limits."""

    timeout: timedelta | None = None
    max_attempts: int = 0
    backoff_initial: timedelta | None = None
    backoff_max: timedelta | None = None
    stale_after: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    pattern: str
    runner: Runner
    policy: RulePolicy = field(default_factory=RulePolicy)


@dataclass(frozen=True, slots=True)
class JobEvent:
    type: EventType
    job: Job
    at: datetime | None  # None in snapshot events
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: str
    started_at: datetime
    jobs_by_status: dict[JobStatus, int]
    rules: int


# -- errors --------------------------------------------------------------------------


class KairoiError(Exception):
    """A call failed; `code` is the gRPC status, `message` the server's reason."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(KairoiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KairoiError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(KairoiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(KairoiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KairoiError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(KairoiError):
    code = grpc.StatusCode.UNAUTHENTICATED


_ERRORS: dict[grpc.StatusCode, type[KairoiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
    )
}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode, message: str) -> KairoiError:
    cls = _ERRORS.get(code)
    return cls(message) if cls else KairoiError(message, code)


def from_rpc_error(error: grpc.RpcError) -> KairoiError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code, details or code.name)


@dataclass(frozen=True, slots=True)
class SetJobResult:
    """One job of a batch: `error` is None when it was set."""

    id: str
    error: KairoiError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class BulkResult:
    """What a bulk set did: how many jobs were set, and the ones that were not."""

    accepted: int = 0
    failures: list[SetJobResult] = field(default_factory=list)


# -- conversion ------------------------------------------------------------------------


def to_timestamp(dt: datetime) -> Timestamp:
    """Naive datetimes are taken as UTC, as the server's text protocol does."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def from_timestamp(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _duration(td: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(td)
    return d


def new_job_to_pb(job: JobLike) -> pb.SetJobRequest:
    if not isinstance(job, NewJob):
        job = NewJob(*job)
    return pb.SetJobRequest(id=job.id, execute_at=to_timestamp(job.execute_at), payload=job.payload)


def new_jobs_to_pb(jobs: Iterable[JobLike]) -> pb.SetJobsRequest:
    return pb.SetJobsRequest(jobs=[new_job_to_pb(job) for job in jobs])


def job_from_pb(message: pb.Job) -> Job:
    return Job(
        id=message.id,
        execute_at=from_timestamp(message.execute_at),
        status=JobStatus(message.status),
        payload=message.payload,
        attempts=message.attempts,
        last_outcome=message.last_outcome,
        updated_at=from_timestamp(message.updated_at) if message.HasField("updated_at") else None,
        schedule=schedule_from_pb(message.schedule) if message.HasField("schedule") else None,
    )


# Unspecified (0) is the default on both sides: coalesce, skip.
_MISFIRE_TO_PB = {
    Misfire.COALESCE: pb.MISFIRE_POLICY_COALESCE,
    Misfire.ALL: pb.MISFIRE_POLICY_ALL,
    Misfire.SKIP: pb.MISFIRE_POLICY_SKIP,
}
_MISFIRE_FROM_PB = {v: k for k, v in _MISFIRE_TO_PB.items()} | {
    pb.MISFIRE_POLICY_UNSPECIFIED: Misfire.COALESCE
}
_OVERLAP_TO_PB = {
    Overlap.SKIP: pb.OVERLAP_POLICY_SKIP,
    Overlap.BUFFER_ONE: pb.OVERLAP_POLICY_BUFFER_ONE,
}
_OVERLAP_FROM_PB = {v: k for k, v in _OVERLAP_TO_PB.items()} | {
    pb.OVERLAP_POLICY_UNSPECIFIED: Overlap.SKIP
}


def _choice(kind: type[E], value: E | str, name: str) -> E:
    """A policy given as the enum or its text ("coalesce"); ValueError naming the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ValueError(f"{name} must be one of {choices}, not {value!r}") from None


def schedule_to_pb(
    expression: str,
    *,
    time_zone: str = "UTC",
    start: datetime | None = None,
    end: datetime | None = None,
    max_runs: int | None = None,
    jitter: timedelta | None = None,
    misfire: Misfire | str = Misfire.COALESCE,
    catchup_window: timedelta | None = None,
    overlap: Overlap | str = Overlap.SKIP,
) -> pb.Schedule:
    """A Schedule message from schedule_job's arguments. The server judges the
    expression, the zone and the bounds; here only what the message cannot say
    is refused (ValueError): an unknown policy, max_runs below 1."""
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"max_runs must be at least 1 (None: no limit), not {max_runs}")
    message = pb.Schedule(
        expression=expression,
        time_zone=time_zone,
        max_runs=max_runs or 0,
        misfire=_MISFIRE_TO_PB[_choice(Misfire, misfire, "misfire")],
        overlap=_OVERLAP_TO_PB[_choice(Overlap, overlap, "overlap")],
    )
    if start is not None:
        message.start.CopyFrom(to_timestamp(start))
    if end is not None:
        message.end.CopyFrom(to_timestamp(end))
    if jitter is not None:
        message.jitter.CopyFrom(_duration(jitter))
    if catchup_window is not None:
        message.catchup_window.CopyFrom(_duration(catchup_window))
    return message


def schedule_from_pb(message: pb.Schedule) -> Schedule:
    def time(name: str) -> datetime | None:
        return from_timestamp(getattr(message, name)) if message.HasField(name) else None

    def span(name: str) -> timedelta | None:
        return getattr(message, name).ToTimedelta() if message.HasField(name) else None

    return Schedule(
        expression=message.expression,
        time_zone=message.time_zone or "UTC",
        start=time("start"),
        end=time("end"),
        max_runs=message.max_runs or None,
        jitter=span("jitter"),
        misfire=_MISFIRE_FROM_PB[message.misfire],
        catchup_window=span("catchup_window"),
        overlap=_OVERLAP_FROM_PB[message.overlap],
        paused=message.paused,
        runs=message.runs,
        skipped=message.skipped,
        scheduled_at=time("scheduled_at"),
    )


def set_job_results(request: pb.SetJobsRequest, response: pb.SetJobsResponse) -> list[SetJobResult]:
    return [
        SetJobResult(sent.id, _status_error(result.status))
        for sent, result in zip(request.jobs, response.results, strict=True)
    ]


def _status_error(status: pb.Status) -> KairoiError | None:
    if status.code == 0:
        return None
    return error_for(_CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN), status.message)


def rule_to_pb(rule: Rule) -> pb.Rule:
    message = pb.Rule(id=rule.id, pattern=rule.pattern)
    runner = rule.runner
    if isinstance(runner, ShellRunner):
        message.shell.command = runner.command
    elif isinstance(runner, AmqpRunner):
        message.amqp.CopyFrom(
            pb.AmqpRunner(dsn=runner.dsn, exchange=runner.exchange, routing_key=runner.routing_key)
        )
    elif isinstance(runner, HttpRunner):
        message.http.url = runner.url
    else:
        raise TypeError(f"not a runner: {runner!r}")
    policy = rule.policy
    message.policy.max_attempts = policy.max_attempts
    for name in ("timeout", "backoff_initial", "backoff_max", "stale_after"):
        value = getattr(policy, name)
        if value is not None:
            getattr(message.policy, name).CopyFrom(_duration(value))
    return message


def rule_from_pb(message: pb.Rule) -> Rule:
    kind = message.WhichOneof("runner")
    runner: Runner
    if kind == "shell":
        runner = ShellRunner(message.shell.command)
    elif kind == "amqp":
        runner = AmqpRunner(message.amqp.dsn, message.amqp.exchange, message.amqp.routing_key)
    else:
        runner = HttpRunner(message.http.url)
    p = message.policy

    def td(name: str) -> timedelta | None:
        return getattr(p, name).ToTimedelta() if p.HasField(name) else None

    policy = RulePolicy(
        timeout=td("timeout"),
        max_attempts=p.max_attempts,
        backoff_initial=td("backoff_initial"),
        backoff_max=td("backoff_max"),
        stale_after=td("stale_after"),
    )
    return Rule(message.id, message.pattern, runner, policy)


def events_from_pb(message: pb.WatchJobsResponse) -> list[JobEvent]:
    return [
        JobEvent(
            type=EventType(event.type),
            job=job_from_pb(event.job),
            at=from_timestamp(event.at) if event.HasField("at") else None,
            snapshot=message.snapshot,
        )
        for event in message.events
    ]


def server_info_from_pb(message: pb.GetServerInfoResponse) -> ServerInfo:
    counts = message.jobs
    return ServerInfo(
        version=message.version,
        started_at=from_timestamp(message.started_at),
        jobs_by_status={
            JobStatus.PLANNED: counts.planned,
            JobStatus.TRIGGERED: counts.triggered,
            JobStatus.EXECUTED: counts.executed,
            JobStatus.FAILED: counts.failed,
        },
        rules=message.rules,
    )


def failure_from_pb(failure: pb.SetJobFailure) -> SetJobResult:
    return SetJobResult(failure.id, _status_error(failure.status))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """itertools.batched, which Python 3.11 lacks."""
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def status_filter(status: JobStatus | None) -> pb.JobStatus:
    return pb.JOB_STATUS_UNSPECIFIED if status is None else status.value


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
