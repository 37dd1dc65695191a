"""serve_grpc and its Trio <-> asyncio bridge, with a stand-in actor and clients in another process.

The stand-in actor answers Requests from the channel like the real one would
(in-memory, no log), and can be paused or slowed down to provoke
backpressure, draining and shutdown with streams open. Clients are small
scripts on the generated stubs run with the same interpreter, so the gRPC
client never shares a process (or an event loop) with the server.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kairoi.v1 import scheduler_pb2 as pb
from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode, Request
from kairoi_trio.core.auth import TokenTable
from kairoi_trio.model import Job, JobEvent, Status
from kairoi_trio.protocols.grpc import server as grpc_server
from kairoi_trio.protocols.grpc.server import serve_grpc

# -- the stand-in actor ---------------------------------------------------------------


@dataclass
class FakeActor:
    jobs: dict[str, Job] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)
    sinks: list[Any] = field(default_factory=list)
    paused: bool = False  # holds the request it took until resume()
    delay_s: float = 0.0
    resumed: trio.Event = field(default_factory=trio.Event)
    unsubscribed: trio.Event = field(default_factory=trio.Event)  # a WatchJobs handler ended

    def resume(self) -> None:
        self.paused = False
        self.resumed.set()

    async def run(self, receive: trio.MemoryReceiveChannel[Request]) -> None:
        async for request in receive:
            if self.paused:
                await self.resumed.wait()
            if self.delay_s:
                await trio.sleep(self.delay_s)
            events: list[JobEvent] = []
            results = [self.apply(command, events) for command in request.commands]
            request.reply(results)
            self.publish(events)

    def publish(self, events: list[JobEvent]) -> None:
        if events:
            self.sinks = [sink for sink in self.sinks if sink(events)]

    def apply(self, command: c.Command, events: list[JobEvent]) -> object:
        try:
            return self._apply(command, events)
        except CommandError as error:
            return error

    def _apply(self, command: c.Command, events: list[JobEvent]) -> object:
        match command:
            case c.SetJob(id=""):
                raise CommandError(ErrorCode.INVALID_ARGUMENT, "job id must not be empty")
            case c.SetJob() if self.jobs.get(command.id, Job("", 0)).status is Status.TRIGGERED:
                raise CommandError(ErrorCode.FAILED_PRECONDITION, "triggered")
            case c.SetJob():
                job = Job(command.id, command.execute_at, payload=command.payload, updated_at=1)
                self.jobs[job.id] = job
                events.append(JobEvent(job, at=2))
                return job
            case c.GetJob():
                return self._job(command.id)
            case c.DeleteJob():
                job = self._job(command.id)
                del self.jobs[job.id]
                events.append(JobEvent(job, deleted=True, at=3))
                return None
            case c.ListJobs():
                ids = sorted(
                    i for i in self.jobs if i.startswith(command.prefix) and i > command.after
                )
                page = [self.jobs[i] for i in ids if command.status in (None, self.jobs[i].status)]
                more = len(page) > command.limit
                page = page[: command.limit]
                return c.JobPage(page, page[-1].id if more else "")
            case c.SetRule():
                self.rules[command.rule.id] = command.rule
                return command.rule
            case c.GetRule():
                if command.id not in self.rules:
                    raise CommandError(ErrorCode.NOT_FOUND, f"no rule {command.id}")
                return self.rules[command.id]
            case c.DeleteRule():
                if self.rules.pop(command.id, None) is None:
                    raise CommandError(ErrorCode.NOT_FOUND, f"no rule {command.id}")
                return None
            case c.ListRules():
                ids = sorted(
                    i for i in self.rules if i.startswith(command.prefix) and i > command.after
                )
                return [self.rules[i] for i in ids[: command.limit]]
            case c.GetInfo():
                return c.ServerInfo(
                    "9.9.9", 1_000_000, {Status.PLANNED: len(self.jobs)}, len(self.rules)
                )
            case c.Subscribe():
                self.sinks.append(command.sink)
                jobs = [j for i, j in sorted(self.jobs.items()) if i.startswith(command.prefix)]
                return c.JobPage(jobs if command.snapshot else [], "")
            case c.Unsubscribe():
                self.sinks = [s for s in self.sinks if s is not command.sink]
                self.unsubscribed.set()
                return None
        raise AssertionError(f"unexpected command {command!r}")

    def _job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise CommandError(ErrorCode.NOT_FOUND, f"no job {job_id}")
        return self.jobs[job_id]


@dataclass
class Running:
    port: int
    actor: FakeActor
    cancel_scope: trio.CancelScope
    stopped: trio.Event


@asynccontextmanager
async def running_server(
    *, capacity: int = 100, actor: FakeActor | None = None, **options: Any
) -> AsyncIterator[Running]:
    """serve_grpc on port 0 with a stand-in actor; cancelled (and awaited) on exit."""
    actor = actor or FakeActor()
    send, receive = trio.open_memory_channel[Request](capacity)
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run, receive)
        scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await serve_grpc(send, listen="127.0.0.1:0", task_status=task_status, **options)
            stopped.set()
            await send.aclose()  # as the app does: the actor's channel closes after serve_grpc

        port = await nursery.start(serve)
        yield Running(port, actor, scope, stopped)
        scope.cancel()


# -- clients in another process ---------------------------------------------------------------

PRELUDE = """
import json, os, sys, time
import grpc
from google.protobuf.json_format import MessageToDict
from kairoi.v1 import scheduler_pb2 as pb, scheduler_pb2_grpc as pb_grpc

