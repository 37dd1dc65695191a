"""A watch's snapshot given a page at a time (core/actor.py, commands.Subscribe): one
actor step a page however many jobs match, and no change lost or doubled between the
pages and the events, whatever happens between the pages."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from support.actor_harness import T0, running_actor

from kairoi_trio.commands import (
    SNAPSHOT_PAGE,
    CommandError,
    DeleteJob,
    ErrorCode,
    JobPage,
    ListJobs,
    SetJob,
    Subscribe,
    Unsubscribe,
)
from kairoi_trio.core import actor as actor_module
from kairoi_trio.core.state import State
from kairoi_trio.model import MICROS, Job, JobEvent, Status, new_job
from kairoi_trio.protocols.snapshot import PAGE_RETRY_S
from kairoi_trio.protocols.snapshot import next_page as next_snapshot_page
from kairoi_trio.storage.postgres import view as view_module
from kairoi_trio.storage.postgres.view import BatchView, Loaded, LoadPlan

PAGE = 3


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actor_module, "SNAPSHOT_PAGE", PAGE)


def at(seconds: float) -> int:
    return T0 + int(seconds * MICROS)


class Sink:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    def __call__(self, events: list[JobEvent]) -> bool:
        self.events.extend(events)
        return True

    def seen(self) -> list[tuple[str, Status, bool]]:
        return [(e.job.id, e.job.status, e.deleted) for e in self.events]


def mirror(pages: list[JobPage], events: list[JobEvent]) -> dict[str, Job]:
    """What a watcher holds: the snapshot's pages, then the changes in order."""
    jobs = {job.id: job for page in pages for job in page.jobs}
    for event in events:
        if event.deleted:
            jobs.pop(event.job.id, None)
        else:
            jobs[event.job.id] = event.job
    return jobs


def next_page(prefix: str, page: JobPage, sink: Sink) -> ListJobs:
    return ListJobs(prefix, None, page.next_after, PAGE, watch=sink)


async def test_pages_give_every_job_once_and_changes_meanwhile_once() -> None:
    async with running_actor() as h:
        for n in range(8):
            await h.call(SetJob(f"a.{n}", at(n)))
        await h.call(SetJob("b.0", at(0)))
        sink = Sink()
        first = await h.call(Subscribe("a.", snapshot=True, sink=sink))
        assert [j.id for j in first.jobs] == ["a.0", "a.1", "a.2"] and first.next_after == "a.2"
        await h.call(SetJob("a.1", at(50)))  # given already: an event
        await h.call(SetJob("a.5", at(50)))  # not yet: its page shows it, no event
        await h.call(DeleteJob("a.6"))  # not yet: its page leaves it out, no event
        await h.call(SetJob("a.00", at(1)))  # a new id before the cursor: an event
        await h.call(SetJob("a.9", at(9)))  # a new id after it: in a page
        await h.call(SetJob("b.1", at(1)))  # another prefix: nothing
        second = await h.call(next_page("a.", first, sink))
        assert [j.id for j in second.jobs] == ["a.3", "a.4", "a.5"]
        assert second.jobs[2].execute_at == at(50)
        await h.call(SetJob("a.4", at(60)))  # given by the second page: an event
        third = await h.call(next_page("a.", second, sink))
        assert [j.id for j in third.jobs] == ["a.7", "a.9"] and third.next_after == ""
        await h.call(SetJob("a.9", at(70)))  # the snapshot is whole: every change
        assert sink.seen() == [
            ("a.1", Status.PLANNED, False),
            ("a.00", Status.PLANNED, False),
            ("a.4", Status.PLANNED, False),
            ("a.9", Status.PLANNED, False),
        ]
        watched = mirror([first, second, third], sink.events)
        assert watched == {i: j for i, j in h.state.jobs.items() if i.startswith("a.")}


async def test_a_page_in_a_batch_with_changes_before_and_after_it() -> None:
    """A change before the page in the same batch is in the page, not an event; one
    after it is an event: the page is read at its place in the batch."""
    async with running_actor() as h:
        for n in range(6):
            await h.call(SetJob(f"a.{n}", at(n)))
        sink = Sink()
        first = await h.call(Subscribe("a.", snapshot=True, sink=sink))
        _, second, _, _ = await h.results(
            SetJob("a.4", at(40)),  # before the page that gives it
            next_page("a.", first, sink),
            SetJob("a.3", at(30)),  # after the page that gave it
            SetJob("a.5", at(50)),  # after the page, beyond it: the next page's
        )
        assert [(j.id, j.execute_at) for j in second.jobs] == [
            ("a.3", at(3)),
            ("a.4", at(40)),
            ("a.5", at(5)),
        ]
        assert second.next_after == ""
        assert sink.seen() == [("a.3", Status.PLANNED, False), ("a.5", Status.PLANNED, False)]
        assert mirror([first, second], sink.events) == h.state.jobs


