"""The http runner's HTTP/1.1 client: h11 over Trio streams, connections kept alive per origin.

h11 (python-hyper's sans-io HTTP/1.1 library, the one httpx uses underneath)
writes each request and parses each answer; this module only moves its bytes
over Trio streams (TCP, or `trio.SSLStream` for https) and keeps connections
for reuse. It replaced httpx.AsyncClient, whose layers cost about ten times
the CPU per request (docs/benchmarks.md, "HTTP runner (issue 12)").

A `ConnectionPool` holds at most `max_connections` connections in all,
whatever their origin (scheme, host, port). A run takes an idle connection to
its origin (the most recently used) or opens one; a connection whose answer was
read to its end, and that neither side asked to close, goes back to the idle
list; any other (an error, a timeout or a cancellation mid-exchange, a body
too large to read on) is closed. An idle connection is not reused once it has
been idle for KEEPALIVE_EXPIRY_S, nor, once idle for SOCKET_CHECK_AFTER_S, when
its socket is readable (the server closed it, or sent bytes nobody asked for);
`close_expired` closes those still held. A request that fails on a reused
connection before any byte of answer (the server had closed it) is for the
caller to try once more on a `fresh` one. At the bound, a run closes the
idlest connection to another origin, or waits for one to be given back.

URLs are parsed by httpx.URL (the same checks and IDNA host encoding as
before). Proxies from the environment (HTTP_PROXY, ...) are not used.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass

import h11
import httpx
import trio

KEEPALIVE_EXPIRY_S = 4.0  # below the 5 s of Node.js and Apache's idle keep-alive timeout
# Idle this long, a connection's socket is checked before reuse: a server that hangs up
# on an idle connection (perhaps with an unasked "408 Request Timeout") does it later.
SOCKET_CHECK_AFTER_S = 0.25
MAX_HEAD_BYTES = 100 * 1024  # of an answer's status line and headers (httpcore's bound)
RECEIVE_BYTES = 65536

_NO_ANSWER = "the server closed the connection without an answer"

Origin = tuple[str, str, int]  # scheme, host (ASCII), port


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL's requests go and the headers that follow from it.

    host: ASCII (IDNA-encoded) name or IP address (IPv6 without brackets).
    path: the request target (path and query), percent-encoded.
    headers: Host, and Authorization (Basic) when the URL has user info.
    """

    scheme: str
    host: str
    port: int
    path: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def origin(self) -> Origin:
        return (self.scheme, self.host, self.port)


