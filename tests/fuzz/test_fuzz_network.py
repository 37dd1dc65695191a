"""Network fuzz of the live server: many connections at once send requests from
the grammar, damaged requests, noise and oversized messages, cut into random
TCP segments with random pauses, and hang up at random moments (mid-message,
with or without a reset). Among them, checked SETs of keys no fuzz text can
name (grammar.py: no Q) record what was acknowledged.

At the end the server is alive, answers PING, every acknowledged SET is
readable with its value (or a later one sent on the same connection), no
connection task is left behind, /metrics and /ready are served, nothing was
logged as a crash, it stops cleanly on SIGTERM, and after a restart the
acknowledged SETs are still there.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import trio
from crash.history import History, Op, Value, check
from crash.writers import job_value, kcp_time, observe_key
from fuzz import grammar
from fuzz.kcp_reference import parse_all
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

from kairoi_trio.model import HttpRunner, Rule
from kairoi_trio.protocols.kcp.codec import KcpParser, Message, encode_message
from kairoi_trio.storage.log import DurableLog
from kairoi_trio.storage.records import RulePut

MAX_MESSAGE_BYTES = 4096
CONFIG = f"""
[controller]
max_message_bytes = {MAX_MESSAGE_BYTES}
[runners.shell]
allowed_commands = ["/nonexistent/fuzz.sh"]
[runners.amqp]
connect_timeout_s = 1.0
[runners.http]
timeout_s = 1.0
"""
CONNECTIONS = 6
# Events that mean a task died on input it should have handled.
CRASH_EVENTS = {
    "kcp connection failed",
    "command failed",
    "runner crashed",
    "reply callback failed",
    "metrics request failed",
    "grpc thread crashed",
    "amqp.internal_error",
}


class Session:
    """One connection's worth of traffic, and what it acknowledged."""

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name = name
        self.rng = rng
        self.history = History(name)
        self.wire = bytearray()
        self.checked: dict[str, Op] = {}  # request id -> its Op
        self.messages = 0
        self.swallowed = 0
        self.answered_all = False

    def build(self) -> None:
        rng = self.rng
        sets: dict[str, tuple[str, Value]] = {}  # request id -> (key, value)
        for n in range(rng.randint(1, 120)):
            roll = rng.random()
            if roll < 0.3:  # a checked SET
                key = f"Q{self.name}.{rng.randrange(8)}"
                seconds = 3_786_912_000 + rng.randrange(10**8)  # after 2090
                time_text = kcp_time(seconds, rng.choice([0, rng.randrange(1, 10**6)]))
                payload = f"{self.name}:{n}" + grammar.text(rng, 10)
                sets[f"c{n}"] = (key, job_value(time_text, payload))
                self.wire += encode_message(f"c{n}", ["SET", key, time_text, payload])
            elif roll < 0.55:
                self.wire += grammar.message(rng, f"g{n}")
            elif roll < 0.85:
                self.wire += grammar.mutate(rng, grammar.message(rng), rng.randint(1, 5))
            elif roll < 0.9:
                self.wire += encode_message(f"p{n}", ["PING"])
            elif roll < 0.99:
                noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))
                self.wire += noise.replace(b"Q", b"q")
                if rng.random() < 0.5:
                    self.wire += b"\n"
            else:  # over the limit: the server answers and hangs up
                self.wire += b"big SET x " + b"y" * (MAX_MESSAGE_BYTES + rng.randrange(100))
            self.messages += 1
        assert b"Q" not in self.wire.replace(b" Q" + self.name.encode() + b".", b"")
        # A damaged request may swallow the checked SETs after it (an unmatched
        # quote opens a string across lines), or glue its last bytes to one's
        # identifier: the reference parser tells which SETs are still requests,
        # in order (the server applies those of one connection in that order),
        # and which of them kept their identifier (their OK is recognised).
        by_value = {(key, value): id for id, (key, value) in sets.items()}
        recorded = 0
        for event in parse_all(bytes(self.wire), MAX_MESSAGE_BYTES):
            if isinstance(event, Message) and event.args[0] == "SET" and len(event.args) == 4:
                key, value = event.args[1], job_value(*event.args[2:])
                id = by_value.get((key, value))
                if id is not None:
                    op = self.history.record(("job", key), value)
                    recorded += 1
                    if event.id == id:
                        self.checked[id] = op
        self.swallowed = len(sets) - recorded

    def run(self, port: int) -> dict[str, int]:
        rng = self.rng
        figures = {"segments": 0, "cut": 0, "reset": 0}
        cut_at = len(self.wire) + 1
        if rng.random() < 0.3:  # hang up somewhere, mid-message most likely
            cut_at = rng.randrange(len(self.wire) + 1)
        parser = KcpParser()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            i = 0
            try:
                while i < min(cut_at, len(self.wire)):
                    step = rng.choice([1, 2, 3, 7, 20, 100, 1000, len(self.wire)])
                    step = min(step, cut_at - i)
                    sock.sendall(self.wire[i : i + step])
                    figures["segments"] += 1
                    i += step
                    if rng.random() < 0.05:
                        time.sleep(rng.uniform(0.001, 0.05))
                    if rng.random() < 0.1:
                        self.read_available(sock, parser)
            except OSError:
                return figures  # the server hung up first (an oversized message)
            if cut_at <= len(self.wire):
                figures["cut"] += 1
                if rng.random() < 0.5:  # a reset rather than a close
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    figures["reset"] += 1
                return figures  # answers never read: nothing counts as acknowledged
            try:
                sock.shutdown(socket.SHUT_WR)
                while data := sock.recv(65536):
                    parser.feed(data)
                    self.take(parser)
            except OSError:
                return figures
            self.answered_all = True
        return figures

    def read_available(self, sock: socket.socket, parser: KcpParser) -> None:
        sock.setblocking(False)
        try:
            while data := sock.recv(65536):
                parser.feed(data)
                self.take(parser)
        except (BlockingIOError, OSError):
            pass
        finally:
            sock.setblocking(True)
            sock.settimeout(30)

    def take(self, parser: KcpParser) -> None:
        for event in parser.events():
            assert isinstance(event, Message), event  # the server's answers always parse
            op = self.checked.get(event.id)
            if op is not None:
                assert event.args == ["OK"], (self.name, event)
                op.acked = True


