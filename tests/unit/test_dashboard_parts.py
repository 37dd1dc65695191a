"""The dashboard's pure parts: the per-minute ring, payload previews, rule pairing, charts."""

from __future__ import annotations

from kairoi_trio.observability.samples import MinuteRing
from kairoi_trio.protocols.http.charts import bar_chart
from kairoi_trio.protocols.http.dashboard import (
    MAX_BACK_CHARS,
    _bounded_back,
    _local,
    payload_preview,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ring_counts_per_minute_and_forgets_after_an_hour() -> None:
    clock = Clock(600 * 60 + 5)  # minute 600
    ring = MinuteRing(clock)
    ring.record("set", 3)
    ring.record_lateness([0.5])
    ring.record_lateness([1.5])
    clock.now += 60  # minute 601
    ring.record("set")
    ring.record("failed", 2)
    series = ring.series()
    assert len(series) == 60 and series[-1].minute == 601 and series[-2].minute == 600
    assert series[-2].counts["set"] == 3 and series[-1].counts["set"] == 1
    assert series[-1].counts["failed"] == 2
    assert series[-2].lateness_mean_s == 1.0 and series[-2].lateness_max_s == 1.5
    assert series[-1].lateness_count == 0
    clock.now += 59 * 60  # minute 660: minute 600 left the hour, 601 is the oldest
    assert [b.minute for b in ring.series()][0] == 601
    assert ring.series()[0].counts["set"] == 1
    ring.record("set", 7)  # minute 660 takes minute 600's slot: counted afresh
    assert ring.series()[-1].counts["set"] == 7
    clock.now += 2 * 3600  # a long quiet spell: every minute shown is empty
    assert all(b.counts["set"] == 0 for b in ring.series())


def test_payload_preview_text_binary_and_cut() -> None:
    assert payload_preview(b"").kind == "empty"
    text = payload_preview("<b>é</b>".encode())
    assert (text.kind, text.text, text.size, text.truncated) == ("text", "<b>é</b>", 9, False)
    binary = payload_preview(bytes(range(40)))
    assert binary.kind == "binary" and binary.text.startswith("00000000  00 01 02")
    assert payload_preview(b"\xff\xfe").kind == "binary"  # not UTF-8
    assert payload_preview(b"a\x00b").kind == "binary"  # a control character
    long = payload_preview(b"x" * 5000)
    assert long.truncated and len(long.text) == 2048 and long.size == 5000
    big_binary = payload_preview(b"\x00" * 1000)
    assert big_binary.truncated and big_binary.text.count("\n") == 15  # 256 bytes, 16 a line


def test_chart_says_its_figures_and_escapes_its_title() -> None:
    svg = str(bar_chart("<jobs>", [0, 2, 4]))
    assert 'aria-label="&lt;jobs&gt;, last 3 minutes: peak 4, last minute 4, total 6"' in svg
    assert svg.count("<rect") == 2  # no bar for a zero
    assert "<jobs>" not in svg


def test_login_returns_only_to_this_site() -> None:
    assert _local("/jobs?prefix=a") == "/jobs?prefix=a"
    for target in ("https://evil.example/", "//evil.example/", "/\\evil", "javascript:x"):
        assert _local(target) == "/"


def test_the_previous_pages_stack_keeps_its_newest_tokens_within_bounds() -> None:
    assert _bounded_back(["", "a.1", "a.2"]) == ["", "a.1", "a.2"]
    long = "x" * (MAX_BACK_CHARS // 3)
    kept = _bounded_back(["", long + "1", long + "2", long + "3", "last"])
    assert kept[-1] == "last" and kept[0] != ""  # the oldest went first
    assert sum(len(token) for token in kept) <= MAX_BACK_CHARS
    assert _bounded_back(["y" * (MAX_BACK_CHARS + 1)]) == []  # one token too long: none
