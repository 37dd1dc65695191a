"""Options of the crash-point suite: its seed and number of cycles.

    pytest tests/crash --crash-seed 1234 --crash-cycles 200
    KAIROI_CRASH_SEED=1234 KAIROI_CRASH_CYCLES=200 pytest        (from anywhere)

The options exist only when tests/crash is named on the command line (pytest
reads a sub-directory's options only then); the variables work always. The
seed is random unless given, and printed at the start, in the summary and in
every failure, so that a failing run can be replayed.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable

import pytest
from support import summary

DEFAULT_CYCLES = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("crash", "crash-point suite (tests/crash)")
    group.addoption("--crash-seed", type=int, default=None, help="seed to replay")
    group.addoption("--crash-cycles", type=int, default=None, help="SIGKILL cycles (20)")


def _setting(config: pytest.Config, option: str, variable: str) -> int | None:
    value = config.getoption(option, default=None)
    if value is None and os.environ.get(variable):
        value = int(os.environ[variable])
    return value


@pytest.fixture(scope="session")
def crash_seed(pytestconfig: pytest.Config) -> int:
    seed = _setting(pytestconfig, "--crash-seed", "KAIROI_CRASH_SEED")
    return random.randrange(2**32) if seed is None else seed


@pytest.fixture(scope="session")
def crash_cycles(pytestconfig: pytest.Config) -> int:
    cycles = _setting(pytestconfig, "--crash-cycles", "KAIROI_CRASH_CYCLES")
    return DEFAULT_CYCLES if cycles is None else cycles


@pytest.fixture(scope="session")
def crash_summary() -> Callable[[str], None]:
    """Adds a line to the end of the run's report ("crash suite: ..."; support/summary.py)."""
    return functools.partial(summary.line, "crash suite")
