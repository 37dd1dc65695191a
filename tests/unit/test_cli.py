"""The command line, run as a user runs it: `python -m kairoi_trio ...` in a subprocess.

Every invocation is started at once by a module fixture (each one spends most of
its time importing), and the tests check their results.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kairoi_trio import __version__


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path


BAD_CONFIGS = {
    "unknown-key": ("[controller]\nlisten_addr = '127.0.0.1:1'\n", ["listen_addr"]),
    "invalid-toml": ("[controller\nlisten = '127.0.0.1:1'\n", ["invalid TOML"]),
}

GOOD_CONFIG = (
    "[log]\nlevel = 'debug'\n[controller]\nlisten = '127.0.0.1:0'\n"
    "[database]\nfsync_on_persist = false\nframerate = 512\n"
)

# name -> (arguments, files to write in its working directory)
RUNS: dict[str, tuple[list[str], dict[str, bytes]]] = {
    "version": (["--version"], {}),
    "help": (["--help"], {}),
    "missing": (["serve", "-c", "missing.toml"], {}),
    "latin1": (["serve", "-c", "latin1.toml"], {"latin1.toml": b"# caf\xe9\n[log]\n"}),
    "check-good": (["check-config", "-c", "good.toml"], {"good.toml": GOOD_CONFIG.encode()}),
    "check-bad": (
        ["check-config", "-c", "bad.toml"],
        {"bad.toml": b"[runners.shell]\nconcurrency = 0\n"},
    ),
    **{
        f"serve-{case}": (["serve", "-c", "bad.toml"], {"bad.toml": text.encode()})
        for case, (text, _) in BAD_CONFIGS.items()
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    started = {}
    for name, (args, files) in RUNS.items():
        cwd = tmp_path_factory.mktemp(name)
        for file_name, content in files.items():
            (cwd / file_name).write_bytes(content)
        process = subprocess.Popen(
            [sys.executable, "-m", "kairoi_trio", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[name] = (process, cwd)
    results = {}
    for name, (process, cwd) in started.items():
        try:
            # a bad config must stop the server at once, not serve
            stdout, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
        results[name] = Run(process.returncode, stdout, stderr, cwd)
    return results


def assert_one_line_error(result: Run, *named: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0]


def test_version(runs: dict[str, Run]) -> None:
    result = runs["version"]
    assert result.returncode == 0
    assert result.stdout.strip() == f"kairoi-trio {__version__}"
    # the package's metadata (pip show, the wheel) reads the same constant
    assert importlib.metadata.version("kairoi-trio") == __version__


def test_help(runs: dict[str, Run]) -> None:
    result = runs["help"]
    assert result.returncode == 0
    assert "serve" in result.stdout
    assert "check-config" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_serve_with_a_bad_config_exits_with_one_line(runs: dict[str, Run], case: str) -> None:
    result = runs[f"serve-{case}"]
    assert_one_line_error(result, *BAD_CONFIGS[case][1])
    assert not (result.cwd / "kairoi-data").exists()  # nothing started


def test_serve_with_a_missing_config_exits_with_one_line(runs: dict[str, Run]) -> None:
    result = runs["missing"]
    assert_one_line_error(result, "missing.toml")
    assert not (result.cwd / "kairoi-data").exists()


def test_serve_with_a_config_that_is_not_utf8_exits_with_one_line(runs: dict[str, Run]) -> None:
    assert_one_line_error(runs["latin1"], "latin1.toml")


def test_check_config_accepts_a_good_file(runs: dict[str, Run]) -> None:
    result = runs["check-good"]
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert not (result.cwd / "kairoi-data").exists()  # checking starts nothing


def test_check_config_rejects_a_bad_file(runs: dict[str, Run]) -> None:
    result = runs["check-bad"]
    assert_one_line_error(result, "runners.shell.concurrency")
    assert "valid" not in result.stdout


# A process started with some of 0, 1 and 2 closed: it opens the standard streams,
# then starts a program that exits 3 if any of 0, 1 and 2 is closed in it.
INHERITED = """
import subprocess, sys
from kairoi_trio.cli import open_standard_streams
open_standard_streams()
probe = "import os, sys; sys.exit(3 * (not all(map(os.path.exists, sys.argv[1:]))))"
fds = [f"/proc/self/fd/{fd}" for fd in (0, 1, 2)]
sys.exit(subprocess.run([sys.executable, "-c", probe, *fds]).returncode)
"""


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"])
def test_the_null_descriptors_of_closed_streams_reach_a_child_process(closed: str) -> None:
    """The /dev/null put on a closed descriptor is inherited, as daemon(3)'s is: a
    program started without its own (a script, a hook) finds 0, 1 and 2 open."""
    command = [sys.executable, "-c", INHERITED]
    result = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", *command], timeout=30)
    assert result.returncode == 0
