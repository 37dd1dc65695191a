"""The command actor (core/actor.py) against an in-memory fake log.

The fake records what is appended, can hold an append (to see that replies wait
for it and that waiting requests form one batch) and can be told to fail (to see
the rollback). Everything else is the real actor and the real State.
"""

from __future__ import annotations

import errno
import gc
import math
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing
from support.actor_harness import T0, FakeLog, Harness, running_actor

from kairoi_trio.commands import (
    CommandError,
    DeleteJob,
    DeleteRule,
    Dispatch,
    ErrorCode,
    ExpireFinished,
    GetInfo,
    GetJob,
    GetRule,
    JobPage,
    ListJobs,
    ListRules,
    MatchRule,
    RecordOutcome,
    Reply,
    Request,
    Result,
    ScheduleJob,
    ServerInfo,
    SetJob,
    SetRule,
    Subscribe,
    TriggerDue,
    TriggerResult,
    Unsubscribe,
)
from kairoi_trio.core.actor import (
    COMPACTION_RETRY_S,
    MAX_BATCH_COMMANDS,
    PROBE_ID,
    PROBE_INITIAL_S,
    PROBE_MAX_S,
    ActorClient,
    CommandActor,
    Observer,
    StorageUnavailable,
)
from kairoi_trio.core.failures import WINDOW_S, FailReason
from kairoi_trio.core.state import State
from kairoi_trio.core.validation import (
    MAX_ATTEMPTS,
    MAX_JOB_ID_BYTES,
    MAX_POLICY_SECONDS,
    RuleValidator,
)
from kairoi_trio.model import (
    MAX_TIME_US,
    MICROS,
    MIN_TIME_US,
    AmqpRunner,
    HttpRunner,
    Job,
    JobEvent,
    Rule,
    RulePolicy,
    Schedule,
    ShellRunner,
    Status,
)
from kairoi_trio.storage.records import JobDelete, JobPut, JobStatus, apply_record

YEAR_S = 365 * 86_400
BIG_BACKOFF = RulePolicy(max_attempts=3, backoff_initial_s=1e308, backoff_max_s=1e308)
TEN_THOUSAND_YEARS = RulePolicy(
    max_attempts=3, backoff_initial_s=10_000 * YEAR_S, backoff_max_s=10_000 * YEAR_S
)
SHELL = Rule("r.shell", "app.", ShellRunner("/bin/run.sh"))
HTTP = Rule("r.http", "web.", HttpRunner("http://localhost:8080/hook"))
ALL_KINDS = {"shell": 100, "amqp": 100, "http": 100}


def at(seconds: float) -> int:
    """An instant `seconds` after the clock's start."""
    return T0 + int(seconds * MICROS)


def observable(state: State) -> dict:
    """Everything a client can observe of a state, by value."""
    ids = list(state.jobs) + ["app.zzz", "web.zzz", "x", ""]
    return {
        "jobs": dict(state.jobs),
        "rules": dict(state.rules),
        "counts": dict(state.counts),
        "next_due": state.next_due(),
        "listing": state.list_jobs("", None, "", 10_000),
        "matches": {i: state.match_rule(i) for i in ids},
    }


def error_code(result: object) -> ErrorCode | None:
    return result.code if isinstance(result, CommandError) else None


# -- replies and group commit ----------------------------------------------------------


async def test_set_and_get_a_job() -> None:
    async with running_actor() as h:
        job = await h.call(SetJob("a", at(10), b"data"))
        assert job == Job("a", at(10), Status.PLANNED, b"data", 0, "", T0)
        assert await h.call(GetJob("a")) == job
        assert h.log.records == [JobPut(job)]
        assert h.state.next_due() == at(10)


async def test_reply_comes_only_after_the_append_returns() -> None:
    async with running_actor() as h:
        h.log.gate = trio.Event()
        replies: list = []
        await h.client.submit(Request([SetJob("a", at(1))], replies.append))
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.append_calls == 1
        assert replies == []
        h.log.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.log.batches) == 1
        assert replies[0][0].id == "a"


async def test_waiting_requests_form_one_batch_with_one_append() -> None:
    async with running_actor() as h:
        h.log.gate = trio.Event()
        replies: list = []
        await h.client.submit(Request([SetJob("first", at(1))], replies.append))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(50):  # queue up while the first append is in flight
            await h.client.submit(Request([SetJob(f"j{i}", at(1))], replies.append))
        h.log.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.append_calls == 2
        assert [len(batch) for batch in h.log.batches] == [1, 50]
        assert h.actor.batches == 2
        assert all(isinstance(r[0], Job) for r in replies)


async def test_a_batch_of_reads_appends_nothing() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a", at(1)))
        calls = h.log.append_calls
        results = await h.results(GetJob("a"), ListJobs(), ListRules(), GetInfo())
        assert h.log.append_calls == calls
        assert isinstance(results[3], ServerInfo)
        assert results[3].jobs_by_status[Status.PLANNED] == 1


# -- errors ------------------------------------------------------------------------------


async def test_a_refused_command_leaves_no_reference_cycle() -> None:
    # A CommandError the actor returned with its traceback, or one raised while a
    # frame still held it, made a cycle per failed call that only a full collection
    # frees; with the server's GC thresholds that is rare, and a failed GetJob of a
    # 2 MiB id kept ~6 MiB (tests/e2e/test_grpc_abuse.py).
    async with running_actor() as h:
        for _ in range(3):  # warm up: first calls create lasting objects
            with pytest.raises(CommandError):
                await h.client.call(GetJob("missing"))
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                with pytest.raises(CommandError) as info:
                    await h.client.call(GetJob("missing"))
                assert info.value.__traceback__ is not None
                del info
            assert gc.collect() < 50  # not one cycle per failed call
        finally:
            gc.enable()


async def test_set_on_a_triggered_job_is_refused() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await h.call(TriggerDue(at(0), ALL_KINDS))
        with pytest.raises(CommandError) as refused:
            await h.call(SetJob("app.1", at(100)))
        assert refused.value.code is ErrorCode.FAILED_PRECONDITION
        with pytest.raises(CommandError) as refused:
            await h.call(DeleteJob("app.1"))
        assert refused.value.code is ErrorCode.FAILED_PRECONDITION
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.execute_at) == (Status.TRIGGERED, at(0))


async def test_set_of_a_finished_job_plans_it_again() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0), b"old"))
        await h.call(TriggerDue(at(0), ALL_KINDS))
        await h.call(RecordOutcome("app.1", 1, ok=True))
        again = await h.call(SetJob("app.1", at(50), b"new"))
        assert (again.status, again.execute_at, again.payload, again.attempts) == (
            Status.PLANNED,
            at(50),
            b"new",
            0,
        )
        assert h.state.next_due() == at(50)


@pytest.mark.parametrize(
    "command",
    [GetJob("nope"), DeleteJob("nope"), GetRule("nope"), DeleteRule("nope")],
    ids=lambda c: type(c).__name__,
)
async def test_missing_ids_are_not_found(command: object) -> None:
    async with running_actor() as h:
        with pytest.raises(CommandError) as missing:
            await h.call(command)
        assert missing.value.code is ErrorCode.NOT_FOUND
        assert h.log.append_calls == 0


@pytest.mark.parametrize(
    "command",
    [
        SetJob("", at(1)),
        SetJob("a", at(1), b"x" * 101),
        SetJob("é" * 40_000, at(1)),  # 80,000 bytes of UTF-8
        SetRule(Rule("", "app.", ShellRunner("/bin/true"))),
        SetRule(Rule("r", "app.", ShellRunner(""))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/evil.sh"))),
        SetRule(Rule("r", "w.", HttpRunner("ftp://example.com/"))),
        SetRule(Rule("r", "w.", HttpRunner("http://"))),
        SetRule(Rule("r", "w.", HttpRunner("http://example.com:99999/"))),
        SetRule(Rule("r", "w.", HttpRunner("not a url"))),
        SetRule(Rule("r", "q.", AmqpRunner("http://broker/", "ex", "rk"))),
        SetRule(Rule("r", "q.", AmqpRunner("amqp://:5672/", "ex", "rk"))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(max_attempts=0))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(timeout_s=0))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(stale_after_s=-1))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(backoff_initial_s=-1))),
        ListJobs(limit=0),
        # a prefix no id could start with: longer than an id may be, or holding NUL
        ListJobs(prefix="a" * (MAX_JOB_ID_BYTES + 1)),
        ListJobs(prefix="é" * (MAX_JOB_ID_BYTES // 2 + 1)),  # 2 bytes a character
        ListJobs(prefix="app.\x00"),
        ListRules(prefix="r" * (MAX_JOB_ID_BYTES + 1)),
        # NUL can never reach a process: refused in every id, pattern and command
        SetJob("app.\x00x", at(1)),
        SetRule(Rule("r\x00", "app.", ShellRunner("/bin/ok.sh"))),
        SetRule(Rule("r", "app.\x00", ShellRunner("/bin/ok.sh"))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh\x00"))),
        # times outside 0001-01-01 .. 9999-12-31
        SetJob("a", MAX_TIME_US + 1),
        SetJob("a", MIN_TIME_US - 1),
        # policy bounds (core/validation.py)
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(max_attempts=1001))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(max_attempts=1026))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), BIG_BACKOFF)),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), TEN_THOUSAND_YEARS)),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(timeout_s=math.inf))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(stale_after_s=math.nan))),
        SetRule(Rule("r", "app.", ShellRunner("/bin/ok.sh"), RulePolicy(backoff_max_s=math.inf))),
        # what no runner could deliver
        SetRule(Rule("r", "w.", HttpRunner("http://example.com/a\nb"))),
        SetRule(Rule("r", "q.", AmqpRunner("amqp://broker/\x00", "ex", "rk"))),
        SetRule(Rule("r", "q.", AmqpRunner("amqp://broker/", "e" * 256, "rk"))),
        SetRule(Rule("r", "q.", AmqpRunner("amqp://broker/", "ex", "k" * 256))),
        SetRule(Rule("r", "app.", ShellRunner("x" * 65_536))),
    ],
    ids=lambda c: repr(c)[:60],
)
async def test_invalid_commands_are_refused_and_nothing_is_appended(command: object) -> None:
    async with running_actor(
        max_payload_bytes=100, rule_validator=RuleValidator(["/bin/ok.sh"])
    ) as h:
        with pytest.raises(CommandError) as refused:
            await h.call(command)
        assert refused.value.code is ErrorCode.INVALID_ARGUMENT
        assert refused.value.message
        assert h.log.append_calls == 0
        assert h.state.jobs == {} and h.state.rules == {}


