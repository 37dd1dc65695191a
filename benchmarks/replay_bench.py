"""Replay of a log's segments: the records a running server writes, replayed at start-up.

    .venv/bin/python -m benchmarks.replay_bench                 # both parts, ~2 minutes
    .venv/bin/python -m benchmarks.replay_bench --jobs 200000 --no-server

A running server's segments hold a JobPut per SET and a JobStatus per status change
(a trigger and an outcome per run, or a failure without a run). Compaction lets them
grow to the snapshot's size (storage.compact_after_bytes, at least), so a restart
just before one replays that many records after the snapshot.

1. In-process: `replay_into` over `--jobs` JobPut records, then as many `triggered`
   and as many `executed` JobStatus records of the same jobs (the order a run writes
   them), µs per record of each kind, best of `--repeat`. GC off, as at start-up.
2. The real server (`--no-server` leaves it out): `--jobs` jobs set over KCP (fsync
   off, compaction held off) due a minute ago, with no rule, so each fails at once and
   gets a JobStatus; SIGTERM; then `--restarts` starts, each on a fresh copy of
   that directory: seconds from fork to "ready" and the "log replayed" time.

3. `--ratios 0.25,0.5,1` (instead of 1 and 2): what `[storage] compact_ratio` bounds.
   A snapshot of `--jobs` planned jobs (set over KCP, then compacted by the server),
   followed for each ratio by segments of that many times the snapshot's size (new
   jobs set over KCP due a minute ago, with no rule: a JobPut and a JobStatus each),
   the most a restart replays with that ratio; `--restarts` starts of each, and of the
   snapshot alone. `--instant`: every job due at one instant (a day from now), the
   store whose one bucket holds them all; `--ratios ""`: the snapshot alone.

Progress goes to stderr, the results as JSON to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.__main__ import log, machine
from benchmarks.amqp_bench import Kcp
from benchmarks.server import Server, jobs_by_status
from kairoi_trio.model import Job, Status
from kairoi_trio.storage.records import JobPut, JobStatus, encode_records, replay_into

AT = 1_800_000_000_000_000  # µs: 2027-01-15
CHUNK = 2000  # SETs per KCP pipeline


def in_process(jobs: int, repeat: int) -> dict:
    """µs per record of each kind, the best of `repeat` replays into a fresh dict."""
    ids = [f"app.invoice.{i:08d}" for i in range(jobs)]
    puts = encode_records(
        JobPut(Job(job_id, AT + i, Status.PLANNED, b"", 0, "", AT - 5))
        for i, job_id in enumerate(ids)
    )
    triggered = encode_records(
        JobStatus(job_id, Status.TRIGGERED, 1, "", AT + i) for i, job_id in enumerate(ids)
    )
    executed = encode_records(
        JobStatus(job_id, Status.EXECUTED, 1, "published to x/rk", AT + i + 9)
        for i, job_id in enumerate(ids)
    )
    best: dict[str, float] = {}
    gc.disable()
    try:
        for _ in range(repeat):
            state: dict = {}
            for name, data in (("put", puts), ("triggered", triggered), ("executed", executed)):
                started = time.perf_counter()
                result = replay_into(data, 0, state, {})
                seconds = time.perf_counter() - started
                assert result.error is None and result.records == jobs, result
                best[name] = min(best.get(name, seconds), seconds)
            assert all(job.status is Status.EXECUTED for job in state.values())
            del state
            gc.collect()
    finally:
        gc.enable()
    out = {f"{name}_us_per_record": round(s / jobs * 1e6, 2) for name, s in best.items()}
    log(f"in-process, {jobs:,} of each: {out}")
    return out


NEVER = "compact_after_bytes = 1099511627776\n"  # 1 TiB: every record stays in the segments
NOW = "compact_after_bytes = 1\ncompact_ratio = 1e-9\n"  # compact after the next write


class _Builder(Server):
    """The server that builds the store, with its own compaction settings (`storage`:
    [storage] lines; by default compaction is held off)."""

    def __init__(self, *args: Any, storage: str = NEVER, **kwargs: Any) -> None:
        kwargs.setdefault("ready_timeout", 600)  # a start that replays 10M records takes ~40 s
        super().__init__(*args, storage=storage, **kwargs)


def build_store(work: Path, jobs: int) -> Path:
    """A data directory of `jobs` JobPut and `jobs` JobStatus (failed: no rule) records."""
    data = work / "data"
    server = _Builder(work, data, fsync=False)  # ([metrics] listen: the HTTP API too)
    with server:
        http_port = server.events("ready")[-1]["http_port"]
        kcp = Kcp(server.kcp_port)
        due = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 60))
        started = time.monotonic()
        _set(kcp, 0, jobs, due)
        kcp.close()
        _wait_failed(http_port, jobs)
        log(f"store: {jobs:,} set and failed (no rule) in {time.monotonic() - started:.1f}s")
    size = sum(p.stat().st_size for p in data.iterdir()) / 2**20
    log(f"store: {size:.0f} MiB, files {sorted(p.name for p in data.iterdir())}")
    return data


def restarts(work: Path, source: Path, times: int) -> list[dict]:
    """Start `times` times, each on a fresh copy of `source` (the server may compact it)."""
    out = []
    for i in range(times):
        data = work / "restart" / "data"
        shutil.rmtree(data.parent, ignore_errors=True)
        shutil.copytree(source, data)
        server = Server(data.parent, data, fsync=True, ready_timeout=600)
        with server:
            replayed = server.events("log replayed")
            loaded = server.events("log loaded")
            out.append(
                {
                    "ready_s": round(server.ready_seconds, 2),
                    "replay_s": replayed[-1]["seconds"] if replayed else None,
                    "records": loaded[-1]["records"] if loaded else None,
                }
            )
        log(f"restart {i + 1}: {out[-1]}")
    return out


def _set(kcp: Kcp, first: int, count: int, due: str | list[str]) -> None:
    """SET jobs `first`... at `due`, or at due[i % len(due)] for a list of times."""
    times = [due] if isinstance(due, str) else due
    tenth = max(CHUNK, count // 10 // CHUNK * CHUNK)
    for start in range(first, first + count, CHUNK):
        if start > first and (start - first) % tenth == 0:
            log(f"set {start - first:,} of {count:,}")
        ids = range(start, min(start + CHUNK, first + count))
        answers = kcp.pipeline(
            [["SET", f"app.invoice.{i:08d}", times[i % len(times)]] for i in ids]
        )
        if any(answer != ["OK"] for answer in answers):
            raise RuntimeError(f"SET failed: {answers[:3]}")


def _bytes(data: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in data.glob(pattern))


def _wait_failed(http_port: int, count: int) -> None:
    while jobs_by_status(http_port).get("failed", 0) < count:
        time.sleep(0.1)


def ratio_stores(
    work: Path, jobs: int, ratios: list[float], times: int, instant: bool = False
) -> dict:
    """Restarts of a snapshot of `jobs` planned jobs, alone and followed by `ratio` times
    its size of segments (module docstring, part 3). `instant`: every job due at the
    same instant, a day from now, instead of scattered."""
    base = work / "base" / "data"
    # 100,003 whole seconds scattered over the next ten years, as loadgen's are: jobs due
    # together are few (a store of jobs all due at one instant loads another way).
    now, span = int(time.time()) + 86400, 10 * 365 * 86400
    later = [
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now + (k * 7919) % span))
        for k in range(1 if instant else 100_003)
    ]
    with _Builder(base.parent, base, fsync=False) as server:
        kcp = Kcp(server.kcp_port)
        _set(kcp, 0, jobs, later)
        kcp.close()
    with _Builder(base.parent, base, fsync=False, storage=NOW) as server:
        kcp = Kcp(server.kcp_port)
        _set(kcp, jobs, 1, later)  # a write, after which the actor compacts
        kcp.close()
        while not server.events("log compacted"):
            time.sleep(0.1)
    snapshot = _bytes(base, "*.snap")
    log(f"snapshot of {jobs + 1:,} planned jobs: {snapshot / 2**20:.1f} MiB")
    out: dict = {"snapshot_mib": round(snapshot / 2**20, 1), "snapshot_only": []}
    out["snapshot_only"] = restarts(work, base, times)
    due = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - 60))
    for ratio in ratios:
        data = work / f"ratio-{ratio}" / "data"
        shutil.copytree(base, data)
        with _Builder(data.parent, data, fsync=False) as server:
            http_port = server.events("ready")[-1]["http_port"]
            kcp = Kcp(server.kcp_port)
            first, probe = jobs + 1, max(100, min(10_000, jobs // 100))  # to size the rest
            before = _bytes(data, "*.log")
            _set(kcp, first, probe, due)
            _wait_failed(http_port, probe)
            per_job = (_bytes(data, "*.log") - before) / probe
            rest = max(0, int((ratio * snapshot - (_bytes(data, "*.log") - before)) / per_job))
            _set(kcp, first + probe, rest, due)
            _wait_failed(http_port, probe + rest)
            kcp.close()
        segments = _bytes(data, "*.log")
        mib = segments / 2**20
        log(f"ratio {ratio}: {probe + rest:,} jobs set and failed, segments {mib:.1f} MiB")
        out[f"ratio_{ratio}"] = {
            "segments_mib": round(segments / 2**20, 1),
            "jobs_failed": probe + rest,
            "restarts": restarts(work, data, times),
        }
        shutil.rmtree(data.parent)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3, help="in-process replays")
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--no-server", action="store_true", help="the in-process part only")
    parser.add_argument(
        "--ratios",
        help='part 3 only: compact_ratio values, e.g. 0.25,0.5,1 ("": the snapshot alone)',
    )
    parser.add_argument(
        "--instant", action="store_true", help="part 3: every job due at one instant"
    )
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "jobs": args.jobs}
    if args.ratios is not None:
        ratios = [float(r) for r in args.ratios.split(",") if r]
        with tempfile.TemporaryDirectory(prefix="kairoi-replay-") as tmp:
            results["ratios"] = ratio_stores(
                Path(tmp), args.jobs, ratios, args.restarts, args.instant
            )
        json.dump(results, sys.stdout, indent=1)
        print()
        return 0
    results["in_process"] = in_process(args.jobs, args.repeat)
    if not args.no_server:
        with tempfile.TemporaryDirectory(prefix="kairoi-replay-") as tmp:
            work = Path(tmp)
            data = build_store(work, args.jobs)
            results["restarts"] = restarts(work, data, args.restarts)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
