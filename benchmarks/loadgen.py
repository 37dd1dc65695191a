"""A fast pipelining KCP SET driver, run in its own process (no GIL shared with the server).

    python -m benchmarks.loadgen --port P --count N [--conns C] [--window W]
                                 [--prefix ID] [--server-pid PID]

All request bytes are built before the clock starts. Each connection keeps up
to `window` requests outstanding; responses are counted by their line feeds
(every answer to SET is one line), and every received byte is checked for
b"ERROR" so that a single failed SET fails the run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import sys
import time

from benchmarks.server import cpu_seconds, load_average, machine_cpu

CHUNK_REQUESTS = 256  # requests per send() call
BASE_TIME = 1_893_456_000  # 2030-01-01 00:00:00 UTC: never due during a run
SPREAD_S = 10 * 365 * 86400


def build_chunks(prefix: str, conn: int, start: int, count: int) -> list[tuple[int, bytes]]:
    """[(number of requests, bytes)], ids `<prefix><conn>.<i>`, times scattered over 10 years."""
    chunks = []
    gmtime = time.gmtime
    strftime = time.strftime
    for base in range(start, start + count, CHUNK_REQUESTS):
        end = min(base + CHUNK_REQUESTS, start + count)
        parts = []
        for i in range(base, end):
            # a cheap scramble so that times are not in id order
            at = BASE_TIME + (i * 2_654_435_761) % SPREAD_S
            parts.append(
                f'{i} SET {prefix}{conn}.{i} "{strftime("%Y-%m-%d %H:%M:%S", gmtime(at))}"\n'
            )
        chunks.append((end - base, "".join(parts).encode()))
    return chunks


class Conn:
    def __init__(self, port: int, chunks: list[tuple[int, bytes]], window: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.chunks = chunks
        self.next_chunk = 0
        self.view: memoryview | None = None  # the rest of the chunk being sent
        self.window = window
        self.total = sum(n for n, _ in chunks)
        self.sent = 0  # requests handed to send()
        self.received = 0  # responses counted
        self.tail = b""
        self.errors = 0
        self.first_error = b""

    def want_write(self) -> bool:
        if self.view is not None:
            return True
        if self.next_chunk >= len(self.chunks):
            return False
        return self.sent - self.received + self.chunks[self.next_chunk][0] <= self.window

    def on_write(self) -> None:
        while True:
            if self.view is None:
                if not self.want_write():
                    return
                n, data = self.chunks[self.next_chunk]
                self.next_chunk += 1
                self.sent += n
                self.view = memoryview(data)
            try:
                written = self.sock.send(self.view)
            except BlockingIOError:
                return
            self.view = self.view[written:] if written < len(self.view) else None
            if self.view is not None:
                return

    def on_read(self) -> bool:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return True
        if not data:
            raise ConnectionError(f"server closed the connection after {self.received} answers")
        self.received += data.count(b"\n")
        window = self.tail + data
        if b"ERROR" in window:
            self.errors += window.count(b"ERROR")
            if not self.first_error:
                at = window.index(b"ERROR")
                self.first_error = window[max(0, at - 60) : at + 120]
        self.tail = data[-4:]
        return True

    @property
    def done(self) -> bool:
        return self.received >= self.total


def run(
    port: int,
    count: int,
    conns: int,
    window: int,
    prefix: str,
    server_pid: int | None,
    timeout: float = 600.0,
) -> dict:
    per = [count // conns + (1 if k < count % conns else 0) for k in range(conns)]
    built = time.perf_counter()
    connections = [Conn(port, build_chunks(prefix, k, 0, n), window) for k, n in enumerate(per)]
    build_s = time.perf_counter() - built
    sel = selectors.DefaultSelector()
    for c in connections:
        sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    server_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    busy0, _ = machine_cpu()
    load0 = load_average()
    t0 = time.perf_counter()
    active = len(connections)
    # (seconds, responses) each time another tenth of the answers is in: shows
    # whether the rate changes as the store grows
    step = max(1, count // 10)
    progress: list[tuple[float, int]] = []
    next_mark = step
    while active:
        for key, mask in sel.select(timeout=30):
            c = key.data  # a Conn (registered above)
            if mask & selectors.EVENT_READ:
                c.on_read()
            if mask & selectors.EVENT_WRITE:
                c.on_write()
            if c.done:
                sel.unregister(c.sock)
                active -= 1
            else:
                sel.modify(
                    c.sock,
                    selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write() else 0),
                    c,
                )
        received = sum(c.received for c in connections)
        if received >= next_mark:
            progress.append((time.perf_counter() - t0, received))
            next_mark = (received // step + 1) * step
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"load run took more than {timeout:g} s")
    elapsed = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    busy1, _ = machine_cpu()
    server_cpu = (cpu_seconds(server_pid) - server_cpu0) if server_pid else 0.0
    for c in connections:
        c.sock.close()
    errors = sum(c.errors for c in connections)
    client_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "count": count,
        "conns": conns,
        "window": window,
        "seconds": elapsed,
        "sets_per_s": count / elapsed,
        "server_cpu_s": server_cpu,
        "sets_per_server_cpu_s": count / server_cpu if server_cpu else None,
        "client_cpu_s": client_cpu,
        # CPU used by everything else on the machine meanwhile (other processes, kernel
        # work not charged to either): on 2 cores this is what the figures compete with
        "other_cpu_s": max(0.0, (busy1 - busy0) - server_cpu - client_cpu) if server_pid else None,
        "loadavg_1m_before": load0,
        "build_s": build_s,
        "progress": progress,
        "errors": errors,
        "first_error": next((c.first_error for c in connections if c.first_error), b"").decode(
            "utf-8", "replace"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--prefix", default="bench.")
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the run may take")
    args = parser.parse_args(argv)
    result = run(
        args.port, args.count, args.conns, args.window, args.prefix, args.server_pid, args.timeout
    )
    print(json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