async def test_valid_rules_and_limits_are_accepted() -> None:
    async with running_actor(
        max_payload_bytes=100, rule_validator=RuleValidator(["/bin/ok.sh"])
    ) as h:
        await h.call(SetJob("a", at(1), b"x" * 100))
        await h.call(SetJob("é" * 30_000, at(1)))  # 60,000 bytes
        await h.call(SetRule(Rule("s", "app.", ShellRunner("/bin/ok.sh"))))
        await h.call(SetRule(Rule("h", "w.", HttpRunner("https://example.com:8443/x"))))
        await h.call(SetRule(Rule("q", "q.", AmqpRunner("amqp://u:p@broker:5672/vh", "e", "k"))))
        assert len(h.log.batches) == 5
        assert await h.call(GetRule("s")) == Rule("s", "app.", ShellRunner("/bin/ok.sh"))


async def test_an_invalid_command_does_not_spoil_its_batch() -> None:
    async with running_actor() as h:
        ok, bad, ok2 = await h.results(SetJob("a", at(1)), SetJob("", at(1)), SetJob("b", at(2)))
        assert isinstance(ok, Job) and isinstance(ok2, Job)
        assert error_code(bad) is ErrorCode.INVALID_ARGUMENT
        assert set(h.state.jobs) == {"a", "b"}
        assert len(h.log.batches) == 1


# -- storage failure ----------------------------------------------------------------------


async def populate(h: Harness) -> None:
    """Jobs in every status and rules, all committed."""
    await h.call(SetRule(SHELL))
    await h.call(SetRule(HTTP))
    await h.call(SetRule(Rule("r.old", "old.", ShellRunner("/bin/old.sh"))))
    for job_id, seconds in [("app.1", 0), ("app.2", 1), ("web.1", 2), ("app.done", 0)]:
        await h.call(SetJob(job_id, at(seconds), b"p-" + job_id.encode()))
    await h.call(SetJob("app.later", at(3600)))
    await h.call(SetJob("app.fail", at(0)))
    result = await h.call(TriggerDue(at(0), ALL_KINDS))
    assert {d.job.id for d in result.dispatches} == {"app.1", "app.done", "app.fail"}
    await h.call(RecordOutcome("app.done", 1, ok=True))
    await h.call(RecordOutcome("app.fail", 1, ok=False, message="boom"))


async def test_storage_failure_fails_writers_and_rolls_back_exactly() -> None:
    async with running_actor() as h:
        await populate(h)
        h.clock.advance(10)
        before = observable(h.state)
        committed = len(h.log.batches)
        h.log.fail = True
        results = await h.results(
            # before the batch's first change: answered as usual
            GetJob("app.1"),
            ListRules(),
            SetJob("", at(1)),  # invalid
            GetJob("missing"),
            # from the first change on: all UNAVAILABLE
            SetJob("new", at(5)),  # create
            SetJob("app.2", at(50), b"changed"),  # replace a planned job
            SetJob("app.done", at(60)),  # replan a finished job
            DeleteJob("app.later"),
            SetRule(Rule("r.new", "ap", ShellRunner("/bin/new.sh"))),
            SetRule(Rule("r.http", "web.x", HttpRunner("http://other/"))),  # replace
            DeleteRule("r.old"),
            TriggerDue(at(10), ALL_KINDS),  # would trigger app.2 and web.1, fail "new"
            RecordOutcome("app.1", 1, ok=True),
            ExpireFinished(before=at(100)),
            GetJob("new"),  # would be a dirty read of the failed SetJob
        )
        get, rules, invalid, missing, *failed = results
        assert [error_code(r) for r in failed] == [ErrorCode.UNAVAILABLE] * len(failed)
        assert all("storage" in r.message for r in failed)
        assert get == before["jobs"]["app.1"]
        assert [r.id for r in rules] == ["r.http", "r.old", "r.shell"]
        assert error_code(invalid) is ErrorCode.INVALID_ARGUMENT
        assert error_code(missing) is ErrorCode.NOT_FOUND
        assert observable(h.state) == before
        assert len(h.log.batches) == committed

        # The next batch works, from the state as it was.
        h.log.fail = False
        assert (await h.call(SetJob("new", at(5)))).id == "new"
        result = await h.call(TriggerDue(at(10), ALL_KINDS))
        assert [d.job.id for d in result.dispatches] == ["app.2", "web.1"]
        assert h.state.jobs["new"].status is Status.FAILED  # no rule matches it
        assert (await h.call(GetJob("app.later"))).status is Status.PLANNED
        assert (await h.call(GetRule("r.old"))).pattern == "old."
        assert await h.call(ExpireFinished(before=at(100))) == 3  # app.done, app.fail, new


async def test_storage_failure_fails_every_request_of_the_batch() -> None:
    async with running_actor() as h:
        await h.call(SetJob("kept", at(1)))
        h.log.gate = trio.Event()
        h.log.fail = True
        replies: dict[str, list[Any]] = {}

        def keep(name: str) -> Reply:
            def reply(results: list[Result]) -> None:
                replies.setdefault(name, results)

            return reply

        await h.client.submit(Request([SetJob("a", at(1))], keep("a")))
        await trio.testing.wait_all_tasks_blocked()
        # the next batch: a read, then writes
        await h.client.submit(Request([GetJob("kept")], keep("read")))
        for name in ["b", "c"]:
            await h.client.submit(Request([SetJob(name, at(1))], keep(name)))
        h.log.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        for name in ["a", "b", "c"]:
            assert error_code(replies[name][0]) is ErrorCode.UNAVAILABLE
        assert replies["read"][0].id == "kept"
        assert set(h.state.jobs) == {"kept"}
        h.log.fail = False
        await h.call(SetJob("b", at(1)))
        assert set(h.state.jobs) == {"kept", "b"}


async def test_a_storage_error_other_than_oserror_is_not_swallowed_as_success() -> None:
    class DiskGone(Exception):
        pass

    async with running_actor(storage_errors=(DiskGone,)) as h:

        async def broken(records: list) -> None:
            raise DiskGone("gone")

        h.log.append = broken  # type: ignore[method-assign]
        result = (await h.results(SetJob("a", at(1))))[0]
        assert error_code(result) is ErrorCode.UNAVAILABLE
        assert h.state.jobs == {}


async def test_a_read_in_a_failed_batch_does_not_see_the_writes_that_failed() -> None:
    async with running_actor() as h:
        h.log.fail = True
        set_result, get_result = await h.results(SetJob("ghost", at(1)), GetJob("ghost"))
        assert error_code(set_result) is ErrorCode.UNAVAILABLE
        assert "ghost" not in h.state.jobs
        # The client must not be told the job exists (it never will).
        assert isinstance(get_result, CommandError)


async def test_expire_after_a_failed_set_of_a_finished_job() -> None:
    async with running_actor() as h:
        await populate(h)
        h.log.fail = True
        assert error_code((await h.results(SetJob("app.done", at(99))))[0]) is ErrorCode.UNAVAILABLE
        h.log.fail = False
        assert await h.call(ExpireFinished(before=at(100))) == 2
        assert "app.done" not in h.state.jobs


async def test_expire_after_a_failed_expire_still_expires_the_old_jobs() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.old", at(0)))
        await h.call(TriggerDue(at(0), ALL_KINDS))
        await h.call(RecordOutcome("app.old", 1, ok=True))  # finished at T0
        h.clock.advance(100)
        await h.call(SetJob("app.new", at(100)))
        await h.call(TriggerDue(at(100), ALL_KINDS))
        await h.call(RecordOutcome("app.new", 1, ok=True))  # finished at T0 + 100 s
        h.log.fail = True
        failed = (await h.results(ExpireFinished(before=at(50))))[0]
        assert error_code(failed) is ErrorCode.UNAVAILABLE
        assert "app.old" in h.state.jobs
        h.log.fail = False
        assert await h.call(ExpireFinished(before=at(50))) == 1
        assert "app.old" not in h.state.jobs


