"""The gRPC front end: kairoi.v1.Scheduler, health and reflection, served on Trio.

The calls run in the Trio thread, next to the command actor: a handler puts
its commands on the actor's channel and awaits the reply there, with no other
event loop or thread between them. HTTP/2 and gRPC's framing are
`wire.py` (sans-io, on h2), connections and calls `transport.py`; this module
holds the services.

grpcio served this front end until 2026-12 (a grpc.aio server in its own
thread with its own asyncio loop, bridged to Trio): every call then crossed
two event loops on two threads and back, which cost about twice a bare
grpc.aio server's CPU a call (docs/benchmarks.md, "gRPC"). grpcio stays the
client (kairoi-trio's CLI, clients/, the tests) and the code generator.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
import trio
from google.protobuf.message import Message

from kairoi.v1 import scheduler_pb2 as pb
from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode, Request, Result
from kairoi_trio.config import parse_address
from kairoi_trio.core.actor import submit_nowait
from kairoi_trio.core.auth import Role, TokenTable, denial, permitted
from kairoi_trio.model import JobEvent
from kairoi_trio.protocols.grpc import convert, reflection, wire
from kairoi_trio.protocols.grpc.health import NOT_SERVING, SERVING, Health
from kairoi_trio.protocols.grpc.health import SERVICE_NAME as HEALTH_SERVICE
from kairoi_trio.protocols.grpc.transport import Abort, Call, GrpcServer, Method, UnaryMethod
from kairoi_trio.protocols.limits import ConnectionLimits
from kairoi_trio.protocols.snapshot import next_page as next_snapshot_page

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name  # "kairoi.v1.Scheduler"
STREAM_WINDOW = 4  # StreamSetJobs batches in flight at once
WATCH_TICK_S = 0.05  # WatchJobs sends what a tick brought, then waits for the next tick
# A WatchJobs message carries events up to this many bytes (one event at least):
# what a watcher that stops reading holds in flight, besides its buffer.
WATCH_MESSAGE_BYTES = 64 << 10
DEFAULT_WATCH_BUFFER_BYTES = 16 << 20  # [grpc] max_watch_buffer_bytes
_HEALTH_SETTLE_S = 0.05  # time for health watchers to send NOT_SERVING before they end
_SIZE_MARGIN = 1024  # room for a message's own fields next to its repeated ones

T = TypeVar("T")
_OK = pb.Status(code=0)
_OK_RESULT = pb.SetJobResult(status=_OK)


class Serving(Protocol):
    """Readiness as health reports it (observability.metrics.Readiness)."""

    @property
    def ready(self) -> bool: ...

    def listen(self, callback: Callable[[bool], None]) -> None: ...


async def serve_grpc(
    requests: trio.MemorySendChannel[Request],
    *,
    listen: str = "127.0.0.1:5679",
    grace_s: float = 5.0,
    auth: TokenTable | None = None,
    max_message_bytes: int = 4 << 20,
    max_watch_buffer_bytes: int = DEFAULT_WATCH_BUFFER_BYTES,
    limits: ConnectionLimits | None = None,
    idle_timeout_s: float = 0.0,
    keepalive_s: float = 0.0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    serving: Serving | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve kairoi.v1.Scheduler, health and reflection until cancelled.

    Health says SERVING while `serving` is ready ("can accept writes": not while
    storage writes fail), NOT_SERVING otherwise, for both "" and kairoi.v1.Scheduler.

    `listen`: "host:port" ("[::]:port" or "0.0.0.0:port": every interface).
    `task_status.started(port)` reports the bound port (useful with port 0) once
    the server listens and health says SERVING; OSError if it cannot listen. On
    cancellation: health goes NOT_SERVING, open WatchJobs streams end with
    UNAVAILABLE, the server stops accepting (GOAWAY) and in-flight calls get
    `grace_s` to finish (the actor must still be running meanwhile: close its
    channel only after this returns).
    `max_watch_buffer_bytes`: the encoded changes a WatchJobs stream may have
    waiting or in flight; beyond it the stream ends with RESOURCE_EXHAUSTED.
    `auth`: the tokens kairoi.v1 calls must carry, by role (none: no authentication).
    `limits`: connections at once, in all and from one client IP (none: no
    limit); further ones are refused with a GOAWAY. `idle_timeout_s`: a
    connection without a call that long is closed (GOAWAY); `keepalive_s`: one
    nothing came from that long is PINGed, and closed without an answer (0: never).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("gRPC TLS needs both a certificate and a key")
    ssl_context = None
    if tls_cert is not None and tls_key is not None:
        ssl_context = await trio.to_thread.run_sync(_tls_context, tls_cert, tls_key)
    try:
        listeners = await _open_listeners(listen)
    except OSError as error:
        raise OSError(f"gRPC server could not start on {listen}: {error}") from error
    bound = listeners[0].socket.getsockname()[1]

    scheduler = SchedulerServicer(requests, max_message_bytes, max_watch_buffer_bytes)
    health = Health()
    malformed = _Aggregated("grpc malformed request")
    refused = _Aggregated("grpc connection refused")
    methods = {
        **scheduler.methods(),
        **health.methods(),
        **reflection.methods([SERVICE_NAME, HEALTH_SERVICE]),
    }
    server = GrpcServer(
        methods,
        max_message_bytes=max_message_bytes,
        limits=limits,
        authorize=_Authorizer(auth) if auth is not None and auth.required else None,
        ssl_context=ssl_context,
        on_malformed=lambda method, peer, error: malformed.note(
            method=method, peer=peer, error=str(error)
        ),
        on_refused=lambda peer, reason: refused.note(peer=peer, reason=reason),
        idle_timeout_s=idle_timeout_s,
        keepalive_s=keepalive_s,
    )

    def follow(ok: bool) -> None:
        for service in ("", SERVICE_NAME):
            health.set(service, SERVING if ok else NOT_SERVING)

    follow(True)
    async with trio.open_nursery() as nursery:
        # The server runs shielded: on cancellation it still drains for grace_s.
        done = trio.Event()
        stop = trio.Event()
        nursery.start_soon(_run_shielded, server, listeners, stop, done)
        log.info("grpc listening", listen=listen, port=bound, tls=ssl_context is not None)
        if serving is not None:
            serving.listen(follow)
            follow(serving.ready)
        task_status.started(bound)
        try:
            await done.wait()
            raise RuntimeError("gRPC server stopped unexpectedly")
        finally:
            with trio.CancelScope(shield=True):
                log.info("grpc stopping", grace_s=grace_s)
                health.shut_down()
                await trio.sleep(_HEALTH_SETTLE_S)  # let watchers send NOT_SERVING
                health.close()
                scheduler.close_watches()
                server.stop_accepting()
                with trio.move_on_after(grace_s):
                    await server.wait_idle()
                stop.set()
                await done.wait()
                log.info("grpc stopped")


async def _run_shielded(
    server: GrpcServer, listeners: list[trio.SocketListener], stop: trio.Event, done: trio.Event
) -> None:
    try:
        with trio.CancelScope(shield=True) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, listeners)

                async def stopper() -> None:
                    await stop.wait()
                    server.cancel_all()
                    scope.cancel()

                nursery.start_soon(stopper)
    finally:
        done.set()


async def _open_listeners(listen: str) -> list[trio.SocketListener]:
    """Listeners on "host:port". "[::]" is one dual-stack socket (IPv6 and IPv4, one
    port even for port 0), as grpc-core bound it; IPv4 alone where IPv6 is off."""
    host, port = parse_address(listen, "grpc.listen")
    if host != "::":
        return await trio.open_tcp_listeners(port, host=host)
    try:
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_STREAM)
    except OSError:  # no IPv6 in this kernel
        return await trio.open_tcp_listeners(port, host="0.0.0.0")
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 0)
        await sock.bind(("::", port))
        sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


def _tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    return context


# -- the service ------------------------------------------------------------------


Handler = Callable[..., Awaitable[Any]]


def _status(error: CommandError, request: Any, method: str) -> tuple[int, str]:
    """The gRPC status code and details of a command error about `request`."""
    log.debug("grpc error", method=method, code=error.code.name, msg=error.message)
    # The message may quote client input (an id of 65,535 bytes): cut it to fit
    # the status trailer, which would otherwise turn into RESOURCE_EXHAUSTED.
    details = convert.status_details(error.message, *convert.client_strings(request))
    return convert.status_code(error).value[0], details


def _rpc(handler: Handler) -> Handler:
    """Turn a CommandError raised anywhere in a handler into the matching gRPC status."""

    @functools.wraps(handler)
    async def wrapper(self: SchedulerServicer, request: Any, context: Any) -> Any:
        try:
            return await handler(self, request, context)
        except CommandError as error:
            raise Abort(*_status(error, request, handler.__name__)) from None

    return wrapper


@dataclass(frozen=True)
class _Unary:
    """A unary method that is one command: `command(request)` builds it (CommandError
    if the request is invalid), `answer(request, result)` turns its result into the
    answer message."""

    command: Callable[[Any], c.Command]
    answer: Callable[[Any, Any], Message]


class _Reply:
    """A batch's results, set by the actor (in its task) and awaited by the handler."""

    __slots__ = ("_done", "results")

    def __init__(self) -> None:
        self._done = trio.Event()
        self.results: list[Result] = []

    def __call__(self, results: list[Result]) -> None:  # the actor's task; must not block
        self.results = results
        self._done.set()

    async def wait(self) -> list[Result]:
        await self._done.wait()
        return self.results


