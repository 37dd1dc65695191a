"""DurableLog on real files: append/load, torn tails, corruption, locking, write failures."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from kairoi_trio.model import (
    AmqpRunner,
    HttpRunner,
    Job,
    Rule,
    RulePolicy,
    ShellRunner,
    Status,
)
from kairoi_trio.storage.compaction import segment_path
from kairoi_trio.storage.log import (
    CorruptLogError,
    DirectoryLockedError,
    DurableLog,
    LoadedState,
    StorageError,
    read_state,
)
from kairoi_trio.storage.records import (
    FORMAT_VERSION,
    HEADER_SIZE,
    SEGMENT_MAGIC,
    FrameError,
    JobDelete,
    JobPut,
    JobStatus,
    RuleDelete,
    RulePut,
    decode_frame,
    encode_header,
    encode_record,
    frame,
)

RULE = Rule("r1", "app.", ShellRunner("/bin/true"))


def job(id: str, at: int = 1_000, payload: bytes = b"") -> Job:
    return Job(id, at, payload=payload)


async def open_log(directory: Path, **kwargs) -> tuple[DurableLog, LoadedState]:
    log = DurableLog(directory, **kwargs)
    state = await trio.to_thread.run_sync(log.load)
    return log, state


def load(directory: Path) -> LoadedState:
    """Load and close again (blocking; fine in tests)."""
    log = DurableLog(directory)
    state = log.load()
    log._close_blocking()
    return state


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def segment_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("segment-*"))


async def test_empty_directory_is_created_and_loads_empty(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "data"
    log, state = await open_log(directory)
    assert state.jobs == {} and state.rules == {} and state.records == 0
    assert segment_path(directory, 1).stat().st_size == HEADER_SIZE
    await log.aclose()


async def test_append_then_load_gives_the_same_state(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a", payload=b"p" * 100)), JobPut(job("b")), RulePut(RULE)])
    await log.append([JobStatus("a", Status.EXECUTED, 1, "exit 0", 42)])
    await log.append([JobPut(job("c")), JobDelete("b")])
    await log.append([RulePut(Rule("r2", "x", ShellRunner("y"))), RuleDelete("r2")])
    await log.append([])
    await log.aclose()

    state = load(tmp_path)
    assert state.jobs == {
        "a": Job("a", 1_000, Status.EXECUTED, b"p" * 100, 1, "exit 0", 42),
        "c": job("c"),
    }
    assert state.rules == {"r1": RULE}
    assert state.records == 8
    assert state.repaired_tail_bytes == 0 and state.warnings == []


async def test_appends_continue_the_active_segment_after_restart(tmp_path: Path) -> None:
    for i in range(3):
        log, state = await open_log(tmp_path)
        assert set(state.jobs) == {f"j{k}" for k in range(i)}
        await log.append([JobPut(job(f"j{i}"))])
        await log.aclose()
    assert segment_names(tmp_path) == ["segment-0000000001.log"]


async def test_status_for_unknown_job_is_skipped_with_a_warning(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobStatus("ghost", Status.FAILED, 1, "", 1)])
    await log.aclose()
    state = load(tmp_path)
    assert state.jobs == {} and state.orphan_status_records == 1
    assert any("unknown jobs" in w for w in state.warnings)


async def test_second_log_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    with pytest.raises(DirectoryLockedError, match="already in use"):
        DurableLog(tmp_path).load()
    await log.aclose()
    other, _ = await open_log(tmp_path)  # released by aclose
    await other.aclose()


async def test_fsync_false_writes_everything_without_fsync(tmp_path: Path, monkeypatch) -> None:
    def forbidden(fd: int) -> None:
        raise AssertionError("fsync called with fsync=False")

    monkeypatch.setattr(os, "fsync", forbidden)
    monkeypatch.setattr(os, "fdatasync", forbidden)
    log, _ = await open_log(tmp_path, fsync=False)
    await log.append([JobPut(job("a")), RulePut(RULE)])
    await log.compact({"a": job("a")}, {"r1": RULE})
    await log.append([JobPut(job("b"))])
    await log.aclose()
    monkeypatch.undo()
    state = load(tmp_path)
    assert set(state.jobs) == {"a", "b"} and state.rules == {"r1": RULE}


# -- torn tails and corruption ---------------------------------------------------


async def _write_segment(directory: Path, batches: list[list]) -> Path:
    log, _ = await open_log(directory)
    for batch in batches:
        await log.append(batch)
    await log.aclose()
    return segment_path(directory, 1)


async def test_torn_tail_at_every_byte_is_cut_with_a_warning(tmp_path: Path) -> None:
    first = [JobPut(job("a")), RulePut(RULE)]
    last = JobPut(Job("b", 5, Status.TRIGGERED, b"payload", 1, "outcome", 9))
    source = await _write_segment(tmp_path / "source", [first, [last]])
    full = source.read_bytes()
    frame = len(encode_record(last))
    good = len(full) - frame
    for cut in range(1, frame):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        segment_path(directory, 1).write_bytes(full[: good + cut])
        state = load(directory)
        assert state.jobs == {"a": job("a")} and state.rules == {"r1": RULE}, cut
        assert state.repaired_tail_bytes == cut
        assert any("torn record" in w and f"offset {good}" in w for w in state.warnings)
        assert segment_path(directory, 1).stat().st_size == good
        # The repaired log accepts appends and replays cleanly.
        log, _ = await open_log(directory)
        await log.append([last])
        await log.aclose()
        assert load(directory).jobs["b"] == last.job


MIXED = [
    JobPut(job("m0", payload=b"x" * 20)),
    RulePut(RULE),
    JobStatus("m0", Status.TRIGGERED, 1, "", 3),
    JobDelete("gone"),
    RuleDelete("r-gone"),
    JobPut(Job("m1", 5, Status.EXECUTED, b"payload", 1, "outcome", 9)),
]


def frame_starts(data: bytes, version: int = 2) -> list[int]:
    """Offsets of the frames of a segment file (decoded with the header checks)."""
    starts, pos = [], HEADER_SIZE
    while pos < len(data):
        starts.append(pos)
        result = decode_frame(data, pos, version)
        assert not isinstance(result, FrameError), result
        pos = result[1]
    return starts


def assert_refused(directory: Path, path: Path, offset: int, what: str = "") -> None:
    """Start-up refuses, naming the file and the offset, and leaves every file as it was."""
    before = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "LOCK"}
    with pytest.raises(CorruptLogError) as info:
        load(directory)
    message = str(info.value)
    assert f"{path}: offset {offset}: " in message, (what, message)
    assert "kairoi-trio repair" in message
    after = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "LOCK"}
    assert after == before, what


async def test_a_flipped_bit_in_any_byte_of_any_frame_is_refused(tmp_path: Path) -> None:
    """Header (length, its check, payload checksum) or payload, first, middle or LAST frame."""
    source = await _write_segment(tmp_path / "source", [MIXED[:2], MIXED[2:5], MIXED[5:]])
    clean = source.read_bytes()
    starts = frame_starts(clean)
    directory = tmp_path / "flipped"
    directory.mkdir()
    path = segment_path(directory, 1)
    for index in (0, 2, 3, len(starts) - 1):
        start = starts[index]
        end = starts[index + 1] if index + 1 < len(starts) else len(clean)
        for pos in range(start, end):
            data = bytearray(clean)
            data[pos] ^= 1 << (pos % 8)
            path.write_bytes(bytes(data))
            assert_refused(directory, path, start, f"frame {index}, byte {pos - start}")


async def test_a_flipped_length_bit_does_not_cut_acknowledged_records(tmp_path: Path) -> None:
    """Issue 8: a length pointing past the end of the file used to pass for a torn tail."""
    records = [JobPut(job(f"j{i}")) for i in range(270)]
    path = await _write_segment(tmp_path, [records[:140], records[140:]])
    starts = frame_starts(path.read_bytes())
    for bit in (16, 20, 27):  # the length grows by 64 KiB, 1 MiB, 128 MiB
        data = bytearray(path.read_bytes())
        data[starts[140] + bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        assert_refused(tmp_path, path, starts[140])
        data[starts[140] + bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
    assert len(load(tmp_path).jobs) == 270


async def test_a_last_frame_whose_end_never_arrived_is_a_torn_tail(tmp_path: Path) -> None:
    """The payload ends in zeros from a sector boundary on: the last sectors were never written."""
    last = JobPut(job("big", payload=bytes(range(256)) * 12))
    path = await _write_segment(tmp_path / "source", [[JobPut(job("a"))], [last]])
    clean = path.read_bytes()
    start = frame_starts(clean)[-1]
    directory = tmp_path / "zeroed"
    directory.mkdir()
    target = segment_path(directory, 1)
    for sector in (1024, 2048, 3072):  # file offsets inside the payload
        assert start + 12 < sector < len(clean)
        target.write_bytes(clean[:sector] + bytes(len(clean) - sector))
        state = load(directory)
        assert set(state.jobs) == {"a"}, sector
        assert any(f"offset {start}" in w and "zeros" in w for w in state.warnings)
        assert target.stat().st_size == start
    # The same zeros from an offset that is not a sector boundary: a damaged record.
    target.write_bytes(clean[:-10] + bytes(10))
    assert len(clean) % 512 > 10
    assert_refused(directory, target, start)


async def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    path = await _write_segment(tmp_path, [[JobPut(job("a"))]])
    size = path.stat().st_size
    append_bytes(path, bytes(4096))
    state = load(tmp_path)
    assert set(state.jobs) == {"a"} and state.repaired_tail_bytes == 4096
    assert path.stat().st_size == size


async def test_flipped_byte_in_a_middle_record_is_refused(tmp_path: Path) -> None:
    records = [JobPut(job(f"j{i}", payload=b"x" * 20)) for i in range(5)]
    path = await _write_segment(tmp_path, [records])
    frame = len(encode_record(records[0]))
    bad = HEADER_SIZE + 2 * frame  # third record
    data = bytearray(path.read_bytes())
    data[bad + 30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as info:
        load(tmp_path)
    message = str(info.value)
    assert str(path) in message and f"offset {bad}" in message and "checksum" in message
    assert path.read_bytes() == bytes(data)  # nothing was cut
    # The lock was released: the operator can retry after fixing the file.
    with pytest.raises(CorruptLogError):
        load(tmp_path)


async def test_garbage_after_a_bad_frame_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    path = await _write_segment(tmp_path, [[JobPut(job("a"))]])
    append_bytes(path, b"\x05\x00\x00\x00garbage-that-is-not-zero")
    with pytest.raises(CorruptLogError, match="offset"):
        load(tmp_path)


async def test_torn_tail_in_an_older_segment_is_corruption(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    await log.rotate()
    await log.append([JobPut(job("b"))])
    await log.aclose()
    first = segment_path(tmp_path, 1)
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(CorruptLogError, match=str(first)):
        load(tmp_path)


async def test_missing_segment_is_corruption(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    for name in "abc":
        await log.append([JobPut(job(name))])
        await log.rotate()
    await log.aclose()
    segment_path(tmp_path, 2).unlink()
    with pytest.raises(CorruptLogError, match="segment 2 is missing"):
        load(tmp_path)


async def test_bad_header_is_corruption(tmp_path: Path) -> None:
    path = await _write_segment(tmp_path, [[JobPut(job("a"))]])
    data = bytearray(path.read_bytes())
    data[0:8] = b"NOTALOG!"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match="offset 0: bad magic"):
        load(tmp_path)


@pytest.mark.parametrize("size", [0, 5, 10, HEADER_SIZE - 1])
async def test_a_segment_cut_inside_its_header_is_refused(tmp_path: Path, size: int) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    await log.rotate()
    await log.append([JobPut(job("b"))])
    await log.aclose()
    second = segment_path(tmp_path, 2)
    second.write_bytes(second.read_bytes()[:size])
    assert_refused(tmp_path, second, 0)


async def test_a_segment_of_zeros_is_refused(tmp_path: Path) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    await log.rotate()
    await log.aclose()
    second = segment_path(tmp_path, 2)
    second.write_bytes(bytes(HEADER_SIZE))
    assert_refused(tmp_path, second, 0)


async def test_a_crash_while_rotating_leaves_a_temporary_file_that_is_removed(
    tmp_path: Path,
) -> None:
    """Segments are created under a temporary name: a crash leaves that file, never a short one."""
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    await log.aclose()
    expected = {"a"}
    for leftover in (b"", b"KTRIOLOG\x02\x00", bytes(HEADER_SIZE)):
        tmp = tmp_path / "segment-0000000002.log.tmp"
        tmp.write_bytes(leftover)
        log, state = await open_log(tmp_path)
        assert set(state.jobs) == expected and state.warnings == []
        assert not tmp.exists() and log.active_segment == 1
        expected.add(f"b{len(expected)}")
        await log.append([JobPut(job(max(expected)))])
        await log.aclose()
        assert set(load(tmp_path).jobs) == expected


async def test_an_unknown_record_type_is_refused_naming_the_format_version(
    tmp_path: Path,
) -> None:
    path = await _write_segment(tmp_path, [[JobPut(job("a"))]])
    offset = path.stat().st_size
    append_bytes(path, frame(b"\x63 a record of a later release") + encode_record(JobDelete("a")))
    with pytest.raises(
        CorruptLogError,
        match=f"offset {offset}: unknown record type 99 in a format-version-{FORMAT_VERSION} file",
    ):
        load(tmp_path)


# -- write failures ----------------------------------------------------------------

_FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys, trio
    from pathlib import Path
    from kairoi_trio.model import Job
    from kairoi_trio.storage.compaction import segment_path
    from kairoi_trio.storage.log import DurableLog, StorageError
    from kairoi_trio.storage.records import JobPut

    directory = Path(sys.argv[1])
    segment = segment_path(directory, 1)
    big = JobPut(Job("big", 2, payload=b"x" * 5000))

    async def main():
        log = DurableLog(directory)
        await trio.to_thread.run_sync(log.load)
        await log.append([JobPut(Job("a", 1))])
        size = segment.stat().st_size
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, hard))
        try:
            await log.append([JobPut(Job("b", 1)), big])
        except StorageError as exc:
            print("ERROR", exc)
        else:
            raise SystemExit("append past the file size limit succeeded")
        assert segment.stat().st_size == size, "partial frame left behind"
        await log.append([JobPut(Job("c", 1))])  # still fits under the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        await log.append([big])  # space "freed": the same write now succeeds
        if sys.argv[2] == "crash":
            resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 10, hard))
            try:
                await log.append([JobPut(Job("lost", 1, payload=b"y" * 100))])
            except StorageError:
                pass
            import os
            os._exit(0)  # die without closing anything
        await log.aclose()

    trio.run(main)
    """
)


