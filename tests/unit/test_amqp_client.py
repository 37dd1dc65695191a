"""The pamqp-based publisher against a real RabbitMQ (scripts/rabbitmq.sh starts it)."""

from __future__ import annotations

import functools
import os
import signal
import time

import amqp_broker as broker
import pytest
import trio
from amqp_broker import Admin, Route
from pamqp import commands, frame
from pamqp.common import FieldTable

from kairoi_trio.runners.amqp_client import (
    AmqpChannelError,
    AmqpConnection,
    AmqpConnectionError,
    AmqpOptions,
    AmqpReturnedError,
    AmqpTimeoutError,
    AmqpUrl,
    _Confirm,
    message_properties,
    open_amqp_connection,
    serve_amqp_connection,
)

# Stops, freezes or reconfigures the shared private node, or needs it as it should be:
# one xdist worker runs the whole group, one test at a time (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("broker")

# --- URLs (no broker needed) ----------------------------------------------------


def test_url_defaults_and_vhost_decoding() -> None:
    url = AmqpUrl.parse("amqp://localhost")
    assert (url.host, url.port, url.username, url.password, url.vhost, url.tls) == (
        "localhost",
        5672,
        "guest",
        "guest",
        "/",
        False,
    )
    assert AmqpUrl.parse("amqp://u:p@h/").vhost == "/"
    assert AmqpUrl.parse("amqp://u:p@h/%2F").vhost == "/"
    assert AmqpUrl.parse("amqp://u:p@h/prod").vhost == "prod"
    tls = AmqpUrl.parse("amqps://u:p%40ss@h/")
    assert (tls.port, tls.tls, tls.password) == (5671, True, "p@ss")
    assert AmqpUrl.parse("amqp://u:secret@h:1/v").redacted() == "amqp://u@h:1/v"


def test_url_rejects_other_schemes() -> None:
    with pytest.raises(AmqpConnectionError, match="scheme"):
        AmqpUrl.parse("http://localhost/")


def test_url_query_parameters() -> None:
    """RabbitMQ's URI parameters (Kairoi's DSNs may have them) are accepted and
    ignored; the caller's own are accepted; any other is a clear error."""
    url = AmqpUrl.parse(
        "amqp://h/v?heartbeat=5&channel_max=10&mandatory=false", frozenset({"mandatory"})
    )
    assert (url.host, url.vhost, url.ignored) == ("h", "v", ("heartbeat", "channel_max"))
    assert AmqpUrl.parse("amqp://h/").ignored == ()
    with pytest.raises(AmqpConnectionError, match="unknown query parameter 'mandatory'"):
        AmqpUrl.parse("amqp://h/?mandatory=false")
    with pytest.raises(AmqpConnectionError) as info:
        AmqpUrl.parse("amqp://h/?hearbeat=5", frozenset({"mandatory"}))
    assert info.value.reason.startswith(
        "invalid AMQP URL: unknown query parameter 'hearbeat' (known: auth_mechanism, "
    )
    assert "mandatory" in info.value.reason


# --- publishing -------------------------------------------------------------------


async def test_publish_is_confirmed_and_arrives(admin: Admin, route: Route) -> None:
    headers: FieldTable = {"kairoi-payload": "hé", "raw": bytearray(b"\xff\x00"), "n": 3}
    props = message_properties(content_type="text/plain", message_id="m-1", headers=headers)
    async with open_amqp_connection(broker.URL) as conn:
        assert conn.is_open
        await conn.publish(route.exchange, route.routing_key, b"job-1", properties=props)
        assert conn.in_flight == 0
    assert not conn.is_open
    assert conn.close_reason == "connection closed by client"
    [message] = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert message.body == b"job-1"
    assert message.properties.message_id == "m-1"
    assert message.properties.content_type == "text/plain"
    assert message.properties.delivery_mode == 2
    assert message.properties.timestamp is not None
    assert message.headers["kairoi-payload"] == "hé"
    assert message.headers["raw"] == bytearray(b"\xff\x00")
    assert message.headers["n"] == 3


