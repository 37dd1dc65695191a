"""SVG charts drawn by the server (no JavaScript, no chart library): the dashboard's
per-minute series of the last hour (observability/samples.py).

Each chart is an `<svg role="img">` with an `aria-label` that says in words what
it shows (total, peak, last minute), so a screen reader gets the figures the
bars show. Colours come from classes styled in static/dashboard.css (the
Content-Security-Policy allows no inline style).
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

WIDTH = 600  # viewBox units; the SVG scales to its box (CSS: width 100%)
HEIGHT = 120
TOP = 14  # room for the peak's label


def bar_chart(
    title: str, values: Sequence[float], *, unit: str = "", css: str = "", digits: int = 0
) -> Markup:
    """One bar per value, oldest first (the last is the current minute).

    title: what is counted ("jobs set per minute"); unit: appended to figures
    ("s"); digits: decimals of the figures in the label. O(len(values)).
    """
    peak = max(values, default=0.0)
    total = sum(values)
    last = values[-1] if values else 0.0
    fmt = f"{{:,.{digits}f}}"
    label = (
        f"{title}, last {len(values)} minutes: peak {fmt.format(peak)}{unit}, "
        f"last minute {fmt.format(last)}{unit}"
        + (f", total {fmt.format(total)}{unit}" if not unit else "")
    )
    slot = WIDTH / max(len(values), 1)
    bars = []
    for index, value in enumerate(values):
        if value <= 0 or peak <= 0:
            continue
        height = max((HEIGHT - TOP) * value / peak, 1.0)
        bars.append(
            f'<rect x="{index * slot + 0.5:.1f}" y="{HEIGHT - height:.1f}" '
            f'width="{max(slot - 1, 1):.1f}" height="{height:.1f}"></rect>'
        )
    return Markup(
        f'<svg class="chart {escape(css)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'preserveAspectRatio="none" role="img" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>"
        f'<line class="axis" x1="0" y1="{HEIGHT - 0.5}" x2="{WIDTH}" y2="{HEIGHT - 0.5}"></line>'
        + "".join(bars)
        + f'<text x="2" y="11">peak {escape(fmt.format(peak))}{escape(unit)}</text>'
        "</svg>"
    )
