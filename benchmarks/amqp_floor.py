"""The AMQP floor: a bare pamqp publisher with confirms, the simplest thing doing the runner's work.

    .venv/bin/python -m benchmarks.amqp_floor --port P --exchange X --routing-key rk
        [--count 30000] [--window 2048]

One blocking socket, one channel in confirm mode (`confirm.select`), and a
sliding window: up to `--window` persistent messages published and not yet
confirmed (the runner's default `[runners.amqp] concurrency`), the same
message as the runner's (the id as body and message_id, `text/plain`, the
three kairoi headers, a timestamp), mandatory. Frames are encoded by pamqp,
the acks (`multiple` as RabbitMQ sends them) decoded by pamqp. No Trio, no
tasks, no log line, no state: what is left is the broker's cost, and the
client's bare minimum. `benchmarks/amqp_bench.py` runs it in a process of its
own beside the server's run, on the same broker, so that the broker's CPU per
message and its confirm rate show what bounds the runner.

Prints one JSON object: messages, seconds (first publish to last confirm),
messages_per_s, client_cpu_s (this process's utime + stime over that span),
confirms (ack frames received).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from pamqp import body as pamqp_body
from pamqp import commands, frame, header

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import amqp_broker as broker  # noqa: E402


def _frames(channel: int, exchange: str, routing_key: str, message_id: str, at: str) -> bytes:
    body = message_id.encode()
    properties = commands.Basic.Properties(
        content_type="text/plain",
        message_id=message_id,
        timestamp=datetime.now(UTC).replace(microsecond=0),
        delivery_mode=2,
        headers={"kairoi-execute-at": at, "kairoi-attempt": 1, "scheduled_at": at},
    )
    return b"".join(
        (
            frame.marshal(
                commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
                channel,
            ),
            frame.marshal(header.ContentHeader(0, len(body), properties), channel),
            frame.marshal(pamqp_body.ContentBody(body), channel),
        )
    )


class Publisher(broker.Admin):
    """The suite's blocking one-channel client (tests/amqp_broker.py: connect, channel 1),
    with the channel in confirm mode."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self._call(commands.Confirm.Select(), commands.Confirm.SelectOk)

    def frames(self) -> list[object]:
        """Every whole frame received so far, after at least one read."""
        data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the broker closed the connection")
        self.buf += data
        out: list[object] = []
        pos = 0
        while len(self.buf) - pos >= 7:
            end = pos + 8 + int.from_bytes(self.buf[pos + 3 : pos + 7], "big")
            if end > len(self.buf):
                break
            out.append(frame.unmarshal(bytes(self.buf[pos:end]))[2])
            pos = end
        del self.buf[:pos]
        return out

    def publish_all(self, exchange: str, routing_key: str, count: int, window: int) -> int:
        """Publish `count` messages, at most `window` unconfirmed; answer the ack frames read."""
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        sent = confirmed = acks = 0
        while confirmed < count:
            batch = []
            while sent < count and sent - confirmed < window:
                sent += 1
                batch.append(_frames(1, exchange, routing_key, f"floor.{sent:07d}", at))
            if batch:
                self._send(b"".join(batch))
            for value in self.frames():
                if isinstance(value, commands.Basic.Ack):
                    acks += 1
                    confirmed = value.delivery_tag if value.multiple else confirmed + 1
                elif isinstance(value, commands.Basic.Nack | commands.Basic.Return):
                    raise RuntimeError(f"the broker refused a message: {value!r}")
        return acks


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--routing-key", default="rk")
    parser.add_argument("--count", type=int, default=30_000)
    parser.add_argument("--window", type=int, default=2048)
    args = parser.parse_args()
    publisher = Publisher(args.host, args.port)
    cpu0, t0 = _cpu(), time.monotonic()
    acks = publisher.publish_all(args.exchange, args.routing_key, args.count, args.window)
    seconds = time.monotonic() - t0
    cpu = _cpu() - cpu0
    publisher.close()
    json.dump(
        {
            "messages": args.count,
            "seconds": round(seconds, 3),
            "messages_per_s": round(args.count / seconds),
            "client_cpu_s": round(cpu, 2),
            "confirms": acks,
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
