"""The floor of durable writes: the disk's own fdatasync rate, as pg_test_fsync measures it.

`fdatasync_rate(directory, seconds)` writes one 8 kB block at offset 0 of a
temporary file in `directory` and fdatasyncs it, in a loop, for `seconds`: what
one thread can make durable, one write at a time, on that disk. A server with
group commit answers more durable writes per second than this (one fdatasync
for a whole batch); the figure shows how many writes each sync must carry.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.server import load_average


def fdatasync_rate(directory: Path, seconds: float = 2.0) -> dict[str, float]:
    """{"fdatasync_per_s", "us_per_sync", "loadavg_1m"}; the file is removed after."""
    path = directory / "fsync-test.tmp"
    block = os.urandom(8192)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, block * 16)
        os.fsync(fd)
        n = 0
        load = load_average()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            n += 1
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return {"fdatasync_per_s": n / elapsed, "us_per_sync": elapsed / n * 1e6, "loadavg_1m": load}
