"""SIGKILL the real server again and again while it writes, compacts and runs
jobs; after each restart every acknowledged write is there with its latest
value, and every job cut off in its run runs again (driver.py says how)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from crash.driver import CrashDriver
from support.server import ServerProcess

from kairoi_trio.storage import records


def test_nothing_acknowledged_is_lost_and_cut_runs_run_again(
    tmp_path: Path, crash_seed: int, crash_cycles: int, crash_summary: Callable[[str], None]
) -> None:
    replay = f"KAIROI_CRASH_SEED={crash_seed} KAIROI_CRASH_CYCLES={crash_cycles}"
    print(f"crash suite: seed {crash_seed}, {crash_cycles} cycles (replay: {replay})")
    sys.stdout.flush()
    driver = CrashDriver(tmp_path, crash_seed)
    try:
        figures = driver.run(crash_cycles)
    except (AssertionError, RuntimeError) as error:  # RuntimeError: the server did not start
        raise AssertionError(
            f"[replay: {replay} pytest tests/crash] cycle {driver.figures.cycles}: {error}\n"
            f"server log tail:\n{driver.server.log_text()[-2000:]}"
        ) from None
    finally:
        driver.server.kill()
    crash_summary(figures.summary())
    print(figures.summary())
    assert figures.cycles == crash_cycles
    assert figures.acked_writes_checked > 0


def test_the_driver_notices_acknowledged_writes_that_are_gone(tmp_path: Path) -> None:
    """The suite can fail: cut the log after a kill, as a server that answered
    OK before writing would leave it, and the first check finds the loss.

    The cut comes right in the first record of a key whose last acknowledged write
    set a value: from there on the newest records are gone (a torn tail at the cut),
    that write among them. (Half the bytes, as this test once cut, may hold none:
    on a loaded machine the kill can come when the newest records are all writes
    still in flight and the outcomes of runs.)"""

    def lose_the_newest_records(server: ServerProcess) -> None:
        (segment,) = sorted(server.data_dir.glob("segment-*.log"))  # no compaction here
        data = segment.read_bytes()
        acked: set[tuple[str, str]] = set()  # keys whose last acknowledged write set a value
        for history in driver.histories:
            last = {op.key: op for op in history.ops if op.acked}  # the latest one wins
            acked |= {key for key, op in last.items() if op.value is not None}
        assert acked, "no write was acknowledged before the kill: nothing to lose"
        position = records.HEADER_SIZE
        while True:
            decoded = records.decode_frame(data, position)
            assert not isinstance(decoded, records.FrameError), decoded
            record, end = decoded
            if record_key(record) in acked:
                break
            position = end
        with open(segment, "r+b") as file:
            file.truncate((position + end) // 2)

    driver = CrashDriver(
        tmp_path,
        seed=1,
        config="[storage]\ncompact_after_bytes = 1073741824",
        modes=("ack-burst",),
        after_kill=lose_the_newest_records,
    )
    try:
        with pytest.raises(AssertionError, match="acknowledged write .* lost"):
            driver.run(cycles=1)
    finally:
        driver.server.kill()


def record_key(record: object) -> tuple[str, str] | None:
    """The crash history's key ("job" or "rule", id) of a client's write in the log."""
    if isinstance(record, records.JobPut):
        return ("job", record.job.id)
    if isinstance(record, records.JobDelete):
        return ("job", record.id)
    if isinstance(record, records.RulePut):
        return ("rule", record.rule.id)
    if isinstance(record, records.RuleDelete):
        return ("rule", record.id)
    return None  # a run's status
