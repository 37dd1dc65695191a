"""The amqp runner end to end: N jobs due at one instant, published to a private RabbitMQ.

    .venv/bin/python -m benchmarks.amqp_bench [--jobs 50000] [--no-fsync] [--profile out.txt]

What happens:
1. A private RabbitMQ node is started for the run (tests/amqp_broker.py:
   scripts/rabbitmq.sh, a free port, its own epmd and temporary directory) and
   stopped at exit; a broker already running (say on 5672) is never used or
   touched. With KAIROI_TEST_RABBITMQ_* set (`eval "$(scripts/rabbitmq.sh env
   DIR)"`), the node started in DIR is used instead, and left running. A fresh
   durable direct exchange and a durable queue bound to it are declared (and
   deleted at the end).
2. A real `kairoi-trio serve` process starts (port 0 everywhere, JSON log).
3. One KCP connection sets the rule (`amqp`, guest@127.0.0.1) and then the N
   jobs, pipelined in chunks of 2,000, all with the SAME due time T, chosen
   `--lead` seconds ahead so that every SET is stored before T.
4. From T on, the server publishes every job (persistent message, publisher
   confirms) and logs one "job run" event per job when its run ends, i.e. right
   after the broker's confirm arrived.

What is measured:
- confirm time of a job: the structlog `timestamp` of its "job run" event
  (wall clock, microseconds, UTC), logged by the pool right after
  `AmqpRunnerBackend.run` returned, i.e. after the broker's confirm;
- lateness of a job = its confirm time - T (the due time), so it includes the
  dispatcher's wake-up, the actor's TriggerDue batches, the `triggered` record's
  write (and fsync), the wait in the amqp pool's queue for one of its
  `concurrency` workers, and the publish + confirm round trip;
  p50 / p99 / max over all N jobs;
- jobs/s end to end = N / (last confirm time - T);
- `run` duration p50/p99: the event's `seconds` (publish -> confirm only);
- CPU: utime+stime from /proc/<pid>/stat of the server process and of the
  broker's beam.smp, sampled just before T and once every job is `executed`
  (all outcomes recorded); divided by N. The node serves the benchmark only.
- After the run: every job is checked `executed` over KCP and the queue is
  consumed: it must hold exactly N messages with N distinct ids.

Only 127.0.0.1 is contacted. Every wait is bounded; the server is stopped and
the exchange and queue deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import amqp_broker as broker  # noqa: E402

from benchmarks.server import (  # noqa: E402
    cpu_model,
    events_named,
    jobs_by_status,
    thread_cpu_seconds,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHUNK = 2000
READY_TIMEOUT_S = 60.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine(rabbit: str) -> dict:
    cpu = cpu_model()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rabbitmq": rabbit,
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
    }


# -- the server


RUN_EVENT = '"job run"'


class Server:
    def __init__(self, workdir: Path, *, fsync: bool, concurrency: int, extra: str = "") -> None:
        self.workdir = workdir
        self.config = workdir / "configuration.toml"
        self.config.write_text(
            '[log]\nlevel = "info"\nformat = "json"\n'
            '[controller]\nlisten = "127.0.0.1:0"\n'
            "[grpc]\nenabled = false\n"
            '[http]\nlisten = "127.0.0.1:0"\n'  # GET /api/v1/info: the counts
            f"[database]\nfsync_on_persist = {'true' if fsync else 'false'}\n"
            f'[storage]\ndirectory = "{workdir / "data"}"\n'
            f"[runners.amqp]\nconcurrency = {concurrency}\n"
            "[shutdown]\ngrace_period_s = 5.0\n" + extra.replace("\\n", "\n") + "\n"
        )
        self.lines: list[str] = []
        self.kcp_port = 0
        self.http_port = 0
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(self.config)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if not self._ready.is_set() and '"ready"' in line:
                event = json.loads(line)
                self.kcp_port = event["kcp_port"]
                self.http_port = event["http_port"]
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def jobs_by_status(self) -> dict[str, int]:
        """The job counts by status (`GET /api/v1/info`): a cheap poll."""
        return jobs_by_status(self.http_port)

    def count(self, needle: str) -> int:
        return sum(1 for line in list(self.lines) if needle in line)

    def events(self, name: str) -> list[dict]:
        return events_named(list(self.lines), name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Kcp:
    """Pipelined KCP requests on one socket: `<id> <args...>` lines, answers in order."""

    def __init__(self, port: int) -> None:
        from kairoi_trio.protocols.kcp.codec import KcpParser

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.parser = KcpParser()
        self.pending: list = []
        self.next_id = 0

    def pipeline(self, requests: list[list[str]]) -> list[list[str]]:
        from kairoi_trio.protocols.kcp.codec import encode_message

        out = bytearray()
        for args in requests:
            self.next_id += 1
            out += encode_message(str(self.next_id), args)
        self.sock.sendall(bytes(out))
        answers: list[list[str]] = []
        while len(answers) < len(requests):
            while not self.pending:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("server closed the KCP connection")
                self.parser.feed(data)
                self.pending.extend(self.parser.events())
            answers.append(self.pending.pop(0).args)
        return answers

    def close(self) -> None:
        self.sock.close()


# -- the measurement


def kcp_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ensure_broker() -> str:
    """Start the private node (once); answer its RabbitMQ version."""
    if not broker.EXTERNAL:
        log(f"starting a private RabbitMQ node on 127.0.0.1:{broker.PORT}")
    broker.ensure_broker()
    admin = broker.Admin()
    try:
        return str(admin.server_properties.get("version", "?"))
    finally:
        admin.close()


def floor(n: int, window: int) -> dict:
    """The same n messages by a bare pamqp publisher (benchmarks/amqp_floor.py) in a
    process of its own, on a route of its own: its rate and the broker's CPU per message."""
    beam = broker.beam_pid()
    admin = broker.Admin()
    route = broker.make_route(admin, "floor")
    admin.close()
    try:
        beam0 = cpu_seconds(beam)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.amqp_floor",
                f"--port={broker.PORT}",
                f"--exchange={route.exchange}",
                f"--routing-key={route.routing_key}",
                f"--count={n}",
                f"--window={window}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        result = dict(json.loads(done.stdout))
        result["broker_cpu_us_per_message"] = round((cpu_seconds(beam) - beam0) / n * 1e6, 1)
        result["client_cpu_us_per_message"] = round(result["client_cpu_s"] / n * 1e6, 1)
        return result
    finally:
        broker.remove_route(route)


