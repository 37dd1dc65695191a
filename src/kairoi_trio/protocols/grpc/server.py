"""The gRPC front end: a grpc.aio server in its own thread, bridged to the Trio command actor.

grpcio's server runs on asyncio, the rest of kairoi-trio on Trio. Rather than
mixing the two event loops in one thread, the gRPC server gets a plain thread
with its own asyncio loop, and the two sides meet in exactly two places:

- asyncio -> Trio: a handler builds a `Request(commands, reply)` and hands it to
  the actor's memory channel with `TrioToken.run_sync_soon` + `send_nowait`.
  A full channel answers RESOURCE_EXHAUSTED, a closed one (or a finished Trio
  run) UNAVAILABLE; nothing ever blocks the Trio thread.
- Trio -> asyncio: the actor calls `reply` (and watch sinks) in the Trio
  thread; they only schedule work on the asyncio loop with
  `loop.call_soon_threadsafe`, which completes the handler's future.

The thread is a plain `threading.Thread` (not `trio.to_thread`), because it
lives as long as the server and must not hold a worker-thread token; Trio waits
for it through a `trio.Event` that the thread sets on its way out.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import structlog
import trio
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode, Request, Result
from kairoi_trio.core.auth import Role, TokenTable, denial, permitted
from kairoi_trio.model import JobEvent
from kairoi_trio.protocols.grpc import convert
from kairoi_trio.protocols.snapshot import next_page as next_snapshot_page

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name  # "kairoi.v1.Scheduler"
STREAM_WINDOW = 4  # StreamSetJobs batches in flight at once
WATCH_TICK_S = 0.05  # WatchJobs sends what a tick brought, then waits for the next tick
# A WatchJobs message carries events up to this many bytes (one event at least):
# what a watcher that stops reading holds in flight, besides its buffer.
WATCH_MESSAGE_BYTES = 64 << 10
DEFAULT_WATCH_BUFFER_BYTES = 16 << 20  # [grpc] max_watch_buffer_bytes
_STOP_MARGIN_S = 5.0  # how long past grace_s Trio waits for the thread before giving up
_HEALTH_SETTLE_S = 0.05  # time for health watchers to send NOT_SERVING before they end
_SIZE_MARGIN = 1024  # room for a message's own fields next to its repeated ones

T = TypeVar("T")
_OK = pb.Status(code=0)
_OK_RESULT = pb.SetJobResult(status=_OK)


async def serve_grpc(
    requests: trio.MemorySendChannel[Request],
    *,
    listen: str = "127.0.0.1:5679",
    grace_s: float = 5.0,
    auth: TokenTable | None = None,
    max_message_bytes: int = 4 << 20,
    max_watch_buffer_bytes: int = DEFAULT_WATCH_BUFFER_BYTES,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    serving: Serving | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve kairoi.v1.Scheduler, health and reflection until cancelled.

    Health says SERVING while `serving` is ready ("can accept writes": not while
    storage writes fail), NOT_SERVING otherwise, for both "" and kairoi.v1.Scheduler.

    `task_status.started(port)` reports the bound port (useful with port 0) once
    the server listens and health says SERVING. On cancellation: health goes
    NOT_SERVING, open WatchJobs streams end with UNAVAILABLE, the server stops
    accepting and in-flight calls get `grace_s` to finish (the actor must still
    be running meanwhile: close its channel only after this returns).
    `max_watch_buffer_bytes`: the encoded changes a WatchJobs stream may have
    waiting or in flight; beyond it the stream ends with RESOURCE_EXHAUSTED.
    `auth`: the tokens kairoi.v1 calls must carry, by role (none: no authentication).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("gRPC TLS needs both a certificate and a key")
    credentials = None
    if tls_cert is not None and tls_key is not None:
        key, cert = await trio.Path(tls_key).read_bytes(), await trio.Path(tls_cert).read_bytes()
        credentials = grpc.ssl_server_credentials([(key, cert)])

    thread = _ServerThread(
        _Settings(
            listen,
            grace_s,
            auth or TokenTable(),
            max_message_bytes,
            credentials,
            max_watch_buffer_bytes,
        ),
        trio.lowlevel.current_trio_token(),
        requests,
    )
    thread.start()
    try:
        await thread.started.wait()
        if thread.port is None:
            raise OSError(f"gRPC server could not start on {listen}: {thread.error}")
        log.info("grpc listening", listen=listen, port=thread.port, tls=credentials is not None)
        if serving is not None:
            serving.listen(thread.set_serving)
            thread.set_serving(serving.ready)
        task_status.started(thread.port)
        await thread.done.wait()
        raise RuntimeError(f"gRPC server thread stopped unexpectedly: {thread.error!r}")
    finally:
        thread.request_stop()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace_s + _STOP_MARGIN_S):
                await thread.done.wait()
            if not thread.done.is_set():
                log.error("grpc stop timed out", grace_s=grace_s)
            else:
                log.info("grpc stopped")


@dataclass(frozen=True)
class _Settings:
    listen: str
    grace_s: float
    auth: TokenTable
    max_message_bytes: int
    credentials: grpc.ServerCredentials | None
    watch_buffer_bytes: int = DEFAULT_WATCH_BUFFER_BYTES


class _ServerThread(threading.Thread):
    """Owns the asyncio loop and the grpc.aio server; reports to Trio through events."""

    def __init__(
        self,
        settings: _Settings,
        token: trio.lowlevel.TrioToken,
        requests: trio.MemorySendChannel[Request],
    ) -> None:
        super().__init__(name="grpc-server", daemon=True)
        self.settings = settings
        self.token = token
        self.requests = requests
        self.started = trio.Event()  # set (in Trio) once port or error is known
        self.done = trio.Event()  # set (in Trio) when the thread ends
        self.port: int | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._health: _Health | None = None

    # -- called from Trio ------------------------------------------------------

    def set_serving(self, ok: bool) -> None:
        """Health: SERVING (ok) or NOT_SERVING, from now on (ignored once shutting down)."""
        with self._lock:
            loop, health = self._loop, self._health
        if loop is None or health is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(health.follow(ok), loop)
        except RuntimeError:  # the loop is already closed
            pass

    def request_stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            if self._loop is not None and self._stop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._stop.set)
                except RuntimeError:  # the loop is already closed
                    pass

    # -- the thread ------------------------------------------------------------

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to Trio, which raises or logs it
            self.error = exc
            if self.port is not None:
                log.exception("grpc thread crashed")
        finally:
            self._to_trio(self.started.set)
            self._to_trio(self.done.set)

    def _to_trio(self, fn: Callable[[], object]) -> None:
        try:
            self.token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    async def _main(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = loop
            self._stop = asyncio.Event()
            if self._stop_requested:
                self._stop.set()
        stop = self._stop

        server = grpc.aio.server(
            interceptors=[
                *([_AuthInterceptor(settings.auth)] if settings.auth.required else []),
                _RequestCheck(),  # after auth: a client without a token learns nothing more
            ],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            ],
        )
        scheduler = SchedulerServicer(_Bridge(self.token, self.requests, loop), settings)
        _add_scheduler(scheduler, server)
        health = _Health()
        with self._lock:
            self._health = health
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        _enable_reflection(
            server,
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
        )
        if settings.credentials is not None:
            port = server.add_secure_port(settings.listen, settings.credentials)
        else:
            port = server.add_insecure_port(settings.listen)
        await server.start()
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.port = port
        self._to_trio(self.started.set)

        await stop.wait()
        log.info("grpc stopping", grace_s=settings.grace_s)
        await health.shut_down()
        scheduler.close_watches()
        await server.stop(settings.grace_s)


class Serving(Protocol):
    """Readiness as health reports it (observability.metrics.Readiness)."""

    @property
    def ready(self) -> bool: ...

    def listen(self, callback: Callable[[bool], None]) -> None: ...


class _Health(health_aio.HealthServicer):
    """grpcio-health-checking's servicer, whose Watch streams also end at shutdown.

    Left alone, a probe's Watch stream never ends, so it would hold the drain
    for the whole grace period and then be cancelled (grpcio prints a traceback
    for that). Here watchers get NOT_SERVING, then their stream ends normally.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.Event()

    async def Watch(self, request: Any, context: Any) -> None:
        inner = asyncio.ensure_future(super().Watch(request, context))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({inner, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            inner.cancel()  # parked on its condition by now, not in the middle of a write
            await asyncio.gather(inner, return_exceptions=True)

    async def follow(self, ok: bool) -> None:
        """Every service SERVING or NOT_SERVING (a no-op once shutting down)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.set(service, status)

    async def shut_down(self) -> None:
        await self.enter_graceful_shutdown()  # every service NOT_SERVING, watchers notified
        await asyncio.sleep(_HEALTH_SETTLE_S)  # let watchers send it
        self._closed.set()


class _Bridge:
    """Hands command batches to the Trio actor and awaits their results on the asyncio side."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        requests: trio.MemorySendChannel[Request],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._token = token
        self._requests = requests
        self._loop = loop

    def call(
        self, commands: Sequence[c.Command], *, queued: asyncio.Future[None] | None = None
    ) -> asyncio.Future[list[Result]]:
        """A future of the batch's results; a CommandError if the actor can't take the batch.

        `queued`, if given, is resolved once the batch is in the actor's channel.
        """
        loop = self._loop
        future: asyncio.Future[list[Result]] = loop.create_future()

        def reply(results: list[Result]) -> None:  # Trio thread, called once by the actor
            self._call_soon(_resolve, future, results)

        def fail(code: ErrorCode, message: str) -> None:  # Trio thread
            self._call_soon(_reject, future, CommandError(code, message))

        request = Request(commands, reply)

        def send() -> None:  # Trio thread; must not raise
            try:
                self._requests.send_nowait(request)
                if queued is not None:
                    self._call_soon(_resolve, queued, None)
            except trio.WouldBlock:
                fail(ErrorCode.RESOURCE_EXHAUSTED, "server busy: too many requests, retry later")
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                fail(ErrorCode.UNAVAILABLE, "server is shutting down")

        try:
            self._token.run_sync_soon(send)
        except trio.RunFinishedError:
            future.set_exception(CommandError(ErrorCode.UNAVAILABLE, "server is shutting down"))
        return future

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the asyncio loop is closed: the call was abandoned at shutdown
            pass


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():  # the caller may have gone away (cancelled)
        future.set_result(value)


def _reject(future: asyncio.Future[list[Result]], error: CommandError) -> None:
    if not future.done():
        future.set_exception(error)


# -- the service ------------------------------------------------------------------


Handler = Callable[..., Awaitable[Any]]


def _rpc(handler: Handler) -> Handler:
    """Turn a CommandError raised anywhere in a handler into the matching gRPC status."""

    @functools.wraps(handler)
    async def wrapper(self: SchedulerServicer, request: Any, context: Any) -> Any:
        try:
            return await handler(self, request, context)
        except CommandError as error:
            log.debug(
                "grpc error", method=handler.__name__, code=error.code.name, msg=error.message
            )
            # The message may quote client input (an id of 65,535 bytes): cut it to fit
            # the status trailer, which would otherwise turn into RESOURCE_EXHAUSTED.
            details = convert.status_details(error.message, *convert.client_strings(request))
            await context.abort(convert.status_code(error), details)

    return wrapper


class SchedulerServicer(pb_grpc.SchedulerServicer):
    """kairoi.v1.Scheduler: converts each call into commands and the results back."""

    def __init__(self, bridge: _Bridge, settings: _Settings) -> None:
        self._bridge = bridge
        self._budget = settings.max_message_bytes - _SIZE_MARGIN
        self._watch_limit = settings.watch_buffer_bytes
        self._encode_event = _EventEncoder(bridge._token)
        self._watches: set[_Watch] = set()
        self._closing = False

    async def _call(self, commands: Sequence[c.Command]) -> list[Result]:
        return await self._bridge.call(commands)

    async def _one(self, command: c.Command) -> Any:
        """The result of one command; a CommandError result is raised."""
        [result] = await self._call([command])
        if isinstance(result, CommandError):
            raise result
        return result

    # -- jobs ------------------------------------------------------------------

    @_rpc
    async def SetJob(self, request: pb.SetJobRequest, context: Any) -> pb.SetJobResponse:
        job = await self._one(convert.set_job_from_pb(request))
        return pb.SetJobResponse(job=convert.job_to_pb(job))

    async def _set_batch(self, requests: Iterable[pb.SetJobRequest]) -> list[pb.Status]:
        """One status per job: conversion errors stay local, the rest go to the actor together."""
        batch = _JobBatch(requests)
        if batch.commands:
            batch.settle(await self._call(batch.commands))
        return batch.statuses

    @_rpc
    async def SetJobs(self, request: pb.SetJobsRequest, context: Any) -> pb.SetJobsResponse:
        statuses = await self._set_batch(request.jobs)
        response = pb.SetJobsResponse()
        # Copying one prebuilt OK result is several times cheaper than building each one.
        response.results.extend(
            _OK_RESULT if status is _OK else pb.SetJobResult(status=status) for status in statuses
        )
        return response

    @_rpc
    async def StreamSetJobs(
        self, request_iterator: AsyncIterator[pb.SetJobsRequest], context: Any
    ) -> pb.StreamSetJobsResponse:
        """Up to STREAM_WINDOW batches in flight, handed to the actor strictly in stream order.

        While the actor applies and fsyncs one batch, the next ones are read and
        converted. A batch is only handed over once the previous one is in the
        actor's queue, so a full queue (waited out, not failed) cannot reorder them.
        """
        response = pb.StreamSetJobsResponse()
        in_flight: deque[tuple[_JobBatch, asyncio.Future[list[Result]] | None]] = deque()
        # The failures are listed in the one answer, so they must fit in it: past
        # the message size limit the stream stops (memory stays bounded too).
        failed = failures_size = 0
        too_many = False

        async def settle_oldest() -> None:
            nonlocal failed, failures_size, too_many
            batch, results = in_flight.popleft()
            if results is not None:
                batch.settle(await results)
            for status, request in zip(batch.statuses, batch.requests, strict=True):
                if status.code == 0:
                    response.accepted += 1
                    continue
                failure = pb.SetJobFailure(
                    index=response.accepted + failed, id=request.id, status=status
                )
                failed += 1
                failures_size += failure.ByteSize() + 6  # with its tag and length
                if failures_size > self._budget:
                    too_many = True
                if not too_many:
                    response.failures.append(failure)

        async for message in request_iterator:
            batch = _JobBatch(message.jobs)
            results = await self._hand_over(batch.commands) if batch.commands else None
            in_flight.append((batch, results))
            if len(in_flight) >= STREAM_WINDOW:
                await settle_oldest()
            if too_many:
                break
        while in_flight:  # handed over: they are applied whatever happens, so count them
            await settle_oldest()
        if too_many:
            raise CommandError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"too many failed jobs to list in one answer: of the first "
                f"{response.accepted + failed} jobs of the stream, {response.accepted} were "
                f"set and {failed} failed; the rest of the stream was not read",
            )
        return response

    async def _hand_over(self, commands: Sequence[c.Command]) -> asyncio.Future[list[Result]]:
        """Put a batch in the actor's queue, waiting out a full queue; returns its results."""
        loop = asyncio.get_running_loop()
        delay = 0.005
        while True:
            queued: asyncio.Future[None] = loop.create_future()
            results = self._bridge.call(commands, queued=queued)
            either: set[asyncio.Future[Any]] = {queued, results}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if queued.done():
                return results
            error = results.exception()
            if not (isinstance(error, CommandError) and error.code is ErrorCode.RESOURCE_EXHAUSTED):
                return results  # UNAVAILABLE and the like: raised when awaited
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        job = await self._one(c.GetJob(request.id))
        return pb.GetJobResponse(job=convert.job_to_pb(job))

    @_rpc
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: Any) -> pb.DeleteJobResponse:
        await self._one(c.DeleteJob(request.id))
        return pb.DeleteJobResponse()

    @_rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        page: c.JobPage = await self._one(convert.list_jobs_from_pb(request))
        # Converted only as far as the message size limit allows: 1,000 jobs of
        # 1 MiB would otherwise be copied in full to send 4 of them.
        jobs = next(_fitting(page.jobs, convert.job_to_pb, self._budget), [])
        if len(jobs) < len(page.jobs):  # cut short to fit the message size limit
            return pb.ListJobsResponse(jobs=jobs, next_page_token=jobs[-1].id)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=page.next_after)

    # -- recurring jobs -----------------------------------------------------------

    @_rpc
    async def ScheduleJob(
        self, request: pb.ScheduleJobRequest, context: Any
    ) -> pb.ScheduleJobResponse:
        job = await self._one(convert.schedule_job_from_pb(request))
        return pb.ScheduleJobResponse(job=convert.job_to_pb(job))

    @_rpc
    async def PauseJob(self, request: pb.PauseJobRequest, context: Any) -> pb.PauseJobResponse:
        job = await self._one(c.PauseJob(request.id))
        return pb.PauseJobResponse(job=convert.job_to_pb(job))

    @_rpc
    async def ResumeJob(self, request: pb.ResumeJobRequest, context: Any) -> pb.ResumeJobResponse:
        job = await self._one(c.ResumeJob(request.id))
        return pb.ResumeJobResponse(job=convert.job_to_pb(job))

    @_rpc
    async def RunJobNow(self, request: pb.RunJobNowRequest, context: Any) -> pb.RunJobNowResponse:
        job = await self._one(c.RunJobNow(request.id))
        return pb.RunJobNowResponse(job=convert.job_to_pb(job))

    @_rpc
    async def PreviewJob(
        self, request: pb.PreviewJobRequest, context: Any
    ) -> pb.PreviewJobResponse:
        occurrences = await self._one(convert.preview_job_from_pb(request))
        return convert.preview_to_pb(occurrences)

    # -- rules -----------------------------------------------------------------

    @_rpc
    async def SetRule(self, request: pb.SetRuleRequest, context: Any) -> pb.SetRuleResponse:
        stored = await self._one(c.SetRule(convert.rule_from_pb(request.rule)))
        return pb.SetRuleResponse(rule=convert.rule_to_pb(stored))

    @_rpc
    async def GetRule(self, request: pb.GetRuleRequest, context: Any) -> pb.GetRuleResponse:
        rule = await self._one(c.GetRule(request.id))
        return pb.GetRuleResponse(rule=convert.rule_to_pb(rule))

    @_rpc
    async def DeleteRule(
        self, request: pb.DeleteRuleRequest, context: Any
    ) -> pb.DeleteRuleResponse:
        await self._one(c.DeleteRule(request.id))
        return pb.DeleteRuleResponse()

    @_rpc
    async def ListRules(self, request: pb.ListRulesRequest, context: Any) -> pb.ListRulesResponse:
        asked = convert.list_rules_from_pb(request)
        command = c.rule_page(asked.prefix, asked.after, asked.limit)
        rules, next_after = c.next_rules_after(await self._one(command), asked.limit)
        fitting = next(_fitting(rules, convert.rule_to_pb, self._budget), [])
        if len(fitting) < len(rules):  # cut short to fit the message size limit
            return pb.ListRulesResponse(rules=fitting, next_page_token=fitting[-1].id)
        return pb.ListRulesResponse(rules=fitting, next_page_token=next_after)

    # -- server ----------------------------------------------------------------

    @_rpc
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Any
    ) -> pb.GetServerInfoResponse:
        return convert.server_info_to_pb(await self._one(c.GetInfo()))

    # -- watching --------------------------------------------------------------

    @_rpc
    async def WatchJobs(self, request: pb.WatchJobsRequest, context: Any) -> None:
        if self._closing:
            raise CommandError(ErrorCode.UNAVAILABLE, "server is shutting down")
        loop = asyncio.get_running_loop()
        watch = _Watch(loop, self._watch_limit, self._encode_event)
        self._watches.add(watch)
        try:
            prefix = request.prefix
            page = await self._one(c.Subscribe(prefix, request.include_snapshot, watch.sink))
            await context.send_initial_metadata(())  # tells the client the watch is registered
            if request.include_snapshot:
                budget = min(self._budget, WATCH_MESSAGE_BYTES)
                sent = False
                while True:  # a page an actor step (c.SNAPSHOT_PAGE jobs)
                    last = not page.next_after
                    # Converted a message at a time, as the client takes them; at least
                    # one message in all, even when no job matches.
                    for chunk in _fitting(
                        page.jobs, convert.snapshot_event_to_pb, budget, last and not sent
                    ):
                        await watch.send(context, pb.WatchJobsResponse(events=chunk, snapshot=True))
                        sent = True
                    if last:
                        break
                    page = await next_snapshot_page(
                        self._one, asyncio.sleep, prefix, page.next_after, watch.sink
                    )
                del page
                # An empty change message ends the snapshot, however many messages it
                # took, so a client knows it has caught up before the first change.
                await watch.send(context, b"")
            while True:
                await watch.wait()
                next_tick = loop.time() + WATCH_TICK_S
                for message, size in watch.messages(min(self._budget, WATCH_MESSAGE_BYTES)):
                    await watch.send(context, message)
                    watch.written(size)
                # The rest of the tick (the writes took part of it).
                await asyncio.sleep(max(0.0, next_tick - loop.time()))
        finally:
            self._watches.discard(watch)
            watch.end()
            self._bridge.call([c.Unsubscribe(watch.sink)]).add_done_callback(_ignore_result)

    def close_watches(self) -> None:
        """End every open watch (with UNAVAILABLE) and refuse new ones: part of shutdown."""
        self._closing = True
        for watch in list(self._watches):
            watch.close()


