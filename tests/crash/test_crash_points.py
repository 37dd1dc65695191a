"""SIGKILL the real server again and again while it writes, compacts and runs
jobs; after each restart every acknowledged write is there with its latest
value, and every job cut off in its run runs again (driver.py says how)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from crash.driver import CrashDriver
from support.server import ServerProcess


def test_nothing_acknowledged_is_lost_and_cut_runs_run_again(
    tmp_path: Path, crash_seed: int, crash_cycles: int, crash_summary: list[str]
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
    crash_summary.append(figures.summary())
    print(figures.summary())
    assert figures.cycles == crash_cycles
    assert figures.acked_writes_checked > 0


def test_the_driver_notices_acknowledged_writes_that_are_gone(tmp_path: Path) -> None:
    """The suite can fail: cut the log after a kill, as a server that answered
    OK before writing would leave it, and the first check finds the loss."""

    def lose_the_newest_records(server: ServerProcess) -> None:
        (segment,) = sorted(server.data_dir.glob("segment-*.log"))  # no compaction here
        size = segment.stat().st_size
        with open(segment, "r+b") as file:
            file.truncate(size - (size - 24) // 2)  # half the records; a torn tail at the cut

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
