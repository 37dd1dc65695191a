"""The one HTTP server: an ASGI app (Starlette) served by Hypercorn inside the server's nursery.

    /metrics /live /ready     health.py (the probes; paths and formats of the old metrics port)
    /api/v1/...               api.py (the JSON API), /api/v1/openapi.json (openapi.py)
    (more routes)             `build_app(..., extra_routes=...)`: e.g. a dashboard's
                              Mount("/ui", routes=...) and its static files

Hypercorn speaks HTTP/1.1 (h11) and HTTP/2 on Trio; its connection handler
(`hypercorn.trio.tcp_server.TCPServer`) is driven here by the project's own
accept loop (protocols/accept.py) rather than by `hypercorn.trio.serve`, for
what the old metrics port guaranteed and `serve` cannot: at most
`max_connections` at once (the next get 503 "too many connections"), an answer
rather than a hang when the process is out of file descriptors, and a handle on
each connection so that an event stream whose client stopped reading can be
dropped, and every connection closed at stop.

Stop (`HttpServer.close`, from app.py before the front nursery is cancelled):
new connections get 503, the event streams end with a last event, requests in
flight get up to `grace_s`, then what is left is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kairoi_trio.commands import ErrorCode
from kairoi_trio.config import parse_address
from kairoi_trio.observability.metrics import Readiness
from kairoi_trio.protocols import accept
from kairoi_trio.protocols.http import openapi
from kairoi_trio.protocols.http.api import METHOD_NOT_ALLOWED, Api, error_response
from kairoi_trio.protocols.http.health import health_routes

log = structlog.get_logger(__name__)

API_PREFIX = "/api/v1"
REFUSAL_SEND_S = 5.0  # a refused client gets this long to take its 503
KEEP_ALIVE_S = 5.0  # an idle connection (no request in progress) is closed after this
STOP_GRACE_S = 2.0  # at stop, requests in flight get this long before they are cut
MAX_HEAD_BYTES = 256 << 10  # a request's line and headers


def build_app(
    api: Api,
    readiness: Readiness,
    *,
    extra_routes: Sequence[BaseRoute] = (),
) -> ASGIApp:
    """The ASGI app: the probes, the API under /api/v1, then `extra_routes` (a
    dashboard: its pages, and a Mount of its static files).

    Unknown paths answer 404 and wrong methods 405, both as the API's JSON error.
    """
    probes = health_routes(readiness)
    api_routes = [*api.routes(), Route("/openapi.json", _openapi, methods=["GET"])]
    app = Starlette(
        routes=[*probes, Mount(API_PREFIX, routes=api_routes), *extra_routes],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.api = api  # for routes added later (a dashboard calls the same actor)
    return _UnreadBodies(_RawApiPaths(app), api.max_body_bytes)


async def _openapi(request: Request) -> Response:
    return Response(openapi.document_bytes(), media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(404, ErrorCode.NOT_FOUND.value, f"no route {request.url.path}")
    if exc.status_code == 405:
        return error_response(
            405,
            METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.url.path}",
            dict(exc.headers or {}),
        )
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("http request failed", path=request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error (logged by the server)")


class _UnreadBodies:
    """A response that would start before its request's body was read whole (404
    and 405 of the routing, 401, 403, a handler that needs no body: pause, DELETE)
    first reads the rest and drops it. Hypercorn keeps a connection only once h11
    has the whole request; else it closes it after the response without a word,
    and a client that sent its body after the answer's head, then its next request
    on the same connection, got no answer (httpx: "Server disconnected without
    sending a response"). A body beyond `max_body` bytes in all (declared, or read
    by the handler and this) is not read: the response says `connection: close`
    instead (RFC 9112, 9.6)."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _body_length(scope)
        if scope["type"] != "http" or declared == 0:
            await self.app(scope, receive, send)
            return
        done = False  # the whole body was received (or the client went away)
        size = 0  # body bytes received so far

        async def reading() -> Any:
            nonlocal done, size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start" and not done:
                too_large = declared is not None and declared > self.max_body
                while not done and not too_large:
                    await reading()
                    too_large = size > self.max_body
                if not done:
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, reading, sending)


def _body_length(scope: Scope) -> int | None:
    """The request's Content-Length (0 when it has no body), None when chunked."""
    length = 0
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.isdigit():
            length = int(value)
    return length


