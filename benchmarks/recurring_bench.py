"""Recurring jobs: occurrence lateness and CPU over HTTP, cron evaluation, restart.

    .venv/bin/python -m benchmarks.recurring_bench [all|lateness|cron|restart] [options]

Figures (docs/benchmarks.md, "Recurring jobs", has the full-size run):

  lateness  N recurring jobs `* * * * *` (SCHEDULE over KCP, pipelined) with an
            http rule to a local endpoint (a separate process answering 200 at
            once); over M minutes (M occurrences of each job): lateness of each
            occurrence = receipt time at the endpoint - the `scheduled_at` of the
            JSON body (`execute_at` when the runner does not send it; the same
            time without jitter), and server CPU-s per occurrence (utime+stime of
            /proc/<pid>/stat over the window). Compared with N one-shot jobs all
            due at one minute boundary, same endpoint, on a fresh server.
  cron      µs per next-occurrence computation: occurrences.next_after uncached
            (cronsim, as the server uses it) vs croniter, and bare cronsim, for a
            few expressions.
  restart   ready time and RSS of the server with N recurring jobs (a mix of cron
            expressions shared by many jobs and `every Ns` jobs each with its own
            start) vs N one-shot jobs; the data directories are written directly
            with kairoi_trio.storage (a snapshot), not through the server.

The defaults are small (a few minutes in all); the documented run is

    .venv/bin/python -m benchmarks.recurring_bench all --jobs 100000 --minutes 3 \\
        --restart-jobs 1000000

Everything runs under a temporary directory (removed unless --keep), talks only
to 127.0.0.1, and stops by itself (every wait is bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.__main__ import empty_start, log, machine, restarts
from benchmarks.lateness import summary
from benchmarks.loadgen import CHUNK_REQUESTS, Conn
from benchmarks.profile import Profiler, top
from benchmarks.server import Server, cpu_seconds, load_average, machine_cpu, split_requests

MICROS = 1_000_000
MINUTE_US = 60 * MICROS
SETTLE_S = 3.0  # no delivery for this long after the last due time: the run is over

# -- the HTTP endpoint (a separate process) -------------------------------------------


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def endpoint_main(out: Path) -> int:
    """Answer every POST with 200 at once; keep (receipt ns, body). `GET /count`
    answers how many POSTs came; SIGTERM writes `<ns> <body>` lines to `out`."""
    received: list[tuple[int, bytes]] = []
    clock = time.time_ns

    class Hook(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            now = clock()
            requests, buf = split_requests(self.buf + data if self.buf else data)
            for head, body in requests:
                if head.startswith(b"GET /count"):
                    text = str(len(received)).encode()
                    self.transport.write(  # type: ignore[attr-defined]
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
                    )
                else:
                    received.append((now, body))
                    self.transport.write(_OK)  # type: ignore[attr-defined]
            self.buf = buf

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(Hook, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        print(f"port {port}", flush=True)
        await stop.wait()
        server.close()

    gc.disable()  # (ns, bytes) tuples hold no cycles; a collection would pause the answers
    asyncio.run(serve())
    with open(out, "wb") as f:
        for ns, body in received:
            f.write(b"%d %s\n" % (ns, body))
    return 0


class Endpoint:
    """A local HTTP endpoint in its own process: `python -m <module> _endpoint OUT`
    (this module's endpoint_main, or another benchmark's with the same protocol:
    "port N" on stdout when listening, `<receipt ns> <body>` lines in OUT after
    SIGTERM, then optionally "connections N")."""

    def __init__(self, workdir: Path, module: str = "benchmarks.recurring_bench") -> None:
        self.out = workdir / f"received-{time.monotonic_ns()}.txt"
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "_endpoint", str(self.out)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("port "):
            self.process.kill()
            raise RuntimeError(f"endpoint did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.connections = 0  # accepted, when the endpoint tells (after stop)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=10) as reply:
            return int(reply.read())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop_raw(self) -> list[tuple[int, bytes]]:
        """(receipt µs, body) of every POST received; sets `connections`."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.stdout is not None
        tail = self.process.stdout.read().decode()
        self.process.wait(60)
        for line in tail.splitlines():
            if line.startswith("connections "):
                self.connections = int(line.split()[1])
        out = []
        with open(self.out, "rb") as f:
            for raw in f:
                ns, _, body = raw.rstrip(b"\n").partition(b" ")
                out.append((int(ns) // 1000, body))
        self.out.unlink()
        return out

    def stop(self) -> list[tuple[int, dict]]:
        """(receipt µs, JSON body) of every POST received."""
        return [(at, json.loads(body)) for at, body in self.stop_raw()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# -- KCP pipelining (loadgen's connection, any requests) ---------------------------------


class _AnswerConn(Conn):
    """loadgen.Conn that also keeps the answers."""

    def __init__(self, port: int, chunks: list[tuple[int, bytes]], window: int) -> None:
        super().__init__(port, chunks, window)
        self.answers: list[bytes] = []

    def on_read(self) -> bool:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return True
        if not data:
            raise ConnectionError(f"server closed the connection after {self.received} answers")
        self.received += data.count(b"\n")
        self.answers.append(data)
        return True


def pipeline(port: int, lines: list[str], window: int = 10_000, timeout: float = 600) -> list[str]:
    """Send `lines` (one KCP request each) on one connection with up to `window`
    outstanding; return the answer lines. Raises on any ERROR."""
    chunks = []
    for base in range(0, len(lines), CHUNK_REQUESTS):
        part = lines[base : base + CHUNK_REQUESTS]
        chunks.append((len(part), "".join(part).encode()))
    conn = _AnswerConn(port, chunks, window)
    sel = selectors.DefaultSelector()
    sel.register(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
    deadline = time.monotonic() + timeout
    while not conn.done:
        for _key, mask in sel.select(timeout=30):
            if mask & selectors.EVENT_READ:
                conn.on_read()
            if mask & selectors.EVENT_WRITE:
                conn.on_write()
        if not conn.done:
            sel.modify(
                conn.sock,
                selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.want_write() else 0),
                conn,
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{conn.received} of {len(lines)} answers after {timeout}s")
    sel.close()
    conn.sock.close()
    answers = b"".join(conn.answers).decode().splitlines()
    errors = [a for a in answers if " ERROR" in a]
    if errors:
        raise RuntimeError(f"{len(errors)} requests answered ERROR, e.g. {errors[0]!r}")
    return answers


def kcp_time(us: int) -> str:
    return (datetime(1970, 1, 1) + timedelta(microseconds=us)).strftime("%Y-%m-%d %H:%M:%S")


# -- lateness and CPU per occurrence ------------------------------------------------------


def wait_until(us: int) -> None:
    while (left := us / MICROS - time.time()) > 0:
        time.sleep(min(left, 0.5))


def next_minute_us(lead_s: float) -> int:
    """The first minute boundary at least `lead_s` from now (µs)."""
    now = time.time_ns() // 1000
    return (now + int(lead_s * MICROS)) // MINUTE_US * MINUTE_US + MINUTE_US


def metric_values(port: int | None, names: tuple[str, ...]) -> dict[str, float]:
    """Values of series of the server's /metrics, by name with labels as written
    there (`kairoi_jobs{status="executed"}`); 0 when absent."""
    out = dict.fromkeys(names, 0.0)
    if not port:
        return out
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in out:
            out[name] = float(value)
    return out


_LATENESS_SUM = "kairoi_trigger_lateness_seconds_sum"
_LATENESS_COUNT = "kairoi_trigger_lateness_seconds_count"
_STATUSES = tuple(
    f'kairoi_jobs{{status="{status}"}}' for status in ("planned", "triggered", "executed", "failed")
)
_METRICS = (_LATENESS_SUM, _LATENESS_COUNT, *_STATUSES)


def _stamp_us(text: str, cache: dict[str, int]) -> int:
    us = cache.get(text)
    if us is None:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
        us = cache[text] = (delta.days * 86_400 + delta.seconds) * MICROS + delta.microseconds
    return us


def delivery_lateness(received: list[tuple[int, dict]], prefix: str) -> dict:
    """Lateness (receipt - scheduled_at) of every delivery of a job under `prefix`,
    by scheduled time; which field gave the nominal time."""
    cache: dict[str, int] = {}
    by_time: dict[int, list[int]] = {}
    field = "scheduled_at"
    ids_by_time: dict[int, set[str]] = {}
    for at_us, body in received:
        if not body["id"].startswith(prefix):
            continue
        text = body.get("scheduled_at")
        if text is None:
            field, text = "execute_at", body["execute_at"]
        nominal = _stamp_us(text, cache)
        by_time.setdefault(nominal, []).append(at_us - nominal)
        ids_by_time.setdefault(nominal, set()).add(body["id"])
    return {
        "field": field,
        "by_time": {t: sorted(v) for t, v in sorted(by_time.items())},
        "distinct": {t: len(v) for t, v in ids_by_time.items()},
    }


def lateness_run(
    work: Path,
    *,
    recurring: bool,
    jobs: int,
    minutes: int,
    window: int,
    concurrency: int | None,
    max_wait_s: float,
    profile_dir: Path | None,
) -> dict:
    """One fresh server and endpoint: N recurring jobs `* * * * *` with exactly
    `minutes` occurrences each (their `end` is the last one), or N one-shot jobs
    due at one minute boundary. The window ends once the endpoint has received
    nothing more for SETTLE_S after the last due time (or after max_wait_s)."""
    name = "recurring" if recurring else "one-shot"
    case = work / f"lateness-{name}"
    case.mkdir(parents=True, exist_ok=True)
    prefix = "rec." if recurring else "one."
    extra = f"[runners.http]\nconcurrency = {concurrency}\n" if concurrency else ""
    endpoint = Endpoint(case)
    server = Server(case, case / "data", fsync=True, extra=extra)
    try:
        with server:
            ready = server.events("ready")
            metrics_port = ready[-1].get("metrics_port") if ready else None
            pipeline(server.kcp_port, [f"1 RULE SET r {prefix} http {endpoint.url}\n"])
            occurrences = minutes if recurring else 1
            if recurring:
                # scheduled early in a minute, so that every first occurrence is the next
                # boundary (checked on the answers)
                minute = time.time_ns() // 1000 // MINUTE_US * MINUTE_US + MINUTE_US
                wait_until(minute + MICROS)
                first = minute + MINUTE_US
                end = kcp_time(first + (occurrences - 1) * MINUTE_US)
                lines = [
                    f'{i} SCHEDULE {prefix}{i:07d} "* * * * *" "end={end}"\n' for i in range(jobs)
                ]
            else:
                first = next_minute_us(lead_s=15.0 + jobs / 3_000)
                lines = [f'{i} SET {prefix}{i:07d} "{kcp_time(first)}"\n' for i in range(jobs)]
            t0 = time.perf_counter()
            answers = pipeline(server.kcp_port, lines, window)
            load_s = time.perf_counter() - t0
            if recurring:
                nexts = {a.split(" ", 2)[2] for a in answers}
                if nexts != {f'"{kcp_time(first)}"'}:
                    raise RuntimeError(f"first occurrences are not all {kcp_time(first)}: {nexts}")
            expected = jobs * occurrences
            log(
                f"{name}: {jobs:,} jobs in {load_s:.1f}s ({jobs / load_s:,.0f}/s); first due "
                f"{kcp_time(first)}, {occurrences} occurrence(s) to watch"
            )
            if time.time_ns() // 1000 > first - MICROS:
                raise RuntimeError("the jobs were not all set a second before they were due")
            wait_until(first - MICROS)
            cpu0, busy0 = server.cpu_seconds(), machine_cpu()[0]
            end_cpu0 = endpoint.cpu_seconds()
            metrics0 = metric_values(metrics_port, _METRICS)
            hwm0 = server.peak_rss_mib()
            t_start = time.monotonic()
            profiler = (
                Profiler(server.pid, profile_dir / f"{name}.txt", rate=100) if profile_dir else None
            )
            last_due = first + (occurrences - 1) * MINUTE_US
            progress: list[tuple[float, int]] = []
            last_count, last_change = -1, time.monotonic()
            while True:
                time.sleep(0.5)
                count = endpoint.count()
                now_us = time.time_ns() // 1000
                progress.append((round((now_us - first) / MICROS, 1), count))
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                settled = time.monotonic() - last_change >= SETTLE_S
                if now_us > last_due + MICROS and (settled or count >= expected):
                    break
                if time.monotonic() - t_start > max_wait_s:
                    log(f"{name}: stopped waiting after {max_wait_s:.0f} s")
                    break
            t_end = time.monotonic()
            cpu1, busy1 = server.cpu_seconds(), machine_cpu()[0]
            end_cpu1 = endpoint.cpu_seconds()
            metrics1 = metric_values(metrics_port, _METRICS)
            profile = profiler.stop() if profiler else None
            hwm1 = server.peak_rss_mib()
            server_log_lines = len(server.lines)
            httpx_lines = sum(1 for _, line in server.lines if '"HTTP Request: POST' in line)
            sample_httpx_line = next(
                (line for _, line in server.lines if '"HTTP Request: POST' in line), ""
            )
    finally:
        try:
            received = endpoint.stop()
        finally:
            endpoint.kill()
    server_cpu = cpu1 - cpu0
    endpoint_cpu = end_cpu1 - end_cpu0
    found = delivery_lateness(received, prefix)
    watched = [first + k * MINUTE_US for k in range(occurrences)]
    per_occurrence = []
    everything: list[int] = []
    for at in watched:
        values = found["by_time"].get(at, [])
        everything += values
        per_occurrence.append(
            {
                "scheduled": kcp_time(at),
                "delivered": len(values),
                "distinct_jobs": found["distinct"].get(at, 0),
                **summary(values),
            }
        )
    delivered = len(everything)
    triggered = metrics1[_LATENESS_COUNT] - metrics0[_LATENESS_COUNT]
    out = {
        "case": name,
        "jobs": jobs,
        "occurrences": occurrences,
        "expected": expected,
        "delivered": delivered,
        "deliveries_outside_window": len(received) - delivered,
        "nominal_field": found["field"],
        "load_s": load_s,
        "load_per_s": jobs / load_s,
        "lateness": summary(everything),
        "per_occurrence": per_occurrence,
        "window_s": t_end - t_start,
        "last_delivery_s": (max(t for t, _ in received) - first) / MICROS if received else None,
        "jobs_by_status_after": {k.split('"')[1]: v for k, v in metrics1.items() if "{" in k},
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_occurrence": server_cpu / delivered * MICROS if delivered else None,
        "endpoint_cpu_s": endpoint_cpu,
        "other_cpu_s": max(0.0, busy1 - busy0 - server_cpu - endpoint_cpu),
        "trigger_lateness_mean_ms": (
            (metrics1[_LATENESS_SUM] - metrics0[_LATENESS_SUM]) / triggered * 1000
            if triggered
            else None
        ),
        "triggered": triggered,
        "peak_rss_mib_before": hwm0,
        "peak_rss_mib_after": hwm1,
        "server_log_lines": server_log_lines,
        "httpx_log_lines": httpx_lines,
        "sample_httpx_line": sample_httpx_line,
        "http_concurrency": concurrency or "default (64)",
        "progress": progress,
    }
    if profile is not None:
        out["profile"] = top(profile)
        out["profile_file"] = str(profile)
    late = out["lateness"]
    log(
        f"{name}: {delivered:,}/{expected:,} delivered, lateness p50 {late.get('p50_ms', 0):,.0f} "
        f"ms p99 {late.get('p99_ms', 0):,.0f} ms max {late.get('max_ms', 0):,.0f} ms; server "
        f"{server_cpu:.1f} CPU-s ({out['server_cpu_us_per_occurrence'] or 0:,.0f} µs per "
        f"occurrence), endpoint {endpoint_cpu:.1f} CPU-s"
    )
    return out


# -- cron evaluation ---------------------------------------------------------------------

CRON_CASES = (
    ("* * * * *", "UTC"),
    ("30 2 * * *", "Europe/Paris"),
    ("*/15 9-17 * * 1-5", "UTC"),
    ("0 0 29 2 *", "UTC"),
)


def cron_bench(calls: int, repeat: int) -> list[dict]:
    """µs per next occurrence, each call from another instant (no cache can answer)."""
    from zoneinfo import ZoneInfo

    from croniter import croniter
    from cronsim import CronSim

    from kairoi_trio.model import Schedule
    from kairoi_trio.scheduling import occurrences

    uncached = occurrences.next_after.__wrapped__
    base = 1_796_083_200 * MICROS  # 2026-12-01 00:00:00 UTC
    # instants 7,919 s apart (a prime: they fall at every minute, hour and weekday)
    instants = [base + i * 7_919 * MICROS + 123_456 for i in range(calls)]
    rows = []
    for expression, tz in CRON_CASES:
        schedule = Schedule(expression, tz)
        zone = ZoneInfo(tz)
        aware = [datetime.fromtimestamp(t / MICROS, zone) for t in instants]
        naive = [a.replace(tzinfo=None, microsecond=0) for a in aware]

        def run_next_after(schedule: Schedule = schedule) -> list:
            return [uncached(schedule, t) for t in instants]

        def run_croniter(expression: str = expression, aware: list = aware) -> list:
            return [croniter(expression, a).get_next(datetime) for a in aware]

        def run_cronsim(expression: str = expression, naive: list = naive) -> list:
            return [next(CronSim(expression, n)) for n in naive]

        timings = {}
        for label, fn in (
            ("next_after", run_next_after),
            ("croniter", run_croniter),
            ("cronsim", run_cronsim),
        ):
            fn()  # warm (compile_schedule's cache, imports)
            best = min(timeit.repeat(fn, number=1, repeat=repeat))
            timings[label] = best / calls * MICROS
        ours = run_next_after()
        theirs = run_croniter()
        differ = sum(
            1 for a, b in zip(ours, theirs, strict=True) if a != round(b.timestamp() * MICROS)
        )
        rows.append(
            {
                "expression": expression,
                "tz": tz,
                "calls": calls,
                "next_after_us": timings["next_after"],
                "croniter_us": timings["croniter"],
                "cronsim_bare_us": timings["cronsim"],
                "croniter_over_next_after": timings["croniter"] / timings["next_after"],
                "results_differ": differ,
            }
        )
        log(
            f"cron {expression!r} {tz}: next_after {timings['next_after']:.1f} µs, croniter "
            f"{timings['croniter']:.1f} µs, bare cronsim {timings['cronsim']:.1f} µs; "
            f"{differ} of {calls} results differ"
        )
    return rows


# -- restart with N jobs ---------------------------------------------------------------------

# (share, expression, tz): cron expressions shared by many jobs; the rest (15%), `every Ns`
# jobs with a start of their own (a distinct Schedule each).
RESTART_MIX = (
    (0.30, "* * * * *", "UTC"),
    (0.20, "*/5 * * * *", "UTC"),
    (0.10, "@hourly", "UTC"),
    (0.10, "30 2 * * *", "Europe/Paris"),
    (0.10, "*/15 9-17 * * 1-5", "America/New_York"),
    (0.05, "0 9 * * 1-5", "Europe/Paris"),
)
INTERVALS_S = (30, 60, 90, 300, 900, 3600)


def write_store(directory: Path, recurring: bool, jobs: int, seed: int = 1) -> dict:
    """A data directory holding `jobs` planned jobs and one http rule, as a snapshot.

    Times are planned from a day ahead, so that nothing comes due (and no
    misfire is handled) while the restarts are measured. Ids `job.<7 digits>`
    and empty payloads for both kinds."""
    import logging

    import structlog
    import trio

    from kairoi_trio.model import HttpRunner, Rule, Schedule, Status, new_job
    from kairoi_trio.scheduling.planner import Planner
    from kairoi_trio.storage.log import DurableLog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rng = random.Random(seed)
    plan_now = time.time_ns() // 1000 + 86_400 * MICROS
    planner = Planner(started_at=plan_now)
    rule = Rule("r", "job.", HttpRunner("http://127.0.0.1:9/hook"))
    started = time.perf_counter()
    store = {}
    kinds: dict[str, int] = {}
    if recurring:
        shared = [(share, Schedule(expr, tz)) for share, expr, tz in RESTART_MIX]
        cut = []
        total = 0.0
        for share, mixed in shared:
            total += share
            cut.append((total, mixed))
        for i in range(jobs):
            job_id = f"job.{i:07d}"
            x = rng.random()
            schedule = next((s for limit, s in cut if x < limit), None)
            if schedule is None:
                every = rng.choice(INTERVALS_S)
                start = plan_now + rng.randrange(every * MICROS)
                schedule = Schedule(f"every {every}s", start=start)
                kinds["every Ns (own start)"] = kinds.get("every Ns (own start)", 0) + 1
            else:
                key = f"{schedule.expression} {schedule.tz}"
                kinds[key] = kinds.get(key, 0) + 1
            store[job_id] = planner.first(job_id, schedule, b"", plan_now)
    else:
        planned = Status.PLANNED
        for i in range(jobs):
            job_id = f"job.{i:07d}"
            at = plan_now + rng.randrange(30 * 86_400 * MICROS)
            store[job_id] = new_job(job_id, at, planned, b"", 0, "", plan_now)
        kinds["one-shot"] = jobs
    built_s = time.perf_counter() - started

    async def write() -> None:
        durable = DurableLog(directory, fsync=False)
        await trio.to_thread.run_sync(durable.load)
        await durable.compact(store, {rule.id: rule})
        await durable.aclose()

    trio.run(write)
    size = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
    log(
        f"wrote {jobs:,} {'recurring' if recurring else 'one-shot'} jobs to {directory} "
        f"({built_s:.1f}s to build, {size:.0f} MiB)"
    )
    return {"jobs": jobs, "mix": kinds, "data_mib": size, "build_s": built_s}


def restart_bench(work: Path, jobs: int, times: int) -> dict:
    out: dict = {"jobs": jobs}
    for recurring in (False, True):
        name = "recurring" if recurring else "one-shot"
        source = work / f"store-{name}"
        written = write_store(source, recurring, jobs)
        runs = restarts(work, source, times)
        out[name] = {**written, "runs": runs}
        import shutil

        shutil.rmtree(source, ignore_errors=True)
    out["empty_start"] = empty_start(work)
    rec = min(r["rss_mib_2s_later"] for r in out["recurring"]["runs"])
    one = min(r["rss_mib_2s_later"] for r in out["one-shot"]["runs"])
    out["extra_bytes_per_recurring_job"] = (rec - one) * 2**20 / jobs
    hwm_rec = min(r["peak_rss_mib_2s_later"] for r in out["recurring"]["runs"])
    hwm_one = min(r["peak_rss_mib_2s_later"] for r in out["one-shot"]["runs"])
    out["extra_peak_bytes_per_recurring_job"] = (hwm_rec - hwm_one) * 2**20 / jobs
    log(
        f"restart: recurring jobs cost {out['extra_bytes_per_recurring_job']:.0f} bytes of RSS "
        f"more than one-shot ones ({out['extra_peak_bytes_per_recurring_job']:.0f} of VmHWM)"
    )
    return out


# -- report ----------------------------------------------------------------------------------


def _ms(d: dict, key: str) -> str:
    v = d.get(key)
    return f"{v:,.0f}" if v is not None else "-"


def report(results: dict) -> str:
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    add(f"Date {m['date']}; {m['nproc']} CPUs, {m['cpu']}; Python {m['python']}")
    add(f"Memory: {m['memory'].splitlines()[1] if m['memory'] else ''}")
    add(f"Command: {results['command']}")
    add(
        f"Code: commit {m['commit']} ({m['src_modified_files']} uncommitted files under src/); "
        f"load average at start {' '.join(m['loadavg'])}, at end {results.get('loadavg_end')}"
    )
    if "lateness" in results:
        runs = results["lateness"]
        add("")
        add(
            f"HTTP runner, {runs[0]['jobs']:,} jobs, lateness = receipt at the endpoint - "
            f"{runs[0]['nominal_field']} (ms)"
        )
        add("")
        add(
            "| case | due at | delivered | p50 ms | p99 ms | max ms | server CPU s | "
            "server CPU µs / occurrence | endpoint CPU s | other CPU s | trigger lateness mean ms |"
        )
        add("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            late = r["lateness"]
            add(
                f"| {r['case']} | {r['occurrences']} minute(s) | {r['delivered']:,} / "
                f"{r['expected']:,} | {_ms(late, 'p50_ms')} | {_ms(late, 'p99_ms')} | "
                f"{_ms(late, 'max_ms')} | {r['server_cpu_s']:.1f} | "
                f"{r['server_cpu_us_per_occurrence'] or 0:,.0f} | {r['endpoint_cpu_s']:.1f} | "
                f"{r['other_cpu_s']:.1f} | {_ms(r, 'trigger_lateness_mean_ms')} |"
            )
            if r["occurrences"] > 1:
                for o in r["per_occurrence"]:
                    add(
                        f"| - occurrence {o['scheduled']} | | {o['delivered']:,} | "
                        f"{_ms(o, 'p50_ms')} | {_ms(o, 'p99_ms')} | {_ms(o, 'max_ms')} | | | | | |"
                    )
        for r in runs:
            add(
                f"{r['case']}: {r['load_per_s']:,.0f} "
                f"{'SCHEDULE' if r['case'] == 'recurring' else 'SET'}/s; "
                f"last delivery {r['last_delivery_s']:.1f} s after the first due time; "
                f"deliveries outside the watched times {r['deliveries_outside_window']:,}; jobs "
                f"after: {r['jobs_by_status_after']}; VmHWM {r['peak_rss_mib_before']:.0f} -> "
                f"{r['peak_rss_mib_after']:.0f} MiB; http concurrency {r['http_concurrency']}; "
                f"server log lines {r['server_log_lines']:,} (httpx 'HTTP Request' lines "
                f"{r['httpx_log_lines']:,})"
            )
            if "profile" in r:
                add(f"  py-spy ({r['profile']['samples']} samples), self:")
                for name, share in r["profile"]["self"][:10]:
                    add(f"    {share * 100:5.1f}%  {name}")
                add("  inclusive (kairoi_trio):")
                shown = [(n, v) for n, v in r["profile"]["inclusive"] if "kairoi_trio/" in n]
                for name, share in shown[:12]:
                    add(f"    {share * 100:5.1f}%  {name}")
    if "cron" in results:
        add("")
        add("Next occurrence, µs per call (best of the repeats), each call from another instant")
        add("")
        add(
            "| expression | zone | next_after uncached (cronsim) | croniter | croniter / "
            "next_after | bare cronsim | results differ |"
        )
        add("|---|---|---:|---:|---:|---:|---:|")
        for r in results["cron"]:
            add(
                f"| `{r['expression']}` | {r['tz']} | {r['next_after_us']:.1f} | "
                f"{r['croniter_us']:.1f} | {r['croniter_over_next_after']:.1f}x | "
                f"{r['cronsim_bare_us']:.1f} | {r['results_differ']} / {r['calls']} |"
            )
    if "restart" in results:
        rs = results["restart"]
        add("")
        add(f"Restart to ready with {rs['jobs']:,} planned jobs (snapshot written directly)")
        add("")
        add(
            "| store | # | ready s | log load s | replay+index s | VmHWM at ready MiB | "
            "VmHWM 2 s later MiB | VmRSS 2 s later MiB |"
        )
        add("|---|---|---:|---:|---:|---:|---:|---:|")
        for name in ("one-shot", "recurring"):
            for i, r in enumerate(rs[name]["runs"], 1):
                add(
                    f"| {name} | {i} | {r['ready_s']:.2f} | {r['load_s']} | {r['replay_s']} | "
                    f"{r['peak_rss_mib_at_ready']:.0f} | {r['peak_rss_mib_2s_later']:.0f} | "
                    f"{r['rss_mib_2s_later']:.0f} |"
                )
        add(f"Recurring mix: {rs['recurring']['mix']}")
        add(
            f"Data: one-shot {rs['one-shot']['data_mib']:.0f} MiB, recurring "
            f"{rs['recurring']['data_mib']:.0f} MiB; empty store ready in "
            f"{rs['empty_start']['ready_s']:.2f} s, "
            f"VmHWM {rs['empty_start']['peak_rss_mib_at_ready']:.0f} MiB"
        )
        add(
            "RSS per recurring job minus per one-shot job: "
            f"{rs['extra_bytes_per_recurring_job']:.0f} bytes (VmRSS), "
            f"{rs['extra_peak_bytes_per_recurring_job']:.0f} bytes (VmHWM)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_endpoint"]:
        return endpoint_main(Path(argv[1]))
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recurring_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "what", nargs="?", default="all", choices=["all", "lateness", "cron", "restart"]
    )
    parser.add_argument("--jobs", type=int, default=5_000, help="jobs of the lateness runs")
    parser.add_argument(
        "--minutes", type=int, default=2, help="occurrences watched of each recurring job"
    )
    parser.add_argument("--window", type=int, default=10_000, help="KCP requests outstanding")
    parser.add_argument(
        "--http-concurrency", type=int, help="[runners.http] concurrency (default: the server's)"
    )
    parser.add_argument(
        "--case", choices=["both", "one-shot", "recurring"], default="both", help="lateness runs"
    )
    parser.add_argument(
        "--max-wait", type=float, default=3600, help="seconds to wait for the deliveries at most"
    )
    parser.add_argument(
        "--restart-jobs", type=int, default=100_000, help="jobs in each restart store"
    )
    parser.add_argument("--restarts", type=int, default=2, help="starts of each store")
    parser.add_argument("--cron-calls", type=int, default=2_000, help="calls per timing")
    parser.add_argument("--cron-repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="py-spy the lateness runs")
    parser.add_argument("--workdir", type=Path, help="where data goes (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="kairoi-recurring-"))
    work.mkdir(parents=True, exist_ok=True)
    profile_dir = work / "profiles" if args.profile else None
    if profile_dir:
        profile_dir.mkdir(exist_ok=True)
    results: dict = {
        "machine": machine(),
        "command": " ".join(["python -m benchmarks.recurring_bench", *argv]),
    }
    started = time.monotonic()
    try:
        if args.what in ("all", "cron"):
            results["cron"] = cron_bench(args.cron_calls, args.cron_repeat)
        if args.what in ("all", "lateness"):
            results["lateness"] = [
                lateness_run(
                    work,
                    recurring=recurring,
                    jobs=args.jobs,
                    minutes=args.minutes,
                    window=args.window,
                    concurrency=args.http_concurrency,
                    max_wait_s=args.max_wait,
                    profile_dir=profile_dir,
                )
                for recurring in (False, True)
                if args.case in ("both", "recurring" if recurring else "one-shot")
            ]
        if args.what in ("all", "restart"):
            results["restart"] = restart_bench(work, args.restart_jobs, args.restarts)
    finally:
        if not args.keep:
            import shutil

            for child in work.iterdir():
                if child != profile_dir:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            if profile_dir is None:
                shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = f"{load_average():.2f}"
    results["total_s"] = time.monotonic() - started
    print(report(results))
    print(f"\n(total {results['total_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if profile_dir:
        print(f"py-spy raw profiles kept in {profile_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
