"""protocols/limits.ConnectionLimits: the two limits every listener shares."""

from __future__ import annotations

from kairoi_trio.protocols.limits import ConnectionLimits


def test_each_limit_refuses_with_its_reason_and_a_closed_connection_makes_room() -> None:
    limits = ConnectionLimits(max_connections=3, max_per_address=2)
    assert limits.enter("10.0.0.1") is None
    assert limits.enter("10.0.0.1") is None
    assert limits.enter("10.0.0.1") == "too many connections from your address"
    assert limits.enter("10.0.0.2") == "too many connections"  # 4 counted, 3 allowed
    assert limits.open == 4  # refused ones count until they are closed
    limits.leave("10.0.0.1")  # the refused ones close
    limits.leave("10.0.0.2")
    assert limits.enter("10.0.0.2") is None
    limits.leave("10.0.0.1")
    assert limits.enter("10.0.0.1") is None
    assert limits.open == 3


def test_no_per_address_limit() -> None:
    limits = ConnectionLimits(max_connections=100, max_per_address=0)
    assert all(limits.enter("127.0.0.1") is None for _ in range(100))
    assert limits.enter("127.0.0.1") == "too many connections"
    for _ in range(101):
        limits.leave("127.0.0.1")
    assert limits.open == 0 and not limits._by_address  # noqa: SLF001
