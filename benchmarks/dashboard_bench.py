"""The dashboard's pages with 1,000,000 jobs in the store: time to serve each.

    .venv/bin/python -m benchmarks.dashboard_bench [--jobs 1000000] [--requests 30]
        [--json FILE]

One real `kairoi-trio serve` (embedded log, fsync off) on a data directory
filled with `--jobs` planned jobs over KCP (benchmarks/__main__.py's preload),
plus a rule and a few jobs in other states. Then each page is requested
`--requests` times, one after the other on one keep-alive HTTP/1.1 connection
(no token configured: no sign-in), and reported:

- server: the `Server-Timing: app;dur=` the dashboard sets (its handler: the
  actor calls and the rendering, in ms), median, p95 and max;
- wall: the request's round trip seen by the client on loopback (adds the HTTP
  parsing and the loopback), median and p95.

The issue's bound: the overview and a jobs page in <= 100 ms server-side.
Traffic only to 127.0.0.1; everything under a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.__main__ import log, machine, preload
from benchmarks.server import Server, load_average


def pages(jobs: int) -> list[tuple[str, str]]:
    middle = f"pre.0.{jobs // 2}"  # loadgen ids are pre.<connection>.<n>
    return [
        ("overview", "/"),
        ("jobs, first page", "/jobs"),
        ("jobs, prefix, mid-store page", f"/jobs?prefix=pre.&after={middle}"),
        ("jobs, status planned", "/jobs?status=planned"),
        ("jobs, status failed (few)", "/jobs?status=failed"),
        ("job", "/job?id=bench.dash.failed"),
        ("rules", "/rules"),
        ("rule", "/rule?id=dash"),
    ]


def measure(port: int, path: str, requests: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    server_ms: list[float] = []
    wall_ms: list[float] = []
    size = 0
    for _ in range(requests + 2):  # the first two warm up (templates compiled, caches)
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        wall = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        timing = response.getheader("server-timing") or ""
        server_ms.append(float(timing.split("dur=")[1]))
        wall_ms.append(wall)
        size = len(body)
    connection.close()
    server_ms, wall_ms = server_ms[2:], wall_ms[2:]
    return {
        "path": path,
        "bytes": size,
        "server_median_ms": round(statistics.median(server_ms), 2),
        "server_p95_ms": round(sorted(server_ms)[int(len(server_ms) * 0.95) - 1], 2),
        "server_max_ms": round(max(server_ms), 2),
        "wall_median_ms": round(statistics.median(wall_ms), 2),
        "wall_p95_ms": round(sorted(wall_ms)[int(len(wall_ms) * 0.95) - 1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict = {"machine": machine(), "jobs": args.jobs, "pages": {}}
    with tempfile.TemporaryDirectory(prefix="kairoi-dashboard-bench.") as tmp:
        work = Path(tmp)
        loaded = preload(work, args.jobs, 10_000)
        # [metrics] listen (the HTTP port's old name) is benchmarks/server.py's: 127.0.0.1:0
        server = Server(work / "dash", Path(loaded["dir"]), fsync=False)
        with server:
            port = server.events("ready")[0]["http_port"]
            import socket

            from kairoi_trio.protocols.kcp.codec import encode_message

            script = work / "ok.sh"
            script.write_text("exit 0\n")
            with socket.create_connection(("127.0.0.1", server.kcp_port)) as kcp:
                for n, args_ in enumerate(
                    [
                        ["RULE", "SET", "dash", "bench.dash.", "shell", str(script)],
                        ["SET", "bench.dash.failed", "2000-01-01 00:00:00", "x" * 5000],
                        ["SET", "bench.dash.ok", "2000-01-01 00:00:00"],
                    ]
                ):
                    kcp.sendall(encode_message(str(n), args_))
                time.sleep(2)  # the two past jobs run
            results["load_before"] = load_average()
            for name, path in pages(args.jobs):
                result = measure(port, path, args.requests)
                results["pages"][name] = result
                log(
                    f"{name:32} server median {result['server_median_ms']:7.2f} ms, "
                    f"p95 {result['server_p95_ms']:7.2f}, max {result['server_max_ms']:7.2f}; "
                    f"wall median {result['wall_median_ms']:7.2f} ms ({result['bytes']:,} B)"
                )
            results["load_after"] = load_average()
            results["rss_mib"] = server.rss_mib()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
