"""The kairoi-trio benchmark: the real server, over KCP and real TCP sockets.

    .venv/bin/python -m benchmarks [all|set|lateness|restart] [options]
    benchmarks/run.sh                        (the same: everything, default sizes)

Figures (see docs/benchmarks.md for what each one measures):
  set       pipelined SET/s on 1 and 4 connections, fsync on and off, with an
            empty store and with N planned jobs already loaded (--preload);
            beside it, the disk's own fdatasync rate (benchmarks/fsync_floor.py)
  lateness  trigger lateness p50/p99/max: 1,000 jobs due at one instant and 200
            jobs 10 ms apart, fsync on and off
  restart   restart-to-ready time and peak RSS with N planned jobs, and the
            bytes per job above the empty store (VmRSS)

The store of N planned jobs is built through the protocol: pipelined KCP SETs
on one connection (--preload-via kcp, the default), or gRPC SetJobs batches
(--preload-via grpc, benchmarks/preload.py: about 2/3 of the server CPU per
job, for 10,000,000 jobs). --source reuses a store kept (--keep) by an
earlier run instead of building it again.

Everything runs under a temporary directory (removed at the end unless
--keep), talks only to 127.0.0.1, and stops by itself: every phase is bounded
by a count and a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import lateness
from benchmarks.fsync_floor import fdatasync_rate
from benchmarks.profile import Profiler, top
from benchmarks.server import Server, cpu_model

LOADGEN_TIMEOUT_S = 300
PRELOAD_S_PER_JOB = 1e-4  # the preload's time limit: 100 µs a job (it takes ~30)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = cpu_model()
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem.strip(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "src_modified_files": len(_git("status", "--porcelain", "--", "src").splitlines()),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def _git(*args: str) -> str:
    """git in the checkout of the code under test: the `kairoi_trio` this process
    imports (the server's, same interpreter and PYTHONPATH), which need not be the
    harness's own checkout."""
    import kairoi_trio

    root = Path(kairoi_trio.__file__).resolve().parent.parent.parent  # <root>/src/kairoi_trio
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return done.stdout.strip()


def loadgen(
    server: Server, count: int, conns: int, window: int, prefix: str, timeout: float | None = None
) -> dict:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "--port",
        str(server.kcp_port),
        "--count",
        str(count),
        "--conns",
        str(conns),
        "--window",
        str(window),
        "--prefix",
        prefix,
        "--server-pid",
        str(server.pid),
        "--timeout",
        str(timeout or LOADGEN_TIMEOUT_S),
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout or LOADGEN_TIMEOUT_S
    )
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(
            f"{result['errors']} SETs answered ERROR, e.g. {result['first_error']!r}"
        )
    return result


def loaded_jobs(server: Server) -> int:
    events = server.events("log replayed")
    return events[-1]["jobs"] if events else -1


# -- phases -------------------------------------------------------------------------


def grpc_preload(server: Server, jobs: int) -> dict:
    """benchmarks/preload.py against `server`: its progress goes to our stderr."""
    argv = [sys.executable, "-m", "benchmarks.preload"]
    argv += ["--port", str(server.grpc_port), "--count", str(jobs)]
    timeout = max(LOADGEN_TIMEOUT_S, jobs * PRELOAD_S_PER_JOB)
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=timeout)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"] or result["jobs"] != jobs:
        raise RuntimeError(f"preload: {result['errors']} errors, e.g. {result['first_error']!r}")
    return result


def reused(source: Path) -> dict:
    """A store kept by an earlier run (--keep): nothing is built, its size is counted."""
    size = sum(p.stat().st_size for p in source.iterdir()) / 2**20
    log(f"reusing the store in {source} ({size:.0f} MiB), built by an earlier run")
    return {"jobs": None, "via": "reused", "dir": str(source), "data_mib": size}


