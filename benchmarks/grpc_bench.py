"""gRPC benchmark: unary SetJob vs a plain grpc.aio echo server, SetJobs batches, WatchJobs lag.

    .venv/bin/python -m benchmarks.grpc_bench [--reps 3] [--quick] [--profile auto|always|never]
                                              [--json FILE]

Everything runs in separate processes, so no client shares the server's GIL:

- the real `kairoi-trio serve` (fsync on, the default; data in a fresh temp
  directory on the local disk; port 0 everywhere, ports read from the "ready" line);
- a plain grpc.aio server implementing only `/kairoi.v1.Scheduler/SetJob`
  with the same generated messages (request in, a `SetJobResponse` with the
  job echoed back out), the baseline for "unary within 2x of plain gRPC" (and
  issue 12's "within 1.3x with 16 callers");
- one client process per measurement (`python -m benchmarks.grpc_bench _client ...`).

Clients warm up, print READY, wait for GO on stdin, measure, print DONE, then
one JSON line. The parent samples the server's utime+stime (/proc/<pid>/stat)
at GO and DONE, so every rate comes with the server's CPU time for that window.
Traffic goes only to 127.0.0.1; every step has a deadline, and the run stops
by itself (about 2-3 minutes with the defaults).

Measurements (each repeated --reps times; best and spread reported):
1. unary SetJob requests/s, 1 and 16 concurrent callers (grpc.aio, one process),
   against kairoi and against the echo server, interleaved;
2. SetJobs jobs/s, 200 batches of 1,000 from 1 caller and from 4 callers;
3. WatchJobs: a watcher on a prefix, a loader setting 200 jobs every 10 ms
   (20,000 events/s) for 5 s, each job's payload holding the loader's
   CLOCK_MONOTONIC send time; lag = delivery time - send time.

Where a target is missed (or with --profile always), the workload runs once
more with `py-spy record -f raw -r 200` attached to the server, and the raw
stacks are aggregated into self and inclusive shares per frame.
"""

# ruff: noqa: E501  (the report is long markdown lines built from f-strings)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.server import cpu_model

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SET_JOB = "/kairoi.v1.Scheduler/SetJob"
SET_JOBS = "/kairoi.v1.Scheduler/SetJobs"
FAR_FUTURE_S = 1_893_456_000  # 2030-01-01: never due during a run, so no trigger events
READY_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 120.0

TARGET_JOBS_PER_S = 100_000
TARGET_UNARY_RATIO = 2.0  # kairoi unary may be at most 2x slower than the echo server
TARGET_UNARY16_RATIO = 1.3  # issue 12: with 16 callers, within 1.3x of the echo server
TARGET_WATCH_RATE = 20_000
TARGET_WATCH_P99_MS = 100.0


# -- process helpers ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def load_average() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return float(one), float(five), float(fifteen)


def machine() -> dict[str, Any]:
    model = cpu_model() or "unknown"
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    import grpc
    from google.protobuf import __version__ as protobuf_version

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "kernel": platform.release(),
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class KairoiServer:
    """`kairoi-trio serve` with gRPC on port 0 and fsync on (the default)."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.lines: list[str] = []
        self._ready = threading.Event()

    def start(self) -> KairoiServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "configuration.toml"
        config.write_text(
            '[log]\nlevel = "info"\nformat = "json"\n\n'
            '[controller]\nlisten = "127.0.0.1:0"\n\n'
            '[grpc]\nlisten = "127.0.0.1:0"\n\n'
            '[metrics]\nlisten = "127.0.0.1:0"\n\n'
            "[database]\nfsync_on_persist = true\n\n"
            f'[storage]\ndirectory = "{self.workdir / "data"}"\n\n'
            "[shutdown]\ngrace_period_s = 2.0\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(config)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env),
        )
        threading.Thread(target=self._read_logs, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("kairoi server did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def _read_logs(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if not self._ready.is_set() and '"ready"' in line:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "ready" and event.get("grpc_port"):
                    self.grpc_port = int(event["grpc_port"])
                    self._ready.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, 20)


# Loaded into the server (only) through PYTHONPATH when --gc-log is on (the default): logs
# every collection of the oldest generation, and any collection over 5 ms, with its
# CLOCK_MONOTONIC end time, so pauses can be matched to measurement windows. src/ is untouched.
_GC_PROBE = """\
import gc, os, time
_path = os.environ.get("KAIROI_BENCH_GC_LOG")
if _path:
    _log = open(_path, "a", buffering=1)
    _start = [0.0]
    def _probe(phase, info, _log=_log, _start=_start, _clock=time.perf_counter):
        if phase == "start":
            _start[0] = _clock()
            return
        took = _clock() - _start[0]
        if info["generation"] == 2 or took > 0.005:
            _log.write(f"{time.monotonic():.6f} {info['generation']} {took:.6f}\\n")
    gc.callbacks.append(_probe)
