"""The http runner (extension): POST the job as JSON; a complete 2xx answer means executed.

The request (docs/runners.md has the details and the reasons)::

    POST <rule url>
    Content-Type: application/json
    X-Kairoi-Job-Id: <the id, percent-encoded (header_job_id); absent when too long>
    X-Kairoi-Attempt: <n>
    X-Kairoi-Scheduled-At: 2026-12-01T09:00:00.000000Z

    {"id": "<the id, exactly>", "execute_at": "2026-12-01T09:00:00.000000Z",
     "scheduled_at": "2026-12-01T09:00:00.000000Z", "attempt": n,
     "payload": "<UTF-8 text>" or null}

A payload that is not UTF-8 goes as "payload_base64" (standard base64) with
"payload": null. `scheduled_at` is the run's nominal time (Job.scheduled_at):
execute_at for a one-shot job, the occurrence for a recurring one (whose
execute_at may be later: jitter, a retry). Delivery is at least once: the
receiver deduplicates on (id, scheduled_at), which the headers also carry.

The run succeeds when the answer is 2xx and complete, body included, within
`timeout_s` (one deadline for connecting, sending, the headers and the whole
body) and with a body of at most `max_response_bytes`. The body is counted,
not kept: only its first bytes are, for the outcome of a failed run. The
exchange is h11 over Trio streams with connections kept alive per origin
(runners/http_client.py).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import h11
import idna
import trio

from kairoi_trio import __version__
from kairoi_trio.model import HttpRunner, Job, Rule, RunnerSpec, format_time
from kairoi_trio.runners.base import RunFailed, Runner
from kairoi_trio.runners.http_client import (
    KEEPALIVE_EXPIRY_S,
    Connection,
    ConnectionPool,
    Target,
    parse_target,
)

DEFAULT_MAX_RESPONSE_BYTES = 1 << 20
# Longer ids go in the JSON body only: common servers refuse header lines of
# 8 KiB (nginx) or header blocks of 16 KiB (Node.js), and Python's http.server
# lines of 64 KiB.
MAX_ID_HEADER_BYTES = 4096
_EXCERPT_BYTES = 200  # of a failed answer's body, for its outcome
_MAX_TARGETS = 4096  # parsed URLs kept (one per rule in use)
# Visible ASCII stays as it is, except the escape character itself and "+",
# which form decoders read as a space.
_ID_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%+")


def header_job_id(job_id: str) -> str | None:
    """The value of X-Kairoi-Job-Id for `job_id`, or None when it would be too long.

    The id's UTF-8 bytes with every byte that is not visible ASCII (0x21-0x7E),
    and "%" and "+", written as %XX (RFC 3986 percent-encoding): any id fits in
    a header this way, and decodeURIComponent / urllib.parse.unquote give it
    back exactly. None when the result is over MAX_ID_HEADER_BYTES.
    """
    encoded = quote(job_id, safe=_ID_HEADER_SAFE)
    return encoded if len(encoded) <= MAX_ID_HEADER_BYTES else None


def request_body(job: Job, execute_at: str | None = None, scheduled_at: str | None = None) -> bytes:
    """The JSON document POSTed for `job` (ASCII: every other character is escaped).

    execute_at, scheduled_at: the job's times as format_time writes them, when
    the caller has them already (computed here otherwise).
    """
    if execute_at is None:
        execute_at = format_time(job.execute_at)
    if scheduled_at is None:
        scheduled_at = _scheduled_text(job, execute_at)
    body: dict[str, object] = {
        "id": job.id,
        "execute_at": execute_at,
        "scheduled_at": scheduled_at,
        "attempt": job.attempts,
        "payload": None,
    }
    if job.payload:
        try:
            body["payload"] = job.payload.decode()
        except UnicodeDecodeError:
            body["payload_base64"] = base64.b64encode(job.payload).decode()
    return json.dumps(body).encode()


def _scheduled_text(job: Job, execute_at: str) -> str:
    """format_time(job.scheduled_at), reusing `execute_at` (the text of job.execute_at)
    when the two times are the same: every one-shot job, most recurring runs."""
    scheduled = job.scheduled_at
    return execute_at if scheduled == job.execute_at else format_time(scheduled)


def redacted(url: str) -> str:
    """`url` without the password of its user info, for outcomes and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<invalid URL>"
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