# -- triggering -----------------------------------------------------------------------------


async def test_trigger_pairs_due_jobs_with_rules_oldest_first() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetRule(HTTP))
        await h.call(SetRule(Rule("r.mail", "app.mail.", ShellRunner("/bin/mail.sh"))))
        for job_id, seconds in [("web.1", 3), ("app.1", 1), ("app.mail.1", 2), ("app.x", 99)]:
            await h.call(SetJob(job_id, at(seconds)))
        h.clock.advance(5)
        result = await h.call(TriggerDue(at(5), ALL_KINDS))
        assert isinstance(result, TriggerResult)
        assert not result.deferred
        assert [(d.job.id, d.rule.id) for d in result.dispatches] == [
            ("app.1", "r.shell"),
            ("app.mail.1", "r.mail"),
            ("web.1", "r.http"),
        ]
        for dispatch in result.dispatches:
            assert dispatch.job == h.state.jobs[dispatch.job.id]
            assert (dispatch.job.status, dispatch.job.attempts) == (Status.TRIGGERED, 1)
            assert dispatch.job.updated_at == at(5)
        assert h.state.jobs["app.x"].status is Status.PLANNED
        assert h.state.next_due() == at(99)
        # durably: one status record per triggered job, in the same append
        assert h.log.batches[-1] == [
            JobStatus(d.job.id, Status.TRIGGERED, 1, "", at(5)) for d in result.dispatches
        ]


async def test_trigger_fails_jobs_without_a_rule_with_a_reason() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("appx", at(1)))  # "app." is not a prefix of "appx"
        await h.call(SetJob("app.1", at(2)))
        result = await h.call(TriggerDue(at(5), ALL_KINDS))
        assert [d.job.id for d in result.dispatches] == ["app.1"]
        failed = await h.call(GetJob("appx"))
        assert failed.status is Status.FAILED
        assert "no rule" in failed.last_outcome
        assert h.state.next_due() is None


async def test_a_full_runner_kind_defers_its_jobs_and_not_the_others() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetRule(HTTP))
        for i in range(4):
            await h.call(SetJob(f"app.{i}", at(i)))
        for i in range(2):
            await h.call(SetJob(f"web.{i}", at(10 + i)))
        result = await h.call(TriggerDue(at(20), {"shell": 1, "http": 10, "amqp": 10}))
        assert [d.job.id for d in result.dispatches] == ["app.0", "web.0", "web.1"]
        assert result.deferred == {"shell"}
        for i in (1, 2, 3):
            assert h.state.jobs[f"app.{i}"].status is Status.PLANNED
        # They wait in the shell line, in order, out of the due heap (popped once only).
        assert [job.id for job in h.state.waiting["shell"]] == ["app.1", "app.2", "app.3"]
        assert h.state.next_due() is None

        result = await h.call(TriggerDue(at(20), {"shell": 0, "http": 10, "amqp": 10}))
        assert (result.dispatches, result.deferred) == ([], {"shell"})

        result = await h.call(TriggerDue(at(21), {"shell": 5, "http": 10, "amqp": 10}))
        assert [d.job.id for d in result.dispatches] == ["app.1", "app.2", "app.3"]
        assert not result.deferred
        assert h.state.next_due() is None


async def test_a_waiting_job_that_changed_meanwhile_is_served_as_it_is_now() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        for job_id in ("app.a", "app.b", "app.c"):
            await h.call(SetJob(job_id, at(1)))
        result = await h.call(TriggerDue(at(5), {"shell": 0}))
        assert result.deferred == {"shell"}
        await h.call(DeleteJob("app.a"))  # gone: skipped
        await h.call(SetJob("app.b", at(100)))  # no longer due: waits for its new time
        await h.call(SetJob("app.c", at(1), b"new payload"))  # same time, new payload
        result = await h.call(TriggerDue(at(5), {"shell": 10}))
        assert [(d.job.id, d.job.payload) for d in result.dispatches] == [("app.c", b"new payload")]
        result = await h.call(TriggerDue(at(100), {"shell": 10}))
        assert [d.job.id for d in result.dispatches] == ["app.b"]
        result = await h.call(TriggerDue(at(200), {"shell": 10}))
        assert result.dispatches == [] and not result.deferred


async def test_a_large_backlog_is_taken_from_the_heap_in_bounded_steps() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.results(*[SetJob(f"app.{i:05d}", at(1)) for i in range(100 + 10)])
        first = await h.call(TriggerDue(at(2), {"shell": 3}, limit=100))
        assert first.more_due and len(first.dispatches) == 3
        second = await h.call(TriggerDue(at(2), {"shell": 3}, limit=100))
        assert not second.more_due
        ids = [d.job.id for d in first.dispatches + second.dispatches]
        assert ids == [f"app.{i:05d}" for i in range(6)]  # oldest first, across calls


async def test_a_job_whose_runner_kind_is_not_configured_fails() -> None:
    async with running_actor() as h:
        await h.call(SetRule(HTTP))
        await h.call(SetJob("web.1", at(0)))
        result = await h.call(TriggerDue(at(0), {"shell": 5}))
        assert result.dispatches == []
        failed = await h.call(GetJob("web.1"))
        assert failed.status is Status.FAILED
        assert "http" in failed.last_outcome


async def test_stale_after_fails_overdue_jobs_without_running_them() -> None:
    stale_rule = Rule("r.stale", "s.", ShellRunner("/bin/s.sh"), RulePolicy(stale_after_s=5))
    async with running_actor() as h:
        await h.call(SetRule(stale_rule))
        await h.call(SetJob("s.old", at(0)))
        await h.call(SetJob("s.fresh", at(6)))
        await h.call(SetJob("s.edge", at(5)))  # overdue by exactly the limit: still runs
        h.clock.advance(10)
        result = await h.call(TriggerDue(at(10), ALL_KINDS))
        assert [d.job.id for d in result.dispatches] == ["s.edge", "s.fresh"]
        old = await h.call(GetJob("s.old"))
        assert old.status is Status.FAILED
        assert "stale" in old.last_outcome
        assert old.attempts == 0


async def test_trigger_with_nothing_due_changes_nothing() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(10)))
        calls = h.log.append_calls
        result = await h.call(TriggerDue(at(9), ALL_KINDS))
        assert result == TriggerResult([], frozenset())
        assert h.log.append_calls == calls


# -- outcomes --------------------------------------------------------------------------------


async def trigger_one(h: Harness, job_id: str, now: int) -> Dispatch:
    result = await h.call(TriggerDue(now, ALL_KINDS))
    (dispatch,) = [d for d in result.dispatches if d.job.id == job_id]
    return dispatch


async def test_success_marks_the_job_executed() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0), b"keep me"))
        dispatch = await trigger_one(h, "app.1", at(0))
        h.clock.advance(3)
        attempt = dispatch.job.attempts
        await h.call(RecordOutcome("app.1", attempt, ok=True, message="exit status 0"))
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.last_outcome, job.attempts, job.updated_at) == (
            Status.EXECUTED,
            "exit status 0",
            1,
            at(3),
        )
        assert job.payload == b"keep me"
        assert h.log.records[-1] == JobStatus("app.1", Status.EXECUTED, 1, "exit status 0", at(3))


async def test_a_failure_without_retries_marks_the_job_failed() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await trigger_one(h, "app.1", at(0))
        await h.call(RecordOutcome("app.1", 1, ok=False, message="exit status 3"))
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.last_outcome) == (Status.FAILED, "exit status 3")
        assert h.state.next_due() is None


async def test_a_failure_with_retries_plans_again_with_backoff_until_attempts_run_out() -> None:
    policy = RulePolicy(max_attempts=3, backoff_initial_s=2, backoff_max_s=3)
    async with running_actor() as h:
        await h.call(SetRule(Rule("r", "app.", ShellRunner("/bin/x.sh"), policy)))
        await h.call(SetJob("app.1", at(0)))

        await trigger_one(h, "app.1", at(0))
        h.clock.advance(1)
        await h.call(RecordOutcome("app.1", 1, ok=False, message="exit status 1", policy=policy))
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.execute_at, job.attempts) == (Status.PLANNED, at(1 + 2), 1)
        assert "exit status 1" in job.last_outcome
        assert h.state.next_due() == at(3)
        assert (await h.call(TriggerDue(at(2.9), ALL_KINDS))).dispatches == []

        h.clock.advance(2)
        second = await trigger_one(h, "app.1", at(3))
        assert second.job.attempts == 2
        await h.call(RecordOutcome("app.1", 2, ok=False, message="exit status 2", policy=policy))
        job = await h.call(GetJob("app.1"))
        # min(backoff_max_s, 2 * 2 ** 1) = 3 s after now
        assert (job.status, job.execute_at, job.attempts) == (Status.PLANNED, at(3 + 3), 2)

        h.clock.advance(3)
        third = await trigger_one(h, "app.1", at(6))
        assert third.job.attempts == 3
        await h.call(RecordOutcome("app.1", 3, ok=False, message="exit status 9", policy=policy))
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.attempts, job.last_outcome) == (Status.FAILED, 3, "exit status 9")
        assert h.state.next_due() is None


