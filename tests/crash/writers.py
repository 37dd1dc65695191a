"""The clients of the crash driver: threads that keep writing until the server dies.

Every writer owns its keys (no two writers write the same job or rule), sends
in one order and records each operation in its History *before* sending it
and marks it acknowledged when its OK arrives. Values are unique (each one
names its writer and position), so a value read back tells which operation
it came from.

- KcpWriter: pipelined bursts of SET / UNSET / RULE SET / RULE UNSET on one
  connection, payloads with spaces, quotes, backslashes, line feeds and
  non-ASCII text, now and then a large one.
- GrpcWriter: SetJobs batches, DeleteJob, SetRule, DeleteRule with the
  generated stubs (a real gRPC client over HTTP/2).
- RunWriter: jobs due now under the `run.` rule, whose shell script records
  each run (see RUN_SCRIPT).
"""

from __future__ import annotations

import random
import socket
import threading
from datetime import UTC, datetime

import grpc
from crash.history import History, Key, Value
from google.protobuf.timestamp_pb2 import Timestamp

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.protocols.kcp.codec import KcpParser, Message, encode_message

# Far in the future, so writers' jobs never trigger (a triggered job refuses SET).
FUTURE_BASE = int(datetime(2090, 1, 1, tzinfo=UTC).timestamp())

# `sh -- <script> <job id>`: one line when the run starts, one when it ends,
# with the server's pid ($PPID: the server spawns sh) and whether that server
# was still alive when the run ended. A run whose server died first cannot
# have had its outcome recorded, so the job must run again. A script whose
# server is gone should be killed by the server's process guard at once; one
# still running {grace} s later (time enough on a loaded machine, where the
# guard may not be scheduled within the milliseconds left of the sleep) ends
# "orphan": it outlived its server.
RUN_SCRIPT = """#!/bin/sh
echo "$1 start $PPID" >> {runs}
sleep {sleep}
if kill -0 "$PPID" 2>/dev/null; then state=alive; else sleep {grace}; state=orphan; fi
echo "$1 end $PPID $state" >> {runs}
"""

# What the server cannot produce but a broken connection can.
_CONNECTION_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

_TEXT = ' "\\\n\tabcxyz0189.-_é€😀'


def job_value(time_text: str, payload: str) -> Value:
    """What KCP's GET answers for a planned job (after OK)."""
    return ("planned", time_text, payload) if payload else ("planned", time_text)


def rule_value(pattern: str, command: str) -> Value:
    """What KCP's RULE GET answers for a shell rule (after OK)."""
    return (pattern, "shell", command)


def kcp_time(seconds: int, micros: int) -> str:
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{micros:06d}" if micros else text


class Writer(threading.Thread):
    """Writes until stopped or until the server goes away."""

    def __init__(self, name: str, rng: random.Random, history: History) -> None:
        super().__init__(name=name, daemon=True)
        self.rng = rng
        self.history = history
        self.stop = threading.Event()
        self.acked_burst = threading.Event()  # set after each fully acknowledged burst
        self.errors: list[str] = []  # answers no healthy server gives
        self.sent = 0

    def run(self) -> None:
        try:
            self.write()
        except (OSError, ConnectionError):
            pass  # the server was killed
        except Exception as error:  # a bug in the driver must be seen, not swallowed
            self.errors.append(f"{self.name}: {type(error).__name__}: {error}")

    def write(self) -> None:
        raise NotImplementedError

    def payload(self) -> str:
        rng = self.rng
        mark = f"{self.name}#{len(self.history.ops)}"
        roll = rng.random()
        if roll < 0.04:  # a large one now and then: bigger frames, more compactions
            return mark + "L" * rng.randint(2_000, 30_000)
        if roll < 0.5:
            return mark
        return mark + "".join(rng.choice(_TEXT) for _ in range(rng.randint(1, 24)))

    def job_time(self) -> tuple[int, int]:
        seconds = FUTURE_BASE + self.rng.randrange(10**8)
        micros = self.rng.choice([0, 0, self.rng.randrange(1, 10**6)])
        return seconds, micros