"""


def gc_pauses(path: Path | None, t0: float, t1: float) -> dict[str, float]:
    """Oldest-generation collections of the server that ended in [t0, t1]: count, max, total."""
    if path is None or not path.exists():
        return {}
    pauses = []
    for line in path.read_text().splitlines():
        at, generation, took = line.split()
        if generation == "2" and t0 <= float(at) <= t1:
            pauses.append(float(took) * 1000)
    return {
        "gen2_count": len(pauses),
        "gen2_max_ms": max(pauses, default=0.0),
        "gen2_total_ms": sum(pauses),
    }


class EchoServer:
    """The plain grpc.aio baseline, in its own process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.grpc_port = 0

    def start(self) -> EchoServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.grpc_bench", "_echo"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = _readline(self.process, READY_TIMEOUT_S)
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"echo server did not start: {line!r}")
        self.grpc_port = int(line.split()[1])
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, 10)


def stop_process(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _readline(process: subprocess.Popen[str], timeout: float) -> str:
    """One stdout line of a child, or "" at EOF; kills the child past the deadline."""
    assert process.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        process.kill()
        reader.join(5)
        raise RuntimeError(f"client {process.args!r} timed out")
    return result[0].strip() if result else ""


class Client:
    """A client process speaking the READY / GO / DONE / JSON protocol."""

    def __init__(self, kind: str, **args: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.grpc_bench", "_client", kind, json.dumps(args)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def expect(self, word: str, timeout: float = CLIENT_TIMEOUT_S) -> None:
        line = _readline(self.process, timeout)
        if line != word:
            rest = self.process.stdout.read() if self.process.stdout else ""  # type: ignore[union-attr]
            raise RuntimeError(f"client said {line!r}, expected {word}; {rest}")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("GO\n")
        self.process.stdin.flush()

    def result(self, timeout: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
        line = _readline(self.process, timeout)
        self.process.wait(timeout)
        if not line:
            raise RuntimeError(f"client {self.process.args!r} gave no result")
        data: dict[str, Any] = json.loads(line)
        if data.get("errors"):
            raise RuntimeError(f"client reported errors: {data}")
        return data

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Profiler:
    """py-spy attached to the server for `seconds`, raw (collapsed) stacks into a file."""

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        self.out = out
        spy = ROOT / ".venv" / "bin" / "py-spy"
        self.process = subprocess.Popen(
            [
                str(spy if spy.exists() else "py-spy"),
                "record",
                "-f",
                "raw",
                "-r",
                "200",
                "-d",
                str(int(seconds)),
                "-o",
                str(out),
                "--pid",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> dict[str, Any]:
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.out.exists():
            return {"error": (err or "").strip()[-500:]}
        return aggregate_stacks(self.out.read_text())


# Leaf frames where a thread waits (in C, GIL released) rather than computes: py-spy's idle
# detection misses some of them. Their samples are counted apart, not ranked as hotspots.
_WAIT_LEAVES = (
    "EpollSelector.select (selectors.py",  # asyncio waiting for I/O
    "EpollIOManager.get_events (trio/",  # Trio waiting for I/O
    "WorkerThread._work (trio/_core/_thread_cache.py",  # idle Trio worker thread
    "Thread.run (threading.py",  # grpcio's completion-queue poller, blocked in C
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
)
_IO_LEAVES = ("_fdatasync (", "_fsync (")
# Frames that wrap everything and say nothing about where time goes.
_FRAME_NOISE = (
    "<module>",
    "_run_code",
    "_run_module_as_main",
    "Thread._bootstrap",
    "Thread.run (threading",
    "main (kairoi_trio/cli.py",
    "run_server (kairoi_trio/cli.py",
    "run (trio/_core/_run.py",
    "unrolled_run (trio/",
    "run (asyncio/runners.py",
    "Runner.run (asyncio/",
    "_ServerThread.run (",
    "BaseEventLoop.run_until_complete",
    "BaseEventLoop.run_forever",
    "BaseEventLoop._run_once",
    "Handle._run (asyncio/events.py",
    "Context.run",
    "coro_wrapper",
    "_run_in_scope",
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def _function(frame: str) -> tuple[str, str]:
    """("func (file)", line) of a py-spy frame "func (file:line)"."""
    match = _FRAME.match(frame)
    if not match:
        return frame, ""
    return f"{match['func']} ({match['file']})", match["line"]


def aggregate_stacks(raw: str, top: int = 15) -> dict[str, Any]:
    """Sample shares from py-spy's raw output, per function (with its hottest line).

    self: where the samples' innermost frame is (waits apart); inclusive: the
    functions on the stack (each counted once per sample), wrappers left out.
    """
    leaf: Counter[str] = Counter()
    leaf_lines: dict[str, Counter[str]] = {}
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    waits = io = total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        innermost = frames[-1]
        if "_ServerThread" in stack:
            threads["grpc-server thread (asyncio)"] += count
        elif "trio/_core/_run.py" in stack:
            threads["Trio thread"] += count
        elif "_thread_cache" in stack:
            threads["Trio worker threads"] += count
        else:
            threads["other threads"] += count
        if innermost.startswith(_WAIT_LEAVES):
            waits += count
            continue
        if innermost.startswith(_IO_LEAVES):
            io += count
        function, number = _function(innermost)
        leaf[function] += count
        leaf_lines.setdefault(function, Counter())[number] += count
        for function in {_function(f)[0] for f in frames if not f.startswith(_FRAME_NOISE)}:
            inclusive[function] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": [], "threads": [], "waits": 0.0, "io": 0.0}

    def hottest(function: str) -> str:
        number = leaf_lines[function].most_common(1)[0][0]
        return function[:-1] + f":{number})" if number else function

    return {
        "samples": total,
        "waits": waits / total,
        "io": io / total,
        "self": [(hottest(f), n / total) for f, n in leaf.most_common(top)],
        "inclusive": [(f, n / total) for f, n in inclusive.most_common(top)],
        "threads": [(t, n / total) for t, n in threads.most_common()],
    }


# -- the measurements (parent side) ------------------------------------------------------------


@dataclass
class Run:
    """One measured window: the client's numbers plus the server's CPU for that window."""

    client: dict[str, Any]
    server_cpu_s: float
    wall_s: float
    load1: float
    profile: dict[str, Any] | None = None
    t0: float = 0.0
    t1: float = 0.0
    gc: dict[str, float] | None = None

    @property
    def server_cores(self) -> float:
        return self.server_cpu_s / self.wall_s if self.wall_s else 0.0


def measure(
    server_pid: int,
    client: Client,
    *,
    profile_s: float = 0.0,
    profile_out: Path | None = None,
    also: list[Client] | None = None,
) -> Run:
    """Wait for READY, send GO, take the server's CPU until DONE; optionally profile it."""
    try:
        client.expect("READY")
        cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
        profiler = (
            Profiler(server_pid, profile_s, profile_out) if profile_s and profile_out else None
        )
        client.go()
        for other in also or ():
            other.go()
        client.expect("DONE")
        cpu1, t1 = cpu_seconds(server_pid), time.monotonic()
        result = client.result()
        profile = profiler.finish() if profiler else None
        return Run(result, cpu1 - cpu0, t1 - t0, load_average()[0], profile, t0, t1)
    finally:
        client.kill()


def unary_run(
    server_pid: int, port: int, callers: int, seconds: float, prefix: str, **profile: Any
) -> Run:
    client = Client("unary", port=port, callers=callers, seconds=seconds, warmup=0.7, prefix=prefix)
    return measure(server_pid, client, **profile)


def batch_run(
    server_pid: int, port: int, callers: int, batches: int, size: int, prefix: str, **profile: Any
) -> Run:
    client = Client(
        "batches", port=port, callers=callers, batches=batches, size=size, prefix=prefix
    )
    return measure(server_pid, client, **profile)


def watch_run(
    server_pid: int, port: int, rate: int, batch: int, seconds: float, prefix: str, **profile: Any
) -> Run:
    expected = int(rate * seconds) // batch * batch
    watcher = Client("watcher", port=port, prefix=prefix, expected=expected, wait_s=seconds + 30)
    try:
        watcher.expect("READY")  # the watch is registered on the server
        loader = Client("loader", port=port, prefix=prefix, rate=rate, batch=batch, seconds=seconds)
        run = measure(server_pid, loader, also=[watcher], **profile)
        # the loader is done; the server's CPU until the watcher has everything counts too
        cpu0 = cpu_seconds(server_pid)
        watcher.expect("DONE", timeout=seconds + 40)
        run.server_cpu_s += cpu_seconds(server_pid) - cpu0
        run.t1 = time.monotonic()
        seen = watcher.result()
        loaded = run.client
        first_send = loaded["first_send_ns"]
        last_delivery = seen["last_delivery_ns"] or first_send
        span_s = (last_delivery - first_send) / 1e9
        run.wall_s = max(span_s, run.wall_s)
        run.client = {
            "loader": loaded,
            "watcher": seen,
            "delivered": seen["events"],
            "expected": expected,
            "delivered_per_s": seen["events"] / span_s if span_s > 0 else 0.0,
        }
        return run
    finally:
        watcher.kill()


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.grpc_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    parser.add_argument("--quick", action="store_true", help="1 repetition, shorter windows")
    parser.add_argument("--unary-seconds", type=float, default=3.0)
    parser.add_argument("--batches", type=int, default=200, help="SetJobs batches per run")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--watch-rate", type=int, default=20_000, help="events/s the loader sets")
    parser.add_argument("--watch-seconds", type=float, default=5.0)
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy the server where a target is missed (auto), always or never",
    )
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    parser.add_argument("--profile-dir", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument(
        "--no-gc-log",
        dest="gc_log",
        action="store_false",
        help="do not load the GC-pause probe into the server",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.unary_seconds, args.batches, args.watch_seconds = 1, 2.0, 100, 3.0

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = load_average()
    info = machine()
    log(f"machine: {info}; load average {load_start}")
    workdir = Path(tempfile.mkdtemp(prefix="kairoi-grpc-bench-"))
    gc_log: Path | None = None
    server_env: dict[str, str] = {}
    if args.gc_log:
        probe_dir = workdir / "probe"
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(_GC_PROBE)
        gc_log = workdir / "gc.log"
        server_env = {"PYTHONPATH": str(probe_dir), "KAIROI_BENCH_GC_LOG": str(gc_log)}
    kairoi = KairoiServer(workdir / "kairoi", server_env)
    servers = 0

    def fresh_kairoi() -> KairoiServer:
        """Stop the current kairoi server and start one with an empty data directory."""
        nonlocal kairoi, servers
        kairoi.stop()
        servers += 1
        kairoi = KairoiServer(workdir / f"kairoi{servers}", server_env).start()
        return kairoi

    echo = EchoServer()
    results: dict[str, Any] = {"started": started, "machine": info, "load_start": load_start}
    profiles: dict[str, Any] = {}
    try:
        kairoi.start()
        echo.start()
        log(
            f"kairoi pid {kairoi.pid} port {kairoi.grpc_port}; echo pid {echo.pid} port {echo.grpc_port}"
        )

        # 1 + 2: unary SetJob, kairoi and echo interleaved so both see the same background load
        unary: dict[tuple[str, int], list[Run]] = {}
        for rep in range(args.reps):
            for callers in (1, 16):
                for name, srv in (("echo", echo), ("kairoi", kairoi)):
                    run = unary_run(
                        srv.pid, srv.grpc_port, callers, args.unary_seconds, f"u{rep}.{callers}."
                    )
                    unary.setdefault((name, callers), []).append(run)
                    if name == "kairoi":
                        run.gc = gc_pauses(gc_log, run.t0, run.t1)
                    c = run.client
                    log(
                        f"unary {name:6} x{callers:<2} rep {rep}: {fmt(c['rps'])} req/s, "
                        f"p50 {c['p50_ms']:.2f} ms p99 {c['p99_ms']:.2f} ms, server "
                        f"{run.server_cpu_s * 1e6 / max(c['calls'], 1):.0f} us CPU/call, load {run.load1}"
                    )

        # 3: SetJobs batches of 1,000
        batches: dict[int, list[Run]] = {}
        for rep in range(args.reps):
            for callers in (1, 4):
                fresh_kairoi()  # every run starts from an empty server
                run = batch_run(
                    kairoi.pid,
                    kairoi.grpc_port,
                    callers,
                    args.batches,
                    args.batch_size,
                    f"b{rep}.{callers}.",
                )
                batches.setdefault(callers, []).append(run)
                run.gc = gc_pauses(gc_log, run.t0, run.t1)
                c = run.client
                log(
                    f"SetJobs x{callers} rep {rep}: {fmt(c['jobs_per_s'])} jobs/s, batch p50 "
                    f"{c['p50_ms']:.1f} ms p99 {c['p99_ms']:.1f} ms, server "
                    f"{run.server_cpu_s * 1e6 / c['jobs']:.1f} us CPU/job, load {run.load1}, gc {run.gc}"
                )

        # 4: WatchJobs at a controlled rate
        watches: list[Run] = []
        for rep in range(args.reps):
            fresh_kairoi()
            run = watch_run(
                kairoi.pid, kairoi.grpc_port, args.watch_rate, 200, args.watch_seconds, f"w{rep}."
            )
            watches.append(run)
            run.gc = gc_pauses(gc_log, run.t0, run.t1)
            c = run.client
            w = c["watcher"]
            log(
                f"watch rep {rep}: {fmt(c['delivered'])}/{fmt(c['expected'])} events, "
                f"{fmt(c['delivered_per_s'])} events/s, lag p50 {w['p50_ms']:.1f} ms p99 "
                f"{w['p99_ms']:.1f} ms max {w['max_ms']:.1f} ms, loader "
                f"{fmt(c['loader']['sent_per_s'])}/s, server {run.server_cores:.2f} cores, load {run.load1}, "
                f"server jobs {fmt(c['watcher']['server_jobs'])}, gc {run.gc}"
            )

        # targets
        def best_rps(name: str, callers: int) -> float:
            return max(r.client["rps"] for r in unary[(name, callers)])

        ratios = {n: best_rps("echo", n) / best_rps("kairoi", n) for n in (1, 16)}
        best_jobs = max(r.client["jobs_per_s"] for runs in batches.values() for r in runs)
        best_watch = min(watches, key=lambda r: r.client["watcher"]["p99_ms"])
        watch_ok = (
            best_watch.client["delivered"] == best_watch.client["expected"]
            and best_watch.client["delivered_per_s"] >= TARGET_WATCH_RATE * 0.95
            and best_watch.client["watcher"]["p99_ms"] <= TARGET_WATCH_P99_MS
        )
        targets = {
            "unary": max(ratios.values()) <= TARGET_UNARY_RATIO,
            "unary16": ratios[16] <= TARGET_UNARY16_RATIO,
            "setjobs": best_jobs >= TARGET_JOBS_PER_S,
            "watch": watch_ok,
        }
        log(f"targets: {targets}; unary echo/kairoi ratios {ratios}")

        # profiles of the server where a target is missed
        prof_dir = args.profile_dir or workdir / "profiles"
        prof_dir.mkdir(parents=True, exist_ok=True)
        want = {
            k: (args.profile == "always" or (args.profile == "auto" and not ok))
            for k, ok in targets.items()
        }
        if want["unary"] or want["unary16"]:
            log("profiling kairoi: unary SetJob x16")
            run = unary_run(
                kairoi.pid,
                kairoi.grpc_port,
                16,
                6.0,
                "pu.",
                profile_s=5,
                profile_out=prof_dir / "unary.txt",
            )
            profiles["unary SetJob, 16 callers"] = run.profile
        if want["setjobs"]:
            log("profiling kairoi: SetJobs x4")
            fresh_kairoi()
            run = batch_run(
                kairoi.pid,
                kairoi.grpc_port,
                4,
                600,
                args.batch_size,
                "pb.",
                profile_s=4,
                profile_out=prof_dir / "setjobs.txt",
            )
            profiles["SetJobs, 4 callers"] = run.profile
        if want["watch"]:
            log("profiling kairoi: WatchJobs")
            fresh_kairoi()
            run = watch_run(
                kairoi.pid,
                kairoi.grpc_port,
                args.watch_rate,
                200,
                6.0,
                "pw.",
                profile_s=5,
                profile_out=prof_dir / "watch.txt",
            )
            profiles["WatchJobs 20k events/s"] = run.profile

        results.update(
            unary={f"{n}x{c}": [vars_of(r) for r in runs] for (n, c), runs in unary.items()},
            setjobs={str(c): [vars_of(r) for r in runs] for c, runs in batches.items()},
            watch=[vars_of(r) for r in watches],
            ratios=ratios,
            targets=targets,
            profiles=profiles,
            load_end=load_average(),
        )
        markdown = report(args, results, unary, batches, watches, ratios, targets, profiles)
        print(markdown)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return 0
    finally:
        echo.stop()
        kairoi.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def vars_of(run: Run) -> dict[str, Any]:
    client = dict(run.client)
    client.pop("lags_ms", None)
    return {
        "client": client,
        "server_cpu_s": run.server_cpu_s,
        "wall_s": run.wall_s,
        "load1": run.load1,
        "gc": run.gc,
    }


def _gc_cell(run: Run) -> str:
    if not run.gc:
        return "-"
    return f"{run.gc['gen2_count']:.0f} ({run.gc['gen2_max_ms']:.0f})"


def spread(values: list[float], digits: int = 0) -> str:
    if len(values) < 2:
        return "-"
    return f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"


def report(
    args: argparse.Namespace,
    results: dict[str, Any],
    unary: dict[tuple[str, int], list[Run]],
    batches: dict[int, list[Run]],
    watches: list[Run],
    ratios: dict[int, float],
    targets: dict[str, bool],
    profiles: dict[str, Any],
) -> str:
    info = results["machine"]
    ok = {True: "**met**", False: "**missed**"}
    out: list[str] = []
    add = out.append
    add("## gRPC (`benchmarks/grpc_bench.py`)")
    add("")
    add(
        f"Run {results['started']} on {info['nproc']} cores ({info['cpu']}), {info['mem_gib']} GiB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}. "
        f"Load average at start {results['load_start'][0]:.2f} / {results['load_start'][1]:.2f} / "
        f"{results['load_start'][2]:.2f}, at end {results['load_end'][0]:.2f} / {results['load_end'][1]:.2f} / "
        f"{results['load_end'][2]:.2f} (other work was running on the machine)."
    )
    add("")
    add("```")
    add(
        ".venv/bin/python -m benchmarks.grpc_bench"
        + (f" --reps {args.reps}" if args.reps != 3 and not args.quick else "")
        + (" --quick" if args.quick else "")
    )
    add("```")
    add("")
    add(
        f"The real `kairoi-trio serve` (fsync on, data on the local ext4 disk) and every client run as separate "
        f"processes over 127.0.0.1; each measurement ran {args.reps}x, **best** first, spread = min-max over "
        f"the runs. Server CPU is utime+stime of the server process over the measured window "
        f'(/proc/<pid>/stat); "cores" = server CPU s / wall s. "server gen2 GCs" = collections of '
        "the oldest generation in the server during the window and the longest one, from a "
        "`gc.callbacks` probe loaded into the server through PYTHONPATH (`--no-gc-log` leaves it out)."
    )
    add("")
    add("### Unary `SetJob` vs a plain grpc.aio echo server")
    add("")
    add(
        "One grpc.aio client process with N concurrent callers, each awaiting its call and sending the next; "
        f"{args.unary_seconds:g} s windows after a warm-up. The echo server is a grpc.aio server in its own process "
        "answering `/kairoi.v1.Scheduler/SetJob` with the same generated messages (the job echoed back)."
    )
    add("")
    add(
        "| server | callers | req/s best | spread | p50 ms | p99 ms | server CPU/call | server cores |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for callers in (1, 16):
        for name in ("echo", "kairoi"):
            runs = unary[(name, callers)]
            b = max(runs, key=lambda r: r.client["rps"])
            cpu_per_call = b.server_cpu_s * 1e6 / max(b.client["calls"], 1)
            add(
                f"| {'plain grpc.aio echo' if name == 'echo' else 'kairoi'} | {callers} | {fmt(b.client['rps'])} | "
                f"{spread([r.client['rps'] for r in runs])} | {b.client['p50_ms']:.2f} | {b.client['p99_ms']:.2f} | "
                f"{cpu_per_call:.0f} µs | {b.server_cores:.2f} |"
            )
    add("")
    for callers in (1, 16):
        e = max(unary[("echo", callers)], key=lambda r: r.client["rps"])
        k = max(unary[("kairoi", callers)], key=lambda r: r.client["rps"])
        extra = k.server_cpu_s / max(k.client["calls"], 1) - e.server_cpu_s / max(
            e.client["calls"], 1
        )
        add(
            f"- {callers} caller{'s' if callers > 1 else ''}: echo / kairoi = **{ratios[callers]:.2f}x** "
            f"(kairoi costs {extra * 1e6:.0f} µs more server CPU per call than the echo server)."
        )
    add(
        f"- Target, kairoi unary within {TARGET_UNARY_RATIO:g}x of plain echo: {ok[targets['unary']]}."
    )
    add(
        f"- Target (issue 12), 16 callers within {TARGET_UNARY16_RATIO:g}x of plain echo: "
        f"{ok[targets['unary16']]}."
    )
    add("")
    add(f"### `SetJobs`, batches of {args.batch_size:,}")
    add("")
    add(
        f"{args.batches} batches of {args.batch_size:,} new jobs (execute_at in 2030 and later, 16-byte payloads) per run, "
        "split over the callers, requests serialized before the clock starts; every job's status is checked. "
        "Every run starts a fresh server with an empty data directory, so runs are comparable."
    )
    add("")
    add(
        "| callers | jobs/s best | spread | batch p50 ms | batch p99 ms | server CPU/job "
        "| server cores | server gen2 GCs (max ms) |"
    )
    add("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for callers, runs in batches.items():
        b = max(runs, key=lambda r: r.client["jobs_per_s"])
        add(
            f"| {callers} | {fmt(b.client['jobs_per_s'])} | {spread([r.client['jobs_per_s'] for r in runs])} | "
            f"{b.client['p50_ms']:.1f} | {b.client['p99_ms']:.1f} | {b.server_cpu_s * 1e6 / b.client['jobs']:.1f} µs | "
            f"{b.server_cores:.2f} | {_gc_cell(b)} |"
        )
    add("")
    add(f"- Target ≥ {TARGET_JOBS_PER_S:,} jobs/s (fsync on): {ok[targets['setjobs']]}.")
    add("")
    add("### `WatchJobs`")
    add("")
    add(
        f"One watcher process on a prefix; a loader process sets {args.watch_rate:,} jobs/s under it for "
        f"{args.watch_seconds:g} s as `SetJobs` batches of 200 every {200 / args.watch_rate * 1000:g} ms, each job's "
        "payload carrying the loader's CLOCK_MONOTONIC time just before the batch was built and sent. "
        "Lag = the watcher's receipt time minus that send time (same clock, same machine). Events/s = events "
        "delivered / (last delivery - first send). Every run starts a fresh server (empty data directory); "
        '"jobs held" is the server\'s job count at the end of the run.'
    )
    add("")
    add(
        "| run | delivered | events/s delivered | loader sent/s | lag p50 ms | lag p99 ms "
        "| lag max ms | events/message | server cores | jobs held | server gen2 GCs (max ms) |"
    )
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(watches):
        c, w = r.client, r.client["watcher"]
        add(
            f"| {i + 1} | {fmt(c['delivered'])} / {fmt(c['expected'])} | {fmt(c['delivered_per_s'])} | "
            f"{fmt(c['loader']['sent_per_s'])} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | {w['max_ms']:.1f} | "
            f"{w['events_per_message']:.0f} | {r.server_cores:.2f} | {fmt(w['server_jobs'])} | "
            f"{_gc_cell(r)} |"
        )
    add("")
    add(
        f"- Target, keep up with {TARGET_WATCH_RATE:,} events/s at p99 lag ≤ {TARGET_WATCH_P99_MS:g} ms "
        f"(best run): {ok[targets['watch']]}."
    )
    add("")
    if profiles:
        add("### Server profiles (py-spy, 200 Hz, active samples only)")
        add("")
        for name, prof in profiles.items():
            add(
                f"**{name}** ({prof.get('samples', 0):,} samples; by thread: "
                + ", ".join(f"{t} {s:.0%}" for t, s in prof.get("threads", []))
                + f"; waiting in epoll/grpc poller/idle workers {prof.get('waits', 0):.0%}, "
                f"in fdatasync {prof.get('io', 0):.0%})"
            )
            add("")
            if "error" in prof:
                add(f"py-spy failed: `{prof['error']}`")
                add("")
                continue
            add("| self share | function (hottest line) |")
            add("|---:|---|")
            for frame, share in prof["self"][:12]:
                add(f"| {share:.1%} | `{frame}` |")
            add("")
            add("| inclusive share | function |")
            add("|---:|---|")
            for frame, share in prof["inclusive"][:12]:
                add(f"| {share:.1%} | `{frame}` |")
            add("")
    return "\n".join(out)


# -- the client processes -------------------------------------------------------------------------


def _pcts(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ordered = sorted(values_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": ordered[-1]}


def _say(word: str) -> None:
    sys.stdout.write(word + "\n")
    sys.stdout.flush()


async def _wait_go() -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        raise SystemExit("no GO")


def _channel(port: int) -> Any:
    import grpc

    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )


def _set_job(pb: Any, job_id: str, i: int, payload: bytes) -> Any:
    return pb.SetJobRequest(
        id=job_id, execute_at={"seconds": FAR_FUTURE_S + (i * 7919) % 300_000_000}, payload=payload
    )


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client_unary(
    port: int, callers: int, seconds: float, warmup: float, prefix: str
) -> dict[str, Any]:
    from kairoi.v1 import scheduler_pb2 as pb

    channel = _channel(port)
    await channel.channel_ready()
    call = channel.unary_unary(SET_JOB)  # bytes in, bytes out: the same work against both servers
    payload = b"0123456789abcdef"
    state = {"calls": 0, "errors": 0, "measuring": False, "stop": False}
    latencies: list[float] = []
    perf = time.perf_counter

    async def caller(n: int) -> None:
        i = 0
        while not state["stop"]:
            request = _set_job(pb, f"{prefix}{n}.{i}", i, payload).SerializeToString()
            i += 1
            t = perf()
            try:
                answer = await call(request)
            except Exception:
                state["errors"] += 1
                continue
            if state["measuring"]:
                latencies.append(perf() - t)
                state["calls"] += 1
            if i == 1:
                pb.SetJobResponse.FromString(answer)  # a valid answer, once per caller

    tasks = [asyncio.create_task(caller(n)) for n in range(callers)]
    await asyncio.sleep(warmup)
    _say("READY")
    await _wait_go()
    cpu0 = _cpu_self()
    state["measuring"] = True
    t0 = perf()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed = perf() - t0
    calls = state["calls"]
    _say("DONE")
    cpu = _cpu_self() - cpu0
    state["stop"] = True
    await asyncio.gather(*tasks)
    await channel.close()
    return {
        "calls": calls,
        "seconds": elapsed,
        "rps": calls / elapsed,
        "errors": state["errors"],
        "client_cpu_s": cpu,
        **_pcts([x * 1000 for x in latencies]),
    }


async def client_batches(
    port: int, callers: int, batches: int, size: int, prefix: str
) -> dict[str, Any]:
    from kairoi.v1 import scheduler_pb2 as pb

    channel = _channel(port)
    await channel.channel_ready()
    call = channel.unary_unary(SET_JOBS)
    payload = b"0123456789abcdef"

    def build(tag: str, b: int) -> bytes:
        jobs = [_set_job(pb, f"{tag}{b}.{j}", b * size + j, payload) for j in range(size)]
        return pb.SetJobsRequest(jobs=jobs).SerializeToString()

    for b in range(3):  # warm-up, under another prefix
        pb.SetJobsResponse.FromString(await call(build(f"{prefix}warm.", b)))
    requests = [build(prefix, b) for b in range(batches)]
    _say("READY")
    await _wait_go()
    perf = time.perf_counter
    latencies: list[float] = []
    answers: list[bytes] = []
    queue = list(reversed(requests))
    cpu0 = _cpu_self()

    async def caller() -> None:
        while queue:
            request = queue.pop()
            t = perf()
            answers.append(await call(request))
            latencies.append(perf() - t)

    t0 = perf()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = perf() - t0
    _say("DONE")
    cpu = _cpu_self() - cpu0
    ok = errors = 0
    for answer in answers:
        for result in pb.SetJobsResponse.FromString(answer).results:
            if result.status.code == 0:
                ok += 1
            else:
                errors += 1
    await channel.close()
    return {
        "jobs": ok,
        "errors": errors,
        "seconds": elapsed,
        "jobs_per_s": ok / elapsed,
        "client_cpu_s": cpu,
        **_pcts([x * 1000 for x in latencies]),
    }


async def client_loader(
    port: int, prefix: str, rate: int, batch: int, seconds: float
) -> dict[str, Any]:
    from kairoi.v1 import scheduler_pb2 as pb

    channel = _channel(port)
    await channel.channel_ready()
    call = channel.unary_unary(SET_JOBS)
    interval = batch / rate
    count = int(rate * seconds) // batch
    ids = [[f"{prefix}{b}.{j}" for j in range(batch)] for b in range(count)]
    # warm-up under a prefix the watcher does not see
    warm = pb.SetJobsRequest(
        jobs=[_set_job(pb, f"warm.{prefix}{j}", j, b"0") for j in range(batch)]
    )
    for _ in range(3):
        await call(warm.SerializeToString())
    _say("READY")
    await _wait_go()
    loop = asyncio.get_running_loop()
    errors = 0
    in_flight: set[asyncio.Task[bytes]] = set()
    answers: list[asyncio.Task[bytes]] = []
    late = 0
    start = loop.time()
    first_send = 0
    now_ns = time.monotonic_ns
    for b in range(count):
        delay = start + b * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -interval:
            late += 1
        sent = now_ns()
        first_send = first_send or sent
        payload = b"%d" % sent
        request = pb.SetJobsRequest(
            jobs=[_set_job(pb, job_id, j, payload) for j, job_id in enumerate(ids[b])]
        )
        task = asyncio.ensure_future(call(request.SerializeToString()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        answers.append(task)
    send_span = loop.time() - start
    await asyncio.gather(*in_flight, return_exceptions=True)
    _say("DONE")
    for task in answers:
        if task.exception() is not None:
            errors += batch
            continue
        errors += sum(
            1 for r in pb.SetJobsResponse.FromString(task.result()).results if r.status.code
        )
    await channel.close()
    return {
        "batches": count,
        "jobs": count * batch,
        "errors": errors,
        "first_send_ns": first_send,
        "send_span_s": send_span,
        "sent_per_s": count * batch / max(send_span + interval, 1e-9),
        "late_batches": late,
    }


async def client_watcher(port: int, prefix: str, expected: int, wait_s: float) -> dict[str, Any]:
    from kairoi.v1 import scheduler_pb2 as pb
    from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

    channel = _channel(port)
    await channel.channel_ready()
    stub = pb_grpc.SchedulerStub(channel)
    call = stub.WatchJobs(pb.WatchJobsRequest(prefix=prefix))
    await call.initial_metadata()  # the server sends it once the watch is registered
    _say("READY")
    lags: list[float] = []
    events = messages = 0
    last = 0
    now_ns = time.monotonic_ns
    seen: set[str] = set()

    async def read() -> None:
        nonlocal events, messages, last
        async for response in call:
            now = now_ns()
            messages += 1
            for event in response.events:
                if event.type != pb.JOB_EVENT_TYPE_SET:
                    continue
                job = event.job
                seen.add(job.id)
                lags.append((now - int(job.payload)) / 1e6)
            events = len(seen)
            last = now
            if events >= expected:
                return

    try:
        await asyncio.wait_for(read(), wait_s)
    except TimeoutError:
        pass
    _say("DONE")
    call.cancel()
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    await channel.close()
    return {
        "events": events,
        "server_jobs": info.jobs.planned
        + info.jobs.triggered
        + info.jobs.executed
        + info.jobs.failed,
        "messages": messages,
        "last_delivery_ns": last,
        "errors": 0,
        "events_per_message": events / max(messages, 1),
        **_pcts(lags),
    }


def client_main(kind: str, raw_args: str) -> None:
    args = json.loads(raw_args)
    runners: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
        "unary": client_unary,
        "batches": client_batches,
        "loader": client_loader,
        "watcher": client_watcher,
    }
    runner = runners[kind]
    result = asyncio.run(runner(**args))
    _say(json.dumps(result))


# -- the plain echo server -----------------------------------------------------------------------


async def echo_server() -> None:
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from kairoi.v1 import scheduler_pb2 as pb

    async def set_job(request: Any, context: Any) -> Any:
        now = time.time_ns()
        return pb.SetJobResponse(
            job=pb.Job(
                id=request.id,
                execute_at=request.execute_at,
                status=pb.JOB_STATUS_PLANNED,
                payload=request.payload,
                updated_at=Timestamp(seconds=now // 10**9, nanos=now % 10**9 // 1000 * 1000),
            )
        )

    handler = grpc.method_handlers_generic_handler(
        "kairoi.v1.Scheduler",
        {
            "SetJob": grpc.unary_unary_rpc_method_handler(
                set_job,
                request_deserializer=pb.SetJobRequest.FromString,
                response_serializer=pb.SetJobResponse.SerializeToString,
            ),
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    _say(f"PORT {port}")
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_client":
        client_main(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "_echo":
        asyncio.run(echo_server())
    else:
        sys.exit(main())