channel = grpc.insecure_channel("127.0.0.1:" + os.environ["PORT"])
stub = pb_grpc.SchedulerStub(channel)

def call(method, request, **kw):
    try:
        return MessageToDict(getattr(stub, method)(request, timeout=10, **kw))
    except grpc.RpcError as e:
        return {"error": e.code().name, "message": e.details()}

def out(value):
    print(json.dumps(value), flush=True)
"""


def client_command(port: int, body: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PORT": str(port)}
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env


async def run_client(port: int, body: str) -> list[Any]:
    """Run a client script to completion; returns the JSON values it printed, one per line."""
    argv, env = client_command(port, body)
    done = await trio.run_process(
        argv, env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


# -- tests -------------------------------------------------------------------------------------


async def test_started_reports_the_real_port_and_health_serves() -> None:
    async with running_server() as server:
        assert server.port > 0
        [health, services] = await run_client(
            server.port,
            """
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
            h = health_pb2_grpc.HealthStub(channel)
            out(health_pb2.HealthCheckResponse.ServingStatus.Name(
                h.Check(health_pb2.HealthCheckRequest(service="kairoi.v1.Scheduler")).status))
            r = reflection_pb2_grpc.ServerReflectionStub(channel)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            [resp] = list(r.ServerReflectionInfo(iter([req])))
            out(sorted(s.name for s in resp.list_services_response.service))
            """,
        )
    assert health == "SERVING"
    assert "kairoi.v1.Scheduler" in services
    assert "grpc.health.v1.Health" in services


async def test_unary_calls_and_their_errors() -> None:
    async with running_server() as server:
        results = await run_client(
            server.port,
            """
            ts = {"seconds": 1590531978, "nanos": 123456000}
            out(call("SetJob", pb.SetJobRequest(id="app.a", execute_at=ts, payload=b"hi")))
            out(call("GetJob", pb.GetJobRequest(id="app.a")))
            out(call("GetJob", pb.GetJobRequest(id="missing")))
            out(call("SetJob", pb.SetJobRequest(id="", execute_at=ts)))
            out(call("SetJob", pb.SetJobRequest(id="no-time")))
            out(call("ListJobs", pb.ListJobsRequest(status=42)))
            out(call("SetRule", pb.SetRuleRequest(rule=pb.Rule(id="r", pattern="app."))))
            rule = pb.Rule(id="r", pattern="app.", http=pb.HttpRunner(url="http://h/x"))
            out(call("SetRule", pb.SetRuleRequest(rule=rule)))
            out(call("GetRule", pb.GetRuleRequest(id="r")))
            out(call("ListRules", pb.ListRulesRequest()))
            out(call("DeleteRule", pb.DeleteRuleRequest(id="r")))
            out(call("DeleteRule", pb.DeleteRuleRequest(id="r")))
            out(call("DeleteJob", pb.DeleteJobRequest(id="app.a")))
            out(call("DeleteJob", pb.DeleteJobRequest(id="app.a")))
            out(call("GetServerInfo", pb.GetServerInfoRequest()))
            """,
        )
    set_job, get_job, missing, empty, no_time, bad_status, no_runner, *rest = results
    assert set_job["job"] == {
        "id": "app.a",
        "executeAt": "2020-05-26T22:26:18.123456Z",
        "status": "JOB_STATUS_PLANNED",
        "payload": "aGk=",
        "updatedAt": "1970-01-01T00:00:00.000001Z",
    }
    assert get_job == set_job
    assert missing == {"error": "NOT_FOUND", "message": "no job missing"}
    assert empty == {"error": "INVALID_ARGUMENT", "message": "job id must not be empty"}
    assert no_time == {"error": "INVALID_ARGUMENT", "message": "execute_at is required"}
    assert bad_status["error"] == "INVALID_ARGUMENT"
    assert no_runner["error"] == "INVALID_ARGUMENT"
    set_rule, get_rule, list_rules, deleted, delete_again, delete_job, delete_job_again, info = rest
    assert set_rule["rule"]["http"] == {"url": "http://h/x"}
    assert set_rule["rule"]["policy"]["maxAttempts"] == 1
    assert get_rule == set_rule
    assert list_rules == {"rules": [set_rule["rule"]]}
    assert deleted == {}
    assert delete_again["error"] == "NOT_FOUND"
    assert delete_job == {}
    assert delete_job_again["error"] == "NOT_FOUND"
    assert info == {
        "version": "9.9.9",
        "startedAt": "1970-01-01T00:00:01Z",
        "jobs": {},  # all counts zero: proto3 JSON leaves them (and "rules") out
    }


async def test_batch_answers_each_job_and_bulk_stream_summarises() -> None:
    async with running_server() as server:
        server.actor.jobs["busy"] = Job("busy", 0, Status.TRIGGERED)
        batch, stream, page1, page2 = await run_client(
            server.port,
            """
            ok = {"seconds": 100}
            jobs = [
                pb.SetJobRequest(id="b1", execute_at=ok),
                pb.SetJobRequest(id="", execute_at=ok),
                pb.SetJobRequest(id="b2"),
                pb.SetJobRequest(id="busy", execute_at=ok),
            ]
            out(call("SetJobs", pb.SetJobsRequest(jobs=jobs)))
            ids = [[f"s{i}" for i in range(b * 10, b * 10 + 10)] for b in range(5)]
            batches = [
                pb.SetJobsRequest(jobs=[pb.SetJobRequest(id=i, execute_at=ok) for i in batch])
                for batch in ids
            ]
            batches[2].jobs[3].id = ""
            out(call("StreamSetJobs", iter(batches)))
            first = call("ListJobs", pb.ListJobsRequest(prefix="s", page_size=30))
            out(first)
            out(call("ListJobs", pb.ListJobsRequest(prefix="s", page_size=30,
                                                    page_token=first["nextPageToken"])))
            """,
        )
    codes = [r["status"].get("code", 0) for r in batch["results"]]
    assert codes == [0, 3, 3, 9]
    assert batch["results"][1]["status"]["message"] == "job id must not be empty"
    assert stream["accepted"] == "49"
    assert stream["failures"] == [
        {"index": "23", "status": {"code": 3, "message": "job id must not be empty"}}
    ]
    assert len(page1["jobs"]) == 30 and page1["nextPageToken"] == page1["jobs"][-1]["id"]
    assert len(page2["jobs"]) == 19 and "nextPageToken" not in page2


async def test_pages_and_snapshots_stay_under_the_message_size_limit() -> None:
    async with running_server(max_message_bytes=64 * 1024) as server:
        for i in range(20):
            server.actor.jobs[f"big.{i:02d}"] = Job(f"big.{i:02d}", 0, payload=b"x" * 10_000)
        pages, snapshot = await run_client(
            server.port,
            """
            pages, token = [], ""
            while True:
                page = stub.ListJobs(pb.ListJobsRequest(prefix="big.", page_token=token))
                pages.append([job.id for job in page.jobs])
                token = page.next_page_token
                if not token:
                    break
            out(pages)
            watch = stub.WatchJobs(pb.WatchJobsRequest(prefix="big.", include_snapshot=True))
            sizes = []
            for message in watch:
                if not message.snapshot:
                    break
                sizes.append(len(message.events))
                if sum(sizes) == 20:
                    break
            out(sizes)
            """,
        )
    assert [job_id for page in pages for job_id in page] == [f"big.{i:02d}" for i in range(20)]
    assert 1 < len(pages) and all(len(page) <= 6 for page in pages)
    assert sum(snapshot) == 20 and len(snapshot) > 1


async def test_bulk_stream_keeps_order_through_a_full_queue() -> None:
    actor = FakeActor(delay_s=0.01)  # slow enough that a one-slot queue is often full
    async with running_server(capacity=1, actor=actor) as server:
        [summary] = await run_client(
            server.port,
            """
            batches = [
                pb.SetJobsRequest(jobs=[
                    pb.SetJobRequest(id=f"o.{i}", execute_at={"seconds": b}) for i in range(10)
                ])
                for b in range(1, 31)
            ]
            out(call("StreamSetJobs", iter(batches)))
            """,
        )
        assert summary == {"accepted": "300"}
        assert {job.execute_at for job in actor.jobs.values()} == {30_000_000}  # last batch won


async def test_full_channel_answers_resource_exhausted() -> None:
    actor = FakeActor(paused=True)  # it takes one request and sits on it: the channel fills
    async with running_server(capacity=1, actor=actor) as server:
        results = await run_client(
            server.port,
            """
            import concurrent.futures
            pool = concurrent.futures.ThreadPoolExecutor(8)
            calls = [pool.submit(call, "GetJob", pb.GetJobRequest(id="x")) for _ in range(8)]
            deadline = time.monotonic() + 10
            while sum(f.done() for f in calls) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # a seventh answer would show up now
            refused = [f for f in calls if f.done() and "RESOURCE_EXHAUSTED" in str(f.result())]
            out(len(refused))
            os._exit(0)  # do not wait for the two calls the paused actor holds
            """,
        )
        actor.resume()
    assert results == [6]  # one held by the actor, one in the channel, the rest refused


async def test_closed_channel_answers_unavailable() -> None:
    send, receive = trio.open_memory_channel[Request](10)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(serve_grpc, send, listen="127.0.0.1:0"))
        await receive.aclose()
        [result] = await run_client(port, 'out(call("GetJob", pb.GetJobRequest(id="x")))')
        nursery.cancel_scope.cancel()
    assert result == {"error": "UNAVAILABLE", "message": "server is shutting down"}


async def test_every_interface_is_one_port_for_ipv4_and_ipv6() -> None:
    # "[::]" was grpc-core's dual-stack socket: IPv4 clients reach it too, on one port.
    send, receive = trio.open_memory_channel[Request](10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(FakeActor().run, receive)
        port = await nursery.start(functools.partial(serve_grpc, send, listen="[::]:0"))
        [result] = await run_client(port, 'out(call("GetJob", pb.GetJobRequest(id="x")))')
        nursery.cancel_scope.cancel()
    assert result["error"] == "NOT_FOUND"


async def test_tokens_guard_the_scheduler_but_not_health() -> None:
    async with running_server(auth=TokenTable(["s3cret", "other"])) as server:
        results = await run_client(
            server.port,
            """
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            out(call("GetJob", pb.GetJobRequest(id="x")))
            for token in ("nope", "other"):
                md = [("authorization", "Bearer " + token)]
                out(call("GetJob", pb.GetJobRequest(id="x"), metadata=md))
            watch = stub.WatchJobs(pb.WatchJobsRequest())
            try:
                next(watch)
            except grpc.RpcError as e:
                out(e.code().name)
            h = health_pb2_grpc.HealthStub(channel)
            out(h.Check(health_pb2.HealthCheckRequest()).status)
            """,
        )
    missing, wrong, right, watch, health = results
    assert missing == {"error": "UNAUTHENTICATED", "message": "missing or invalid token"}
    assert wrong["error"] == "UNAUTHENTICATED"
    assert right == {"error": "NOT_FOUND", "message": "no job x"}
    assert watch == "UNAUTHENTICATED"
    assert health == 1  # SERVING


async def test_watch_snapshot_then_batched_events() -> None:
    async with running_server() as server:
        server.actor.jobs["w.old"] = Job("w.old", 5, Status.EXECUTED)
        server.actor.jobs["other"] = Job("other", 5)
        argv, env = client_command(
            server.port,
            """
            watch = stub.WatchJobs(pb.WatchJobsRequest(prefix="w.", include_snapshot=True))
            watch.initial_metadata()
            out("ready")
            messages = []
            for message in watch:
                messages.append(MessageToDict(message))
                if sum(len(m.get("events", [])) for m in messages) >= 1 + 400:
                    break
            out(messages)
            """,
        )
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(trio.run_process, argv, env=env, stdout=subprocess.PIPE)
            )
            lines = _lines(process.stdout)
            assert await lines.__anext__() == "ready"
            for i in range(400):  # 400 commits in quick succession
                server.actor.publish([JobEvent(Job(f"w.{i}", i), at=i + 1)])
                if i % 50 == 0:
                    await trio.sleep(0.01)
            messages = await lines.__anext__()
    snapshot, end_of_snapshot, *live = messages
    assert snapshot["snapshot"] is True
    assert [e["job"]["id"] for e in snapshot["events"]] == ["w.old"]
    assert snapshot["events"][0]["type"] == "JOB_EVENT_TYPE_EXECUTED"
    assert end_of_snapshot == {}  # an empty change message: the snapshot is complete
    ids = [e["job"]["id"] for m in live for e in m["events"]]
    assert ids == [f"w.{i}" for i in range(400)]
    assert len(live) < 50  # batched per tick, not one message per commit


async def test_watch_that_falls_behind_ends_with_resource_exhausted() -> None:
    big = b"x" * 100_000  # large events fill the transport quickly while the client does not read
    async with running_server(max_watch_buffer_bytes=2_000_000) as server:
        argv, env = client_command(
            server.port,
            """
            watch = stub.WatchJobs(pb.WatchJobsRequest())
            watch.initial_metadata()
            out("ready")
            sys.stdin.readline()  # wait until the server pushed more than the buffer holds
            try:
                for message in watch:
                    pass
            except grpc.RpcError as e:
                out([e.code().name, e.details()])
            """,
        )
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process, argv, env=env, stdout=subprocess.PIPE, stdin=subprocess.PIPE
                )
            )
            lines = _lines(process.stdout)
            assert await lines.__anext__() == "ready"
            sink = server.actor.sinks[0]
            for _ in range(2000):  # the handler writes until flow control stops it, then buffers
                if not sink([JobEvent(Job("j", 0, payload=big), at=1)] * 10):
                    break
                await trio.sleep(0.005)
            else:
                pytest.fail("the sink never refused events")
            await process.stdin.send_all(b"go\n")
            outcome = await lines.__anext__()
    assert outcome == ["RESOURCE_EXHAUSTED", "watch fell behind"]


async def test_a_watcher_that_never_reads_again_is_dropped_at_once() -> None:
    # Its handler used to wait for ever in a write the client would never take,
    # holding the stream and what it had taken from the buffer.
    big = b"x" * 100_000
    async with running_server(max_watch_buffer_bytes=2_000_000) as server:
        argv, env = client_command(
            server.port,
            """
            watch = stub.WatchJobs(pb.WatchJobsRequest())
            watch.initial_metadata()
            out("ready")
            sys.stdin.readline()  # never reads the stream
            """,
        )
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process, argv, env=env, stdout=subprocess.PIPE, stdin=subprocess.PIPE
                )
            )
            lines = _lines(process.stdout)
            assert await lines.__anext__() == "ready"
            sink = server.actor.sinks[0]
            for _ in range(2000):
                if not sink([JobEvent(Job("j", 0, payload=big), at=1)] * 10):
                    break
                await trio.sleep(0.005)
            else:
                pytest.fail("the sink never refused events")
            with trio.fail_after(10):  # the handler ended (it unsubscribes on its way out)
                await server.actor.unsubscribed.wait()
            await process.stdin.send_all(b"done\n")


async def test_each_event_is_encoded_once_for_every_watcher() -> None:
    encode = grpc_server._EventEncoder()
    event = JobEvent(Job("w.a", 5, payload=b"x" * 10_000), at=7)
    first = encode(event)
    assert encode(event) is first  # the next watcher of the same publish shares the bytes
    response = pb.WatchJobsResponse.FromString(first + encode(JobEvent(Job("w.b", 6), at=8)))
    assert [e.job.id for e in response.events] == ["w.a", "w.b"]
    assert response.events[0].job.payload == b"x" * 10_000
    await trio.testing.wait_all_tasks_blocked()  # the publish is over: its cache is dropped
    again = encode(event)
    assert again == first and again is not first


async def test_rule_pages_stay_under_the_message_size_limit() -> None:
    async with running_server(max_message_bytes=64 * 1024) as server:
        [pages] = await run_client(
            server.port,
            """
            for i in range(20):
                rule = pb.Rule(id=f"r{i:02d}", pattern="p" * 10_000, shell={"command": "x.sh"})
                assert "error" not in call("SetRule", pb.SetRuleRequest(rule=rule))
            pages, token = [], ""
            while True:
                page = call("ListRules", pb.ListRulesRequest(page_token=token))
                assert "error" not in page, page
                pages.append([rule["id"] for rule in page["rules"]])
                token = page.get("nextPageToken", "")
                if not token:
                    break
            out(pages)
            """,
        )
    assert [rule_id for page in pages for rule_id in page] == [f"r{i:02d}" for i in range(20)]
    assert 1 < len(pages) and all(len(page) <= 6 for page in pages)


async def test_a_bulk_stream_with_more_failures_than_an_answer_holds_stops() -> None:
    # Its failures are listed in the one answer: they used to pile up without
    # bound, and an answer past the message size limit could not be sent anyway.
    async with running_server(max_message_bytes=64 * 1024) as server:
        [outcome, after] = await run_client(
            server.port,
            """
            ok = {"seconds": 100}
            def batches():
                for b in range(100):  # 100,000 jobs, each refused (no id)
                    yield pb.SetJobsRequest(jobs=[pb.SetJobRequest(id="", execute_at=ok)] * 1000)
            out(call("StreamSetJobs", batches()))
            out(call("StreamSetJobs", iter([pb.SetJobsRequest(
                jobs=[pb.SetJobRequest(id="fine", execute_at=ok)])])))
            """,
        )
    assert outcome["error"] == "RESOURCE_EXHAUSTED"
    assert outcome["message"].startswith("too many failed jobs to list in one answer: of the first")
    assert "were set and" in outcome["message"]
    assert after == {"accepted": "1"}


async def test_shutdown_drains_calls_and_ends_watches(capfd) -> None:
    actor = FakeActor(delay_s=0.5)
    async with running_server(actor=actor, grace_s=5.0) as server:
        argv, env = client_command(
            server.port,
            """
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            next(health)  # SERVING
            watch = stub.WatchJobs(pb.WatchJobsRequest())
            watch.initial_metadata()
            slow = stub.SetJob.future(pb.SetJobRequest(id="slow", execute_at={"seconds": 1}))
            out("ready")
            try:
                for message in watch:
                    pass
                out(["OK", ""])
            except grpc.RpcError as e:
                out([e.code().name, e.details()])
            out(MessageToDict(slow.result())["job"]["id"])
            out([health_pb2.HealthCheckResponse.ServingStatus.Name(r.status) for r in health])
            """,
        )
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(trio.run_process, argv, env=env, stdout=subprocess.PIPE)
            )
            lines = _lines(process.stdout)
            assert await lines.__anext__() == "ready"
            await trio.sleep(0.1)  # the slow SetJob is now inside the actor
            start = trio.current_time()
            server.cancel_scope.cancel()
            with trio.fail_after(4):
                await server.stopped.wait()
            elapsed = trio.current_time() - start
            watch_end = await lines.__anext__()
            slow = await lines.__anext__()
            health = await lines.__anext__()
    assert watch_end == ["UNAVAILABLE", "server is shutting down"]
    assert slow == "slow"  # the in-flight call finished during the drain
    assert health == ["NOT_SERVING"]  # then the health watch ended normally
    assert elapsed < 2.0  # no waiting out the grace period for the open watch
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err


async def test_grace_period_bounds_the_drain() -> None:
    actor = FakeActor(paused=True)  # a call that gets no answer
    async with running_server(actor=actor, grace_s=0.3) as server:
        argv, env = client_command(
            server.port,
            """
            out("ready")
            out(call("GetJob", pb.GetJobRequest(id="x")))
            """,
        )
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(trio.run_process, argv, env=env, stdout=subprocess.PIPE)
            )
            lines = _lines(process.stdout)
            assert await lines.__anext__() == "ready"
            await trio.sleep(0.3)
            server.cancel_scope.cancel()
            with trio.fail_after(3):
                await server.stopped.wait()
            result = await lines.__anext__()
        actor.resume()
    assert result["error"] in ("CANCELLED", "UNAVAILABLE")


async def test_a_port_in_use_is_an_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        send, _receive = trio.open_memory_channel[Request](1)
        with pytest.raises(OSError, match="could not start"):
            await serve_grpc(send, listen=f"127.0.0.1:{port}")


async def test_tls(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl makes the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await trio.run_process(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext"]
        + ["subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        capture_stdout=True,
        capture_stderr=True,
    )
    async with running_server(tls_cert=cert, tls_key=key) as server:
        [result] = await run_client(
            server.port,
            f"""
            creds = grpc.ssl_channel_credentials(open({str(cert)!r}, "rb").read())
            target = "localhost:" + os.environ["PORT"]
            stub = pb_grpc.SchedulerStub(grpc.secure_channel(target, creds))
            out(call("GetJob", pb.GetJobRequest(id="x")))
            """,
        )
    assert result["error"] == "NOT_FOUND"


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[Any]:
    """The JSON values a client script prints, one per line, as they come."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)
        with trio.fail_after(20):
            chunk = await stream.receive_some()
        if not chunk:
            return
        buffer += chunk
