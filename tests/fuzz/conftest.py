"""Options of the fuzz suites: the seed and how long the time-bounded fuzzers run.

    KAIROI_FUZZ_SEED=1234 KAIROI_FUZZ_SECONDS=300 pytest tests/fuzz
    pytest tests/fuzz --fuzz-seed 1234 --fuzz-seconds 300

The options exist only when tests/fuzz is named on the command line; the
variables work always. The seed is random unless given and is printed, in the
summary too, so that a run can be replayed (the network fuzz exactly as far as
thread timing allows; atheris from the same seed and corpus).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable

import pytest
from support import summary


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fuzz", "fuzz suites (tests/fuzz)")
    group.addoption("--fuzz-seed", type=int, default=None, help="seed to replay")
    group.addoption(
        "--fuzz-seconds", type=float, default=None, help="run each time-bounded fuzzer this long"
    )


def _setting(config: pytest.Config, option: str, variable: str, kind: type) -> object:
    value = config.getoption(option, default=None)
    if value is None and os.environ.get(variable):
        value = kind(os.environ[variable])
    return value


@pytest.fixture(scope="session")
def fuzz_seed(pytestconfig: pytest.Config) -> int:
    seed = _setting(pytestconfig, "--fuzz-seed", "KAIROI_FUZZ_SEED", int)
    return random.randrange(2**31) if seed is None else int(seed)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def fuzz_seconds(pytestconfig: pytest.Config) -> Callable[[float], float]:
    """default -> the duration to use (the option or variable wins)."""
    chosen = _setting(pytestconfig, "--fuzz-seconds", "KAIROI_FUZZ_SECONDS", float)
    return lambda default: default if chosen is None else float(chosen)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def fuzz_summary() -> Callable[[str], None]:
    """Adds a line to the end of the run's report ("fuzz suite: ..."; support/summary.py)."""
    return functools.partial(summary.line, "fuzz suite")
