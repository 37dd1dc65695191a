"""KCP requests from a grammar, and mutations of them, for the fuzzers.

`request(rng)` draws one well-formed request (every instruction, right and
wrong arities, good and bad times, payloads full of the characters the
syntax cares about); `mutate(rng, wire)` damages bytes with the same
characters, so that the fuzzers spend their time near the grammar, where
the parser has decisions to make, rather than on random noise.

No generated text contains the letter Q: the network fuzz keeps its checked
keys in a namespace starting with Q, so that no random or mutated request can
ever write them.
"""

from __future__ import annotations

import random

from kairoi_trio.protocols.kcp.codec import encode_message

# Characters that matter to the syntax, plus some that matter to UTF-8.
SYNTAX = [" ", '"', "\\", "\n", "\r", "\t", "x", "é", "€", "😀", "\x00"]
SYNTAX_BYTES = [b" ", b'"', b"\\", b"\n", b"\r", b"\r\n", b"\xff", b"\xc3", b"\xa9", b"\x00", b"a"]
WORDS = ["SET", "GET", "UNSET", "RULE", "PING", "VERSION", "AUTH", "SCHEDULE", "set", "FOO"]
TIMES = [
    "2090-01-01 00:00:00",
    "2090-06-15 12:30:45.123456",
    "2020-01-01 00:00:00",  # in the past: due at once
    "2020-02-30 10:00:00",  # no such date
    "2090-01-01 24:00:00",
    "2090-1-1 0:0:0",
    "2090-01-01T00:00:00Z",
    "",
    "٢٠٩٠-01-01 00:00:00",  # non-ASCII digits
]
RUNNERS = [
    ["shell", "/nonexistent/fuzz.sh"],
    ["amqp", "amqp://guest:guest@127.0.0.1:1/", "x", "r"],
    ["http", "http://127.0.0.1:1/hook"],
    ["amqp", "ftp://nowhere"],
    ["smtp", "x"],
]


def text(rng: random.Random, longest: int = 12) -> str:
    return "".join(rng.choice(SYNTAX) for _ in range(rng.randint(0, longest)))


def job_id(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.6:
        return f"fz.{rng.randrange(50)}"
    if roll < 0.9:
        return "fz." + text(rng)
    return text(rng, 3)  # possibly empty


def request(rng: random.Random) -> list[str]:
    """The arguments after the identifier of one request."""
    roll = rng.random()
    if roll < 0.35:
        args = ["SET", job_id(rng), rng.choice(TIMES)]
        if rng.random() < 0.6:
            args.append(text(rng, 40))
    elif roll < 0.5:
        args = [rng.choice(["GET", "UNSET"]), job_id(rng)]
    elif roll < 0.65:
        word = rng.choice(["SET", "GET", "UNSET"])
        args = ["RULE", word, "fz-rule." + str(rng.randrange(5))]
        if word == "SET":
            args += [rng.choice(["fz.", "fz.1", "", "none."]), *rng.choice(RUNNERS)]
    elif roll < 0.75:
        args = [rng.choice(["PING", "VERSION"])]
    elif roll < 0.8:
        args = ["AUTH", text(rng)]
    else:
        args = [rng.choice(WORDS)]
    if rng.random() < 0.1:  # a wrong arity
        if rng.random() < 0.5 and len(args) > 1:
            args.pop()
        else:
            args.append(text(rng, 5))
    return args


def message(rng: random.Random, id: str | None = None) -> bytes:
    """One request on the wire, now and then with extra spaces or CR LF."""
    wire = encode_message(id if id is not None else text(rng, 4) or "i", request(rng))
    roll = rng.random()
    if roll < 0.1:
        wire = wire[:-1] + b"\r\n"
    elif roll < 0.2:
        wire = b"  " + wire.replace(b" ", b"   ", 1)
    elif roll < 0.25:
        wire = b"\n   \n\r\n" + wire  # blank lines are ignored
    return wire


def mutate(rng: random.Random, wire: bytes, mutations: int = 3) -> bytes:
    data = bytearray(wire)
    for _ in range(mutations):
        where = rng.randint(0, len(data))
        roll = rng.random()
        if roll < 0.4 or not data:
            data[where:where] = rng.choice(SYNTAX_BYTES)
        elif roll < 0.7:
            del data[min(where, len(data) - 1)]
        else:
            data[min(where, len(data) - 1)] = rng.choice(SYNTAX_BYTES)[0]
    return bytes(data)
