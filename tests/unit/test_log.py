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
)
from kairoi_trio.storage.records import (
    HEADER_SIZE,
    JobDelete,
    JobPut,
    JobStatus,
    RuleDelete,
    RulePut,
    encode_record,
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


async def test_last_frame_with_bad_checksum_is_a_torn_tail(tmp_path: Path) -> None:
    path = await _write_segment(tmp_path, [[JobPut(job("a"))], [JobPut(job("b"))]])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    state = load(tmp_path)
    assert set(state.jobs) == {"a"} and state.repaired_tail_bytes > 0


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


@pytest.mark.parametrize("size", [0, 5, HEADER_SIZE - 1])
async def test_unfinished_header_of_the_last_segment_is_rewritten(tmp_path: Path, size) -> None:
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("a"))])
    await log.rotate()
    await log.aclose()
    second = segment_path(tmp_path, 2)
    second.write_bytes(second.read_bytes()[:size])
    state = load(tmp_path)
    assert set(state.jobs) == {"a"} and state.warnings
    assert second.stat().st_size == HEADER_SIZE
    log, _ = await open_log(tmp_path)
    await log.append([JobPut(job("b"))])
    await log.aclose()
    assert set(load(tmp_path).jobs) == {"a", "b"}


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
# What tests/fixtures/make_data_v1.py left in data-v1 (snapshot 1, segments 2 and 3).
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


def test_v1_data_directory_loads_to_exactly_its_state(tmp_path: Path) -> None:
    directory = v1_copy(tmp_path)
    state = load(directory)
    assert state.jobs == EXPECTED_V1_JOBS
    assert state.rules == EXPECTED_V1_RULES
    assert state.snapshot_seq == 1 and state.segments == 2
    assert state.warnings == [] and state.repaired_tail_bytes == 0
    # Loading changed no file of the release that wrote them.
    for name in ("snapshot-0000000001.snap", "segment-0000000002.log"):
        assert (directory / name).read_bytes() == (FIXTURE_V1 / name).read_bytes()
