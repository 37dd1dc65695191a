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


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    execute_at: datetime
    status: JobStatus
    payload: bytes = b""
    attempts: int = 0
    last_outcome: str = ""
    updated_at: datetime | None = None


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
