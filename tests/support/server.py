"""Run `kairoi-trio serve` as a separate process, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from support import summary

READY_TIMEOUT_S = 30.0


class ServerProcess:
    """One server process with its own data directory and config.

    Ports are chosen by the OS (port 0) and read back from the JSON "ready" log
    line, so parallel test runs never collide.
    """

    def __init__(
        self,
        workdir: Path,
        extra_config: str = "",
        *,
        preexec_fn: Callable[[], None] | None = None,
        postgres_dsn: str | None = None,
    ) -> None:
        """preexec_fn: run in the child before the server starts (e.g. to set rlimits).
        postgres_dsn: run on the PostgreSQL store of that database instead of the log."""
        self.postgres_dsn = postgres_dsn
        self.workdir = workdir
        self.preexec_fn = preexec_fn
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.config_path = workdir / "configuration.toml"
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.kcp_port = 0
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        """The server process's id (once started)."""
        assert self.process is not None, "the server was not started"
        return self.process.pid

    def config_text(self) -> str:
        tables: dict[str, dict[str, str]] = {
            "log": {"level": '"info"', "format": '"json"'},
            "controller": {"listen": '"127.0.0.1:0"'},
            "grpc": {"listen": '"127.0.0.1:0"'},
            "http": {"listen": '"127.0.0.1:0"'},  # /metrics, /live, /ready, /api/v1
            "storage": {"directory": f'"{self.data_dir}"'},
            "shutdown": {"grace_period_s": "2.0"},
        }
        if self.postgres_dsn is not None:
            tables["storage"]["backend"] = '"postgres"'
            tables["storage.postgres"] = {"dsn": f'"{self.postgres_dsn}"'}
        for table, entries in _parse_tables(self.extra_config).items():
            tables.setdefault(table, {}).update(entries)  # the test's values win
        return "\n".join(
            f"[{table}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items())
            for table, entries in tables.items()
        )

    def start(self, *, wait_ready: bool = True) -> ServerProcess:
        """Start the server and, unless `wait_ready` is false, wait for its "ready" line."""
        # Server starts are most of the suite's CPU: the run's report counts them.
        summary.count("servers", "{} server processes started")
        self.config_path.write_text(self.config_text())
        self.lines = []
        self._ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", "serve", "-c", str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=self.preexec_fn,
        )
        threading.Thread(target=self._read_logs, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while wait_ready and not self._ready.wait(0.05):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready in {READY_TIMEOUT_S}s:\n{self.log_text()}")
        return self

    def _read_logs(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            event = self._parse(line)
            if event.get("event") == "ready":
                self.kcp_port = event["kcp_port"]
                self.grpc_port = event.get("grpc_port")
                self.metrics_port = event.get("metrics_port")
                self._ready.set()

    @staticmethod
    def _parse(line: str) -> dict:
        try:
            value = json.loads(line)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def events(self, name: str | None = None) -> list[dict]:
        parsed = [self._parse(line) for line in list(self.lines)]
        return [e for e in parsed if e and (name is None or e.get("event") == name)]

    def wait_events(
        self,
        name: str,
        where: Callable[[dict], bool] = lambda event: True,
        count: int = 1,
        timeout: float = 15.0,
    ) -> list[dict]:
        """The `name` events that `where` accepts, once there are at least `count`.

        The server writes its log from a thread, in batches (docs/operations.md):
        a "job run" line, logged before the run's outcome is recorded, may come a
        few milliseconds after a client sees that outcome."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if where(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    def wait_quiet(self, quiet_s: float = 0.1, timeout: float = 5.0) -> None:
        """Return once no log line has come for `quiet_s` (or after `timeout`): the
        lines the server logged before are out (its writer waits at most 5 ms)."""
        deadline = time.monotonic() + timeout
        seen, since = len(self.lines), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(quiet_s / 5)
            if len(self.lines) != seen:
                seen, since = len(self.lines), time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> ServerProcess:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        return self.start()


def _parse_tables(text: str) -> dict[str, dict[str, str]]:
    """A tiny reader for the tests' TOML snippets: [table] then key = value lines."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.strip().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = tables.setdefault(stripped[1:-1], {})
        elif "=" in stripped and current is not None:
            key, value = stripped.split("=", 1)
            current[key.strip()] = value.strip()
    return tables
