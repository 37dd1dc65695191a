"""Lines for the end of the run's report (the seeds and figures of the crash, fuzz and
disk suites), whichever process ran the test.

Under pytest-xdist the tests run in worker processes, which have no terminal: each
worker hands what it gathered to the controller when it finishes (tests/conftest.py),
and the controller prints it all. Counts are summed over the workers.
"""

from __future__ import annotations

#: (suite, text) in the order they were reported, e.g. ("crash suite", "seed 1: ...").
LINES: list[tuple[str, str]] = []
#: (suite, format with one {}) -> count, e.g. ("disk faults", "{} faults injected").
COUNTS: dict[tuple[str, str], int] = {}


def line(suite: str, text: str) -> None:
    LINES.append((suite, text))


def count(suite: str, template: str, n: int = 1) -> None:
    COUNTS[suite, template] = COUNTS.get((suite, template), 0) + n


def export() -> dict:
    """What a worker sends to the controller (plain data: it crosses execnet)."""
    return {
        "lines": [list(entry) for entry in LINES],
        "counts": [[suite, template, n] for (suite, template), n in COUNTS.items()],
    }


def merge(exported: dict) -> None:
    for suite, text in exported.get("lines", []):
        line(suite, text)
    for suite, template, n in exported.get("counts", []):
        count(suite, template, n)


def rendered() -> list[str]:
    """Each suite's counts, then its lines, suites in the order first reported."""
    suites = list(dict.fromkeys([s for s, _ in COUNTS] + [s for s, _ in LINES]))
    out = []
    for suite in suites:
        out += [f"{suite}: {t.format(n)}" for (s, t), n in COUNTS.items() if s == suite and n]
        out += [f"{suite}: {text}" for s, text in LINES if s == suite]
    return out
