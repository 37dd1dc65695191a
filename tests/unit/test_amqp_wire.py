"""amqp_wire's content header encoder against pamqp's, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import frame, header
from pamqp.common import FieldTable

from kairoi_trio.runners.amqp_wire import MessageProperties, content_header_frame, field_table

short_text = st.text(max_size=40) | st.text(min_size=60, max_size=90)  # up to 360 bytes UTF-8
ints = (
    st.integers(-(2**63), 2**63 - 1)
    | st.integers(-130, 130)
    | st.sampled_from([-32769, -32768, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1])
)
values = (
    st.text(max_size=300)
    | ints
    | st.binary(max_size=300).map(bytearray)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)
    | st.dictionaries(st.text(max_size=10), st.text(max_size=10) | ints, max_size=3)
)
names = st.text(max_size=20) | st.sampled_from(
    ["kairoi-execute-at", "kairoi-attempt", "scheduled_at", "kairoi-payload"]
)
tables = st.dictionaries(names, values, max_size=6)


def pamqp_frame(channel_id: int, body_size: int, props: MessageProperties) -> bytes:
    return frame.marshal(header.ContentHeader(0, body_size, props.to_pamqp()), channel_id)


def outcome(encode: object, *args: object) -> tuple[str, object]:
    """(`ok`, bytes) or (the exception's type name, None): the two must fail alike."""
    try:
        return "ok", encode(*args)  # type: ignore[operator]
    except (TypeError, ValueError, OverflowError) as exc:
        return type(exc).__name__, None
    except Exception as exc:  # struct.error and the like
        return type(exc).__name__, None


@settings(max_examples=300, deadline=None)
@given(
    channel_id=st.integers(0, 65535),
    body_size=st.integers(0, 2**64 - 1),
    content_type=st.none() | st.just("") | short_text,
    message_id=st.none() | st.just("") | short_text,
    timestamp=st.none() | st.integers(-1, 253_402_300_799),  # datetime ends in 9999
    delivery_mode=st.none() | st.integers(0, 3) | st.integers(-1, 256),
    headers=st.none() | tables,
)
def test_content_header_frame_is_pamqps(
    channel_id: int,
    body_size: int,
    content_type: str | None,
    message_id: str | None,
    timestamp: int | None,
    delivery_mode: int | None,
    headers: FieldTable | None,
) -> None:
    props = MessageProperties(
        content_type=content_type,
        message_id=message_id,
        timestamp=timestamp,
        delivery_mode=delivery_mode,
        headers=headers,
    )
    ours = outcome(content_header_frame, channel_id, body_size, props)
    theirs = outcome(pamqp_frame, channel_id, body_size, props)
    assert ours == theirs


@settings(max_examples=300, deadline=None)
@given(
    execute_at=st.text(max_size=40),
    attempt=st.integers(0, 2**31),
    payload=st.none() | st.text(max_size=2000) | st.binary(max_size=2000).map(bytearray),
    message_id=st.none() | st.text(min_size=1, max_size=85),
)
def test_the_runners_properties_are_pamqps(
    execute_at: str, attempt: int, payload: str | bytearray | None, message_id: str | None
) -> None:
    """The shape amqp.py sends: the kairoi-* headers, text/plain, persistent."""
    headers: FieldTable = {
        "kairoi-execute-at": execute_at,
        "kairoi-attempt": attempt,
        "scheduled_at": execute_at,
    }
    if payload is not None:
        headers["kairoi-payload"] = payload
    props = MessageProperties(
        content_type="text/plain",
        message_id=message_id,
        timestamp=1_800_000_000,
        delivery_mode=2,
        headers=headers,
    )
    assert outcome(content_header_frame, 1, 17, props) == outcome(pamqp_frame, 1, 17, props)


def test_an_empty_header_table_is_sent_and_none_is_not() -> None:
    assert field_table({}) == b"\x00\x00\x00\x00"
    empty = content_header_frame(1, 0, MessageProperties(headers={}))
    assert empty == pamqp_frame(1, 0, MessageProperties(headers={}))
    assert content_header_frame(1, 0, MessageProperties()) == pamqp_frame(1, 0, MessageProperties())


def test_a_long_field_name_is_left_to_pamqp() -> None:
    props = MessageProperties(headers={"n" * 200: "x", "a": 1})
    assert content_header_frame(3, 5, props) == pamqp_frame(3, 5, props)


def test_a_message_id_over_255_bytes_is_refused_like_pamqp() -> None:
    props = MessageProperties(message_id="é" * 128)  # 256 bytes
    with pytest.raises(TypeError, match="255"):
        content_header_frame(1, 0, props)
    with pytest.raises(TypeError, match="255"):
        pamqp_frame(1, 0, props)


@settings(max_examples=200, deadline=None)
@given(
    execute_at=st.integers(0, 253_402_300_799_999_999 - 86_400_000_000),
    late_by=st.sampled_from([0, 1, 86_400_000_000]),
    attempt=st.integers(1, 2**31 - 1),
    payload=st.binary(max_size=1500) | st.text(max_size=200).map(str.encode),
    job_id=st.text(min_size=1, max_size=100),
)
def test_the_runners_frames_with_cached_headers_are_pamqps(
    execute_at: int, late_by: int, attempt: int, payload: bytes, job_id: str
) -> None:
    """amqp._properties (its headers table encoded once per distinct time, attempt and
    payload) and body_frame give pamqp's bytes for the message the runner sends."""
    from pamqp import body as pamqp_body

    from kairoi_trio.model import Recurrence, Schedule, Status, format_time, new_job
    from kairoi_trio.runners.amqp import _properties
    from kairoi_trio.runners.amqp_wire import body_frame

    recurrence = None
    if late_by:  # a recurring run: scheduled at its occurrence, executed later
        recurrence = Recurrence(schedule=Schedule("@every 1m"), nominal=execute_at)
    job = new_job(
        job_id, execute_at + late_by, Status.TRIGGERED, payload, attempt, "", 0, recurrence
    )
    for _ in range(2):  # the second from the cache
        props = _properties(job)
        assert props.headers is None and props.encoded_headers is not None
        headers: FieldTable = {
            "kairoi-execute-at": format_time(job.execute_at),
            "kairoi-attempt": attempt,
            "scheduled_at": format_time(job.scheduled_at),
        }
        if payload:
            try:
                headers["kairoi-payload"] = payload.decode()
            except UnicodeDecodeError:
                headers["kairoi-payload"] = bytearray(payload)
        expected = MessageProperties(
            content_type="text/plain",
            message_id=props.message_id,
            timestamp=props.timestamp,
            delivery_mode=2,
            headers=headers,
        )
        body = job_id.encode()
        assert content_header_frame(1, len(body), props) == pamqp_frame(1, len(body), expected)
        assert body_frame(7, body) == frame.marshal(pamqp_body.ContentBody(body), 7)
