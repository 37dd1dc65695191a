"""Trigger lateness of the real server, measured three ways for every job.

1. `marked`: the server's own record of when it marked the job triggered. The
   command actor stamps `updated_at` with its clock when it applies the
   dispatcher's TriggerDue command; the TRIGGERED event of the gRPC WatchJobs
   stream carries that job, so `updated_at - execute_at` is the dispatcher's
   lateness (wake-up + the actor's queue + pairing), measured by the server's
   clock, before the fsync of the `triggered` record.
2. `run start`: the runner pool's "job run" log line gives the run's end time
   (structlog timestamp, microseconds) and its duration; their difference is the
   moment the pool started the run, after the `triggered` record's fsync and
   after waiting in the pool's queue for one of the 32 shell slots. No fork is
   included.
3. `script`: the shell script writes `date +%s.%N` when it runs; this includes
   the `sh` spawn and the `date` fork, the figure a user of the shell runner sees.

All clocks are the wall clock of the same host. Jobs are set over KCP with
fractional times, well before they are due.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import grpc

from benchmarks.profile import Profiler, top
from benchmarks.server import Server
from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

LEAD_S = 2.0  # jobs are set this long before the first is due


def kcp_pipeline(port: int, lines: list[str]) -> None:
    """Send requests at once, read as many answer lines, fail on any ERROR."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall("".join(lines).encode())
        received = b""
        while received.count(b"\n") < len(lines):
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            received += data
    if b"ERROR" in received:
        raise RuntimeError(f"KCP error: {received[:500]!r}")


def fmt_time(us: int) -> str:
    seconds, micros = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}"


def ts_us(ts: object) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000  # type: ignore[attr-defined]


class Watch:
    """A WatchJobs stream read in a thread: TRIGGERED events and their receipt times."""

    def __init__(self, port: int, prefix: str) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SchedulerStub(self.channel)
        self.call = stub.WatchJobs(pb.WatchJobsRequest(prefix=prefix, include_snapshot=True))
        self.triggered: dict[
            str, tuple[int, int, int]
        ] = {}  # id -> (execute_at, updated_at, received)
        self.finished: dict[str, int] = {}  # id -> event type
        self.registered = threading.Event()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        if not self.registered.wait(30):
            raise RuntimeError("WatchJobs did not answer")

    def _read(self) -> None:
        try:
            for message in self.call:
                received = time.time_ns() // 1000
                if message.snapshot:
                    self.registered.set()
                    continue
                with self.changed:
                    for event in message.events:
                        job = event.job
                        if event.type == pb.JOB_EVENT_TYPE_TRIGGERED:
                            self.triggered[job.id] = (
                                ts_us(job.execute_at),
                                ts_us(job.updated_at),
                                received,
                            )
                        elif event.type in (pb.JOB_EVENT_TYPE_EXECUTED, pb.JOB_EVENT_TYPE_FAILED):
                            self.finished[job.id] = event.type
                    self.changed.notify_all()
        except grpc.RpcError:
            pass  # cancelled at the end

    def wait_finished(self, ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not ids <= self.finished.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = len(ids - self.finished.keys())
                    raise TimeoutError(
                        f"{missing} of {len(ids)} jobs not finished after {timeout}s"
                    )
                self.changed.wait(left)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def summary(values_us: Sequence[float]) -> dict:
    values = sorted(v / 1000 for v in values_us)  # ms
    if not values:
        return {}
    p99_index = min(len(values) - 1, max(0, int(round(0.99 * len(values))) - 1))
    return {
        "n": len(values),
        "p50_ms": statistics.median(values),
        "p99_ms": values[p99_index],
        "max_ms": values[-1],
        "min_ms": values[0],
    }


def run_scenario(
    server: Server, watch: Watch, fired_file: Path, name: str, due: list[int], timeout: float
) -> dict:
    ids = [f"lat.{name}.{i}" for i in range(len(due))]
    lines = [
        f'{i} SET {job_id} "{fmt_time(at)}"\n'
        for i, (job_id, at) in enumerate(zip(ids, due, strict=True))
    ]
    kcp_pipeline(server.kcp_port, lines)
    watch.wait_finished(set(ids), timeout)
    time.sleep(0.3)  # let the last "job run" log lines and script lines arrive
    wanted = set(ids)
    execute_at = dict(zip(ids, due, strict=True))

    marked, observed = [], []
    for job_id in ids:
        at, updated, received = watch.triggered[job_id]
        assert at == execute_at[job_id], (job_id, at, execute_at[job_id])
        marked.append(updated - at)
        observed.append(received - at)

    run_start = []
    for event in server.events("job run"):
        run_id = event.get("job")
        if run_id in wanted:
            end = datetime.fromisoformat(event["timestamp"]).timestamp()
            start_us = round((end - event["seconds"]) * 1_000_000)
            run_start.append(start_us - execute_at[run_id])

    script = []
    for line in fired_file.read_text().splitlines():
        job_id, _, stamp = line.partition(" ")
        if job_id in wanted:
            sec, _, nanos = stamp.partition(".")
            script.append(int(sec) * 1_000_000 + int(nanos) // 1000 - execute_at[job_id])

    not_ok = sum(1 for i in ids if watch.finished[i] != pb.JOB_EVENT_TYPE_EXECUTED)
    return {
        "scenario": name,
        "jobs": len(ids),
        "not_executed": not_ok,
        "marked": summary(marked),
        "watch_received": summary(observed),
        "run_start": summary(run_start),
        "script": summary(script),
    }


def measure(
    workdir: Path,
    *,
    fsync: bool,
    burst: int = 1000,
    spaced: int = 200,
    gap_ms: int = 10,
    profile: Path | None = None,
) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    fired = workdir / "fired.txt"
    fired.write_text("")
    script = workdir / "fire.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $(date +%s.%N)" >> "{fired}"\n')
    script.chmod(0o755)
    server = Server(workdir, workdir / "data", fsync=fsync)
    results = []
    with server:
        kcp_pipeline(server.kcp_port, [f"1 RULE SET lat lat. shell {script}\n"])
        assert server.grpc_port, "gRPC is needed for the WatchJobs stream"
        watch = Watch(server.grpc_port, "lat.")
        try:
            time.sleep(0.5)  # idle before the first scenario
            now = time.time_ns() // 1000
            at = now + int(LEAD_S * 1e6)
            profiler = Profiler(server.pid, profile, rate=500) if profile else None
            results.append(run_scenario(server, watch, fired, "burst", [at] * burst, timeout=120))
            profiled = profiler.stop() if profiler else None
            time.sleep(1.0)  # back to idle
            now = time.time_ns() // 1000
            first = now + int(LEAD_S * 1e6)
            due = [first + i * gap_ms * 1000 for i in range(spaced)]
            results.append(run_scenario(server, watch, fired, "spaced", due, timeout=60))
        finally:
            watch.close()
        cpu = server.cpu_seconds()
    out = {"fsync": fsync, "scenarios": results, "server_cpu_s": cpu}
    if profile and profiled:
        out["profile"] = top(profiled)  # the burst scenario only
    return out
