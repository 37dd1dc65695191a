"""The real RabbitMQ for the AMQP tests: a private node, poke it, read what arrived.

The tests run against a RabbitMQ node of their own (scripts/rabbitmq.sh): its
own name, port, epmd, cookie and data directory. They never touch another
broker, in particular not a developer's on 127.0.0.1:5672: every helper here
(`rabbitmqctl`, `stop_app`, `start_app`, `beam_pid`) addresses that node only.

- Under scripts/test.sh, the node is already running and the script exported
  its settings (KAIROI_TEST_RABBITMQ_DIR, _NODE, _PORT, _PID_FILE, ...); the
  script stops it at the end.
- Under plain pytest (no KAIROI_TEST_RABBITMQ_DIR), `ensure_broker()` starts a
  node in a fresh temporary directory on the port chosen when this module was
  imported, and `stop_started_node()` (at session end, and at exit) stops it
  and removes the directory.

`Admin` is a deliberately dumb blocking client written with pamqp, independent
of the client under test, that declares and deletes exchanges and queues and
fetches messages with basic.get. Tests call its methods through
`trio.to_thread.run_sync` (or directly in setup, where blocking for a few
milliseconds is harmless). See docs/testing.md.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pamqp import base, commands, frame, header
from pamqp import body as pamqp_body
from support.ports import free_port

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rabbitmq.sh"
DEFAULT_PORT = 5672  # a developer's broker, never ours
HOST = "127.0.0.1"


_env = os.environ
#: Started by someone else (scripts/test.sh, or by hand): we use it, never stop it.
EXTERNAL = "KAIROI_TEST_RABBITMQ_DIR" in _env
if EXTERNAL:
    PORT = int(_env["KAIROI_TEST_RABBITMQ_PORT"])
    NODE = _env["KAIROI_TEST_RABBITMQ_NODE"]
    _directory: Path | None = Path(_env["KAIROI_TEST_RABBITMQ_DIR"])
else:
    PORT = free_port()
    NODE = f"kairoi-test-{PORT}@localhost"
    _directory = None  # made by ensure_broker()


def url(*, password: str | None = "guest", host: str = HOST, vhost: str = "") -> str:
    """The private node's AMQP URL (user guest). password=None gives the redacted
    form the server logs; host="localhost" another spelling of the same broker."""
    auth = "guest" if password is None else f"guest:{password}"
    return f"amqp://{auth}@{host}:{PORT}/{vhost}"


URL = url()


def directory() -> Path:
    """The node's directory (data in mnesia/, logs in log/, node.env, beam.pid)."""
    if _directory is None:
        raise RuntimeError("the test broker is not started: call ensure_broker() first")
    return _directory


def pid_file() -> Path:
    configured = _env.get("KAIROI_TEST_RABBITMQ_PID_FILE") if EXTERNAL else None
    return Path(configured) if configured else directory() / "beam.pid"


_started: Exception | bool = False


def ensure_broker() -> None:
    """Start the private node once per session (under scripts/test.sh: check it runs).

    A failed start fails every later call at once. (What an interrupted test may
    have left on a node kept across runs is undone by reset_external_node.)
    """
    global _started, _directory
    if isinstance(_started, BaseException):
        raise RuntimeError(f"the test broker did not start: {_started}") from _started
    if _started:
        return
    try:
        if PORT == DEFAULT_PORT or NODE.startswith("rabbit@"):
            raise RuntimeError(
                f"refusing to run the tests against {NODE} on port {PORT}: "
                "that is where a developer's own broker lives (see docs/testing.md)"
            )
        if EXTERNAL:
            _external_beam_pid()  # it runs (reset_external_node did the rest)
        else:
            _directory = Path(tempfile.mkdtemp(prefix="kairoi-rabbitmq."))
            atexit.register(stop_started_node)
            command = ["start", str(_directory), "--port", str(PORT), "--owner", str(os.getpid())]
            _script(*command, timeout=600)
    except Exception as error:
        _started = error
        raise
    _started = True


