"""GET /api/v1/jobs/{id} against gRPC GetJob, in the same run, on the same server.

    .venv/bin/python -m benchmarks.http_api_bench [--jobs 10000] [--seconds 5]
        [--rounds 3] [--processes 2] [--connections 16] [--json FILE]

One real `kairoi-trio serve` (embedded log, fsync off: reads do not touch the
disk anyway) is loaded with `--jobs` jobs over gRPC SetJobs. Then, round after
round, alternating so that drift in the machine's load hits both alike:

- HTTP: `--processes` client processes, each with `--connections` keep-alive
  HTTP/1.1 connections (Trio, raw sockets: a request written, the answer read
  by its Content-Length; a lean client, so the figure is the server's), each
  connection one request at a time, random ids;
- gRPC: the same processes and concurrency, grpc.aio GetJob calls on one
  channel per process.

Each figure is completed requests per second over `--seconds`, with the
server's CPU per request (from /proc) and the machine's 1-minute load. Traffic
only to 127.0.0.1; everything under a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.server import Server, cpu_model, cpu_seconds, load_average, parse


def _ids(count: int) -> list[str]:
    return [f"bench.http.{n:07d}" for n in range(count)]


# -- clients (run in their own processes) ---------------------------------------------


def http_client(port: int, ids: list[str], connections: int, seconds: float) -> int:
    import trio

    done = 0

    async def one_connection(deadline: float) -> None:
        nonlocal done
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buffer = b""
        rng = random.Random()
        while trio.current_time() < deadline:
            job_id = rng.choice(ids)
            await stream.send_all(
                f"GET /api/v1/jobs/{job_id} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
            )
            while b"\r\n\r\n" not in buffer:
                buffer += await stream.receive_some(65536)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode())
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            buffer = buffer[length:]
            done += 1
        await stream.aclose()

    async def main() -> None:
        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one_connection, deadline)

    trio.run(main)
    return done


def grpc_client(port: int, ids: list[str], connections: int, seconds: float) -> int:
    import asyncio

    import grpc

    from kairoi.v1 import scheduler_pb2 as pb
    from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

    done = 0

    async def main() -> None:
        nonlocal done
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds

            async def caller() -> None:
                nonlocal done
                rng = random.Random()
                while loop.time() < deadline:
                    await stub.GetJob(pb.GetJobRequest(id=rng.choice(ids)))
                    done += 1

            await asyncio.gather(*(caller() for _ in range(connections)))

    asyncio.run(main())
    return done


# -- the driver ------------------------------------------------------------------------


def run_clients(kind: str, port: int, args: argparse.Namespace) -> int:
    command = [
        sys.executable,
        "-m",
        "benchmarks.http_api_bench",
        "--client",
        kind,
        "--port",
        str(port),
        "--jobs",
        str(args.jobs),
        "--connections",
        str(args.connections),
        "--seconds",
        str(args.seconds),
    ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)
    ]
    total = 0
    for process in processes:
        out, _ = process.communicate(timeout=args.seconds + 60)
        if process.returncode != 0:
            raise RuntimeError(f"{kind} client failed ({process.returncode})")
        total += int(out.split()[-1])
    return total


def load_jobs(port: int, ids: list[str]) -> None:
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from kairoi.v1 import scheduler_pb2 as pb
    from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

    at = Timestamp(seconds=4_102_444_800)  # 2100-01-01: never due during the run
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        for start in range(0, len(ids), 1000):
            jobs = [
                pb.SetJobRequest(id=job_id, execute_at=at, payload=b"x" * 64)
                for job_id in ids[start : start + 1000]
            ]
            stub.SetJobs(pb.SetJobsRequest(jobs=jobs))


def git_commit() -> str:
    """The commit of the code under test (benchmarks.__main__._git), or "unknown"."""
    from benchmarks.__main__ import _git

    try:
        return _git("rev-parse", "--short", "HEAD") or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    model = cpu_model() or "unknown"
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", choices=["http", "grpc"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ids = _ids(args.jobs)
    if args.client is not None:
        client = http_client if args.client == "http" else grpc_client
        print(client(args.port, ids, args.connections, args.seconds))
        return 0

    results: dict[str, list[dict[str, float]]] = {"http": [], "grpc": []}
    with tempfile.TemporaryDirectory(prefix="kairoi-http-bench.") as tmp:
        server = Server(Path(tmp), Path(tmp) / "data", fsync=False)
        with server:
            http_port = next(
                parse(line)["http_port"] for _, line in server.lines if '"ready"' in line
            )
            assert server.grpc_port is not None
            load_jobs(server.grpc_port, ids)
            for round_ in range(args.rounds):
                for kind, port in (("http", http_port), ("grpc", server.grpc_port)):
                    cpu0, load0 = cpu_seconds(server.pid), load_average()
                    started = time.monotonic()
                    count = run_clients(kind, port, args)
                    elapsed = time.monotonic() - started
                    cpu = cpu_seconds(server.pid) - cpu0
                    figure = {
                        "requests_per_s": count / args.seconds,
                        "server_cpu_us_per_request": cpu / max(count, 1) * 1e6,
                        "server_cores": cpu / elapsed,
                        "load_1min": (load0 + load_average()) / 2,
                    }
                    results[kind].append(figure)
                    print(
                        f"round {round_ + 1} {kind:4}: {figure['requests_per_s']:8,.0f} req/s, "
                        f"server {figure['server_cpu_us_per_request']:.0f} µs CPU/request, "
                        f"load {figure['load_1min']:.1f}",
                        flush=True,
                    )
    summary = {
        kind: {
            "median_requests_per_s": statistics.median(f["requests_per_s"] for f in figures),
            "best_requests_per_s": max(f["requests_per_s"] for f in figures),
            "median_server_cpu_us_per_request": statistics.median(
                f["server_cpu_us_per_request"] for f in figures
            ),
        }
        for kind, figures in results.items()
    }
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "load_1min": statistics.median(f["load_1min"] for fs in results.values() for f in fs),
        "settings": {k: v for k, v in vars(args).items() if k not in ("client", "port", "json")},
        "rounds": results,
        "summary": summary,
    }
    http, grpc_ = summary["http"], summary["grpc"]
    print(
        f"GET /api/v1/jobs/{{id}}: {http['median_requests_per_s']:,.0f} req/s (median of "
        f"{args.rounds}), gRPC GetJob: {grpc_['median_requests_per_s']:,.0f} req/s; server CPU "
        f"{http['median_server_cpu_us_per_request']:.0f} vs "
        f"{grpc_['median_server_cpu_us_per_request']:.0f} µs per request"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
