"""The typed commands that protocol front ends and the dispatcher send to the core.

Both KCP and gRPC translate their wire messages into these at the edge, so the
command actor is the one place that validates and applies them. Every command
gets exactly one result: a value, or a CommandError carrying a code that each
protocol maps to its own error form (KCP `ERROR "<reason>"`, a gRPC status).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kairoi_trio.model import DEFAULT_POLICY, Job, JobEvent, Rule, RulePolicy, Schedule, Status

# Commands and results are messages: never changed after they are made. They are
# not frozen dataclasses only because a frozen __init__ costs about four times as
# much, and a SetJob is made for every job a client sends.


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAUTHENTICATED = "unauthenticated"


class CommandError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"CommandError({self.code.name}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CommandError)
            and other.code is self.code
            and other.message == self.message
        )

    __hash__ = Exception.__hash__


# -- jobs ---------------------------------------------------------------------


@dataclass(slots=True)
class SetJob:
    id: str
    execute_at: int
    payload: bytes = b""


@dataclass(slots=True)
class GetJob:
    id: str


@dataclass(slots=True)
class DeleteJob:
    id: str


@dataclass(slots=True)
class ListJobs:
    """Jobs whose id starts with `prefix`, in id order, after id `after`.

    `watch`: the next page of that subscription's snapshot (see Subscribe); then
    `prefix` and `after` are the subscription's and the page it was last given."""

    prefix: str = ""
    status: Status | None = None
    after: str = ""
    limit: int = 100
    watch: EventSink | None = None


@dataclass(slots=True)
class JobPage:
    jobs: list[Job]
    next_after: str  # "" when there is nothing more


# -- recurring jobs (docs/recurring-jobs.md) -------------------------------------


@dataclass(slots=True)
class ScheduleJob:
    """Create or replace the recurring job `id`. Result: the Job, planned at its
    first occurrence. INVALID_ARGUMENT for a bad expression, zone or option, or a
    schedule with no occurrence; FAILED_PRECONDITION while a run is in flight.
    An interval schedule without a start starts one interval from now."""

    id: str
    schedule: Schedule
    payload: bytes = b""


@dataclass(slots=True)
class PauseJob:
    """Stop a recurring job from firing (a run in flight ends normally). Result: the Job.
    FAILED_PRECONDITION for a one-shot job or a schedule that has ended."""

    id: str


@dataclass(slots=True)
class ResumeJob:
    """Resume a paused recurring job; its misfire policy decides about the
    occurrences that came due meanwhile. Result: the Job."""

    id: str


@dataclass(slots=True)
class RunJobNow:
    """Run a recurring job once now, without changing its schedule: afterwards it
    goes on with the occurrence that was planned. Result: the Job.
    FAILED_PRECONDITION while a run is in flight or once the schedule has ended."""

    id: str


@dataclass(slots=True)
class PreviewJob:
    """The next `count` (1..1000) occurrences of a recurring job's schedule: the
    planned one first while no run of it has started, else the ones after the run
    in flight. Result: a list of times (µs since the epoch, UTC)."""

    id: str
    count: int = 5


# -- rules --------------------------------------------------------------------


@dataclass(slots=True)
class SetRule:
    rule: Rule


@dataclass(slots=True)
class GetRule:
    id: str


@dataclass(slots=True)
class DeleteRule:
    id: str


@dataclass(slots=True)
class ListRules:
    prefix: str = ""
    after: str = ""
    limit: int = 1000


def rule_page(prefix: str, after: str, size: int) -> ListRules:
    """The ListRules for a page of `size` rules: one more is asked for, so that
    `next_rules_after` can tell whether another page follows."""
    return ListRules(prefix, after, size + 1)


def next_rules_after(rules: list[Rule], size: int) -> tuple[list[Rule], str]:
    """The answer to rule_page(..., size): (the page, the id the next page starts
    after, or "" when none follows)."""
    if len(rules) > size:
        return rules[:size], rules[size - 1].id
    return rules, ""


@dataclass(slots=True)
class MatchRule:
    """The rule a job with this id pairs with when it triggers (the longest pattern
    that is a prefix of the id, the smallest rule id on ties), or None: the
    dispatcher's own look-up, O(distinct pattern lengths), for a job's page."""

    job_id: str


# -- server -------------------------------------------------------------------