async def test_a_thousand_concurrent_publishes_all_confirmed_once(
    admin: Admin, route: Route
) -> None:
    count = 1000
    async with open_amqp_connection(broker.URL) as conn:

        async def publish(i: int) -> None:
            props = message_properties(message_id=str(i))
            await conn.publish(route.exchange, route.routing_key, b"%d" % i, properties=props)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(publish, i)
        assert conn.in_flight == 0
    messages = await trio.to_thread.run_sync(admin.drain, route.queue)
    bodies = sorted(int(m.body) for m in messages)
    assert bodies == list(range(count))


async def test_missing_exchange_closes_only_the_channel(admin: Admin, route: Route) -> None:
    missing = broker.unique("missing")
    async with open_amqp_connection(broker.URL) as conn:
        assert await conn.exchange_exists(route.exchange)
        assert not await conn.exchange_exists(missing)
        with pytest.raises(AmqpChannelError) as info:
            await conn.publish(missing, "rk", b"lost")
        assert info.value.reply_code == 404
        assert missing in info.value.reason
        assert conn.is_open
        await conn.publish(route.exchange, route.routing_key, b"after")
    [message] = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert message.body == b"after"


async def test_a_mandatory_message_no_queue_receives_comes_back(admin: Admin, route: Route) -> None:
    lost = broker.unique("unbound")
    async with open_amqp_connection(broker.URL) as conn:
        with pytest.raises(AmqpReturnedError) as info:
            await conn.publish(route.exchange, lost, b"returned", mandatory=True)
        assert info.value.reply_code == 312
        assert info.value.reply == "312 NO_ROUTE"
        assert info.value.reason == "unroutable: the broker returned the message (312 NO_ROUTE)"
        # Without mandatory, the broker drops it and confirms: the caller cannot know.
        await conn.publish(route.exchange, lost, b"dropped")
        # Returned or not, the channel and the connection go on.
        await conn.publish(route.exchange, route.routing_key, b"routed", mandatory=True)
        assert conn.is_open and conn.in_flight == 0
    assert [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)] == [b"routed"]


async def test_returns_are_matched_to_their_own_publish(admin: Admin, route: Route) -> None:
    """Returns carry no delivery tag: with many routed and unroutable publishes in
    flight, exactly the unroutable ones fail, large bodies (several frames) too."""
    lost = broker.unique("unbound")
    results: dict[int, bool] = {}
    async with open_amqp_connection(broker.URL) as conn:

        async def publish(i: int) -> None:
            key = lost if i % 4 == 1 else route.routing_key
            body = b"%d:" % i + (b"x" * 300_000 if i % 50 == 1 else b"")
            try:
                await conn.publish(route.exchange, key, body, mandatory=True)
                results[i] = True
            except AmqpReturnedError:
                results[i] = False

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(publish, i)
        assert conn.in_flight == 0
    assert {i for i, ok in results.items() if not ok} == set(range(1, 1000, 4))
    messages = await trio.to_thread.run_sync(admin.drain, route.queue)
    assert sorted(int(m.body.split(b":")[0]) for m in messages) == [
        i for i in range(1000) if i % 4 != 1
    ]


# --- failing to connect -------------------------------------------------------------


async def test_wrong_password_is_a_clear_error() -> None:
    broker.ensure_broker()
    with pytest.raises(AmqpConnectionError) as info:
        async with open_amqp_connection(f"amqp://guest:wrong@{broker.HOST}:{broker.PORT}/"):
            pass
    assert info.value.reply_code == 403
    assert "ACCESS_REFUSED" in info.value.reason
    assert "wrong" not in info.value.reason  # no password in messages


async def test_unknown_vhost_is_a_clear_error() -> None:
    broker.ensure_broker()
    vhost = broker.unique("vhost")
    with pytest.raises(AmqpConnectionError) as info:
        async with open_amqp_connection(f"{broker.URL}{vhost}"):
            pass
    assert info.value.reply_code == 530
    assert f"vhost {vhost} not found" in info.value.reason


