"""Helpers of the disk-fault suite: the fault plan file, and reading a server from outside."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from support import summary
from support.server import ServerProcess

from kairoi_trio.storage import faults


def figure(line: str) -> None:
    """A figure of the run, printed at the end of pytest's report ("disk faults: ...")."""
    summary.line("disk faults", line)


class FaultPlan:
    """The fault plan file a server under test reads (see storage/faults.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set()

    def set(self, *entries: dict[str, object]) -> None:
        """Replace the plan at once (written aside, then renamed over it)."""
        summary.count("disk faults", "{} faults injected", len(entries))  # over the whole run
        plan = {faults.MARKER: 1, "faults": list(entries)}
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.write_text(json.dumps(plan))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.set()


# -- reading the server from outside --------------------------------------------------


def http_get(server: ServerProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10
        ) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(server: ServerProcess, name: str) -> float:
    """One sample of /metrics, e.g. 'kairoi_storage_write_failures_total{what="trigger"}'."""
    _, text = http_get(server, "/metrics")
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


def failures(server: ServerProcess, what: str) -> float:
    return metric(server, f'kairoi_storage_write_failures_total{{what="{what}"}}')


def run_script(tmp_path: Path, seconds: float = 0.0) -> tuple[Path, Path]:
    """A shell rule's script that appends `<job id>` to a file per run; (script, file)."""
    runs = tmp_path / "runs.txt"
    script = tmp_path / "run.sh"
    pause = f"sleep {seconds}\n" if seconds else ""
    script.write_text(f'{pause}echo "$1" >> {runs}\n')
    runs.touch()
    return script, runs


def runs_of(runs: Path, job_id: str) -> int:
    return runs.read_text().split().count(job_id)
