"""What one batch of the command actor reads and changes, on PostgreSQL (pure).

The actor applies a batch of commands to a State (core/state.py). With the
embedded log that is the whole state in memory; with PostgreSQL it is a
BatchView: the rows the batch names, locked and read in the batch's
transaction (LoadPlan says which), the due jobs claimed for a TriggerDue, the
pages the batch lists, and the instance's copy of the rules. The actor changes
it as it would change a State; at commit the store writes the difference
between what was loaded and what the view holds (`changes`).

Reads of lists see the batch's own earlier writes: a page loaded before the
batch is overlaid with the jobs the batch changed (a client's pipelined SET
then LIST sees its SET), as the embedded store would answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kairoi_trio.commands import (
    MAX_TRIGGER,
    SNAPSHOT_PAGE,
    Command,
    DeleteJob,
    ExpireFinished,
    GetInfo,
    GetJob,
    GetRule,
    JobsChanged,
    ListJobs,
    ListRules,
    MatchRule,
    PauseJob,
    PreviewJob,
    RecordOutcome,
    ResumeJob,
    RunJobNow,
    ScheduleJob,
    SetJob,
    Subscribe,
    TriggerDue,
    Unsubscribe,
)
from kairoi_trio.core.state import State, waits
from kairoi_trio.model import MAX_JOB_ID_BYTES, Job, Rule, Status

# A TriggerDue claims what the runners have room for, and a few more for jobs
# that fail without a run (no rule, stale); never more than its limit, nor (several
# TriggerDue in one batch) MAX_TRIGGER in all.
CLAIM_SLACK = 64

# The commands that may change a job by id: it is locked and loaded for the batch.
_WRITES_BY_ID = (SetJob, DeleteJob, ScheduleJob, PauseJob, ResumeJob, RunJobNow)
# The commands that change nothing in the database (a Subscribe's watching flag
# is set while its snapshot is read): a batch of these commits as it loads.
_READS = (
    GetJob,
    PreviewJob,
    ListJobs,
    GetInfo,
    GetRule,
    ListRules,
    MatchRule,
    JobsChanged,
    Subscribe,
    Unsubscribe,
)

ListKey = tuple[str, Status | None, str, int]  # (prefix, status, after, limit)


@dataclass
class LoadPlan:
    """What a batch needs from the database (pure: derived from its commands)."""

    ids: set[str] = field(default_factory=set)  # jobs to lock and load
    peeks: set[str] = field(default_factory=set)  # jobs to read without a lock
    creating: set[str] = field(default_factory=set)  # ids a SET/SCHEDULE may create
    claim_now: int | None = None  # claim jobs due by this time (TriggerDue's now + ahead)...
    claim_limit: int = 0  # ...at most this many
    expire_before: int | None = None  # retention (ExpireFinished)...
    expire_limit: int = 0
    lists: set[ListKey] = field(default_factory=set)
    subscribing: bool = False  # a Subscribe: this instance is about to have a watcher
    counts: bool = False  # GetInfo: jobs by status
    read_only: bool = False  # reads only: the transaction ends with the load

    @classmethod
    def of(cls, commands: Sequence[Command]) -> LoadPlan:
        plan = cls()
        plan.read_only = all(isinstance(command, _READS) for command in commands)
        for command in commands:
            if isinstance(command, _WRITES_BY_ID):
                plan.ids.add(command.id)
                if isinstance(command, SetJob | ScheduleJob):
                    plan.creating.add(command.id)
            elif isinstance(command, GetJob | PreviewJob):
                plan.peeks.add(command.id)
            elif isinstance(command, JobsChanged):
                plan.peeks.update(command.ids)
            elif isinstance(command, RecordOutcome):
                plan.ids.add(command.job_id)
            elif isinstance(command, TriggerDue):
                room = sum(max(n, 0) for n in command.capacity.values()) + CLAIM_SLACK
                until = command.now + command.ahead  # the fire-ahead window's end
                plan.claim_now = max(plan.claim_now or until, until)
                plan.claim_limit = min(plan.claim_limit + room, command.limit, MAX_TRIGGER)
            elif isinstance(command, ExpireFinished):
                plan.expire_before = command.before
                plan.expire_limit = max(plan.expire_limit, command.limit)
            elif isinstance(command, ListJobs):
                if command.limit > 0:
                    plan.lists.add((command.prefix, command.status, command.after, command.limit))
            elif isinstance(command, Subscribe):
                plan.subscribing = True
                if command.snapshot:  # its first page (ListJobs with `watch` give the others)
                    plan.lists.add((command.prefix, None, "", SNAPSHOT_PAGE))
            elif isinstance(command, GetInfo):
                plan.counts = True
        plan.peeks -= plan.ids
        plan._drop_nul()
        return plan

    def _drop_nul(self) -> None:
        """No stored id holds NUL (validation refuses it), and PostgreSQL text
        cannot carry it: such an id names nothing, and must not fail the batch
        of every other client. The command's handler gives the clear error."""
        for ids in (self.ids, self.creating, self.peeks):
            ids.difference_update([i for i in ids if "\x00" in i])
        self.lists = {
            (prefix, status, after.split("\x00", 1)[0], limit)  # the same ids follow
            for prefix, status, after, limit in self.lists
            if "\x00" not in prefix and not _too_long(prefix)  # nothing can match
        }


