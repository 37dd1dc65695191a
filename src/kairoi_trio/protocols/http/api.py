"""The JSON API under /api/v1: thin translators into the commands KCP and gRPC send.

Each handler checks the caller's token (core/auth.py: the same roles as KCP and
gRPC, by command type), turns the request into one command (convert.py), hands
it to the command actor as a Request over the actor's channel, and turns the
result back into JSON. No state of its own: a job set here is the job KCP and
gRPC see. Reference: docs/http-api.md; the routes' contract: openapi.py.

Ids travel percent-encoded in one path segment (`/api/v1/jobs/app%2Fx`): the
app routes /api/ paths on the raw path (app.py), and `_path_id` decodes the
segment strictly (UTF-8; a bad escape is 400).

Errors are `{"error": {"code": ..., "message": ...}}` with the status of
`HTTP_STATUS` (one table for every ErrorCode of commands.py), and 401, 403,
404, 405, 413 of the HTTP layer itself.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
import structlog
import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.actor import submit_nowait
from kairoi_trio.core.auth import Role, TokenTable, denial, permitted
from kairoi_trio.model import JobEvent
from kairoi_trio.protocols.http import convert
from kairoi_trio.protocols.snapshot import next_page as next_snapshot_page

log = structlog.get_logger(__name__)

# One table: each error code of the commands, and its HTTP status.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FAILED_PRECONDITION: 409,  # e.g. setting or deleting a triggered job
    ErrorCode.RESOURCE_EXHAUSTED: 429,  # the actor's queue is full: retry with backoff
    ErrorCode.UNAVAILABLE: 503,  # storage writes fail, or shutting down
}
# Codes of the HTTP layer itself (not commands): their `code` in the error body.
PERMISSION_DENIED = "permission_denied"  # 403
PAYLOAD_TOO_LARGE = "payload_too_large"  # 413
METHOD_NOT_ALLOWED = "method_not_allowed"  # 405

MAX_MESSAGE_CHARS = 1000  # an error message quoting a client's 65,535-byte id is cut
SSE_KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the stream, dead peers show
SSE_CHUNK_BYTES = 64 << 10  # events written at once (one event at least)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_JSON = "application/json"


def error_body(code: str, message: str) -> bytes:
    if len(message) > MAX_MESSAGE_CHARS:
        more = len(message) - MAX_MESSAGE_CHARS
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({more} more characters)"
    return orjson.dumps({"error": {"code": code, "message": message}})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_body(code, message), status_code=status, media_type=_JSON, headers=headers
    )


def command_error_response(error: CommandError) -> Response:
    status = HTTP_STATUS.get(error.code, 500)
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return error_response(status, error.code.value, error.message, headers)


def json_response(document: object, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status_code=status, media_type=_JSON)


class _TooLarge(Exception):
    pass


class Api:
    """The /api/v1 routes over the actor's channel.

    requests: the actor's channel (sent to without waiting: a full queue is 429);
    auth: the tokens (none configured: everyone is admin);
    max_body_bytes: larger request bodies are 413;
    max_payload_bytes: a job's payload larger than this is 413 too ([jobs]
        max_payload_bytes; the actor refuses it anyway, as 400 on the other
        protocols' INVALID_ARGUMENT); None leaves it to the actor;
    watch_buffer_bytes: encoded changes an event stream may have waiting or in
        flight before it is dropped ([grpc] max_watch_buffer_bytes, as WatchJobs).
    """

    def __init__(
        self,
        requests: trio.MemorySendChannel[c.Request],
        auth: TokenTable,
        *,
        max_body_bytes: int,
        watch_buffer_bytes: int,
        max_payload_bytes: int | None = None,
    ) -> None:
        self._requests = requests
        self._auth = auth
        self.max_body_bytes = max_body_bytes  # (app.py also reads the bodies no handler read)
        self._max_payload = max_payload_bytes
        self._watch_limit = watch_buffer_bytes
        self._watches: set[_Watch] = set()
        self._frames = _Frames()
        self._closing = False

    # -- plumbing ----------------------------------------------------------------

    async def call(self, command: c.Command) -> Any:
        """The command's result; its CommandError raised. RESOURCE_EXHAUSTED when the
        actor's queue is full, UNAVAILABLE once it is closed (shutdown)."""
        done = trio.Event()
        box: list[list[c.Result]] = []

        def reply(results: list[c.Result]) -> None:  # the actor's task; must not block
            box.append(results)
            done.set()

        submit_nowait(self._requests, c.Request([command], reply))
        await done.wait()
        (result,) = box[0]
        if isinstance(result, CommandError):
            try:
                raise result
            finally:
                del result, box  # else its traceback and this frame would hold each other
        return result

    def _role(self, request: Request) -> Role | None:
        if not self._auth.required:
            return Role.ADMIN
        return self._auth.role_of_bearer(request.headers.get("authorization"))

    def _endpoint(
        self, command: type, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """`handler` behind the token check for `command`'s role, with every CommandError
        it raises answered as its status."""

        async def endpoint(request: Request) -> Response:
            role = self._role(request)
            if role is None:
                return error_response(
                    401,
                    ErrorCode.UNAUTHENTICATED.value,
                    "missing or invalid token (Authorization: Bearer <token>)",
                    {"www-authenticate": "Bearer"},
                )
            if not permitted(role, command):
                return error_response(403, PERMISSION_DENIED, denial(role, command))
            try:
                return await handler(request)
            except CommandError as error:
                return command_error_response(error)
            except _TooLarge as error:
                return error_response(
                    413,
                    PAYLOAD_TOO_LARGE,
                    str(error)
                    or f"request body larger than {self.max_body_bytes} bytes"
                    " ([http] max_body_bytes)",
                )

        return endpoint

    async def _body(self, request: Request) -> object:
        """The request's JSON body, read up to max_body_bytes (_TooLarge beyond)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _TooLarge
                chunks.append(chunk)
        except ClientDisconnect:
            raise CommandError(
                ErrorCode.INVALID_ARGUMENT, "the request body was cut short"
            ) from None
        if not chunks:
            raise convert.invalid("a JSON body is required")
        try:
            return orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as error:
            raise convert.invalid(f"the body is not valid JSON: {error}") from None

    # -- jobs ----------------------------------------------------------------------

    async def put_job(self, request: Request) -> Response:
        command = convert.set_job_from_json(_path_id(request), await self._body(request))
        limit = self._max_payload
        if limit is not None and len(command.payload) > limit:
            raise _TooLarge(
                f"payload larger than {limit} bytes ([jobs] max_payload_bytes):"
                f" {len(command.payload)} bytes"
            )
        return json_response(convert.job_to_json(await self.call(command)))

    async def get_job(self, request: Request) -> Response:
        return json_response(convert.job_to_json(await self.call(c.GetJob(_path_id(request)))))

    async def delete_job(self, request: Request) -> Response:
        await self.call(c.DeleteJob(_path_id(request)))
        return Response(status_code=204)

    async def list_jobs(self, request: Request) -> Response:
        query = request.query_params
        page: c.JobPage = await self.call(
            c.ListJobs(
                prefix=query.get("prefix", ""),
                status=convert.status_filter(query.get("status")),
                after=query.get("page_token", ""),
                limit=convert.page_size(
                    query.get("page_size"), convert.DEFAULT_JOB_PAGE, convert.MAX_JOB_PAGE
                ),
            )
        )
        return json_response(
            {
                "jobs": [convert.job_to_json(job) for job in page.jobs],
                "next_page_token": page.next_after,
            }
        )

    def _job_action(
        self, make: Callable[[str], c.Command]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def action(request: Request) -> Response:
            return json_response(convert.job_to_json(await self.call(make(_path_id(request)))))

        return action

    async def preview_job(self, request: Request) -> Response:
        count = convert.preview_count(request.query_params.get("count"))
        occurrences: list[int] = await self.call(c.PreviewJob(_path_id(request), count))
        return json_response({"occurrences": [convert.time_text(at) for at in occurrences]})

    # -- rules ---------------------------------------------------------------------

    async def put_rule(self, request: Request) -> Response:
        rule = convert.rule_from_json(_path_id(request), await self._body(request))
        return json_response(convert.rule_to_json(await self.call(c.SetRule(rule))))

    async def get_rule(self, request: Request) -> Response:
        return json_response(convert.rule_to_json(await self.call(c.GetRule(_path_id(request)))))

    async def delete_rule(self, request: Request) -> Response:
        await self.call(c.DeleteRule(_path_id(request)))
        return Response(status_code=204)

    async def list_rules(self, request: Request) -> Response:
        query = request.query_params
        size = convert.page_size(
            query.get("page_size"), convert.DEFAULT_RULE_PAGE, convert.MAX_RULE_PAGE
        )
        command = c.rule_page(query.get("prefix", ""), query.get("page_token", ""), size)
        rules, next_after = c.next_rules_after(await self.call(command), size)
        return json_response(
            {
                "rules": [convert.rule_to_json(rule) for rule in rules],
                "next_page_token": next_after,
            }
        )

    # -- server --------------------------------------------------------------------

    async def info(self, request: Request) -> Response:
        return json_response(convert.info_to_json(await self.call(c.GetInfo())))

    # -- events --------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        """Server-Sent Events of job changes under `prefix`; the stream begins once the
        watch is registered (nothing committed after the answer's headers is missed)."""
        if self._closing:
            raise CommandError(ErrorCode.UNAVAILABLE, "server is shutting down")
        prefix = request.query_params.get("prefix", "")
        snapshot = convert.flag(request.query_params.get("snapshot"), "snapshot")
        connection = request.scope.get("state", {}).get("connection")
        watch = _Watch(self._watch_limit, connection, self._frames)
        page = await self.call(c.Subscribe(prefix, snapshot, watch.sink))
        self._watches.add(watch)
        return StreamingResponse(
            self._stream(watch, prefix, page),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _stream(self, watch: _Watch, prefix: str, page: c.JobPage) -> AsyncIterator[bytes]:
        """The snapshot's pages (none unless asked for), "ready", then the changes."""
        try:
            while True:  # a page an actor step (c.SNAPSHOT_PAGE jobs)
                for job in page.jobs:
                    yield _sse(
                        job.status.value, convert.event_to_json(JobEvent(job), snapshot=True)
                    )
                if not page.next_after:
                    break
                try:
                    page = await next_snapshot_page(
                        self.call, trio.sleep, prefix, page.next_after, watch.sink
                    )
                except c.CommandError as error:  # the stream has begun: say it in the stream
                    problem = {"code": error.code.value, "message": error.message}
                    yield _sse("error", {"error": problem})
                    return
            del page
            yield _sse("ready", {"prefix_watched": True})
            while True:
                with trio.move_on_after(SSE_KEEPALIVE_S):
                    await watch.wake.wait()
                if watch.closing:
                    yield _sse(
                        "error",
                        {"error": {"code": "unavailable", "message": "server is shutting down"}},
                    )
                    return
                if watch.overflowed:
                    return  # the connection is closed already (_Watch.sink)
                data, size = watch.take(SSE_CHUNK_BYTES)
                yield data if data else b": keep-alive\n\n"
                watch.written(size)
        finally:
            self._watches.discard(watch)
            watch.ended = True
            # Unsubscribe without waiting: the actor may be gone already at shutdown.
            try:
                self._requests.send_nowait(c.Request([c.Unsubscribe(watch.sink)], _ignore))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the sink answers False at its next event: the watch ends then

    def close(self) -> None:
        """End every event stream (a last `error` event: shutting down) and refuse new
        ones: the first step of the HTTP server's stop."""
        self._closing = True
        for watch in list(self._watches):
            watch.closing = True
            watch.wake.set()

    @property
    def watching(self) -> int:
        return len(self._watches)

    # -- routes --------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The /api/v1 routes, relative to the mount point. Path parameters are the
        raw (percent-encoded) segments."""
        e = self._endpoint
        job = "/jobs/{id}"
        rule = "/rules/{id}"
        return [
            Route("/jobs", e(c.ListJobs, self.list_jobs), methods=["GET"]),
            Route(job, e(c.GetJob, self.get_job), methods=["GET"]),
            Route(job, e(c.SetJob, self.put_job), methods=["PUT"]),
            Route(job, e(c.DeleteJob, self.delete_job), methods=["DELETE"]),
            Route(f"{job}/pause", e(c.PauseJob, self._job_action(c.PauseJob)), methods=["POST"]),
            Route(f"{job}/resume", e(c.ResumeJob, self._job_action(c.ResumeJob)), methods=["POST"]),
            Route(f"{job}/run", e(c.RunJobNow, self._job_action(c.RunJobNow)), methods=["POST"]),
            Route(f"{job}/preview", e(c.PreviewJob, self.preview_job), methods=["GET"]),
            Route("/rules", e(c.ListRules, self.list_rules), methods=["GET"]),
            Route(rule, e(c.GetRule, self.get_rule), methods=["GET"]),
            Route(rule, e(c.SetRule, self.put_rule), methods=["PUT"]),
            Route(rule, e(c.DeleteRule, self.delete_rule), methods=["DELETE"]),
            Route("/info", e(c.GetInfo, self.info), methods=["GET"]),
            Route("/events", e(c.Subscribe, self.events), methods=["GET"]),
        ]


def _ignore(results: list[c.Result]) -> None:
    pass


def _path_id(request: Request) -> str:
    """The `{id}` segment, percent-decoded as UTF-8; INVALID_ARGUMENT for a `%` not
    followed by two hex digits or bytes that are not UTF-8."""
    raw: str = request.path_params["id"]
    if _BAD_ESCAPE.search(raw):
        raise convert.invalid(
            "bad percent-encoding in the id (a % must be followed by two hex digits)"
        )
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise convert.invalid("the id is not UTF-8 once percent-decoded") from None


def _sse(event: str, data: object) -> bytes:
    # orjson writes no newline inside a document: one `data:` line per event.
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _Watch:
    """One event stream's buffer between the actor (which calls `sink` after each
    commit, in its own task: it must not block) and the stream's task.

    Events are encoded as SSE frames in the sink and counted until the frame is
    written; past `limit` bytes the sink answers False (the subscription ends),
    drops what waits and closes the connection at once: a client that stopped
    reading cannot hold the server's memory, nor a write for ever.
    """

    def __init__(self, limit: int, connection: Any, encode: Callable[[JobEvent], bytes]) -> None:
        self._limit = limit
        self._encode = encode
        self._connection = connection  # app.py's _Connection: abort() closes the socket
        self._frames: deque[bytes] = deque()
        self._pending = 0  # bytes encoded and not yet written
        self.wake = trio.Event()
        self.overflowed = False
        self.closing = False
        self.ended = False

    def sink(self, events: list[JobEvent]) -> bool:
        if self.ended or self.overflowed:
            return False
        frames = []
        size = 0
        for event in events:  # encoded only as far as the bound allows
            frame = self._encode(event)
            size += len(frame)
            if self._pending + size > self._limit:
                self.overflowed = True
                self._frames.clear()
                self.wake.set()
                log.warning("http watch fell behind", limit_bytes=self._limit)
                if self._connection is not None:
                    self._connection.abort()
                return False
            frames.append(frame)
        self._frames.extend(frames)
        self._pending += size
        self.wake.set()
        return True

    def take(self, limit: int) -> tuple[bytes, int]:
        """The waiting frames, up to `limit` bytes (one frame at least), and their size."""
        frames = self._frames
        parts: list[bytes] = []
        size = 0
        while frames and (not parts or size + len(frames[0]) <= limit):
            frame = frames.popleft()
            parts.append(frame)
            size += len(frame)
        if not frames:
            self.wake = trio.Event()
        return b"".join(parts), size

    def written(self, size: int) -> None:
        self._pending -= size


class _Frames:
    """Each committed JobEvent encoded once as an SSE frame, however many streams it
    goes to: the actor calls every sink with the same JobEvent objects, one after
    another within one publish (in its own task), so the first sink that meets an
    event encodes it and the others reuse the bytes. The cache lives for one
    publish: a callback Trio runs once the actor yields clears it."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[JobEvent, bytes]] = {}  # id(event) -> (event, frame)

    def __call__(self, event: JobEvent) -> bytes:
        hit = self._cache.get(id(event))
        if hit is not None and hit[0] is event:
            return hit[1]
        if not self._cache:
            trio.lowlevel.current_trio_token().run_sync_soon(self._cache.clear)
        document = convert.event_to_json(event)
        frame = _sse(document["type"], document)
        self._cache[id(event)] = (event, frame)  # holding the event keeps its id unique
        return frame
