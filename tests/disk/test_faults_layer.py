"""storage/faults.py, the test-only fault layer, and the log on top of it in this process.

The server process tests (test_injected_faults.py) rely on this layer doing
exactly what the plan says; here it is checked call by call, then with the
real DurableLog (its module's `os` swapped for a FaultyOs on a plan file) for
every operation and error the suite injects: whatever fails, the log is left
as it was, later writes succeed once the fault is gone, and a replay gives
exactly what was acknowledged.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog.testing
import trio
from disk.faulty import FaultPlan

from kairoi_trio.model import Job
from kairoi_trio.storage import compaction, faults
from kairoi_trio.storage import log as log_module
from kairoi_trio.storage.faults import FaultyOs, parse_plan
from kairoi_trio.storage.log import DurableLog, StorageError, read_state
from kairoi_trio.storage.records import JobPut


def test_in_production_the_log_uses_the_os_module_itself() -> None:
    assert faults.ENV not in os.environ
    assert log_module.os is os and compaction.os is os
    assert not faults.ENABLED and faults.describe() is None


def test_only_the_variable_turns_it_on(tmp_path: Path) -> None:
    plan = FaultPlan(tmp_path / "plan.json")
    code = (
        "from kairoi_trio.storage import faults, log; "
        "print(faults.ENABLED, type(log.os).__name__, faults.describe())"
    )
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert off.stdout.split() == ["False", "module", "None"]
    env[faults.ENV] = str(plan.path)
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert on.stdout.split() == ["True", "FaultyOs", str(plan.path)]


def test_a_file_without_the_marker_injects_nothing(tmp_path: Path) -> None:
    path = tmp_path / "not-a-plan.json"
    path.write_text('{"faults": [{"op": "*", "errno": "EIO"}]}')
    fs = FaultyOs(str(path))
    with structlog.testing.capture_logs() as logs:
        fd = fs.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
        fs.pwrite(fd, b"ok", 0)
        fs.fdatasync(fd)
        fs.close(fd)
    assert (tmp_path / "f").read_bytes() == b"ok"
    assert [e["event"] for e in logs] == ["storage fault plan ignored"]
    with pytest.raises(ValueError, match="not a fault plan"):
        parse_plan(path.read_text())


def test_faults_match_operation_and_path_and_stop_after_times(tmp_path: Path) -> None:
    plan = FaultPlan(tmp_path / "plan.json")
    fs = FaultyOs(str(plan.path))
    fd = fs.open(tmp_path / "segment-0000000001.log", os.O_RDWR | os.O_CREAT, 0o644)
    other = fs.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o644)
    plan.set({"op": "fdatasync", "path": "segment-", "errno": "EIO", "times": 2})
    fs.fdatasync(other)  # another file
    fs.pwrite(fd, b"x", 0)  # another operation
    for _ in range(2):
        with pytest.raises(OSError) as raised:
            fs.fdatasync(fd)
        assert raised.value.errno == errno.EIO
        assert "(injected)" in str(raised.value)
    fs.fdatasync(fd)  # the third call passes
    plan.set({"op": "*", "errno": "EROFS"})  # a new plan: counts start again
    with pytest.raises(OSError) as raised:
        fs.rename(tmp_path / "other", tmp_path / "renamed")
    assert raised.value.errno == errno.EROFS
    plan.path.unlink()  # no plan file: no faults
    fs.rename(tmp_path / "other", tmp_path / "renamed")
    fs.close(fd)
    fs.close(other)
    assert fs.getpid() == os.getpid()  # everything else is the os module's


def test_a_delay_sleeps_before_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    plan = FaultPlan(tmp_path / "plan.json")
    plan.set({"op": "fdatasync", "delay_s": 2.5})
    fs = FaultyOs(str(plan.path))
    fd = fs.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    fs.fdatasync(fd)
    fs.close(fd)
    assert slept == [2.5]


# -- the real log under injected faults -------------------------------------------------


@pytest.fixture
def plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FaultPlan:
    plan = FaultPlan(tmp_path / "plan.json")
    fs = FaultyOs(str(plan.path))
    monkeypatch.setattr(log_module, "os", fs)
    monkeypatch.setattr(compaction, "os", fs)
    return plan


def job(job_id: str, payload: bytes = b"") -> Job:
    return Job(job_id, 1_000_000, payload=payload)


APPEND_FAULTS = [
    {"op": "pwrite", "errno": "ENOSPC"},
    {"op": "pwrite", "errno": "EROFS"},
    {"op": "pwrite", "errno": "EIO"},
    {"op": "fdatasync", "errno": "ENOSPC"},
    {"op": "fdatasync", "errno": "EROFS"},
    {"op": "fdatasync", "errno": "EIO"},
    {"op": "fdatasync", "errno": "EIO", "times": 1},  # the cut-off's own sync works
]


@pytest.mark.parametrize(
    "fault", APPEND_FAULTS, ids=lambda f: f"{f['op']}-{f['errno']}-{f.get('times', 'all')}"
)
async def test_a_failed_append_leaves_the_log_as_it_was(
    tmp_path: Path, plan: FaultPlan, fault: dict[str, object]
) -> None:
    data = tmp_path / "data"
    log = DurableLog(data)
    await trio.to_thread.run_sync(log.load)
    await log.append([JobPut(job("a"))])
    size = log.bytes_since_snapshot
    plan.set({**fault, "path": "segment-"})
    for attempt in range(3):
        with pytest.raises(StorageError, match=str(fault["errno"])) as failed:
            await log.append([JobPut(job(f"lost{attempt}", b"z" * 5000))])
        if attempt == 0:
            assert "(injected)" in str(failed.value.__cause__)
        assert log.bytes_since_snapshot == size
        if fault.get("times") == 1:
            break
    plan.clear()
    await log.append([JobPut(job("b"))])
    await log.aclose()
    state = read_state(data)
    assert set(state.jobs) == {"a", "b"}
    assert state.warnings == []


@pytest.mark.parametrize(
    "fault",
    [
        {"op": "open", "path": ".log.tmp", "errno": "ENOSPC"},
        {"op": "write", "path": ".log.tmp", "errno": "ENOSPC"},
        {"op": "fsync", "path": ".log.tmp", "errno": "EIO"},
        {"op": "rename", "path": ".log.tmp", "errno": "EROFS"},
    ],
    ids=lambda f: f"{f['op']}-{f['errno']}",
)
async def test_a_failed_rotation_keeps_appending_to_the_same_segment(
    tmp_path: Path, plan: FaultPlan, fault: dict[str, object]
) -> None:
    data = tmp_path / "data"
    log = DurableLog(data)
    await trio.to_thread.run_sync(log.load)
    await log.append([JobPut(job("a"))])
    plan.set(fault)
    with pytest.raises(StorageError, match="new log segment"):
        await log.rotate()
    assert log.active_segment == 1
    assert not list(data.glob("*.tmp"))
    await log.append([JobPut(job("b"))])  # rotation only: appends go on
    plan.clear()
    assert await log.rotate() == 1
    await log.append([JobPut(job("c"))])
    await log.aclose()
    assert set(read_state(data).jobs) == {"a", "b", "c"}


@pytest.mark.parametrize(
    "fault",
    [
        {"op": "fsync", "path": "snapshot-", "errno": "ENOSPC"},
        {"op": "replace", "path": "snapshot-", "errno": "EROFS"},
        {"op": "fsync", "path": "data", "errno": "EIO"},  # the directory, after the rename
    ],
    ids=["snapshot-fsync", "snapshot-rename", "directory-fsync"],
)
async def test_a_failed_snapshot_loses_nothing_and_a_later_one_succeeds(
    tmp_path: Path, plan: FaultPlan, fault: dict[str, object]
) -> None:
    data = tmp_path / "data"
    log = DurableLog(data)
    await trio.to_thread.run_sync(log.load)
    await log.append([JobPut(job("a")), JobPut(job("b"))])
    jobs = {j.id: j for j in (job("a"), job("b"))}
    seq = await log.rotate()
    plan.set(fault)
    with pytest.raises(StorageError, match=f"cannot write snapshot {seq}"):
        await log.write_snapshot(seq, jobs, {})
    await log.append([JobPut(job("c"))])
    assert set(read_state(data).jobs) == {"a", "b", "c"}
    plan.clear()
    await log.compact({**jobs, "c": job("c")}, {})
    await log.aclose()
    state = read_state(data)
    assert set(state.jobs) == {"a", "b", "c"} and state.snapshot_seq > 0
    assert not list(data.glob("*.tmp"))