class _JobBatch:
    """A SetJobs batch on its way through: commands for the actor, one status per job."""

    def __init__(self, requests: Iterable[pb.SetJobRequest]) -> None:
        self.requests = list(requests)
        self.statuses: list[pb.Status] = []
        self.commands: list[c.Command] = []
        self._slots: list[int] = []  # status index of each command
        for request in self.requests:
            try:
                self.commands.append(convert.set_job_from_pb(request))
                self._slots.append(len(self.statuses))
                self.statuses.append(_OK)
            except CommandError as error:  # refused at the edge; the others go ahead
                self.statuses.append(convert.error_status(error))

    def settle(self, results: list[Result]) -> None:
        for slot, value in zip(self._slots, results, strict=True):
            if isinstance(value, CommandError):
                self.statuses[slot] = convert.error_status(value, self.requests[slot].id)


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieve it, so asyncio does not log "never retrieved"


def _fitting(
    items: Iterable[T],
    to_pb: Callable[[T], Message],
    budget: int,
    at_least_one: bool = False,
) -> Iterator[list[Any]]:
    """Convert items lazily into runs of messages whose encoded size stays under
    budget (at least one message each; an empty run too when `at_least_one`).

    Lazily: a run is converted only when the caller asks for it, so a caller that
    takes the first run (a page) or sends each run before the next (a snapshot)
    holds one run of converted messages, not all of them.
    """
    chunk: list[Message] = []
    size = 0
    for item in items:
        message = to_pb(item)
        length = message.ByteSize() + 6  # the field tag and length prefix of a repeated entry
        if chunk and size + length > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(message)
        size += length
    if chunk or at_least_one:
        yield chunk


