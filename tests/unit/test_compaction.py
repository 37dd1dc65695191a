"""Compaction keeps the latest state, shrinks the directory, and survives a crash anywhere."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import trio

from kairoi_trio.commands import DeleteJob, Request, SetJob
from kairoi_trio.core import actor as actor_module
from kairoi_trio.core.actor import ActorClient, CommandActor
from kairoi_trio.core.checkpoint import Checkpoint
from kairoi_trio.core.state import State
from kairoi_trio.model import Job, Rule, ShellRunner, Status
from kairoi_trio.storage import compaction
from kairoi_trio.storage.compaction import segment_path, snapshot_path
from kairoi_trio.storage.info import describe_log
from kairoi_trio.storage.log import CorruptLogError, DurableLog, LoadedState, StorageError
from kairoi_trio.storage.records import JobDelete, JobPut, JobStatus, RulePut, apply_record

RULE = Rule("r1", "app.", ShellRunner("/bin/true"))


class Model:
    """The state a command actor would hold, kept next to the log it writes."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.rules: dict[str, Rule] = {}

    async def append(self, log: DurableLog, records: list) -> None:
        await log.append(records)
        for record in records:
            apply_record(self.jobs, self.rules, record)


async def open_log(directory: Path) -> tuple[DurableLog, LoadedState]:
    log = DurableLog(directory)
    state = await trio.to_thread.run_sync(log.load)
    return log, state


def load(directory: Path) -> LoadedState:
    log = DurableLog(directory)
    state = log.load()
    log._close_blocking()
    return state


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "LOCK")


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


async def churn(log: DurableLog, model: Model, rounds: int = 20) -> None:
    """Many overwrites of a few jobs: a log that compacts well."""
    for r in range(rounds):
        await model.append(
            log,
            [JobPut(Job(f"j{i}", r, payload=b"p" * 200)) for i in range(10)]
            + [JobStatus("j0", Status.TRIGGERED, r, "", r), JobDelete("j9"), RulePut(RULE)],
        )


