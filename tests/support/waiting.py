"""Polling helpers for end-to-end tests (the server works asynchronously)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 15.0,
    interval: float = 0.02,
) -> T:
    """Poll until predicate() is truthy; return its value or fail with the last one.

    The value returned is true: never the predicate's None or False (typed so, for a
    predicate like `lambda: ready() and value` or one that gives None until done)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s (last value {value!r})")
        time.sleep(interval)
