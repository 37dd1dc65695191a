"""Jobs the scheduler fails itself, without a runner's outcome: logged, aggregated.

A job fails without running when no rule matches it, when it is stale, when no
runner of its rule's kind is available, or when an internal error stops its
trigger or the planning of its retry. Each of these used to end the job
`failed` with no log line; a flood (100,000 unmatched jobs in 2 s) must still
give a readable log. So, per reason:

- the first failure is logged at once, with its job id and outcome;
- the following ones, until a window (WINDOW_S) passes without any, are counted
  by prefix and logged as one summary line per window: the count, and the
  TOP_PREFIXES most frequent prefixes with their counts.

A job's prefix is its id up to and including the last ".", e.g.
"app.invoice." for "app.invoice.42" (the form rule patterns usually take),
cut to MAX_PREFIX_CHARS characters; an id without "." has the prefix "".
"""

from __future__ import annotations

import enum
from collections import Counter

import structlog

log = structlog.get_logger(__name__)

WINDOW_S = 10.0
TOP_PREFIXES = 10
MAX_PREFIX_CHARS = 64


class FailReason(enum.Enum):
    """Why the scheduler failed a job itself (the value is the metric label)."""

    NO_RULE = "no_rule"
    STALE = "stale"
    NO_RUNNER = "no_runner"
    ERROR = "error"  # an exception while triggering or planning a retry


def job_prefix(job_id: str) -> str:
    """The id up to and including its last "." ("" without one), at most MAX_PREFIX_CHARS."""
    return job_id[: job_id.rfind(".") + 1][:MAX_PREFIX_CHARS]


class FailureLog:
    """Aggregates the log lines of jobs failed without a run (see the module doc).

    `note` is called by the command actor for each such job; `flush` once per
    WINDOW_S by a task of the actor, and at shutdown.
    """

    def __init__(self, top: int = TOP_PREFIXES) -> None:
        self._top = top
        self._open: set[FailReason] = set()  # reasons whose first failure was logged
        self._counts: dict[FailReason, Counter[str]] = {}

    def note(self, reason: FailReason, job_id: str, outcome: str) -> None:
        if reason not in self._open:
            self._open.add(reason)
            log.warning(
                "job failed without running",
                reason=reason.value,
                job=job_id,
                prefix=job_prefix(job_id),
                outcome=outcome,
            )
            return
        counts = self._counts.get(reason)
        if counts is None:
            counts = self._counts[reason] = Counter()
        counts[job_prefix(job_id)] += 1

    def flush(self) -> None:
        """Log one summary line per reason with failures since the last flush.

        A reason with none is closed: its next failure is logged on its own again.
        """
        for reason in list(self._open):
            counts = self._counts.pop(reason, None)
            if not counts:
                self._open.discard(reason)
                continue
            top = counts.most_common(self._top)
            log.warning(
                "jobs failed without running",
                reason=reason.value,
                count=counts.total(),
                prefixes=dict(top),
                other_prefixes=len(counts) - len(top),
                window_s=WINDOW_S,
            )
