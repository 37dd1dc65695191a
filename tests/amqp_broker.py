"""The real RabbitMQ for the AMQP tests: start it, poke it, read what arrived.

`ensure_broker()` starts the loopback broker with scripts/rabbitmq.sh (which
installs it from Debian's packages when missing). `Admin` is a deliberately
dumb blocking client written with pamqp, independent of the client under
test, that declares and deletes exchanges and queues and fetches messages with
basic.get. Tests call its methods through `trio.to_thread.run_sync` (or
directly in setup, where blocking for a few milliseconds is harmless).
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from pamqp import body as pamqp_body
from pamqp import commands, frame, header

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rabbitmq.sh"
NODE = "rabbit@localhost"
PID_FILE = Path("/var/lib/rabbitmq/kairoi-test.pid")
HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"


@functools.cache
def ensure_broker() -> None:
    """Start the broker once per test session (a no-op when it already runs).

    Also undoes what an interrupted earlier run may have left: a SIGSTOPped
    broker, or the tiny memory watermark that blocks every publisher.
    """
    try:
        os.kill(beam_pid(), signal.SIGCONT)
    except (OSError, ValueError):
        pass
    subprocess.run([str(SCRIPT), "start"], check=True, timeout=600)
    rabbitmqctl("set_vm_memory_high_watermark", "0.4")


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-n", NODE, *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout


def stop_app() -> None:
    """Stop the RabbitMQ application (the Erlang node stays up): connections are closed."""
    rabbitmqctl("stop_app")


def start_app() -> None:
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")


def beam_pid() -> int:
    """The broker's OS process, for SIGSTOP / SIGCONT."""
    return int(PID_FILE.read_text().strip())


def unique(prefix: str) -> str:
    return f"kairoi-test-{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Message:
    body: bytes
    properties: commands.Basic.Properties
    redelivered: bool