def _job_answer(response: Callable[..., Message]) -> Callable[[Any, Any], Message]:
    return lambda _request, job: response(job=convert.job_to_pb(job))


class SchedulerServicer:
    """kairoi.v1.Scheduler: converts each call into commands and the results back.

    The unary methods are a command each (`_unary`) or a batch (SetJobs): the
    call hands it to the actor and the actor's reply answers the call, with no
    task in between. The streaming ones (StreamSetJobs, WatchJobs) run in a
    task of their own.
    """

    def __init__(
        self,
        requests: trio.MemorySendChannel[Request],
        max_message_bytes: int,
        watch_buffer_bytes: int = DEFAULT_WATCH_BUFFER_BYTES,
    ) -> None:
        self._requests = requests
        self._budget = max_message_bytes - _SIZE_MARGIN
        self._watch_limit = watch_buffer_bytes
        self._encode_event = _EventEncoder()
        self._watches: set[_Watch] = set()
        self._closing = False
        self.unary: dict[str, _Unary] = {
            "SetJob": _Unary(convert.set_job_from_pb, _job_answer(pb.SetJobResponse)),
            "GetJob": _Unary(lambda r: c.GetJob(r.id), _job_answer(pb.GetJobResponse)),
            "DeleteJob": _Unary(lambda r: c.DeleteJob(r.id), lambda r, _: pb.DeleteJobResponse()),
            "ListJobs": _Unary(convert.list_jobs_from_pb, self._jobs_page),
            "ScheduleJob": _Unary(
                convert.schedule_job_from_pb, _job_answer(pb.ScheduleJobResponse)
            ),
            "PauseJob": _Unary(lambda r: c.PauseJob(r.id), _job_answer(pb.PauseJobResponse)),
            "ResumeJob": _Unary(lambda r: c.ResumeJob(r.id), _job_answer(pb.ResumeJobResponse)),
            "RunJobNow": _Unary(lambda r: c.RunJobNow(r.id), _job_answer(pb.RunJobNowResponse)),
            "PreviewJob": _Unary(
                convert.preview_job_from_pb, lambda r, times: convert.preview_to_pb(times)
            ),
            "SetRule": _Unary(
                lambda r: c.SetRule(convert.rule_from_pb(r.rule)),
                lambda r, rule: pb.SetRuleResponse(rule=convert.rule_to_pb(rule)),
            ),
            "GetRule": _Unary(
                lambda r: c.GetRule(r.id),
                lambda r, rule: pb.GetRuleResponse(rule=convert.rule_to_pb(rule)),
            ),
            "DeleteRule": _Unary(
                lambda r: c.DeleteRule(r.id), lambda r, _: pb.DeleteRuleResponse()
            ),
            "ListRules": _Unary(self._rules_command, self._rules_page),
            "GetServerInfo": _Unary(
                lambda r: c.GetInfo(), lambda r, info: convert.server_info_to_pb(info)
            ),
        }

    def methods(self) -> dict[str, Method | UnaryMethod]:
        """Every kairoi.v1.Scheduler method, by path."""
        service = pb.DESCRIPTOR.services_by_name["Scheduler"]
        found: dict[str, Method | UnaryMethod] = {}
        for method in service.methods:
            decode = getattr(pb, method.input_type.name).FromString
            path = f"/{SERVICE_NAME}/{method.name}"
            if method.name in self.unary:
                found[path] = UnaryMethod(decode, functools.partial(self.begin, method.name))
            elif method.name == "SetJobs":
                found[path] = UnaryMethod(decode, self._set_jobs)
            else:
                found[path] = Method(
                    method.client_streaming,
                    method.server_streaming,
                    decode,
                    getattr(self, method.name),
                )
        return found

    def send(self, commands: Sequence[c.Command], reply: Callable[[list[Result]], None]) -> None:
        """Hand a batch to the actor now; `reply` gets its results (in the actor's task).
        RESOURCE_EXHAUSTED when the actor's queue is full, UNAVAILABLE once it is
        closed (shutdown)."""
        submit_nowait(self._requests, Request(commands, reply))

    def begin(self, name: str, request: Any, call: Call) -> None:
        """Start unary method `name`'s call: its command to the actor, whose reply ends it."""
        unary = self.unary[name]
        try:
            command = unary.command(request)
            self.send([command], lambda results: self._end(unary, request, call, results))
        except CommandError as error:
            call.fail(*_status(error, request, name))

    def _end(self, unary: _Unary, request: Any, call: Call, results: list[Result]) -> None:
        """Answer a unary call from its command's result (in the actor's task: never raises)."""
        [result] = results
        if isinstance(result, CommandError):  # not raised: a raised one would keep this frame
            call.fail(*_status(result, request, call.method))
            return
        try:
            call.answer(unary.answer(request, result))
        except CommandError as error:
            call.fail(*_status(error, request, call.method))
        except Exception as error:  # a fault of the conversion: the call fails, not the actor
            log.exception("grpc answer failed", method=call.method)
            call.fail(wire.UNKNOWN, f"Unexpected {type(error).__name__}: {error}")

    async def _one(self, command: c.Command) -> Any:
        """The result of one command; a CommandError result is raised."""
        reply = _Reply()
        self.send([command], reply)
        [result] = await reply.wait()
        if isinstance(result, CommandError):
            try:
                raise result
            finally:
                del result  # else its traceback and this frame would hold each other
        return result

    # -- jobs ------------------------------------------------------------------

    def _set_jobs(self, request: pb.SetJobsRequest, call: Call) -> None:
        """SetJobs: one status per job; conversion errors stay local, the rest go to
        the actor together."""
        batch = _JobBatch(request.jobs)

        def answer(results: list[Result] | None) -> None:  # the actor's task, or here
            if results is not None:
                batch.settle(results)
            response = pb.SetJobsResponse()
            # Copying one prebuilt OK result is several times cheaper than building each.
            response.results.extend(
                _OK_RESULT if status is _OK else pb.SetJobResult(status=status)
                for status in batch.statuses
            )
            call.answer(response)

        if not batch.commands:
            answer(None)
            return
        try:
            self.send(batch.commands, answer)
        except CommandError as error:
            call.fail(*_status(error, request, "SetJobs"))

    @_rpc
    async def StreamSetJobs(self, call: Call, context: Call) -> pb.StreamSetJobsResponse:
        """Up to STREAM_WINDOW batches in flight, handed to the actor strictly in stream order.

        While the actor applies and fsyncs one batch, the next ones are read and
        converted. A full actor queue is waited out (`send`, in order), not failed.
        A batch is let go of (`Call.let_go`) as soon as the actor has applied it,
        by a task of its own: a stream that sends nothing more holds none.
        """
        response = pb.StreamSetJobsResponse()
        # The failures are listed in the one answer, so they must fit in it: past
        # the message size limit the stream stops (memory stays bounded too).
        failed = failures_size = 0
        too_many = False
        handed, in_flight = trio.open_memory_channel[tuple[_JobBatch, _Reply | None]](
            # with the one the settler waits on and the one the reader hands over
            max(0, STREAM_WINDOW - 2)
        )

        def count(batch: _JobBatch) -> None:
            nonlocal failed, failures_size, too_many
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

        async def settle() -> None:
            async for batch, reply in in_flight:
                if reply is not None:
                    batch.settle(await reply.wait())
                count(batch)
                del batch, reply  # nothing of it stays while the next is awaited
                call.let_go()

        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle)
            try:
                async with handed:  # its end ends the settler, once every batch is counted
                    async for message in call.messages(keep=True):
                        batch = _JobBatch(message.jobs)
                        del message
                        reply = await self._hand_over(batch.commands) if batch.commands else None
                        await handed.send((batch, reply))
                        del batch
                        if too_many:
                            break
            except Exception as raised:  # raised after the settler stopped, not grouped
                error = raised
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if too_many:
            raise CommandError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"too many failed jobs to list in one answer: of the first "
                f"{response.accepted + failed} jobs of the stream, {response.accepted} were "
                f"set and {failed} failed; the rest of the stream was not read",
            )
        return response

    async def _hand_over(self, commands: Sequence[c.Command]) -> _Reply:
        """Put a batch in the actor's queue, waiting out a full queue; its reply."""
        reply = _Reply()
        try:
            await self._requests.send(Request(commands, reply))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise CommandError(ErrorCode.UNAVAILABLE, "server is shutting down") from None
        return reply

    def _jobs_page(self, request: pb.ListJobsRequest, page: c.JobPage) -> pb.ListJobsResponse:
        # Converted only as far as the message size limit allows: 1,000 jobs of
        # 1 MiB would otherwise be copied in full to send 4 of them.
        jobs = next(_fitting(page.jobs, convert.job_to_pb, self._budget), [])
        if len(jobs) < len(page.jobs):  # cut short to fit the message size limit
            return pb.ListJobsResponse(jobs=jobs, next_page_token=jobs[-1].id)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=page.next_after)

    # -- rules -----------------------------------------------------------------

    def _rules_command(self, request: pb.ListRulesRequest) -> c.Command:
        asked = convert.list_rules_from_pb(request)
        return c.rule_page(asked.prefix, asked.after, asked.limit)

    def _rules_page(self, request: pb.ListRulesRequest, found: Any) -> pb.ListRulesResponse:
        asked = convert.list_rules_from_pb(request)
        rules, next_after = c.next_rules_after(found, asked.limit)
        fitting = next(_fitting(rules, convert.rule_to_pb, self._budget), [])
        if len(fitting) < len(rules):  # cut short to fit the message size limit
            return pb.ListRulesResponse(rules=fitting, next_page_token=fitting[-1].id)
        return pb.ListRulesResponse(rules=fitting, next_page_token=next_after)

    # -- watching --------------------------------------------------------------

    @_rpc
    async def WatchJobs(self, request: pb.WatchJobsRequest, context: Call) -> None:
        if self._closing:
            raise CommandError(ErrorCode.UNAVAILABLE, "server is shutting down")
        watch = _Watch(self._watch_limit, self._encode_event)
        self._watches.add(watch)
        subscribed = False
        try:
            prefix = request.prefix
            page = await self._one(c.Subscribe(prefix, request.include_snapshot, watch.sink))
            subscribed = True
            await context.send_initial_metadata()  # tells the client the watch is registered
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
                        self._one, trio.sleep, prefix, page.next_after, watch.sink
                    )
                del page
                # An empty change message ends the snapshot, however many messages it
                # took, so a client knows it has caught up before the first change.
                await watch.send(context, b"")
            while True:
                await watch.wait()
                next_tick = trio.current_time() + WATCH_TICK_S
                for message, size in watch.messages(min(self._budget, WATCH_MESSAGE_BYTES)):
                    await watch.send(context, message)
                    watch.written(size)
                # The rest of the tick (the writes took part of it).
                await trio.sleep(max(0.0, next_tick - trio.current_time()))
        finally:
            self._watches.discard(watch)
            watch.end()
            if subscribed:
                try:
                    self._requests.send_nowait(Request([c.Unsubscribe(watch.sink)], _ignore))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass  # the sink answers False from now on, which ends the subscription too

    def close_watches(self) -> None:
        """End every open watch (with UNAVAILABLE) and refuse new ones: part of shutdown."""
        self._closing = True
        for watch in list(self._watches):
            watch.close()