def _serialize(message: Message | bytes) -> bytes:
    """WatchJobs' serializer: messages it encoded itself (shared events) go as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class _Registrations:
    """Stands in for the server to catch the method handlers the generated code registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def _add_scheduler(servicer: SchedulerServicer, server: grpc.aio.Server) -> None:
    """pb_grpc.add_SchedulerServicer_to_server, but WatchJobs may write bytes.

    WatchJobs sends events encoded once for all watchers (_EventEncoder), so its
    serializer lets bytes through; every other method is registered as generated.
    """
    registrations = _Registrations()
    pb_grpc.add_SchedulerServicer_to_server(servicer, registrations)
    handlers = registrations.handlers
    watch = handlers["WatchJobs"]
    handlers["WatchJobs"] = grpc.unary_stream_rpc_method_handler(
        watch.unary_stream,
        request_deserializer=watch.request_deserializer,
        response_serializer=_serialize,
    )
    generic = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


_EVENTS_FIELD = b"\x0a"  # WatchJobsResponse.events: field 1, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _EventEncoder:
    """Each committed JobEvent encoded once, however many watchers it goes to.

    The actor calls every watcher's sink with the same JobEvent objects, one
    sink after another within one publish, in the Trio thread. The first sink
    that meets an event encodes it as a WatchJobsResponse `events` entry (tag,
    length, JobEvent); the others reuse those bytes, so 500 watchers of a change
    share one copy of it. The cache lives for one publish: a callback that Trio
    runs once the actor yields clears it.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._cache: dict[int, tuple[JobEvent, bytes]] = {}  # id(event) -> (event, entry)

    def __call__(self, event: JobEvent) -> bytes:  # Trio thread
        hit = self._cache.get(id(event))
        if hit is not None and hit[0] is event:
            return hit[1]
        if not self._cache:
            try:
                self._token.run_sync_soon(self._cache.clear)
            except trio.RunFinishedError:
                pass
        body = convert.job_event_to_pb(event).SerializeToString()
        entry = _EVENTS_FIELD + _varint(len(body)) + body
        self._cache[id(event)] = (event, entry)  # holding the event keeps its id unique
        return entry


class _Watch:
    """One WatchJobs stream's buffer between the actor (Trio thread) and its handler (asyncio).

    The actor calls `sink` with each committed batch; it must not block, so it
    encodes the events (once for all watchers: _EventEncoder), counts their
    bytes against the bound under a lock, and schedules them onto the asyncio
    loop. Bytes stay counted until the message carrying them is written, so the
    bound covers what waits and what is in flight. Past the bound the sink
    answers False, which ends the subscription; the buffer is dropped at once,
    a write held up by a client that does not read is given up, and the stream
    ends with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limit: int,
        encode: Callable[[JobEvent], bytes],
    ) -> None:
        self._loop = loop
        self._limit = limit
        self._encode = encode
        self._lock = threading.Lock()
        self._pending = 0  # bytes handed over by the sink and not yet written
        self._ended = False
        self._events: deque[bytes] = deque()  # encoded entries; asyncio thread only
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()  # fell behind or shutting down: stop writing at once
        self.overflowed = False
        self.closing = False

    def sink(self, events: list[JobEvent]) -> bool:  # Trio thread
        if self._ended:
            return False
        room = self._limit - self._pending  # only the handler lowers _pending meanwhile
        encoded: list[bytes] = []
        size = 0
        for event in events:  # encoded only as far as the bound allows
            entry = self._encode(event)
            size += len(entry)
            if size > room:
                break
            encoded.append(entry)
        with self._lock:
            if self._ended:
                return False
            if len(encoded) < len(events) or self._pending + size > self._limit:
                self._ended = self.overflowed = True
                self._schedule(self._halt)
                return False
            self._pending += size
        return self._schedule(self._push, encoded)

    def _schedule(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False

    def _push(self, encoded: list[bytes]) -> None:
        self._events.extend(encoded)
        self._wake.set()

    def _halt(self) -> None:
        self._events.clear()  # what it could not take is dropped now, not when it reads
        self._stop.set()
        self._wake.set()

    async def wait(self) -> None:
        """Until events wait; raises the stream's end once it must stop."""
        await self._wake.wait()
        self._check()

    def _check(self) -> None:
        if self.closing:
            raise CommandError(ErrorCode.UNAVAILABLE, "server is shutting down")
        if self.overflowed:
            raise CommandError(ErrorCode.RESOURCE_EXHAUSTED, "watch fell behind")

    def messages(self, limit: int) -> Iterator[tuple[bytes, int]]:
        """The waiting events as encoded WatchJobsResponses of at most `limit` bytes
        (one event at least), in commit order, with their size; taken one by one."""
        self._wake.clear()
        events = self._events
        while events:
            first = events.popleft()
            parts, size = [first], len(first)
            while events and size + len(events[0]) <= limit:
                entry = events.popleft()
                parts.append(entry)
                size += len(entry)
            yield b"".join(parts), size

    def written(self, size: int) -> None:
        with self._lock:
            self._pending -= size

    async def send(self, context: Any, message: Message | bytes) -> None:
        """context.write(message), given up as soon as the watch must stop: a client
        that does not read would otherwise hold the write, and the stream, for ever."""
        self._check()
        write = asyncio.ensure_future(context.write(message))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({write, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not write.done():
                write.cancel()
                await asyncio.gather(write, return_exceptions=True)
        self._check()
        write.result()

    def close(self) -> None:  # asyncio thread
        self.closing = True
        self.end()
        self._halt()

    def end(self) -> None:
        with self._lock:
            self._ended = True


# -- reflection -------------------------------------------------------------------------

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server, services: Sequence[str]) -> None:
    """Serve server reflection as grpc.reflection.v1 and v1alpha, both listing every service.

    grpcio-reflection only implements v1alpha, but current tools (grpcurl,
    Postman, grpc-java's and grpc-go's clients) ask for v1 first. The two
    protocols are the same messages with the same field numbers under another
    package, so one servicer answers both: v1 requests are decoded with the
    v1alpha classes (identical on the wire) under v1's method name.
    """
    _add_reflection_v1_descriptor()
    names = [*services, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    v1 = grpc.method_handlers_generic_handler(REFLECTION_V1, handlers)
    server.add_generic_rpc_handlers((v1,))


def _add_reflection_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool, derived from v1alpha's.

    With it, a client can describe the v1 service by reflection as it can any
    other. Adding the same file again (a second server in the process) is a no-op.
    """
    old, new = reflection_pb2.DESCRIPTOR.package, REFLECTION_V1.rsplit(".", 1)[0]
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = new
    proto.ClearField("options")  # v1alpha's: deprecated, and its Java/Go package names

    def rename(type_name: str) -> str:
        return type_name.replace(f".{old}.", f".{new}.", 1)

    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.HasField("type_name"):  # message and enum fields only
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    descriptor_pool.Default().AddSerializedFile(proto.SerializeToString())


# -- authentication ---------------------------------------------------------------------

# The command each kairoi.v1 method sends, which decides the role it needs
# (core/auth.py). A method missing here needs an admin token.
METHOD_COMMANDS: dict[str, type] = {
    "SetJob": c.SetJob,
    "SetJobs": c.SetJob,
    "StreamSetJobs": c.SetJob,
    "GetJob": c.GetJob,
    "DeleteJob": c.DeleteJob,
    "ListJobs": c.ListJobs,
    "ScheduleJob": c.ScheduleJob,
    "PauseJob": c.PauseJob,
    "ResumeJob": c.ResumeJob,
    "RunJobNow": c.RunJobNow,
    "PreviewJob": c.PreviewJob,
    "SetRule": c.SetRule,
    "GetRule": c.GetRule,
    "DeleteRule": c.DeleteRule,
    "ListRules": c.ListRules,
    "WatchJobs": c.Subscribe,
    "GetServerInfo": c.GetInfo,
}
_FAILURE_WINDOW_S = 10.0


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """kairoi.v1 calls need `authorization: Bearer <token>` of a role that may make them.

    No token or an unknown one: UNAUTHENTICATED; a known token whose role may not
    make the call (a read token's SetJob): PERMISSION_DENIED. Health and
    reflection are exempt so that load balancers, probes and grpcurl can discover
    and check the server without holding a token; they reveal nothing about jobs
    or rules.
    """

    def __init__(self, auth: TokenTable) -> None:
        self._auth = auth
        self._failures = _Aggregated("grpc auth failed")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        value = None
        for key, given in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                value = given
                break
        role = self._auth.role_of_bearer(value)
        if role is None:
            return _deny(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token", self._failures
            )
        command = METHOD_COMMANDS.get(method.rsplit("/", 1)[1])
        if permitted(role, command) if command is not None else role is Role.ADMIN:
            return handler
        reason = denial(role, command) if command is not None else "permission denied"
        return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, reason)


class _Aggregated:
    """A warning that clients can cause at any rate (failed authentications, malformed
    requests), logged without flooding: the first of each 10 s window on its own,
    the others of the window summed in one line (`count`) when the next one comes
    after the window. Never a token."""

    def __init__(self, event: str) -> None:
        self._event = event
        self._window_end = 0.0
        self._count = 0

    def note(self, **fields: object) -> None:
        now = time.monotonic()
        if now < self._window_end:
            self._count += 1
            return
        if self._count:
            log.warning(self._event, count=self._count, window_s=_FAILURE_WINDOW_S)
        log.warning(self._event, count=1, **fields)
        self._window_end, self._count = now + _FAILURE_WINDOW_S, 0


def _deny(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    failures: _Aggregated | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers `code` with `message`."""

    async def abort(_request: Any, context: Any) -> NoReturn:
        if failures is not None:
            failures.note(peer=context.peer())
        await context.abort(code, message)
        raise AssertionError("unreachable")

    async def abort_stream(_request: Any, context: Any) -> AsyncIterator[Any]:
        await abort(_request, context)
        yield  # pragma: no cover - makes this an async generator

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **codecs)
    return grpc.unary_unary_rpc_method_handler(abort, **codecs)


# -- malformed requests -----------------------------------------------------------------


class _Malformed:
    """What a request that is not valid protobuf deserializes to, instead of raising:
    grpc.aio deserializes before the handler runs, and turns an exception there into
    UNKNOWN with a plain-text traceback on its own logger."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _RequestCheck(grpc.aio.ServerInterceptor):
    """Every service (kairoi.v1, health, reflection): a malformed request message is
    answered INVALID_ARGUMENT ("malformed request: ...") and logged as one
    structured, aggregated warning (`grpc malformed request`)."""

    def __init__(self) -> None:
        self._log = _Aggregated("grpc malformed request")
        self._checked: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._checked.get(id(handler))  # handlers are registered once, reused per call
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, handler_call_details.method or ""))
            self._checked[id(handler)] = cached
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` with a deserializer that never raises and a behavior that refuses
        what it could not parse. grpc.aio calls a behavior by its kind (coroutine
        function, async generator function), so the wrapper is of the same kind; a
        synchronous behavior (none here) is left as it is."""
        parse = handler.request_deserializer
        assert parse is not None

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # DecodeError, or anything a parser may raise
                return _Malformed(error)

        async def refuse(malformed: _Malformed, context: Any) -> NoReturn:
            self._log.note(method=method, peer=context.peer(), error=str(malformed.error))
            reason = f"malformed request: {malformed.error}"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
            raise AssertionError("unreachable")

        async def checked_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                yield request

        async def checked(request: Any, context: Any) -> Any:
            if handler.request_streaming:
                return checked_stream(request, context)
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return request

        kind = next(
            name
            for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
            if getattr(handler, name) is not None
        )
        behavior = getattr(handler, kind)
        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):

            async def wrapped_generator(request: Any, context: Any) -> AsyncIterator[Any]:
                async for response in behavior(await checked(request, context), context):
                    yield response

            wrapped = wrapped_generator
        elif inspect.iscoroutinefunction(behavior):

            async def wrapped_coroutine(request: Any, context: Any) -> Any:
                return await behavior(await checked(request, context), context)

            wrapped = wrapped_coroutine
        else:
            return handler
        return handler._replace(request_deserializer=deserialize, **{kind: wrapped})  # type: ignore[attr-defined, no-any-return]