class Admin:
    """A blocking one-channel AMQP client for test setup and inspection."""

    def __init__(self, host: str = HOST, port: int = PORT, vhost: str = "/") -> None:
        self._sock = socket.create_connection((host, port), timeout=10)
        self._buf = b""
        self._send(frame.marshal(header.ProtocolHeader(), 0))
        self._expect(commands.Connection.Start)
        self._send_method(
            commands.Connection.StartOk(
                client_properties={"product": "kairoi-test-admin"},
                mechanism="PLAIN",
                response="\0guest\0guest",
                locale="en_US",
            ),
            0,
        )
        tune = self._expect(commands.Connection.Tune)
        self._send_method(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
            ),
            0,
        )
        self._send_method(commands.Connection.Open(virtual_host=vhost), 0)
        self._expect(commands.Connection.OpenOk)
        self._send_method(commands.Channel.Open(), 1)
        self._expect(commands.Channel.OpenOk)

    # -- wire

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _send_method(self, method: object, channel: int = 1) -> None:
        self._send(frame.marshal(method, channel))

    def _read_frame(self) -> object:
        while True:
            if len(self._buf) >= 7:
                end = 8 + int.from_bytes(self._buf[3:7], "big")
                if len(self._buf) >= end:
                    _, _, value = frame.unmarshal(self._buf[:end])
                    self._buf = self._buf[end:]
                    return value
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the admin connection")
            self._buf += data

    def _expect(self, kind: type) -> object:
        value = self._read_frame()
        if isinstance(value, commands.Channel.Close | commands.Connection.Close):
            raise RuntimeError(f"{value.reply_code} {value.reply_text}")
        assert isinstance(value, kind), value
        return value

    def _call(self, method: object, reply: type) -> object:
        self._send_method(method)
        return self._expect(reply)

    # -- topology

    def declare_exchange(self, name: str, kind: str = "direct") -> None:
        self._call(
            commands.Exchange.Declare(exchange=name, exchange_type=kind, durable=True),
            commands.Exchange.DeclareOk,
        )

    def delete_exchange(self, name: str) -> None:
        self._call(commands.Exchange.Delete(exchange=name), commands.Exchange.DeleteOk)

    def declare_queue(self, name: str) -> None:
        self._call(commands.Queue.Declare(queue=name, durable=True), commands.Queue.DeclareOk)

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        self._call(
            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key),
            commands.Queue.BindOk,
        )

    def delete_queue(self, name: str) -> None:
        self._call(commands.Queue.Delete(queue=name), commands.Queue.DeleteOk)

    def message_count(self, queue: str) -> int:
        ok = self._call(commands.Queue.Declare(queue=queue, passive=True), commands.Queue.DeclareOk)
        return ok.message_count

    # -- messages

    def get(self, queue: str) -> Message | None:
        """One message (auto-acked), or None when the queue is empty."""
        self._send_method(commands.Basic.Get(queue=queue, no_ack=True))
        value = self._read_frame()
        if isinstance(value, commands.Basic.GetEmpty):
            return None
        assert isinstance(value, commands.Basic.GetOk), value
        content = self._read_frame()
        assert isinstance(content, header.ContentHeader)
        body = b""
        while len(body) < content.body_size:
            part = self._read_frame()
            assert isinstance(part, pamqp_body.ContentBody)
            body += part.value
        return Message(body, content.properties, value.redelivered)

    def drain(self, queue: str) -> list[Message]:
        messages = []
        while (message := self.get(queue)) is not None:
            messages.append(message)
        return messages

    def consume(
        self, queue: str, expected: int, timeout: float = 30, settle_s: float = 0.5
    ) -> list[Message]:
        """Every message of a queue with basic.consume (auto-ack): far faster than
        `drain` for thousands. Reads until `expected` have arrived, then for
        `settle_s` more (to catch any extra, e.g. duplicates), or until nothing
        has arrived for `timeout` seconds."""
        tag = f"kairoi-test-{uuid.uuid4().hex[:8]}"
        self._call(
            commands.Basic.Consume(queue=queue, consumer_tag=tag, no_ack=True),
            commands.Basic.ConsumeOk,
        )
        messages: list[Message] = []
        self._sock.settimeout(timeout)
        try:
            while True:
                if len(messages) >= expected:
                    self._sock.settimeout(settle_s)
                try:
                    value = self._read_frame()
                except TimeoutError:
                    break
                assert isinstance(value, commands.Basic.Deliver), value
                messages.append(self._read_content(value.redelivered))
            self._sock.settimeout(10)
            self._send_method(commands.Basic.Cancel(consumer_tag=tag))
            while not isinstance(value := self._read_frame(), commands.Basic.CancelOk):
                assert isinstance(value, commands.Basic.Deliver), value
                messages.append(self._read_content(value.redelivered))
        finally:
            self._sock.settimeout(10)
        return messages

    def _read_content(self, redelivered: bool) -> Message:
        content = self._read_frame()
        assert isinstance(content, header.ContentHeader), content
        body = b""
        while len(body) < content.body_size:
            part = self._read_frame()
            assert isinstance(part, pamqp_body.ContentBody)
            body += part.value
        return Message(body, content.properties, redelivered)

    def close(self) -> None:
        try:
            close = commands.Connection.Close(
                reply_code=200, reply_text="bye", class_id=0, method_id=0
            )
            self._send_method(close, 0)
            self._expect(commands.Connection.CloseOk)
        except (OSError, AssertionError, RuntimeError, ConnectionError):
            pass
        self._sock.close()


def broker_connections_of(pid: int) -> list[int]:
    """Local ports of the established TCP connections from process `pid` to the
    broker's port, read from /proc (the server under test, not the shared
    broker's other clients)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode in inodes and state == "01" and int(remote.rsplit(":", 1)[1], 16) == PORT:
                ports.append(int(local.rsplit(":", 1)[1], 16))
    return sorted(ports)


@dataclass
class Route:
    """A fresh exchange with one bound queue: publish to (exchange, routing_key), read queue."""

    exchange: str
    queue: str
    routing_key: str


def make_route(admin: Admin, prefix: str) -> Route:
    route = Route(unique(f"{prefix}-x"), unique(f"{prefix}-q"), "rk")
    admin.declare_exchange(route.exchange)
    admin.declare_queue(route.queue)
    admin.bind(route.queue, route.exchange, route.routing_key)
    return route


def remove_route(route: Route) -> None:
    """With a fresh admin connection: the test's may have been closed by the broker."""
    admin = Admin()
    try:
        admin.delete_queue(route.queue)
        admin.delete_exchange(route.exchange)
    finally:
        admin.close()
