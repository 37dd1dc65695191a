"""A compaction of a large store: the actor's longest step, and what clients see meanwhile.

    .venv/bin/python -m benchmarks.compaction_bench                  # 1M jobs, ~3 minutes
    .venv/bin/python -m benchmarks.compaction_bench --jobs 200000 --no-server

A compaction rotates the log and hands the writer thread the jobs as of the
rotation, in snapshot order (grouped by status, then by id). The actor takes that
copy in slices, COPY_SLICE jobs a step, and keeps the jobs it changes meanwhile
as they were (core/checkpoint.py); it took it in one step before (`jobs.copy()`
and `State.id_order()`), every client waiting.

1. In-process: a State of `--jobs` jobs (nine in ten planned, the rest triggered,
   executed and failed), GC off as the server runs its steps: (a) the one-step copy,
   timed; (b) a Checkpoint taken a slice at a time, each slice timed, with a job
   re-set between slices.
2. The real server (`--no-server` leaves it out): `--jobs` jobs set over KCP with
   compaction off, their times scattered over a year; GETs one at a time for two
   seconds. Then a restart with `compact_after_bytes = 1`, which compacts after the
   first request: one connection sends one GET at a time and another SETs in
   pipelines of 100 (re-SETs of stored jobs) until the "log compacted" line. GET
   round trips p50 / p99 / max before and during, SET/s during, the seconds
   from "ready" to "log compacted" (the server's own request at start-up begins it),
   and the server's RSS before and its peak during (from /proc, peak reset at ready).

Progress goes to stderr, the results as JSON to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from itertools import chain
from pathlib import Path

from benchmarks.__main__ import log, machine
from benchmarks.amqp_bench import Kcp, kcp_time
from benchmarks.due_bench import round_trips
from benchmarks.lateness import summary
from benchmarks.server import Server
from kairoi_trio.core.state import State
from kairoi_trio.model import MICROS, Job, Status

CHUNK = 2000  # SETs per KCP pipeline while the store is built
RESET_CHUNK = 100  # SETs per KCP pipeline during the compaction
YEAR_S = 365 * 86_400
_STATUSES = (Status.TRIGGERED, Status.EXECUTED, Status.FAILED)


def _job(i: int, jobs: int, start_us: int) -> Job:
    n = i * 7_919 % jobs  # ids in a shuffled order, as clients set them
    status = Status.PLANNED if n % 10 else _STATUSES[n // 10 % 3]
    return Job(f"app.invoice.{n:08d}", start_us + n * (YEAR_S * MICROS // jobs), status)


def in_process(jobs: int) -> dict:
    start = 1_800_000_000 * MICROS
    out: dict = {}
    gc.collect()
    gc.disable()
    try:
        state = State([_job(i, jobs, start) for i in range(jobs)])
        t = time.perf_counter()
        # what the actor did before the checkpoint, State.id_order() and all
        copy = state.jobs.copy()
        order = list(chain.from_iterable(state._ids[status] for status in Status))
        out["one_step_s"] = round(time.perf_counter() - t, 3)
        del copy, order
        log(f"in-process, {jobs:,} jobs: one-step copy {out['one_step_s']} s")
        out |= _sliced(state, start)
    finally:
        gc.enable()
    return out


def _sliced(state: State, start: int) -> dict:
    try:
        from kairoi_trio.core.checkpoint import COPY_SLICE
    except ImportError:  # the code before the sliced copy
        return {}
    checkpoint = state.begin_checkpoint()
    steps = []
    n = 0
    while not checkpoint.done:
        t = time.perf_counter()
        checkpoint.copy_some(COPY_SLICE)
        steps.append(time.perf_counter() - t)
        n += 1
        job_id = f"app.invoice.{n * 104_729 % len(state.jobs):08d}"
        state.put_job(Job(job_id, start + n, Status.PLANNED))
    state.end_checkpoint()
    out = {
        "copy_slice": COPY_SLICE,
        "sliced_calls": len(steps),
        "sliced_longest_ms": round(max(steps) * 1e3, 2),
        "sliced_p50_ms": round(statistics.median(steps) * 1e3, 2),
        "sliced_total_s": round(sum(steps), 3),
    }
    log(f"in-process: sliced {out}")
    return out


def server(work: Path, jobs: int) -> dict:
    data = work / "data"
    out: dict = {}
    start_s = time.time() + 86_400
    ids = [f"app.invoice.{i * 7_919 % jobs:08d}" for i in range(jobs)]
    off = "compact_after_bytes = 1099511627776\n"  # 1 TiB: never
    with Server(work, data, fsync=False, ready_timeout=600, storage=off) as srv:
        kcp = Kcp(srv.kcp_port)
        started = time.monotonic()
        for first in range(0, jobs, CHUNK):
            if first and first % (jobs // 10 // CHUNK * CHUNK or CHUNK) == 0:
                log(f"set {first:,} of {jobs:,}")
            answers = kcp.pipeline(
                [
                    ["SET", job_id, kcp_time(start_s + i * YEAR_S / jobs)]
                    for i, job_id in enumerate(ids[first : first + CHUNK], first)
                ]
            )
            if any(a != ["OK"] for a in answers):
                raise RuntimeError(f"SET failed: {answers[:3]}")
        log(f"server: {jobs:,} jobs set in {time.monotonic() - started:.1f}s")
        out["before"] = summary(round_trips(kcp, time.monotonic() + 2, ids[0]))
        log(f"server: GETs before {out['before']}")
        kcp.close()
    with Server(
        work, data, fsync=True, ready_timeout=600, storage="compact_after_bytes = 1\n"
    ) as srv:
        log(f"server: restarted in {srv.ready_seconds:.1f}s, compacting")
        rss_before = srv.rss_mib()
        Path(f"/proc/{srv.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0)
        reader, writer = Kcp(srv.kcp_port), Kcp(srv.kcp_port)
        compacted = threading.Event()
        sets = [0]

        def re_set() -> None:
            n = 0
            while not compacted.is_set():
                answers = writer.pipeline(
                    [
                        ["SET", ids[(n + k) * 104_729 % jobs], kcp_time(start_s + n + k)]
                        for k in range(RESET_CHUNK)
                    ]
                )
                if any(a != ["OK"] for a in answers):
                    raise RuntimeError(f"SET failed: {answers[:3]}")
                n += RESET_CHUNK
                sets[0] = n

        started = time.monotonic()
        setter = threading.Thread(target=re_set)
        setter.start()
        trips: list[float] = []
        ends: list[float] = []  # when each GET came back (monotonic s)
        while not srv.events("log compacted"):
            trips += round_trips(reader, time.monotonic() + 0.1, ids[0])
            ends += [time.monotonic()] * (len(trips) - len(ends))
            if time.monotonic() - started > 600:
                raise RuntimeError("no compaction within 600 s")
        seconds = time.monotonic() - started
        compacted.set()
        setter.join()
        ready_at = srv._started + srv.ready_seconds
        done_at = next(t for t, line in srv.lines if '"log compacted"' in line)
        out["during"] = summary(trips)
        slowest = max(range(len(trips)), key=trips.__getitem__)
        # within 0.1 s (a round of GETs): after ready, and before "log compacted"
        out["slowest_get_after_ready_s"] = round(ends[slowest] - ready_at, 1)
        out["slowest_get_before_compacted_s"] = round(done_at - ends[slowest], 1)
        out["rss_mib_before"] = round(rss_before)
        out["peak_rss_mib_during"] = round(srv.peak_rss_mib())
        out["compacted_after_ready_s"] = round(done_at - ready_at, 2)
        out["sets_per_s_during"] = round(sets[0] / seconds)
        out["events"] = srv.events("log compacted")
        log(
            f"server: GETs during {out['during']}, {out['sets_per_s_during']} SET/s, {seconds:.1f}s"
        )
        reader.close()
        writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--no-server", action="store_true", help="the in-process part only")
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "jobs": args.jobs}
    results["in_process"] = in_process(args.jobs)
    if not args.no_server:
        with tempfile.TemporaryDirectory(prefix="kairoi-compaction-") as tmp:
            results["server"] = server(Path(tmp), args.jobs)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