def preload(work: Path, jobs: int, window: int, via: str = "kcp") -> dict:
    """Fill a data directory with `jobs` planned jobs (fsync off), stop with SIGTERM."""
    data = work / "preloaded" / "data"
    server = Server(work / "preloaded", data, fsync=False)
    with server:
        if via == "grpc":
            log(f"preloading {jobs:,} jobs (fsync off, gRPC SetJobs batches of 1,000)")
            result = grpc_preload(server, jobs)
        else:
            log(f"preloading {jobs:,} jobs (fsync off, 1 connection)")
            timeout = max(LOADGEN_TIMEOUT_S, jobs * PRELOAD_S_PER_JOB)
            result = loadgen(server, jobs, 1, window, "pre.", timeout)
        rss = server.peak_rss_mib()
    size = sum(p.stat().st_size for p in data.iterdir()) / 2**20
    log(f"preloaded: {result['sets_per_s']:,.0f} SET/s, data directory {size:.0f} MiB")
    return {
        "jobs": jobs,
        "via": via,
        "dir": str(data),
        "load": result,
        "peak_rss_mib": rss,
        "data_mib": size,
        "files": sorted(p.name for p in data.iterdir()),
    }


def set_once(
    work: Path,
    name: str,
    source: Path | None,
    fsync: bool,
    conns: int,
    count: int,
    window: int,
    profile_dir: Path | None,
) -> dict:
    case_dir = work / name
    data = case_dir / "data"
    if source is not None:
        shutil.copytree(source, data)
    server = Server(case_dir, data, fsync=fsync, ready_timeout=READY_TIMEOUT_LOADED_S)
    with server:
        jobs = loaded_jobs(server)
        ready_s, rss_ready = server.ready_seconds, server.peak_rss_mib()
        profiler = Profiler(server.pid, profile_dir / f"{name}.txt") if profile_dir else None
        result = loadgen(server, count, conns, window, f"{name}.")
        profile = profiler.stop() if profiler else None
        rss_after = server.peak_rss_mib()
    shutil.rmtree(case_dir, ignore_errors=True)
    out = {
        "jobs_at_start": jobs,
        "ready_s": ready_s,
        "peak_rss_mib_at_ready": rss_ready,
        "peak_rss_mib_after": rss_after,
        **result,
    }
    if profile is not None:
        out["profile"] = top(profile)
        out["profile_file"] = str(profile)
    log(
        f"{name}: {result['sets_per_s']:,.0f} SET/s, {result['sets_per_server_cpu_s'] or 0:,.0f} "
        f"SET per server-CPU-s (server CPU {result['server_cpu_s']:.2f}s in {result['seconds']:.2f}s, "
        f"other processes {result['other_cpu_s'] or 0:.2f} CPU-s)"
    )
    return out


def set_case(
    work: Path,
    store: str,
    source: Path | None,
    fsync: bool,
    conns: int,
    count: int,
    window: int,
    repeat: int,
    profile_dir: Path | None,
) -> dict:
    name = f"set-{store}-{'fsync' if fsync else 'nofsync'}-{conns}c"
    runs = [
        set_once(
            work,
            f"{name}-{i + 1}",
            source,
            fsync,
            conns,
            count,
            window,
            profile_dir if i == 0 else None,
        )
        for i in range(repeat)
    ]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    out = {
        "case": name,
        "store": store,
        "fsync": fsync,
        "conns": conns,
        "jobs_at_start": runs[0]["jobs_at_start"],
        "sets_per_s": max(r["sets_per_s"] for r in runs),
        "sets_per_s_median": med("sets_per_s"),
        "sets_per_s_min": min(r["sets_per_s"] for r in runs),
        "server_cpu_s": med("server_cpu_s"),
        "sets_per_server_cpu_s": med("sets_per_server_cpu_s"),
        "client_cpu_s": med("client_cpu_s"),
        "other_cpu_s": med("other_cpu_s"),
        "seconds": med("seconds"),
        "runs": runs,
    }
    if "profile" in runs[0]:
        out["profile"] = runs[0]["profile"]
    return out


# A start on a preloaded store: ~7 µs a job today, so 10,000,000 jobs take over a minute.
READY_TIMEOUT_LOADED_S = 600.0


