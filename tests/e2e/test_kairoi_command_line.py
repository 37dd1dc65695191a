"""Kairoi's configuration file and command line start kairoi-trio unchanged.

Each test starts the real server the way a Kairoi user started Kairoi (`-c FILE`,
`--config FILE`, no argument at all with ./configuration.toml beside it, a path
without its `.toml`), then checks it serves KCP on the port that file names,
which proves which file was read.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.kcp_client import KcpClient
from support.ports import free_port
from support.waiting import wait_for

# Kairoi's documented example (docs/configuration.md of Kairoi), every option set,
# with the levels and framerate Kairoi accepts.
KAIROI_FILE = """\
[log]
level = "{level}" # One of "trace", "debug", "info", "warn", "error" or "off".

[controller]
listen = "127.0.0.1:{port}"

[database]
fsync_on_persist = true
framerate = 512

# kairoi-trio's own listeners, on ports the OS picks, so that tests run side by side
[grpc]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
"""


class Started:
    def __init__(self, args: list[str], cwd: Path) -> None:
        self.cwd = cwd
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def answers_on(self, port: int) -> bool:
        """True once a KCP PING on `port` is answered; fails if the server exited."""

        def ping() -> bool:
            assert self.process.poll() is None, self.process.communicate()
            try:
                with KcpClient(port, timeout=2) as client:
                    return client.request("PING")[0] == "OK"
            except OSError:
                return False

        return wait_for(ping, timeout=30)

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as an init system stops it; returns (exit status, stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return self.process.returncode, stderr


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    started: list[Started] = []

    def run(*args: str, cwd: Path = tmp_path) -> Started:
        server = Started(list(args), cwd)
        started.append(server)
        return server

    yield run
    for server in started:
        server.process.kill()
        server.process.communicate()


def kairoi_file(directory: Path, name: str, level: str = "info") -> int:
    port = free_port()
    (directory / name).write_text(KAIROI_FILE.format(level=level, port=port))
    return port


@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_kairoi_flags_without_a_subcommand_start_the_server(
    tmp_path: Path, start, flag: str
) -> None:
    port = kairoi_file(tmp_path, "kairoi.toml")
    server = start(flag, "kairoi.toml")
    assert server.answers_on(port)
    status, _ = server.stop()
    assert status == 0
    assert (tmp_path / "kairoi-data").is_dir()  # Kairoi's default: relative to the working dir


def test_no_argument_reads_configuration_toml_in_the_working_directory(
    tmp_path: Path, start
) -> None:
    port = kairoi_file(tmp_path, "configuration.toml")
    server = start()
    assert server.answers_on(port)
    assert server.stop()[0] == 0


def test_a_path_without_its_toml_extension_is_found(tmp_path: Path, start) -> None:
    port = kairoi_file(tmp_path, "production.toml")
    server = start("-c", "production")
    assert server.answers_on(port)
    assert server.stop()[0] == 0


def test_an_existing_file_without_extension_is_read_as_given(tmp_path: Path, start) -> None:
    port = kairoi_file(tmp_path, "kairoi.conf")
    kairoi_file(tmp_path, "kairoi.toml")  # config-rs reads the exact name first
    server = start("serve", "--config", "kairoi.conf")
    assert server.answers_on(port)
    assert server.stop()[0] == 0


# Listens on 5678, as the README's quick start test does: never beside it on another
# xdist worker (one would fail to bind, or skip the other).
@pytest.mark.xdist_group("default_ports")
def test_no_file_at_all_runs_on_the_defaults(tmp_path: Path, start) -> None:
    """Kairoi's file is optional: the defaults listen on 127.0.0.1:5678."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5678)) == 0:
            pytest.skip("something (a developer's server?) already listens on 5678")
    server = start()
    assert server.answers_on(5678)
    assert server.stop()[0] == 0
    assert (tmp_path / "kairoi-data").is_dir()


def test_warn_level_hides_info_lines_and_off_hides_everything(tmp_path: Path, start) -> None:
    warn_dir, off_dir, info_dir = (tmp_path / n for n in ("warn", "off", "info"))
    for directory in (warn_dir, off_dir, info_dir):
        directory.mkdir()
    ports = {
        level: kairoi_file(directory, "configuration.toml", level)
        for level, directory in (("warn", warn_dir), ("off", off_dir), ("info", info_dir))
    }
    servers = {
        "warn": start(cwd=warn_dir),
        "off": start(cwd=off_dir),
        "info": start(cwd=info_dir),
    }
    for level, server in servers.items():
        assert server.answers_on(ports[level])
        with KcpClient(ports[level]) as client:
            # a job no rule matches: fails, with a warning-or-higher line in the log
            assert client.request("SET", "nobody.1", "2000-01-01 00:00:00") == ["OK"]
    stderr = {}
    for level, server in servers.items():
        status, stderr[level] = server.stop()
        assert status == 0, stderr[level]
    assert "ready" in stderr["info"]  # the start-up line is info
    assert "ready" not in stderr["warn"]
    assert stderr["off"] == ""


def test_version_short_flag() -> None:
    from kairoi_trio import __version__

    result = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "-V"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"kairoi-trio {__version__}"


@pytest.mark.parametrize("framerate", ["0", "-1", "65536", "'512'"])
def test_framerates_kairoi_refuses_are_refused(tmp_path: Path, framerate: str) -> None:
    (tmp_path / "configuration.toml").write_text(f"[database]\nframerate = {framerate}\n")
    result = subprocess.run(
        [sys.executable, "-m", "kairoi_trio"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "database.framerate" in result.stderr
    assert not (tmp_path / "kairoi-data").exists()


def test_a_missing_config_file_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    """Kairoi ran on the defaults when -c named no file; kairoi-trio refuses (on purpose)."""
    result = subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "-c", "typo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "typo" in result.stderr and "typo.toml" in result.stderr
    assert not (tmp_path / "kairoi-data").exists()