class _TooLarge(Exception):
    pass


@dataclass(slots=True)
class _Answer:
    """How far the endpoint's answer got: its status, body bytes counted, the start of the body."""

    status: int | None = None
    received: int = 0
    excerpt: bytearray = field(default_factory=bytearray)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def failed_status(self, url: str) -> str:
        text = self.excerpt.decode("utf-8", "replace")
        text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
        return f"HTTP {self.status} from {url}" + (f": {text}" if text else "")


class HttpRunnerBackend(Runner):
    kind = "http"

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_connections: int = 100,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._timeout = timeout_s
        self._max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._pool: ConnectionPool | None = None
        self._targets: dict[str, Target] = {}  # by URL: parsed once, not per run

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pool = self._pool = ConnectionPool(self._max_connections)
        task_status.started()
        try:
            while True:  # idle connections do not outlive their keep-alive time
                await trio.sleep(KEEPALIVE_EXPIRY_S / 2)
                pool.close_expired()
        finally:
            self._pool = None
            pool.close()

    def check_rule(self, spec: RunnerSpec) -> None:
        """Refuse a URL no request could ever be sent to (not http(s), no host, its
        host not resolvable as a name: a label over 63 bytes, a bad IDNA label such
        as `xn--a`)."""
        if not isinstance(spec, HttpRunner):
            return
        try:
            parse_target(spec.url)
        except ValueError as error:
            raise ValueError(f"http url {redacted(spec.url)!r} is not valid: {error}") from None
        reason = host_problem(urlsplit(spec.url).hostname or "")
        if reason:
            raise ValueError(f"http url {redacted(spec.url)!r}: {reason}")

    async def run(self, job: Job, rule: Rule) -> str:
        """POST `job` to the rule's URL; "HTTP <status>" on success, else RunFailed."""
        assert isinstance(rule.runner, HttpRunner)
        url = rule.runner.url
        shown = redacted(url)
        target = self._target(url, shown)
        execute_at = format_time(job.execute_at)
        scheduled_at = _scheduled_text(job, execute_at)
        content = request_body(job, execute_at, scheduled_at)
        headers = [
            *target.headers,
            *self._fixed_headers,
            (b"Content-Length", b"%d" % len(content)),
            (b"X-Kairoi-Attempt", b"%d" % job.attempts),
            (b"X-Kairoi-Scheduled-At", scheduled_at.encode()),
        ]
        encoded_id = header_job_id(job.id)
        if encoded_id is not None:
            headers.append((b"X-Kairoi-Job-Id", encoded_id.encode()))
        answer = _Answer()
        with trio.move_on_after(self._timeout):
            return await self._post(target, shown, content, headers, answer)
        if answer.status is None:
            raise RunFailed(f"no answer from {shown} within {self._timeout:g}s")
        if not answer.ok:
            raise RunFailed(answer.failed_status(shown))
        raise RunFailed(
            f"no complete answer from {shown} within {self._timeout:g}s "
            f"(HTTP {answer.status}, body unfinished after {answer.received} bytes)"
        )

    _fixed_headers = (
        (b"User-Agent", f"kairoi-trio/{__version__}".encode()),
        (b"Accept", b"*/*"),
        # Counted bytes are wire bytes, and no decompression bomb can go off.
        (b"Accept-Encoding", b"identity"),
        (b"Content-Type", b"application/json"),
    )

    def _target(self, url: str, shown: str) -> Target:
        """The parsed URL (kept for the next runs), or RunFailed for a stored rule's
        URL no request can go to."""
        target = self._targets.get(url)
        if target is None:
            try:
                target = parse_target(url)
            except ValueError as error:
                raise RunFailed(f"POST {shown} failed: {error}") from None
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _post(
        self,
        target: Target,
        shown: str,
        content: bytes,
        headers: list[tuple[bytes, bytes]],
        answer: _Answer,
    ) -> str:
        """The exchange itself; `shown` is the URL as outcomes may show it."""
        pool = self._pool
        if pool is None:
            raise RunFailed("the http runner is not running")
        try:
            for fresh in (False, True):
                conn = await pool.acquire(target, fresh=fresh)
                ended = False
                try:
                    await self._exchange(conn, target, content, headers, answer)
                    ended = True
                except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError):
                    if fresh or not conn.stale_suspect:
                        raise
                    # A kept-alive connection the server had closed: once more on a new
                    # one (at least once: a server that read the request and hung up
                    # without answering gets it again).
                finally:
                    # Kept only when read to its end: a failure, a timeout or a
                    # cancellation (the pool's rule timeout) mid-exchange closes it.
                    if ended:
                        pool.release(conn)
                    else:
                        pool.discard(conn)
                if ended:
                    break
        except _TooLarge:
            if not answer.ok:
                raise RunFailed(answer.failed_status(shown)) from None
            raise RunFailed(
                f"answer from {shown} too large: HTTP {answer.status} "
                f"with a body over {self._max_response_bytes} bytes"
            ) from None
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,  # the pool, closed as the server stops
            h11.ProtocolError,
        ) as error:
            raise RunFailed(f"POST {shown} failed: {_reason(error)}") from None
        except UnicodeError as error:  # the resolver's IDNA encoding of the host (a stored rule)
            raise RunFailed(
                f"POST {shown} failed: the host name cannot be encoded: {error}"
            ) from None
        if not answer.ok:
            raise RunFailed(answer.failed_status(shown))
        return f"HTTP {answer.status}"

    async def _exchange(
        self,
        conn: Connection,
        target: Target,
        content: bytes,
        headers: list[tuple[bytes, bytes]],
        answer: _Answer,
    ) -> None:
        """Send the request on `conn` and read the answer to its end into `answer`.

        Raises _TooLarge past max_response_bytes, and what Connection raises."""
        limit = self._max_response_bytes
        await conn.send_request(target.path, headers, content)
        while True:
            event = await conn.next_event()
            if isinstance(event, h11.Data):
                chunk = event.data
                answer.received += len(chunk)
                if answer.received > limit:
                    raise _TooLarge
                room = _EXCERPT_BYTES - len(answer.excerpt)
                if room > 0:
                    answer.excerpt += chunk[:room]
            elif isinstance(event, h11.Response):
                answer.status = event.status_code
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > limit:
                        raise _TooLarge
            else:  # the end of the answer
                return


def _reason(error: BaseException) -> str:
    """One line for a failed exchange (trio.BrokenResourceError wraps the OSError)."""
    text = str(error) or str(error.__cause__ or "") or type(error).__name__
    return " ".join(text.split())


def host_problem(host: str) -> str:
    """Why the resolver would refuse `host` ("" when it would not).

    ASCII names go to getaddrinfo as they are (trio.open_tcp_stream), where a
    label must be 1-63 bytes and an `xn--` label valid Punycode; other names are
    IDNA 2008-encoded first (RFC 5891, the `idna` package httpx.URL uses).
    """
    if not host or ":" in host:  # an IPv6 literal
        return ""
    try:
        if host.isascii():
            for label in host.rstrip(".").split("."):
                if not 0 < len(label) <= 63:
                    return f"host name label {label[:20]!r} must be 1 to 63 characters"
                if label.lower().startswith("xn--"):
                    idna.decode(label)
        else:
            idna.encode(host, uts46=True)
    except UnicodeError as error:  # idna.IDNAError is one
        return f"host name {host[:80]!r} cannot be encoded: {error}"
    return ""
