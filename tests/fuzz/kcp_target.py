"""The fuzz target for the KCP codec and instruction layer: one input in, every
property checked, an exception (AssertionError) on any violation.

An input is `[limit selector][chunking seed] + wire bytes`:
- the limit is one of LIMITS (tiny ones make the size rules reachable);
- the wire is fed in chunks cut by a PRNG seeded with the second byte, and
  also in one piece;
- both must give exactly the events the reference parser (kcp_reference.py)
  reads from the document;
- the parser never holds more than `limit - 1` bytes between receives;
- every Message re-encodes and parses back to itself, and its arguments
  give a command or a CommandError (never another exception);
- every response written for it parses back.

atheris_kcp.py runs this under atheris (coverage-guided); the corpus test
replays tests/fuzz/corpus/ through it on every run, atheris or not.
"""

from __future__ import annotations

import random

from fuzz.kcp_reference import parse_all

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

LIMITS = (1, 2, 3, 5, 8, 16, 64, 1 << 20)


def make_input(limit_index: int, chunk_seed: int, wire: bytes) -> bytes:
    return bytes([limit_index % 256, chunk_seed % 256]) + wire


def check_input(data: bytes) -> None:
    if len(data) < 2:
        return
    limit = LIMITS[data[0] % len(LIMITS)]
    rng = random.Random(data[1])
    wire = data[2:]

    expected = parse_all(wire, limit)

    whole = KcpParser(limit)
    whole.feed(wire)
    got = whole.events() + whole.close()
    assert got == expected, (limit, wire, got, expected)

    parser = KcpParser(limit)
    chunked: list[Event] = []
    i = 0
    while i < len(wire):
        step = rng.choice((1, 1, 2, 3, 5, 13, 100, len(wire)))
        parser.feed(wire[i : i + step])
        i += step
        chunked += parser.events()
        assert parser.buffered < limit, (limit, parser.buffered)
    chunked += parser.close()
    assert chunked == expected, (limit, wire, chunked, expected)
    assert not any(isinstance(event, FatalError) for event in chunked[:-1])

    for event in expected:
        if not isinstance(event, Message):
            continue
        again = KcpParser()
        again.feed(encode_message(event.id, event.args) + ok(event.id, *event.args))
        again.feed(error(event.id, " ".join(event.args)))
        assert again.events() + again.close() == [
            event,
            Message(event.id, ["OK", *event.args]),
            Message(event.id, ["ERROR", " ".join(event.args)]),
        ], event
        try:
            instructions.translate(event.args)
        except CommandError:
            pass
