"""What a store tells about itself for the dashboard's overview (blocking: run in a thread).

Each store answers a plain dict, read by templates/overview.html:

- every store: "backend" ("log" | "postgres"), "bytes" (int or None: its size on
  disk), or "error" (a message) when it cannot say now;
- the embedded log: "last_compaction_us" (the newest snapshot's time, µs since
  1970, None before the first compaction), "compacting" (bool);
- PostgreSQL (storage/postgres/store.py's `PostgresStore.describe`):
  "last_vacuum_us" (the jobs table's last vacuum, manual or automatic: its
  compaction, µs, None when none yet), "instances" (live instances).

None of them scans jobs: the log's counters and one listing of its data
directory; PostgreSQL's catalog and statistics views.
"""

from __future__ import annotations

from collections.abc import Callable

from kairoi_trio.storage.compaction import list_directory
from kairoi_trio.storage.log import DurableLog


def describe_log(
    durable: DurableLog, copying: Callable[[], bool] = lambda: False
) -> dict[str, object]:
    """The embedded log: bytes on disk (the newest snapshot and the segments after
    it), the last compaction's time (the newest snapshot file's mtime) and whether
    one is running: the actor copying its jobs for it (`copying`), or the snapshot
    being written. Lists the data directory (blocking)."""
    listing = list_directory(durable.directory)
    newest = max(listing.snapshots, default=None)
    last = listing.snapshots[newest].stat().st_mtime_ns // 1000 if newest is not None else None
    return {
        "backend": "log",
        "bytes": durable.snapshot_bytes + durable.bytes_since_snapshot,
        "last_compaction_us": last,
        "compacting": copying() or durable.compacting,
    }