async def test_unreachable_port_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(AmqpConnectionError, match="Connection refused"):
        async with open_amqp_connection("amqp://guest:guest@127.0.0.1:1/"):
            pass
    assert time.monotonic() - started < 2


# --- a broker that sends what it must not ---------------------------------------------------


async def fake_broker(nursery: trio.Nursery, after_open: bytes) -> str:
    """A TCP server that does the AMQP handshake right (pamqp frames), then answers
    the first frame after it with `after_open` and holds the connection."""

    async def serve(stream: trio.SocketStream) -> None:
        async def read_frame() -> None:
            head = b""
            while len(head) < 7:
                head += await stream.receive_some(7 - len(head))
            rest = int.from_bytes(head[3:7], "big") + 1
            while rest:
                rest -= len(await stream.receive_some(rest))

        assert await stream.receive_some(8) == b"AMQP\x00\x00\x09\x01"
        start = commands.Connection.Start(mechanisms="PLAIN", locales="en_US")
        await stream.send_all(frame.marshal(start, 0))
        await read_frame()  # start-ok
        await stream.send_all(frame.marshal(commands.Connection.Tune(0, 131072, 0), 0))
        await read_frame()  # tune-ok
        await read_frame()  # open
        await stream.send_all(frame.marshal(commands.Connection.OpenOk(), 0))
        await read_frame()  # channel.open, from the first publish
        await stream.send_all(after_open)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return f"amqp://guest:guest@127.0.0.1:{listeners[0].socket.getsockname()[1]}/"


async def test_a_frame_over_frame_max_closes_the_connection_unbuffered(
    nursery: trio.Nursery,
) -> None:
    """The broker announces a 100 MB frame: refused at its 7-byte header, not held."""
    url = await fake_broker(nursery, b"\x01\x00\x01" + (100_000_000).to_bytes(4, "big"))
    conn = await nursery.start(serve_amqp_connection, url, AmqpOptions(heartbeat_s=0))
    with pytest.raises(AmqpConnectionError) as info:
        await conn.publish("", "q", b"never sent")
    assert info.value.reason == "frame of 100000008 bytes from broker, over frame_max 131072"
    assert conn.close_reason == info.value.reason


# --- broker faults on an open connection -----------------------------------------------


async def test_broker_closing_the_connection_fails_in_flight_publishes(
    nursery: trio.Nursery, route: Route
) -> None:
    conn = await nursery.start(serve_amqp_connection, broker.URL)
    await conn.publish(route.exchange, route.routing_key, b"before")
    name = "kairoi-close-test"
    await trio.to_thread.run_sync(broker.rabbitmqctl, "close_all_connections", name)
    with trio.fail_after(5):
        await conn.wait_closed()
    assert "CONNECTION_FORCED" in conn.close_reason
    with pytest.raises(AmqpConnectionError, match="CONNECTION_FORCED"):
        await conn.publish(route.exchange, route.routing_key, b"after")


async def test_frozen_broker_is_detected_by_heartbeats(nursery: trio.Nursery, route: Route) -> None:
    conn = await nursery.start(serve_amqp_connection, broker.URL, AmqpOptions(heartbeat_s=2))
    await conn.publish(route.exchange, route.routing_key, b"warm-up")
    pid = broker.beam_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(AmqpConnectionError, match="missed heartbeats"):
            with trio.fail_after(10):
                await conn.publish(route.exchange, route.routing_key, b"into the void")
        assert time.monotonic() - started < 9  # 2 intervals of 2 s, checked every 1 s
        assert not conn.is_open
    finally:
        os.kill(pid, signal.SIGCONT)


def test_settled_confirms_do_not_pile_up_behind_a_slow_one() -> None:
    """The watchdog's deadlines drop settled publishes from anywhere, in order."""
    conn = AmqpConnection(broker.URL)
    waiters = [_Confirm() for _ in range(10)]
    for i, waiter in enumerate(waiters):
        conn._deadlines.append((float(i), 30.0, waiter))
        if i % 3:  # 0, 3, 6, 9 stay unconfirmed, the front one among them
            waiter.resolve()
    conn._compact_deadlines()
    assert [entry[2] for entry in conn._deadlines] == [waiters[i] for i in (0, 3, 6, 9)]
    assert [entry[0] for entry in conn._deadlines] == [0.0, 3.0, 6.0, 9.0]


