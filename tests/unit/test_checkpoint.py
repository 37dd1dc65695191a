"""A compaction's copy of the jobs, a slice at a time while they change (core/checkpoint.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kairoi_trio.core.state import State
from kairoi_trio.model import Job, Status

RANK = {status: rank for rank, status in enumerate(Status)}


def in_snapshot_order(jobs: dict[str, Job]) -> list[Job]:
    """What a snapshot stores: grouped by status in Status order, each group by id."""
    return sorted(jobs.values(), key=lambda job: (RANK[job.status], job.id))


def state_of(n: int) -> State:
    statuses = list(Status)
    return State(Job(f"j{i:03d}", 1_000 + i, statuses[i * 7 % 11 % 4]) for i in range(n))


def test_an_unchanged_state_is_copied_in_snapshot_order_over_several_calls() -> None:
    state = state_of(100)
    cut = in_snapshot_order(state.jobs)
    checkpoint = state.begin_checkpoint()
    calls = 0
    while not checkpoint.done:
        checkpoint.copy_some(8)
        calls += 1
    assert checkpoint.jobs_in_order == cut
    assert calls >= 100 // 8  # a slice at a time, not the whole in one call


def test_changes_made_between_slices_leave_the_copy_as_of_the_cut() -> None:
    state = state_of(60)
    cut = in_snapshot_order(state.jobs)
    checkpoint = state.begin_checkpoint()
    checkpoint.copy_some(10)  # the walk is inside the first status group
    first_group = [job.id for job in cut if job.status is Status.PLANNED]
    ahead, behind = first_group[-1], first_group[0]
    state.put_job(Job(ahead, 5, Status.FAILED))  # not reached yet: moves to a later group
    state.put_job(Job(behind, 6, Status.EXECUTED))  # taken already: moves ahead of the walk
    state.delete_job(first_group[-2])  # not reached yet: gone from the live index
    state.put_job(Job("j000a", 7))  # a new id, among those still to walk
    state.put_job(Job("zzz", 8, Status.FAILED))  # a new id in the last group
    state.put_job(Job(ahead, 9, Status.TRIGGERED))  # changed twice: the cut's job still
    while not checkpoint.done:
        checkpoint.copy_some(10)
    state.end_checkpoint()
    assert checkpoint.jobs_in_order == cut
    state.put_job(Job("after", 1))  # no checkpoint: nothing kept
    assert state.checkpoint is None


def test_a_change_to_the_last_id_a_slice_took_keeps_it_copied_once() -> None:
    state = state_of(30)
    cut = in_snapshot_order(state.jobs)
    checkpoint = state.begin_checkpoint()
    checkpoint.copy_some(4)
    last = checkpoint.jobs_in_order[-1]
    state.put_job(Job(last.id, 99, Status.FAILED))  # taken already: its cut job stays
    state.delete_job(checkpoint.jobs_in_order[-2].id)
    while not checkpoint.done:
        checkpoint.copy_some(4)
    assert checkpoint.jobs_in_order == cut


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 14),
    st.lists(
        st.one_of(
            st.tuples(st.just("copy"), st.integers(1, 5)),
            st.tuples(
                st.just("set"),
                st.integers(0, 20),  # ids past the first n are new
                st.sampled_from(list(Status)),
            ),
            st.tuples(st.just("delete"), st.integers(0, 20)),
        ),
        max_size=80,
    ),
)
def test_a_copy_taken_among_any_changes_is_the_state_at_the_cut(n: int, steps: list[tuple]) -> None:
    state = state_of(n)
    cut = in_snapshot_order(state.jobs)
    checkpoint = state.begin_checkpoint()
    for step in steps:
        if step[0] == "copy":
            checkpoint.copy_some(step[1])
        elif step[0] == "set":
            state.put_job(Job(f"j{step[1]:03d}", 7, step[2]))
        else:
            state.delete_job(f"j{step[1]:03d}")
    while not checkpoint.done:
        checkpoint.copy_some(3)
    state.end_checkpoint()
    assert checkpoint.jobs_in_order == cut


def test_the_copy_is_released_a_slice_at_a_time() -> None:
    state = state_of(25)
    checkpoint = state.begin_checkpoint()
    while not checkpoint.done:
        checkpoint.copy_some(10)
    state.end_checkpoint()
    copied = list(checkpoint.jobs_in_order)
    calls = 1
    while checkpoint.release_some(10):
        assert checkpoint.jobs_in_order == copied[: 25 - 10 * calls]  # from the end
        calls += 1
    assert calls == 3 and checkpoint.jobs_in_order == []
