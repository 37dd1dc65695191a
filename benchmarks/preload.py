"""Fill a server with N planned jobs through gRPC SetJobs batches: the fast preload.

    python -m benchmarks.preload --port GRPC_PORT --count N [--batch 1000]
                                 [--inflight 4] [--prefix pre.]

Through the protocol, like any client: each batch is a SetJobsRequest of
`batch` new jobs, `inflight` batches outstanding at a time, every job's result
checked (one error fails the run). Batches are built while earlier ones are
in flight, so the client's memory stays flat at any N. Ids and times are
loadgen's (`<prefix>0.<i>`, whole seconds scattered over 2030-2040, never due):
the store is the one `loadgen` builds over KCP, in about 2/3 of the server CPU
per job (benchmarks.md, gRPC: SetJobs). Prints progress every tenth to stderr
and one JSON line to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from benchmarks.loadgen import BASE_TIME, SPREAD_S

SET_JOBS = "/kairoi.v1.Scheduler/SetJobs"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] preload: {message}", file=sys.stderr, flush=True)


async def preload(port: int, count: int, batch: int, inflight: int, prefix: str) -> dict[str, Any]:
    import grpc

    from kairoi.v1 import scheduler_pb2 as pb

    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    await channel.channel_ready()
    call = channel.unary_unary(SET_JOBS)
    request_type, job_type = pb.SetJobsRequest, pb.SetJobRequest

    def build(start: int) -> bytes:
        jobs = [
            job_type(
                id=f"{prefix}0.{i}",
                execute_at={"seconds": BASE_TIME + (i * 2_654_435_761) % SPREAD_S},
            )
            for i in range(start, min(start + batch, count))
        ]
        return request_type(jobs=jobs).SerializeToString()

    starts = iter(range(0, count, batch))
    done: dict[str, Any] = {"jobs": 0, "errors": 0, "first_error": ""}
    step = max(1, count // 10)
    progress: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    async def sender() -> None:
        for start in starts:  # shared: each sender takes the next batch
            answer = pb.SetJobsResponse.FromString(await call(build(start)))
            for result in answer.results:
                if result.status.code:
                    done["errors"] += 1
                    done["first_error"] = done["first_error"] or result.status.message
            before = done["jobs"]
            done["jobs"] += len(answer.results)
            if done["jobs"] // step > before // step:
                elapsed = time.perf_counter() - t0
                progress.append((elapsed, done["jobs"]))
                log(f"{done['jobs']:,} jobs in {elapsed:.0f} s ({done['jobs'] / elapsed:,.0f}/s)")

    await asyncio.gather(*(sender() for _ in range(inflight)))
    elapsed = time.perf_counter() - t0
    await channel.close()
    return {
        "count": count,
        "jobs": done["jobs"],
        "errors": done["errors"],
        "first_error": done["first_error"],
        "seconds": elapsed,
        "sets_per_s": done["jobs"] / elapsed,
        "progress": progress,
        "via": f"gRPC SetJobs, batches of {batch}, {inflight} in flight",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preload")
    parser.add_argument("--port", type=int, required=True, help="the server's gRPC port")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1000, help="jobs per SetJobs request")
    parser.add_argument("--inflight", type=int, default=4, help="requests outstanding")
    parser.add_argument("--prefix", default="pre.")
    args = parser.parse_args(argv)
    result = asyncio.run(preload(args.port, args.count, args.batch, args.inflight, args.prefix))
    print(json.dumps(result), flush=True)
    return 1 if result["errors"] or result["jobs"] != args.count else 0


if __name__ == "__main__":
    sys.exit(main())