async def test_setting_a_job_again_resets_its_attempts() -> None:
    policy = RulePolicy(max_attempts=2, backoff_initial_s=1)
    async with running_actor() as h:
        await h.call(SetRule(Rule("r", "app.", ShellRunner("/bin/x.sh"), policy)))
        await h.call(SetJob("app.1", at(0)))
        await trigger_one(h, "app.1", at(0))
        await h.call(RecordOutcome("app.1", 1, ok=False, policy=policy))
        assert (await h.call(GetJob("app.1"))).attempts == 1
        await h.call(SetJob("app.1", at(0)))
        assert (await h.call(GetJob("app.1"))).attempts == 0
        assert (await trigger_one(h, "app.1", at(0))).job.attempts == 1


async def test_a_job_set_again_keeps_one_copy_of_its_id() -> None:
    """The jobs dict keeps its first key object on a re-set: the new Job must use
    it, or the state holds the id twice (an id may be 65,535 bytes)."""
    async with running_actor() as h:
        # each command's id a string object of its own, as a protocol decodes it
        await h.call(SetJob("".join(["app.", "1"]), at(5)))
        (key,) = [k for k in h.state.jobs if k == "app.1"]
        await h.call(SetJob("".join(["app.", "1"]), at(9)))
        assert h.state.jobs["app.1"].id is key
        await h.call(ScheduleJob("".join(["app.", "1"]), Schedule("every 60s")))
        assert h.state.jobs["app.1"].id is key


async def test_outcomes_of_superseded_runs_are_ignored() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await trigger_one(h, "app.1", at(0))
        calls = h.log.append_calls
        for attempt in (0, 2):
            assert await h.call(RecordOutcome("app.1", attempt, ok=True)) is None
        assert await h.call(RecordOutcome("unknown", 1, ok=True)) is None
        assert h.log.append_calls == calls
        assert (await h.call(GetJob("app.1"))).status is Status.TRIGGERED
        # an outcome for a job that is no longer triggered changes nothing either
        await h.call(RecordOutcome("app.1", 1, ok=True))
        await h.call(RecordOutcome("app.1", 1, ok=False))
        assert (await h.call(GetJob("app.1"))).status is Status.EXECUTED


async def test_expire_finished_drops_old_executed_and_failed_jobs() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        for job_id in ["app.ok", "app.ko", "app.run"]:
            await h.call(SetJob(job_id, at(0)))
        await h.call(SetJob("app.plan", at(1000)))
        await h.call(SetJob("orphan", at(0)))  # fails at trigger: no rule
        await h.call(TriggerDue(at(0), ALL_KINDS))
        await h.call(RecordOutcome("app.ok", 1, ok=True))
        h.clock.advance(60)
        await h.call(RecordOutcome("app.ko", 1, ok=False))  # finished 60 s later
        assert await h.call(ExpireFinished(before=at(30))) == 2
        assert set(h.state.jobs) == {"app.ko", "app.run", "app.plan"}
        assert sorted(h.log.batches[-1], key=repr) == [JobDelete("app.ok"), JobDelete("orphan")]
        assert await h.call(ExpireFinished(before=at(30))) == 0
        assert await h.call(ExpireFinished(before=at(61), limit=10)) == 1
        assert set(h.state.jobs) == {"app.run", "app.plan"}


# -- listing and info ----------------------------------------------------------------------


async def test_list_jobs_and_rules_pages() -> None:
    async with running_actor() as h:
        for i in range(5):
            await h.call(SetJob(f"a.{i}", at(i)))
        await h.call(SetJob("b.0", at(0)))
        page = await h.call(ListJobs(prefix="a.", limit=3))
        assert isinstance(page, JobPage)
        assert [j.id for j in page.jobs] == ["a.0", "a.1", "a.2"]
        page = await h.call(ListJobs(prefix="a.", after=page.next_after, limit=3))
        assert [j.id for j in page.jobs] == ["a.3", "a.4"]
        assert page.next_after == ""
        await h.call(SetRule(SHELL))
        await h.call(SetRule(HTTP))
        assert await h.call(ListRules(prefix="r.w")) == []
        assert await h.call(ListRules()) == [HTTP, SHELL]
        info = await h.call(GetInfo())
        assert (info.rules, info.jobs_by_status[Status.PLANNED]) == (2, 6)


async def test_match_rule_answers_the_rule_a_job_would_pair_with() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        assert await h.call(MatchRule("app.mail.1")) == SHELL
        assert await h.call(MatchRule("nothing")) is None  # a job needs not exist
        longer = Rule("r.mail", "app.mail.", ShellRunner("/bin/mail.sh"))
        # in one batch with the rule change: the answer sees it
        results = await h.results(SetRule(longer), MatchRule("app.mail.1"), MatchRule("app.x"))
        assert results[1:] == [longer, SHELL]
        await h.call(DeleteRule("r.mail"))
        assert await h.call(MatchRule("app.mail.1")) == SHELL


# -- watching --------------------------------------------------------------------------------


class Sink:
    def __init__(self, keep: bool = True) -> None:
        self.batches: list[list[JobEvent]] = []
        self.keep = keep

    def __call__(self, events: list[JobEvent]) -> bool:
        self.batches.append(events)
        return self.keep

    @property
    def events(self) -> list[tuple[str, Status, bool]]:
        return [(e.job.id, e.job.status, e.deleted) for b in self.batches for e in b]


async def test_subscribe_gives_a_snapshot_then_matching_events() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a.1", at(1)))
        await h.call(SetJob("b.1", at(1)))
        sink = Sink()
        snapshot = await h.call(Subscribe("a.", snapshot=True, sink=sink))
        assert [j.id for j in snapshot.jobs] == ["a.1"] and snapshot.next_after == ""
        assert sink.batches == []
        await h.call(SetJob("a.2", at(2)))
        await h.call(SetJob("b.2", at(2)))
        await h.call(DeleteJob("a.1"))
        assert sink.events == [("a.2", Status.PLANNED, False), ("a.1", Status.PLANNED, True)]
        assert [len(b) for b in sink.batches] == [1, 1]  # nothing delivered for b.2


async def test_subscribe_with_a_prefix_no_id_could_start_with_is_refused() -> None:
    async with running_actor() as h:
        sink = Sink()
        for prefix in ("a" * (MAX_JOB_ID_BYTES + 1), "a.\x00"):
            with pytest.raises(CommandError) as refused:
                await h.call(Subscribe(prefix, snapshot=True, sink=sink))
            assert refused.value.code is ErrorCode.INVALID_ARGUMENT
            assert "prefix" in refused.value.message
        longest = "a" * MAX_JOB_ID_BYTES  # as long as an id may be: a watch of that one id
        assert await h.call(Subscribe(longest, snapshot=False, sink=sink)) == JobPage([], "")
        await h.call(SetJob(longest, at(1)))
        await h.call(SetJob("a.1", at(1)))
        assert sink.events == [(longest, Status.PLANNED, False)]  # refused ones left no watch


async def test_subscribe_without_snapshot_returns_nothing() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a.1", at(1)))
        sink = Sink()
        assert await h.call(Subscribe("", snapshot=False, sink=sink)) == JobPage([], "")
        await h.call(SetJob("z", at(1)))
        assert sink.events == [("z", Status.PLANNED, False)]


async def test_events_are_delivered_after_the_commit_one_call_per_batch() -> None:
    async with running_actor() as h:
        sink = Sink()
        await h.call(Subscribe("", snapshot=False, sink=sink))
        h.log.gate = trio.Event()
        done = trio.Event()
        await h.client.submit(
            Request([SetJob("x", at(1)), SetJob("y", at(2))], lambda r: done.set())
        )
        await trio.testing.wait_all_tasks_blocked()
        assert sink.batches == []  # the append has not returned
        h.log.gate.set()
        with trio.fail_after(5):
            await done.wait()
        assert sink.events == [("x", Status.PLANNED, False), ("y", Status.PLANNED, False)]
        assert len(sink.batches) == 1


async def test_events_follow_the_life_of_a_job() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        sink = Sink()
        await h.call(Subscribe("app.", snapshot=False, sink=sink))
        await h.call(SetJob("app.1", at(0)))
        await trigger_one(h, "app.1", at(0))
        await h.call(RecordOutcome("app.1", 1, ok=True))
        await h.call(ExpireFinished(before=at(100)))
        assert sink.events == [
            ("app.1", Status.PLANNED, False),
            ("app.1", Status.TRIGGERED, False),
            ("app.1", Status.EXECUTED, False),
            ("app.1", Status.EXECUTED, True),
        ]