def _ignore(_results: list[Result]) -> None:
    pass


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
    sink after another within one publish, in its own task. The first sink
    that meets an event encodes it as a WatchJobsResponse `events` entry (tag,
    length, JobEvent); the others reuse those bytes, so 500 watchers of a change
    share one copy of it. The cache lives for one publish: a callback that Trio
    runs once the actor yields clears it.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[JobEvent, bytes]] = {}  # id(event) -> (event, entry)

    def __call__(self, event: JobEvent) -> bytes:  # the actor's task
        hit = self._cache.get(id(event))
        if hit is not None and hit[0] is event:
            return hit[1]
        if not self._cache:
            trio.lowlevel.current_trio_token().run_sync_soon(self._cache.clear)
        body = convert.job_event_to_pb(event).SerializeToString()
        entry = _EVENTS_FIELD + _varint(len(body)) + body
        self._cache[id(event)] = (event, entry)  # holding the event keeps its id unique
        return entry


class _Watch:
    """One WatchJobs stream's buffer between the actor and its handler.

    The actor calls `sink` with each committed batch; it must not block, so it
    encodes the events (once for all watchers: _EventEncoder) and counts their
    bytes against the bound. Bytes stay counted until the message carrying them
    is written, so the bound covers what waits and what is in flight. Past the
    bound the sink answers False, which ends the subscription; the buffer is
    dropped at once, a write held up by a client that does not read is given up,
    and the stream ends with RESOURCE_EXHAUSTED.
    """

    def __init__(self, limit: int, encode: Callable[[JobEvent], bytes]) -> None:
        self._limit = limit
        self._encode = encode
        self._pending = 0  # bytes handed over by the sink and not yet written
        self._ended = False
        self._events: deque[bytes] = deque()  # encoded entries
        self._wake = trio.Event()
        self._writing: trio.CancelScope | None = None  # the write in progress
        self._halted = False
        self.overflowed = False
        self.closing = False

    def sink(self, events: list[JobEvent]) -> bool:  # the actor's task
        if self._ended:
            return False
        room = self._limit - self._pending
        encoded: list[bytes] = []
        size = 0
        for event in events:  # encoded only as far as the bound allows
            entry = self._encode(event)
            size += len(entry)
            if size > room:
                self._ended = self.overflowed = True
                self._halt()
                return False
            encoded.append(entry)
        self._pending += size
        self._events.extend(encoded)
        self._wake.set()
        return True

    def _halt(self) -> None:
        self._events.clear()  # what it could not take is dropped now, not when it reads
        self._halted = True
        if self._writing is not None:
            self._writing.cancel()
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
        self._wake = trio.Event()
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
        self._pending -= size

    async def send(self, context: Call, message: Message | bytes) -> None:
        """context.write(message), given up as soon as the watch must stop: a client
        that does not read would otherwise hold the write, and the stream, for ever."""
        self._check()
        with trio.CancelScope() as self._writing:
            if self._halted:
                self._writing.cancel()
            await context.write(message)
        self._writing = None
        self._check()

    def close(self) -> None:
        self.closing = True
        self._ended = True
        self._halt()

    def end(self) -> None:
        self._ended = True


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


class _Authorizer:
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

    def __call__(
        self, method: str, metadata: tuple[tuple[str, str | bytes], ...], peer: str
    ) -> tuple[int, str] | None:
        if not method.startswith(f"/{SERVICE_NAME}/"):
            return None
        value = None
        for key, given in metadata:
            if key == "authorization" and isinstance(given, str):
                value = given
                break
        role = self._auth.role_of_bearer(value)
        if role is None:
            self._failures.note(peer=peer)
            return wire.UNAUTHENTICATED, "missing or invalid token"
        command = METHOD_COMMANDS.get(method.rsplit("/", 1)[1])
        if permitted(role, command) if command is not None else role is Role.ADMIN:
            return None
        reason = denial(role, command) if command is not None else "permission denied"
        return wire.PERMISSION_DENIED, reason


_FAILURE_WINDOW_S = 10.0


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
