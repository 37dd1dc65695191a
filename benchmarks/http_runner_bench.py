"""The http runner end to end: N jobs due at one instant, POSTed to a local Trio endpoint.

    .venv/bin/python -m benchmarks.http_runner_bench [--jobs 20000] [--reps 3]
        [--concurrency 64] [--no-h11] [--profile DIR] [--config TOML]

Each repetition measures three things against a fresh endpoint process:

1. **server**: a real `kairoi-trio serve` (log store, fsync on) with an http rule
   pointing at the endpoint and `[runners.http] concurrency` = --concurrency.
   N jobs are set over KCP (pipelined) all due at one instant T, --lead seconds
   ahead. Reported: jobs/s = N / (last run end - T), from the "job run" log
   events (their timestamp is the end of each run); lateness = the endpoint's
   receipt time of each POST - T, p50/p99/max (it includes the dispatcher's
   wake-up, the `triggered` record's fsync, the wait in the pool's queue and the
   request on the wire); the server's CPU (utime+stime) from just before T until
   every job is `executed` (GET /api/v1/info), per job; the endpoint's CPU per
   request. Checked: the endpoint got every id exactly once, every job is
   `executed` (KCP GET of each), every run ok.
2. **httpx floor**: a bare client in its own process, on Trio like the server:
   one `httpx.AsyncClient` (limits max_connections = concurrency), `concurrency`
   tasks doing the same N POSTs (same body and headers as the runner sends).
   Requests/s over its run and its CPU per request.
3. **h11 floor** (unless --no-h11): the same with `concurrency` tasks each on
   its own kept-alive trio TCP stream, h11 (the sans-io HTTP/1.1 library httpx
   uses underneath) driving it: about the least Python a correct client does.

The endpoint (its own process, Trio, `serve_tcp`, one task per connection)
answers every POST `204 No Content` at once and keeps (receipt ns, body); it
frames requests by hand (head up to CRLFCRLF, Content-Length body) because it
is the benchmark's peer, not the code under test, and must cost as little CPU
as possible on a 2-core machine. It counts the connections it accepted.

Only 127.0.0.1 is contacted; every wait is bounded; every process started is
stopped at the end.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.__main__ import log, machine
from benchmarks.profile import Profiler, top
from benchmarks.recurring_bench import Endpoint, kcp_time, pipeline
from benchmarks.server import Server, jobs_by_status, parse, split_requests

MICROS = 1_000_000
_NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


# -- the endpoint (its own process) ---------------------------------------------------------


def endpoint_main(out: Path) -> int:
    """Answer every request 204 at once; on SIGTERM write `<receipt ns> <body>` lines
    to `out`, print the connections accepted, and exit."""
    import trio

    received: list[tuple[int, bytes]] = []
    connections = 0
    clock = time.time_ns

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        buf = b""
        try:
            while True:
                data = await stream.receive_some(1 << 16)
                if not data:
                    return
                now = clock()
                buf = buf + data if buf else data
                requests, buf = split_requests(buf)
                received.extend((now, body) for _, body in requests)
                answers = [_NO_CONTENT] * len(requests)
                if answers:
                    await stream.send_all(b"".join(answers))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1", backlog=1024)
            listeners = await nursery.start(serve)
            print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    gc.disable()  # (ns, bytes) tuples hold no cycles; a collection would pause the answers
    trio.run(serve)
    with open(out, "wb") as f:
        for ns, body in received:
            f.write(b"%d %s\n" % (ns, body))
    print(f"connections {connections}", flush=True)
    return 0


# -- the bare clients (their own process) ---------------------------------------------------


def _request(i: int) -> tuple[bytes, dict[str, str]]:
    """The body and headers the runner sends for job floor.<i> (the same code builds them)."""
    from kairoi_trio import __version__
    from kairoi_trio.model import Job, format_time
    from kairoi_trio.runners.http import header_job_id, request_body

    job = Job(f"floor.{i:06d}", 1_796_115_600_000_000, attempts=1)
    at = format_time(job.execute_at)
    headers = {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        "User-Agent": f"kairoi-trio/{__version__}",
        "X-Kairoi-Attempt": "1",
        "X-Kairoi-Scheduled-At": at,
        "X-Kairoi-Job-Id": header_job_id(job.id) or "",
    }
    return request_body(job, at, at), headers


def client_main(kind: str, url: str, n: int, concurrency: int) -> int:
    """POST n requests with `concurrency` tasks; print {"seconds", "cpu_s", "ok"} as JSON."""
    import trio

    requests = [_request(i) for i in range(n)]
    ok = 0

    async def with_httpx() -> None:
        import httpx

        nonlocal ok
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            todo = iter(requests)

            async def worker() -> None:
                nonlocal ok
                for body, headers in todo:
                    reply = await client.post(url, content=body, headers=headers)
                    ok += reply.status_code == 204

            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)

    async def with_httpx_tuned() -> None:
        import httpx

        nonlocal ok
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
            built = [client.build_request("POST", url, content=b, headers=h) for b, h in requests]
            todo = iter(built)

            async def worker() -> None:
                nonlocal ok
                for request in todo:
                    reply = await client.send(request)
                    ok += reply.status_code == 204

            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)

    async def with_httpcore() -> None:
        import httpcore

        nonlocal ok
        async with httpcore.AsyncConnectionPool(max_connections=concurrency) as pool:
            todo = iter(requests)

            async def worker() -> None:
                nonlocal ok
                for body, headers in todo:
                    # httpcore's headers are a Mapping[bytes | str, ...]: a dict[str, str] is
                    # one at run time, not for mypy (a Mapping's key type is invariant).
                    reply = await pool.request(
                        "POST",
                        url,
                        headers=headers,  # type: ignore[arg-type]
                        content=body,
                    )
                    ok += reply.status == 204

            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)

    async def with_h11() -> None:
        import h11

        nonlocal ok
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host, port, target = parts.hostname or "", parts.port or 80, parts.path.encode()
        todo = iter(requests)

        async def worker() -> None:
            nonlocal ok
            stream = await trio.open_tcp_stream(host, port)
            conn = h11.Connection(h11.CLIENT)
            async with stream:
                for body, headers in todo:
                    fields = [("Host", parts.netloc), ("Content-Length", str(len(body)))]
                    fields += list(headers.items())
                    await stream.send_all(
                        conn.send(h11.Request(method="POST", target=target, headers=fields))
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    status = 0
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(1 << 16))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        elif isinstance(event, h11.ConnectionClosed):
                            raise ConnectionError("endpoint closed the connection")
                    ok += status == 204
                    conn.start_next_cycle()

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    kinds = {
        "httpx": with_httpx,
        "httpx-tuned": with_httpx_tuned,
        "httpcore": with_httpcore,
        "h11": with_h11,
    }
    trio.run(kinds[kind])
    seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "ok": ok}), flush=True)
    return 0


# -- the measurements -----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stamp_us(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * MICROS + delta.microseconds


def http_port(server: Server) -> int:
    for _, line in server.lines:
        event = parse(line)
        if event.get("event") == "ready":
            return int(event["http_port"])
    raise RuntimeError("no ready line")


def server_run(args: argparse.Namespace, work: Path, rep: int) -> dict:
    n = args.jobs
    endpoint = Endpoint(work, "benchmarks.http_runner_bench")
    extra = f"[runners.http]\nconcurrency = {args.concurrency}\n" + args.config.replace("\\n", "\n")
    server = Server(
        work / f"server-{rep}", work / f"server-{rep}" / "data", fsync=True, extra=extra
    )
    profiler = None
    try:
        server.start()
        port = http_port(server)
        rule = f'r RULE SET bench bench. http "{endpoint.url}"\n'
        pipeline(server.kcp_port, [rule])
        due_us = (time.time_ns() // 1000 + int(args.lead * MICROS)) // MICROS * MICROS
        ids = [f"bench.{i:06d}" for i in range(n)]
        started = time.monotonic()
        pipeline(
            server.kcp_port, [f's{i} SET {job} "{kcp_time(due_us)}"\n' for i, job in enumerate(ids)]
        )
        set_s = time.monotonic() - started
        if time.time() > due_us / MICROS - 0.3:
            raise RuntimeError(f"the SETs took {set_s:.1f}s, past the due time: raise --lead")
        time.sleep(max(0.0, due_us / MICROS - 0.2 - time.time()))
        cpu0, endpoint_cpu0 = server.cpu_seconds(), endpoint.cpu_seconds()
        if args.profile and rep == 0:
            profiler = Profiler(server.pid, Path(args.profile) / "http_runner_server.txt")
        deadline = time.monotonic() + args.timeout
        while True:
            counts = jobs_by_status(port)
            if counts.get("executed", 0) + counts.get("failed", 0) >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done in {args.timeout}s: {counts}")
            time.sleep(0.05)
        server_cpu = server.cpu_seconds() - cpu0
        endpoint_cpu = endpoint.cpu_seconds() - endpoint_cpu0
        if profiler is not None:
            profiler.stop()
        answers = pipeline(server.kcp_port, [f"g{i} GET {job}\n" for i, job in enumerate(ids)])
        statuses = Counter(a.split()[2] if len(a.split()) > 2 else a for a in answers)
        events = server.events("job run")
    finally:
        if profiler is not None and profiler.process is not None:
            profiler.stop()
        server.stop()
        server.kill()
        received = endpoint.stop_raw()
        endpoint.kill()
    ends = [_stamp_us(e["timestamp"]) for e in events]
    starts = [end - int(e["seconds"] * MICROS) for e, end in zip(events, ends, strict=True)]
    outcomes = Counter(e["outcome"] for e in events if not e["ok"])
    ids_received = Counter(json.loads(body)["id"] for _, body in received)
    lateness = [(at - due_us) / 1000 for at, _ in received]
    last = max(ends)
    return {
        "jobs": n,
        "set_per_s": round(n / set_s),
        "jobs_per_s": round(n * MICROS / (last - due_us)),
        "last_run_end_s": round((last - due_us) / MICROS, 3),
        "first_receipt_ms": round(min(lateness), 2),
        "lateness_p50_ms": round(statistics.median(lateness), 1),
        "lateness_p99_ms": round(pct(lateness, 0.99), 1),
        "lateness_max_ms": round(max(lateness), 1),
        "run_start_p99_ms": round(pct([(s - due_us) / 1000 for s in starts], 0.99), 1),
        "run_p50_ms": round(statistics.median(e["seconds"] for e in events) * 1000, 2),
        "server_cpu_us_per_job": round(server_cpu / n * MICROS, 1),
        "endpoint_cpu_us_per_job": round(endpoint_cpu / n * MICROS, 1),
        "runs_logged": len(events),
        "runs_ok": sum(1 for e in events if e["ok"]),
        "failed_outcomes": dict(outcomes.most_common(3)),
        "statuses": dict(statuses),
        "received": len(received),
        "distinct_ids_received": len(ids_received),
        "every_id_once": len(ids_received) == n == len(received) and set(ids_received) == set(ids),
        "connections": endpoint.connections,
    }


def floor_run(args: argparse.Namespace, work: Path, kind: str, n: int) -> dict:
    endpoint = Endpoint(work, "benchmarks.http_runner_bench")
    try:
        endpoint_cpu0 = endpoint.cpu_seconds()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.http_runner_bench",
                "_client",
                kind,
                endpoint.url,
                str(n),
                str(args.concurrency),
            ],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{kind} client failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        endpoint_cpu = endpoint.cpu_seconds() - endpoint_cpu0
    finally:
        received = endpoint.stop_raw()
        endpoint.kill()
    return {
        "requests": n,
        "requests_per_s": round(n / result["seconds"]),
        "client_cpu_us_per_request": round(result["cpu_s"] / n * MICROS, 1),
        "endpoint_cpu_us_per_request": round(endpoint_cpu / n * MICROS, 1),
        "ok": result["ok"],
        "received": len(received),
        "connections": endpoint.connections,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_endpoint"]:
        return endpoint_main(Path(argv[1]))
    if argv[:1] == ["_client"]:
        return client_main(argv[1], argv[2], int(argv[3]), int(argv[4]))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="[runners.http] concurrency")
    parser.add_argument("--lead", type=float, default=3.0, help="seconds from now to the due time")
    parser.add_argument(
        "--floors",
        default="httpx,h11",
        help="bare clients to run, comma-separated: httpx, h11, httpx-tuned, httpcore ('' none)",
    )
    parser.add_argument(
        "--floor-jobs",
        type=int,
        default=5_000,
        help="POSTs per bare httpx/httpcore client (their CPU per request is the figure)",
    )
    parser.add_argument("--no-server", action="store_true", help="the floors only")
    parser.add_argument(
        "--config", default="", help=r"extra TOML for the server ('\n' for newlines)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on each run phase")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server in the first rep")
    args = parser.parse_args(argv)
    info = machine()
    log(f"machine: nproc {info['nproc']}, load {info['loadavg']}, commit {info['commit']}")
    floors = [kind for kind in args.floors.split(",") if kind]
    results: dict[str, list[dict]] = {"server": [], **{kind: [] for kind in floors}}
    with tempfile.TemporaryDirectory(prefix="kairoi-http-bench-") as tmp:
        work = Path(tmp)
        for rep in range(args.reps):
            if not args.no_server:
                log(f"rep {rep + 1}/{args.reps}: server, {args.jobs} jobs due at one instant")
                r = server_run(args, work, rep)
                results["server"].append(r)
                log(
                    f"  server: {r['jobs_per_s']:,} jobs/s, lateness p50/p99 "
                    f"{r['lateness_p50_ms']}/{r['lateness_p99_ms']} ms, "
                    f"{r['server_cpu_us_per_job']} µs CPU/job, endpoint "
                    f"{r['endpoint_cpu_us_per_job']} µs/job, every id once: {r['every_id_once']}"
                )
            for kind in floors:
                n = args.jobs if kind == "h11" else min(args.jobs, args.floor_jobs)
                log(f"rep {rep + 1}/{args.reps}: bare {kind} client, {n} POSTs")
                f = floor_run(args, work, kind, n)
                results[kind].append(f)
                log(
                    f"  {kind}: {f['requests_per_s']:,} req/s, "
                    f"{f['client_cpu_us_per_request']} µs CPU/request, endpoint "
                    f"{f['endpoint_cpu_us_per_request']} µs/request"
                )
    info["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"machine": info, "concurrency": args.concurrency, **results}, indent=2))
    if args.profile and not args.no_server:
        profile = top(Path(args.profile) / "http_runner_server.txt", limit=25)
        print(f"\nserver profile ({profile['samples']} samples): self / inclusive")
        inclusive = dict(profile["inclusive"])
        for name, share in profile["self"]:
            print(f"  {share:6.1%} {inclusive.get(name, 0):6.1%}  {name}")
    ok = all(
        r["every_id_once"] and r["runs_ok"] == r["jobs"] == r["statuses"].get("executed", 0)
        for r in results["server"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
