"""Several kairoi-trio instances on one PostgreSQL database: one scheduler.

Real server processes, a real private PostgreSQL, the real RabbitMQ node as
the runner that records every run (each run is one message and one "job run"
line in the log of the instance that ran it).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import amqp_broker as broker
import grpc
import pytest
import support.postgres as pg
from amqp_broker import Admin, Route
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = pytest.mark.backends("postgres")

CHUNK = 2000
# Fast failover for the tests: a dead instance is noticed within about 2.5 s.
LEASE = "[storage.postgres]\nlease_s = 2.0\nheartbeat_s = 0.5\npoll_interval_s = 0.5"


@pytest.fixture
def route(admin: Admin) -> Iterator[Route]:
    broker.ensure_broker()
    made = broker.make_route(admin, "cluster")
    yield made
    broker.remove_route(made)


def kcp_time(seconds_from_now: float) -> str:
    at = datetime.fromtimestamp(time.time() + seconds_from_now, UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def set_jobs(kcp: KcpClient, ids: Sequence[str], when: str) -> None:
    for start in range(0, len(ids), CHUNK):
        answers = kcp.pipeline([("SET", i, when) for i in ids[start : start + CHUNK]])
        assert all(a == ["OK"] for a in answers), [a for a in answers if a != ["OK"]][:3]


def runs(servers: Sequence[ServerProcess]) -> Counter[str]:
    """Runs per job id, over every instance."""
    return Counter(e["job"] for s in servers for e in s.events("job run"))


def amqp_rule(kcp: KcpClient, pattern: str, route: Route) -> None:
    answer = kcp.request(
        "RULE",
        "SET",
        f"r-{pattern}",
        pattern,
        "amqp",
        broker.URL,
        route.exchange,
        route.routing_key,
    )
    assert answer == ["OK"], answer


def shell_rule(kcp: KcpClient, pattern: str, directory: Path) -> None:
    """A rule that runs a script which succeeds (`sh -- script job_id`)."""
    script = directory / "ok.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    answer = kcp.request("RULE", "SET", f"r-{pattern}", pattern, "shell", str(script))
    assert answer == ["OK"], answer


def statuses(kcp: KcpClient, ids: Sequence[str]) -> Counter[str]:
    found: Counter[str] = Counter()
    for start in range(0, len(ids), CHUNK):
        for answer in kcp.pipeline([("GET", i) for i in ids[start : start + CHUNK]]):
            found[answer[1] if answer[0] == "OK" else answer[0]] += 1
    return found


@pytest.mark.parametrize("instances", [2, 3])
def test_jobs_due_at_once_run_exactly_once_across_instances(
    make_server: Callable[..., ServerProcess], route: Route, instances: int
) -> None:
    count = 10_000
    # the default lease (15 s): no instance is taken for dead on a loaded machine
    servers = [make_server(name=f"i{n}", database="one") for n in range(instances)]
    ids = [f"burst.{i:05d}" for i in range(count)]
    with KcpClient(servers[0].kcp_port, timeout=60) as kcp:
        amqp_rule(kcp, "burst.", route)
        set_jobs(kcp, ids, kcp_time(3.0))
        wait_for(lambda: sum(runs(servers).values()) >= count, timeout=90, interval=0.5)
        time.sleep(0.5)  # a second run of anything would show by now
        ran = runs(servers)
        twice = [job for job, n in ran.items() if n > 1]
        detail = [
            (s.workdir.name, e.get("event"), e.get("timestamp"), e.get("jobs"))
            for s in servers
            for e in s.events()
            if e.get("level") in ("warning", "error")
        ]
        runs_of = [
            (s.workdir.name, e.get("timestamp"), e.get("attempt"))
            for s in servers
            for e in s.events("job run")
            if e.get("job") == (twice or [""])[0]
        ]
        assert set(ran) == set(ids) and not twice, (len(twice), runs_of, detail[:12])
        # the work was shared: every instance ran a part of the burst
        per_instance = [len(s.events("job run")) for s in servers]
        assert all(n > 0 for n in per_instance), per_instance
        wait_for(lambda: statuses(kcp, ids) == Counter({"executed": count}), timeout=30)
    admin = Admin()
    try:
        assert admin.message_count(route.queue) == count
    finally:
        admin.close()


def test_a_killed_instance_loses_nothing_and_its_runs_come_back_within_the_lease(
    make_server: Callable[..., ServerProcess], route: Route
) -> None:
    count = 6_000
    runner = "\n[runners.amqp]\nconcurrency = 32\nqueue_size = 100"
    a = make_server(LEASE + runner, name="a", database="one")
    b = make_server(LEASE + runner, name="b", database="one")
    ids = [f"kill.{i:05d}" for i in range(count)]
    with KcpClient(a.kcp_port, timeout=60) as kcp:
        amqp_rule(kcp, "kill.", route)
        set_jobs(kcp, ids, kcp_time(2.0))
        wait_for(lambda: len(b.events("job run")) >= 500, timeout=60, interval=0.05)
        b.kill()  # SIGKILL mid-burst
        killed_at = datetime.now(UTC)
        wait_for(lambda: set(runs([a, b])) >= set(ids), timeout=60, interval=0.25)
        wait_for(lambda: statuses(kcp, ids) == Counter({"executed": count}), timeout=30)
    ran = runs([a, b])
    assert set(ran) == set(ids)
    twice = [job for job, n in ran.items() if n > 1]
    # Only runs in flight on b when it died may run twice: b had triggered them
    # and their outcome was not recorded. b held at most concurrency + queue.
    assert all(n == 2 for job, n in ran.items() if n > 1)
    assert len(twice) <= 32 + 100, len(twice)
    # a planned b's triggered jobs again once b's lease (2 s) had expired
    freed = [e for e in a.events() if e.get("event") == "runs of dead instances planned again"]
    assert freed, "a never took over b's runs in flight"
    at = datetime.fromisoformat(freed[0]["timestamp"].replace("Z", "+00:00"))
    assert (at - killed_at).total_seconds() <= 2 * 2.0, at - killed_at


def watch_on(
    server: ServerProcess, prefix: str, until: Callable[[pb.WatchJobsResponse], bool]
) -> None:
    """Read a WatchJobs stream (snapshot included) of `server` until `until(message)`
    says so, the stream fails, or 20 s have passed."""
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stream = pb_grpc.SchedulerStub(channel).WatchJobs(
            pb.WatchJobsRequest(prefix=prefix, include_snapshot=True), timeout=20
        )
        try:
            for message in stream:
                if until(message):
                    return
        except grpc.RpcError:
            return


def test_a_job_set_on_one_instance_is_read_and_watched_on_another(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    a = make_server(LEASE, name="a", database="one")
    b = make_server(LEASE, name="b", database="one")
    seen: list[pb.JobEvent] = []
    watching = threading.Event()

    def until(message: pb.WatchJobsResponse) -> bool:
        if not message.snapshot:
            watching.set()
        seen.extend(message.events)
        return any(e.job.id == "shared.2" for e in seen)

    watcher = threading.Thread(target=watch_on, args=(b, "shared.", until), daemon=True)
    watcher.start()
    assert watching.wait(10)
    with KcpClient(a.kcp_port) as on_a, KcpClient(b.kcp_port) as on_b:
        assert on_a.request("SET", "shared.1", "2099-01-01 00:00:00") == ["OK"]
        assert on_b.request("GET", "shared.1")[:2] == ["OK", "planned"]  # at once
        assert on_a.request("SET", "shared.2", "2099-01-01 00:00:00") == ["OK"]
        watcher.join(10)
        assert [e.job.id for e in seen] == ["shared.1", "shared.2"]
        assert {e.type for e in seen} == {pb.JOB_EVENT_TYPE_SET}
        # a rule set on b pairs jobs that a triggers (and the other way round)
        shell_rule(on_b, "rule.", tmp_path)
        jobs = [f"rule.{i}" for i in range(40)]
        set_jobs(on_a, jobs, kcp_time(0.5))
        wait_for(lambda: statuses(on_a, jobs) == Counter({"executed": 40}), timeout=20)
        assert on_b.request("UNSET", "shared.1") == ["OK"]
        assert on_a.request("GET", "shared.1")[0] == "ERROR"


def jobs_notifications(dsn: str) -> Callable[[], int]:
    """Count the kairoi_jobs notifications (changed ids for other instances'
    watchers) from now on: the returned function answers how many so far."""
    import psycopg

    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute("LISTEN kairoi_jobs")
    count = 0

    def heard() -> int:
        nonlocal count
        count += sum(1 for _ in conn.notifies(timeout=0.3))
        return count

    return heard


def test_changes_are_notified_only_while_another_instance_watches_and_none_is_missed(
    make_server: Callable[..., ServerProcess],
) -> None:
    """Without watchers, writes NOTIFY no changed ids (a burst costs no notification).
    A watcher starting on B while A writes without pause sees, from its snapshot and
    events, the last version of every job, the one B then reads: no change falls in
    the gap between B's snapshot and A's first notification."""
    a = make_server(LEASE, name="a", database="gate")
    b = make_server(LEASE, name="b", database="gate")
    assert a.postgres_dsn is not None
    heard = jobs_notifications(a.postgres_dsn)
    with KcpClient(a.kcp_port) as on_a:
        set_jobs(on_a, [f"quiet.{i}" for i in range(200)], "2099-01-01 00:00:00")
        assert on_a.request("UNSET", "quiet.0") == ["OK"]
    assert heard() == 0

    stop = threading.Event()
    writes = 0

    def write() -> None:  # ten jobs, each set again and again to a later time
        nonlocal writes
        with KcpClient(a.kcp_port) as on_a:
            while not stop.is_set():
                writes += 1
                at = f"2099-01-01 00:00:{writes // 1_000_000:02d}.{writes % 1_000_000:06d}"
                assert on_a.request("SET", f"w.{writes % 10}", at) == ["OK"]

    seen: dict[str, int] = {}
    ended = threading.Event()

    def until(message: pb.WatchJobsResponse) -> bool:
        for event in message.events:
            seen[event.job.id] = event.job.execute_at.ToMicroseconds()
        return ended.is_set() and not message.snapshot

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    wait_for(lambda: writes >= 30, timeout=20)
    watcher = threading.Thread(target=watch_on, args=(b, "w.", until), daemon=True)
    watcher.start()
    wait_for(lambda: writes >= 150, timeout=30)
    stop.set()
    writer.join(10)
    with grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        final = {
            f"w.{k}": stub.GetJob(pb.GetJobRequest(id=f"w.{k}")).job.execute_at.ToMicroseconds()
            for k in range(10)
        }
    wait_for(lambda: seen == final, timeout=10)
    assert heard() > 0  # A told B about its changes
    ended.set()
    with KcpClient(a.kcp_port) as on_a:  # one more change ends the stream
        assert on_a.request("SET", "w.0", "2099-01-02 00:00:00") == ["OK"]
    watcher.join(10)
    assert not watcher.is_alive()
    # B's flag goes with its last watcher (at its next batch): quiet again.
    with KcpClient(b.kcp_port) as on_b, KcpClient(a.kcp_port) as on_a:
        wait_for(lambda: on_b.request("GET", "w.0")[0] == "OK" and not any_watching(a))
        before = heard()
        set_jobs(on_a, [f"quiet.{i}" for i in range(200)], "2099-01-01 00:00:00")
        assert heard() == before


def any_watching(server: ServerProcess) -> bool:
    """Whether any instance of the server's database has its watching flag set."""
    import psycopg

    assert server.postgres_dsn is not None
    with psycopg.connect(server.postgres_dsn) as conn:
        row = conn.execute("SELECT bool_or(watching) FROM kairoi.instances").fetchone()
        assert row is not None  # (an aggregate gives one row)
        return bool(row[0])