async def test_a_page_answered_with_a_failed_batch_can_be_asked_again() -> None:
    async with running_actor() as h:
        for n in range(5):
            await h.call(SetJob(f"a.{n}", at(n)))
        sink = Sink()
        first = await h.call(Subscribe("a.", snapshot=True, sink=sink))
        h.log.fail = True
        _, failed = await h.results(SetJob("a.4", at(40)), next_page("a.", first, sink))
        assert failed.code is ErrorCode.UNAVAILABLE
        h.log.fail = False
        again = await h.call(next_page("a.", first, sink))
        assert [(j.id, j.execute_at) for j in again.jobs] == [("a.3", at(3)), ("a.4", at(4))]
        assert sink.events == []


async def test_a_page_of_a_watch_that_ended_or_out_of_turn_is_refused() -> None:
    async with running_actor() as h:
        for n in range(5):
            await h.call(SetJob(f"a.{n}", at(n)))
        sink, stranger = Sink(), Sink()
        first = await h.call(Subscribe("a.", snapshot=True, sink=sink))
        wrong = await h.results(
            ListJobs("a.", None, "a.0", PAGE, watch=sink),  # not where it stopped
            ListJobs("b.", None, first.next_after, PAGE, watch=sink),  # not its prefix
            ListJobs("a.", Status.PLANNED, first.next_after, PAGE, watch=sink),  # filtered
            next_page("a.", first, stranger),  # no such watch
        )
        assert [e.code for e in wrong] == [
            ErrorCode.INVALID_ARGUMENT,
            ErrorCode.INVALID_ARGUMENT,
            ErrorCode.INVALID_ARGUMENT,
            ErrorCode.UNAVAILABLE,
        ]
        await h.call(Unsubscribe(sink))
        [ended] = await h.results(next_page("a.", first, sink))
        assert ended.code is ErrorCode.UNAVAILABLE


async def test_a_watch_answered_during_a_log_rotation_sees_the_next_batch_whole() -> None:
    """A Subscribe answered while the log rotates (between two batches) saw the next
    batch's events from the count of the last batch's: the first ones were lost."""
    async with running_actor(compact_after_bytes=1) as h:
        await h.call(Subscribe("z.", snapshot=False, sink=Sink()))  # events are kept
        h.log.rotate_gate = trio.Event()
        await h.results(*(SetJob(f"z.{n}", at(1)) for n in range(3)))  # then a rotation
        await trio.testing.wait_all_tasks_blocked()
        sink = Sink()
        page = await h.call(Subscribe("a.", snapshot=True, sink=sink))  # answered at once
        assert page == JobPage([], "")
        h.log.rotate_gate.set()
        await h.call(SetJob("a.1", at(1)))
        await h.call(SetJob("a.2", at(1)))
        assert [e.job.id for e in sink.events] == ["a.1", "a.2"]