def _too_long(prefix: str) -> bool:
    """Longer than any id (core/validation.py): no need to ask the database."""
    return len(prefix) > MAX_JOB_ID_BYTES // 4 and len(prefix.encode()) > MAX_JOB_ID_BYTES


@dataclass
class Loaded:
    """What the database answered for a LoadPlan."""

    jobs: dict[str, Job] = field(default_factory=dict)  # by id: the plan's ids, claimed, expired
    claimed: list[Job] = field(default_factory=list)  # due jobs, oldest first
    expired: list[str] = field(default_factory=list)  # finished jobs past retention
    pages: dict[ListKey, list[Job]] = field(default_factory=dict)  # up to limit + 1 each
    others_watch: bool = True  # another instance has watchers: NOTIFY the changed ids


class BatchView:
    """A State for one batch (the methods and attributes the actor uses).

    rules: the instance's live rule index (a State holding rules only): rule
    changes apply to it at once and are undone by the actor if the batch fails.
    counts: jobs by status as last known to the instance, moved by this batch's
    changes. next_due: the store's earliest due time.
    """

    def __init__(
        self,
        loaded: Loaded,
        rules: State,
        counts: dict[Status, int],
        next_due: Callable[[], int | None],
    ) -> None:
        self.jobs: dict[str, Job] = dict(loaded.jobs)
        self.loaded = loaded
        self.counts = counts
        self.waiting: dict[str, deque[Job]] = {}
        self._rules = rules
        self.rules = rules.rules
        self._touched: set[str] = set()
        self._rules_touched: dict[str, Rule | None] = {}  # rule id -> as before the batch
        self.next_due = next_due

    # -- jobs -----------------------------------------------------------------

    def put_job(self, job: Job) -> Job | None:
        old = self.jobs.get(job.id)
        self.jobs[job.id] = job
        self._touched.add(job.id)
        if old is not None:
            self.counts[old.status] -= 1
        self.counts[job.status] += 1
        return old

    def delete_job(self, job_id: str) -> Job | None:
        old = self.jobs.pop(job_id, None)
        self._touched.add(job_id)
        if old is not None:
            self.counts[old.status] -= 1
        return old

    def pop_due(self, now: int) -> Iterator[Job]:
        """The claimed jobs still due and waiting, oldest first."""
        for claimed in self.loaded.claimed:
            job = self.jobs.get(claimed.id)
            if job is not None and waits(job) and job.execute_at <= now:
                yield job

    def hold(self, kind: str, job: Job) -> None:
        """A due job whose runner kind is full: it stays planned in the database
        (unchanged, its lock ends with the transaction) and is claimed again once
        the kind has room; the line tells the actor which kinds are deferred."""
        self.waiting.setdefault(kind, deque()).append(job)

    def expired_finished(self, before: int, limit: int) -> list[str]:
        return [
            job_id
            for job_id in self.loaded.expired[:limit]
            if (job := self.jobs.get(job_id)) is not None
            and job.status.finished
            and job.updated_at < before
        ]

    def list_jobs(
        self, prefix: str, status: Status | None, after: str, limit: int
    ) -> tuple[list[Job], str]:
        rows = self.loaded.pages.get((prefix, status, after.split("\x00", 1)[0], limit), [])
        more = len(rows) > limit  # the database has rows past this page
        last_loaded = rows[-1].id if rows else ""
        jobs = self._overlay(rows, prefix, status, after)
        if more:  # the batch's changes past the last row read are the next page's: rows
            # between them were not read (two rows deleted and an id set past them: the
            # page would have skipped to that id)
            jobs = [job for job in jobs if job.id <= last_loaded]
        if len(jobs) > limit:
            page = jobs[:limit]
            return page, page[-1].id
        if more:  # continue after what was read, even if the batch deleted some of it
            return jobs, jobs[-1].id if jobs else last_loaded
        return jobs, ""

    def _overlay(
        self, rows: list[Job], prefix: str, status: Status | None, after: str
    ) -> list[Job]:
        """Loaded rows with the batch's changes of matching ids applied, in id order."""
        changed = [i for i in self._touched if i.startswith(prefix) and i > after]
        if not changed:
            return rows
        by_id = {job.id: job for job in rows}
        for job_id in changed:
            job = self.jobs.get(job_id)
            if job is None or (status is not None and job.status is not status):
                by_id.pop(job_id, None)
            else:
                by_id[job_id] = job
        return [by_id[i] for i in sorted(by_id)]

    def changes(self) -> tuple[list[Job], list[Job], list[str]]:
        """(inserted, updated, deleted ids): the batch's net changes to jobs."""
        inserted: list[Job] = []
        updated: list[Job] = []
        deleted: list[str] = []
        before = self.loaded.jobs
        for job_id in self._touched:
            old, new = before.get(job_id), self.jobs.get(job_id)
            if new is old:
                continue
            if new is None:
                deleted.append(job_id)
            elif old is None:
                inserted.append(new)
            else:
                updated.append(new)
        return inserted, updated, deleted

    def count_changes(self) -> dict[Status, int]:
        """Jobs by status: this batch's net deltas."""
        deltas: dict[Status, int] = {}
        before = self.loaded.jobs
        for job_id in self._touched:
            old, new = before.get(job_id), self.jobs.get(job_id)
            if new is old:
                continue
            if old is not None:
                deltas[old.status] = deltas.get(old.status, 0) - 1
            if new is not None:
                deltas[new.status] = deltas.get(new.status, 0) + 1
        return {status: n for status, n in deltas.items() if n}

    # -- rules (the instance's index) -------------------------------------------

    def put_rule(self, rule: Rule) -> Rule | None:
        old = self._rules.put_rule(rule)
        self._rules_touched.setdefault(rule.id, old)
        return old

    def delete_rule(self, rule_id: str) -> Rule | None:
        old = self._rules.delete_rule(rule_id)
        self._rules_touched.setdefault(rule_id, old)
        return old

    def match_rule(self, job_id: str) -> Rule | None:
        return self._rules.match_rule(job_id)

    def list_rules(self, prefix: str, after: str, limit: int) -> list[Rule]:
        return self._rules.list_rules(prefix, after, limit)

    def rule_changes(self) -> tuple[list[Rule], list[str]]:
        """(rules put, rule ids deleted) by this batch."""
        put: list[Rule] = []
        deleted: list[str] = []
        for rule_id, old in self._rules_touched.items():
            new = self.rules.get(rule_id)
            if new is old:
                continue
            if new is None:
                deleted.append(rule_id)
            else:
                put.append(new)
        return put, deleted


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with `prefix`, in
    code point order (= UTF-8 byte order, = COLLATE "C"); None when there is
    none (an empty prefix, or one of U+10FFFF only). `id >= prefix AND id <
    bound` is then an index range scan of exactly the ids with that prefix."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = last + 1
            if 0xD800 <= following <= 0xDFFF:  # surrogates are not in any valid id
                following = 0xE000
            return "".join(chars) + chr(following)
    return None