def _external_beam_pid() -> int:
    """The pid of the node scripts/test.sh (or a developer) started; RuntimeError if none."""
    try:
        return beam_pid()
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"no test broker runs in KAIROI_TEST_RABBITMQ_DIR={directory()} ({error}); "
            f"start one with: {SCRIPT} start DIR"
        ) from error


def reset_external_node() -> None:
    """A node kept across runs (started by hand) may still be as an interrupted
    test left it: frozen, its app stopped, its memory watermark tiny. Once per run,
    before any test (tests/conftest.py, pytest_sessionstart, in the controller):
    never from a worker, whose SIGCONT would thaw the node another worker's test
    froze on purpose."""
    if not EXTERNAL:
        return
    os.kill(_external_beam_pid(), signal.SIGCONT)
    status = subprocess.run([SCRIPT, "status", str(directory())], capture_output=True, timeout=60)
    if status.returncode:
        start_app()
    rabbitmqctl("set_vm_memory_high_watermark", "0.4")


def stop_started_node() -> None:
    """Stop the node ensure_broker() started (not one scripts/test.sh started) and
    remove its directory. Safe to call more than once."""
    if EXTERNAL or _directory is None or not _directory.exists():
        return
    _script("stop", str(_directory), timeout=180)


def _script(*args: str, timeout: float) -> str:
    result = subprocess.run(
        [SCRIPT, *args], check=True, stdout=subprocess.PIPE, text=True, timeout=timeout
    )
    return result.stdout


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """rabbitmqctl on the private node (through scripts/rabbitmq.sh ctl: its own
    epmd and cookie, so no other node can be reached)."""
    result = subprocess.run(
        [SCRIPT, "ctl", str(directory()), *args],
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
    """The private node's OS process, for SIGSTOP / SIGCONT. Checked against its
    command line (`-home <its directory>`), so a stale or reused pid is refused."""
    pid = int(pid_file().read_text().strip())
    if f" -home {directory()} " not in process_cmdline(pid):
        raise ValueError(f"pid {pid} is not the test broker of {directory()}")
    return pid


def process_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " " + raw.replace(b"\0", b" ").decode(errors="replace")


@dataclass(frozen=True)
class Listener:
    """A process listening on a loopback TCP port (pid None: not ours to see)."""

    pid: int | None
    frozen: bool


def listener(port: int) -> Listener | None:
    """Who listens on `port` (any address), from /proc; None when nobody does.
    Reads only: never connects."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                pid = int(entry.name)
                return Listener(pid, _process_state(pid) == "T")
    return Listener(None, False)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def unique(prefix: str) -> str:
    return f"kairoi-test-{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Message:
    body: bytes
    properties: commands.Basic.Properties
    redelivered: bool

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers, which the tests index and compare: their values are
        pamqp's union of field types (str, int, bytearray, tables...), Any here. A message
        without headers fails."""
        headers = self.properties.headers
        assert headers is not None, "the message has no headers"
        return headers


class Admin:
    """A blocking one-channel AMQP client for test setup and inspection."""

    def __init__(self, host: str = HOST, port: int = PORT, vhost: str = "/") -> None:
        self._sock = socket.create_connection((host, port), timeout=10)
        self._buf = b""
        self._send(frame.marshal(header.ProtocolHeader(), 0))
        start = self._expect(commands.Connection.Start)
        self.server_properties: dict = dict(start.server_properties)
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

    def _send_method(self, method: base.Frame, channel: int = 1) -> None:
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

    def _expect(self, kind: type[T]) -> T:
        value = self._read_frame()
        if isinstance(value, commands.Channel.Close | commands.Connection.Close):
            raise RuntimeError(f"{value.reply_code} {value.reply_text}")
        assert isinstance(value, kind), value
        return value

    def _call(self, method: base.Frame, reply: type[T]) -> T:
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
        assert ok.message_count is not None
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