class Fuzzer(threading.Thread):
    def __init__(self, index: int, seed: int, port: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(f"{seed}-{index}")
        self.index = index
        self.port = port
        self.deadline = deadline
        self.sessions: list[Session] = []
        self.figures = {"segments": 0, "cut": 0, "reset": 0, "messages": 0, "swallowed": 0}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                session = Session(f"{self.index}s{len(self.sessions)}", self.rng)
                session.build()
                self.sessions.append(session)
                for name, value in session.run(self.port).items():
                    self.figures[name] += value
                self.figures["messages"] += session.messages
                self.figures["swallowed"] += session.swallowed
        except BaseException as error:
            self.error = error


def read_back(server: ServerProcess, histories: list[History]) -> dict:
    keys = sorted({key for history in histories for key in history.keys()})
    with KcpClient(server.kcp_port, timeout=60) as kcp:
        answers = kcp.pipeline([("GET", key[1]) for key in keys])
    return {key: observe_key(key, answer) for key, answer in zip(keys, answers, strict=True)}


def http_get(port: int | None, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def connections_ended(server: ServerProcess) -> None:
    """Wait until the server's connection gauge is back to zero."""

    def gauge() -> float | None:
        return metric(http_get(server.metrics_port, "/metrics")[1], "kairoi_kcp_connections")

    wait_for(lambda: gauge() == 0)


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_the_server_survives_a_network_fuzz_and_keeps_what_it_acknowledged(
    tmp_path: Path,
    fuzz_seed: int,
    fuzz_seconds: Callable[[float], float],
    fuzz_summary: Callable[[str], None],
) -> None:
    seconds = fuzz_seconds(7.0)
    print(f"network fuzz: seed {fuzz_seed}, {seconds} s (replay: KAIROI_FUZZ_SEED={fuzz_seed})")
    server = ServerProcess(tmp_path / "server", CONFIG).start()
    try:
        deadline = time.monotonic() + seconds
        fuzzers = [Fuzzer(i, fuzz_seed, server.kcp_port, deadline) for i in range(CONNECTIONS)]
        for fuzzer in fuzzers:
            fuzzer.start()
        scrapes = 0
        while any(fuzzer.is_alive() for fuzzer in fuzzers):
            assert http_get(server.metrics_port, "/metrics")[0] == 200
            scrapes += 1
            time.sleep(0.2)
        for fuzzer in fuzzers:
            fuzzer.join()
            if fuzzer.error is not None:
                raise AssertionError(f"seed {fuzz_seed}: {fuzzer.error!r}") from fuzzer.error

        assert server.process is not None and server.process.poll() is None, "the server died"
        with KcpClient(server.kcp_port) as kcp:
            assert kcp.request("PING") == ["OK", "PONG"]
        histories = [session.history for fuzzer in fuzzers for session in fuzzer.sessions]
        observed = read_back(server, histories)
        for history in histories:
            check(history, observed)
        acked = sum(history.acked_count for history in histories)
        assert acked > 0
        # A connection that was not cut and whose answers were all read got an
        # OK for every checked SET that was still a request.
        sessions = [session for fuzzer in fuzzers for session in fuzzer.sessions]
        for session in sessions:
            if session.answered_all:
                unanswered = [id for id, op in session.checked.items() if not op.acked]
                assert not unanswered, (session.name, unanswered[:5])
        # Every connection task ended: the gauge comes back to zero.
        wait_for(
            lambda: (
                metric(http_get(server.metrics_port, "/metrics")[1], "kairoi_kcp_connections") == 0
            )
        )
        assert http_get(server.metrics_port, "/ready")[0] == 200
        crashes = [event for event in server.events() if event.get("event") in CRASH_EVENTS]
        assert not crashes, crashes[:3]  # a client's reset is not a failure either
        assert server.stop() == 0

        server.start()
        final = read_back(server, histories)
        for history in histories:
            check(history, final)
        assert server.stop() == 0
    finally:
        server.kill()

    figures: dict[str, int] = {}
    for fuzzer in fuzzers:
        for name, value in fuzzer.figures.items():
            figures[name] = figures.get(name, 0) + value
    summary = (
        f"network fuzz, seed {fuzz_seed}: {CONNECTIONS} concurrent clients for {seconds:.0f} s, "
        f"{sum(len(f.sessions) for f in fuzzers)} connections, {figures['messages']} messages "
        f"in {figures['segments']} segments, {figures['cut']} hang-ups mid-stream "
        f"({figures['reset']} resets), {acked} acknowledged SETs checked twice "
        f"({figures['swallowed']} more were requests no more: swallowed by damaged ones or "
        "after an oversized one), "
        f"{scrapes} /metrics scrapes"
    )
    fuzz_summary(summary)
    print(summary)


def test_a_client_reset_is_not_logged_as_a_connection_failure(tmp_path: Path) -> None:
    """A client that hangs up with a reset (SO_LINGER 0) while its answers are
    being written is an ordinary event, not an error with a traceback."""
    server = ServerProcess(tmp_path / "server").start()
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.kcp_port))
            sock.sendall(b"".join(b"%d PING\n" % i for i in range(2000)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        with KcpClient(server.kcp_port) as kcp:
            assert kcp.request("PING") == ["OK", "PONG"]  # and the server is fine
        connections_ended(server)  # every connection task has ended (and logged)
        failures = server.events("kcp connection failed")
        assert not failures, failures[0].get("exception", "")[-600:]
    finally:
        server.kill()


def test_an_http_host_that_cannot_be_encoded_is_refused_or_fails_plainly(tmp_path: Path) -> None:
    """Host names the resolver cannot encode (found by the network fuzz): RULE SET
    refuses them with the reason; a rule stored before that check (written to the
    log here) makes its jobs fail with a reason, like any unreachable host, and
    never crashes the runner."""
    hosts = ["a" * 64, "xn--a"]
    server = ServerProcess(tmp_path / "server", "[runners.http]\ntimeout_s = 2.0")

    async def store_old_rules() -> None:
        store = DurableLog(server.data_dir)
        await trio.to_thread.run_sync(store.load)
        rules = [
            Rule(f"old{i}", f"o{i}.", HttpRunner(f"http://{h}:1/hook")) for i, h in enumerate(hosts)
        ]
        await store.append([RulePut(rule) for rule in rules])
        await store.aclose()

    server.data_dir.mkdir(parents=True)
    trio.run(store_old_rules)
    server.start()
    try:
        with KcpClient(server.kcp_port) as kcp:
            for i, host in enumerate(hosts):
                url = f"http://{host}:1/hook"
                answer = kcp.request("RULE", "SET", f"r{i}", f"h{i}.", "http", url)
                assert answer[0] == "ERROR" and "host name" in answer[1], answer
                assert kcp.request("SET", f"o{i}.job", "2020-01-01 00:00:00") == ["OK"]
            for i in range(len(hosts)):

                def has_failed(i: int = i) -> bool:
                    return kcp.request("GET", f"o{i}.job")[1] == "failed"

                wait_for(has_failed)
        crashed = server.events("runner crashed")
        assert not crashed, [event.get("exception", "").splitlines()[-1] for event in crashed]
    finally:
        server.kill()
