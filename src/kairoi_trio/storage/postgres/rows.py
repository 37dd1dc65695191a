"""Jobs and rules as rows of the PostgreSQL store (pure: no I/O).

Times are bigint microseconds since the Unix epoch, as everywhere in the
server (exact, and no datetime objects on the hot path); the `job_times` view
of the schema shows them as timestamptz for people. Statuses are their names.
A recurring job's Recurrence is a jsonb document; a rule's runner and policy
are the documents of storage/records.py's rule_document.
"""

from __future__ import annotations

import json
from typing import Any

from kairoi_trio.core.state import waits  # the `waits` column: planned and not paused
from kairoi_trio.model import (
    Job,
    Recurrence,
    Rule,
    Status,
    new_job,
    new_recurrence,
    schedule_with_bounds,
)
from kairoi_trio.storage.records import (
    decode_schedule,
    encode_schedule,
    rule_document,
    rule_from_document,
)

# The columns of `jobs`, in the order of job_row and job_from_row.
JOB_COLUMNS = (
    "id",
    "execute_at",
    "status",
    "waits",
    "payload",
    "attempts",
    "last_outcome",
    "updated_at",
    "recurrence",
)
JOB_SELECT = ", ".join(JOB_COLUMNS)

STATUS_BY_NAME = {status.value: status for status in Status}

JobRow = tuple[str, int, str, bool, bytes, int, str, int, str | None]


def safe_text(text: str) -> str:
    """`text` with each NUL as U+FFFD: PostgreSQL text cannot hold NUL (a script's
    output, a job's outcome, can)."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def job_row(job: Job) -> JobRow:
    """The row of `job`, in JOB_COLUMNS order (recurrence as JSON text)."""
    outcome = safe_text(job.last_outcome)
    return (
        job.id,
        job.execute_at,
        job.status.value,
        waits(job),
        job.payload,
        job.attempts,
        outcome,
        job.updated_at,
        None if job.recurrence is None else json.dumps(recurrence_document(job.recurrence)),
    )


def job_from_row(row: tuple[Any, ...]) -> Job:
    """The Job of a row selected with JOB_SELECT (recurrence decoded from jsonb)."""
    job_id, execute_at, status, _waits, payload, attempts, outcome, updated_at, recurrence = row
    return new_job(
        job_id,
        execute_at,
        STATUS_BY_NAME[status],
        bytes(payload),
        attempts,
        outcome,
        updated_at,
        None if recurrence is None else recurrence_from_document(recurrence),
    )


def recurrence_document(r: Recurrence) -> dict[str, Any]:
    """A Recurrence as JSON-ready data; the schedule as records' schedule JSON
    (non-default options only) with its start and end."""
    return {
        "schedule": json.loads(encode_schedule(r.schedule)),
        "start": r.schedule.start,
        "end": r.schedule.end,
        "nominal": r.nominal,
        "runs": r.runs,
        "skipped": r.skipped,
        "last_failed": r.last_failed,
        "paused": r.paused,
        "manual": r.manual,
        "resume": r.resume,
        "resume_at": r.resume_at,
        "cursor": r.cursor,
        "catchup_left": r.catchup_left,
    }


def recurrence_from_document(doc: dict[str, Any]) -> Recurrence:
    schedule = decode_schedule(json.dumps(doc["schedule"], sort_keys=True).encode())
    return new_recurrence(
        schedule_with_bounds(schedule, doc["start"], doc["end"]),
        doc["nominal"],
        doc["runs"],
        doc["skipped"],
        doc["last_failed"],
        doc["paused"],
        doc["manual"],
        doc["resume"],
        doc["resume_at"],
        doc["cursor"],
        doc["catchup_left"],
    )


RuleRow = tuple[str, str, str, str]


def rule_row(rule: Rule) -> RuleRow:
    """(id, pattern, runner JSON, policy JSON)."""
    doc = rule_document(rule)
    return rule.id, rule.pattern, json.dumps(doc["runner"]), json.dumps(doc["policy"])


def rule_from_row(row: tuple[Any, ...]) -> Rule:
    rule_id, pattern, runner, policy = row
    return rule_from_document(
        {"id": rule_id, "pattern": pattern, "runner": runner, "policy": policy}
    )
