"""Start the real `kairoi-trio serve` as a subprocess and watch it from outside.

The server gets a TOML config with port 0 everywhere; its ports are read back
from the JSON "ready" log line. Start-up time is measured from just before the
fork to the moment that line is read; memory and CPU come from /proc/<pid>.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

READY_TIMEOUT_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def loop_cpu_seconds(pid: int) -> float:
    """utime + stime of a process's main thread alone (the server's Trio event loop)."""
    return cpu_seconds(f"{pid}/task/{pid}")  # type: ignore[arg-type]


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of each of a process's threads, summed by thread name (comm):
    "python" is the main thread (the server's event loop), "log-writer" the log
    writer, "trio[worker]" Trio's worker threads (fsync, the database), and so on."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if tid == str(pid):
            name = "main"
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" when it says none)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def split_requests(buf: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The complete HTTP/1.1 requests at the start of `buf`, as (head, body)
    (the body is Content-Length bytes, 0 without the header), and what is left:
    the benchmarks' endpoints' parser, the least work that serves keep-alive
    POSTs. No chunked bodies."""
    requests = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            break
        head = buf[:end]
        at = head.lower().find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        if len(buf) < end + 4 + length:
            break
        requests.append((head, buf[end + 4 : end + 4 + length]))
        buf = buf[end + 4 + length :]
    return requests, buf


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS, (busy + idle + iowait) / CLOCK_TICKS


def jobs_by_status(http_port: int) -> dict[str, int]:
    """The server's job counts by status (`GET /api/v1/info` on its HTTP port): a cheap poll."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/info", timeout=10) as answer:
        return dict(json.load(answer)["jobs"])


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def proc_status_kib(pid: int, key: str) -> int:
    """A 'kB' field of /proc/<pid>/status, e.g. VmHWM (peak RSS) or VmRSS."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class Server:
    def __init__(
        self,
        workdir: Path,
        data_dir: Path,
        *,
        fsync: bool,
        extra: str = "",
        storage: str = "",
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.workdir = workdir
        self.ready_timeout = ready_timeout  # seconds from fork to the "ready" line
        self.data_dir = data_dir
        self.fsync = fsync
        self.extra = extra
        self.storage = storage  # lines of the [storage] table beside its directory
        self.config_path = workdir / "configuration.toml"
        self.process: subprocess.Popen[bytes] | None = None
        self.lines: list[tuple[float, str]] = []  # (monotonic receipt time, line)
        self.kcp_port = 0
        self.grpc_port: int | None = None
        self.ready_seconds = 0.0
        self._ready = threading.Event()
        self._started = 0.0
        self._reader: threading.Thread | None = None

    def config_text(self) -> str:
        return (
            '[log]\nlevel = "info"\nformat = "json"\n\n'
            '[controller]\nlisten = "127.0.0.1:0"\n\n'
            '[grpc]\nlisten = "127.0.0.1:0"\n\n'
            '[metrics]\nlisten = "127.0.0.1:0"\n\n'
            f"[database]\nfsync_on_persist = {'true' if self.fsync else 'false'}\n\n"
            f'[storage]\ndirectory = "{self.data_dir}"\n{self.storage}\n'
            "[shutdown]\ngrace_period_s = 5.0\n\n" + self.extra
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        deadline = self._started + self.ready_timeout
        while not self._ready.wait(0.01):
            if self.process.poll() is not None:
                self._reader.join(2)
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready in {self.ready_timeout}s:\n{self.log_text()}")
        return self

    def _read_logs(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            now = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append((now, line))
            if not self._ready.is_set() and '"ready"' in line:
                event = parse(line)
                if event.get("event") == "ready":
                    self.kcp_port = event["kcp_port"]
                    self.grpc_port = event.get("grpc_port")
                    self.ready_seconds = now - self._started
                    self._ready.set()

    def events(self, name: str) -> list[dict]:
        needle = f'"{name}"'
        out = []
        for _, line in list(self.lines):
            if needle in line:
                event = parse(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def log_text(self, last: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-last:])

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, the clean shutdown path; SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server did not stop within {timeout}s after SIGTERM") from None
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def events_named(lines: Iterable[str], name: str) -> list[dict]:
    """The JSON log lines whose event is `name`, parsed (a cheap text filter first;
    the JSON decides, whatever the renderer's spacing)."""
    needle = f'"{name}"'
    out = []
    for line in lines:
        if needle in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
    return out


def parse(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