async def test_pages_over_the_postgresql_view_skip_no_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PostgreSQL store's per-batch view (a dict stands in for the database): a
    page in a batch that deleted two of the rows it reads and set a job past them."""
    monkeypatch.setattr(view_module, "SNAPSHOT_PAGE", PAGE)
    db = {f"a.{n}": new_job(f"a.{n}", at(1), Status.PLANNED, b"", 0, "", 1) for n in range(10)}
    views: list[BatchView] = []

    async def begin(commands: list[Any]) -> BatchView:
        if views:  # the previous batch committed (this log never fails)
            inserted, updated, deleted = views[-1].changes()
            db.update((job.id, job) for job in inserted + updated)
            for job_id in deleted:
                db.pop(job_id, None)
        plan = LoadPlan.of(commands)
        jobs = {i: db[i] for i in plan.ids | plan.peeks if i in db}
        pages = {}
        for prefix, status, after, limit in plan.lists:
            ids = sorted(i for i in db if i.startswith(prefix) and i > after)
            pages[(prefix, status, after, limit)] = [db[i] for i in ids[: limit + 1]]
        loaded = Loaded(jobs=jobs, pages=pages)
        views.append(BatchView(loaded, State(), dict.fromkeys(Status, 0), lambda: None))
        return views[-1]

    async with running_actor(begin=begin) as h:
        sink = Sink()
        pages = [await h.call(Subscribe("a.", snapshot=True, sink=sink))]
        *_, page = await h.results(
            DeleteJob("a.3"),
            DeleteJob("a.4"),
            SetJob("a.9", at(2)),
            next_page("a.", pages[0], sink),
        )
        pages.append(page)
        while pages[-1].next_after:
            pages.append(await h.call(next_page("a.", pages[-1], sink)))
        given = [job.id for page in pages for job in page.jobs]
        assert given == ["a.0", "a.1", "a.2", "a.5", "a.6", "a.7", "a.8", "a.9"]
        assert sink.events == []  # the page gave a.9 as set, so no event


# -- any changes between any pages ---------------------------------------------------------

IDS = [f"a.{n}" for n in range(10)] + ["b.1"]
step = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(IDS), st.integers(0, 99)),
    st.tuples(st.just("delete"), st.sampled_from(IDS), st.just(0)),
    st.tuples(st.just("page"), st.just(""), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(
    st.sets(st.sampled_from(IDS)),
    st.lists(st.lists(step, min_size=1, max_size=4), max_size=12),
)
def test_any_changes_between_pages_lose_and_double_nothing(
    initial: set[str], batches: list[list[tuple[str, str, int]]]
) -> None:
    """Batches of sets, deletes and pages in any order: the watcher's mirror (pages,
    then events) is the state; no event repeats what a page gave (the same job)."""

    async def run() -> None:
        async with running_actor() as h:
            for job_id in sorted(initial):
                await h.call(SetJob(job_id, at(1)))
            sink = Sink()
            pages = [await h.call(Subscribe("a.", snapshot=True, sink=sink))]
            for batch in batches:
                commands: list[Any] = []
                for kind, job_id, seconds in batch:
                    if kind == "set":
                        commands.append(SetJob(job_id, at(seconds)))
                    elif kind == "delete":
                        commands.append(DeleteJob(job_id))
                    elif pages[-1].next_after and not any(
                        isinstance(c, ListJobs) for c in commands
                    ):
                        commands.append(next_page("a.", pages[-1], sink))
                results = await h.results(*commands)
                pages += [r for r in results if isinstance(r, JobPage)]
            while pages[-1].next_after:
                pages.append(await h.call(next_page("a.", pages[-1], sink)))
            given_ids = [job.id for page in pages for job in page.jobs]
            assert given_ids == sorted(set(given_ids))  # each once, in id order
            given_jobs = {id(job) for page in pages for job in page.jobs}
            assert not any(
                id(event.job) in given_jobs for event in sink.events if not event.deleted
            )
            expected = {i: j for i, j in h.state.jobs.items() if i.startswith("a.")}
            assert mirror(pages, sink.events) == expected

    trio.run(run)


async def test_a_next_page_waits_out_a_full_queue_and_raises_the_rest() -> None:
    """protocols/snapshot.py: RESOURCE_EXHAUSTED (the actor's queue is full) is asked
    again after a pause; any other error ends the watch."""
    answers: list[Any] = [
        CommandError(ErrorCode.RESOURCE_EXHAUSTED, "server busy"),
        CommandError(ErrorCode.RESOURCE_EXHAUSTED, "server busy"),
        JobPage([], ""),
        CommandError(ErrorCode.UNAVAILABLE, "server is shutting down"),
    ]
    asked: list[ListJobs] = []
    pauses: list[float] = []

    async def call(command: Any) -> Any:
        asked.append(command)
        answer = answers.pop(0)
        if isinstance(answer, CommandError):
            raise answer
        return answer

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    sink = Sink()
    assert await next_snapshot_page(call, sleep, "a.", "a.2", sink) == JobPage([], "")
    assert len(asked) == 3 and pauses == [PAGE_RETRY_S] * 2
    assert asked[0] == ListJobs("a.", None, "a.2", SNAPSHOT_PAGE, sink)
    with pytest.raises(CommandError) as refused:
        await next_snapshot_page(call, sleep, "a.", "a.2", sink)
    assert refused.value.code is ErrorCode.UNAVAILABLE
