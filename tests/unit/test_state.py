"""The in-memory index (core/state.py): counts, due order, rule pairing, listing, retention."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairoi_trio.core import state as state_module
from kairoi_trio.core.due import BUCKET_SHIFT
from kairoi_trio.core.state import State
from kairoi_trio.model import (
    MAX_TIME_US,
    MIN_TIME_US,
    Job,
    Recurrence,
    Rule,
    Schedule,
    ShellRunner,
    Status,
)

PLANNED, TRIGGERED, EXECUTED, FAILED = (
    Status.PLANNED,
    Status.TRIGGERED,
    Status.EXECUTED,
    Status.FAILED,
)


def job(job_id: str, at: int = 0, status: Status = PLANNED, updated_at: int = 0) -> Job:
    return Job(job_id, at, status, updated_at=updated_at)


def rule(rule_id: str, pattern: str) -> Rule:
    return Rule(rule_id, pattern, ShellRunner(f"/bin/{rule_id}"))


def counts(state: State) -> dict[Status, int]:
    return {status: n for status, n in state.counts.items() if n}


def snapshot_ids(state: State) -> list[str]:
    """The ids in the order a compaction's snapshot stores them (by status, then id)."""
    checkpoint = state.begin_checkpoint()
    while not checkpoint.done:
        checkpoint.copy_some(7)
    state.end_checkpoint()
    return [job.id for job in checkpoint.jobs_in_order]


def drain(state: State, now: int) -> list[str]:
    """Pop every due job and mark it triggered, as the actor does; the ids in order."""
    ids = []
    for due in state.pop_due(now):
        ids.append(due.id)
        state.put_job(replace(due, status=TRIGGERED))
    return ids


# -- jobs and counts -------------------------------------------------------------


def test_put_replace_delete_keep_counts_right() -> None:
    state = State()
    assert state.put_job(job("a", 10)) is None
    assert state.put_job(job("b", 20)) is None
    assert counts(state) == {PLANNED: 2}

    old = state.put_job(job("a", 10, TRIGGERED))
    assert old == job("a", 10)
    assert counts(state) == {PLANNED: 1, TRIGGERED: 1}

    state.put_job(job("a", 10, EXECUTED, updated_at=5))
    state.put_job(job("b", 20, FAILED, updated_at=6))
    assert counts(state) == {EXECUTED: 1, FAILED: 1}

    assert state.delete_job("a") == job("a", 10, EXECUTED, updated_at=5)
    assert state.delete_job("a") is None
    assert counts(state) == {FAILED: 1}
    assert state.jobs == {"b": job("b", 20, FAILED, updated_at=6)}


def test_constructor_counts_and_indexes_given_jobs_and_rules() -> None:
    state = State(
        [job("x", 30), job("y", 10, EXECUTED, 1), job("z", 20), job("w", 5, TRIGGERED)],
        [rule("r", "x")],
    )
    assert counts(state) == {PLANNED: 2, EXECUTED: 1, TRIGGERED: 1}
    assert state.next_due() == 20
    assert drain(state, 100) == ["z", "x"]
    assert state.match_rule("xyz") == rule("r", "x")
    assert state.expired_finished(before=2, limit=10) == ["y"]


def test_a_dict_of_jobs_is_adopted_and_indexed_like_the_same_jobs_given_one_by_one() -> None:
    paused = Recurrence(Schedule("every 60s"), 15, paused=True)
    given = [
        job("x", 30),
        job("y", 10, EXECUTED, 4),
        job("z", 20),
        job("w", 5, TRIGGERED),
        job("v", 7, FAILED, 2),
        Job("p", 15, PLANNED, recurrence=paused),
    ]
    by_id = {j.id: j for j in given}
    adopted = State(by_id)
    assert adopted.jobs is by_id  # no second dict of n entries at start-up
    one_by_one = State()
    for j in given:
        one_by_one.put_job(j)
    for state in (adopted, one_by_one):
        assert counts(state) == {PLANNED: 3, EXECUTED: 1, TRIGGERED: 1, FAILED: 1}
        page = state.list_jobs("", None, "", 10)
        assert ([j.id for j in page[0]], page[1]) == (["p", "v", "w", "x", "y", "z"], "")
        assert state.list_jobs("", FAILED, "", 10) == ([given[4]], "")
        assert state.expired_finished(before=5, limit=10) == ["v", "y"]
        assert state.next_due() == 20  # the paused job waits for no time
        assert drain(state, 100) == ["z", "x"]


