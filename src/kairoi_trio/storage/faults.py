"""TEST ONLY: failures injected on the log's file operations.

`storage/log.py` and `storage/compaction.py` take `os` from here. In
production that is the `os` module itself, untouched: nothing here runs.

Only when the environment variable KAIROI_TEST_STORAGE_FAULTS names a file
(the disk-fault suite, tests/disk/, writes it) does `os` become a thin proxy
whose file operations first read that *fault plan* and may sleep, then raise
an OSError, instead of (or before) doing the real call. The plan is JSON:

    {
      "kairoi_test_storage_faults": 1,
      "faults": [
        {"op": "pwrite", "errno": "ENOSPC"},
        {"op": "fdatasync", "path": "segment-", "errno": "EIO", "times": 3},
        {"op": "fdatasync", "delay_s": 2.0}
      ]
    }

- `op`: pwrite, write, fdatasync, fsync, ftruncate, open, close, rename,
  replace, or "*" for all of them;
- `path` (optional): a substring of the file's path (for calls on a
  descriptor, the path it was opened with: /proc/self/fd);
- `errno` (optional): the error's name (ENOSPC, EROFS, EIO, EDQUOT...);
  without it the call is only delayed;
- `delay_s` (optional): sleep this long first (the calls run in worker
  threads, so this slows the storage, not the event loop);
- `times` (optional): at most this many hits, counted since the plan file
  last changed.

The first matching fault applies. The plan is re-read whenever the file
changes, so a test turns faults on and off while the server runs; a missing
file means no faults. A file without the marker key is ignored with a
warning, so that the variable set by mistake cannot fail a production server.
"""

from __future__ import annotations

import errno as errno_codes
import json
import os as os  # the real module; replaced by the proxy below only under test
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

ENV = "KAIROI_TEST_STORAGE_FAULTS"
MARKER = "kairoi_test_storage_faults"
OPS = frozenset(
    ("pwrite", "write", "fdatasync", "fsync", "ftruncate", "open", "close", "rename", "replace")
)

_real = os


@dataclass(frozen=True, slots=True)
class Fault:
    op: str
    path: str = ""
    errno: int | None = None
    delay_s: float = 0.0
    times: int | None = None


def parse_plan(text: str) -> list[Fault]:
    """The faults of a plan file's text. Raises ValueError if it is not a valid plan."""
    plan = json.loads(text)
    if not isinstance(plan, dict) or plan.get(MARKER) != 1:
        raise ValueError(f'not a fault plan (it lacks "{MARKER}": 1)')
    faults = []
    for entry in plan.get("faults", []):
        op = entry["op"]
        if op != "*" and op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        name = entry.get("errno")
        code = getattr(errno_codes, name) if name is not None else None
        times = entry.get("times")
        faults.append(
            Fault(op, str(entry.get("path", "")), code, float(entry.get("delay_s", 0.0)), times)
        )
    return faults


class FaultyOs:
    """The os module, with the file operations the log uses checked against a fault plan."""

    def __init__(self, plan_path: str) -> None:
        self._plan_path = plan_path
        self._lock = threading.Lock()  # appends, rotations and snapshots run in worker threads
        self._stamp: tuple[int, int, int] | None = None
        self._faults: list[Fault] = []
        self._hits: list[int] = []
        self._warned = False

    def __getattr__(self, name: str) -> Any:
        return getattr(_real, name)

    def _load(self) -> None:
        try:
            st = _real.stat(self._plan_path)
        except FileNotFoundError:
            self._stamp, self._faults, self._hits = None, [], []
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self._plan_path, encoding="utf-8") as f:
                self._faults = parse_plan(f.read())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self._faults = []
            if not self._warned:
                self._warned = True
                log.warning("storage fault plan ignored", path=self._plan_path, error=str(error))
        self._hits = [0] * len(self._faults)

    def _check(self, op: str, path: str) -> None:
        with self._lock:
            self._load()
            for i, fault in enumerate(self._faults):
                if fault.op not in (op, "*") or fault.path not in path:
                    continue
                if fault.times is not None and self._hits[i] >= fault.times:
                    continue
                self._hits[i] += 1
                break
            else:
                return
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.errno is not None:
            raise OSError(fault.errno, f"{_real.strerror(fault.errno)} (injected)", path)

    @staticmethod
    def _fd_path(fd: int) -> str:
        try:
            return _real.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return f"fd {fd}"

    def _on_fd(self, op: str, fd: int) -> None:
        self._check(op, self._fd_path(fd))

    # -- the calls ----------------------------------------------------------------

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        self._on_fd("pwrite", fd)
        return _real.pwrite(fd, data, offset)

    def write(self, fd: int, data: Any) -> int:
        self._on_fd("write", fd)
        return _real.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        self._on_fd("fdatasync", fd)
        _real.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self._on_fd("fsync", fd)
        _real.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self._on_fd("ftruncate", fd)
        _real.ftruncate(fd, length)

    def close(self, fd: int) -> None:
        try:
            self._on_fd("close", fd)
        finally:  # as close(2) on Linux: the descriptor is released even when it fails
            _real.close(fd)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        self._check("open", str(_real.fspath(path)))
        return _real.open(path, flags, mode, **kwargs)

    def rename(self, src: Any, dst: Any) -> None:
        self._check("rename", str(_real.fspath(src)))
        _real.rename(src, dst)

    def replace(self, src: Any, dst: Any) -> None:
        self._check("replace", str(_real.fspath(src)))
        _real.replace(src, dst)


def _install(environ: dict[str, str] | Any = _real.environ) -> FaultyOs | None:
    plan = environ.get(ENV)
    return FaultyOs(plan) if plan else None


_faulty = _install()
ENABLED = _faulty is not None
if _faulty is not None:
    os = _faulty  # type: ignore[assignment]  # test only: see the module docstring


def describe() -> str | None:
    """For the start-up log: the fault plan in use, or None (always None in production)."""
    return _faulty._plan_path if _faulty is not None else None
