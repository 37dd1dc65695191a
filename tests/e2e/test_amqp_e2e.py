"""The amqp runner end to end: the real `kairoi-trio serve` process, the real RabbitMQ.

Jobs go in over KCP; what the server did is read back over KCP (GET), gRPC
(last_outcome), its JSON log ("job run" events) and /proc (its sockets to the
broker); what the broker got is read with the independent pamqp admin client of
tests/amqp_broker.py. Every test uses its own exchange and queue and deletes
them. Fault tests (stop_app, SIGSTOP) always put the shared broker back in
`finally`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import amqp_broker as broker
import grpc
import pytest
from amqp_broker import Admin, Route
from pamqp import commands
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

# Stops, freezes or reconfigures the shared private node, or needs it as it should be:
# one xdist worker runs the whole group, one test at a time (tests/conftest.py).
pytestmark = [pytest.mark.xdist_group("broker"), pytest.mark.backends("log", "postgres")]

PAST = "2020-01-01 00:00:00"
FINAL = ("executed", "failed")
CHUNK = 2000  # pipelined KCP requests per round trip


@pytest.fixture(scope="module", autouse=True)
def _broker() -> None:
    broker.ensure_broker()


@pytest.fixture
def make_route(admin: Admin) -> Iterator[Callable[[str], Route]]:
    routes: list[Route] = []

    def make(prefix: str) -> Route:
        route = broker.make_route(admin, prefix)
        routes.append(route)
        return route

    yield make
    for route in routes:
        broker.remove_route(route)


# -- helpers


def kcp_time(seconds_from_now: float) -> str:
    at = datetime.fromtimestamp(time.time() + seconds_from_now, UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def amqp_rule(kcp: KcpClient, rule_id: str, pattern: str, route: Route, dsn: str = broker.URL):
    answer = kcp.request(
        "RULE", "SET", rule_id, pattern, "amqp", dsn, route.exchange, route.routing_key
    )
    assert answer == ["OK"], answer


def set_jobs(kcp: KcpClient, ids: Sequence[str], when: str | Sequence[str] = PAST) -> None:
    times = [when] * len(ids) if isinstance(when, str) else list(when)
    for start in range(0, len(ids), CHUNK):
        requests = [
            ("SET", i, t) for i, t in zip(ids[start : start + CHUNK], times[start:], strict=False)
        ]
        answers = kcp.pipeline(requests)
        assert all(a == ["OK"] for a in answers), [a for a in answers if a != ["OK"]][:3]


def statuses(kcp: KcpClient, ids: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        for job_id, answer in zip(chunk, kcp.pipeline([("GET", i) for i in chunk]), strict=True):
            assert answer[0] == "OK", (job_id, answer)
            out[job_id] = answer[1]
    return out


def wait_final(kcp: KcpClient, ids: Sequence[str], timeout: float) -> dict[str, str]:
    """Wait until every job is executed or failed; answer their statuses."""
    last: dict[str, str] = {}

    def done() -> bool:
        last.update(statuses(kcp, ids))
        return all(s in FINAL for s in last.values())

    try:
        wait_for(done, timeout=timeout, interval=0.2)
    except AssertionError:
        stuck = Counter(s for s in last.values() if s not in FINAL)
        raise AssertionError(f"jobs not finished in {timeout}s: {dict(stuck)}") from None
    return last


def runs(server: ServerProcess) -> dict[str, list[dict]]:
    """The "job run" log events, by job id, in order (once the log is quiet: a
    run's line may come a few ms after its outcome is visible)."""
    server.wait_quiet()
    out: dict[str, list[dict]] = {}
    for event in server.events("job run"):
        out.setdefault(event["job"], []).append(event)
    return out


def assert_clean_log(server: ServerProcess) -> None:
    text = server.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert "runner crashed" not in text
    assert server.process is not None and server.process.poll() is None, "server died"


def consume(route: Route, expected: int, timeout: float = 30) -> list[broker.Message]:
    admin = Admin()
    try:
        return admin.consume(route.queue, expected, timeout=timeout)
    finally:
        admin.close()


def deliver_probe(kcp: KcpClient, prefix: str, timeout: float = 40) -> str:
    """Set a job due now again and again until one is executed (the runner may be
    in connection backoff right after a fault); answer its id."""
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        job_id = f"{prefix}{n}"
        set_jobs(kcp, [job_id])
        status = wait_final(kcp, [job_id], timeout=max(1.0, deadline - time.monotonic()))
        if status[job_id] == "executed":
            return job_id
        time.sleep(0.3)
    raise AssertionError(f"no job delivered within {timeout}s")


@pytest.fixture
def amqp_server(make_server: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    def make(extra: str = "", name: str = "server") -> ServerProcess:
        return make_server("[database]\nfsync_on_persist = false\n" + extra, name)

    return make


# -- delivery


def test_due_jobs_arrive_with_body_properties_and_payload(amqp_server, make_route) -> None:
    server = amqp_server()
    route = make_route("e2e-basic")
    with KcpClient(server.kcp_port) as kcp:
        amqp_rule(kcp, "r", "app.", route)
        assert kcp.request("SET", "app.with-payload", "2020-01-01 00:00:00.000500", "données") == [
            "OK"
        ]
        set_jobs(kcp, ["app.plain"])
        assert wait_final(kcp, ["app.with-payload", "app.plain"], 15) == {
            "app.with-payload": "executed",
            "app.plain": "executed",
        }
    messages = {m.body.decode(): m for m in consume(route, 2)}
    assert sorted(messages) == ["app.plain", "app.with-payload"]
    first = messages["app.with-payload"]
    props = first.properties
    assert props.message_id == "app.with-payload"
    assert props.content_type == "text/plain"
    assert props.delivery_mode == 2
    assert props.timestamp is not None
    assert abs(props.timestamp.timestamp() - time.time()) < 60
    assert first.headers["kairoi-payload"] == "données"
    assert first.headers["kairoi-attempt"] == 1
    assert datetime.fromisoformat(first.headers["kairoi-execute-at"]) == datetime(
        2020, 1, 1, 0, 0, 0, 500, tzinfo=UTC
    )
    plain = messages["app.plain"]
    assert plain.properties.message_id == "app.plain" and "kairoi-payload" not in plain.headers
    by_job = runs(server)
    assert by_job["app.plain"][0]["outcome"] == f"published to {route.exchange}/rk"
    assert by_job["app.plain"][0]["ok"] is True
    assert_clean_log(server)


def test_missing_exchange_fails_the_job_with_its_name(amqp_server, make_route) -> None:
    server = amqp_server()
    route = make_route("e2e-missing")
    missing = Route(broker.unique("e2e-nowhere-x"), route.queue, "rk")
    with KcpClient(server.kcp_port) as kcp:
        amqp_rule(kcp, "gone", "gone.", missing)
        amqp_rule(kcp, "ok", "ok.", route)
        set_jobs(kcp, ["gone.1", "gone.2", "ok.1"])
        assert wait_final(kcp, ["gone.1", "gone.2", "ok.1"], 15) == {
            "gone.1": "failed",
            "gone.2": "failed",
            "ok.1": "executed",  # the same connection goes on serving other rules
        }
    expected = f"exchange '{missing.exchange}' does not exist on {broker.url(password=None)}"
    by_job = runs(server)
    assert [e["outcome"] for e in by_job["gone.1"]] == [expected]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        job = pb_grpc.SchedulerStub(channel).GetJob(pb.GetJobRequest(id="gone.2")).job
    assert job.status == pb.JOB_STATUS_FAILED
    assert job.last_outcome == expected
    assert [m.body for m in consume(route, 1)] == [b"ok.1"]
    assert_clean_log(server)


def test_unroutable_jobs_fail_or_retry_unless_the_dsn_says_mandatory_false(
    amqp_server, make_route
) -> None:
    """The issue's case: amq.direct with a routing key no queue is bound with. The
    job fails as `unroutable`, after its retries; `?mandatory=false` keeps Kairoi's
    fire-and-forget; routed jobs on the same connection are untouched."""
    server = amqp_server("[policy]\nmax_attempts = 2\nbackoff_initial_s = 0.1\n")
    route = make_route("e2e-unroutable")
    nobody = broker.unique("nobody")
    with KcpClient(server.kcp_port) as kcp:
        amqp_rule(kcp, "lost", "lost.", Route("amq.direct", "", nobody))
        forget = Route("amq.direct", "", nobody)
        amqp_rule(kcp, "forget", "forget.", forget, dsn=f"{broker.URL}?mandatory=false")
        amqp_rule(kcp, "ok", "ok.", route)
        set_jobs(kcp, ["lost.1", "forget.1", "ok.1"])
        assert wait_final(kcp, ["lost.1", "forget.1", "ok.1"], 15) == {
            "lost.1": "failed",
            "forget.1": "executed",
            "ok.1": "executed",
        }
    unroutable = (
        f"unroutable: amq.direct/{nobody} on {broker.url(password=None)} routes to no queue "
        "(the broker returned the message: 312 NO_ROUTE)"
    )
    by_job = runs(server)
    assert [(e["attempt"], e["outcome"]) for e in by_job["lost.1"]] == [
        (1, unroutable),
        (2, unroutable),
    ]
    assert [e["outcome"] for e in by_job["forget.1"]] == [f"published to amq.direct/{nobody}"]
    assert [e["outcome"] for e in by_job["ok.1"]] == [f"published to {route.exchange}/rk"]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        job = pb_grpc.SchedulerStub(channel).GetJob(pb.GetJobRequest(id="lost.1")).job
    assert job.status == pb.JOB_STATUS_FAILED and job.last_outcome == unroutable
    assert [m.body for m in consume(route, 1)] == [b"ok.1"]
    assert_clean_log(server)


def test_a_nack_fails_the_job_with_its_reason(amqp_server, make_route, admin: Admin) -> None:
    """A queue at its length limit with overflow reject-publish: the broker nacks."""
    route = make_route("e2e-nack")
    full = broker.unique("e2e-full-q")
    admin._call(
        commands.Queue.Declare(
            queue=full, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        ),
        commands.Queue.DeclareOk,
    )
    try:
        admin.bind(full, route.exchange, "full")
        server = amqp_server()
        with KcpClient(server.kcp_port) as kcp:
            amqp_rule(kcp, "full", "full.", Route(route.exchange, full, "full"))
            set_jobs(kcp, ["full.1"])
            assert wait_final(kcp, ["full.1"], 15) == {"full.1": "failed"}
        [run] = runs(server)["full.1"]
        assert run["outcome"] == (
            f"publish to {route.exchange}/full on {broker.url(password=None)} failed: broker "
            "refused the message (nack: a queue at its length limit with overflow "
            "reject-publish, or a broker error)"
        )
        assert_clean_log(server)
    finally:
        admin.delete_queue(full)


# -- faults


class Burst:
    """Jobs due one after another on one server and route, `per_s` a second, from
    start() until stop(), so that a fault lands in the middle of it however long
    the fault takes to land: `rabbitmqctl stop_app` boots an Erlang VM of its own
    first, about 4 s on an idle machine and many more on a loaded one. (A burst due
    over a fixed 15 s was sometimes all executed before the stop landed.)"""

    def __init__(self, server: ServerProcess, route: Route, per_s: float = 160.0) -> None:
        self.server = server
        self.route = route
        self.per_s = per_s
        self.ids: list[str] = []  # the jobs set so far; complete once stop() returns
        self.kcp = KcpClient(server.kcp_port, timeout=30)
        amqp_rule(self.kcp, "b", "burst.", route)
        amqp_rule(self.kcp, "p", "probe.", route)
        amqp_rule(self.kcp, "a", "after.", route)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, daemon=True)

    def start(self) -> None:
        self._feeder.start()

    def _feed(self) -> None:
        try:
            with KcpClient(self.server.kcp_port, timeout=30) as kcp:
                started = time.monotonic()
                while not self._stop.wait(0.05):
                    due = int((time.monotonic() - started) * self.per_s)
                    batch = [f"burst.{i:06d}" for i in range(len(self.ids), due)]
                    set_jobs(kcp, batch)  # due at once
                    self.ids.extend(batch)
        except BaseException as error:  # seen by stop()
            self._error = error

    def stop(self) -> None:
        self._stop.set()
        self._feeder.join(60)
        assert not self._feeder.is_alive(), "the burst's feeder did not stop"
        if self._error is not None:
            raise self._error

    def executed_count(self) -> int:
        return sum(1 for e in self.server.events("job run") if e["ok"])


def test_broker_stopped_mid_burst_fails_or_retries_every_job_then_recovers(
    amqp_server, make_route
) -> None:
    # Both servers first, so that both bursts start together.
    no_retry_server = amqp_server("[runners.amqp]\nconfirm_timeout_s = 10.0\n", "no-retry")
    # Attempts for an outage of up to 3 minutes (1 s, then 2 s apart): far more than it
    # lasts (asserted below), even when rabbitmqctl is slow on a loaded machine.
    retry_server = amqp_server(
        "[runners.amqp]\nconfirm_timeout_s = 10.0\n"
        "[policy]\nmax_attempts = 100\nbackoff_initial_s = 1.0\nbackoff_max_s = 2.0\n",
        "retry",
    )
    no_retry = Burst(no_retry_server, make_route("e2e-stop-a"))
    retry = Burst(retry_server, make_route("e2e-stop-b"))
    bursts = (no_retry, retry)
    stopped_at = 0.0
    try:
        try:
            for burst in bursts:
                burst.start()
            # Stop the broker once both bursts are well under way.
            wait_for(lambda: all(b.executed_count() >= 200 for b in bursts), timeout=30)
            ports_before = {b: set(broker.broker_connections_of(b.server.pid)) for b in bursts}
            assert all(ports_before.values()), ports_before
            stopped_at = time.monotonic()
            broker.stop_app()
            time.sleep(1.0)  # jobs go on coming due with the broker down
        finally:
            for burst in bursts:
                burst.stop()
        # Without retries, every job of the burst ends: executed before the stop,
        # failed after it. None stays triggered and the server lives on.
        final = wait_final(no_retry.kcp, no_retry.ids, timeout=30)
    finally:
        broker.start_app()
    outage_s = time.monotonic() - stopped_at
    counts = Counter(final.values())
    assert counts["failed"] > 0 and counts["executed"] >= 200, counts
    by_job = runs(no_retry.server)
    for job_id, status in final.items():
        [event] = by_job[job_id]  # one run each: max_attempts = 1
        assert event["ok"] is (status == "executed")
        if status == "failed":
            reason = event["outcome"]
            assert "\n" not in reason and "guest:guest" not in reason
            assert f"127.0.0.1:{broker.PORT}" in reason, reason
    reasons = {e["outcome"] for evs in by_job.values() for e in evs if not e["ok"]}
    assert any("CONNECTION_FORCED" in r or "Connection refused" in r for r in reasons), reasons

    # With retries, every job is eventually executed; some needed several attempts.
    retried = wait_final(retry.kcp, retry.ids, timeout=60)
    assert Counter(retried.values()) == {"executed": len(retry.ids)}
    attempts = {j: len(evs) for j, evs in runs(retry.server).items() if j in set(retry.ids)}
    assert max(attempts.values()) > 1

    for burst in bursts:
        # A fresh connection: new jobs are delivered after start_app.
        probe = deliver_probe(burst.kcp, "probe.")
        after = [f"after.{i}" for i in range(200)]
        set_jobs(burst.kcp, after)
        assert Counter(wait_final(burst.kcp, after, 20).values()) == {"executed": 200}
        ports_after = set(broker.broker_connections_of(burst.server.pid))
        assert ports_after and not ports_after & ports_before[burst]
        executed = {j for j, s in statuses(burst.kcp, burst.ids).items() if s == "executed"}
        burst.server.wait_quiet()
        published = len(burst.server.events("job run"))
        arrived = Counter(
            m.body.decode() for m in consume(burst.route, len(executed) + 201, timeout=10)
        )
        # Durable queue, persistent messages: every confirmed job survived the
        # restart; each one went out once per attempt at most.
        assert executed | set(after) | {probe} <= set(arrived)
        assert all(n == 1 for j, n in arrived.items() if j.startswith(("after.", "probe.")))
        if burst is no_retry:
            assert all(n == 1 for n in arrived.values())
        assert sum(arrived.values()) <= published
        assert_clean_log(burst.server)
        burst.kcp.close()
    assert outage_s < 150  # the retry server's attempts last longer (see its policy)


def test_frozen_broker_is_detected_by_heartbeats(amqp_server, make_route) -> None:
    server = amqp_server(
        "[runners.amqp]\nheartbeat_s = 2\nconnect_timeout_s = 3.0\nconfirm_timeout_s = 30.0\n"
    )
    route = make_route("e2e-frozen")
    frozen = [f"f.{i}" for i in range(50)]
    with KcpClient(server.kcp_port, timeout=30) as kcp:
        amqp_rule(kcp, "r", "f.", route)
        amqp_rule(kcp, "w", "warm.", route)
        amqp_rule(kcp, "t", "thawed.", route)
        set_jobs(kcp, ["warm.1"])
        assert wait_final(kcp, ["warm.1"], 15) == {"warm.1": "executed"}
        pid = broker.beam_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            set_jobs(kcp, frozen)
            final = wait_final(kcp, frozen, timeout=15)
            detected_s = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert set(final.values()) == {"failed"}
        # Two heartbeat intervals (4 s), far less than the 30 s confirm timeout.
        assert detected_s < 10, detected_s
        by_job = runs(server)
        for job_id in frozen:
            [event] = by_job[job_id]
            assert "missed heartbeats" in event["outcome"], event["outcome"]
        deliver_probe(kcp, "thawed.")
    assert_clean_log(server)


def test_wrong_credentials_and_unknown_vhost_give_clear_reasons(amqp_server, make_route) -> None:
    server = amqp_server()
    route = make_route("e2e-auth")
    vhost = broker.unique("vhost")
    bad_password = broker.url(password="s3cret-wrong")
    with KcpClient(server.kcp_port) as kcp:
        amqp_rule(kcp, "pw", "pw.", route, dsn=bad_password)
        amqp_rule(kcp, "vh", "vh.", route, dsn=f"{broker.URL}{vhost}")
        set_jobs(kcp, ["pw.1", "vh.1"])
        assert wait_final(kcp, ["pw.1", "vh.1"], 15) == {"pw.1": "failed", "vh.1": "failed"}
    by_job = runs(server)
    refused = by_job["pw.1"][0]["outcome"]
    assert refused.startswith(f"cannot connect to {broker.url(password=None)}: 403 ACCESS_REFUSED")
    unknown = by_job["vh.1"][0]["outcome"]
    assert unknown == (
        f"cannot connect to {broker.url(password=None, vhost=vhost)}: "
        f"530 NOT_ALLOWED - vhost {vhost} not found"
    )
    text = server.log_text()
    assert "s3cret-wrong" not in text
    assert_clean_log(server)


def test_more_dsns_than_max_connections_evicts_the_least_recently_used(
    amqp_server, make_route
) -> None:
    server = amqp_server("[runners.amqp]\nmax_connections = 2\n")
    pid = server.process.pid
    route = make_route("e2e-lru")
    a = broker.URL
    b = broker.url(host="localhost")
    c = broker.url(vhost="%2F")  # the same vhost, another DSN string
    with KcpClient(server.kcp_port) as kcp:
        for name, dsn in (("a", a), ("b", b), ("c", c)):
            amqp_rule(kcp, name, f"{name}.", route, dsn=dsn)

        def run(job_id: str) -> None:
            set_jobs(kcp, [job_id])
            assert wait_final(kcp, [job_id], 15) == {job_id: "executed"}

        run("a.1")
        run("b.1")
        assert len(broker.broker_connections_of(pid)) == 2
        run("a.2")  # a is now the most recently used, b the least
        assert not server.events("amqp.connection_evicted")
        run("c.1")
        evicted = wait_for(lambda: server.events("amqp.connection_evicted"))
        assert [e["amqp"] for e in evicted] == [broker.url(password=None, host="localhost")]
        wait_for(lambda: len(broker.broker_connections_of(pid)) == 2, timeout=10)
        run("b.2")  # b comes back and evicts a (c was used after it)
        evicted = wait_for(
            lambda: (
                len(server.events("amqp.connection_evicted")) == 2
                and server.events("amqp.connection_evicted")
            )
        )
        assert evicted[1]["amqp"] == broker.url(password=None)
        wait_for(lambda: len(broker.broker_connections_of(pid)) == 2, timeout=10)
        time.sleep(0.3)
        assert len(broker.broker_connections_of(pid)) == 2
    bodies = sorted(m.body.decode() for m in consume(route, 5))
    assert bodies == ["a.1", "a.2", "b.1", "b.2", "c.1"]
    assert_clean_log(server)


# -- volume


def test_5000_jobs_due_at_once_arrive_exactly_once(amqp_server, make_route) -> None:
    """Jobs all due at the same instant are each published once, confirmed, and
    executed: no job lost, none twice, none redelivered.

    5,000 with the runner's queue at 1,000 and 256 publishes in flight: the burst
    fills the queue and the confirm window many times over, so due jobs wait
    `planned` for room (the dispatcher's backpressure) and go through the store's
    group writes in many batches, which is the behaviour checked. It was 20,000
    at the default sizes (10,000 queued, 2,048 in flight), the same paths at four
    times the cost (~20 s on each store, in the serial broker group); volume
    figures (50,000 at once) are `benchmarks/amqp_bench.py`'s."""
    count = 5_000
    server = amqp_server("[runners.amqp]\nqueue_size = 1000\nconcurrency = 256\n")
    route = make_route("e2e-20k")
    ids = [f"bulk.{i:05d}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    with KcpClient(server.kcp_port, timeout=60) as kcp:
        amqp_rule(kcp, "bulk", "bulk.", route)
        due = kcp_time(4.0)  # after the last SET: all due at the same instant
        started = time.monotonic()
        set_jobs(kcp, ids, due)
        set_s = time.monotonic() - started
        wait_for(lambda: len(server.events("job run")) >= count, timeout=60, interval=0.5)
        # A run is logged before its result is written: on PostgreSQL the
        # write is a later transaction, so wait for the statuses too.
        final = wait_final(kcp, ids, timeout=30)
    assert Counter(final.values()) == {"executed": count}, (Counter(final.values()), set_s)
    events = server.events("job run")
    assert len(events) == count and all(e["ok"] and e["attempt"] == 1 for e in events)
    admin = Admin()
    try:
        assert admin.message_count(route.queue) == count
    finally:
        admin.close()
    messages = consume(route, count, timeout=30)
    assert len(messages) == count
    assert Counter(m.body.decode() for m in messages) == Counter(ids)
    assert {m.properties.message_id for m in messages} == set(ids)
    assert not any(m.redelivered for m in messages)
    assert_clean_log(server)


def test_broker_is_left_running_and_unfrozen() -> None:
    """After the fault tests: the shared broker answers AMQP again."""
    done = threading.Event()

    def probe() -> None:
        Admin().close()
        done.set()

    threading.Thread(target=probe, daemon=True).start()
    assert done.wait(15)
