"""The `amqp` runner: publish each due job's id to RabbitMQ; executed once the broker confirms.

Messages are published `mandatory`: one that no queue receives comes back and
fails the run with reason `unroutable`, unless the rule's DSN says
`?mandatory=false` (Kairoi's fire-and-forget). Connections are opened on first
use per DSN string (without `mandatory`), kept alive, shared by every rule with
that DSN, and bounded: beyond `max_connections` the least recently used is
closed (after its in-flight confirms settle). A connection that dies is
dropped; the next run reopens it, and if that fails the DSN goes into backoff
(0.5 s doubling to 30 s) during which runs fail at once with the last error, so
a down broker is not hammered. See docs/amqp.md and docs/runners.md.

The message: the id as body (and message_id when it fits), headers
`kairoi-execute-at`, `kairoi-attempt`, `kairoi-payload` (when there is one) and
`scheduled_at`: the run's nominal time (Job.scheduled_at, RFC 3339 UTC with
microseconds), with the id the key consumers deduplicate at-least-once
deliveries on.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import structlog
import trio
from pamqp.common import FieldTable

from kairoi_trio.model import MICROS, AmqpRunner, Job, Rule, RunnerSpec, format_time
from kairoi_trio.runners.amqp_client import (
    AmqpConnection,
    AmqpError,
    AmqpOptions,
    AmqpReturnedError,
    AmqpTimeoutError,
    AmqpUrl,
    check_publish_names,
    serve_amqp_connection,
)
from kairoi_trio.runners.amqp_wire import MessageProperties, field_table
from kairoi_trio.runners.base import RunFailed, Runner

log = structlog.get_logger(__name__)

_MAX_SHORTSTR = 255
MANDATORY = "mandatory"  # the DSN's query parameter read by the runner, not the connection


@dataclass(slots=True)
class _Slot:
    """What we keep per DSN: its connection, or why there is none and when to retry."""

    url: AmqpUrl
    lock: trio.Lock = field(default_factory=trio.Lock)
    conn: AmqpConnection | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    users: int = 0  # runs using the connection right now; such a slot is not evicted


class AmqpRunnerBackend(Runner):
    """Publishes jobs for `amqp` rules; start `serve` with `nursery.start` before `run`."""

    kind = "amqp"
    backoff_initial_s = 0.5
    backoff_max_s = 30.0

    def __init__(
        self,
        *,
        max_connections: int = 16,
        heartbeat_s: int = 30,
        connect_timeout_s: float = 10,
        confirm_timeout_s: float = 30,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.confirm_timeout_s = confirm_timeout_s
        self._options = AmqpOptions(heartbeat_s=heartbeat_s, connect_timeout_s=connect_timeout_s)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._nursery: trio.Nursery | None = None
        self._closing = False  # aclose() began: runs still in flight fail without a line each

    # -- lifecycle

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery the connections live in; cancel it to drop them all."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._slots.clear()

    async def aclose(self) -> None:
        """Close every connection politely (for a graceful shutdown, before cancelling serve).

        Publishes still unconfirmed fail ("connection closed by client") without a
        warning each: the pool no longer records them (past its grace period), and
        their jobs run again at the next start."""
        self._closing = True
        slots = list(self._slots.values())
        self._slots.clear()
        async with trio.open_nursery() as nursery:
            for slot in slots:
                if slot.conn is not None:
                    nursery.start_soon(slot.conn.aclose)

    @property
    def open_connections(self) -> list[str]:
        """Open connections (password-free DSNs), least recently used first."""
        return [
            slot.url.redacted()
            for slot in self._slots.values()
            if slot.conn is not None and slot.conn.is_open
        ]

    # -- running a job

    def check_rule(self, spec: RunnerSpec) -> None:
        """The DSN's parameters and the names pamqp can encode, checked when the rule is set."""
        if not isinstance(spec, AmqpRunner):
            return
        try:
            dsn, _ = split_dsn(spec.dsn)  # ValueError: a bad `mandatory`
            AmqpUrl.parse(dsn)
            check_publish_names(spec.exchange, spec.routing_key)
        except AmqpError as exc:
            raise ValueError(exc.reason) from None

    async def run(self, job: Job, rule: Rule) -> str:
        spec = rule.runner
        if not isinstance(spec, AmqpRunner):
            raise RunFailed(f"amqp runner given a {spec.kind} rule")
        try:
            plan = _plan(spec)
        except ValueError as exc:
            raise RunFailed(str(exc)) from None
        slot, conn = await self._connection(plan.dsn)
        try:
            if not conn.exchange_known(spec.exchange) and not await conn.exchange_exists(
                spec.exchange, timeout=self.confirm_timeout_s
            ):
                where = conn.url.redacted()
                raise self._failed(job, f"exchange {spec.exchange!r} does not exist on {where}")
            await conn.publish(
                spec.exchange,
                spec.routing_key,
                job.id.encode(),
                properties=_properties(job),
                mandatory=plan.mandatory,
                timeout=self.confirm_timeout_s,
            )
        except AmqpError as exc:
            raise self._failed(job, _reason(exc, plan, conn)) from None
        finally:
            self._release(slot)
        return plan.done

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        """Publish at once on an open connection to a known exchange, and call
        `done` from the connection's reader when the confirm (or a failure) comes;
        False for anything else (first use of a DSN, a connection being opened, an
        unchecked exchange, a blocked connection), which `run` handles."""
        spec = rule.runner
        if not isinstance(spec, AmqpRunner):
            return False
        try:
            plan = _plan(spec)
        except ValueError:
            return False  # run() fails it with the reason
        slot = self._slots.get(plan.dsn)
        conn = slot.conn if slot is not None else None
        if (
            slot is None
            or conn is None
            or not conn.is_open
            or not conn.exchange_known(spec.exchange)
        ):
            return False
        # The rule's timeout, when it comes first, is the deadline, with the pool's words.
        timed_out = None
        timeout = self.confirm_timeout_s
        if timeout_s is not None and timeout_s <= timeout:
            timeout, timed_out = timeout_s, f"timed out after {timeout_s}s"

        def confirmed(error: AmqpError | None) -> None:
            self._release(slot)
            if error is None:
                done(True, plan.done)
            elif timed_out is not None and isinstance(error, AmqpTimeoutError):
                done(False, timed_out)
            else:
                done(False, self._failed(job, _reason(error, plan, conn)).message)

        slot.users += 1
        try:
            started = conn.publish_nowait(
                spec.exchange,
                spec.routing_key,
                job.id.encode(),
                confirmed,
                properties=_properties(job),
                mandatory=plan.mandatory,
                timeout=timeout,
            )
        except AmqpError:
            started = False  # run() fails it with the reason
        if started:
            self._slots.move_to_end(plan.dsn)
        else:
            slot.users -= 1
        return started

    def _release(self, slot: _Slot) -> None:
        """A run is done with `slot`'s connection; enforce the connection limit again."""
        slot.users -= 1
        if len(self._slots) > self.max_connections:
            self._evict()

    def _failed(self, job: Job, reason: str) -> RunFailed:
        if not self._closing:
            log.warning("amqp.run_failed", job=job.id, reason=reason)
        return RunFailed(reason)

    async def _connection(self, dsn: str) -> tuple[_Slot, AmqpConnection]:
        """The open connection for `dsn`, opening it (once, for all waiting runs) if needed.

        Counts the caller as a user of the slot; the caller must decrement `users`.
        """
        slot = self._slots.get(dsn)
        if slot is None:
            try:
                url = AmqpUrl.parse(dsn, frozenset({MANDATORY}))
            except AmqpError as exc:
                raise RunFailed(exc.reason) from None
            if url.ignored:
                log.warning(
                    "amqp.dsn_parameters_ignored",
                    amqp=url.redacted(),
                    parameters=list(url.ignored),
                    why="the [runners.amqp] settings apply to every connection",
                )
            slot = self._slots[dsn] = _Slot(url)
        self._slots.move_to_end(dsn)
        if slot.conn is not None and slot.conn.is_open:
            slot.users += 1
            return slot, slot.conn
        async with slot.lock:
            if slot.conn is not None:
                if slot.conn.is_open:
                    slot.users += 1
                    return slot, slot.conn
                slot.last_error = slot.conn.close_reason or "connection closed"
                slot.conn = None
            wait = slot.retry_at - trio.current_time()
            if wait > 0:
                raise RunFailed(f"{slot.last_error} (next connection attempt in {wait:.1f}s)")
            if self._nursery is None:
                raise RunFailed("amqp runner is not running")
            try:
                conn: AmqpConnection = await self._nursery.start(
                    serve_amqp_connection, dsn, self._options
                )
            except AmqpError as exc:
                slot.failures += 1
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (slot.failures - 1))
                slot.retry_at = trio.current_time() + delay
                slot.last_error = exc.reason
                log.warning("amqp.connect_failed", reason=exc.reason, retry_in_s=delay)
                raise RunFailed(exc.reason) from None
            slot.conn = conn
            slot.failures = 0
            slot.retry_at = 0.0
            slot.users += 1
        self._evict()
        return slot, conn

    def _evict(self) -> None:
        """Drop least recently used DSNs beyond max_connections, skipping busy ones.

        A slot that is connecting or in use by a run is left alone; the limit is
        enforced again when runs finish.
        """
        while len(self._slots) > self.max_connections:
            idle = ((d, s) for d, s in self._slots.items() if not s.users and not s.lock.locked())
            victim = next(idle, None)
            if victim is None:
                return
            dsn, slot = victim
            del self._slots[dsn]
            if slot.conn is not None and slot.conn.is_open and self._nursery is not None:
                log.info("amqp.connection_evicted", amqp=slot.url.redacted())
                self._nursery.start_soon(self._retire, slot.conn)

    async def _retire(self, conn: AmqpConnection) -> None:
        """Close an evicted connection once the publishes already on it are confirmed."""
        with trio.move_on_after(self.confirm_timeout_s):
            await conn.wait_idle()
        await conn.aclose()


