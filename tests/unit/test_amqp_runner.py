"""The `amqp` runner against a real RabbitMQ: confirms, failures, recovery, LRU, cancellation."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import amqp_broker as broker
import pytest
import structlog.testing
import trio
from amqp_broker import Admin, Route
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands
from pamqp.common import FieldTable

from kairoi_trio.model import (
    MAX_TIME_US,
    MIN_TIME_US,
    AmqpRunner,
    Job,
    Recurrence,
    Rule,
    Schedule,
    ShellRunner,
    format_time,
    now_us,
    to_datetime,
)
from kairoi_trio.runners.amqp import AmqpRunnerBackend, _time_text, split_dsn
from kairoi_trio.runners.base import RunFailed

# Stops, freezes or reconfigures the shared private node, or needs it as it should be:
# one xdist worker runs the whole group, one test at a time (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("broker")


async def start_backend(nursery: trio.Nursery, **options: float) -> AmqpRunnerBackend:
    backend = AmqpRunnerBackend(**options)  # type: ignore[arg-type]
    await nursery.start(backend.serve)
    return backend


def rule_for(route: Route, dsn: str = broker.URL, exchange: str | None = None) -> Rule:
    target = AmqpRunner(dsn, route.exchange if exchange is None else exchange, route.routing_key)
    return Rule(id="r", pattern="*", runner=target)


def job(job_id: str, payload: bytes = b"") -> Job:
    return Job(id=job_id, execute_at=now_us(), payload=payload, attempts=1)


def assert_one_line(reason: str) -> None:
    assert "\n" not in reason and "Traceback" not in reason
    assert "guest:" not in reason  # no password


async def test_run_publishes_the_job_with_its_headers(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    the_job = job("job/ä-1", payload=b"payload \x00 bytes")
    outcome = await backend.run(the_job, rule_for(route))
    assert outcome == f"published to {route.exchange}/{route.routing_key}"
    await backend.run(job("job-2", payload=b"\xff\xfe not utf-8"), rule_for(route))
    await backend.run(job("job-3"), rule_for(route))

    first, second, third = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert first.body == "job/ä-1".encode()
    props = first.properties
    assert props.message_id == "job/ä-1"
    assert props.content_type == "text/plain"
    assert props.delivery_mode == 2
    assert props.timestamp is not None
    assert abs(props.timestamp.timestamp() - time.time()) < 60
    assert first.headers["kairoi-payload"] == "payload \x00 bytes"
    assert first.headers["kairoi-attempt"] == 1
    execute_at = datetime.fromisoformat(first.headers["kairoi-execute-at"])
    assert execute_at == to_datetime(the_job.execute_at)
    assert first.headers["scheduled_at"] == format_time(the_job.execute_at)
    assert second.headers["kairoi-payload"] == bytearray(b"\xff\xfe not utf-8")
    assert "kairoi-payload" not in third.headers


async def test_a_thousand_concurrent_runs_share_one_connection(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    rule = rule_for(route)
    outcomes: list[str] = []

    async def run(i: int) -> None:
        outcomes.append(await backend.run(job(f"j{i}"), rule))

    async with trio.open_nursery() as runs:
        for i in range(1000):
            runs.start_soon(run, i)
    assert len(outcomes) == 1000
    assert backend.open_connections == [broker.url(password=None)]
    messages = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert sorted(m.body for m in messages) == sorted(f"j{i}".encode() for i in range(1000))


async def test_missing_exchange_fails_the_run_and_keeps_the_connection(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    missing = broker.unique("missing")
    await backend.run(job("before"), rule_for(route))
    with pytest.raises(RunFailed) as info:
        await backend.run(job("lost"), rule_for(route, exchange=missing))
    assert f"exchange '{missing}' does not exist" in info.value.message
    assert_one_line(info.value.message)
    await backend.run(job("after"), rule_for(route))
    assert len(backend.open_connections) == 1
    bodies = [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)]
    assert bodies == [b"before", b"after"]


async def test_exchange_deleted_after_it_was_checked(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """The cached check is stale: the broker's 404 on publish fails the run, naming it."""
    backend = await start_backend(nursery)
    other = broker.make_route(admin, "deleted")
    await backend.run(job("ok"), rule_for(other))
    broker.remove_route(other)
    with pytest.raises(RunFailed, match=f"404 NOT_FOUND - no exchange '{other.exchange}'"):
        await backend.run(job("lost"), rule_for(other))
    await backend.run(job("still fine"), rule_for(route))
    with pytest.raises(RunFailed, match="does not exist"):
        await backend.run(job("lost again"), rule_for(other))


