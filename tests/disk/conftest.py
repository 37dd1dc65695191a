"""The disk-fault suite: a real server process on a disk that fills up or fails.

Two ways to break the disk under a running `kairoi-trio serve`:

- `tmpfs`: a real 2 MiB tmpfs mounted for the test (root, or CAP_SYS_ADMIN,
  is needed: the tests are skipped with the reason otherwise) holding the
  data directory, filled by the server's own writes and a filler file;
- `faults`: failures injected on the log's file operations through
  storage/faults.py, which the server enables only because this fixture sets
  KAIROI_TEST_STORAGE_FAULTS to the plan file it writes (test only).

Helpers read the server from outside, as an operator would: KCP, gRPC health,
/ready and /metrics, the JSON log lines, and files the job scripts write.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from disk.faulty import FaultPlan
from support.server import ServerProcess

from kairoi_trio.storage import faults


@pytest.fixture
def fault_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FaultPlan:
    """An empty plan, named in the environment of the servers this test starts."""
    plan = FaultPlan(tmp_path / "faults.json")
    monkeypatch.setenv(faults.ENV, str(plan.path))
    return plan


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra TOML config; all are killed at the end of the test."""
    started: list[ServerProcess] = []

    def make(extra_config: str = "", name: str = "server", data_dir: Path | None = None):
        server = ServerProcess(tmp_path / name, extra_config)
        if data_dir is not None:
            server.data_dir = data_dir
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the disk-full test runs as root in CI)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
