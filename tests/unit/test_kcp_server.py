"""protocols/kcp/server.py, below the socket: every request gets its answer."""

from __future__ import annotations

from kairoi_trio.model import MAX_TIME_US, Job, Status
from kairoi_trio.protocols.kcp.codec import KcpParser, Message
from kairoi_trio.protocols.kcp.server import _Slot


def answer(slot: _Slot) -> Message:
    parser = KcpParser()
    parser.feed(slot.encode())
    (message,) = parser.events()
    assert isinstance(message, Message)
    return message


def test_a_get_answers_with_the_job() -> None:
    slot = _Slot("7")
    slot.with_data = True
    slot.result = Job("a", MAX_TIME_US, Status.PLANNED)
    assert answer(slot).args == ["OK", "planned", "9999-12-31 23:59:59.999999"]


def test_an_answer_that_cannot_be_rendered_is_an_error_not_a_closed_connection() -> None:
    # A time beyond 9999 (written by a release without policy bounds) used to
    # raise in the writer, which closed the connection without an answer.
    slot = _Slot("7")
    slot.with_data = True
    slot.result = Job("a", MAX_TIME_US + 1, Status.PLANNED)
    message = answer(slot)
    assert message.id == "7"
    assert message.args[0] == "ERROR"
    assert "outside the supported range" in message.args[1]