class _RawApiPaths:
    """Routes /api/ paths on the raw, percent-encoded path.

    ASGI servers give routers the decoded path, in which an id `a/b` sent as
    `a%2Fb` would be two segments. Under /api/ the path is replaced by the raw
    one (ASCII by the HTTP grammar; otherwise 400), so `{id}` is one encoded
    segment and the handler decodes it (api._path_id).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path")
            if raw is not None and raw.startswith(b"/api/"):
                try:
                    scope = dict(scope, path=raw.decode("ascii"))
                except UnicodeDecodeError:
                    response = error_response(
                        400,
                        ErrorCode.INVALID_ARGUMENT.value,
                        "the path must be ASCII (percent-encode the id)",
                    )
                    await response(scope, receive, send)
                    return
        try:
            await self.app(scope, receive, send)
        except Exception:
            # Answered 500 and logged by _server_error; Starlette raises it again for
            # servers to log, which would log it twice.
            pass


class _Connection:
    """One accepted connection, as the app sees it (scope["state"]["connection"])."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    def abort(self) -> None:
        """Close the socket now, from any task without waiting: a write blocked on a
        client that does not read ends with ClosedResourceError (Hypercorn then ends
        the connection)."""
        try:
            self.stream.socket.close()
        except OSError:
            pass


class HttpServer:
    """Hypercorn's connection handler on an accept loop of our own (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        api: Api,
        listen: str,
        *,
        max_connections: int = 64,
        grace_s: float = STOP_GRACE_S,
    ) -> None:
        self._app = wrap_app(app, 0, "asgi")  # type: ignore[arg-type]
        self._api = api
        self._listen = listen
        self._max_connections = max_connections
        self._grace_s = grace_s
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._idle = trio.Event()
        config = HypercornConfig()
        config.keep_alive_timeout = KEEP_ALIVE_S
        config.include_server_header = False
        # A request line with an id of 65,535 bytes, percent-encoded (x3), must fit.
        config.h11_max_incomplete_size = MAX_HEAD_BYTES
        config.h2_max_header_list_size = MAX_HEAD_BYTES
        config.accesslog = None
        config.errorlog = _hypercorn_logger()
        _ = config.log  # made now: Hypercorn makes it at its first use, maybe out of descriptors
        self._config = config
        self._context = WorkerContext(None)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled (call `close` first for an orderly stop).
        Reports the bound port. OSError naming the address if it cannot listen."""
        host, port = parse_address(self._listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            raise OSError(
                error.errno, f"http cannot listen on {self._listen}: {error.strerror}"
            ) from None
        bound = listeners[0].socket.getsockname()[1]
        log.info("http listening", listen=self._listen, port=bound)
        task_status.started(bound)
        refusal = _refusal(b"server has too many open files\n")
        await accept.serve_listeners(self._handle, listeners, name="http", refusal=refusal)

    async def _handle(self, stream: trio.SocketStream) -> None:
        refused = (
            b"server is shutting down\n"
            if self._stopping
            else b"too many connections\n"
            if len(self._connections) >= self._max_connections
            else None
        )
        if refused is not None:
            with trio.move_on_after(REFUSAL_SEND_S):
                await stream.send_all(_refusal(refused))
            return
        connection = _Connection(stream)
        self._connections.add(connection)
        try:
            state: dict[str, Any] = {"connection": connection}
            await TCPServer(self._app, self._config, self._context, ConnectionState(state), stream)  # type: ignore[arg-type]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._idle.set()

    async def close(self) -> None:
        """Answer new connections 503; end event streams with their last event; wait up
        to grace_s for requests in flight (keep-alive connections close once idle),
        then close every connection left. The accept loop ends when `serve` is
        cancelled, after this."""
        self._stopping = True
        self._api.close()
        await self._context.terminated.set()  # Hypercorn closes idle keep-alive connections
        with trio.move_on_after(self._grace_s):
            while self._connections:
                self._idle = trio.Event()
                await self._idle.wait()
        for connection in list(self._connections):
            connection.abort()


class _ToStructlog(logging.Handler):
    """Hypercorn's error log (its own failures, an app's exception it caught) as the
    server's log lines, not a second format on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        log.warning(
            "hypercorn",
            message=record.getMessage(),
            exc_info=record.exc_info if record.exc_info else None,
        )


def _hypercorn_logger() -> logging.Logger:
    logger = logging.getLogger("kairoi_trio.http.hypercorn")
    logger.handlers = [_ToStructlog()]
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    return logger


def _refusal(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
