"""A bucket of many jobs opened by the due index: the actor's longest step, and what a
client sees meanwhile.

    .venv/bin/python -m benchmarks.due_bench                    # 1M jobs, ~3 minutes
    .venv/bin/python -m benchmarks.due_bench --jobs 200000 --no-server

The due index (core/due.py) keeps the jobs due after its horizon as bare ids in
buckets of ~4.8 hours, and turns the earliest bucket into heap entries when the jobs
before it are gone: a Python step an id. A million invoices due at 09:00 sit in one
bucket; they are opened OPEN_SLICE ids an actor step (core/state.py), where they
used to be opened in one step.

1. In-process: a State with one job in a bucket and `--jobs` jobs in the next one,
   all at one instant ("instant") or spread over the bucket ("scattered"), set one by
   one as SETs would. The first job is triggered, which empties the heap; then the
   bucket is opened (a) as the server does, by next_due() calls until it no longer
   says OPENING, each call timed, and (b) at once (`first()`, the old way), on a
   second State built the same way. GC off, as the server runs its steps.
   Then "rebuild": a State of `--jobs` planned jobs and one job re-set until stale
   entries outnumber them, which begins a new due index; next_due() calls (one
   after each commit in the server) until it has taken the old one's place, each
   call timed.
2. The real server (`--no-server` leaves it out): one job set over KCP due in
   `--lead` seconds with no rule (so it fails when due, emptying the heap), then
   `--jobs` jobs at one instant in the next bucket; a second connection sends one GET
   at a time from a second before that due time until `--watch` seconds after it:
   round trips p50 / p99 / max, against the same GETs in the second before. Then a
   restart on the same directory: seconds to ready, and the GETs' round trips over
   the first `--watch` seconds after ready (the bucket is opened then).
3. On that restarted server, a gRPC WatchJobs with include_snapshot over every job
   (a second process's client would see the same; here a thread): seconds until the
   snapshot's end and its events, and the GETs' round trips meanwhile. The actor
   reads a snapshot SNAPSHOT_PAGE jobs a step; it read it in one step before.

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
from pathlib import Path

from benchmarks.__main__ import log, machine
from benchmarks.amqp_bench import Kcp, kcp_time
from benchmarks.lateness import summary
from benchmarks.server import Server
from kairoi_trio.core import state as state_module
from kairoi_trio.core.due import BUCKET_SHIFT
from kairoi_trio.core.state import State
from kairoi_trio.model import MICROS, Job, Status

BUCKET = 1 << BUCKET_SHIFT  # µs
CHUNK = 2000  # SETs per KCP pipeline


def _state(jobs: int, layout: str, first: int) -> State:
    """A State with a job at `first` and `jobs` jobs in the next bucket; the first one
    triggered (its bucket's heap is then empty)."""
    state = State()
    state.put_job(Job("first", first, Status.PLANNED))
    assert state.next_due() == first  # its bucket is open: the horizon is its end
    start = ((first >> BUCKET_SHIFT) + 1) << BUCKET_SHIFT
    step = BUCKET // jobs if layout == "scattered" else 0
    for i in range(jobs):
        # ids in a shuffled order, as clients set them: (i * a prime) mod jobs
        n = i * 7_919 % jobs
        state.put_job(Job(f"app.invoice.{n:08d}", start + 3_600 * MICROS + n * step))
    [due] = state.pop_due(first)
    state.put_job(Job(due.id, due.execute_at, Status.TRIGGERED))
    return state


def in_process(jobs: int) -> dict:
    first = 1_800_000_000 * MICROS
    out: dict = {"open_slice": state_module.OPEN_SLICE}
    for layout in ("instant", "scattered"):
        gc.collect()
        gc.disable()
        try:
            state = _state(jobs, layout, first)
            steps = []
            started = time.perf_counter()
            while True:
                t = time.perf_counter()
                answer = state.next_due()
                steps.append(time.perf_counter() - t)
                if answer != state_module.OPENING:
                    break
            sliced = time.perf_counter() - started
            del state
            gc.collect()
            state = _state(jobs, layout, first)
            t = time.perf_counter()
            state._due.first()  # the old way: the whole bucket in one step
            at_once = time.perf_counter() - t
            del state
        finally:
            gc.enable()
        out[layout] = {
            "sliced_calls": len(steps),
            "sliced_longest_ms": round(max(steps) * 1e3, 2),
            "sliced_p50_ms": round(statistics.median(steps) * 1e3, 2),
            "sliced_total_s": round(sliced, 3),
            "at_once_s": round(at_once, 3),
        }
        log(f"in-process, {jobs:,} jobs, {layout}: {out[layout]}")
    out["rebuild"] = _rebuild(jobs, first)
    log(f"in-process, {jobs:,} jobs, rebuild: {out['rebuild']}")
    return out


def _rebuild(jobs: int, first: int) -> dict:
    gc.collect()
    gc.disable()
    try:
        state = State([Job(f"app.invoice.{i * 7_919 % jobs:08d}", first + i) for i in range(jobs)])
        n = 0
        while state._rebuild is None:  # re-SETs to new times: a stale entry each
            state.put_job(Job("app.invoice.00000000", first + 10**9 + n))
            n += 1
        steps = []
        while state._rebuild is not None:
            t = time.perf_counter()
            state.next_due()
            steps.append(time.perf_counter() - t)
        return {
            "re_sets": n,
            "calls": len(steps),
            "longest_ms": round(max(steps) * 1e3, 2),
            "total_s": round(sum(steps), 3),
        }
    finally:
        gc.enable()


def round_trips(kcp: Kcp, until: float, job_id: str = "first") -> list[float]:
    """The round trips (µs) of one GET of `job_id` at a time until `until` (monotonic s)."""
    out = []
    while (t := time.monotonic()) < until:
        [answer] = kcp.pipeline([["GET", job_id]])
        if answer[0] != "OK":
            raise RuntimeError(f"GET failed: {answer}")
        out.append((time.monotonic() - t) * 1e6)
    return out


def server(work: Path, jobs: int, lead_s: float, watch_s: float) -> dict:
    data = work / "data"
    out: dict = {}
    with Server(work, data, fsync=False, ready_timeout=600) as srv:
        kcp, reader = Kcp(srv.kcp_port), Kcp(srv.kcp_port)
        due_s = time.time() + lead_s
        [answer] = kcp.pipeline([["SET", "first", kcp_time(due_s)]])
        assert answer == ["OK"], answer
        bucket_s = ((round(due_s * MICROS) >> BUCKET_SHIFT) + 1 << BUCKET_SHIFT) / MICROS
        later = kcp_time(bucket_s + 3_600)
        started = time.monotonic()
        for start in range(0, jobs, CHUNK):
            if start and start % (jobs // 10 // CHUNK * CHUNK or CHUNK) == 0:
                log(f"set {start:,} of {jobs:,}")
            answers = kcp.pipeline(
                [["SET", f"app.invoice.{i:08d}", later] for i in range(start, start + CHUNK)]
            )
            if any(a != ["OK"] for a in answers):
                raise RuntimeError(f"SET failed: {answers[:3]}")
        log(f"server: {jobs:,} jobs set in {time.monotonic() - started:.1f}s")
        if time.time() > due_s - 1.5:
            raise RuntimeError(f"--lead {lead_s} is too short for {jobs:,} SETs")
        time.sleep(due_s - 1 - time.time())
        due_mono = time.monotonic() + (due_s - time.time())
        before = round_trips(reader, due_mono)
        after = round_trips(reader, due_mono + watch_s)
        out["before_due"] = summary(before)
        out["after_due"] = summary(after)
        log(f"server: GETs the second before {out['before_due']}, after {out['after_due']}")
        kcp.close()
        reader.close()
    with Server(work, data, fsync=False, ready_timeout=600) as srv:
        reader = Kcp(srv.kcp_port)
        out["restart_ready_s"] = round(srv.ready_seconds, 2)
        out["after_restart"] = summary(round_trips(reader, time.monotonic() + watch_s))
        log(f"server: restart ready in {out['restart_ready_s']}s, GETs {out['after_restart']}")
        assert srv.grpc_port is not None
        watched: dict = {}
        watcher = threading.Thread(target=_watch_snapshot, args=(srv.grpc_port, watched))
        watcher.start()
        trips = []
        while watcher.is_alive():
            trips += round_trips(reader, time.monotonic() + 0.1)
        watcher.join()
        out["watch_snapshot"] = watched | {"gets_meanwhile": summary(trips)}
        log(f"server: a watch's snapshot {out['watch_snapshot']}")
        reader.close()
    return out


def _watch_snapshot(port: int, result: dict) -> None:
    """WatchJobs with include_snapshot over every job: its events and seconds."""
    import grpc

    from kairoi.v1 import scheduler_pb2 as pb
    from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        started = time.monotonic()
        call = stub.WatchJobs(pb.WatchJobsRequest(prefix="", include_snapshot=True))
        events = 0
        for message in call:
            if not message.snapshot:  # the empty change message that ends it
                break
            events += len(message.events)
        result["events"] = events
        result["seconds"] = round(time.monotonic() - started, 2)
        call.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--lead", type=float, default=90.0, help="s until the first job")
    parser.add_argument("--watch", type=float, default=5.0, help="s of GETs after it")
    parser.add_argument("--no-server", action="store_true", help="the in-process part only")
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "jobs": args.jobs}
    results["in_process"] = in_process(args.jobs)
    if not args.no_server:
        with tempfile.TemporaryDirectory(prefix="kairoi-due-") as tmp:
            results["server"] = server(Path(tmp), args.jobs, args.lead, args.watch)
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
