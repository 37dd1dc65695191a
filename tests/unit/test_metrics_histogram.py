"""observability/metrics.py: LoopHistogram exports what prometheus_client's Histogram would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from kairoi_trio.observability.metrics import LoopHistogram

BUCKETS = (0.0005, 0.001, 0.01, 0.5, 1, 30)


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([("shell", "executed"), ("amqp", "failed"), ("amqp", "executed")]),
            st.one_of(
                st.sampled_from([0.0, *BUCKETS]),  # on a bound: counted in that bound's bucket
                st.floats(min_value=0, max_value=100, allow_nan=False),
            ),
        ),
        max_size=50,
    )
)
def test_the_same_observations_give_the_same_text(
    observations: list[tuple[tuple[str, str], float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("x_seconds", "Help.", BUCKETS, ("kind", "outcome"), registry=ours)
    library = Histogram("x_seconds", "Help.", ["kind", "outcome"], buckets=BUCKETS, registry=theirs)
    for labels, value in observations:
        loop.labels(*labels).observe(value)
        library.labels(*labels).observe(value)
    assert exposition(ours) == exposition(theirs)


def test_an_unlabelled_histogram_and_wrong_labels() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("y_seconds", "Help.", BUCKETS, registry=ours)
    library = Histogram("y_seconds", "Help.", buckets=BUCKETS, registry=theirs)
    for value in (0.0002, 0.001, 7.5):
        loop.observe(value)
        library.observe(value)
    assert exposition(ours) == exposition(theirs)
    with pytest.raises(ValueError, match="takes labels"):
        LoopHistogram("z", "Help.", BUCKETS, ("kind",), registry=ours).labels()