@dataclass(slots=True)
class GetInfo:
    pass


@dataclass(slots=True)
class ServerInfo:
    version: str
    started_at: int
    jobs_by_status: dict[Status, int]
    rules: int


# -- watching -------------------------------------------------------------------

EventSink = Callable[[list[JobEvent]], bool]
SNAPSHOT_PAGE = 4096  # jobs of a Subscribe snapshot an actor step (~5 ms)


@dataclass(slots=True)
class Subscribe:
    """Watch changes of jobs whose id starts with `prefix`.

    From the commit of this command on, the actor calls `sink` (in its own task,
    so it must not block) with each committed batch of matching events. The sink
    returns False to end the subscription (its consumer went away or fell
    behind). The result is a JobPage: when `snapshot` is true, the first
    SNAPSHOT_PAGE matching jobs in id order, else none. While `next_after` is
    not "", the caller asks for the next page with ListJobs(prefix, None,
    next_after, SNAPSHOT_PAGE, watch=sink), and so on: one actor step a page,
    however many jobs match. Meanwhile the sink gets the changes of the jobs
    already given, and not those of the jobs still to come (their page shows
    them as they are then): no change is lost or doubled between the snapshot
    and the events, though the pages are read at different instants.
    """

    prefix: str
    snapshot: bool
    sink: EventSink


@dataclass(slots=True)
class Unsubscribe:
    sink: EventSink


# -- internal: dispatcher and runners ------------------------------------------


# The most due jobs one TriggerDue takes (and a PostgreSQL claim locks).
MAX_TRIGGER = 4096


@dataclass(slots=True)
class TriggerDue:
    """Mark jobs due by `now + ahead` (µs) as triggered, oldest first.

    `capacity` is how many more runs each runner kind can queue right now; a
    due job whose runner kind is full stays planned (nothing is lost, and the
    other kinds are not held up behind it). At most `limit` due jobs are taken
    (TriggerResult.more_due says whether more are). Returns a TriggerResult.

    `ahead` is the fire-ahead window (jobs.fire_ahead_s): a job due within it is
    triggered now, durably, and its Dispatch is handed to a runner at its due
    time by the dispatcher, so the trigger's fsync is not on the job's path.
    """

    now: int
    capacity: dict[str, int]
    limit: int = MAX_TRIGGER
    ahead: int = 0


@dataclass(slots=True)
class Dispatch:
    """A triggered job and the rule it was paired with, ready for a runner."""

    job: Job
    rule: Rule


@dataclass(slots=True)
class TriggerResult:
    dispatches: list[Dispatch]
    deferred: frozenset[str]  # runner kinds whose due jobs wait for room
    more_due: bool = False  # the call stopped early: ask again at once


@dataclass(slots=True)
class RecordOutcome:
    """A run ended. `attempt` guards against outcomes of a superseded run;
    `policy` is the rule's policy at trigger time (it decides on a retry)."""

    job_id: str
    attempt: int
    ok: bool
    message: str = ""
    policy: RulePolicy = DEFAULT_POLICY


@dataclass(slots=True)
class JobsChanged:
    """Jobs were changed outside this instance (another instance sharing the
    store): tell this instance's watchers. Answers None."""

    ids: list[str]


@dataclass(slots=True)
class ExpireFinished:
    """Drop executed/failed jobs last changed before `before` (retention)."""

    before: int
    limit: int = 10_000


Command = (
    SetJob
    | GetJob
    | DeleteJob
    | ListJobs
    | ScheduleJob
    | PauseJob
    | ResumeJob
    | RunJobNow
    | PreviewJob
    | SetRule
    | GetRule
    | DeleteRule
    | ListRules
    | MatchRule
    | GetInfo
    | Subscribe
    | Unsubscribe
    | TriggerDue
    | RecordOutcome
    | ExpireFinished
    | JobsChanged
)

Result = object  # the command's value, or a CommandError
Reply = Callable[[list[Result]], None]


@dataclass(slots=True)
class Request:
    """What travels over the actor's channel: a batch of commands and one callback.

    Batching lets a pipelining KCP connection or a gRPC SetJobs pay the channel
    and group-commit costs once per batch. `reply` is called once, from the
    actor's task, after the batch's writes are on disk; it must not block.
    """

    commands: Sequence[Command]
    reply: Reply
