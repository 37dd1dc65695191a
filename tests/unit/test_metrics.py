"""observability/metrics.py: the bounded `prefix` label of jobs failed without a run."""

from __future__ import annotations

from prometheus_client import generate_latest

from kairoi_trio.core.failures import MAX_PREFIX_CHARS, FailReason, job_prefix
from kairoi_trio.observability.metrics import (
    NO_PREFIX,
    OTHER_PREFIX,
    REGISTRY,
    MetricsObserver,
    PrefixLabels,
    Readiness,
)


def test_the_prefix_is_the_id_up_to_its_last_dot() -> None:
    assert job_prefix("app.invoice.42") == "app.invoice."
    assert job_prefix("app.") == "app."
    assert job_prefix("orphan") == ""
    assert job_prefix("x" * 500 + ".1") == "x" * MAX_PREFIX_CHARS


def test_prefix_labels_are_bounded_with_an_other_bucket() -> None:
    labels = PrefixLabels(limit=3)
    assert [labels(f"p{i}.job") for i in range(5)] == ["p0.", "p1.", "p2.", OTHER_PREFIX, "other"]
    assert labels("p1.again") == "p1."  # a prefix already seen keeps its label
    assert PrefixLabels()("no-dot") == NO_PREFIX


def test_failed_without_run_is_exported_by_reason_and_prefix() -> None:
    observer = MetricsObserver()
    for i in range(3):
        observer.failed_without_run(FailReason.NO_RULE, f"test.metrics.unmatched.{i}")
    observer.failed_without_run(FailReason.STALE, "test.metrics.stale.1")
    text = generate_latest(REGISTRY).decode()
    series = "kairoi_jobs_failed_without_run_total"
    assert f'{series}{{prefix="test.metrics.unmatched.",reason="no_rule"}} 3.0' in text
    assert f'{series}{{prefix="test.metrics.stale.",reason="stale"}} 1.0' in text


def test_readiness_is_lost_while_writes_fail_and_when_stopping() -> None:
    readiness = Readiness()
    seen: list[bool] = []
    readiness.listen(seen.append)
    assert readiness.ready and readiness.reason() is None
    readiness.storage(False, "no space left on device (disk full) [ENOSPC]")
    readiness.storage(False, "still full [ENOSPC]")  # no change: listeners not called again
    assert readiness.reason() == "storage writes fail: still full [ENOSPC]"
    readiness.storage(True)
    assert readiness.ready
    readiness.stopping()
    assert readiness.reason() == "shutting down"
    readiness.storage(False, "EIO")
    assert seen == [False, True, False]


def test_the_observer_feeds_the_storage_metrics_and_readiness() -> None:
    readiness = Readiness()
    observer = MetricsObserver(readiness)
    observer.write_failed("trigger")
    observer.writable(False, "read-only file system [EROFS]")
    text = generate_latest(REGISTRY).decode()
    assert "kairoi_storage_writable 0.0" in text
    assert 'kairoi_storage_write_failures_total{what="trigger"}' in text
    assert readiness.reason() == "storage writes fail: read-only file system [EROFS]"
    observer.writable(True, "")
    assert readiness.ready
    assert "kairoi_storage_writable 1.0" in generate_latest(REGISTRY).decode()