async def test_subscribe_in_a_batch_sees_exactly_the_later_changes() -> None:
    async with running_actor() as h:
        sink = Sink()
        results = await h.results(
            SetJob("a", at(1)),
            Subscribe("", snapshot=True, sink=sink),
            SetJob("b", at(1)),
        )
        assert [j.id for j in results[1].jobs] == ["a"]  # in the snapshot, so no event
        assert sink.events == [("b", Status.PLANNED, False)]


async def test_a_sink_returning_false_ends_its_subscription() -> None:
    async with running_actor() as h:
        quitter, stayer = Sink(keep=False), Sink()
        await h.call(Subscribe("", snapshot=False, sink=quitter))
        await h.call(Subscribe("", snapshot=False, sink=stayer))
        await h.call(SetJob("a", at(1)))
        await h.call(SetJob("b", at(1)))
        assert quitter.events == [("a", Status.PLANNED, False)]
        assert [e[0] for e in stayer.events] == ["a", "b"]


async def test_a_sink_that_raises_is_dropped_and_the_actor_goes_on() -> None:
    calls = []

    def broken(events: list[JobEvent]) -> bool:
        calls.append(events)
        raise RuntimeError("consumer bug")

    async with running_actor() as h:
        await h.call(Subscribe("", snapshot=False, sink=broken))
        await h.call(SetJob("a", at(1)))
        await h.call(SetJob("b", at(1)))
        assert len(calls) == 1
        assert set(h.state.jobs) == {"a", "b"}


async def test_unsubscribe_stops_events() -> None:
    async with running_actor() as h:
        sink = Sink()
        await h.call(Subscribe("", snapshot=False, sink=sink))
        await h.call(SetJob("a", at(1)))
        await h.call(Unsubscribe(sink))
        await h.call(SetJob("b", at(1)))
        assert [e[0] for e in sink.events] == ["a"]


async def test_unsubscribe_with_a_bound_method_sink() -> None:
    """The gRPC bridge passes `watch.sink`, a new bound-method object at each access."""
    async with running_actor() as h:
        sink = Sink()
        await h.call(Subscribe("", snapshot=False, sink=sink.__call__))
        await h.call(SetJob("a", at(1)))
        await h.call(Unsubscribe(sink.__call__))
        await h.call(SetJob("b", at(1)))
        assert [e[0] for e in sink.events] == ["a"]
        assert not h.actor._subscribers


async def test_no_events_for_a_failed_batch() -> None:
    async with running_actor() as h:
        sink = Sink()
        await h.call(Subscribe("", snapshot=False, sink=sink))
        h.log.fail = True
        await h.results(SetJob("a", at(1)), SetJob("b", at(1)))
        assert sink.batches == []
        h.log.fail = False
        await h.call(SetJob("c", at(1)))
        assert sink.events == [("c", Status.PLANNED, False)]


async def test_subscriptions_in_a_failed_batch_stand_if_and_only_if_answered() -> None:
    async with running_actor() as h:
        await h.call(SetJob("kept", at(1)))
        before, after = Sink(), Sink()
        h.log.fail = True
        snapshot, failed, refused = await h.results(
            Subscribe("", snapshot=True, sink=before),  # answered before the first change
            SetJob("x", at(1)),
            Subscribe("", snapshot=True, sink=after),  # answered with the batch's failure
        )
        assert [j.id for j in snapshot.jobs] == ["kept"]
        assert error_code(failed) is ErrorCode.UNAVAILABLE
        assert error_code(refused) is ErrorCode.UNAVAILABLE
        h.log.fail = False
        await h.call(SetJob("y", at(1)))
        # the client told it is watching gets events; the one told it failed gets none
        assert before.events == [("y", Status.PLANNED, False)]
        assert after.batches == []


# -- compaction and commit hooks -------------------------------------------------------------


async def test_compaction_starts_when_the_log_grows_past_the_threshold() -> None:
    async with running_actor(compact_after_bytes=500) as h:
        h.log.record_bytes = 100
        for i in range(4):
            await h.call(SetJob(f"j{i}", at(i)))
        assert h.log.rotations == 0
        await h.call(SetRule(SHELL))  # 500 bytes since the snapshot
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 1
        assert len(h.log.snapshots) == 1
        seq, jobs, rules = h.log.snapshots[0]
        assert seq == 1
        assert jobs == h.state.jobs
        assert rules == {SHELL.id: SHELL}


async def test_the_snapshot_is_the_state_at_rotation_not_later() -> None:
    async with running_actor(compact_after_bytes=300) as h:
        h.log.snapshot_gate = trio.Event()
        for i in range(3):
            await h.call(SetJob(f"j{i}", at(i)))
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 1
        # writes go on while the snapshot is being written, without a second rotation
        for i in range(3, 9):
            await h.call(SetJob(f"j{i}", at(i)))
        assert h.log.rotations == 1
        h.log.snapshot_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        seq, jobs, _ = h.log.snapshots[0]
        assert sorted(jobs) == ["j0", "j1", "j2"]
        # once it is written, the next threshold crossing compacts again
        await h.call(SetJob("j9", at(9)))
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 2


async def test_no_compaction_below_the_snapshot_size_or_when_disabled() -> None:
    async with running_actor(compact_after_bytes=500) as h:
        h.log.snapshot_bytes = 10_000  # the log must also outgrow the live data
        for i in range(20):
            await h.call(SetJob(f"j{i}", at(i)))
        assert h.log.rotations == 0
    async with running_actor() as h:  # compact_after_bytes=0: never
        for i in range(20):
            await h.call(SetJob(f"j{i}", at(i)))
        assert h.log.rotations == 0


