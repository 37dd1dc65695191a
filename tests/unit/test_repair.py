"""`repair` salvages every valid record around damage; `backup` copies a live directory.

Real files throughout: logs written by DurableLog, damaged with bytes, repaired or
copied, and read back by the same replay as a server's start-up.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from kairoi_trio.model import AmqpRunner, HttpRunner, Job, Rule, RulePolicy, ShellRunner, Status
from kairoi_trio.storage import backup as backup_module
from kairoi_trio.storage import compaction
from kairoi_trio.storage import records as records_module
from kairoi_trio.storage.backup import (
    BackupError,
    BackupRefused,
    add_backup_command,
    backup,
    run_backup_command,
)
from kairoi_trio.storage.compaction import segment_path, snapshot_path
from kairoi_trio.storage.log import CorruptLogError, DurableLog, LoadedState, read_state
from kairoi_trio.storage.records import (
    FORMAT_VERSION,
    FRAME_SIZE,
    HEADER_SIZE,
    FrameError,
    JobDelete,
    JobPut,
    JobStatus,
    Record,
    RuleDelete,
    RulePut,
    apply_record,
    decode_frame,
)
from kairoi_trio.storage.repair import add_repair_command, repair, run_repair_command

FIXTURE_V1 = Path(__file__).parent.parent / "fixtures" / "data-v1"
RULES = [
    Rule("r.shell", "a.", ShellRunner("/bin/true")),
    Rule("r.amqp", "b.", AmqpRunner("amqp://h/", "x", "k"), RulePolicy(max_attempts=3)),
    Rule("r.http", "c.", HttpRunner("http://h/"), RulePolicy(timeout_s=1.5)),
]


def job(i: int, size: int = 40) -> Job:
    return Job(f"a.{i:05d}", 1_000 + i, payload=f"payload {i} ".encode().ljust(size, b"."))


async def _build(
    directory: Path, batches: Sequence[Sequence[Record]], compact_after: int | None = None
) -> dict:
    """Write `batches` through a real DurableLog (compacting after batch `compact_after`)."""
    log = DurableLog(directory)
    await trio.to_thread.run_sync(log.load)
    jobs: dict = {}
    rules: dict = {}
    for index, batch in enumerate(batches):
        await log.append(batch)
        for record in batch:
            apply_record(jobs, rules, record)
        if compact_after is not None and index == compact_after:
            await log.compact(dict(jobs), dict(rules))
    await log.aclose()
    (directory / "LOCK").unlink()
    return {"jobs": jobs, "rules": rules}


def build(
    directory: Path, batches: Sequence[Sequence[Record]], compact_after: int | None = None
) -> dict:
    return trio.run(_build, directory, batches, compact_after)


def standard(directory: Path) -> dict:
    """Snapshot 1 (100 jobs, 3 rules), segment 2 (100 more, status changes, deletes)."""
    first: list[list[Record]] = [[RulePut(r) for r in RULES], [JobPut(job(i)) for i in range(100)]]
    second: list[list[Record]] = [
        [JobPut(job(i)) for i in range(100, 200)],
        [JobStatus(job(5).id, Status.EXECUTED, 1, "exit 0", 9), JobDelete(job(7).id)],
        [RuleDelete("r.http")],
    ]
    return build(directory, first + second, compact_after=1)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def frames(path: Path) -> list[tuple[int, int]]:
    """(start, end) of every frame of a format-2 file."""
    data = path.read_bytes()
    out, pos = [], HEADER_SIZE
    while pos < len(data):
        result = decode_frame(data, pos)
        assert not isinstance(result, FrameError), result
        out.append((pos, result[1]))
        pos = result[1]
    return out


def run_repair(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_repair_command(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    status = run_repair_command(parser.parse_args(["repair", *argv]), out, err)
    return status, out.getvalue(), err.getvalue()


def repaired_state(dest: Path) -> LoadedState:
    """DEST as a server loads it (the real DurableLog.load: lock, replay, new segment)."""
    log = DurableLog(dest)
    state = log.load()
    log._close_blocking()
    return state


# -- repair ---------------------------------------------------------------------------


def test_repair_of_an_intact_directory_drops_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    before = files(src)
    status, out, err = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 0, out + err
    assert "nothing was dropped" in out and "DROPPED" not in out
    assert f"result: {len(expected['jobs'])} jobs, 2 rules" in out
    assert files(src) == before
    state = repaired_state(tmp_path / "dest")
    assert state.jobs == expected["jobs"] and state.rules == expected["rules"]


def test_repair_of_a_damaged_snapshot_salvages_before_and_after(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    snap = snapshot_path(src, 1)
    spans = frames(snap)
    start, end = spans[50]  # a JobPut in the middle
    data = bytearray(snap.read_bytes())
    data[start + 20] ^= 0x04
    snap.write_bytes(bytes(data))
    before = files(src)
    with pytest.raises(CorruptLogError, match=rf"{snap}: offset {start}: checksum mismatch"):
        read_state(src)  # the server refuses it
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1
    assert f"snapshot-0000000001.snap: format {FORMAT_VERSION}, {len(data)} bytes" in out
    assert f"DROPPED {start}..{end} ({end - start} bytes): checksum mismatch" in out
    assert "promises 100 jobs and 3 rules; 99 and 3 were salvaged" in out
    assert files(src) == before
    lost = sorted(set(expected["jobs"]) - set(repaired_state(tmp_path / "dest").jobs))
    assert len(lost) == 1  # the one job whose frame was damaged, nothing else
    state = repaired_state(tmp_path / "dest")
    assert state.jobs == {k: v for k, v in expected["jobs"].items() if k not in lost}
    assert state.rules == expected["rules"]


@pytest.mark.parametrize("where", ["length", "length check", "payload crc", "payload"])
def test_repair_of_a_damaged_segment_drops_exactly_the_damaged_frame(
    tmp_path: Path, where: str
) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    segment = segment_path(src, 2)
    spans = frames(segment)
    start, end = spans[30]
    offset = {"length": 2, "length check": 5, "payload crc": 9, "payload": 40}[where]
    data = bytearray(segment.read_bytes())
    data[start + offset] ^= 0x01
    segment.write_bytes(bytes(data))
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1
    assert f"DROPPED {start}..{end} ({end - start} bytes)" in out, out
    state = repaired_state(tmp_path / "dest")
    damaged = job(130).id  # the 31st record of segment 2
    assert state.jobs == {k: v for k, v in expected["jobs"].items() if k != damaged}


def test_repair_resynchronises_after_a_hole_of_zeros(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    segment = segment_path(src, 2)
    spans = frames(segment)
    data = bytearray(segment.read_bytes())
    hole = range(spans[10][0] + 7, spans[10][0] + 7 + 1000)
    data[hole.start : hole.stop] = bytes(len(hole))
    segment.write_bytes(bytes(data))
    survivors = [i for i, (s, e) in enumerate(spans) if e <= hole.start or s >= hole.stop]
    first_after = min(i for i in survivors if i > 10)
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1
    assert f"DROPPED {spans[10][0]}..{spans[first_after][0]}" in out, out
    lost = {job(100 + i).id for i in range(len(spans)) if i not in survivors and i < 100}
    state = repaired_state(tmp_path / "dest")
    assert state.jobs == {k: v for k, v in expected["jobs"].items() if k not in lost}


def test_repair_keeps_every_record_outside_random_damage(tmp_path: Path) -> None:
    """Any damage (random ranges of random bytes or zeros) loses only the frames it touches."""
    clean_dir = tmp_path / "clean"
    records = [JobPut(job(i, size=10 + i % 90)) for i in range(400)]
    build(clean_dir, [records[i : i + 25] for i in range(0, 400, 25)])
    clean = segment_path(clean_dir, 1).read_bytes()
    spans = frames(segment_path(clean_dir, 1))
    for seed in range(12):
        rng = random.Random(seed)
        data = bytearray(clean)
        damaged: set[int] = set()
        for _ in range(rng.randint(1, 4)):
            start = rng.randrange(HEADER_SIZE, len(data) - 200)
            length = rng.randint(1, 300)
            fill = bytes(length) if rng.random() < 0.5 else rng.randbytes(length)
            data[start : start + length] = fill
            damaged |= {i for i, (s, e) in enumerate(spans) if s < start + length and e > start}
        src = tmp_path / f"src{seed}"
        src.mkdir()
        segment_path(src, 1).write_bytes(bytes(data))
        dest = tmp_path / f"dest{seed}"
        status, out, _ = run_repair(str(src), str(dest))
        assert status == (1 if bytes(data) != clean else 0), out
        state = repaired_state(dest)
        intact = {records[i].job.id: records[i].job for i in range(400) if i not in damaged}
        assert {k: v for k, v in state.jobs.items() if k in intact} == intact, (seed, out)
        assert set(state.jobs) <= {r.job.id for r in records}


def test_repair_of_a_truncated_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    snap = snapshot_path(src, 1)
    spans = frames(snap)
    snap.write_bytes(snap.read_bytes()[: spans[60][0] + 5])
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1
    assert "the snapshot ends without its end record" in out
    state = repaired_state(tmp_path / "dest")
    # A snapshot holds the jobs first: jobs 0..59 remain, then segment 2 (job 7 deleted).
    kept = {job(i).id for i in [*range(60), *range(100, 200)] if i != 7}
    assert state.jobs == {k: v for k, v in expected["jobs"].items() if k in kept}
    assert state.rules == {}  # the rules came after the cut


def test_repair_after_the_snapshot_was_deleted_reports_the_missing_segments(
    tmp_path: Path,
) -> None:
    """Deleting the snapshot does not let the server start (segment 1 is missing)."""
    src = tmp_path / "src"
    expected = standard(src)
    snapshot_path(src, 1).unlink()
    with pytest.raises(CorruptLogError, match="segment 1 is missing"):
        read_state(src)
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1
    assert "LOST: segment 1 is missing: its records are lost" in out
    state = repaired_state(tmp_path / "dest")
    assert set(state.jobs) == {job(i).id for i in range(100, 200)}
    assert state.jobs[job(150).id] == expected["jobs"][job(150).id]


def test_a_damaged_snapshot_is_rebuilt_from_the_files_it_replaced(tmp_path: Path) -> None:
    """A compaction that died before its deletions left everything the snapshot holds."""
    src = tmp_path / "src"
    log_state = build(src, [[RulePut(RULES[0])], [JobPut(job(i)) for i in range(50)]])
    compaction.publish_snapshot(
        compaction.write_snapshot_tmp(src, 1, log_state["jobs"], log_state["rules"])
    )  # segment 1 is still there
    snap = snapshot_path(src, 1)
    data = bytearray(snap.read_bytes())
    data[200] ^= 0x80
    snap.write_bytes(bytes(data))
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 0, out
    assert "snapshot 1 is damaged; the state it held was rebuilt from segment-0000000001.log" in out
    state = repaired_state(tmp_path / "dest")
    assert state.jobs == log_state["jobs"] and state.rules == log_state["rules"]


def test_repair_of_a_damaged_file_header_guesses_the_version(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    segment = segment_path(src, 2)
    data = bytearray(segment.read_bytes())
    data[0:8] = b"XXXXXXXX"
    segment.write_bytes(bytes(data))
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1
    assert (
        "file header damaged (bad magic" in out and f"frames read as format {FORMAT_VERSION}" in out
    )
    assert "DROPPED 0..24 (24 bytes): file header: bad magic" in out
    state = repaired_state(tmp_path / "dest")
    assert state.jobs == expected["jobs"]


def test_repair_reports_a_torn_tail_without_counting_it_as_a_loss(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    segment = segment_path(src, 2)
    size = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 0, out
    assert f"cut (an unfinished write, never acknowledged) {size}..{size + 6}" in out
    assert repaired_state(tmp_path / "dest").jobs == expected["jobs"]


def test_repair_of_a_version_1_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE_V1, src)
    expected = read_state(src)
    status, out, _ = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 0, out
    assert "segment-0000000003.log: format 1" in out
    state = repaired_state(tmp_path / "dest")
    assert state.jobs == expected.jobs and state.rules == expected.rules
    assert set(state.versions.values()) == {FORMAT_VERSION}


def test_repair_refuses_bad_arguments_and_never_writes_to_src(tmp_path: Path) -> None:
    src = tmp_path / "src"
    standard(src)
    before = files(src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert run_repair(str(src), str(busy))[0] == 2
    status, _, err = run_repair(str(src), str(src / "inside"))
    assert status == 2 and "never writes to SRC" in err
    assert run_repair(str(tmp_path / "missing"), str(tmp_path / "d1"))[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_repair(str(empty), str(tmp_path / "d2"))
    assert status == 2 and "holds no snapshot" in err
    assert files(src) == before
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_repair_refuses_a_directory_a_server_holds_unless_forced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)

    async def main() -> None:
        log = DurableLog(src)
        await trio.to_thread.run_sync(log.load)
        status, _, err = await trio.to_thread.run_sync(run_repair, str(src), str(tmp_path / "dest"))
        assert status == 2 and "in use by a running kairoi-trio server" in err, err
        assert not (tmp_path / "dest").exists()
        status, out, err = await trio.to_thread.run_sync(
            run_repair, "--force", str(src), str(tmp_path / "dest")
        )
        assert status == 0 and "reading it anyway" in err, out + err
        await log.aclose()

    trio.run(main)
    assert repaired_state(tmp_path / "dest").jobs == expected["jobs"]


def test_the_server_cannot_start_while_repair_reads(tmp_path: Path, monkeypatch) -> None:
    """repair holds a shared lock on SRC/LOCK while it reads."""
    from kairoi_trio.storage import repair as repair_module
    from kairoi_trio.storage.log import DirectoryLockedError

    src = tmp_path / "src"
    standard(src)
    (src / "LOCK").write_text("")
    real = repair_module.salvage_directory
    seen = []

    def salvage_while_a_server_tries_to_start(source, dest):
        with pytest.raises(DirectoryLockedError):
            DurableLog(src).load()
        seen.append(True)
        return real(source, dest)

    monkeypatch.setattr(repair_module, "salvage_directory", salvage_while_a_server_tries_to_start)
    repair(src, tmp_path / "dest")
    assert seen
    repaired_state(src)  # released afterwards


# -- backup ---------------------------------------------------------------------------


def run_backup(config: Path, dest: Path) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_backup_command(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    args = parser.parse_args(["backup", str(dest), "-c", str(config)])
    return run_backup_command(args, out, err), out.getvalue(), err.getvalue()


def test_backup_of_a_stopped_directory_leaves_out_an_unfinished_write(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = standard(src)
    segment = segment_path(src, 2)
    good = segment.read_bytes()
    with open(segment, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")  # a crash mid-append, not yet cut by a start-up
    before = files(src)
    config = tmp_path / "configuration.toml"
    config.write_text(f'[storage]\ndirectory = "{src}"\n')
    status, out, err = run_backup(config, tmp_path / "copy")
    assert status == 0, err
    assert "segment-0000000002.log: " in out and "6 bytes of a write in progress" in out
    assert f"verified: {len(expected['jobs'])} jobs, 2 rules" in out
    assert files(src) == before
    assert segment_path(tmp_path / "copy", 2).read_bytes() == good
    state = repaired_state(tmp_path / "copy")
    assert state.jobs == expected["jobs"] and state.rules == expected["rules"]
    assert state.warnings == []


def test_backup_of_a_version_1_directory_copies_it_as_it_is(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE_V1, src)
    report = backup(src, tmp_path / "copy")
    assert files(tmp_path / "copy") == files(FIXTURE_V1)
    assert report.state is not None and len(report.state.jobs) == 7


def test_backup_starts_again_when_a_compaction_removes_listed_files(
    tmp_path: Path, monkeypatch
) -> None:
    """Between the listing and the opening, a real compaction deletes segment 1."""
    src = tmp_path / "src"
    state_at_1 = build(src, [[RulePut(RULES[0])], [JobPut(job(i)) for i in range(30)]])
    trio.run(_rotate_and_append, src)
    real_list = backup_module.list_directory
    calls: list[list[str]] = []

    def list_then_compact(directory):
        listing = real_list(directory)
        if not calls:
            compaction.write_snapshot(src, 1, state_at_1["jobs"], state_at_1["rules"])
        calls.append(
            sorted(p.name for p in (*listing.segments.values(), *listing.snapshots.values()))
        )
        return listing

    monkeypatch.setattr(backup_module, "list_directory", list_then_compact)
    report = backup(src, tmp_path / "copy")
    assert report.attempts == 2
    assert calls == [
        ["segment-0000000001.log", "segment-0000000002.log"],
        ["segment-0000000002.log", "snapshot-0000000001.snap"],
    ]
    state = repaired_state(tmp_path / "copy")
    assert set(state.jobs) == {job(i).id for i in range(31)}


async def _rotate_and_append(directory: Path) -> None:
    log = DurableLog(directory)
    await trio.to_thread.run_sync(log.load)
    await log.rotate()
    await log.append([JobPut(job(30))])
    await log.aclose()


def test_backup_reads_files_a_compaction_deletes_after_they_were_opened(
    tmp_path: Path, monkeypatch
) -> None:
    src = tmp_path / "src"
    state_at_1 = build(src, [[RulePut(RULES[0])], [JobPut(job(i)) for i in range(30)]])
    trio.run(_rotate_and_append, src)
    real_copy = backup_module._copy_file
    compacted = threading.Event()

    def compact_then_copy(*args, **kwargs):
        if not compacted.is_set():
            compaction.write_snapshot(src, 1, state_at_1["jobs"], state_at_1["rules"])
            compacted.set()
            assert not segment_path(src, 1).exists()
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(backup_module, "_copy_file", compact_then_copy)
    report = backup(src, tmp_path / "copy")
    assert report.attempts == 1
    assert sorted(f.name for f in report.files) == [
        "segment-0000000001.log",
        "segment-0000000002.log",
    ]
    assert set(repaired_state(tmp_path / "copy").jobs) == {job(i).id for i in range(31)}


def test_backup_refuses_damage_and_leaves_dest_empty(tmp_path: Path) -> None:
    src = tmp_path / "src"
    standard(src)
    trio.run(_rotate_and_append, src)  # segment 2 is sealed now
    segment = segment_path(src, 2)
    data = bytearray(segment.read_bytes())
    data[100] ^= 0x01
    segment.write_bytes(bytes(data))
    with pytest.raises(BackupError, match=rf"{segment}: offset \d+: .*kairoi-trio repair"):
        backup(src, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    (tmp_path / "copy").mkdir()
    with pytest.raises(BackupError):
        backup(src, tmp_path / "copy")
    assert list((tmp_path / "copy").iterdir()) == []


def test_backup_refuses_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "src"
    standard(src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(BackupRefused, match="not an empty directory"):
        backup(src, busy)
    with pytest.raises(BackupRefused, match="inside the data directory"):
        backup(src, src / "copy")
    with pytest.raises(BackupRefused, match="does not exist"):
        backup(tmp_path / "missing", tmp_path / "copy")
    config = tmp_path / "configuration.toml"
    config.write_text(f'[storage]\ndirectory = "{src}"\n')
    assert run_backup(config, busy)[0] == 2
    config.write_text("[storage]\ndirectory = 5\n")
    assert run_backup(config, tmp_path / "copy")[0] == 2


# -- format 7: snapshots of job chunks --------------------------------------------------


def chunked(directory: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Snapshot 1 holding 150 plain jobs in 4 job chunks (of 40, 50, 50 and 10: the
    first batch of 50 also holds the 10 jobs with a payload, written as records after
    its chunk), 3 rules; segment 2 with a status change and a delete."""
    monkeypatch.setattr(records_module, "CHUNK_JOBS", 50)
    plain = [Job(f"p.{i:04d}", 5_000 + i, updated_at=7) for i in range(150)]
    first: list[list[Record]] = [[RulePut(r) for r in RULES], [JobPut(j) for j in plain[:75]]]
    first += [[JobPut(job(i)) for i in range(10)], [JobPut(j) for j in plain[75:]]]
    second: list[list[Record]] = [
        [JobStatus("p.0003", Status.EXECUTED, 1, "exit 0", 9), JobDelete("p.0100")]
    ]
    return build(directory, first + second, compact_after=3)