async def test_confirms_that_do_not_come_time_out_from_the_call(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    """A frozen broker confirms nothing: each publish fails at its own deadline, counted
    from its call, whether the watchdog holds it (deadlines in order) or its own cancel
    scope does (a shorter deadline behind a longer one); the connection stays usable."""
    conn = await nursery.start(serve_amqp_connection, broker.URL, AmqpOptions(heartbeat_s=0))
    await conn.publish(route.exchange, route.routing_key, b"warm-up")
    waited: dict[bytes, float] = {}

    async def publish(body: bytes, seconds: float) -> None:
        started = trio.current_time()
        with pytest.raises(AmqpTimeoutError, match=f"within {seconds:g}s waiting for a confirm$"):
            await conn.publish(route.exchange, route.routing_key, body, timeout=seconds)
        waited[body] = trio.current_time() - started

    pid = broker.beam_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as publishes:
                publishes.start_soon(publish, b"long", 2.0)
                await trio.sleep(0.1)
                publishes.start_soon(publish, b"short", 0.5)  # behind a later deadline
                publishes.start_soon(publish, b"long-2", 2.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert 0.5 <= waited[b"short"] < 1.5
    assert 2.0 <= waited[b"long"] < 3.5
    assert 2.0 <= waited[b"long-2"] < 3.5
    assert conn.is_open
    with trio.fail_after(10):
        await conn.publish(route.exchange, route.routing_key, b"after", timeout=5)
        await conn.wait_idle()
    bodies = [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)]
    # All were sent (none lost by its timeout); "short" and "long-2" start in either order.
    assert bodies[0] == b"warm-up" and bodies[-1] == b"after"
    assert sorted(bodies[1:-1]) == [b"long", b"long-2", b"short"]


async def test_blocked_connection_holds_publishes_until_unblocked(
    nursery: trio.Nursery, admin: Admin, route: Route
) -> None:
    conn = await nursery.start(serve_amqp_connection, broker.URL)
    await trio.to_thread.run_sync(broker.rabbitmqctl, "set_vm_memory_high_watermark", "0.000001")
    try:
        with trio.fail_after(10):
            while not conn.is_blocked:
                try:
                    await conn.publish(route.exchange, route.routing_key, b"x", timeout=0.5)
                except AmqpTimeoutError:
                    pass
        with pytest.raises(AmqpTimeoutError, match="blocked"):
            await conn.publish(route.exchange, route.routing_key, b"held", timeout=0.5)
    finally:
        await trio.to_thread.run_sync(broker.rabbitmqctl, "set_vm_memory_high_watermark", "0.4")
    with trio.fail_after(10):
        await conn.publish(route.exchange, route.routing_key, b"through")
    assert not conn.is_blocked
    bodies = [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)]
    assert b"through" in bodies


# --- cancellation ------------------------------------------------------------------------


async def test_cancelled_publishes_leave_the_connection_usable(admin: Admin, route: Route) -> None:
    async with open_amqp_connection(broker.URL) as conn:
        await conn.publish(route.exchange, route.routing_key, b"open the channel")
        # Cancelled after its frames were queued: the confirm comes back to nobody.
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.publish(route.exchange, route.routing_key, b"cancelled-after-queueing")
        # A burst cut short at random points.
        with trio.move_on_after(0.005):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(conn.publish, route.exchange, route.routing_key, b"b%d" % i)
        await conn.publish(route.exchange, route.routing_key, b"last")
        with trio.fail_after(5):
            await conn.wait_idle()
        assert conn.is_open
    bodies = [m.body for m in await trio.to_thread.run_sync(admin.drain, route.queue)]
    assert bodies[0] == b"open the channel"
    assert b"cancelled-after-queueing" in bodies
    assert bodies[-1] == b"last"
    assert len(bodies) == len(set(bodies))