async def test_compact_ratio_compacts_at_a_fraction_of_the_snapshot() -> None:
    """[storage] compact_ratio: with a snapshot of 10,000 bytes, the log is compacted once
    ratio x 10,000 bytes follow the snapshot, and not before (0.25 is the default)."""
    for ratio, threshold in ((0.5, 5_000), (None, 2_500)):
        options: dict[str, object] = {} if ratio is None else {"compact_ratio": ratio}
        async with running_actor(None, compact_after_bytes=500, **options) as h:
            h.log.snapshot_bytes = 10_000
            h.log.record_bytes = 100
            for i in range(threshold // 100 - 1):
                await h.call(SetJob(f"j{i}", at(i)))
            await trio.testing.wait_all_tasks_blocked()
            assert h.log.rotations == 0, ratio
            await h.call(SetJob("last", at(1)))
            await trio.testing.wait_all_tasks_blocked()
            assert h.log.rotations == 1, ratio


async def test_on_commit_sees_every_batch() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a", at(1)))
        await h.call(GetJob("a"))
        h.log.fail = True
        await h.results(SetJob("b", at(1)))
        assert h.commits == [1, 1, 1]


async def test_the_actor_stops_when_every_sender_has_closed() -> None:
    send, receive = trio.open_memory_channel[Request](10)
    actor = CommandActor(State(), FakeLog(), receive)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            client = ActorClient(send)
            other = client.clone()
            await client.call(SetJob("a", at(1)))
            await client.aclose()
            assert (await other.call(GetJob("a"))).id == "a"
            await other.aclose()
    assert "a" in actor.state.jobs


async def test_a_failed_compaction_is_retried_after_a_pause_not_after_every_batch(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running_actor(compact_after_bytes=500) as h:
        h.log.snapshot_fail = True
        h.log.record_bytes = 1000  # every batch crosses the threshold
        await h.call(SetJob("a", at(1)))
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 1 and h.log.snapshots == []
        for i in range(5):  # no new attempt while the pause lasts
            await h.call(SetJob(f"b{i}", at(1)))
            await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 1
        h.log.snapshot_fail = False
        await trio.sleep(COMPACTION_RETRY_S + 1)
        await h.call(SetJob("c", at(1)))
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 2 and len(h.log.snapshots) == 1


# -- the job life's faults (issue 7): never stuck triggered, nothing out of range -------


def rule_with(policy: RulePolicy) -> Rule:
    return Rule("r", "app.", ShellRunner("/bin/x.sh"), policy)


async def test_refusals_name_the_reason() -> None:
    async with running_actor() as h:
        for command, reason in [
            (SetJob("app.\x00", at(1)), "job id must not contain the NUL character"),
            (SetRule(Rule("r", "a\x00", SHELL.runner)), "pattern must not contain the NUL"),
            (SetRule(Rule("r", "a", ShellRunner("x\x00y"))), "shell command must not contain"),
            (SetJob("a", MAX_TIME_US + 1), "outside the supported range 0001-01-01 to 9999-12-31"),
            (SetRule(rule_with(RulePolicy(max_attempts=1026))), "from 1 to 1000, not 1026"),
            (SetRule(rule_with(BIG_BACKOFF)), "backoff_initial_s must be from 0 to 3,153,600,000"),
        ]:
            with pytest.raises(CommandError, match=reason):
                await h.call(command)


async def test_values_at_the_bounds_are_accepted() -> None:
    most = RulePolicy(
        timeout_s=MAX_POLICY_SECONDS,
        max_attempts=MAX_ATTEMPTS,
        backoff_initial_s=MAX_POLICY_SECONDS,
        backoff_max_s=MAX_POLICY_SECONDS,
        stale_after_s=MAX_POLICY_SECONDS,
    )
    async with running_actor() as h:
        assert (await h.call(SetRule(rule_with(most)))).policy == most
        await h.call(SetRule(Rule("q", "q.", AmqpRunner("amqp://b/", "e" * 255, "k" * 255))))
        await h.call(SetRule(Rule("c", "", ShellRunner("x" * 65_535))))  # "": catch-all
        assert (await h.call(SetJob("first", MIN_TIME_US))).execute_at == MIN_TIME_US
        assert (await h.call(SetJob("last", MAX_TIME_US))).execute_at == MAX_TIME_US


async def test_1026_attempts_with_zero_backoff_retry_then_fail_never_stuck() -> None:
    # The issue: attempt 1025 raised OverflowError and left the job triggered for ever.
    policy = RulePolicy(max_attempts=1026, backoff_initial_s=0, backoff_max_s=0)
    stuck = Job("app.1", at(0), Status.TRIGGERED, b"", 1025, "", T0)
    async with running_actor(State([stuck], [rule_with(policy)])) as h:
        await h.call(RecordOutcome("app.1", 1025, ok=False, message="exit status 1", policy=policy))
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.execute_at, job.attempts) == (Status.PLANNED, T0, 1025)
        assert (await trigger_one(h, "app.1", T0)).job.attempts == 1026
        await h.call(RecordOutcome("app.1", 1026, ok=False, message="exit status 1", policy=policy))
        job = await h.call(GetJob("app.1"))
        assert (job.status, job.last_outcome) == (Status.FAILED, "exit status 1")
        await h.call(SetJob("app.1", at(5)))  # SET works again


@pytest.mark.parametrize(
    "policy",
    [BIG_BACKOFF, TEN_THOUSAND_YEARS, RulePolicy(max_attempts=3, backoff_max_s=math.nan)],
    ids=["1e308", "10000-years", "nan"],
)
async def test_a_retry_that_cannot_be_planned_fails_the_job_with_the_reason(
    policy: RulePolicy,
) -> None:
    # Such policies are refused at input now, but a rule replayed from an older
    # log may still carry one, and its outcome arrives with the rule's policy.
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await trigger_one(h, "app.1", at(0))
        await h.call(RecordOutcome("app.1", 1, ok=False, message="exit status 1", policy=policy))
        job = await h.call(GetJob("app.1"))
        assert job.status is Status.FAILED
        assert job.last_outcome.startswith("attempt 1 failed: exit status 1; no retry: ")
        assert job.execute_at == at(0)
        assert h.state.next_due() is None
        await h.call(SetJob("app.1", at(5)))  # not triggered: SET and UNSET work
        await h.call(DeleteJob("app.1"))


async def test_at_the_end_of_time_a_retry_fits_or_the_job_fails() -> None:
    policy = RulePolicy(max_attempts=5, backoff_initial_s=300, backoff_max_s=300)
    last_second = MAX_TIME_US - 999_999  # 9999-12-31 23:59:59
    async with running_actor() as h:
        await h.call(SetRule(rule_with(policy)))
        await h.call(SetJob("app.fits", last_second - 300 * MICROS))
        await h.call(SetJob("app.late", last_second))
        h.clock.now = last_second - 300 * MICROS
        await trigger_one(h, "app.fits", h.clock.now)
        await h.call(RecordOutcome("app.fits", 1, ok=False, message="no", policy=policy))
        fits = await h.call(GetJob("app.fits"))
        assert (fits.status, fits.execute_at) == (Status.PLANNED, last_second)

        h.clock.now = last_second
        result = await h.call(TriggerDue(last_second, ALL_KINDS))
        assert {d.job.id for d in result.dispatches} == {"app.fits", "app.late"}
        await h.call(RecordOutcome("app.late", 1, ok=False, message="no", policy=policy))
        late = await h.call(GetJob("app.late"))
        assert late.status is Status.FAILED
        assert "no retry: the retry's time is outside the supported range" in late.last_outcome


class _BrokenPolicy:
    """Stands for any bug in retry planning: an unexpected exception."""

    max_attempts = 3

    def retry_delay_us(self, attempt: int) -> int:
        raise RuntimeError("bug in retry planning")


async def test_any_exception_while_recording_an_outcome_fails_the_job() -> None:
    async with running_actor() as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await trigger_one(h, "app.1", at(0))
        broken = _BrokenPolicy()
        result = await h.call(
            RecordOutcome("app.1", 1, ok=False, message="exit 1", policy=broken)  # type: ignore[arg-type]
        )
        assert result is None  # recorded, not an internal error
        job = await h.call(GetJob("app.1"))
        assert job.status is Status.FAILED
        assert "attempt 1 failed: exit 1" in job.last_outcome
        assert "bug in retry planning" in job.last_outcome
        assert h.log.records[-1] == JobStatus("app.1", Status.FAILED, 1, job.last_outcome, T0)


class _Counting(Observer):
    def __init__(self, fail_triggers: int = 0) -> None:
        self.failed: list[tuple[FailReason, str]] = []
        self.fail_triggers = fail_triggers
        self.sets: list[int] = []

    def triggered(self, lateness_s: list[float]) -> None:
        if self.fail_triggers:
            self.fail_triggers -= 1
            raise RuntimeError("observer bug")

    def failed_without_run(self, reason: FailReason, job_id: str) -> None:
        self.failed.append((reason, job_id))

    def jobs_set(self, count: int) -> None:
        self.sets.append(count)


class _BrokenRunner:
    """Stands for any bug while triggering: an unexpected exception."""

    @property
    def kind(self) -> str:
        raise RuntimeError("bug while triggering")


async def test_an_exception_while_triggering_fails_that_job_and_the_others_run() -> None:
    observer = _Counting()
    broken = Rule("r.broken", "app.1", _BrokenRunner())  # type: ignore[arg-type]
    async with running_actor(State(rules=[broken]), observer=observer) as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await h.call(SetJob("app.2", at(1)))
        result = await h.call(TriggerDue(at(5), ALL_KINDS))
        assert [d.job.id for d in result.dispatches] == ["app.2"]
        first = await h.call(GetJob("app.1"))
        assert first.status is Status.FAILED
        assert "internal error while triggering" in first.last_outcome
        assert h.state.counts[Status.TRIGGERED] == 1  # only the one handed to a runner
        assert observer.failed == [(FailReason.ERROR, "app.1")]


async def test_an_observer_that_raises_stops_nothing() -> None:
    observer = _Counting(fail_triggers=1)
    async with running_actor(observer=observer) as h:
        await h.call(SetRule(SHELL))
        await h.call(SetJob("app.1", at(0)))
        await h.call(SetJob("app.2", at(1)))
        result = await h.call(TriggerDue(at(5), ALL_KINDS))
        assert [d.job.id for d in result.dispatches] == ["app.1", "app.2"]
        assert h.state.counts[Status.TRIGGERED] == 2
        await h.call(SetJob("app.3", at(9)))  # the actor goes on


async def test_every_job_failed_without_a_run_is_counted_with_its_reason() -> None:
    observer = _Counting()
    stale = Rule("r.stale", "s.", ShellRunner("/bin/s.sh"), RulePolicy(stale_after_s=1))
    async with running_actor(observer=observer) as h:
        await h.results(SetRule(stale), SetRule(HTTP))
        await h.results(SetJob("nomatch.1", at(0)), SetJob("s.1", at(0)), SetJob("web.1", at(0)))
        await h.call(TriggerDue(at(5), {"shell": 5}))
    assert sorted(observer.failed, key=lambda f: f[1]) == [
        (FailReason.NO_RULE, "nomatch.1"),
        (FailReason.STALE, "s.1"),
        (FailReason.NO_RUNNER, "web.1"),
    ]


async def test_jobs_set_are_counted_once_committed_refusals_not() -> None:
    """The dashboard's "jobs set per minute" (Observer.jobs_set): each committed batch
    reports its sets; a refused SetJob is not one."""
    observer = _Counting()
    async with running_actor(observer=observer) as h:
        await h.results(SetJob("a.1", at(0)), SetJob("a.2", at(0)), GetJob("a.1"))
        await h.results(SetJob("", at(0)))  # refused: an empty id
        await h.results(GetJob("a.2"))
    assert observer.sets == [2]


async def test_a_flood_of_unmatched_jobs_gives_two_log_lines_not_one_per_job() -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_actor() as h:
            await h.results(*[SetJob(f"app.invoice.{i}", at(0)) for i in range(3000)])
            await h.results(*[SetJob(f"orphan{i}", at(0)) for i in range(5)])
            while (await h.call(TriggerDue(at(1), ALL_KINDS))).more_due:
                pass
            assert h.state.counts[Status.FAILED] == 3005
        # the actor flushes what is left of the window when it stops
    lines = [e for e in logs if "failed without running" in e["event"]]
    assert [e["event"] for e in lines] == [
        "job failed without running",
        "jobs failed without running",
    ]
    first, summary = lines
    assert first["job"] == "app.invoice.0" and first["prefix"] == "app.invoice."
    assert first["reason"] == "no_rule" and first["outcome"] == "no rule matches this job"
    assert summary["count"] == 3004
    assert summary["prefixes"] == {"app.invoice.": 2999, "": 5}


async def test_failures_are_summed_up_once_per_window(autojump_clock: trio.abc.Clock) -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_actor() as h:
            await trio.sleep(WINDOW_S / 2)  # failures in the middle of each window
            for window in range(3):
                await h.results(*[SetJob(f"a.{window}.{i}", at(0)) for i in range(10)])
                await h.call(TriggerDue(at(1), ALL_KINDS))
                await trio.sleep(WINDOW_S)
            summaries = [e for e in logs if e["event"] == "jobs failed without running"]
            assert [s["count"] for s in summaries] == [9, 10, 10]
            await trio.sleep(2 * WINDOW_S)  # a quiet window closes the reason
            await h.call(SetJob("b.1", at(0)))
            await h.call(TriggerDue(at(1), ALL_KINDS))
    singles = [e["job"] for e in logs if e["event"] == "job failed without running"]
    assert singles == ["a.0.0", "b.1"]


# -- reads while a group commit is in flight (issue 8, item 10) --------------------------


class Replies:
    """Reply callbacks that remember the order in which answers came."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.results: dict[str, list[Result]] = {}

    def __call__(self, name: str) -> Reply:
        def reply(results: list[Result]) -> None:
            self.order.append(name)
            self.results[name] = results

        return reply

    def one(self, name: str) -> Any:  # the test knows which result it asked for
        return self.results[name][0]


async def in_flight(h: Harness, replies: Replies, *commands: object, name: str = "write") -> None:
    """Start a batch whose append is held by the log's gate."""
    h.log.gate = trio.Event()
    await h.client.submit(Request(list(commands), replies(name)))  # type: ignore[arg-type]
    await trio.testing.wait_all_tasks_blocked()
    assert h.log.append_calls >= 1 and name not in replies.order


async def send(h: Harness, replies: Replies, name: str, *commands: object) -> None:
    await h.client.submit(Request(list(commands), replies(name)))  # type: ignore[arg-type]
    await trio.testing.wait_all_tasks_blocked()


async def end_flight(h: Harness) -> None:
    assert h.log.gate is not None
    h.log.gate.set()
    h.log.gate = None
    await trio.testing.wait_all_tasks_blocked()


async def test_a_read_of_other_keys_is_answered_while_the_append_is_in_flight() -> None:
    async with running_actor() as h:
        await h.results(SetJob("other", at(1), b"old"), SetRule(SHELL))
        replies = Replies()
        await in_flight(h, replies, SetJob("written", at(2)))
        await send(h, replies, "get", GetJob("other"))
        await send(h, replies, "rule", GetRule(SHELL.id))
        await send(h, replies, "missing", GetJob("nobody"))
        await send(h, replies, "list", ListJobs(prefix="oth"))
        await send(h, replies, "rules", ListRules())
        # answered before the write's reply, which waits for its append
        assert replies.order == ["get", "rule", "missing", "list", "rules"]
        assert replies.one("get").payload == b"old"
        assert error_code(replies.one("missing")) is ErrorCode.NOT_FOUND
        assert [j.id for j in replies.one("list").jobs] == ["other"]
        await end_flight(h)
        assert replies.order[-1] == "write"
        assert h.log.append_calls == 2  # the reads did not make a batch of their own to write


async def test_a_read_of_a_key_being_written_waits_and_never_sees_it_before_its_ok() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a", at(1), b"old"))
        replies = Replies()
        await in_flight(h, replies, SetJob("a", at(2), b"new"))
        await send(h, replies, "get", GetJob("a"))
        await send(h, replies, "list", ListJobs(prefix=""))
        await send(h, replies, "list-a", ListJobs(prefix="a"))
        assert replies.order == []
        await end_flight(h)
        assert replies.order == ["write", "get", "list", "list-a"]
        assert replies.one("get").payload == b"new"
        assert [j.payload for j in replies.one("list").jobs] == [b"new"]


async def test_a_read_held_behind_a_failed_append_sees_the_old_value() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a", at(1), b"old"))
        replies = Replies()
        await in_flight(h, replies, SetJob("a", at(2), b"new"))
        h.log.fail = True
        await send(h, replies, "get", GetJob("a"))
        await end_flight(h)
        assert replies.order == ["write", "get"]
        assert error_code(replies.one("write")) is ErrorCode.UNAVAILABLE
        assert replies.one("get").payload == b"old"


async def test_a_pipelined_set_then_get_of_one_key_reads_the_set() -> None:
    """A write held for the next batch is not overtaken by a read of the same id."""
    async with running_actor() as h:
        await h.call(SetJob("b", at(1), b"old"))
        replies = Replies()
        await in_flight(h, replies, SetJob("a", at(1)))
        await send(h, replies, "set-b", SetJob("b", at(2), b"new"))
        await send(h, replies, "get-b", GetJob("b"))
        await send(h, replies, "rule-set", SetRule(SHELL))
        await send(h, replies, "rule-get", GetRule(SHELL.id))
        await send(h, replies, "get-other", GetJob("zzz"))
        assert replies.order == ["get-other"]
        await end_flight(h)  # the first batch, then the held one (its append is not held)
        assert replies.order == ["get-other", "write", "set-b", "get-b", "rule-set", "rule-get"]
        assert replies.one("get-b").payload == b"new"
        assert replies.one("rule-get") == SHELL


async def test_info_during_an_append_gives_the_committed_counts() -> None:
    async with running_actor() as h:
        await h.results(SetJob("a", at(1)), SetRule(SHELL))
        replies = Replies()
        await in_flight(h, replies, SetJob("b", at(1)), DeleteRule(SHELL.id))
        await send(h, replies, "info", GetInfo())
        info = replies.one("info")
        assert (info.jobs_by_status[Status.PLANNED], info.rules) == (1, 1)
        await end_flight(h)
        info = await h.call(GetInfo())
        assert (info.jobs_by_status[Status.PLANNED], info.rules) == (2, 0)


async def test_a_read_in_the_batch_before_any_write_to_its_key_is_answered_at_once() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a", at(1), b"old"))
        replies = Replies()
        await in_flight(h, replies, SetJob("x", at(1)))
        # these three wait in the channel and form the next batch together
        await send(h, replies, "set-a", SetJob("a", at(2), b"new"))
        await send(h, replies, "get-a", GetJob("a"))
        h.log.gate.set()  # type: ignore[union-attr]
        h.log.gate = trio.Event()  # hold the next append
        await trio.testing.wait_all_tasks_blocked()
        assert replies.order == ["write"]  # the next batch's append is held
        await send(h, replies, "get-x", GetJob("x"))  # x is committed now
        assert replies.order == ["write", "get-x"]
        await end_flight(h)
        assert replies.order == ["write", "get-x", "set-a", "get-a"]
        assert replies.one("get-a").payload == b"new"


async def test_a_watch_during_an_append_sees_every_change_once() -> None:
    async with running_actor() as h:
        await h.call(SetJob("a.1", at(1)))
        await h.call(SetJob("b.1", at(1)))
        replies = Replies()
        await in_flight(h, replies, SetJob("a.2", at(2)))
        clear, touched = Sink(), Sink()
        await send(h, replies, "clear", Subscribe("b.", snapshot=True, sink=clear))
        await send(h, replies, "touched", Subscribe("a.", snapshot=True, sink=touched))
        assert replies.order == ["clear"]  # no change to a b. job is in flight
        assert [j.id for j in replies.one("clear").jobs] == ["b.1"]
        await end_flight(h)
        assert replies.order == ["clear", "write", "touched"]
        assert [j.id for j in replies.one("touched").jobs] == ["a.1", "a.2"]  # in the snapshot...
        await h.call(SetJob("a.3", at(3)))
        await h.call(SetJob("b.2", at(3)))
        assert touched.events == [("a.3", Status.PLANNED, False)]  # ...so no event for a.2
        assert clear.events == [("b.2", Status.PLANNED, False)]


async def test_a_watch_answered_during_a_failed_append_stands() -> None:
    async with running_actor() as h:
        replies = Replies()
        h.log.fail = True
        await in_flight(h, replies, SetJob("a.1", at(1)))
        sink = Sink()
        await send(h, replies, "watch", Subscribe("b.", snapshot=True, sink=sink))
        assert replies.one("watch") == JobPage([], "")
        await end_flight(h)
        h.log.fail = False
        await h.call(SetJob("b.1", at(1)))
        assert sink.events == [("b.1", Status.PLANNED, False)]


async def test_while_an_append_is_slow_held_requests_are_bounded() -> None:
    async with running_actor() as h:
        replies = Replies()
        await in_flight(h, replies, SetJob("first", at(1)))
        many = [SetJob(f"j{i}", at(1)) for i in range(MAX_BATCH_COMMANDS)]
        await send(h, replies, "burst", *many)
        await send(h, replies, "late-read", GetJob("first-not-there"))
        # held is full: the actor takes nothing more until the append ends
        assert replies.order == []
        assert h.actor._held_commands == MAX_BATCH_COMMANDS
        await end_flight(h)
        # the read waited in the channel, then went before the burst's append
        assert replies.order == ["write", "late-read", "burst"]
        assert len(h.state.jobs) == MAX_BATCH_COMMANDS + 1


async def test_reads_are_answered_while_the_log_rotates() -> None:
    async with running_actor(compact_after_bytes=200) as h:
        await h.call(SetJob("a", at(1)))
        h.log.rotate_gate = trio.Event()
        replies = Replies()
        await send(h, replies, "set-b", SetJob("b", at(1)))  # crosses the threshold: rotation
        assert replies.order == ["set-b"]
        await send(h, replies, "get-a", GetJob("a"))
        await send(h, replies, "set-c", SetJob("c", at(1)))
        assert replies.order == ["set-b", "get-a"]  # the write waits for the rotation
        h.log.rotate_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert replies.order == ["set-b", "get-a", "set-c"]
        seq, jobs, _ = h.log.snapshots[0]
        assert sorted(jobs) == ["a", "b"]  # the state at the rotation, without c


# -- storage failures: the actor goes on, says so once, and probes (issue 8, items 1 and 2) --


class _Health(Observer):
    def __init__(self) -> None:
        self.changes: list[tuple[bool, str]] = []
        self.failed_writes: list[str] = []

    def writable(self, ok: bool, reason: str) -> None:
        self.changes.append((ok, reason))

    def write_failed(self, what: str) -> None:
        self.failed_writes.append(what)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left"), OSError(errno.EROFS, "RO"), OSError(errno.EIO, "IO")],
    ids=["ENOSPC", "EROFS", "EIO"],
)
async def test_a_failed_write_is_storage_unavailable_and_not_writable_until_one_succeeds(
    error: OSError,
) -> None:
    health = _Health()
    async with running_actor(observer=health) as h:
        assert h.actor.writable
        await h.call(SetJob("kept", at(1)))
        h.log.fail, h.log.error = True, error
        result = (await h.results(SetJob("a", at(1))))[0]
        assert isinstance(result, StorageUnavailable)
        assert result.code is ErrorCode.UNAVAILABLE
        assert str(error) in result.message
        assert not h.actor.writable
        assert h.actor.storage_error == str(error)
        assert (await h.call(GetJob("kept"))).id == "kept"  # reads go on
        h.log.fail = False
        await h.call(SetJob("b", at(1)))
        assert h.actor.writable
        assert h.actor.storage_error == ""
        assert [ok for ok, _ in health.changes] == [False, True]
        assert health.failed_writes == ["client"]