def restarts(work: Path, source: Path, times: int) -> list[dict]:
    """Start on a copy of the preloaded directory `times` times (stop with SIGTERM in between)."""
    case_dir = work / "restart"
    data = case_dir / "data"
    shutil.copytree(source, data)
    out = []
    for i in range(times):
        server = Server(case_dir, data, fsync=True, ready_timeout=READY_TIMEOUT_LOADED_S)
        with server:
            ready = server.ready_seconds
            hwm_ready = server.peak_rss_mib()
            time.sleep(2.0)  # anything the server does right after ready counts too
            hwm = server.peak_rss_mib()
            rss = server.rss_mib()
            replayed = server.events("log replayed")
            loaded = server.events("log loaded")
        out.append(
            {
                "ready_s": ready,
                "replay_s": replayed[-1]["seconds"] if replayed else None,
                "load_s": loaded[-1]["seconds"] if loaded else None,
                "jobs": replayed[-1]["jobs"] if replayed else None,
                "peak_rss_mib_at_ready": hwm_ready,
                "peak_rss_mib_2s_later": hwm,
                "rss_mib_2s_later": rss,
            }
        )
        log(f"restart {i + 1}: ready in {ready:.2f}s, VmHWM {hwm:.0f} MiB, jobs {out[-1]['jobs']}")
    shutil.rmtree(case_dir, ignore_errors=True)
    return out


def empty_start(work: Path) -> dict:
    case_dir = work / "empty-start"
    server = Server(case_dir, case_dir / "data", fsync=True)
    with server:
        ready, hwm_ready = server.ready_seconds, server.peak_rss_mib()
        time.sleep(2.0)  # as restarts() does
        out = {
            "ready_s": ready,
            "peak_rss_mib_at_ready": hwm_ready,
            "rss_mib_2s_later": server.rss_mib(),
        }
    shutil.rmtree(case_dir, ignore_errors=True)
    return out


# -- report -------------------------------------------------------------------------


