"""The shell runner against its floor, `os.posix_spawn` of the same script (issue 12).

    .venv/bin/python -m benchmarks.shell_bench [--repeat 3] [--burst 1000] [--lateness 200]
                                               [--no-fsync] [--profile DIR] [--config TOML]

Every run of the script records its own start: the rule's command is a script
`exec <stamp> "$1"`, where `stamp` is a tiny C program (compiled here with `cc`;
`date +%s.%N` when there is no compiler) that appends `<id> <CLOCK_REALTIME>` to
a file. So a run's time includes spawning `sh`, `sh` reading the script and
exec'ing `stamp`: the script's own clock, as a user's script would see it. The
floor runs the very same script with the same argv shape (`sh -- <script> <id>`)
and environment size, in a session of its own, stdin /dev/null, stdout+stderr on
a pipe: the least that does the same work. Each part measures the server and its
floor in the same run, one after the other, so that machine noise cancels.

(a) burst: N jobs (1,000) due at one instant T on one rule, set over KCP ahead of
    T. Reported: T -> first and last script start, for the server and for a tight
    `os.posix_spawn` loop started at its own T (pipes kept open, then every child
    reaped), and the ratio last/last.
(b) lateness: M jobs (200) due 100 ms apart. Reported: p50/p99/max of (script
    start - due time). The floor sleeps until each due time, spawns once, and is
    measured the same way (its "lateness" is one bare posix_spawn's latency plus
    the sleep's wake-up); 50 ms apart, it is idle between spawns too.

The real server (`python -m kairoi_trio serve`, default config except ports and
`--no-fsync`/`--config`) is started once and serves every repetition.
Only 127.0.0.1 is contacted; files go to a temporary directory removed at the end.
With `--profile DIR`, py-spy records the server during each server part (raw
collapsed stacks in DIR, hot spots printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.amqp_bench import Kcp, kcp_time
from benchmarks.profile import Profiler, top
from benchmarks.server import Server, cpu_model, load_average, loop_cpu_seconds

STAMP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    char line[256];
    int n = snprintf(line, sizeof line, "%s %lld.%09ld\n", argc > 2 ? argv[2] : "-",
                     (long long)now.tv_sec, now.tv_nsec);
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0 || write(fd, line, n) != n) return 1;
    return 0;
}
"""