@functools.lru_cache(maxsize=1024)
def split_dsn(dsn: str) -> tuple[str, bool]:
    """A rule's DSN as (the DSN its connection is kept under, publish mandatory?).

    `mandatory=true|false` in the query (default true) is the runner's own
    option: it is removed from the connection's DSN, so that rules with and
    without it share one connection. Raises ValueError for another value.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:
        raise ValueError(f"invalid AMQP URL: {exc}") from None
    if not parts.query:
        return dsn, True
    pairs = parts.query.split("&")
    kept = []
    mandatory = True
    for pair in pairs:
        name, _, value = pair.partition("=")
        if unquote_plus(name) != MANDATORY:
            kept.append(pair)
            continue
        value = unquote_plus(value)
        if value not in ("true", "false"):
            raise ValueError(f"invalid AMQP URL: {MANDATORY} must be true or false, not {value!r}")
        mandatory = value == "true"  # the last one wins, as in any query string
    if len(kept) == len(pairs):
        return dsn, True
    return urlunsplit(parts._replace(query="&".join(kept))), mandatory


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a rule's runner spec means for each publish, worked out once per spec."""

    dsn: str  # the connection's DSN (split_dsn)
    mandatory: bool
    target: str  # "exchange/routing_key", for outcomes
    done: str  # the success outcome