def report(results: dict) -> str:
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    add(
        f"Date {m['date']}; {m['nproc']} CPUs, {m['cpu']}; Python {m['python']}; kernel {m['kernel']}"
    )
    add(f"Command: {results['command']}")
    add(
        f"Code: commit {m['commit']} ({m['src_modified_files']} uncommitted files under src/); "
        f"load average at start {' '.join(m['loadavg'])}"
    )
    if results.get("preload", {}).get("via") == "reused":
        p = results["preload"]
        add(f"Store: reused {p['dir']} ({p['data_mib']:.0f} MiB), built by an earlier run")
    elif "preload" in results:
        p = results["preload"]
        prog = p["load"].get("progress") or []
        if len(prog) >= 2:
            rates = []
            last_t, last_n = 0.0, 0
            for t, n in prog:
                rates.append(f"{(n - last_n) / (t - last_t) / 1000:.0f}k" if t > last_t else "-")
                last_t, last_n = t, n
            add(
                f"Preload rate per tenth of the {p['jobs']:,} SETs (SET/s as the store grows): "
                + " ".join(rates)
            )
        how = "gRPC SetJobs batches of 1,000" if p["via"] == "grpc" else "SETs on 1 connection"
        add(
            f"Preload: {p['jobs']:,} {how} with fsync off: "
            f"{p['load']['sets_per_s']:,.0f} SET/s; data directory {p['data_mib']:.0f} MiB "
            f"({', '.join(p['files'])})"
        )
    if "set" in results:
        add("")
        add(
            f"Pipelined SET ({results['params']['count']:,} SETs per run, window "
            f"{results['params']['window']:,} per connection, {results['params']['repeat']} runs per case "
            f"on a fresh server each; SET/s best (median); CPU figures are medians)"
        )
        add("")
        add(
            "| store | fsync | conns | SET/s best (median) | vs empty (best) | server CPU s | "
            "SET per server-CPU-s | vs empty | client CPU s | other processes CPU s |"
        )
        add("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        floor = results.get("fdatasync")
        base = {(r["fsync"], r["conns"]): r for r in results["set"] if r["store"] == "empty"}
        for r in results["set"]:
            ref = base.get((r["fsync"], r["conns"]))
            rel = rel_cpu = ""
            if ref and r["store"] != "empty":
                rel = f"{(r['sets_per_s'] / ref['sets_per_s'] - 1) * 100:+.0f}%"
                rel_cpu = (
                    f"{(r['sets_per_server_cpu_s'] / ref['sets_per_server_cpu_s'] - 1) * 100:+.0f}%"
                )
            add(
                f"| {r['store']} ({r['jobs_at_start']:,} jobs) | {'on' if r['fsync'] else 'off'} | "
                f"{r['conns']} | {r['sets_per_s']:,.0f} ({r['sets_per_s_median']:,.0f}) | {rel} | "
                f"{r['server_cpu_s']:.2f} | {r['sets_per_server_cpu_s']:,.0f} | {rel_cpu} | "
                f"{r['client_cpu_s']:.2f} | {r['other_cpu_s'] or 0:.2f} |"
            )
        if floor:
            add("")
            add(
                f"Floor of durable writes: this disk's fdatasync, one 8 kB write and its "
                f"fdatasync in a loop (`benchmarks/fsync_floor.py`): "
                f"{floor['fdatasync_per_s']:,.0f}/s ({floor['us_per_sync']:.0f} µs each, "
                f"load {floor['loadavg_1m']:.1f}); a SET with fsync on waits for one, "
                "shared by its group commit"
            )
    if "lateness" in results:
        for run in results["lateness"]:
            add("")
            add(f"Trigger lateness, fsync {'on' if run['fsync'] else 'off'} (ms; p50 / p99 / max)")
            add("")
            add(
                "| scenario | marked triggered (server clock) | run start (pool, before fork) | "
                "script ran (after sh + date spawn) | WatchJobs event received |"
            )
            add("|---|---|---|---|---|")
            for s in run["scenarios"]:

                def cell(key: str, s: dict = s) -> str:
                    v = s[key]
                    return (
                        f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f} / {v['max_ms']:.2f}" if v else "-"
                    )

                label = (
                    "1,000 due at one instant"
                    if s["scenario"] == "burst"
                    else f"{s['jobs']} jobs 10 ms apart"
                )
                add(
                    f"| {label} | {cell('marked')} | {cell('run_start')} | {cell('script')} | "
                    f"{cell('watch_received')} |"
                )
    if "restart" in results:
        rs = results["restart"]
        add("")
        add(
            f"Restart to ready with {rs[0]['jobs']:,} planned jobs ({len(rs)} restarts; page cache warm)"
        )
        add("")
        add(
            "| # | ready s (fork to 'ready' line) | log load s | replay+index s | VmHWM at ready MiB | VmHWM 2 s later MiB | VmRSS MiB |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|")
        for i, r in enumerate(rs, 1):
            add(
                f"| {i} | {r['ready_s']:.2f} | {r['load_s']} | {r['replay_s']} | "
                f"{r['peak_rss_mib_at_ready']:.0f} | {r['peak_rss_mib_2s_later']:.0f} | {r['rss_mib_2s_later']:.0f} |"
            )
        if "empty_start" in results:
            e = results["empty_start"]
            add(
                f"Empty store for comparison: ready in {e['ready_s']:.2f} s, VmHWM "
                f"{e['peak_rss_mib_at_ready']:.0f} MiB, VmRSS 2 s later {e['rss_mib_2s_later']:.0f} MiB"
            )
            jobs = rs[0]["jobs"] or 1
            rss = statistics.median(r["rss_mib_2s_later"] for r in rs)
            hwm = statistics.median(r["peak_rss_mib_2s_later"] for r in rs)
            add(
                f"Bytes per job above the empty store: "
                f"{(rss - e['rss_mib_2s_later']) * 2**20 / jobs:,.0f} (VmRSS, what the jobs hold "
                f"once ready; median of the restarts), "
                f"{(hwm - e['peak_rss_mib_at_ready']) * 2**20 / jobs:,.0f} (VmHWM: the peak, "
                "including what replay holds only while it runs)"
            )
    profiled = [r for r in results.get("set", []) if "profile" in r]
    profiled += [
        {"case": f"lateness burst, fsync {'on' if r['fsync'] else 'off'}", "profile": r["profile"]}
        for r in results.get("lateness", [])
        if "profile" in r
    ]
    for r in profiled:
        if "profile" in r:
            add("")
            add(
                f"py-spy, {r['case']} ({r['profile']['samples']} samples of the server's busy threads): self time"
            )
            for name, share in r["profile"]["self"][:12]:
                add(f"  {share * 100:5.1f}%  {name}")
            add("  hottest lines:")
            for name, share in r["profile"]["self_lines"][:8]:
                add(f"  {share * 100:5.1f}%  {name}")
            add("  inclusive (kairoi_trio functions):")
            shown = [
                (n, v)
                for n, v in r["profile"]["inclusive"]
                if "kairoi_trio/" in n and "cli.py" not in n and "__main__" not in n
            ]
            for name, share in shown[:10]:
                add(f"  {share * 100:5.1f}%  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "what", nargs="?", default="all", choices=["all", "set", "lateness", "restart"]
    )
    parser.add_argument("--count", type=int, default=200_000, help="SETs per throughput case")
    parser.add_argument(
        "--preload", type=int, default=1_000_000, help="planned jobs in the loaded store"
    )
    parser.add_argument(
        "--window", type=int, default=10_000, help="outstanding requests per connection"
    )
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument(
        "--preload-via",
        choices=["kcp", "grpc"],
        default="kcp",
        help="build the store with pipelined KCP SETs (1 connection) or gRPC SetJobs batches",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="a preloaded data directory kept by an earlier run (--keep): used as it is",
    )
    parser.add_argument(
        "--fsync",
        choices=["on", "off", "both"],
        default="both",
        help="the SET cases to run (each also on 1 and 4 connections)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each SET case, each on a fresh server (best and median reported)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy during each SET case and print the hotspots",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where data goes (default: a new temporary dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.preload, args.restarts, args.repeat = 20_000, 50_000, 1, 1

    work = args.workdir or Path(tempfile.mkdtemp(prefix="kairoi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    profile_dir = work / "profiles" if args.profile else None
    if profile_dir:
        profile_dir.mkdir(exist_ok=True)
    results: dict = {
        "machine": machine(),
        "command": " ".join(
            ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
        ),
        "params": {
            "count": args.count,
            "preload": args.preload,
            "window": args.window,
            "repeat": args.repeat,
        },
    }
    started = time.monotonic()
    try:
        need_store = args.what in ("all", "set", "restart")
        if need_store and args.source:
            results["preload"] = reused(args.source)
            source = args.source
        elif need_store:
            results["preload"] = pre = preload(work, args.preload, args.window, args.preload_via)
            source = Path(pre["dir"])
        if args.what in ("all", "restart"):
            results["restart"] = restarts(work, source, args.restarts)
            results["empty_start"] = empty_start(work)
        if args.what in ("all", "set"):
            if args.fsync in ("on", "both"):  # the floor of durable writes on this disk
                results["fdatasync"] = fdatasync_rate(work)
            results["set"] = [
                set_case(
                    work,
                    store,
                    src,
                    fsync,
                    conns,
                    args.count,
                    args.window,
                    args.repeat,
                    profile_dir,
                )
                for store, src in (("empty", None), ("preloaded", source))
                for fsync in {"on": (True,), "off": (False,), "both": (True, False)}[args.fsync]
                for conns in (1, 4)
            ]
        if args.what in ("all", "lateness"):
            results["lateness"] = []
            for fsync in (True, False):
                log(f"lateness, fsync {'on' if fsync else 'off'}")
                results["lateness"].append(
                    lateness.measure(
                        work / f"lateness-{fsync}",
                        fsync=fsync,
                        profile=profile_dir
                        / f"lateness-burst-{'fsync' if fsync else 'nofsync'}.txt"
                        if profile_dir
                        else None,
                    )
                )
    finally:
        if not args.keep:
            keep = [profile_dir] if profile_dir else []
            for child in work.iterdir():
                if child not in keep:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.monotonic() - started
    text = report(results)
    print(text)
    print(f"\n(total {results['total_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if profile_dir:
        print(f"py-spy raw profiles kept in {profile_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
