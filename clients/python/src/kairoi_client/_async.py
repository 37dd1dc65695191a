"""The asyncio client, on grpc.aio.

grpc.aio runs on asyncio only: use AsyncClient from asyncio code. Trio code
should use the synchronous Client through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import grpc
import grpc.aio

from kairoi_client import _types as t
from kairoi_client._proto import scheduler_pb2 as pb
from kairoi_client._proto import scheduler_pb2_grpc as pb_grpc
from kairoi_client._sync import DEFAULT_TARGET
from kairoi_client._types import (
    BulkResult,
    Job,
    JobEvent,
    JobLike,
    JobStatus,
    Misfire,
    Overlap,
    Rule,
    ServerInfo,
    SetJobResult,
)

P = ParamSpec("P")
R = TypeVar("R")


def _translating(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except grpc.RpcError as error:
            raise t.from_rpc_error(error) from None

    return wrapper


class AsyncClient:
    """Same methods as Client, as coroutines and async iterators (asyncio only)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 30.0,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=list(options))
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=list(options))
        self._stub = pb_grpc.SchedulerStub(self._channel)
        self._metadata = t.metadata(token)
        self._timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _kw(self) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self._timeout}

    # -- jobs ------------------------------------------------------------------

    @_translating
    async def set_job(self, id: str, execute_at: datetime, payload: bytes = b"") -> Job:
        request = t.new_job_to_pb(t.NewJob(id, execute_at, payload))
        return t.job_from_pb((await self._stub.SetJob(request, **self._kw())).job)

    @_translating
    async def set_jobs(self, jobs: Iterable[JobLike]) -> list[SetJobResult]:
        request = t.new_jobs_to_pb(jobs)
        return t.set_job_results(request, await self._stub.SetJobs(request, **self._kw()))

    async def set_jobs_batched(self, jobs: Iterable[JobLike], batch_size: int = 1000) -> BulkResult:
        result = BulkResult()
        for batch in t.batched(jobs, batch_size):
            for item in await self.set_jobs(batch):
                if item.ok:
                    result.accepted += 1
                else:
                    result.failures.append(item)
        return result

    @_translating
    async def stream_set_jobs(self, jobs: Iterable[JobLike], batch_size: int = 1000) -> BulkResult:
        requests = (t.new_jobs_to_pb(batch) for batch in t.batched(jobs, batch_size))
        response = await self._stub.StreamSetJobs(requests, metadata=self._metadata)
        return BulkResult(response.accepted, [t.failure_from_pb(f) for f in response.failures])

    @_translating
    async def get_job(self, id: str) -> Job:
        return t.job_from_pb((await self._stub.GetJob(pb.GetJobRequest(id=id), **self._kw())).job)

    @_translating
    async def delete_job(self, id: str) -> None:
        await self._stub.DeleteJob(pb.DeleteJobRequest(id=id), **self._kw())

    @_translating
    async def list_jobs_page(
        self,
        prefix: str = "",
        status: JobStatus | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Job], str]:
        request = pb.ListJobsRequest(
            prefix=prefix,
            status=t.status_filter(status),
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._stub.ListJobs(request, **self._kw())
        return [t.job_from_pb(job) for job in response.jobs], response.next_page_token

    async def list_jobs(
        self, prefix: str = "", status: JobStatus | None = None, page_size: int = 0
    ) -> AsyncIterator[Job]:
        token = ""
        while True:
            jobs, token = await self.list_jobs_page(prefix, status, page_size, token)
            for job in jobs:
                yield job
            if not token:
                return

    # -- recurring jobs (docs/recurring-jobs.md) -------------------------------------

    @_translating
    async def schedule_job(
        self,
        id: str,
        expression: str,
        *,
        time_zone: str = "UTC",
        start: datetime | None = None,
        end: datetime | None = None,
        max_runs: int | None = None,
        jitter: timedelta | None = None,
        misfire: Misfire | str = "coalesce",
        catchup_window: timedelta | None = None,
        overlap: Overlap | str = "skip",
        payload: bytes = b"",
    ) -> Job:
        """Create or replace the recurring job `id`; returns it planned at its first
        occurrence (`execute_at`), its schedule completed by the server.

        expression: cron ("*/15 * * * *"), a macro ("@daily"), "every 15m" or
        "PT15M"; time_zone: the IANA zone cron fields are read in. misfire:
        "coalesce", "all" or "skip"; overlap: "skip" or "buffer_one". None
        leaves an option unset (no bound, no limit, no jitter). InvalidArgument
        for a bad expression, zone or option; ValueError before any call for an
        unknown policy or a max_runs below 1.
        """
        schedule = t.schedule_to_pb(
            expression,
            time_zone=time_zone,
            start=start,
            end=end,
            max_runs=max_runs,
            jitter=jitter,
            misfire=misfire,
            catchup_window=catchup_window,
            overlap=overlap,
        )
        request = pb.ScheduleJobRequest(id=id, schedule=schedule, payload=payload)
        return t.job_from_pb((await self._stub.ScheduleJob(request, **self._kw())).job)

    @_translating
    async def pause_job(self, id: str) -> Job:
        """Stop a recurring job from firing until resume_job (a run in flight ends normally).
        FailedPrecondition for a one-shot job or a schedule that has ended."""
        return t.job_from_pb(
            (await self._stub.PauseJob(pb.PauseJobRequest(id=id), **self._kw())).job
        )

    @_translating
    async def resume_job(self, id: str) -> Job:
        """Resume a paused recurring job; its misfire policy decides about the
        occurrences that came due meanwhile."""
        return t.job_from_pb(
            (await self._stub.ResumeJob(pb.ResumeJobRequest(id=id), **self._kw())).job
        )

    @_translating
    async def run_job_now(self, id: str) -> Job:
        """Run a recurring job once now (a paused one stays paused); its schedule then
        goes on as planned. FailedPrecondition while a run is in flight or a retry is
        planned, and once the schedule has ended."""
        return t.job_from_pb(
            (await self._stub.RunJobNow(pb.RunJobNowRequest(id=id), **self._kw())).job
        )

    @_translating
    async def preview_job(self, id: str, count: int = 5) -> list[datetime]:
        """The coming `count` (1 to 1,000) occurrences of a recurring job's schedule,
        in UTC: the planned one while its run has not started, then those after it;
        fewer when the schedule ends."""
        request = pb.PreviewJobRequest(id=id, count=count)
        response = await self._stub.PreviewJob(request, **self._kw())
        return [t.from_timestamp(at) for at in response.occurrences]

    # -- rules -----------------------------------------------------------------

    @_translating
    async def set_rule(self, rule: Rule) -> Rule:
        request = pb.SetRuleRequest(rule=t.rule_to_pb(rule))
        return t.rule_from_pb((await self._stub.SetRule(request, **self._kw())).rule)

    @_translating
    async def get_rule(self, id: str) -> Rule:
        response = await self._stub.GetRule(pb.GetRuleRequest(id=id), **self._kw())
        return t.rule_from_pb(response.rule)

    @_translating
    async def delete_rule(self, id: str) -> None:
        await self._stub.DeleteRule(pb.DeleteRuleRequest(id=id), **self._kw())

    @_translating
    async def _rules_page(self, prefix: str, token: str) -> tuple[list[Rule], str]:
        request = pb.ListRulesRequest(prefix=prefix, page_token=token)
        response = await self._stub.ListRules(request, **self._kw())
        return [t.rule_from_pb(rule) for rule in response.rules], response.next_page_token

    async def list_rules(self, prefix: str = "") -> AsyncIterator[Rule]:
        token = ""
        while True:
            rules, token = await self._rules_page(prefix, token)
            for rule in rules:
                yield rule
            if not token:
                return

    # -- watching and info -----------------------------------------------------

    async def watch_jobs(self, prefix: str = "", include_snapshot: bool = False) -> AsyncJobWatch:
        """An async iterator of job events; it returns once the server registered the watch."""
        call = self._stub.WatchJobs(
            pb.WatchJobsRequest(prefix=prefix, include_snapshot=include_snapshot),
            metadata=self._metadata,
        )
        try:
            await call.initial_metadata()
        except grpc.RpcError as error:
            raise t.from_rpc_error(error) from None
        return AsyncJobWatch(call)

    @_translating
    async def server_info(self) -> ServerInfo:
        response = await self._stub.GetServerInfo(pb.GetServerInfoRequest(), **self._kw())
        return t.server_info_from_pb(response)


class AsyncJobWatch:
    """`async for event in watch`; `cancel()` or `async with` ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._batches = self._read()
        self._pending: deque[JobEvent] = deque()

    async def _read(self) -> AsyncIterator[list[JobEvent]]:
        try:
            async for message in self._call:
                yield t.events_from_pb(message)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.CANCELLED and self._call.cancelled():
                return
            raise t.from_rpc_error(error) from None

    async def batches(self) -> AsyncIterator[list[JobEvent]]:
        """The events message by message, as the server batched them (one per tick)."""
        while self._pending:
            yield [self._pending.popleft() for _ in range(len(self._pending))]
        async for batch in self._batches:
            yield batch

    def __aiter__(self) -> AsyncJobWatch:
        return self

    async def __anext__(self) -> JobEvent:
        while not self._pending:
            self._pending.extend(await anext(self._batches))  # StopAsyncIteration ends it
        return self._pending.popleft()

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncJobWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()