def run(args: argparse.Namespace) -> dict:
    n = args.jobs
    broker.ensure_broker()  # started by main(); idempotent
    beam = broker.beam_pid()
    admin = broker.Admin()
    route = broker.make_route(admin, "bench")
    admin.close()
    workdir = Path(tempfile.mkdtemp(prefix="kairoi-amqp-bench-"))
    server = Server(
        workdir, fsync=not args.no_fsync, concurrency=args.concurrency, extra=args.config
    )
    profiler = None
    try:
        kcp = Kcp(server.kcp_port)
        rule = ["RULE", "SET", "bench", "bench.", "amqp", broker.URL, route.exchange, "rk"]
        assert kcp.pipeline([rule]) == [["OK"]]
        due = time.time() + args.lead
        due_text = kcp_time(due)
        due = datetime.strptime(due_text + "+0000", "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
        ids = [f"bench.{i:06d}" for i in range(n)]
        log(f"setting {n} jobs due at {due_text} UTC")
        started = time.time()
        for start in range(0, n, CHUNK):
            answers = kcp.pipeline([["SET", i, due_text] for i in ids[start : start + CHUNK]])
            bad = [a for a in answers if a != ["OK"]]
            if bad:
                raise RuntimeError(f"SET failed: {bad[:3]}")
        set_s = time.time() - started
        if time.time() > due - 0.3:
            raise RuntimeError(f"the SETs took {set_s:.1f}s, past the due time: raise --lead")
        log(f"set in {set_s:.2f}s ({n / set_s:,.0f}/s); waiting for the due time")
        time.sleep(max(0.0, due - 0.2 - time.time()))
        server_cpu0, beam_cpu0 = cpu_seconds(server.pid), cpu_seconds(beam)
        threads0 = thread_cpu_seconds(server.pid)
        if args.profile:
            profiler = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "-f",
                    "raw",
                    "-r",
                    "200",
                    "-o",
                    args.profile,
                    "--pid",
                    str(server.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + args.timeout
        while server.count(RUN_EVENT) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {server.count(RUN_EVENT)} of {n} runs in"
                    f" {args.timeout}s; jobs by status {server.jobs_by_status()}; last lines:\n"
                    + "\n".join(server.lines[-20:])
                )
            if server.process.poll() is not None:
                raise RuntimeError("server died:\n" + "\n".join(server.lines[-30:]))
            time.sleep(0.1)
        runs_done = time.time()
        # Outcomes are recorded after the log line: wait until every job is executed,
        # polling the counts (30,000 GETs a round would be most of the CPU measured).
        while time.monotonic() < deadline:
            counts = server.jobs_by_status()
            if counts.get("executed", 0) >= n or counts.get("triggered", 0) == 0:
                break
            time.sleep(0.05)
        server_cpu = cpu_seconds(server.pid) - server_cpu0
        threads = thread_cpu_seconds(server.pid)
        thread_us = {
            name: round((cpu - threads0.get(name, 0.0)) / n * 1e6, 1)
            for name, cpu in sorted(threads.items(), key=lambda item: -item[1])
        }
        beam_cpu = cpu_seconds(beam) - beam_cpu0
        if profiler is not None:  # the run phase only: not the GETs that check it
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        statuses: Counter[str] = Counter()
        for start in range(0, n, CHUNK):  # then each job's own status
            for answer in kcp.pipeline([["GET", i] for i in ids[start : start + CHUNK]]):
                statuses[answer[1] if answer[0] == "OK" else "error"] += 1
        executed_seen = time.time()
        kcp.close()

        events = server.events("job run")
        confirms = [
            datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            for e in events
        ]
        lateness = [c - due for c in confirms]
        durations = [e["seconds"] for e in events]
        ok = sum(1 for e in events if e["ok"])
        last = max(confirms)
        outcomes = Counter(e["outcome"] for e in events if not e["ok"])

        admin = broker.Admin()
        queued = admin.message_count(route.queue)
        messages = admin.consume(route.queue, n, timeout=30)
        admin.close()
        distinct = len({m.body for m in messages})
        return {
            "jobs": n,
            "fsync": not args.no_fsync,
            "concurrency": args.concurrency,
            "extra_config": args.config,
            "set_per_s": round(n / set_s),
            "runs_ok": ok,
            "failed_outcomes": dict(outcomes.most_common(5)),
            "statuses": dict(statuses),
            "queue_messages": queued,
            "consumed": len(messages),
            "distinct_ids": distinct,
            "first_confirm_s": round(min(confirms) - due, 4),
            "last_confirm_s": round(last - due, 3),
            "all_executed_s": round(executed_seen - due, 3),
            "runs_logged_seen_s": round(runs_done - due, 3),
            "jobs_per_s": round(n / (last - due)),
            "lateness_p50_s": round(statistics.median(lateness), 4),
            "lateness_p99_s": round(pct(lateness, 0.99), 4),
            "lateness_max_s": round(max(lateness), 4),
            "run_p50_ms": round(statistics.median(durations) * 1000, 2),
            "run_p99_ms": round(pct(durations, 0.99) * 1000, 2),
            "server_cpu_s": round(server_cpu, 2),
            "server_cpu_us_per_job": round(server_cpu / n * 1e6, 1),
            "server_thread_cpu_us_per_job": thread_us,
            "broker_cpu_s": round(beam_cpu, 2),
            "broker_cpu_us_per_job": round(beam_cpu / n * 1e6, 1),
        }
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
        server.stop()
        server.kill()
        try:
            broker.remove_route(route)
        except Exception as error:  # noqa: BLE001 - cleanup must not hide the result
            log(f"could not delete {route}: {error}")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def hotspots(path: str, limit: int = 15) -> list[tuple[str, float, float]]:
    """(frame, self share, inclusive share) from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return []
    return [(f, own[f] / total, inclusive[f] / total) for f, _ in own.most_common(limit)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--lead", type=float, default=6.0, help="seconds from now to the due time")
    parser.add_argument("--concurrency", type=int, default=2048, help="[runners.amqp] concurrency")
    parser.add_argument("--no-fsync", action="store_true", help="fsync_on_persist = false")
    parser.add_argument(
        "--config",
        default="",
        help=r"extra TOML tables for the server, e.g. '[runners.shell]\nqueue_size = 1'",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="bound on the run phase")
    parser.add_argument("--profile", metavar="OUT", help="py-spy record -f raw into OUT")
    parser.add_argument("--keep", action="store_true", help="keep the server's directory")
    args = parser.parse_args(argv)
    info = machine(ensure_broker())
    log(f"machine: {info}")
    log(f"floor: a bare pamqp publisher, {args.jobs:,} messages, {args.concurrency:,} in flight")
    bare = floor(args.jobs, args.concurrency)
    log(f"floor: {bare}")
    result = run(args)
    result["floor"] = bare
    result["machine"] = info
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    if args.profile:
        print(f"\nhotspots ({args.profile}): self / inclusive share of samples")
        for frame, own, inclusive in hotspots(args.profile):
            print(f"  {own:6.1%} {inclusive:6.1%}  {frame}")
    ok = (
        result["runs_ok"] == result["jobs"]
        and result["distinct_ids"] == result["jobs"] == result["consumed"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