async def test_each_failed_write_is_counted_by_what_it_was_for() -> None:
    health = _Health()
    async with running_actor(observer=health) as h:
        await populate(h)
        h.log.fail = True
        await h.results(SetJob("x", at(1)))
        await h.results(TriggerDue(at(10), ALL_KINDS))
        await h.results(RecordOutcome("app.1", 1, ok=True))
        await h.results(ExpireFinished(before=at(100)))
        await h.results(SetJob("y", at(1)), TriggerDue(at(10), ALL_KINDS))
        assert health.failed_writes == [
            "client",
            "trigger",
            "outcome",
            "retention",
            "client",
            "trigger",
        ]


async def test_a_failed_trigger_leaves_the_jobs_planned_and_counts_nothing_until_written() -> None:
    observer = _Counting()
    lateness: list[list[float]] = []  # one list a trigger

    def triggered(lateness_s: list[float]) -> None:
        lateness.append(lateness_s)

    observer.triggered = triggered  # type: ignore[method-assign]
    async with running_actor(observer=observer) as h:
        await h.call(SetRule(SHELL))
        await h.results(SetJob("app.1", at(0)), SetJob("nomatch", at(0)))
        h.log.fail = True
        for _ in range(3):
            failed = (await h.results(TriggerDue(at(5), ALL_KINDS)))[0]
            assert isinstance(failed, StorageUnavailable)
            assert {j.status for j in h.state.jobs.values()} == {Status.PLANNED}
            assert h.state.next_due() == at(0)
        assert observer.failed == [] and lateness == []
        h.log.fail = False
        result = await h.call(TriggerDue(at(5), ALL_KINDS))
        assert [d.job.id for d in result.dispatches] == ["app.1"]
        assert observer.failed == [(FailReason.NO_RULE, "nomatch")]
        assert len(lateness) == 1


