"""Prometheus metrics and readiness (served by protocols/http/health.py: /metrics, /ready).

Hot paths do not touch metric objects per command: counts that the actor and
the pools keep anyway (jobs by status, commands, queue depths) are read at
scrape time by a collector. Only per-run and per-commit observations (trigger
lateness, run duration, fsync latency) are histograms fed as they happen.

/ready means "can accept writes" (`Readiness`): 503 naming the failing check while the
last write to the log failed (ready again after the next successful one; the
actor probes the log when idle) and once shutdown began. The gRPC health
service follows the same Readiness.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kairoi_trio.core.actor import Observer
from kairoi_trio.core.failures import FailReason, job_prefix
from kairoi_trio.observability.samples import SAMPLES

log = structlog.get_logger(__name__)

REGISTRY = CollectorRegistry()


class _Buckets:
    """One series of a LoopHistogram: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """One observation (seconds); a value on a bound counts in that bound's
        bucket (le: less than or equal), as in prometheus_client."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class LoopHistogram(Collector):
    """A Prometheus histogram counted in plain lists by its one writer, the event loop.

    prometheus_client's Histogram takes a lock for a bucket and one for the sum at
    every observe (~3 µs; the server observes once per trigger and once per run);
    here an observation is a bisect and two additions (~0.5 µs). It is exported
    through the library's collector interface (HistogramMetricFamily) with the same
    name, help, labels, bucket bounds and `le` texts as a Histogram would have
    (tests/unit/test_metrics_histogram.py compares the two); only the `_created`
    samples are left out. Observe from the event loop only; a scrape from another
    thread may see one observation half counted, never a torn value.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Iterable[float],
        labelnames: tuple[str, ...] = (),
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = sorted(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], _Buckets] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Buckets:
        """The series for these label values (created empty on first use)."""
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, not {values}")
            series = self._series[values] = _Buckets(self.bounds)
        return series

    def observe(self, value: float) -> None:
        """One observation into the unlabelled series."""
        self.labels().observe(value)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        for values, series in self._series.items():
            cumulative, buckets = 0, []
            for le, count in zip(self._le, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, series.total)
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))


TRIGGER_LATENESS = LoopHistogram(
    "kairoi_trigger_lateness_seconds",
    "Time from a job's execute_at to its hand-off to a runner (a job triggered ahead of its"
    " time, jobs.fire_ahead_s, counts when handed out; jobs overdue at start-up do not count)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
)
_TRIGGER_LATENESS_SERIES = TRIGGER_LATENESS.labels()
APPEND_SECONDS = Histogram(
    "kairoi_log_append_seconds",
    "Duration of one group commit (write + fsync)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
RUN_SECONDS = LoopHistogram(
    "kairoi_run_duration_seconds",
    "Duration of job runs",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
    labelnames=("kind", "outcome"),
)
STORAGE_FAILURES = Counter(
    "kairoi_storage_failures", "Group commits that failed to write", registry=REGISTRY
)
STORAGE_WRITE_FAILURES = Counter(
    "kairoi_storage_write_failures",
    "Writes to the log that failed, by what they were for (one per kind per failed group "
    "commit; compaction: a failed rotation or snapshot)",
    ["what"],
    registry=REGISTRY,
)
WRITE_KINDS = ("client", "trigger", "outcome", "retention", "probe", "compaction")
for _what in WRITE_KINDS:  # every series exists from the start, at 0
    STORAGE_WRITE_FAILURES.labels(_what)
STORAGE_WRITABLE = Gauge(
    "kairoi_storage_writable",
    "1 while writes to the log succeed; 0 from a failed write until the next successful one",
    registry=REGISTRY,
)
STORAGE_WRITABLE.set(1)
JOBS_SET = Counter(
    "kairoi_jobs_set",
    "Jobs set (created or replaced, one-shot or recurring) by every front end, once written",
    registry=REGISTRY,
)
FAILED_WITHOUT_RUN = Counter(
    "kairoi_jobs_failed_without_run",
    "Jobs the scheduler failed itself (no rule matches, stale, no runner, error), by job prefix",
    ["reason", "prefix"],
    registry=REGISTRY,
)

# At most this many distinct prefixes get their own series; later ones count as
# OTHER_PREFIX, so a flood of unrelated ids cannot blow up the metric's size.
MAX_PREFIX_LABELS = 100
OTHER_PREFIX = "other"
NO_PREFIX = "(none)"  # ids without a "."


class PrefixLabels:
    """The `prefix` label of a job id: core.failures.job_prefix (up to the last
    ".", at most 64 characters), "(none)" without a ".", and "other" once
    `limit` distinct prefixes have been seen (for the life of the process)."""

    def __init__(self, limit: int = MAX_PREFIX_LABELS) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, job_id: str) -> str:
        prefix = job_prefix(job_id) or NO_PREFIX
        if prefix in self._seen:
            return prefix
        if len(self._seen) >= self._limit:
            return OTHER_PREFIX
        self._seen.add(prefix)
        return prefix


