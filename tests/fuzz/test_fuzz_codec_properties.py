"""Properties of the KCP codec under hypothesis, beyond those of
tests/unit/test_kcp_codec.py (round trips of encoded messages, random chunks of
byte soup, agreement with its byte-by-byte reading on short soups):

- requests drawn from a grammar and then damaged parse the same as an
  independent reference parser (kcp_reference.py) reads docs/protocol-kcp.md,
  in any chunks and under any size limit;
- the parser holds at most `limit - 1` bytes between receives, and at most
  that plus the last chunk in between, and nothing once it gave up;
- whatever a damaged line holds, the messages after it are read intact;
- `next_event()` and `events()` can be mixed freely;
- every response the server can write parses back;
- the instruction layer turns any arguments into a command or a CommandError,
  never an exception of another kind.
"""

from __future__ import annotations

import random

from fuzz import grammar
from fuzz.kcp_reference import parse_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairoi_trio.commands import CommandError
from kairoi_trio.protocols.kcp import instructions
from kairoi_trio.protocols.kcp.codec import (
    Event,
    FatalError,
    KcpParser,
    Message,
    encode_message,
    error,
    ok,
)

LIMITS = st.sampled_from([1, 2, 8, 32, 100, 1 << 20])
any_text = st.text(st.characters(exclude_categories=["Cs"]))  # UTF-8 encodable


def split(data: bytes, rng: random.Random) -> list[bytes]:
    chunks, i = [], 0
    while i < len(data):
        step = rng.choice([1, 1, 2, 3, 7, 64, len(data)])
        chunks.append(data[i : i + step])
        i += step
    return chunks


def feed_in_chunks(chunks: list[bytes], limit: int) -> list[Event]:
    parser = KcpParser(limit)
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        events += parser.events()
    return events + parser.close()


def damaged_pipeline(rng: random.Random) -> bytes:
    wire = b""
    for _ in range(rng.randint(1, 6)):
        message = grammar.message(rng)
        if rng.random() < 0.5:
            message = grammar.mutate(rng, message, rng.randint(1, 4))
        wire += message
    return wire


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), LIMITS)
def test_damaged_requests_parse_as_the_reference_reads_the_document(
    rng: random.Random, limit: int
) -> None:
    wire = damaged_pipeline(rng)
    expected = parse_all(wire, limit)
    assert feed_in_chunks([wire], limit) == expected
    assert feed_in_chunks(split(wire, rng), limit) == expected


@settings(max_examples=150)
@given(st.randoms(use_true_random=False), LIMITS, st.binary(max_size=200))
def test_memory_is_bounded_by_the_limit_whatever_the_chunks(
    rng: random.Random, limit: int, noise: bytes
) -> None:
    parser = KcpParser(limit)
    gave_up = False
    for chunk in split(damaged_pipeline(rng) + noise, rng):
        parser.feed(chunk)
        assert parser.buffered <= limit - 1 + len(chunk)
        events = parser.events()
        assert parser.buffered < limit
        if gave_up:
            assert events == [] and parser.buffered == 0
        elif any(isinstance(event, FatalError) for event in events):
            assert isinstance(events[-1], FatalError)  # and nothing after it
            assert parser.buffered == 0
            gave_up = True


# A line whose strings are all closed (a backslash outside a string is an
# ordinary byte), with every kind of damage.
junk_line = st.lists(
    st.sampled_from([b" ", b"a", b"\xff", b"\\", b"\\q", b"\r", b'"\\q"', b'"x"', b'""', b"\t"]),
    max_size=12,
).map(lambda parts: b"".join(parts) + b"\n")
messages = st.lists(
    st.tuples(any_text, st.lists(any_text, min_size=1, max_size=4)), min_size=1, max_size=4
)


@given(junk_line, messages)
def test_messages_after_a_damaged_line_are_read_intact(
    junk: bytes, sent: list[tuple[str, list[str]]]
) -> None:
    wire = junk + b"".join(encode_message(id, args) for id, args in sent)
    events = feed_in_chunks([wire], 1 << 20)
    assert events[-len(sent) :] == [Message(id, args) for id, args in sent]
    assert len(events) <= len(sent) + 1  # the junk gives at most one event


@given(st.randoms(use_true_random=False), LIMITS)
def test_next_event_and_events_can_be_mixed(rng: random.Random, limit: int) -> None:
    wire = damaged_pipeline(rng)
    parser = KcpParser(limit)
    events: list[Event] = []
    for chunk in split(wire, rng):
        parser.feed(chunk)
        while rng.random() < 0.7:
            event = parser.next_event()
            if event is None:
                break
            events.append(event)
        if rng.random() < 0.5:
            events += parser.events()
    events += parser.close()
    assert events == parse_all(wire, limit)


@given(any_text, st.lists(any_text, max_size=4), st.none() | any_text, any_text)
def test_every_response_parses_back(
    id: str, args: list[str], error_id: str | None, reason: str
) -> None:
    wire = ok(id, *args) + error(error_id, reason)
    assert feed_in_chunks([wire], 1 << 20) == [
        Message(id, ["OK", *args]),
        Message("*" if error_id is None else error_id, ["ERROR", reason]),
    ]


@settings(max_examples=200)
@given(st.randoms(use_true_random=False), st.lists(any_text, max_size=6))
def test_instructions_give_a_command_or_a_command_error(
    rng: random.Random, noise: list[str]
) -> None:
    for args in (grammar.request(rng), [rng.choice(grammar.WORDS), *noise], ["RULE", *noise]):
        try:
            instructions.translate(args)
        except CommandError:
            pass