# -- due order ----------------------------------------------------------------------


def test_pop_due_yields_planned_jobs_in_execute_at_order_up_to_now() -> None:
    state = State()
    for job_id, at in [("c", 30), ("a", 50), ("e", 10), ("b", 40), ("d", 20)]:
        state.put_job(job(job_id, at))
    state.put_job(job("t", 1, TRIGGERED))
    state.put_job(job("x", 2, EXECUTED))
    state.put_job(job("f", 3, FAILED))
    assert state.next_due() == 10
    assert drain(state, 35) == ["e", "d", "c"]
    assert state.next_due() == 40
    assert drain(state, 35) == []
    assert drain(state, 1000) == ["b", "a"]
    assert state.next_due() is None


def test_next_due_is_none_when_nothing_is_planned() -> None:
    state = State()
    assert state.next_due() is None
    state.put_job(job("a", 5, EXECUTED))
    assert state.next_due() is None


def test_re_set_to_a_later_time_leaves_no_trace_of_the_old_time() -> None:
    state = State()
    state.put_job(job("a", 10))
    state.put_job(job("b", 20))
    state.put_job(job("a", 30))  # re-SET: the (10, a) heap entry is now stale
    assert state.next_due() == 20
    assert drain(state, 15) == []
    assert drain(state, 25) == ["b"]
    assert state.next_due() == 30
    assert drain(state, 30) == ["a"]


def test_re_set_to_an_earlier_time_is_due_at_the_new_time_only_once() -> None:
    state = State()
    state.put_job(job("a", 100))
    state.put_job(job("a", 10))
    assert state.next_due() == 10
    assert drain(state, 1000) == ["a"]
    assert state.next_due() is None


def test_deleted_and_status_changed_jobs_are_not_due() -> None:
    state = State()
    for job_id, at in [("a", 10), ("b", 20), ("c", 30), ("d", 40)]:
        state.put_job(job(job_id, at))
    state.delete_job("a")
    state.put_job(job("b", 20, FAILED, updated_at=1))
    state.put_job(job("c", 30, TRIGGERED))
    assert state.next_due() == 40
    assert drain(state, 1000) == ["d"]


def test_set_same_time_twice_and_back_again_is_due_once() -> None:
    state = State()
    state.put_job(job("a", 10))
    state.put_job(job("a", 10))  # same time: nothing new to index
    state.put_job(job("a", 20))
    state.put_job(job("a", 10))  # back to 10: two (10, a) entries in the heap
    assert drain(state, 1000) == ["a"]
    assert state.next_due() is None


def test_a_finished_job_set_again_is_due_again() -> None:
    state = State()
    state.put_job(job("a", 10))
    assert drain(state, 10) == ["a"]
    state.put_job(job("a", 10, EXECUTED, updated_at=11))
    assert state.next_due() is None
    state.put_job(job("a", 10))
    assert state.next_due() == 10
    assert drain(state, 10) == ["a"]


def test_hold_keeps_popped_jobs_in_their_kinds_line_in_order() -> None:
    state = State()
    state.put_job(job("a", 10))
    state.put_job(job("b", 20))
    state.put_job(job("c", 30))
    for due in state.pop_due(25):
        state.hold("shell", due)
    assert [j.id for j in state.waiting["shell"]] == ["a", "b"]
    assert state.next_due() == 30  # held jobs are out of the heap: popped once only
    assert drain(state, 1000) == ["c"]


def test_stopping_pop_due_early_leaves_the_rest_due() -> None:
    state = State()
    for i in range(5):
        state.put_job(job(f"j{i}", i))
    popped = state.pop_due(100)
    first = next(popped)
    state.put_job(replace(first, status=TRIGGERED))
    assert first.id == "j0"
    assert state.next_due() == 1
    assert drain(state, 100) == ["j1", "j2", "j3", "j4"]