def chunk_frames(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    return [(a, b) for a, b in frames(path) if data[a + FRAME_SIZE] == records_module.T_JOB_CHUNK]


def test_repair_of_a_damaged_job_chunk_drops_that_chunk_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    expected = chunked(src, monkeypatch)
    snap = snapshot_path(src, 1)
    spans = chunk_frames(snap)
    assert len(spans) == 4
    start, end = spans[1]
    data = bytearray(snap.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match=f"offset {start}: checksum mismatch"):
        read_state(src)
    status, out, err = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 1, out + err
    assert f"DROPPED {start}..{end} ({end - start} bytes): checksum mismatch" in out
    state = repaired_state(tmp_path / "dest")
    lost = {f"p.{i:04d}" for i in range(40, 90)}  # the second chunk's
    assert state.jobs == {k: v for k, v in expected["jobs"].items() if k not in lost | {"p.0100"}}
    assert state.rules == expected["rules"] and state.versions == {
        "snapshot-0000000002.snap": FORMAT_VERSION
    }


def test_repair_and_backup_of_an_intact_chunked_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    expected = chunked(src, monkeypatch)
    status, out, err = run_repair(str(src), str(tmp_path / "dest"))
    assert status == 0 and "nothing was dropped" in out, out + err
    assert f"result: {len(expected['jobs'])} jobs, 3 rules" in out
    assert repaired_state(tmp_path / "dest").jobs == expected["jobs"]
    report = backup(src, tmp_path / "copy")
    assert files(tmp_path / "copy") == files(src)
    assert report.state is not None and report.state.jobs == expected["jobs"]
