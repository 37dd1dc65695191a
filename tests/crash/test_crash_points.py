"""SIGKILL the real server again and again while it writes, compacts and runs
jobs; after each restart every acknowledged write is there with its latest
value, and every job cut off in its run runs again (driver.py says how)."""

from __future__ import annotations

import sys
from pathlib import Path

from crash.conftest import SUMMARY
from crash.driver import CrashDriver


def test_nothing_acknowledged_is_lost_and_cut_runs_run_again(
    tmp_path: Path, crash_seed: int, crash_cycles: int
) -> None:
    replay = f"KAIROI_CRASH_SEED={crash_seed} KAIROI_CRASH_CYCLES={crash_cycles}"
    print(f"crash suite: seed {crash_seed}, {crash_cycles} cycles (replay: {replay})")
    sys.stdout.flush()
    driver = CrashDriver(tmp_path, crash_seed)
    try:
        figures = driver.run(crash_cycles)
    except AssertionError as error:
        raise AssertionError(
            f"[replay: {replay} pytest tests/crash] cycle {driver.figures.cycles}: {error}\n"
            f"server log tail:\n{driver.server.log_text()[-2000:]}"
        ) from None
    finally:
        driver.server.kill()
    SUMMARY.append(figures.summary())
    print(figures.summary())
    assert figures.cycles == crash_cycles
    assert figures.acked_writes_checked > 0