async def test_compaction_keeps_the_latest_state_and_shrinks_the_directory(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    model = Model()
    await churn(log, model)
    before = directory_bytes(tmp_path)
    assert log.bytes_since_snapshot > 20 * 10 * 200
    await log.compact(dict(model.jobs), dict(model.rules))
    assert names(tmp_path) == ["segment-0000000002.log", "snapshot-0000000001.snap"]
    assert directory_bytes(tmp_path) < before / 10
    assert log.bytes_since_snapshot < 100 and log.snapshot_bytes > 9 * 200
    await model.append(log, [JobPut(Job("after", 1))])
    await log.aclose()
    state = load(tmp_path)
    assert state.jobs == model.jobs and state.rules == model.rules
    assert state.snapshot_seq == 1
    assert state.jobs["j0"].status is Status.TRIGGERED and state.jobs["j0"].payload == b"p" * 200


async def test_second_compaction_replaces_the_first(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    model = Model()
    for _ in range(3):
        await churn(log, model, rounds=2)
        await log.compact(dict(model.jobs), dict(model.rules))
    assert names(tmp_path) == ["segment-0000000004.log", "snapshot-0000000003.snap"]
    await log.aclose()
    assert load(tmp_path).jobs == model.jobs


async def test_appends_continue_while_the_snapshot_is_written(tmp_path: Path, monkeypatch) -> None:
    log, _ = await open_log(tmp_path)
    model = Model()
    await churn(log, model, rounds=3)
    release = threading.Event()
    real = compaction.write_snapshot

    def slow_write_snapshot(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(compaction, "write_snapshot", slow_write_snapshot)
    seq = await log.rotate()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.write_snapshot, seq, dict(model.jobs), dict(model.rules))
        await trio.sleep(0.05)
        assert log.compacting
        with pytest.raises(RuntimeError, match="already running"):
            await log.compact(dict(model.jobs), dict(model.rules))
        await model.append(log, [JobPut(Job("during", 7)), JobDelete("j1")])
        release.set()
    assert not log.compacting
    await model.append(log, [JobPut(Job("later", 8))])
    await log.aclose()
    state = load(tmp_path)
    assert state.jobs == model.jobs and "during" in state.jobs and "j1" not in state.jobs


async def test_write_snapshot_rejects_a_segment_that_is_not_sealed(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    with pytest.raises(ValueError):
        await log.write_snapshot(log.active_segment, {}, {})
    await log.aclose()


async def test_failed_snapshot_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    log, _ = await open_log(tmp_path)
    model = Model()
    await churn(log, model, rounds=2)
    real = compaction.write_snapshot_tmp

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compaction, "write_snapshot_tmp", disk_full)
    with pytest.raises(StorageError, match="disk full"):
        await log.compact(dict(model.jobs), dict(model.rules))
    assert not log.compacting
    assert names(tmp_path) == ["segment-0000000001.log", "segment-0000000002.log"]
    monkeypatch.setattr(compaction, "write_snapshot_tmp", real)
    await model.append(log, [JobPut(Job("x", 1))])
    await log.compact(dict(model.jobs), dict(model.rules))
    await log.aclose()
    assert load(tmp_path).jobs == model.jobs


# -- crash safety: stop after each step, then start up ------------------------------------


async def _prepare(directory: Path) -> tuple[int, Model, Model]:
    """A log with a snapshot, later segments, and a rotation for the next compaction.

    Returns the sealed segment number and the state as of the end of it. The
    log is closed afterwards, which for the files is the same as a crash: every
    write is a direct os.pwrite, nothing is buffered in the process.
    """
    log, _ = await open_log(directory)
    model = Model()
    await churn(log, model, rounds=3)
    await log.compact(dict(model.jobs), dict(model.rules))  # snapshot 1, segment 2 active
    await churn(log, model, rounds=2)
    seq = await log.rotate()  # seals 2
    snapshot = Model()
    snapshot.jobs, snapshot.rules = dict(model.jobs), dict(model.rules)
    await model.append(log, [JobPut(Job("after-rotate", 5)), JobDelete("j2")])  # into segment 3
    await log.aclose()
    return seq, snapshot, model


def _check_recovers(directory: Path, model: Model) -> None:
    state = load(directory)
    assert state.jobs == model.jobs and state.rules == model.rules
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert state.warnings == []
    # Start-up after the crash leaves a clean directory: no covered segment, one snapshot.
    snapshot = state.snapshot_seq
    assert [p.name for p in directory.glob("snapshot-*")] == [
        snapshot_path(directory, snapshot).name
    ]
    assert min(int(p.stem.split("-")[1]) for p in directory.glob("segment-*")) == snapshot + 1


async def test_crash_after_rotation(tmp_path: Path) -> None:
    _seq, _snapshot, model = await _prepare(tmp_path)
    _check_recovers(tmp_path, model)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
async def test_crash_while_or_after_writing_the_temporary_snapshot(
    tmp_path: Path, fraction: float
) -> None:
    seq, snapshot, model = await _prepare(tmp_path)
    tmp = compaction.write_snapshot_tmp(tmp_path, seq, snapshot.jobs, snapshot.rules)
    data = tmp.read_bytes()
    tmp.write_bytes(data[: int(len(data) * fraction)])
    _check_recovers(tmp_path, model)
    assert load(tmp_path).snapshot_seq == 1


async def test_crash_after_the_rename(tmp_path: Path) -> None:
    seq, snapshot, model = await _prepare(tmp_path)
    tmp = compaction.write_snapshot_tmp(tmp_path, seq, snapshot.jobs, snapshot.rules)
    compaction.publish_snapshot(tmp)
    assert segment_path(tmp_path, seq).exists() and snapshot_path(tmp_path, 1).exists()
    _check_recovers(tmp_path, model)
    assert load(tmp_path).snapshot_seq == seq


async def test_crash_while_deleting_covered_files(tmp_path: Path) -> None:
    seq, snapshot, model = await _prepare(tmp_path)
    tmp = compaction.write_snapshot_tmp(tmp_path, seq, snapshot.jobs, snapshot.rules)
    compaction.publish_snapshot(tmp)
    snapshot_path(tmp_path, 1).unlink()  # deleted the old snapshot, not yet segment 2
    _check_recovers(tmp_path, model)


async def test_crash_after_all_steps(tmp_path: Path) -> None:
    seq, snapshot, model = await _prepare(tmp_path)
    compaction.write_snapshot(tmp_path, seq, snapshot.jobs, snapshot.rules)
    assert names(tmp_path) == ["segment-0000000003.log", "snapshot-0000000002.snap"]
    _check_recovers(tmp_path, model)


# -- damaged snapshots ------------------------------------------------------------------


async def _one_snapshot(directory: Path) -> Path:
    log, _ = await open_log(directory)
    model = Model()
    await churn(log, model, rounds=1)
    await log.compact(dict(model.jobs), dict(model.rules))
    await log.aclose()
    return snapshot_path(directory, 1)


async def test_truncated_snapshot_is_corruption(tmp_path: Path) -> None:
    path = await _one_snapshot(tmp_path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CorruptLogError, match=str(path)):
        load(tmp_path)


async def test_snapshot_without_end_record_is_corruption(tmp_path: Path) -> None:
    path = await _one_snapshot(tmp_path)
    path.write_bytes(path.read_bytes()[:-29])  # exactly the SnapshotEnd frame (12 + 17 bytes)
    with pytest.raises(CorruptLogError, match="without its end record"):
        load(tmp_path)


async def test_flipped_byte_in_snapshot_is_corruption(tmp_path: Path) -> None:
    path = await _one_snapshot(tmp_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match=rf"{path}: offset \d+"):
        load(tmp_path)


async def test_a_flipped_bit_anywhere_in_a_snapshot_is_refused(tmp_path: Path) -> None:
    path = await _one_snapshot(tmp_path)
    clean = path.read_bytes()
    positions = [
        *range(0, 64),
        *range(64, len(clean) - 29, 13),
        *range(len(clean) - 29, len(clean)),
    ]
    for pos in positions:
        data = bytearray(clean)
        data[pos] ^= 1 << (pos % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptLogError, match=rf"{path}: offset \d+: "):
            load(tmp_path)
        assert path.read_bytes() == bytes(data)
    path.write_bytes(clean)
    assert len(load(tmp_path).jobs) == 9


async def test_only_the_names_the_log_writes_are_read(tmp_path: Path) -> None:
    """A stray "segment-2.log" (not 10 digits) is neither segment 2 nor a duplicate of it."""
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(Job("a", 1))])
    await log.aclose()
    stray = tmp_path / "segment-2.log"
    stray.write_bytes(b"not a segment")
    (tmp_path / "segment-0000000001.log.bak").write_bytes(b"x")
    state = load(tmp_path)
    assert set(state.jobs) == {"a"} and state.warnings == []
    assert stray.read_bytes() == b"not a segment"