def parse_target(url: str) -> Target:
    """The Target of an http(s) URL; ValueError (a one-line reason) for any other."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ValueError(str(error)) from None
    scheme = parsed.scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {scheme + '://' if scheme else '(none)'}")
    if not parsed.raw_host:
        raise ValueError("the URL has no host")
    headers = [(b"Host", parsed.netloc)]
    username, password = parsed.username, parsed.password
    if username or password:  # as httpx did: HTTP Basic, UTF-8
        token = base64.b64encode(f"{username}:{password}".encode())
        headers.append((b"Authorization", b"Basic " + token))
    port = parsed.port or (443 if scheme == "https" else 80)
    return Target(scheme, parsed.raw_host.decode("ascii"), port, parsed.raw_path, tuple(headers))


class Connection:
    """One HTTP/1.1 connection: its stream, the socket under it, and its h11 state."""

    __slots__ = ("answered", "h11", "idle_since", "origin", "socket", "stream", "uses")

    def __init__(self, stream: trio.abc.Stream, socket: trio.socket.SocketType, origin: Origin):
        self.stream = stream
        self.socket = socket
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0
        self.uses = 0  # exchanges completed on it
        self.answered = False  # a byte of the current answer came

    @property
    def stale_suspect(self) -> bool:
        """True when the current exchange failed as on a kept-alive connection the
        server had already closed: reused, and not one byte of answer received."""
        return self.uses > 0 and not self.answered

    async def send_request(
        self, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Send `POST target` with `headers` (Content-Length among them) and `body`.

        Raises h11.LocalProtocolError for a header h11 refuses, trio.BrokenResourceError
        (and OSError) when the connection fails."""
        self.answered = False
        request = h11.Request(method=b"POST", target=target, headers=headers)
        parts = (self.h11.send(request), self.h11.send(h11.Data(data=body)))
        end = self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(b"".join(part for part in (*parts, end) if part))

    async def next_event(self) -> h11.Response | h11.Data | h11.EndOfMessage:
        """The next part of the answer: its head, a piece of its body, or its end.

        1xx answers are skipped. Raises h11.RemoteProtocolError for an answer that
        is not HTTP/1.1 or is cut short, trio.BrokenResourceError when the
        connection fails."""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
                if not data and self.h11.their_state is h11.SEND_RESPONSE:
                    raise h11.RemoteProtocolError(_NO_ANSWER)  # (h11's words name its states)
                self.answered = self.answered or bool(data)
                self.h11.receive_data(data)
            elif isinstance(event, h11.Response | h11.Data | h11.EndOfMessage):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError(_NO_ANSWER)
            # an h11.InformationalResponse (1xx): the answer comes after it

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly and neither side asked to close."""
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        """Close the socket now (no TLS close_notify): nothing is awaited, so this is
        safe in a cancelled scope and leaves nothing half read for a next request."""
        self.socket.close()


class ConnectionPool:
    """Kept-alive connections, at most `max_connections` open in all (module docstring)."""

    def __init__(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max = max_connections
        self._open = 0
        self._idle: dict[Origin, list[Connection]] = {}
        self._waiters = trio.lowlevel.ParkingLot()
        self._ssl_context: ssl.SSLContext | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def acquire(self, target: Target, *, fresh: bool = False) -> Connection:
        """A connection to target's origin: an idle one still fit for reuse, else (or
        when `fresh`) a new one. Raises OSError (refused, unreachable, TLS), UnicodeError (a host
        name the resolver cannot encode), trio.BrokenResourceError."""
        if self._closed:
            raise trio.ClosedResourceError("the connection pool is closed")
        origin = target.origin
        while True:
            idle = None if fresh else self._idle.get(origin)
            now = trio.current_time()
            while idle:
                conn = idle.pop()
                if self._fit(conn, now):
                    return conn
                self._close(conn)
            if self._open < self._max:
                break
            if not self._close_idlest():
                await self._waiters.park()
        self._open += 1
        try:
            return await self._connect(target)
        except BaseException:
            self._open -= 1
            self._waiters.unpark()
            raise

    def release(self, conn: Connection) -> None:
        """Give `conn` back after an exchange: kept when `conn.reusable`, else closed."""
        if self._closed or not conn.reusable:
            self._close(conn)
            return
        conn.h11.start_next_cycle()
        conn.uses += 1
        conn.idle_since = trio.current_time()
        self._idle.setdefault(conn.origin, []).append(conn)
        self._waiters.unpark()

    def discard(self, conn: Connection) -> None:
        """Close `conn` (an exchange that failed, timed out or was cut off)."""
        self._close(conn)

    def close_expired(self) -> None:
        """Close idle connections past KEEPALIVE_EXPIRY_S or closed by the server."""
        now = trio.current_time()
        for origin, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if self._fit(conn, now, check_socket=True):
                    keep.append(conn)
                else:
                    self._close(conn)
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]

    def close(self) -> None:
        """Close every idle connection; connections in use close when given back."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                self._close(conn)
        self._idle.clear()
        self._waiters.unpark_all()

    @staticmethod
    def _fit(conn: Connection, now: float, *, check_socket: bool = False) -> bool:
        """Whether an idle connection may carry another request: not past its keep-alive
        time and, once idle for SOCKET_CHECK_AFTER_S, its socket not readable (a poll(2)
        a request; a connection reused sooner that the server closed fails without an
        answer, and the runner tries once more on a new one)."""
        idle_for = now - conn.idle_since
        if idle_for >= KEEPALIVE_EXPIRY_S:
            return False
        if check_socket or idle_for >= SOCKET_CHECK_AFTER_S:
            return not conn.socket.is_readable()
        return True

    def _close(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1
        self._waiters.unpark()

    def _close_idlest(self) -> bool:
        """Close the connection idle the longest, whatever its origin; False if none is."""
        idlest: list[Connection] | None = None
        for idle in self._idle.values():
            if idle and (idlest is None or idle[0].idle_since < idlest[0].idle_since):
                idlest = idle
        if idlest is None:
            return False
        self._close(idlest.pop(0))
        return True

    async def _connect(self, target: Target) -> Connection:
        tcp = await trio.open_tcp_stream(target.host, target.port)
        if target.scheme == "http":
            return Connection(tcp, tcp.socket, target.origin)
        if self._ssl_context is None:
            # The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR honoured by OpenSSL).
            self._ssl_context = ssl.create_default_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        stream = trio.SSLStream(
            tcp, self._ssl_context, server_hostname=target.host, https_compatible=True
        )
        try:
            await stream.do_handshake()
        except BaseException:
            tcp.socket.close()
            raise
        return Connection(stream, tcp.socket, target.origin)