@functools.lru_cache(maxsize=1024)
def _plan(spec: AmqpRunner) -> _Plan:
    """Raises ValueError for a bad `mandatory` (split_dsn)."""
    dsn, mandatory = split_dsn(spec.dsn)
    target = f"{spec.exchange}/{spec.routing_key}"
    return _Plan(dsn, mandatory, target, f"published to {target}")


def _reason(error: AmqpError, plan: _Plan, conn: AmqpConnection) -> str:
    """A failed publish's outcome."""
    if isinstance(error, AmqpReturnedError):
        # "unroutable" first: the word users and alerts look for.
        return (
            f"unroutable: {plan.target} on {conn.url.redacted()} routes to no queue "
            f"(the broker returned the message: {error.reply})"
        )
    return f"publish to {plan.target} on {conn.url.redacted()} failed: {error.reason}"


@functools.lru_cache(maxsize=4096)
def _second_text(seconds: int) -> str:
    """format_time of a whole second without its ".000000Z" (cached: jobs due together
    share their second)."""
    return format_time(seconds * MICROS)[:-8]


def _time_text(us: int) -> str:
    """format_time(us) (RFC 3339, microseconds, "Z"), from the cached text of its second."""
    seconds, micros = divmod(us, MICROS)
    return f"{_second_text(seconds)}.{micros:06d}Z"


def _properties(job: Job) -> MessageProperties:
    """The message's properties; the headers table is encoded once for the jobs that
    share it (a burst due at one instant: the same times, attempt and payload).

    MessageProperties, not pamqp's Basic.Properties: amqp_wire encodes them
    several times faster, and the timestamp is plain POSIX seconds.
    """
    # message_id is a short string; a longer id is still the body.
    job_id = job.id
    message_id = (
        job_id
        if len(job_id) <= _MAX_SHORTSTR // 4 or len(job_id.encode()) <= _MAX_SHORTSTR
        else None
    )
    return MessageProperties(
        content_type="text/plain",
        message_id=message_id,
        timestamp=int(time.time()),
        delivery_mode=2,
        encoded_headers=_headers(job.execute_at, job.scheduled_at, job.attempts, job.payload),
    )


# Payloads up to this size are kept in _cached_headers' keys (64 of them at most);
# a larger one is encoded for each message rather than held.
_CACHED_PAYLOAD_MAX = 1024


def _headers(execute_at: int, scheduled_at: int, attempts: int, payload: bytes) -> bytes:
    """The encoded headers table (amqp_wire.field_table)."""
    if len(payload) <= _CACHED_PAYLOAD_MAX:
        return _cached_headers(execute_at, scheduled_at, attempts, payload)
    return _encode_headers(execute_at, scheduled_at, attempts, payload)


@functools.lru_cache(maxsize=64)
def _cached_headers(execute_at: int, scheduled_at: int, attempts: int, payload: bytes) -> bytes:
    return _encode_headers(execute_at, scheduled_at, attempts, payload)


def _encode_headers(execute_at: int, scheduled_at: int, attempts: int, payload: bytes) -> bytes:
    """The headers table; each time formatted once (one string when equal)."""
    execute_text = _time_text(execute_at)
    headers: FieldTable = {
        "kairoi-execute-at": execute_text,
        "kairoi-attempt": attempts,
        "scheduled_at": execute_text if scheduled_at == execute_at else _time_text(scheduled_at),
    }
    if payload:
        headers["kairoi-payload"] = _header_bytes(payload)
    return field_table(headers)


def _header_bytes(payload: bytes) -> str | bytearray:
    """The payload's exact bytes: a long string when it is UTF-8 (as most clients expect),
    else a byte array."""
    try:
        return payload.decode()
    except UnicodeDecodeError:
        return bytearray(payload)