def test_heap_rebuild_keeps_due_order_and_bounds_memory() -> None:
    state = State()
    for i in range(50):
        state.put_job(job(f"keep{i:02d}", 1000 + i))
    # Thousands of re-SETs of one job leave stale entries until a rebuild drops them;
    # next_due after each, as the actor calls it after each commit.
    rebuilds = 0
    for n in range(5000):
        state.put_job(job("moving", 10_000 + n))
        rebuilds += state._rebuild is not None
        assert state.next_due() == 1000
        assert len(state._due) <= 2 * 51 + 1024 + 1
    assert state.counts[PLANNED] == 51
    assert rebuilds >= 3 and state._rebuild is None
    assert drain(state, 10**9) == [f"keep{i:02d}" for i in range(50)] + ["moving"]
    assert state.next_due() is None


def rebuild(state: State, start: int = 0) -> int:
    """Re-SETs of many of `state`'s 2,000 jobs (stale entries in the heap and the
    buckets) until a rebuild of the due index begins, with no next_due call meanwhile,
    then next_due calls until the rebuilt index takes over; the re-SETs' next start."""
    n = start
    while state._rebuild is None:
        state.put_job(job(f"keep{n % 2000:04d}", (n + 1) * (1 << 30) + n % 2000))
        n += 1
    while state._rebuild is not None:
        state.next_due()
    return n


def test_the_index_a_rebuild_replaced_is_let_go_a_slice_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_module, "RELEASE_SLICE", 100)
    state = State(job(f"keep{i:04d}", 1000 + i) for i in range(2000))
    rebuild(state)
    retired = sum(map(len, state._retired))
    assert retired > 2 * 2000  # the old index's entries, held until let go
    calls = 0
    while state._retired and calls < 10_000:
        state.next_due()
        calls += 1
    assert not state._retired and calls >= retired // 100
    assert drain(state, 10**18) == sorted(state.jobs, key=lambda i: state.jobs[i].execute_at)


def test_a_second_rebuild_keeps_letting_go_of_the_first_ones_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_module, "RELEASE_SLICE", 100)
    state = State(job(f"keep{i:04d}", 1000 + i) for i in range(2000))
    n = rebuild(state)
    first = list(state._retired)
    rebuild(state, n)
    held = {id(items) for items in state._retired}
    assert all(not items or id(items) in held for items in first)  # none dropped whole


def test_sets_into_a_bucket_being_opened_never_keep_it_from_opening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More SETs into the bucket a commit than the slices open (a SetJobs of
    thousands due soon): they become entries at once, so the bucket opens and its
    overdue jobs come due (they waited for ever when the SETs joined its list)."""
    monkeypatch.setattr(state_module, "OPEN_SLICE", 10)
    bucket = 7 << BUCKET_SHIFT
    now = bucket + 1_000_000
    state = State()
    for n in range(200):  # overdue, in the bucket's list
        state.put_job(job(f"old{n:03d}", bucket + n))
    triggered: list[str] = []
    for commit in range(40):
        for n in range(50):  # 50 SETs a commit, due a minute later, in the same bucket
            state.put_job(job(f"new{commit:02d}.{n:02d}", now + 60_000_000))
        triggered += drain(state, now)  # TriggerDue in the batch, next_due after it
        state.next_due()
    assert triggered == [f"old{n:03d}" for n in range(200)]
    assert state.next_due() == now + 60_000_000


def test_a_rebuild_in_slices_misses_no_change_made_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slice a next_due call: jobs set, re-set, deleted and triggered between the
    slices, before and after where the rebuild has got to, come due as they are."""
    monkeypatch.setattr(state_module, "OPEN_SLICE", 3)
    monkeypatch.setattr(state_module, "REBUILD_PER_PUSH", 0)
    state = State()
    for i in range(20):
        state.put_job(job(f"j{i:02d}", 1000 + i))
    for n in range(1100):  # stale entries: a rebuild begins
        state.put_job(job("j19", 5000 + n))
    assert state._rebuild is not None
    state.next_due()
    state.next_due()  # j00..j05 are in the new index
    assert state._rebuild is not None and state._rebuild.after == "j05"
    state.put_job(job("j02", 3000))  # passed already: pushed into both
    state.put_job(job("j10", 2900))  # still to come: its slice reads it as it is
    state.put_job(job("j00", 10))  # earlier than any
    state.delete_job("j03")
    state.put_job(job("j04", 1004, TRIGGERED))
    state.put_job(job("a.new", 7))  # a new id before the cursor
    state.put_job(job("z.new", 8))  # a new one after it
    calls = 0
    while state._rebuild is not None:
        state.next_due()
        calls += 1
    assert calls == 6  # 17 ids left, 3 a call
    assert len(state._due) < 100  # the 1,100 stale entries are gone
    monkeypatch.setattr(state_module, "OPEN_SLICE", 4096)  # (its bucket opened at once)
    expected = sorted((j.execute_at, j.id) for j in state.jobs.values() if j.status is PLANNED)
    assert state.next_due() == expected[0][0]
    assert drain(state, 10**9) == [job_id for _, job_id in expected]