class _StateCollector(Collector):
    """Reads the live counters of the running server at scrape time."""

    def __init__(self, read: Callable[[], dict[str, object]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        values = self._read()
        jobs = GaugeMetricFamily("kairoi_jobs", "Jobs by status", labels=["status"])
        for status, count in values["jobs_by_status"].items():  # type: ignore[attr-defined]
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily("kairoi_rules", "Rules", value=values["rules"])  # type: ignore[arg-type]
        yield CounterMetricFamily(
            "kairoi_commands",
            "Commands applied by the actor",
            value=values["commands"],  # type: ignore[arg-type]
        )
        yield CounterMetricFamily(
            "kairoi_group_commits",
            "Batches applied by the actor",
            value=values["batches"],  # type: ignore[arg-type]
        )
        queue = GaugeMetricFamily("kairoi_runner_queue_depth", "Jobs waiting", labels=["kind"])
        running = GaugeMetricFamily("kairoi_runner_running", "Jobs running", labels=["kind"])
        for kind, (queued, active) in values["pools"].items():  # type: ignore[attr-defined]
            queue.add_metric([kind], queued)
            running.add_metric([kind], active)
        yield queue
        yield running
        unrecorded = GaugeMetricFamily(
            "kairoi_runner_outcomes_unrecorded",
            "Outcomes of finished runs not yet written to the log (kept and retried while "
            "storage writes fail); their jobs stay triggered meanwhile",
            labels=["kind"],
        )
        for kind, count in values.get("outcomes_unrecorded", {}).items():  # type: ignore[attr-defined]
            unrecorded.add_metric([kind], count)
        yield unrecorded
        yield GaugeMetricFamily(
            "kairoi_kcp_connections",
            "Open KCP connections",
            value=values["kcp_connections"],  # type: ignore[arg-type]
        )
        yield GaugeMetricFamily(
            "kairoi_grpc_connections",
            "Open gRPC connections",
            value=values["grpc_connections"],  # type: ignore[arg-type]
        )


def register_state(read: Callable[[], dict[str, object]]) -> None:
    REGISTRY.register(_StateCollector(read))


class Readiness:
    """Whether the server can accept writes: what /ready answers and gRPC health says.

    Not ready from a failed write to the log until the next successful one, and
    once shutdown began. `listen` callbacks are called (in the Trio thread) with
    the new value each time it changes.
    """

    def __init__(self) -> None:
        self._storage_error: str | None = None
        self._stopping = False
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def ready(self) -> bool:
        return self.reason() is None

    def reason(self) -> str | None:
        """Why the server is not ready (one short line), or None when it is."""
        for reason in self.checks().values():
            if reason is not None:
                return reason
        return None

    def checks(self) -> dict[str, str | None]:
        """Each check by name ("shutdown", "storage"), with why it fails or None,
        the first failing one first as `reason` reports it: what /ready's body lists."""
        return {
            "shutdown": "shutting down" if self._stopping else None,
            "storage": (
                f"storage writes fail: {self._storage_error}"
                if self._storage_error is not None
                else None
            ),
        }

    def storage(self, ok: bool, error: str = "") -> None:
        """Writes to the log work (ok) or fail with `error`."""
        before = self.ready
        self._storage_error = None if ok else (error or "unknown error")
        self._notify(before)

    def stopping(self) -> None:
        before = self.ready
        self._stopping = True
        self._notify(before)

    def listen(self, callback: Callable[[bool], None]) -> None:
        self._listeners.append(callback)

    def _notify(self, before: bool) -> None:
        now = self.ready
        if now == before:
            return
        for callback in list(self._listeners):
            try:
                callback(now)
            except Exception:
                log.exception("readiness listener failed")


class MetricsObserver(Observer):
    """The actor's hooks, fed into the metrics above and into `readiness`."""

    def __init__(self, readiness: Readiness | None = None) -> None:
        self._prefix = PrefixLabels()
        self._failed_series: dict[tuple[FailReason, str], Counter] = {}
        self._readiness = readiness

    def appended(self, seconds: float, records: int) -> None:
        APPEND_SECONDS.observe(seconds)

    def append_failed(self) -> None:
        STORAGE_FAILURES.inc()

    def write_failed(self, what: str) -> None:
        STORAGE_WRITE_FAILURES.labels(what).inc()

    def writable(self, ok: bool, reason: str) -> None:
        STORAGE_WRITABLE.set(1 if ok else 0)
        if self._readiness is not None:
            self._readiness.storage(ok, reason)

    def triggered(self, lateness_s: list[float]) -> None:
        observe = _TRIGGER_LATENESS_SERIES.observe
        late = [lateness if lateness > 0.0 else 0.0 for lateness in lateness_s]
        for lateness in late:
            observe(lateness)
        SAMPLES.record_lateness(late)  # the dashboard's last hour
        SAMPLES.record("triggered", len(late))

    def jobs_set(self, count: int) -> None:
        JOBS_SET.inc(count)  # a batch's count: one lock a group commit, not a job
        SAMPLES.record("set", count)

    def failed_without_run(self, reason: FailReason, job_id: str) -> None:
        key = (reason, self._prefix(job_id))
        series = self._failed_series.get(key)
        if series is None:  # .labels() takes a lock: once per series, not per job
            series = self._failed_series[key] = FAILED_WITHOUT_RUN.labels(reason.value, key[1])
        series.inc()
        SAMPLES.record("failed")


_RUN_SERIES: dict[tuple[str, bool], _Buckets] = {}


def observe_run(kind: str, ok: bool, seconds: float) -> None:
    """One run of `kind` ended (ok: executed, else failed) after `seconds`; from the
    event loop only (LoopHistogram)."""
    series = _RUN_SERIES.get((kind, ok))
    if series is None:
        series = _RUN_SERIES[kind, ok] = RUN_SECONDS.labels(kind, "executed" if ok else "failed")
    series.observe(seconds)
    SAMPLES.record("executed" if ok else "failed")