SETTLE_S = 1.0  # idle before each part, so that one part's tail does not hit the next


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Script:
    """The script every run executes, and the file its runs stamp."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        stamp = directory / "stamp"
        source = directory / "stamp.c"
        source.write_text(STAMP_C)
        self.stamp_kind = "C stamp (clock_gettime)"
        built = False
        for flags in (["-O2", "-static"], ["-O2"]):
            cc = shutil.which("cc")
            if cc and subprocess.run([cc, *flags, "-o", str(stamp), str(source)]).returncode == 0:
                built = True
                self.stamp_kind += " static" if "-static" in flags else " dynamic"
                break
        self.path = directory / "run.sh"
        self.stamps = directory / "stamps"
        if built:
            self.path.write_text(f'exec {stamp} {self.stamps} "$1"\n')
        else:
            self.stamp_kind = "date +%s.%N"
            self.path.write_text(f'echo "$1 $(date +%s.%N)" >> {self.stamps}\n')
        self.path.chmod(0o755)

    def clear(self) -> None:
        self.stamps.unlink(missing_ok=True)

    def read(self, prefix: str) -> dict[str, float]:
        """id -> stamp, of the runs whose id starts with prefix."""
        found: dict[str, float] = {}
        try:
            text = self.stamps.read_text()
        except FileNotFoundError:
            return found
        for line in text.splitlines():
            job_id, _, at = line.rpartition(" ")
            if job_id.startswith(prefix):
                found.setdefault(job_id, float(at))
        return found

    def wait_for(self, prefix: str, n: int, timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.read(prefix)
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(found)} of {n} runs of {prefix!r} in {timeout}s")
            time.sleep(0.05)


# -- the floor: os.posix_spawn in this process


class Floor:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.sh = shutil.which("sh") or "/bin/sh"
        # The server's environment size: its own plus the four KAIROI_* variables.
        self.env = dict(os.environ)
        self.env.update(
            KAIROI_SCHEDULED_AT="2026-01-01T00:00:00.000000Z",
            KAIROI_SCRIPT_GUARD="0123456789abcdef.0",
        )

    def spawn(self, job_id: str) -> tuple[int, int]:
        """One run: (pid, read end of its stdout+stderr pipe)."""
        read, write = os.pipe()
        env = dict(self.env, KAIROI_JOB_ID=job_id)
        try:
            pid = os.posix_spawn(
                self.sh,
                ["sh", "--", str(self.script.path), job_id],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write, 1),
                    (os.POSIX_SPAWN_DUP2, write, 2),
                ],
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # as the runner does
            )
        finally:
            os.close(write)
        return pid, read

    @staticmethod
    def reap(runs: list[tuple[int, int]]) -> None:
        for pid, read in runs:
            os.waitpid(pid, 0)
            os.close(read)

    def burst(self, prefix: str, n: int) -> float:
        """Spawn n runs in a tight loop from T; answer T."""
        ids = [f"{prefix}{i:06d}" for i in range(n)]
        due = time.time() + 0.2
        time.sleep(due - time.time())
        runs = [self.spawn(job_id) for job_id in ids]
        self.reap(runs)
        return due

    def lateness(self, prefix: str, m: int, gap_s: float) -> dict[str, float]:
        """One spawn per due time; answer id -> due time."""
        first = time.time() + 0.2
        dues = {}
        for i in range(m):
            job_id = f"{prefix}{i:06d}"
            due = first + i * gap_s
            time.sleep(max(0.0, due - time.time()))
            self.reap([self.spawn(job_id)])
            dues[job_id] = due
        return dues


# -- the server


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.script = Script(workdir)
        self.floor = Floor(self.script)
        self.server = Server(
            workdir / "server",
            workdir / "server" / "data",
            fsync=not args.no_fsync,
            extra=args.config.replace("\\n", "\n") + "\n",
        )
        self.kcp: Kcp | None = None
        self.profiles: list[Path] = []

    def start(self) -> None:
        self.server.start()
        self.kcp = Kcp(self.server.kcp_port)
        for prefix in ("b", "l"):
            answer = self.kcp.pipeline(
                [["RULE", "SET", prefix, f"{prefix}.", "shell", str(self.script.path)]]
            )
            assert answer == [["OK"]], answer

    def stop(self) -> None:
        if self.kcp is not None:
            self.kcp.close()
        self.server.stop()
        self.server.kill()

    def _set(self, jobs: list[tuple[str, float]]) -> None:
        assert self.kcp is not None
        for start in range(0, len(jobs), 2000):
            answers = self.kcp.pipeline(
                [["SET", job_id, kcp_time(at)] for job_id, at in jobs[start : start + 2000]]
            )
            bad = [a for a in answers if a != ["OK"]]
            if bad:
                raise RuntimeError(f"SET failed: {bad[:3]}")

    def _profile(self, name: str) -> Profiler | None:
        if not self.args.profile:
            return None
        path = Path(self.args.profile) / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.profiles.append(path)
        return Profiler(self.server.pid, path, rate=200)

    def _wait_runs(self, n_before: int, n: int, timeout: float) -> None:
        """Until the server logged n more "job run" events (the runs ended)."""
        deadline = time.monotonic() + timeout
        while len(self.server.events("job run")) < n_before + n:
            if time.monotonic() > deadline:
                raise RuntimeError("the server's runs did not end:\n" + self.server.log_text())
            time.sleep(0.05)

    @staticmethod
    def _due(at: float) -> float:
        """A time as KCP carries it (microseconds), as a float."""
        text = kcp_time(at)
        return datetime.strptime(text + "+0000", "%Y-%m-%d %H:%M:%S.%f%z").timestamp()

    def server_burst(self, rep: int, n: int) -> dict:
        prefix = f"b.{rep}."
        due = self._due(time.time() + 1.0 + n / 2_000)  # SET of 1,000 takes ~0.1 s idle
        runs_before = len(self.server.events("job run"))
        self._set([(f"{prefix}{i:06d}", due) for i in range(n)])
        if time.time() > due - 0.1:
            raise RuntimeError("the SETs took too long: jobs were due before all were set")
        profiler = self._profile(f"burst-{rep}")
        cpu_before = self.server.cpu_seconds()
        loop_before = loop_cpu_seconds(self.server.pid)
        stamps = self.script.wait_for(prefix, n, timeout=60 + n / 50)
        self._wait_runs(runs_before, n, timeout=30)
        cpu = self.server.cpu_seconds() - cpu_before
        loop = loop_cpu_seconds(self.server.pid) - loop_before
        if profiler is not None:
            profiler.stop()
        failed = [e for e in self.server.events("job run")[runs_before:] if not e["ok"]]
        if failed:
            raise RuntimeError(f"{len(failed)} runs failed, e.g. {failed[0]}")
        starts = sorted(at - due for at in stamps.values())
        return {
            "first_ms": ms(starts[0]),
            "last_ms": ms(starts[-1]),
            "p50_ms": ms(starts[n // 2]),
            # the server's CPU (all threads) from before T to the last "job run" line
            "cpu_us_per_job": round(cpu / n * 1e6),
            "loop_cpu_us_per_job": round(loop / n * 1e6),  # its event loop's thread alone
        }

    def floor_burst(self, rep: int, n: int) -> dict:
        prefix = f"fb.{rep}."
        before = resource.getrusage(resource.RUSAGE_SELF)
        due = self.floor.burst(prefix, n)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        stamps = self.script.wait_for(prefix, n, timeout=30)
        starts = sorted(at - due for at in stamps.values())
        return {
            "first_ms": ms(starts[0]),
            "last_ms": ms(starts[-1]),
            "p50_ms": ms(starts[n // 2]),
            "cpu_us_per_job": round(cpu / n * 1e6),  # this process's, spawning and reaping
        }

    def server_lateness(self, rep: int, m: int, gap_s: float) -> dict:
        prefix = f"l.{rep}."
        first = time.time() + 1.0
        dues = {f"{prefix}{i:06d}": self._due(first + i * gap_s) for i in range(m)}
        runs_before = len(self.server.events("job run"))
        self._set(list(dues.items()))
        profiler = self._profile(f"lateness-{rep}")
        stamps = self.script.wait_for(prefix, m, timeout=m * gap_s + 30)
        self._wait_runs(runs_before, m, timeout=30)
        if profiler is not None:
            profiler.stop()
        result = summary([stamps[i] - due for i, due in dues.items()])
        # Where the time goes: the pool's "job run" line gives when the run began
        # (its timestamp minus its seconds), before the spawn.
        began = {
            e["job"]: datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            - e["seconds"]
            for e in self.server.events("job run")[runs_before:]
        }
        pool = [began[i] - due for i, due in dues.items() if i in began]
        if pool:
            result["run_began_p50_ms"] = ms(statistics.median(pool))
            result["run_began_p99_ms"] = ms(pct(pool, 0.99))
        return result

    def floor_lateness(self, rep: int, m: int, gap_s: float) -> dict:
        prefix = f"fl.{rep}."
        dues = self.floor.lateness(prefix, m, gap_s)
        stamps = self.script.wait_for(prefix, m, timeout=30)
        return summary([stamps[i] - due for i, due in dues.items()])


def summary(lateness: list[float]) -> dict:
    return {
        "p50_ms": ms(statistics.median(lateness)),
        "p99_ms": ms(pct(lateness, 0.99)),
        "max_ms": ms(max(lateness)),
    }


def machine() -> dict:
    cpu = cpu_model()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burst", type=int, default=1000, help="jobs due at one instant")
    parser.add_argument("--lateness", type=int, default=200, help="jobs due --gap apart")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between due times")
    parser.add_argument("--no-fsync", action="store_true", help="fsync_on_persist = false")
    parser.add_argument(
        "--config", default="", help=r"extra TOML, e.g. '[runners.shell]\nconcurrency = 64'"
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy record the server into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the floor keeps N pipes open
    wanted = 2 * args.burst + 100
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="kairoi-shell-bench-"))
    bench = Bench(args, workdir)
    log(f"machine: {json.dumps(info)}; script clock: {bench.script.stamp_kind}")
    results: list[dict] = []
    try:
        bench.start()
        log(f"server ready (pid {bench.server.pid}, fsync {'off' if args.no_fsync else 'on'})")
        for rep in range(1, args.repeat + 1):
            row: dict = {"rep": rep}
            if args.burst:
                time.sleep(SETTLE_S)
                log(f"[{rep}] burst: {args.burst} jobs due at one instant, server")
                row["burst_server"] = bench.server_burst(rep, args.burst)
                time.sleep(SETTLE_S)
                log(f"[{rep}] burst: floor (os.posix_spawn loop)")
                row["burst_floor"] = bench.floor_burst(rep, args.burst)
                row["burst_ratio"] = round(
                    row["burst_server"]["last_ms"] / row["burst_floor"]["last_ms"], 3
                )
                log(
                    f"[{rep}] burst last start: server {row['burst_server']['last_ms']} ms, "
                    f"floor {row['burst_floor']['last_ms']} ms, ratio {row['burst_ratio']}; "
                    f"CPU per job: server {row['burst_server']['cpu_us_per_job']} µs "
                    f"(event loop {row['burst_server']['loop_cpu_us_per_job']}), "
                    f"floor {row['burst_floor']['cpu_us_per_job']} µs"
                )
            if args.lateness:
                time.sleep(SETTLE_S)
                log(
                    f"[{rep}] lateness: {args.lateness} jobs {args.gap * 1000:.0f} ms apart, server"
                )
                row["lateness_server"] = bench.server_lateness(rep, args.lateness, args.gap)
                log(f"[{rep}] lateness: floor (one posix_spawn per due time)")
                row["lateness_floor"] = bench.floor_lateness(rep, args.lateness, args.gap / 2)
                s, f = row["lateness_server"], row["lateness_floor"]
                row["lateness_over_floor_ms"] = {
                    "p50": round(s["p50_ms"] - f["p50_ms"], 2),
                    "p99": round(s["p99_ms"] - f["p99_ms"], 2),
                }
                log(f"[{rep}] lateness server {s}, floor {f}, over {row['lateness_over_floor_ms']}")
            row["loadavg"] = load_average()
            results.append(row)
        server_cpu = bench.server.cpu_seconds()
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "machine": info,
        "fsync": not args.no_fsync,
        "config": args.config,
        "script_clock": bench.script.stamp_kind,
        "server_cpu_s_total": round(server_cpu, 2),
        "loadavg_after": open("/proc/loadavg").read().split()[:3],
        "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "runs": results,
    }
    print(json.dumps(report, indent=1))
    for path in bench.profiles:
        if not path.exists():
            continue
        spots = top(path, limit=15)
        print(f"\n== {path.name}: {spots['samples']} samples; self, then inclusive")
        for name, share in spots["self"]:
            print(f"  {share:6.1%}  {name}")
        print("  --")
        for name, share in spots["inclusive"]:
            print(f"  {share:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
