"""The README's quick start works verbatim: its first shell block, run as a user pastes it.

It runs in a temporary directory that looks like the repository to the block
(`scripts/` and `.venv` are links to the real ones), so the server's
./kairoi-data is the test's own and a developer's store is never touched, and
with TMPDIR pointing into the test's directory. The block uses the default
ports, so the test is skipped when something already listens on them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORTS = (5678, 5679, 9678)


def quick_start_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no ```sh block in the README's quick start"
    return match.group(1)


# Listens on the default ports, as test_kairoi_command_line's defaults test does: never
# beside it on another xdist worker (one would fail to bind, or skip the other).
@pytest.mark.xdist_group("default_ports")
def test_the_readme_quick_start_runs_verbatim(tmp_path: Path) -> None:
    for port in DEFAULT_PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use (a developer's server?)")
    # serve.sh's setup must find the venv installed, not reinstall it from here
    subprocess.run([str(ROOT / "scripts" / "setup.sh")], check=True, timeout=600)
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("scripts", ".venv", "pyproject.toml"):
        (work / name).symlink_to(ROOT / name)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = tmp_path / "quickstart.sh"
    script.write_text(quick_start_block())
    process = subprocess.Popen(
        ["bash", "-e", str(script)],
        cwd=work,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the block's background server is in our group, killed below
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[:2] == ["1 OK", "2 OK"], stdout
    assert re.fullmatch(r'3 OK planned "\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"', lines[2]), stdout
    assert "ran app.invoice.42" in lines, stdout
    assert any(line.startswith("app.invoice.42") and "executed" in line for line in lines), stdout
    assert (work / "kairoi-data").is_dir()
    assert (scratch / "kairoi-quickstart.log").read_text() == "ran app.invoice.42\n"