def test_a_rebuild_leaves_paused_jobs_out_and_keeps_the_others() -> None:
    paused = Recurrence(Schedule("every 60s"), 15, paused=True)
    state = State([Job("p", 15, PLANNED, recurrence=paused), job("done", 5)])
    state.put_job(replace(state.jobs["done"], status=TRIGGERED))
    for i in range(20):
        state.put_job(job(f"keep{i:02d}", 1000 - i))
    for n in range(3000):  # stale entries enough for a rebuild
        state.put_job(job("moving", 10_000 + n))
    assert state.next_due() == 981
    assert len(state._due) <= 2 * state.counts[PLANNED] + 1024 + 1
    expected = [f"keep{i:02d}" for i in reversed(range(20))] + ["moving"]
    assert drain(state, 10**9) == expected  # not "p" (paused), not "done" (triggered)


def test_a_large_bucket_is_opened_over_several_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket of more than OPEN_SLICE jobs costs no call more than OPEN_SLICE ids:
    until it is open, next_due says OPENING (ask again at once) and pop_due stops
    short; then every job comes due once, in order, as at once."""
    monkeypatch.setattr(state_module, "OPEN_SLICE", 100)
    bucket = 7 << BUCKET_SHIFT
    jobs = [job(f"j{i:03d}", bucket + 5000 - (i % 50)) for i in range(450)]
    state = State(jobs)
    answers = [state.next_due()]
    while answers[-1] == state_module.OPENING:
        answers.append(state.next_due())
    # 900 ids' work, 100 a call: 450 to take from the start-up's cold fill, 450 to open
    assert answers == [state_module.OPENING] * 8 + [bucket + 5000 - 49]
    state = State(jobs)
    ids: list[str] = []
    calls = 0
    while len(ids) < len(jobs):
        calls += 1
        ids += drain(state, bucket + 5000)
    assert calls == 9  # eight slices, then all the jobs
    assert ids == [j.id for j in sorted(jobs, key=lambda j: (j.execute_at, j.id))]
    assert state.next_due() is None


# -- rules ------------------------------------------------------------------------


def matched_id(state: State, job_id: str) -> str | None:
    """The id of the rule that matches job_id (None: none does)."""
    found = state.match_rule(job_id)
    return None if found is None else found.id


def test_longest_prefix_wins() -> None:
    state = State(rules=[rule("r1", "app"), rule("r2", "app.mail."), rule("r3", "app.")])
    assert matched_id(state, "app.mail.42") == "r2"
    assert matched_id(state, "app.sms.1") == "r3"
    assert matched_id(state, "apple") == "r1"
    assert state.match_rule("ap") is None
    assert state.match_rule("other") is None


def test_plain_starts_with_not_a_glob() -> None:
    state = State(rules=[rule("r", "app.")])
    assert matched_id(state, "app.x") == "r"
    assert matched_id(state, "app.") == "r"
    assert state.match_rule("appx") is None
    assert state.match_rule("xapp.x") is None
    assert State(rules=[rule("s", "a*")]).match_rule("abc") is None


def test_equal_length_ties_go_to_the_smallest_rule_id() -> None:
    state = State()
    state.put_rule(rule("zeta", "job."))
    state.put_rule(rule("beta", "job."))
    state.put_rule(rule("mu", "job."))
    assert matched_id(state, "job.1") == "beta"
    state.delete_rule("beta")
    assert matched_id(state, "job.1") == "mu"


def test_empty_pattern_matches_everything_but_loses_to_longer_ones() -> None:
    state = State(rules=[rule("all", ""), rule("a", "a")])
    assert matched_id(state, "zzz") == "all"
    assert matched_id(state, "x") == "all"
    assert matched_id(state, "abc") == "a"


def test_deleting_rules_updates_matching() -> None:
    state = State(rules=[rule("short", "a"), rule("long", "abc"), rule("other", "xyz")])
    assert matched_id(state, "abcd") == "long"
    assert state.delete_rule("long") == rule("long", "abc")
    assert matched_id(state, "abcd") == "short"
    state.delete_rule("short")
    assert state.match_rule("abcd") is None
    assert state.delete_rule("short") is None
    assert matched_id(state, "xyz1") == "other"


def test_replacing_a_rule_with_another_pattern_forgets_the_old_pattern() -> None:
    state = State(rules=[rule("r", "old.")])
    assert state.put_rule(rule("r", "new.")) == rule("r", "old.")
    assert state.match_rule("old.1") is None
    assert matched_id(state, "new.1") == "r"
    assert state.rules == {"r": rule("r", "new.")}


def test_list_rules_by_prefix_and_after() -> None:
    state = State(rules=[rule(i, i) for i in ["b2", "a1", "b1", "b3", "c1"]])
    assert [r.id for r in state.list_rules("b", "", 10)] == ["b1", "b2", "b3"]
    assert [r.id for r in state.list_rules("b", "b1", 1)] == ["b2"]
    assert [r.id for r in state.list_rules("", "", 100)] == ["a1", "b1", "b2", "b3", "c1"]


# -- listing ------------------------------------------------------------------------


def walk(state: State, prefix: str, status: Status | None, limit: int) -> tuple[list[str], int]:
    """All pages of a listing; the ids and the number of pages."""
    ids: list[str] = []
    after = ""
    pages = 0
    while True:
        page, after = state.list_jobs(prefix, status, after, limit)
        pages += 1
        assert len(page) <= limit
        ids += [j.id for j in page]
        if not after:
            return ids, pages
        assert pages < 100_000, "listing does not terminate"


def test_walking_all_pages_returns_every_job_once_in_id_order() -> None:
    state = State()
    ids = [f"job.{i:05d}" for i in range(10_000)]
    for i in reversed(range(10_000)):
        state.put_job(job(ids[i], i))
    # neighbours that must not appear in a "job." listing
    for other in ["job", "jobs.1", "joa.9", "jz", "a", "z"]:
        state.put_job(job(other, 1))
    listed, pages = walk(state, "job.", None, 333)
    assert listed == ids
    assert pages == 31  # ceil(10_000 / 333)

    everything, _ = walk(state, "", None, 1000)
    assert everything == sorted(state.jobs)


def test_page_size_dividing_the_total_ends_cleanly() -> None:
    state = State([job(f"p{i}", i) for i in range(10)])
    page, after = state.list_jobs("p", None, "", 5)
    assert [j.id for j in page] == ["p0", "p1", "p2", "p3", "p4"]
    assert after == "p4"
    page, after = state.list_jobs("p", None, after, 5)
    assert [j.id for j in page] == ["p5", "p6", "p7", "p8", "p9"]
    if after:  # an extra empty page is allowed, a missing job is not
        page, after = state.list_jobs("p", None, after, 5)
        assert (page, after) == ([], "")


def test_after_is_exclusive_and_may_lie_outside_the_prefix() -> None:
    state = State([job(i) for i in ["a", "b1", "b2", "b3", "c"]])
    assert [j.id for j in state.list_jobs("b", None, "b1", 10)[0]] == ["b2", "b3"]
    assert [j.id for j in state.list_jobs("b", None, "a", 10)[0]] == ["b1", "b2", "b3"]
    assert state.list_jobs("b", None, "b3", 10) == ([], "")
    assert state.list_jobs("b", None, "zz", 10) == ([], "")
    assert [j.id for j in state.list_jobs("", None, "b2", 10)[0]] == ["b3", "c"]


def listed(state: State, prefix: str, status: Status | None) -> list[str]:
    return walk(state, prefix, status, 3)[0]


def test_a_status_change_moves_the_id_between_the_status_indexes() -> None:
    state = State([job("x.1"), job("x.2"), job("y.1")])
    assert listed(state, "x.", PLANNED) == ["x.1", "x.2"]
    state.put_job(job("x.1", 0, TRIGGERED))
    assert listed(state, "x.", PLANNED) == ["x.2"]
    assert listed(state, "x.", TRIGGERED) == ["x.1"]
    state.put_job(job("x.1", 0, EXECUTED))
    assert listed(state, "", TRIGGERED) == []
    assert listed(state, "", EXECUTED) == ["x.1"]
    state.put_job(job("x.1", 5, PLANNED))  # set again: planned again, in one index only
    assert listed(state, "x.", PLANNED) == ["x.1", "x.2"]
    assert listed(state, "", EXECUTED) == []
    assert listed(state, "", None) == ["x.1", "x.2", "y.1"]
    state.put_job(job("x.2", 9, PLANNED))  # a re-SET of a planned job stays where it is
    assert listed(state, "x.", PLANNED) == ["x.1", "x.2"]


def test_a_deleted_job_leaves_every_index() -> None:
    state = State([job("a"), job("b", 0, FAILED), job("c", 0, EXECUTED)])
    for job_id in ["a", "b", "c"]:
        state.delete_job(job_id)
    assert state.delete_job("a") is None
    for status in [None, *Status]:
        assert state.list_jobs("", status, "", 10) == ([], "")
    state.put_job(job("b", 0, PLANNED))  # back, under its new status only
    assert listed(state, "", FAILED) == []
    assert listed(state, "", None) == ["b"]


def test_prefix_status_and_pages_together() -> None:
    statuses = [PLANNED, TRIGGERED, EXECUTED, FAILED]
    state = State(
        [job(f"{p}.{i:02d}", i, statuses[i % 4]) for p in ["a", "ab", "b"] for i in range(40)]
    )
    page, after = state.list_jobs("ab.", FAILED, "", 4)
    assert [j.id for j in page] == ["ab.03", "ab.07", "ab.11", "ab.15"]
    assert after == "ab.15"
    page, after = state.list_jobs("ab.", FAILED, after, 4)
    assert [j.id for j in page] == ["ab.19", "ab.23", "ab.27", "ab.31"]
    page, after = state.list_jobs("ab.", FAILED, after, 4)
    assert [j.id for j in page] == ["ab.35", "ab.39"]
    assert after == ""  # the last page says so: no empty page to fetch
    page, after = state.list_jobs("a", None, "a.38", 3)  # unfiltered: the merge of the four
    assert [j.id for j in page] == ["a.39", "ab.00", "ab.01"]
    assert after == "ab.01"


def test_a_page_of_no_jobs_is_empty_and_complete() -> None:
    state = State([job("a")])
    assert state.list_jobs("", None, "", 0) == ([], "")
    assert state.list_jobs("", PLANNED, "", -1) == ([], "")


def test_a_rare_status_gives_full_pages_over_many_jobs() -> None:
    # 60,000 planned jobs and 120 failed ones, 500 ids apart: every page of the failed
    # ones is full, its token is its last id, and the last page ends the walk (the
    # former index scanned at most 20,000 ids a page: short and empty pages here).
    state = State([job(f"j{i:05d}") for i in range(60_000)])
    failed = [f"j{i:05d}" for i in range(0, 60_000, 500)]
    for job_id in failed:
        state.put_job(job(job_id, 0, FAILED))
    page, after = state.list_jobs("j", FAILED, "", 50)
    assert [j.id for j in page] == failed[:50]
    assert after == failed[49]
    page, after = state.list_jobs("j", FAILED, after, 50)
    assert [j.id for j in page] == failed[50:100]
    page, after = state.list_jobs("j", FAILED, after, 50)
    assert [j.id for j in page] == failed[100:]
    assert after == ""
    assert state.counts[FAILED] == 120


# -- retention ------------------------------------------------------------------------


def test_expired_finished_lists_old_finished_jobs_oldest_first() -> None:
    state = State()
    state.put_job(job("e1", 0, EXECUTED, updated_at=10))
    state.put_job(job("f1", 0, FAILED, updated_at=20))
    state.put_job(job("e2", 0, EXECUTED, updated_at=30))
    state.put_job(job("p", 0, PLANNED, updated_at=1))
    state.put_job(job("t", 0, TRIGGERED, updated_at=1))
    assert state.expired_finished(before=25, limit=10) == ["e1", "f1"]


def test_expired_finished_respects_the_limit() -> None:
    state = State([job(f"x{i}", 0, EXECUTED, updated_at=i) for i in range(5)])
    assert state.expired_finished(before=100, limit=2) == ["x0", "x1"]
    for job_id in ["x0", "x1"]:
        state.delete_job(job_id)
    assert state.expired_finished(before=100, limit=2) == ["x2", "x3"]


def test_expired_finished_skips_jobs_set_again_or_deleted() -> None:
    state = State()
    state.put_job(job("again", 0, EXECUTED, updated_at=10))
    state.put_job(job("gone", 0, FAILED, updated_at=11))
    state.put_job(job("later", 0, EXECUTED, updated_at=12))
    state.put_job(job("again", 500))  # re-SET: planned
    state.delete_job("gone")
    state.put_job(job("later", 0, PLANNED))
    state.put_job(job("later", 0, FAILED, updated_at=40))  # finished again, later
    assert state.expired_finished(before=30, limit=10) == []
    assert state.expired_finished(before=41, limit=10) == ["later"]


def test_expired_finished_lists_a_restored_job_once() -> None:
    state = State()
    finished = job("a", 0, EXECUTED, updated_at=10)
    state.put_job(finished)
    state.put_job(job("a", 99))  # a SET ...
    state.put_job(finished)  # ... undone (the actor's rollback after a failed append)
    assert state.expired_finished(before=100, limit=10) == ["a"]


# -- property: agrees with a naive model ------------------------------------------------

# Few ids, many of them prefixes of others, so that operations hit the same jobs often.
IDS = st.sampled_from(["a", "ab", "a.", "a.b", "b", "b.a", "ba", "aab"])
PATTERNS = st.sampled_from(["", "a", "ab", "a.", "b", "b.", "ba", "aab", "c"])
STATUSES = st.sampled_from([PLANNED, PLANNED, PLANNED, TRIGGERED, EXECUTED, FAILED])
# Times over several of the due index's buckets (2**BUCKET_SHIFT µs: seven of them
# here), before and after the epoch, with ties: later buckets become heap entries as
# the earlier ones run dry.
TIMES = st.integers(-6, 20).map(lambda t: t * (1 << (BUCKET_SHIFT - 2)) + t % 3)

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            IDS,
            TIMES,
            STATUSES,
            st.integers(0, 20),
        ),
        st.tuples(st.just("delete"), IDS),
        st.tuples(st.just("rule"), st.sampled_from(["r1", "r2", "r3", "r4"]), PATTERNS),
        st.tuples(st.just("unrule"), st.sampled_from(["r1", "r2", "r3", "r4"])),
        st.tuples(st.just("trigger"), TIMES, st.integers(1, 5)),
    ),
    max_size=60,
)


def naive_match(rules: dict[str, Rule], job_id: str) -> Rule | None:
    candidates = [r for r in rules.values() if job_id.startswith(r.pattern)]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (-len(r.pattern), r.id))


@settings(max_examples=200, deadline=None)
@given(operations, st.lists(st.text("ab.c", max_size=5), min_size=1, max_size=5))
def test_state_agrees_with_a_naive_model(ops: list[tuple], probes: list[str]) -> None:
    state = State()
    jobs: dict[str, Job] = {}
    rules: dict[str, Rule] = {}
    for op in ops:
        if op[0] == "put":
            _, job_id, at, status, updated = op
            new = job(job_id, at, status, updated)
            assert state.put_job(new) == jobs.get(job_id)
            jobs[job_id] = new
        elif op[0] == "delete":
            assert state.delete_job(op[1]) == jobs.pop(op[1], None)
        elif op[0] == "rule":
            new_rule = rule(op[1], op[2])
            assert state.put_rule(new_rule) == rules.get(op[1])
            rules[op[1]] = new_rule
        elif op[0] == "unrule":
            assert state.delete_rule(op[1]) == rules.pop(op[1], None)
        else:  # trigger up to `take` due jobs, as the dispatcher would
            _, now, take = op
            due = sorted(
                (j for j in jobs.values() if j.status is PLANNED and j.execute_at <= now),
                key=lambda j: (j.execute_at, j.id),
            )
            popped = []
            for popped_job in state.pop_due(now):
                popped.append(popped_job.id)
                triggered = replace(popped_job, status=TRIGGERED)
                state.put_job(triggered)
                jobs[triggered.id] = triggered
                if len(popped) == take:
                    break
            assert popped == [j.id for j in due[:take]]

        planned = [j.execute_at for j in jobs.values() if j.status is PLANNED]
        assert state.next_due() == (min(planned) if planned else None)
        assert State(dict(jobs)).next_due() == state.next_due()
        assert state.jobs == jobs
        assert state.counts == {s: sum(j.status is s for j in jobs.values()) for s in Status}

    for job_id in probes + list(jobs):
        assert state.match_rule(job_id) == naive_match(rules, job_id)
    for prefix in ["", "a", "b.", "ab"]:
        for status in [None, *Status]:
            expected = sorted(
                i for i, j in jobs.items() if i.startswith(prefix) and status in (None, j.status)
            )
            ids, _ = walk(state, prefix, status, 2)
            assert ids == expected
    for prefix in ["", "r", "r2"]:
        for after in ["", "r1", "r3", "q"]:
            expected_rules = sorted(i for i in rules if i.startswith(prefix) and i > after)
            assert [r.id for r in state.list_rules(prefix, after, 2)] == expected_rules[:2]


# -- start-up recovery of a replayed log ---------------------------------------------------


def test_recovery_plans_triggered_jobs_again_and_keeps_the_rest() -> None:
    jobs = {
        "t": Job("t", 5, TRIGGERED, b"p", 2, "", 7),
        "p": job("p", 9),
        "e": job("e", 1, EXECUTED, updated_at=3),
    }
    before = dict(jobs)
    assert state_module.recover_replayed(jobs) == (1, 0)
    assert jobs["t"] == Job("t", 5, PLANNED, b"p", 2, "", 7)
    assert jobs["p"] is before["p"] and jobs["e"] is before["e"]


def test_recovery_fails_jobs_whose_time_is_outside_the_supported_range() -> None:
    # A release without policy bounds could plan a retry in year ~12027: reading
    # it closed the KCP connection, and it could never run.
    year_12027 = MAX_TIME_US + 2000 * 365 * 86_400 * 1_000_000
    jobs = {
        "far": Job("far", year_12027, PLANNED, b"", 3, "attempt 3 failed: x", 42),
        "early": Job("early", MIN_TIME_US - 1, TRIGGERED, b"", 1, "", 43),
        "edge": job("edge", MAX_TIME_US),
    }
    assert state_module.recover_replayed(jobs) == (0, 2)
    far = jobs["far"]
    assert (far.status, far.execute_at, far.attempts, far.updated_at) == (
        FAILED,
        MAX_TIME_US,
        3,
        42,  # expires with the retention, as it would have
    )
    assert "outside the supported range 0001-01-01 to 9999-12-31" in far.last_outcome
    assert (jobs["early"].status, jobs["early"].execute_at) == (FAILED, MIN_TIME_US)
    assert jobs["edge"].status is PLANNED
    state = State(jobs.values())
    assert state.next_due() == MAX_TIME_US
    assert state.expired_finished(43, 10) == ["far"]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"t": Job("t", 5, TRIGGERED, b"p", 2, "", 7)},
        {"far": Job("far", MAX_TIME_US + 1, PLANNED, b"", 3, "x", 42)},
        {"early": Job("early", MIN_TIME_US - 1, EXECUTED, b"", 1, "y", 43)},
    ],
)
def test_a_replayed_state_is_recovered_as_recover_replayed_then_state_would(
    extra: dict[str, Job],
) -> None:
    """State(replayed=True), the start-up's path, recovers in place only when a job
    needs it, and indexes the result as State would after recover_replayed."""
    jobs = {
        **{f"p{i:03d}": job(f"p{i:03d}", (i % 17) * (1 << 34) + i) for i in range(200)},
        "e": job("e", 1, EXECUTED, updated_at=3),
        "f": job("f", 2, FAILED, updated_at=1),
        **extra,
    }
    expected_jobs = dict(jobs)
    expected_counts = state_module.recover_replayed(expected_jobs)
    expected = State(dict(expected_jobs))
    state = State(jobs, replayed=True)
    assert state.recovered == expected_counts
    assert state.jobs == expected_jobs
    assert state.counts == expected.counts
    assert snapshot_ids(state) == snapshot_ids(expected)
    assert state.expired_finished(MAX_TIME_US, 100) == expected.expired_finished(MAX_TIME_US, 100)
    assert list(state.pop_due(MAX_TIME_US)) == list(expected.pop_due(MAX_TIME_US))