def ready(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}/ready", timeout=5
        ) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_postgres_down_then_back_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """The database of this test only (own_cluster): other tests keep theirs."""
    from support.server import ServerProcess as Process

    with pg.own_cluster() as cluster:
        import psycopg

        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE outage")
        dsn = cluster.dsn("outage")
        servers = [Process(tmp_path / name, LEASE, postgres_dsn=dsn).start() for name in ("a", "b")]
        try:
            _outage(servers, cluster, tmp_path)
        except BaseException:
            for server in servers:
                print(f"--- {server.workdir.name}\n" + "\n".join(server.lines[-60:]))
            raise
        finally:
            for server in servers:
                server.kill()


def _outage(servers: list[ServerProcess], cluster: pg.Cluster, tmp_path: Path) -> None:
    a, b = servers
    acknowledged: list[str] = []
    refused: list[list[str]] = []
    stop = threading.Event()

    def write() -> None:
        with KcpClient(a.kcp_port, timeout=30) as kcp:
            n = 0
            while not stop.is_set():
                job_id = f"load.{n:06d}"
                answer = kcp.request("SET", job_id, "2099-01-01 00:00:00")
                if answer == ["OK"]:
                    acknowledged.append(job_id)
                else:
                    refused.append(answer)
                    time.sleep(0.01)
                n += 1

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    with KcpClient(b.kcp_port) as kcp:
        shell_rule(kcp, "late.", tmp_path)
        wait_for(lambda: len(acknowledged) > 200)
        pg.restart("fast", of=cluster)  # under write load
        before = len(acknowledged)
        wait_for(lambda: len(acknowledged) > before + 200, timeout=30)  # writes work again
        pg.stop("fast", of=cluster)  # a longer outage
        wait_for(lambda: ready(a) == 503 and ready(b) == 503, timeout=20)
        answer = kcp.request("SET", "late.1", kcp_time(0.5))
        assert answer[0] == "ERROR" and "PostgreSQL" in answer[1], answer
        with grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                pb_grpc.SchedulerStub(channel).GetJob(pb.GetJobRequest(id="x"), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        pg.start(of=cluster)
        wait_for(lambda: ready(a) == 200 and ready(b) == 200, timeout=30)
        assert kcp.request("SET", "late.2", kcp_time(0.3)) == ["OK"]
        wait_for(lambda: kcp.request("GET", "late.2")[1] == "executed", timeout=20)
        stop.set()
        writer.join(30)
        assert refused, "no write failed while the database was down"
        # a clear error: KCP's ERROR naming the database
        assert all(r[0] == "ERROR" and "PostgreSQL" in r[1] for r in refused), refused[:3]
        got = statuses(kcp, acknowledged)
        assert got == Counter({"planned": len(acknowledged)}), got


def test_a_job_running_on_one_instance_refuses_set_and_unset_on_every_other(
    make_server: Callable[..., ServerProcess], tmp_path
) -> None:
    started, release = tmp_path / "started", tmp_path / "release"
    script = tmp_path / "slow.sh"
    script.write_text(
        f"#!/bin/sh\ntouch {started}\nwhile [ ! -e {release} ]; do sleep 0.05; done\n"
    )
    script.chmod(0o755)
    servers = [make_server(name=n, database="one") for n in ("a", "b", "c")]
    kcps = [KcpClient(s.kcp_port) for s in servers]
    try:
        assert kcps[0].request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcps[0].request("SET", "app.slow", "2020-01-01 00:00:00") == ["OK"]
        wait_for(started.exists)
        for kcp in kcps:  # whichever instance runs it, none lets it be replaced or removed
            assert kcp.request("GET", "app.slow")[:2] == ["OK", "triggered"]
            refused = kcp.request("SET", "app.slow", "2099-01-01 00:00:00")
            assert refused[0] == "ERROR" and "triggered" in refused[1], refused
            assert kcp.request("UNSET", "app.slow")[0] == "ERROR"
        release.touch()
        wait_for(lambda: kcps[2].request("GET", "app.slow")[1] == "executed")
        assert kcps[1].request("SET", "app.slow", "2099-01-01 00:00:00") == ["OK"]
    finally:
        for kcp in kcps:
            kcp.close()


def test_batches_of_thousands_of_new_jobs_on_two_instances_at_once(
    make_server: Callable[..., ServerProcess],
) -> None:
    """One SetJobs of 30,000 new ids is one batch, one transaction. Two such
    batches on two instances at once, with 15,000 ids in common, all succeed
    (no deadlock between the two transactions' new rows), every id is stored
    once, and the job counts both instances keep agree."""
    from google.protobuf.timestamp_pb2 import Timestamp

    a = make_server(name="a", database="one")
    b = make_server(name="b", database="one")
    at = Timestamp(seconds=4_070_908_800)  # 2099-01-01
    results: dict[str, object] = {}

    def send(server: ServerProcess, first: int) -> None:
        request = pb.SetJobsRequest(
            jobs=[
                pb.SetJobRequest(id=f"many.{i:05d}", execute_at=at, payload=b"x")
                for i in range(first, first + 30_000)
            ]
        )
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            results[server.workdir.name] = pb_grpc.SchedulerStub(channel).SetJobs(
                request, timeout=60
            )

    threads = [
        threading.Thread(target=send, args=(a, 0)),
        threading.Thread(target=send, args=(b, 15_000)),  # ids 15000-29999 on both
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    for name in ("a", "b"):
        response = results[name]
        assert all(r.status.code == 0 for r in response.results), name  # type: ignore[attr-defined]
    with KcpClient(a.kcp_port) as kcp:
        ids = [f"many.{i:05d}" for i in range(45_000)]
        assert statuses(kcp, ids) == Counter({"planned": 45_000})
    for server in (a, b):  # the counts, kept by both instances' deltas, agree
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            info = pb_grpc.SchedulerStub(channel).GetServerInfo(pb.GetServerInfoRequest())
        assert (info.jobs.planned, info.jobs.triggered) == (45_000, 0)