@pytest.mark.parametrize("ending", ["close", "crash"])
def test_file_size_limit_failure_leaves_no_partial_frame(tmp_path: Path, ending: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path), ending],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR cannot write to the log" in result.stdout
    assert "file too large" in result.stdout
    state = load(tmp_path)
    assert set(state.jobs) == {"a", "c", "big"}
    assert state.repaired_tail_bytes == 0 and state.warnings == []


async def test_failed_truncate_is_retried_before_the_next_append(
    tmp_path: Path, monkeypatch
) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    path = segment_path(tmp_path, 1)
    good = path.stat().st_size
    real_pwrite, real_ftruncate = os.pwrite, os.ftruncate

    def half_then_enospc(fd, data, offset):
        if offset == good:
            return real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    def broken_ftruncate(fd, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", half_then_enospc)
    monkeypatch.setattr(os, "ftruncate", broken_ftruncate)
    with pytest.raises(StorageError, match="disk full"):
        await log.append([JobPut(job("b", payload=b"z" * 100))])
    assert path.stat().st_size > good  # the partial frame is still there
    with pytest.raises(StorageError, match="cannot be removed"):
        await log.append([JobPut(job("c"))])  # repair is retried first, and fails again
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    await log.append([JobPut(job("c"))])  # repair succeeds, then the append
    await log.aclose()
    state = load(tmp_path)
    assert set(state.jobs) == {"a", "c"} and state.warnings == []


async def test_failed_fsync_cuts_the_new_bytes(tmp_path: Path, monkeypatch) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    path = segment_path(tmp_path, 1)
    good = path.stat().st_size
    calls = []

    def failing_fdatasync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(StorageError, match="Input/output error"):
        await log.append([JobPut(job("b"))])
    assert path.stat().st_size == good
    await log.append([JobPut(job("b"))])
    await log.aclose()
    assert set(load(tmp_path).jobs) == {"a", "b"}


async def test_append_before_load_or_after_close_is_a_programming_error(tmp_path: Path) -> None:
    log = DurableLog(tmp_path)
    with pytest.raises(RuntimeError):
        await log.append([JobPut(job("a"))])
    await trio.to_thread.run_sync(log.load)
    await log.aclose()
    await log.aclose()  # idempotent
    with pytest.raises(RuntimeError):
        await log.append([JobPut(job("a"))])


# -- format version 1, as the first release wrote it ------------------------------------

FIXTURE_V1 = Path(__file__).parent.parent / "fixtures" / "data-v1"
T0 = 1_800_000_000_000_000
# What tests/fixtures/make_data.py left in data-v1, data-v2 and data-v4 (snapshot 1, segments 2
# and 3).
EXPECTED_V1_JOBS = {
    "app.amqp.payload": Job(
        "app.amqp.payload",
        T0 + 2_000_000,
        Status.EXECUTED,
        b"\x00\x01binary\xff payload",
        2,
        "published",
        T0 + 2_200_000,
    ),
    "app.http.failed": Job(
        "app.http.failed",
        T0 + 7_000_000,
        Status.FAILED,
        b'{"n": 7}',
        1,
        "HTTP 500 — échec",
        T0 + 7_200_000,
    ),
    "app.shell.executed": Job(
        "app.shell.executed", T0 + 6_000_000, Status.EXECUTED, b"", 1, "exit 0", T0 + 6_500_000
    ),
    "app.shell.last": Job("app.shell.last", T0 + 9_000_000),
    "app.shell.planned": Job("app.shell.planned", T0 + 1_000_000),
    "app.shell.replaced": Job("app.shell.replaced", T0 + 5_000_000, payload=b"second version"),
    "app.shell.été-✓": Job("app.shell.été-✓", T0 + 8_000_000, payload="données ✓".encode()),
}
EXPECTED_V1_RULES = {
    "rule.amqp": Rule(
        "rule.amqp",
        "app.amqp.",
        AmqpRunner("amqp://guest:guest@127.0.0.1:5672/%2f", "jobs", "due"),
        RulePolicy(timeout_s=2.5, max_attempts=4, backoff_initial_s=0.5, backoff_max_s=60.0),
    ),
    "rule.http": Rule(
        "rule.http",
        "app.http.",
        HttpRunner("http://127.0.0.1:8080/run"),
        RulePolicy(stale_after_s=3600.0),
    ),
    "rule.shell": Rule("rule.shell", "app.shell.", ShellRunner("/usr/local/bin/run-job")),
}


def v1_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "data-v1"
    shutil.copytree(FIXTURE_V1, directory)
    return directory


@pytest.mark.parametrize("version", [1, 2, 4])
def test_older_data_directory_loads_to_exactly_its_state(tmp_path: Path, version: int) -> None:
    """A data directory written by an earlier release (format 1: the first; format 2:
    the release before recurring jobs; format 4: the release before columnar
    snapshots) opens unchanged, to the same state."""
    fixture = FIXTURE_V1.parent / f"data-v{version}"
    directory = tmp_path / fixture.name
    shutil.copytree(fixture, directory)
    state = load(directory)
    assert state.jobs == EXPECTED_V1_JOBS
    assert state.rules == EXPECTED_V1_RULES
    assert state.snapshot_seq == 1 and state.segments == 2
    assert state.warnings == [] and state.repaired_tail_bytes == 0
    # Loading changed no file of the release that wrote them.
    for name in ("snapshot-0000000001.snap", "segment-0000000002.log"):
        assert (directory / name).read_bytes() == (fixture / name).read_bytes()


# The state as of the end of segment 2 (before segment 3's three records).
EXPECTED_V1_JOBS_AT_2 = {
    **{k: v for k, v in EXPECTED_V1_JOBS.items() if k != "app.shell.last"},
    "app.amqp.payload": Job(
        "app.amqp.payload",
        T0 + 2_000_000,
        Status.TRIGGERED,
        b"\x00\x01binary\xff payload",
        1,
        "",
        T0 + 2_100_000,
    ),
    "app.http.failed": Job(
        "app.http.failed", T0 + 7_000_000, Status.TRIGGERED, b'{"n": 7}', 1, "", T0 + 7_100_000
    ),
}


async def test_v1_active_segment_is_sealed_and_appends_go_to_a_new_segment(
    tmp_path: Path,
) -> None:
    """No file mixes format versions: the v1 segment stays as it was, segment 4 is of the
    current version."""
    directory = v1_copy(tmp_path)
    log, state = await open_log(directory)
    assert state.jobs == EXPECTED_V1_JOBS
    assert log.active_segment == 4
    await log.append([JobDelete("app.shell.last"), JobPut(job("new"))])
    await log.aclose()
    for name in ("segment-0000000002.log", "segment-0000000003.log"):
        assert (directory / name).read_bytes() == (FIXTURE_V1 / name).read_bytes()
    header = segment_path(directory, 4).read_bytes()[:HEADER_SIZE]
    assert header[:8] == b"KTRIOLOG" and int.from_bytes(header[8:12], "little") == FORMAT_VERSION
    state = load(directory)
    assert state.versions == {
        "snapshot-0000000001.snap": 1,
        "segment-0000000002.log": 1,
        "segment-0000000003.log": 1,
        "segment-0000000004.log": FORMAT_VERSION,
    }
    expected = {k: v for k, v in EXPECTED_V1_JOBS.items() if k != "app.shell.last"}
    assert state.jobs == expected | {"new": job("new")}
    assert state.rules == EXPECTED_V1_RULES


async def test_v1_directory_compacts_into_a_current_format_snapshot(tmp_path: Path) -> None:
    directory = v1_copy(tmp_path)
    log, state = await open_log(directory)
    await log.compact(dict(state.jobs), dict(state.rules))
    await log.aclose()
    assert sorted(p.name for p in directory.glob("s*")) == [
        "segment-0000000005.log",
        "snapshot-0000000004.snap",
    ]
    state = load(directory)
    assert state.jobs == EXPECTED_V1_JOBS and state.rules == EXPECTED_V1_RULES
    assert set(state.versions.values()) == {FORMAT_VERSION}


def test_v1_torn_tail_at_every_byte_of_the_last_frame_is_cut(tmp_path: Path) -> None:
    clean = (FIXTURE_V1 / "segment-0000000003.log").read_bytes()
    last = frame_starts(clean, 1)[-1]
    expected = {k: v for k, v in EXPECTED_V1_JOBS.items() if k != "app.shell.last"}
    for cut in range(last + 1, len(clean)):
        directory = v1_copy(tmp_path / str(cut))
        path = segment_path(directory, 3)
        path.write_bytes(clean[:cut])
        state = load(directory)
        assert state.jobs == expected, cut
        assert any("torn record" in w and f"offset {last}" in w for w in state.warnings)
        assert path.stat().st_size == last
        assert load(directory).warnings == []


def test_v1_zeros_after_the_tail_are_cut(tmp_path: Path) -> None:
    directory = v1_copy(tmp_path)
    path = segment_path(directory, 3)
    append_bytes(path, bytes(1000))
    state = load(directory)
    assert state.jobs == EXPECTED_V1_JOBS and state.repaired_tail_bytes == 1000


@pytest.mark.parametrize("last", [3, 2])
def test_v1_a_flipped_bit_in_any_byte_of_the_last_segments_is_refused(
    tmp_path: Path, last: int
) -> None:
    """Every frame of segments 2 and 3, with segment 3 present (2 sealed) or deleted (2 last)."""
    directory = v1_copy(tmp_path)
    if last == 2:
        segment_path(directory, 3).unlink()
    for seq in range(2, last + 1):
        path = segment_path(directory, seq)
        clean = path.read_bytes()
        starts = frame_starts(clean, 1)
        for index, start in enumerate(starts):
            end = starts[index + 1] if index + 1 < len(starts) else len(clean)
            for pos in range(start, end):
                if seq == 2 == last and index == len(starts) - 1 and pos < start + 4:
                    continue  # the limit of version 1: see the next test
                data = bytearray(clean)
                data[pos] ^= 1 << (pos % 8)
                path.write_bytes(bytes(data))
                assert_refused(directory, path, start, f"segment {seq} byte {pos}")
        path.write_bytes(clean)


def test_v1_length_of_a_last_delete_record_pointing_past_the_end_is_cut(tmp_path: Path) -> None:
    """The known limit of version 1: a length field has no check of its own, and the last
    record of the last segment is a delete with no inner lengths. Version 2 refuses it."""
    directory = v1_copy(tmp_path)
    segment_path(directory, 3).unlink()
    path = segment_path(directory, 2)
    data = bytearray(path.read_bytes())
    last = frame_starts(bytes(data), 1)[-1]
    data[last + 1] ^= 0x01
    path.write_bytes(bytes(data))
    state = load(directory)
    assert "app.http.deleted-later" in state.jobs and state.repaired_tail_bytes > 0


@pytest.mark.parametrize("content", [b"", bytes(HEADER_SIZE)])
def test_v1_segment_left_unfinished_by_a_crash_while_creating_it_is_removed(
    tmp_path: Path, content: bytes
) -> None:
    """The first release created segments in place: a crash could leave an empty file or zeros."""
    directory = v1_copy(tmp_path)
    path = segment_path(directory, 3)
    path.write_bytes(content)
    state = load(directory)
    assert state.jobs == EXPECTED_V1_JOBS_AT_2 and state.rules == EXPECTED_V1_RULES
    assert any("left unfinished" in w for w in state.warnings)
    # Replaced by a new active segment of the current version.
    assert path.read_bytes() == encode_header(SEGMENT_MAGIC, 3)


@pytest.mark.parametrize("size", [5, 10, HEADER_SIZE - 1])
def test_v1_segment_cut_inside_its_header_is_refused(tmp_path: Path, size: int) -> None:
    directory = v1_copy(tmp_path)
    path = segment_path(directory, 3)
    path.write_bytes(path.read_bytes()[:size])
    assert_refused(directory, path, 0)


def test_read_state_changes_nothing_and_leaves_the_torn_tail_out(tmp_path: Path) -> None:
    directory = v1_copy(tmp_path)
    append_bytes(segment_path(directory, 3), b"\x40\x00\x00\x00\x12\x34")
    (directory / "segment-0000000004.log.tmp").write_bytes(b"KTRIO")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    state = read_state(directory)
    assert state.jobs == EXPECTED_V1_JOBS and state.rules == EXPECTED_V1_RULES
    assert any("unfinished write" in w and "not part of the state" in w for w in state.warnings)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    with pytest.raises(FileNotFoundError):
        read_state(tmp_path / "missing")


async def test_a_flipped_bit_in_a_segment_header_is_refused(tmp_path: Path) -> None:
    """Magic, version, reserved field and sequence number: every bit is checked."""
    path = await _write_segment(tmp_path, [[JobPut(job("a"))]])
    clean = path.read_bytes()
    for bit in range(HEADER_SIZE * 8):
        data = bytearray(clean)
        data[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        assert_refused(tmp_path, path, 0, f"bit {bit}")


_CLOSE_EIO_SCRIPT = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from kairoi_trio.model import Job
    from kairoi_trio.storage.log import DurableLog
    from kairoi_trio.storage.records import JobPut

    async def main():
        log = DurableLog(Path(sys.argv[1]))
        await trio.to_thread.run_sync(log.load)
        await log.append([JobPut(Job("a", 1))])
        await log.rotate()  # closes segment 1: EIO
        await log.append([JobPut(Job("b", 1))])
        await log.aclose()  # closes segment 2 and the lock file: EIO
        print("CLOSED")

    trio.run(main)
    """
)


def test_a_failing_close_neither_fails_a_rotation_nor_the_clean_stop(tmp_path: Path) -> None:
    """close(2) may return EIO (a file system reporting a late write error); the
    descriptor is released all the same, and what the log needs durable was synced
    before. A rotation and a clean stop go on, with a warning, and every record
    is read back (the real fault proxy of storage/faults.py, in a process of its own)."""
    plan = tmp_path / "plan.json"
    plan.write_text(
        '{"kairoi_test_storage_faults": 1, "faults": [{"op": "close", "errno": "EIO"}]}'
    )
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-c", _CLOSE_EIO_SCRIPT, str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KAIROI_TEST_STORAGE_FAULTS": str(plan)},
    )
    assert result.returncode == 0, result.stderr
    assert "CLOSED" in result.stdout
    output = result.stdout + result.stderr  # (structlog's default: print)
    warned = [line for line in output.splitlines() if "closing a file failed" in line]
    for what in ("file='segment 1'", "file='the active segment'", "file='the lock file'"):
        assert any(what in line for line in warned), output
    state = load(data)
    assert set(state.jobs) == {"a", "b"} and state.warnings == []
