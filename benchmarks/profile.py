"""py-spy around a benchmark phase, and a summary of its collapsed stacks.

`Profiler(pid, path)` runs `py-spy record --format raw` on the server while a
phase runs; `top(path)` turns the collapsed stacks into the functions with the
most samples on top of the stack (self) and anywhere in it (inclusive).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, path: Path, *, rate: int = 250, idle: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)  # py-spy does not make it
        exe = py_spy()
        self.process: subprocess.Popen[bytes] | None = None
        if exe is None:
            print("py-spy not found: no profile", file=sys.stderr)
            return
        argv = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            str(path),
            "--threads",
            "--nonblocking",
        ]
        if idle:
            argv.append("--idle")
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> Path | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return None
        if not self.path.exists():
            print(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
            return None
        return self.path


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})"


def _strip_line(name: str) -> str:
    return name.rsplit(":", 1)[0] + ")" if ":" in name else name


def top(path: Path, limit: int = 40) -> dict:
    """Shares of the samples (busy threads only) by function and by line.

    `self_lines`: where the time is spent (top of the stack, with line numbers);
    `self`: the same summed by function; `inclusive`: functions anywhere in the stack."""
    own_lines: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith(("thread (", "process ")):
            frames = frames[1:]
        if not frames:
            continue
        total += count
        leaf = _frame_name(frames[-1])
        own_lines[leaf] += count
        own[_strip_line(leaf)] += count
        seen = set()
        for frame in frames:
            name = _strip_line(_frame_name(frame))
            if name not in seen:
                seen.add(name)
                inclusive[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, n / total) for name, n in counter.most_common(limit)] if total else []

    return {
        "samples": total,
        "self": shares(own),
        "self_lines": shares(own_lines),
        "inclusive": shares(inclusive),
    }