async def test_the_actor_copies_its_jobs_in_slices_while_clients_change_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction by the command actor on the real log: the copy of the jobs takes
    many steps (one job each here), clients set and delete jobs between them,
    and the snapshot is the state at the rotation, in snapshot order; with the
    segments after it, the directory reads back as the final state."""
    monkeypatch.setattr(actor_module, "COPY_SLICE", 1)
    saved_meanwhile = []
    checkpoints = set()
    save = Checkpoint.save

    def spy(checkpoint: Checkpoint, job_id: str, job: Job | None) -> None:
        saved_meanwhile.append(not checkpoint.done)
        checkpoints.add(checkpoint)
        save(checkpoint, job_id, job)

    monkeypatch.setattr(Checkpoint, "save", spy)
    log, _ = await open_log(tmp_path)
    statuses = list(Status)
    jobs = [Job(f"j{i:04d}", i, statuses[i % 4]) for i in range(3_000)]
    await log.append([JobPut(job) for job in jobs])
    send, receive = trio.open_memory_channel[Request](100)
    # the first batch compacts (no snapshot yet), and no later one
    actor = CommandActor(State(jobs), log, receive, compact_after_bytes=1, compact_ratio=1000)
    client = ActorClient(send)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await client.call(SetJob("new0", 1))  # the actor compacts after it
        at_cut = dict(actor.state.jobs)
        await client.call(SetJob("j0003", 5))  # a failed job set again: planned
        await client.call(DeleteJob("j2998"))  # a job the walk has not reached
        await client.call(DeleteJob("j0000"))
        for i in range(10):
            await client.call(SetJob(f"new{i + 1}", 7))
            await client.call(SetJob(f"j{i * 8:04d}", 8))
            await client.call(SetJob(f"j{2_998 - i * 12:04d}", 9))  # executed: planned again
        await client.aclose()  # the actor stops once its snapshot is written
    await log.aclose()
    assert any(saved_meanwhile)  # changes came while the copy was under way
    [checkpoint] = checkpoints
    assert checkpoint.jobs_in_order == []  # the copy was let go once written
    assert at_cut != actor.state.jobs
    snapshot = tmp_path / "snapshot-0000000001.snap"
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / snapshot.name).write_bytes(snapshot.read_bytes())
    assert load(alone).jobs == at_cut
    rank = {status: r for r, status in enumerate(Status)}
    assert list(load(alone).jobs) == sorted(at_cut, key=lambda i: (rank[at_cut[i].status], i))
    assert load(tmp_path).jobs == actor.state.jobs


async def test_a_stop_during_the_copy_ends_the_compaction_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's stop cancels the actor's nursery; a compaction whose copy is
    under way ends there (the segments hold everything: the next start replays
    them), its checkpoint with it; the dashboard said it was running meanwhile."""
    monkeypatch.setattr(actor_module, "COPY_SLICE", 10)
    log, _ = await open_log(tmp_path)
    jobs = [Job(f"j{i:05d}", i) for i in range(5_000)]
    await log.append([JobPut(job) for job in jobs])
    send, receive = trio.open_memory_channel[Request](10)
    actor = CommandActor(State(jobs), log, receive, compact_after_bytes=1, compact_ratio=1000)
    async with trio.open_nursery() as core:
        await core.start(actor.run)
        await ActorClient(send).call(SetJob("x", 1))  # the actor compacts after it
        while actor.state.checkpoint is None:  # the rotation, in a worker thread
            await trio.lowlevel.checkpoint()
        view = describe_log(log, lambda: actor.state.checkpoint is not None)  # as app.py
        assert view["compacting"] and not log.compacting  # copying: not writing yet
        core.cancel_scope.cancel()  # what serve() does on stop
    await log.aclose()
    assert actor.state.checkpoint is None
    assert names(tmp_path) == ["segment-0000000001.log", "segment-0000000002.log"]
    assert load(tmp_path).jobs == actor.state.jobs