async def test_storage_failures_are_logged_once_per_kind_per_episode() -> None:
    with structlog.testing.capture_logs() as logs:
        async with running_actor() as h:
            await populate(h)
            h.log.fail = True
            for _ in range(50):
                await h.results(SetJob("x", at(1)))
                await h.results(TriggerDue(at(10), ALL_KINDS))
            h.log.fail = False
            await h.call(SetJob("x", at(1)))
            h.log.fail = True
            await h.results(SetJob("y", at(1)))
    failed = [e for e in logs if e["event"] == "storage write failed"]
    assert [e["what"] for e in failed] == ["client", "trigger", "client"]
    assert all("No space left" in e["error"] for e in failed)
    (recovered,) = [e for e in logs if e["event"] == "storage writes work again"]
    assert recovered["failed_writes"] == {"client": 50, "trigger": 50}


async def test_when_idle_a_probe_brings_writability_back_without_traffic(
    autojump_clock: trio.abc.Clock,
) -> None:
    health = _Health()
    async with running_actor(observer=health) as h:
        h.log.fail = True
        await h.results(SetJob("a", at(1)))
        calls = h.log.append_calls
        await trio.sleep(PROBE_INITIAL_S * 8)  # probes at 0.25, 0.75 (+0.5), 1.75 (+1)
        assert h.log.append_calls == calls + 3
        await trio.sleep(60)
        probes = h.log.append_calls - calls
        assert probes < 3 + 60 / PROBE_MAX_S + 1  # backed off to PROBE_MAX_S apart
        assert not h.actor.writable
        h.log.fail = False
        await trio.sleep(PROBE_MAX_S)
        assert h.actor.writable
        assert h.log.batches == [[JobDelete(PROBE_ID)]]
        assert health.failed_writes.count("probe") == probes
        calls = h.log.append_calls
        await trio.sleep(60)  # writable: no more probes
        assert h.log.append_calls == calls


def test_the_probe_record_changes_nothing_when_replayed() -> None:
    job = Job("app.1", at(1), Status.PLANNED, b"", 0, "", T0)
    jobs, rules = {job.id: job}, {SHELL.id: SHELL}
    assert apply_record(jobs, rules, JobDelete(PROBE_ID))
    assert jobs == {job.id: job} and rules == {SHELL.id: SHELL}
    assert len(PROBE_ID.encode()) > 4096  # needs a new block: a full disk refuses it
    with pytest.raises(CommandError):  # no client can make a job with that id
        from kairoi_trio.core.validation import validate_job

        validate_job(PROBE_ID, b"", 1 << 20, at(1))


async def test_an_unexpected_exception_while_appending_is_a_failed_write_not_a_crash() -> None:
    async with running_actor() as h:

        async def broken(records: list) -> None:
            raise ValueError("cannot encode")

        h.log.append = broken  # type: ignore[method-assign]
        with structlog.testing.capture_logs():
            result = (await h.results(SetJob("a", at(1))))[0]
        assert isinstance(result, StorageUnavailable)
        assert "internal error" in result.message
        assert h.state.jobs == {}
        del h.log.append
        assert (await h.call(SetJob("a", at(1)))).id == "a"


@pytest.mark.parametrize(
    "error", [OSError(errno.EIO, "close failed"), RuntimeError("bug")], ids=["EIO", "bug"]
)
async def test_a_failed_rotation_of_any_kind_is_retried_later_and_stops_nothing(
    error: Exception, autojump_clock: trio.abc.Clock
) -> None:
    health = _Health()
    async with running_actor(compact_after_bytes=100, observer=health) as h:
        h.log.rotate_error = error
        with structlog.testing.capture_logs() as logs:
            await h.call(SetJob("a", at(1)))
            await h.call(SetJob("b", at(1)))  # within the pause: no second attempt
        assert [e["event"] for e in logs] == ["log rotation failed"]
        assert health.failed_writes == ["compaction"]
        assert h.actor.writable  # appends still work: ready
        h.log.rotate_error = None
        await trio.sleep(COMPACTION_RETRY_S)
        await h.call(SetJob("c", at(1)))
        await trio.testing.wait_all_tasks_blocked()
        assert h.log.rotations == 1 and len(h.log.snapshots) == 1


async def test_a_snapshot_failing_with_any_exception_is_retried_later() -> None:
    health = _Health()
    async with running_actor(compact_after_bytes=100, observer=health) as h:

        async def broken(seq: int, jobs: object, rules: object) -> None:
            raise RuntimeError("a compaction is already running")

        h.log.write_snapshot = broken  # type: ignore[method-assign]
        with structlog.testing.capture_logs() as logs:
            await h.call(SetJob("a", at(1)))
            await trio.testing.wait_all_tasks_blocked()
        assert [e["event"] for e in logs] == ["compaction failed"]
        assert health.failed_writes == ["compaction"]
        assert (await h.call(SetJob("b", at(1)))).id == "b"
