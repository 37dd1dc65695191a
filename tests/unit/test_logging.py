"""The server's log set-up: JSON lines and their timestamps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from kairoi_trio.observability.logging import UtcTimestamper


def test_the_timestamp_is_utc_iso_8601_with_microseconds() -> None:
    stamp = UtcTimestamper()
    for _ in range(3):  # the second's prefix is cached: the same answer each time
        before = datetime.now(UTC)
        text = stamp(None, "info", {})["timestamp"]
        after = datetime.now(UTC)
        assert len(text) == len("2026-11-30T05:04:13.000123Z") and text.endswith("Z")
        when = datetime.fromisoformat(text)
        assert before - timedelta(microseconds=1) <= when <= after
        time.sleep(0.3)


def test_the_cached_second_moves_on() -> None:
    stamp = UtcTimestamper()
    first = datetime.fromisoformat(stamp(None, "info", {})["timestamp"])
    time.sleep(1.1)
    second = datetime.fromisoformat(stamp(None, "info", {})["timestamp"])
    assert second - first >= timedelta(seconds=1.1)


PROGRAM = """
import structlog
from kairoi_trio.observability.logging import configure_logging
configure_logging("info", "json")
log = structlog.get_logger()
log.info("job run", job="a.1", ok=True, seconds=0.25, attempt=2, when=object())
log.debug("below the level")
log.warning("second", text="é\\nnewline")
"""


def test_json_lines_one_object_each_on_stderr() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True
    )
    first, second = (json.loads(line) for line in done.stderr.splitlines())
    assert first["event"] == "job run" and first["level"] == "info"
    assert (first["job"], first["ok"], first["seconds"], first["attempt"]) == ("a.1", True, 0.25, 2)
    assert first["when"].startswith("<object object at")  # what JSON cannot hold is its repr
    assert datetime.fromisoformat(first["timestamp"]) <= datetime.now(UTC)
    assert second["text"] == "é\nnewline" and second["level"] == "warning"
