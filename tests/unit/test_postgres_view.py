"""The PostgreSQL store's per-batch view and load plan (pure: no database)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from kairoi_trio.commands import (
    SNAPSHOT_PAGE,
    DeleteJob,
    ExpireFinished,
    GetInfo,
    GetJob,
    JobsChanged,
    ListJobs,
    RecordOutcome,
    ScheduleJob,
    SetJob,
    Subscribe,
    TriggerDue,
)
from kairoi_trio.core.state import State
from kairoi_trio.model import Job, Recurrence, Schedule, Status, new_job
from kairoi_trio.storage.postgres.view import (
    CLAIM_SLACK,
    BatchView,
    Loaded,
    LoadPlan,
    prefix_upper_bound,
)

PLANNED, TRIGGERED = Status.PLANNED, Status.TRIGGERED


def job(job_id: str, at: int = 100, status: Status = PLANNED) -> Job:
    return new_job(job_id, at, status, b"", 0, "", 1)


def view(jobs: list[Job], **loaded: object) -> BatchView:
    counts = dict.fromkeys(Status, 0)
    for j in jobs:
        counts[j.status] += 1
    return BatchView(
        Loaded(jobs={j.id: j for j in jobs}, **loaded),  # type: ignore[arg-type]
        State(),
        counts,
        lambda: None,
    )


def test_the_plan_locks_what_a_batch_may_change_and_only_reads_the_rest() -> None:
    def sink(events: object) -> bool:
        return True

    plan = LoadPlan.of(
        [
            SetJob("a", 1),
            ScheduleJob("s", Schedule("every 1m")),
            DeleteJob("d"),
            GetJob("g"),
            GetJob("a"),  # also written: locked, not peeked
            RecordOutcome("r", 1, True),
            JobsChanged(["x", "g"]),
            ListJobs("p.", Status.PLANNED, "p.1", 10),
            ListJobs("q.", None, "", 0),  # refused by the actor: nothing to read
            Subscribe("w.", True, sink),
            Subscribe("n.", False, sink),
            GetInfo(),
            TriggerDue(50, {"shell": 3, "http": 2}),
            ExpireFinished(7, 100),
        ]
    )
    assert plan.ids == {"a", "s", "d", "r"}
    assert plan.creating == {"a", "s"}
    assert plan.peeks == {"g", "x"}
    # a snapshot's first page (the others are ListJobs with `watch`)
    assert plan.lists == {("p.", Status.PLANNED, "p.1", 10), ("w.", None, "", SNAPSHOT_PAGE)}
    assert plan.counts
    assert (plan.claim_now, plan.claim_limit) == (50, 5 + CLAIM_SLACK)
    assert (plan.expire_before, plan.expire_limit) == (7, 100)


def test_a_read_only_batch_locks_nothing() -> None:
    plan = LoadPlan.of([GetJob("a"), ListJobs("", None, "", 5), GetInfo()])
    assert not plan.ids and not plan.creating and plan.claim_now is None


ids = st.text(alphabet=st.sampled_from(["a", "b", "\x7f", "é", "\uffff", "\U0010ffff"]), max_size=4)


@given(prefix=ids, other=ids)
def test_the_prefix_bound_admits_exactly_the_ids_with_the_prefix(prefix: str, other: str) -> None:
    bound = prefix_upper_bound(prefix)
    inside = prefix <= other and (bound is None or other < bound)
    assert inside == other.startswith(prefix)
    # (code point order is UTF-8 byte order: what COLLATE "C" compares)
    assert (prefix < other) == (prefix.encode() < other.encode())


def test_the_prefix_bound_skips_surrogates() -> None:
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("a\U0010ffff") == "b"


def test_net_changes_and_count_deltas() -> None:
    v = view([job("a"), job("b"), job("c", status=TRIGGERED)])
    v.put_job(job("a", at=200))  # updated
    v.delete_job("b")  # deleted
    v.put_job(job("n"))  # inserted...
    v.put_job(job("m"))
    v.delete_job("m")  # ...and gone again: nothing to write
    v.put_job(job("c", status=Status.EXECUTED))
    inserted, updated, deleted = v.changes()
    assert [j.id for j in inserted] == ["n"]
    assert sorted(j.id for j in updated) == ["a", "c"]
    assert deleted == ["b"]
    assert v.count_changes() == {Status.TRIGGERED: -1, Status.EXECUTED: 1}
    assert v.counts[PLANNED] == 2  # a, n


def test_a_page_sees_the_batchs_own_writes() -> None:
    loaded = [job("p.1"), job("p.2"), job("p.3")]
    v = view(loaded, pages={("p.", None, "", 2): loaded})  # limit + 1 rows: more exist
    v.put_job(job("p.0"))
    page, after = v.list_jobs("p.", None, "", 2)
    assert [j.id for j in page] == ["p.0", "p.1"] and after == "p.1"
    v.delete_job("p.0")
    v.delete_job("p.1")
    v.delete_job("p.2")
    page, after = v.list_jobs("p.", None, "", 2)
    # the database had more than the page: go on after what was read
    assert [j.id for j in page] == ["p.3"] and after == "p.3"


def test_a_page_never_goes_past_the_rows_read() -> None:
    """The database holds p.0 .. p.9; a page of 3 read 4 rows. The batch deleted two
    of them and set p.8: the page ends at the last row read, so that p.4 .. p.7 (not
    read) come in the next page; the page went on after p.8 and skipped them."""
    rows = [job(f"p.{n}") for n in range(4)]
    v = view([*rows[:2], job("p.8")], pages={("p.", None, "", 3): rows})
    v.delete_job("p.0")
    v.delete_job("p.1")
    v.put_job(job("p.8", 200))
    page, after = v.list_jobs("p.", None, "", 3)
    assert [j.id for j in page] == ["p.2", "p.3"] and after == "p.3"


def test_a_status_filtered_page_drops_jobs_the_batch_moved_out() -> None:
    loaded = [job("p.1"), job("p.2")]
    v = view(loaded, pages={("p.", PLANNED, "", 10): loaded})
    v.put_job(job("p.1", status=TRIGGERED))
    v.put_job(job("q.1"))  # another prefix
    page, after = v.list_jobs("p.", PLANNED, "", 10)
    assert [j.id for j in page] == ["p.2"] and after == ""


def test_only_claimed_jobs_still_due_and_waiting_pop() -> None:
    a, b, c = job("a", 10), job("b", 20), job("c", 30)
    v = view([a, b, c], claimed=[a, b, c])
    v.put_job(job("b", 500))  # re-set later in the same batch
    assert [j.id for j in v.pop_due(100)] == ["a", "c"]


def test_held_jobs_mark_their_kind_deferred_and_change_nothing() -> None:
    a = job("a", 10)
    v = view([a], claimed=[a])
    v.hold("shell", a)
    assert list(v.waiting) == ["shell"]
    assert v.changes() == ([], [], [])


def test_rule_changes_apply_to_the_instances_index() -> None:
    from kairoi_trio.model import Rule, ShellRunner

    rules = State()
    old = Rule("r1", "a.", ShellRunner("true"))
    rules.put_rule(old)
    v = BatchView(Loaded(), rules, dict.fromkeys(Status, 0), lambda: None)
    new = Rule("r2", "a.b", ShellRunner("true"))
    v.put_rule(new)
    v.delete_rule("r1")
    assert v.match_rule("a.bc") == new and v.match_rule("a.x") is None
    assert v.rule_changes() == ([new], ["r1"])


def test_ids_and_prefixes_with_nul_are_not_sent_to_the_database() -> None:
    """PostgreSQL text cannot hold NUL: one client's bad id must not fail the
    batch of every other client (its own command gets the validation error)."""
    plan = LoadPlan.of(
        [
            SetJob("a\x00b", 1),
            GetJob("g\x00"),
            SetJob("ok", 1),
            ListJobs("p\x00", None, "", 5),
            ListJobs("q.", None, "q.a\x00z", 5),
            ListJobs("r" * 65_536, None, "", 5),  # longer than any id: refused by the actor
        ]
    )
    assert plan.ids == {"ok"} and plan.creating == {"ok"} and not plan.peeks
    # ids after "q.a\0z" are the ids after "q.a": none lies between them
    assert plan.lists == {("q.", None, "q.a", 5)}


def test_only_a_change_of_status_columns_is_written_as_statuses() -> None:
    """The store writes a job whose time, payload and schedule did not change with
    the status columns only: every other field's change must take the whole row
    (a field added to Job is written whole until the status statement has it)."""
    from dataclasses import fields, replace

    from kairoi_trio.storage.postgres.store import _split_updates

    status_columns = {"status", "attempts", "last_outcome", "updated_at"}
    old = new_job("r", 100, PLANNED, b"p", 0, "", 1)
    recurring = replace(old, recurrence=Recurrence(Schedule("every 1m"), 100))
    changed: dict[str, Any] = {
        "id": "r",  # (the same row)
        "execute_at": 200,
        "status": TRIGGERED,
        "payload": b"q",
        "attempts": 1,
        "last_outcome": "ok",
        "updated_at": 2,
        "recurrence": Recurrence(Schedule("every 1m"), 100),
    }
    assert set(changed) == {f.name for f in fields(Job)}
    for name, value in changed.items():
        if name == "id":
            continue
        new = replace(old, **{name: value})
        whole, marked = _split_updates([new], {"r": old})
        assert (marked == [new]) == (name in status_columns), name
        assert (whole == [new]) == (name not in status_columns), name
    assert recurring.recurrence is not None
    paused = replace(recurring, recurrence=replace(recurring.recurrence, paused=True))
    assert _split_updates([paused], {"r": recurring}) == ([paused], [])