async def test_payload_too_large_for_a_header_fails_only_that_run(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    with pytest.raises(RunFailed, match="too large: .* frame size limit of 131072"):
        await backend.run(job("big", payload=b"x" * 200_000), rule_for(route))
    await backend.run(job("fine", payload=b"x" * 100_000), rule_for(route))
    [message] = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert message.body == b"fine"
    assert len(message.headers["kairoi-payload"]) == 100_000


async def test_wrong_password_and_unknown_vhost_are_clear(nursery: trio.Nursery) -> None:
    broker.ensure_broker()
    backend = await start_backend(nursery)
    target = Route("amq.direct", "", "rk")
    with pytest.raises(RunFailed) as info:
        await backend.run(job("a"), rule_for(target, dsn=broker.url(password="nope")))
    assert "ACCESS_REFUSED" in info.value.message
    assert_one_line(info.value.message)
    vhost = broker.unique("vhost")
    with pytest.raises(RunFailed) as info:
        await backend.run(job("b"), rule_for(target, dsn=f"{broker.URL}{vhost}"))
    assert f"NOT_ALLOWED - vhost {vhost} not found" in info.value.message
    assert_one_line(info.value.message)


async def test_unreachable_broker_fails_fast_then_backs_off(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    rule = rule_for(Route("x", "", "rk"), dsn="amqp://guest:guest@127.0.0.1:1/")
    started = time.monotonic()
    with pytest.raises(RunFailed, match="cannot connect to 127.0.0.1:1: Connection refused"):
        await backend.run(job("a"), rule)
    with pytest.raises(RunFailed, match=r"Connection refused \(next connection attempt in"):
        await backend.run(job("b"), rule)
    assert time.monotonic() - started < 2
    with pytest.raises(RunFailed, match="invalid AMQP URL"):
        await backend.run(job("c"), rule_for(Route("x", "", "rk"), dsn="http://nowhere/"))


async def test_an_amqp_host_that_cannot_be_encoded_fails_the_run_plainly(
    nursery: trio.Nursery,
) -> None:
    """A host name the resolver cannot encode fails the run with a one-line reason, as
    the http runner's does (tests/fuzz/test_fuzz_network.py, the http host test)."""
    backend = await start_backend(nursery)
    for host in ["a" * 64, "a..b"]:
        rule = rule_for(Route("x", "", "rk"), dsn=f"amqp://guest:guest@{host}:1/")
        with pytest.raises(RunFailed) as failed:
            await backend.run(job(f"idna-{len(host)}"), rule)
        assert_one_line(failed.value.message)


async def test_a_non_amqp_rule_is_refused(nursery: trio.Nursery) -> None:
    backend = await start_backend(nursery)
    rule = Rule(id="r", pattern="*", runner=ShellRunner("true"))
    with pytest.raises(RunFailed, match="amqp runner given a shell rule"):
        await backend.run(job("a"), rule)


async def test_broker_stopped_mid_burst_then_back(nursery: trio.Nursery, route: Route) -> None:
    backend = await start_backend(nursery, confirm_timeout_s=10)
    backend.backoff_initial_s, backend.backoff_max_s = 0.2, 1.0
    rule = rule_for(route)
    await backend.run(job("warm-up"), rule)
    before = backend._slots[broker.URL].conn
    confirmed: list[str] = []
    failures: list[str] = []
    stop_now = trio.Event()
    stopped = trio.Event()

    async def worker(w: int) -> None:
        """Publish continuously until the broker's app has been stopped."""
        i = 0
        while not stopped.is_set():
            i += 1
            try:
                await backend.run(job(f"w{w}-{i}"), rule)
                confirmed.append(f"w{w}-{i}")
            except RunFailed as failure:
                failures.append(failure.message)
                await trio.sleep(0.01)
            if len(confirmed) >= 300:
                stop_now.set()

    async def stop_broker() -> None:
        await stop_now.wait()
        await trio.to_thread.run_sync(broker.stop_app)
        stopped.set()

    try:
        with trio.fail_after(40):  # no hang: every run ends, one way or the other
            async with trio.open_nursery() as burst:
                burst.start_soon(stop_broker)
                for w in range(100):
                    burst.start_soon(worker, w)
        assert failures, "the broker stopped mid-burst, some runs must fail"
        for reason in set(failures):
            assert_one_line(reason)
        assert any("CONNECTION_FORCED" in r or "connection" in r for r in failures)
    finally:
        await trio.to_thread.run_sync(broker.start_app)

    # Back: a new run succeeds over a fresh connection (after the backoff).
    with trio.fail_after(20):
        while True:
            try:
                await backend.run(job("after"), rule)
                break
            except RunFailed:
                await trio.sleep(0.2)
    assert backend._slots[broker.URL].conn is not before
    admin = Admin()
    try:
        arrived = {m.body.decode() for m in await trio.to_thread.run_sync(admin.drain, route.queue)}
    finally:
        admin.close()
    assert "after" in arrived
    assert set(confirmed) <= arrived  # every confirmed job is in the (durable) queue


async def test_frozen_broker_is_detected_and_runs_fail(nursery: trio.Nursery, route: Route) -> None:
    backend = await start_backend(nursery, heartbeat_s=2, confirm_timeout_s=30)
    backend.backoff_initial_s, backend.backoff_max_s = 0.2, 1.0
    rule = rule_for(route)
    await backend.run(job("warm-up"), rule)
    pid = broker.beam_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with trio.fail_after(12):
            with pytest.raises(RunFailed, match="missed heartbeats"):
                await backend.run(job("frozen"), rule)
        assert time.monotonic() - started < 9  # 2 intervals of 2 s, checked every 1 s
    finally:
        os.kill(pid, signal.SIGCONT)
    with trio.fail_after(20):
        while True:
            try:
                await backend.run(job("thawed"), rule)
                break
            except RunFailed:
                await trio.sleep(0.2)


async def test_least_recently_used_connection_is_evicted(
    nursery: trio.Nursery, route: Route
) -> None:
    backend = await start_backend(nursery, max_connections=2)
    a = broker.URL
    b = broker.url(host="localhost")
    c = broker.url(vhost="%2F")
    for dsn in (a, b, a):  # a becomes the most recently used
        await backend.run(job(dsn), rule_for(route, dsn=dsn))
    conn_b = backend._slots[b].conn
    assert conn_b is not None and conn_b.is_open
    await backend.run(job("c"), rule_for(route, dsn=c))
    with trio.fail_after(5):
        await conn_b.wait_closed()
    assert conn_b.close_reason == "connection closed by client"
    assert backend.open_connections == [broker.url(password=None), broker.url(password=None)]
    assert list(backend._slots) == [a, c]
    await backend.run(job("b again"), rule_for(route, dsn=b))
    assert list(backend._slots) == [c, b]


async def test_busy_connections_are_not_evicted_under_them(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """More DSNs in concurrent use than max_connections: no run fails, the limit holds after."""
    backend = await start_backend(nursery, max_connections=1)
    dsns = [broker.URL, broker.url(host="localhost"), broker.url(vhost="%2F")]

    async def run(i: int) -> None:
        await backend.run(job(f"t{i}"), rule_for(route, dsn=dsns[i % 3]))

    async with trio.open_nursery() as runs:
        for i in range(300):
            runs.start_soon(run, i)
    assert len(backend._slots) == 1
    messages = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert sorted(m.body for m in messages) == sorted(f"t{i}".encode() for i in range(300))


async def test_cancelled_runs_leave_the_connection_usable(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    rule = rule_for(route)
    await backend.run(job("first"), rule)
    conn = backend._slots[broker.URL].conn
    assert conn is not None
    with trio.CancelScope() as scope:
        scope.cancel()
        await backend.run(job("cancelled"), rule)
    with trio.move_on_after(0.01):  # like the pool's timeout, mid-burst
        async with trio.open_nursery() as runs:
            for i in range(500):
                runs.start_soon(backend.run, job(f"c{i}"), rule)
    assert await backend.run(job("last"), rule) == f"published to {route.exchange}/rk"
    assert backend._slots[broker.URL].conn is conn and conn.is_open
    with trio.fail_after(5):
        await conn.wait_idle()
    bodies = [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)]
    assert bodies[0] == b"first" and bodies[-1] == b"last"
    assert len(bodies) == len(set(bodies))


async def test_cancelled_connect_leaves_no_connection_behind(
    nursery: trio.Nursery, route: Route
) -> None:
    """A run cancelled while connecting (the pool's timeout) neither leaks nor backs off."""
    backend = await start_backend(nursery)
    rule = rule_for(route)
    with trio.move_on_after(0.001):
        await backend.run(job("cancelled"), rule)
    assert backend._slots[broker.URL].failures == 0
    assert await backend.run(job("next"), rule) == f"published to {route.exchange}/rk"


# --- what the broker answers: every refusal fails the run with its reason ------------------


def unbound(route: Route) -> Rule:
    """A rule to the route's exchange with a routing key no queue is bound with."""
    return rule_for(Route(route.exchange, route.queue, broker.unique("unbound")))


async def test_an_unroutable_message_fails_the_run_as_unroutable(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    rule = unbound(route)
    with pytest.raises(RunFailed) as info:
        await backend.run(job("lost"), rule)
    target = f"{route.exchange}/{rule.runner.routing_key}"  # type: ignore[union-attr]
    assert info.value.message == (
        f"unroutable: {target} on {broker.url(password=None)} routes to no queue "
        "(the broker returned the message: 312 NO_ROUTE)"
    )
    # The default exchange too: a routing key that names no queue.
    with pytest.raises(RunFailed, match="^unroutable: /nowhere on .* 312 NO_ROUTE"):
        await backend.run(job("lost"), rule_for(Route("", "", "nowhere")))
    # Only that run: the connection goes on serving routable jobs.
    assert await backend.run(job("kept"), rule_for(route)) == f"published to {route.exchange}/rk"
    assert len(backend.open_connections) == 1
    assert [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)] == [b"kept"]


async def test_mandatory_false_in_the_dsn_keeps_fire_and_forget(
    nursery: trio.Nursery, route: Route
) -> None:
    backend = await start_backend(nursery)
    rule = unbound(route)
    forget = Rule("r", "*", AmqpRunner(f"{broker.URL}?mandatory=false", route.exchange, "x"))
    assert await backend.run(job("dropped"), forget) == f"published to {route.exchange}/x"
    explicit = Rule("r", "*", AmqpRunner(f"{broker.URL}?mandatory=true", route.exchange, "x"))
    with pytest.raises(RunFailed, match="^unroutable: "):
        await backend.run(job("lost"), explicit)
    with pytest.raises(RunFailed, match="^unroutable: "):
        await backend.run(job("lost"), rule)
    # `mandatory` is the runner's: all three rules share one connection.
    assert list(backend._slots) == [broker.URL]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("mandatory=no", "invalid AMQP URL: mandatory must be true or false, not 'no'"),
        ("mandatroy=false", "invalid AMQP URL: unknown query parameter 'mandatroy' (known: "),
    ],
)
async def test_a_bad_dsn_parameter_fails_the_run_with_a_reason(
    nursery: trio.Nursery, route: Route, query: str, reason: str
) -> None:
    backend = await start_backend(nursery)
    rule = Rule("r", "*", AmqpRunner(f"{broker.URL}?{query}", route.exchange, "rk"))
    with pytest.raises(RunFailed) as info:
        await backend.run(job("j"), rule)
    assert info.value.message.startswith(reason)


@given(st.integers(MIN_TIME_US - 2_000_000, MAX_TIME_US + 2_000_000))
def test_header_times_are_format_time(us: int) -> None:
    """The cached per-second formatting writes what format_time writes, and fails alike."""
    try:
        expected = format_time(us)
    except ValueError:
        with pytest.raises(ValueError):
            _time_text(us)
    else:
        assert _time_text(us) == expected


def test_split_dsn() -> None:
    """The runner's `mandatory` leaves the DSN that keys the connection."""
    assert split_dsn("amqp://h/v") == ("amqp://h/v", True)
    assert split_dsn("amqp://h/v?mandatory=false") == ("amqp://h/v", False)
    assert split_dsn("amqp://h/?heartbeat=5&mandatory=true") == ("amqp://h/?heartbeat=5", True)
    assert split_dsn("amqp://h/?mandatory=true&mandatory=false") == ("amqp://h/", False)
    with pytest.raises(ValueError, match="^invalid AMQP URL: mandatory must be true or false"):
        split_dsn("amqp://h/?mandatory=")
    with pytest.raises(ValueError, match="^invalid AMQP URL: "):
        split_dsn("amqp://[::1/?mandatory=false")


async def test_kairoi_dsn_parameters_are_accepted_and_ignored(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    dsn = f"{broker.URL}?heartbeat=5&connection_timeout=1000"
    with structlog.testing.capture_logs() as logs:
        await backend.run(job("j"), rule_for(route, dsn=dsn))
    [ignored] = [e for e in logs if e["event"] == "amqp.dsn_parameters_ignored"]
    assert ignored["parameters"] == ["heartbeat", "connection_timeout"]
    assert [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)] == [b"j"]


async def test_routed_and_unroutable_runs_in_flight_together_are_told_apart(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """A return carries no delivery tag: each must still fail its own run, and only it,
    while confirms of the routed ones (persistent, slower) are coalesced around them."""
    backend = await start_backend(nursery)
    routed, lost = rule_for(route), unbound(route)
    outcomes: dict[str, str] = {}

    async def run(i: int) -> None:
        name = f"j{i}"
        try:
            outcomes[name] = await backend.run(job(name), lost if i % 3 == 0 else routed)
        except RunFailed as failure:
            outcomes[name] = failure.message

    async with trio.open_nursery() as runs:
        for i in range(900):
            runs.start_soon(run, i)
    failed = {name for name, outcome in outcomes.items() if outcome.startswith("unroutable: ")}
    assert failed == {f"j{i}" for i in range(0, 900, 3)}
    arrived = {m.body.decode() for m in await trio.to_thread.run_sync(admin.drain, route.queue)}
    assert arrived == set(outcomes) - failed


@contextmanager
def refusing_route(admin: Admin, route: Route) -> Iterator[Route]:
    """A route (routing key "full") to a queue at its length limit with overflow
    reject-publish: the broker nacks every message; the queue is deleted after."""
    full = broker.unique("full-q")
    arguments: FieldTable = {"x-max-length": 0, "x-overflow": "reject-publish"}
    admin._call(
        commands.Queue.Declare(queue=full, durable=True, arguments=arguments),
        commands.Queue.DeclareOk,
    )
    try:
        admin.bind(full, route.exchange, "full")
        yield Route(route.exchange, full, "full")
    finally:
        admin.delete_queue(full)


async def test_a_nack_fails_the_run_with_a_reason(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """A queue at its length limit with overflow reject-publish makes the broker nack."""
    with refusing_route(admin, route) as refusing:
        backend = await start_backend(nursery)
        rule = rule_for(refusing)
        with pytest.raises(RunFailed) as info:
            await backend.run(job("refused"), rule)
        assert info.value.message == (
            f"publish to {route.exchange}/full on {broker.url(password=None)} failed: broker "
            "refused the message (nack: a queue at its length limit with overflow "
            "reject-publish, or a broker error)"
        )
        assert (
            await backend.run(job("fine"), rule_for(route)) == f"published to {route.exchange}/rk"
        )


# --- every id and payload a protocol accepts is delivered ----------------------------------------

HOSTILE_IDS = [
    "h.é",
    "h.with space",
    "h.\"double\" 'single'",
    "h.cr\rlf\nend",
    "h.ctl\x01\x1b[31m\x7f",
    "-h.leading-dash",
    "h.nul\x00inside",
    "h." + "x" * 253,  # 255 bytes: the longest message_id
    "h." + "x" * 254,  # 256 bytes: too long for message_id, still the body
    "h." + "x" * 65_533,  # 65,535 bytes, the longest id
    "h." + "é" * 32_766,
]


async def test_every_id_and_payload_is_delivered_exactly(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    payloads = [b"", "données\r\n\x00".encode(), bytes(range(256)), b"\xff" * 100_000]
    sent = [
        job(job_id, payload=payloads[i % len(payloads)]) for i, job_id in enumerate(HOSTILE_IDS)
    ]
    for the_job in sent:
        await backend.run(the_job, rule_for(route))
    messages = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert [m.body for m in messages] == [j.id.encode() for j in sent]
    for the_job, message in zip(sent, messages, strict=True):
        props = message.properties
        fits = len(the_job.id.encode()) <= 255
        assert props.message_id == (the_job.id if fits else None)
        assert message.headers["kairoi-execute-at"] == format_time(the_job.execute_at)
        if the_job.payload:
            value = message.headers["kairoi-payload"]
            assert (value.encode() if isinstance(value, str) else bytes(value)) == the_job.payload
        else:
            assert "kairoi-payload" not in message.headers


async def test_execute_at_has_four_digit_years(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    await backend.run(Job("old", MIN_TIME_US, attempts=1), rule_for(route))
    [message] = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert message.headers["kairoi-execute-at"] == "0001-01-01T00:00:00.000000Z"


# 2026-12-01T09:00:00Z; the scheduled_at tests of every runner use the same times.
NOMINAL = 1_796_115_600_000_000
HOUR = 3_600_000_000


def recurring(nominal: int, execute_at: int, attempts: int = 1) -> Job:
    """A run of an hourly job's occurrence `nominal`, due at `execute_at` (jitter, a retry)."""
    recurrence = Recurrence(Schedule("every 1h", start=NOMINAL), nominal)
    return Job("r.hourly", execute_at, payload=b"p", attempts=attempts, recurrence=recurrence)


async def test_a_one_shot_run_is_scheduled_at_its_execute_at(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    await backend.run(Job("once", NOMINAL + 123, attempts=1), rule_for(route))
    [message] = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert message.body == b"once"
    assert message.headers["scheduled_at"] == "2026-12-01T09:00:00.000123Z"
    assert message.headers["kairoi-execute-at"] == "2026-12-01T09:00:00.000123Z"


async def test_a_recurring_run_is_scheduled_at_its_occurrence_not_its_execute_at(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """Jitter and retries move execute_at; the (id, scheduled_at) a consumer dedupes on
    stays, and the message keeps its body, message_id and other headers."""
    backend = await start_backend(nursery)
    rule = rule_for(route)
    await backend.run(recurring(NOMINAL, NOMINAL + 37_000_123), rule)  # jittered
    await backend.run(recurring(NOMINAL, NOMINAL + 90_000_000, attempts=2), rule)  # its retry
    await backend.run(recurring(NOMINAL + HOUR, NOMINAL + HOUR), rule)  # the next occurrence
    messages = await trio.to_thread.run_sync(admin.drain, route.queue)
    headers = [m.headers for m in messages]
    assert [h["scheduled_at"] for h in headers] == [
        "2026-12-01T09:00:00.000000Z",
        "2026-12-01T09:00:00.000000Z",
        "2026-12-01T10:00:00.000000Z",
    ]
    assert [h["kairoi-execute-at"] for h in headers] == [
        "2026-12-01T09:00:37.000123Z",
        "2026-12-01T09:01:30.000000Z",
        "2026-12-01T10:00:00.000000Z",
    ]
    assert [h["kairoi-attempt"] for h in headers] == [1, 2, 1]
    assert all(h["kairoi-payload"] == "p" for h in headers)
    assert all(m.body == b"r.hourly" for m in messages)
    assert all(m.properties.message_id == "r.hourly" for m in messages)
    keys = {(m.body, m.headers["scheduled_at"]) for m in messages}
    assert len(keys) == 2  # the retry is the same delivery again; the next hour is a new one


# --- runs started without a task (Runner.start, as the pool calls it first) -----------------------


async def start(
    backend: AmqpRunnerBackend, the_job: Job, rule: Rule, timeout_s: float | None = None
) -> tuple[bool, str] | None:
    """Runner.start as the pool calls it: (ok, message) from the callback, or None
    when the runner answered False (the pool then calls run)."""
    ended = trio.Event()
    results: list[tuple[bool, str]] = []

    def done(ok: bool, message: str) -> None:
        results.append((ok, message))
        ended.set()

    if not backend.start(the_job, rule, timeout_s, done):
        assert results == []
        return None
    await ended.wait()
    await trio.sleep(0.05)  # a second call would show by now
    assert len(results) == 1  # exactly once
    return results[0]


async def test_start_publishes_once_the_connection_and_the_exchange_are_known(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    backend = await start_backend(nursery)
    rule = rule_for(route)
    assert await start(backend, job("first"), rule) is None  # no connection yet: run() opens it
    await backend.run(job("first"), rule)
    done = f"published to {route.exchange}/{route.routing_key}"
    assert await start(backend, job("started/ä", b"p \x00"), rule) == (True, done)
    other = Route(broker.unique("unchecked-x"), route.queue, "rk")
    assert await start(backend, job("x"), rule_for(other)) is None  # run() checks the exchange
    first, started = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert started.body == "started/ä".encode() and started.properties.message_id == "started/ä"
    assert started.headers["kairoi-payload"] == "p \x00"
    assert started.headers["kairoi-attempt"] == 1
    assert started.properties.delivery_mode == 2
    assert backend._slots[broker.URL].users == 0  # every started run gave the connection back


async def test_started_runs_fail_with_the_words_of_run(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """Unroutable and nacked, as test_an_unroutable_message... and test_a_nack... say for run()."""
    backend = await start_backend(nursery)
    await backend.run(job("warm-up"), rule_for(route))
    rule = unbound(route)
    with pytest.raises(RunFailed) as info:
        await backend.run(job("lost"), rule)
    assert await start(backend, job("lost"), rule) == (False, info.value.message)
    assert info.value.message.startswith("unroutable: ")
    with refusing_route(admin, route) as refusing:
        rule = rule_for(refusing)
        with pytest.raises(RunFailed) as info:
            await backend.run(job("refused"), rule)
        assert await start(backend, job("refused"), rule) == (False, info.value.message)
        assert "nack" in info.value.message


async def test_a_started_run_ends_at_the_rules_timeout_or_the_confirm_timeout(
    nursery: trio.Nursery, route: Route
) -> None:
    """On a frozen broker: the rule's timeout when it is the shorter, in the pool's words;
    else the confirm timeout, in run()'s."""
    backend = await start_backend(nursery, confirm_timeout_s=2)
    rule = rule_for(route)
    await backend.run(job("warm-up"), rule)
    pid = broker.beam_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        results: dict[str, tuple[bool, str] | None] = {}

        async def started(name: str, timeout_s: float | None) -> None:
            results[name] = await start(backend, job(name), rule, timeout_s)

        with trio.fail_after(10):
            async with trio.open_nursery() as runs:
                runs.start_soon(started, "rule-timeout", 0.5)
                await trio.sleep(0.01)  # first: the watchdog's deadlines stay in order
                runs.start_soon(started, "confirm-timeout", None)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert results["rule-timeout"] == (False, "timed out after 0.5s")
    assert results["confirm-timeout"] == (
        False,
        f"publish to {route.exchange}/rk on {broker.url(password=None)} failed: "
        "no answer within 2s waiting for a confirm",
    )


async def test_runs_in_flight_at_aclose_fail_without_a_warning_each(
    nursery: trio.Nursery, route: Route
) -> None:
    """Past the pool's grace period nobody records them; a line per run would flood the log."""
    backend = await start_backend(nursery)
    rule = rule_for(route)
    await backend.run(job("warm-up"), rule)
    ended: list[tuple[bool, str]] = []
    pid = broker.beam_pid()
    os.kill(pid, signal.SIGSTOP)  # no confirm comes
    try:
        for n in range(3):
            assert backend.start(job(f"in-flight.{n}"), rule, None, lambda *e: ended.append(e))
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            await backend.aclose()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [ok for ok, _ in ended] == [False, False, False]
    assert all(message.endswith("connection closed by client") for _, message in ended)
    assert [e for e in logs if e["event"] == "amqp.run_failed"] == []