class KcpWriter(Writer):
    def __init__(self, name: str, rng: random.Random, history: History, port: int, keys: int):
        super().__init__(name, rng, history)
        self.port = port
        self.jobs = [f"kj.{name}.{i}" for i in range(keys)]
        self.rules = [f"kr.{name}.{i}" for i in range(max(1, keys // 4))]

    def next_request(self) -> list[str]:
        rng, history = self.rng, self.history
        roll = rng.random()
        if roll < 0.75:
            job = rng.choice(self.jobs)
            if roll < 0.6 or history.believed(("job", job)) is None:
                seconds, micros = self.job_time()
                time_text, payload = kcp_time(seconds, micros), self.payload()
                history.record(("job", job), job_value(time_text, payload))
                return ["SET", job, time_text, payload]
            history.record(("job", job), None)
            return ["UNSET", job]
        rule = rng.choice(self.rules)
        if roll < 0.93 or history.believed(("rule", rule)) is None:
            pattern = f"never.{rule}."
            command = f"/nonexistent/{self.name}-{len(history.ops)}.sh"
            history.record(("rule", rule), rule_value(pattern, command))
            return ["RULE", "SET", rule, pattern, "shell", command]
        history.record(("rule", rule), None)
        return ["RULE", "UNSET", rule]

    def write(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            parser = KcpParser()
            events: list = []
            while not self.stop.is_set():
                first = len(self.history.ops)
                wire = bytearray()
                for i in range(self.rng.randint(1, 40)):
                    wire += encode_message(str(first + i), self.next_request())
                ops = self.history.ops[first:]
                self.sent += len(ops)
                sock.sendall(wire)
                for op in ops:
                    while not events:
                        data = sock.recv(65536)
                        if not data:
                            return
                        parser.feed(data)
                        events.extend(parser.events())
                    answer = events.pop(0)
                    if not isinstance(answer, Message) or answer.id != str(op.seq):
                        self.errors.append(f"{self.name}: answer {answer!r} for #{op.seq}")
                        return
                    if answer.args != ["OK"]:
                        self.errors.append(f"{self.name}: #{op.seq} {op.key}: {answer.args}")
                        return
                    op.acked = True
                self.acked_burst.set()


class GrpcWriter(Writer):
    def __init__(self, name: str, rng: random.Random, history: History, port: int, keys: int):
        super().__init__(name, rng, history)
        self.port = port
        self.jobs = [f"gj.{name}.{i}" for i in range(keys)]
        self.rules = [f"gr.{name}.{i}" for i in range(max(1, keys // 4))]

    def write(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            while not self.stop.is_set():
                first = len(self.history.ops)
                call = self.next_call(stub)
                ops = self.history.ops[first:]
                self.sent += len(ops)
                try:
                    response = call()
                except grpc.RpcError as error:
                    code = error.code()  # type: ignore[attr-defined]
                    if code not in _CONNECTION_CODES:
                        self.errors.append(f"{self.name}: #{first} {code}: {error.details()}")  # type: ignore[attr-defined]
                    return
                results = getattr(response, "results", None)
                if results is not None:
                    bad = [(i, r.status) for i, r in enumerate(results) if r.status.code != 0]
                    if bad or len(results) != len(ops):
                        self.errors.append(f"{self.name}: SetJobs #{first}: {bad}")
                        return
                for op in ops:
                    op.acked = True
                self.acked_burst.set()

    def next_call(self, stub: pb_grpc.SchedulerStub):  # -> a function making the call
        rng, history = self.rng, self.history
        roll = rng.random()
        timeout = 10.0
        if roll < 0.75:
            job = rng.choice(self.jobs)
            if roll < 0.6 or history.believed(("job", job)) is None:
                entries = []
                for _ in range(rng.randint(1, 20)):
                    job = rng.choice(self.jobs)
                    seconds, micros = self.job_time()
                    payload = self.payload()
                    history.record(("job", job), job_value(kcp_time(seconds, micros), payload))
                    at = Timestamp(seconds=seconds, nanos=micros * 1000)
                    entry = pb.SetJobRequest(id=job, execute_at=at, payload=payload.encode())
                    entries.append(entry)
                request = pb.SetJobsRequest(jobs=entries)
                return lambda: stub.SetJobs(request, timeout=timeout)
            history.record(("job", job), None)
            return lambda: stub.DeleteJob(pb.DeleteJobRequest(id=job), timeout=timeout)
        rule = rng.choice(self.rules)
        if roll < 0.93 or history.believed(("rule", rule)) is None:
            pattern = f"never.{rule}."
            command = f"/nonexistent/{self.name}-{len(history.ops)}.sh"
            history.record(("rule", rule), rule_value(pattern, command))
            message = pb.Rule(id=rule, pattern=pattern, shell=pb.ShellRunner(command=command))
            return lambda: stub.SetRule(pb.SetRuleRequest(rule=message), timeout=timeout)
        history.record(("rule", rule), None)
        return lambda: stub.DeleteRule(pb.DeleteRuleRequest(id=rule), timeout=timeout)


class RunWriter(Writer):
    """Sets jobs due now (one to three at a time, with short pauses) under `run.`."""

    def __init__(self, name: str, rng: random.Random, port: int, cycle: int) -> None:
        super().__init__(name, rng, History(name))
        self.port = port
        self.cycle = cycle
        self.sent_ids: list[str] = []
        self.acked_ids: list[str] = []

    def write(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            parser = KcpParser()
            events: list = []
            while not self.stop.is_set():
                now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
                ids = []
                for _ in range(self.rng.randint(1, 3)):
                    ids.append(f"run.c{self.cycle}.{len(self.sent_ids)}")
                    self.sent_ids.append(ids[-1])
                sock.sendall(b"".join(encode_message(i, ["SET", i, now]) for i in ids))
                self.sent += len(ids)
                for job in ids:
                    while not events:
                        data = sock.recv(65536)
                        if not data:
                            return
                        parser.feed(data)
                        events.extend(parser.events())
                    answer = events.pop(0)
                    if not isinstance(answer, Message) or answer.args != ["OK"]:
                        self.errors.append(f"{self.name}: {job}: {answer!r}")
                        return
                    self.acked_ids.append(job)
                self.acked_burst.set()
                self.stop.wait(self.rng.uniform(0.01, 0.08))


def observe_key(key: Key, answer: list[str]) -> Value:
    """A KCP GET / RULE GET answer -> the Value the histories hold."""
    if answer[0] == "OK":
        return tuple(answer[1:])
    if answer[0] == "ERROR" and answer[1].startswith(("no job", "no rule")):
        return None
    raise AssertionError(f"{key}: unexpected answer {answer!r}")
