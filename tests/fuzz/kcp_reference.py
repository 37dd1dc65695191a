"""A second KCP parser, written from docs/protocol-kcp.md alone, one byte at a
time and with no regard for speed: the oracle the fuzzers compare the real,
fast codec with (differential fuzzing). Where the two disagree, one of them
misreads the document.

It reads a whole input at once (end of input included) and returns the same
events as `KcpParser.feed(data); events() + close()`.
"""

from __future__ import annotations

from kairoi_trio.protocols.kcp.codec import (
    INVALID_ESCAPE,
    INVALID_UTF8,
    MISSING_INSTRUCTION,
    MISSING_SPACE,
    UNTERMINATED_MESSAGE,
    UNTERMINATED_STRING,
    BadMessage,
    Event,
    FatalError,
    Message,
)

SPACE, QUOTE, BACKSLASH, LF, CR = 0x20, 0x22, 0x5C, 0x0A, 0x0D


def parse_all(data: bytes, limit: int) -> list[Event]:
    fatal = FatalError(f"message exceeds {limit} bytes")
    events: list[Event] = []
    start = 0  # first byte of the current message
    inside = False  # inside a universal string
    i = 0
    while i < len(data):
        byte = data[i]
        if inside and byte == BACKSLASH:
            i += 2  # "a backslash always takes the next byte with it", even a LF
            continue
        if byte == QUOTE:
            inside = not inside
        elif byte == LF and not inside:
            if i + 1 - start > limit:  # the size counts the LF
                return [*events, fatal]
            line = data[start:i]
            if line.endswith(b"\r"):
                line = line[:-1]  # one CR right before the LF
            event = message(line)
            if event is not None:
                events.append(event)
            start = i + 1
        i += 1
    pending = data[start:]
    if len(pending) >= limit:  # an unfinished message that reached the limit
        return [*events, fatal]
    if pending.strip(b" "):
        tokens, reason, id_complete = tokenize(pending)
        events.append(BadMessage(identifier(tokens, id_complete), reason or UNTERMINATED_MESSAGE))
    return events


def message(line: bytes) -> Event | None:
    tokens, reason, id_complete = tokenize(line)
    if reason is not None:
        return BadMessage(identifier(tokens, id_complete), reason)
    try:
        args = [token.decode("utf-8") for token in tokens]
    except UnicodeDecodeError:
        return BadMessage(identifier(tokens, True), INVALID_UTF8)
    if not args:
        return None  # an empty or blank line
    if len(args) == 1:
        return BadMessage(args[0], MISSING_INSTRUCTION)
    return Message(args[0], args[1:])


def tokenize(raw: bytes) -> tuple[list[bytes], str | None, bool]:
    """(arguments before the first syntax error, that error, whether the first
    argument is complete: followed by a space or the end, not glued)."""
    tokens: list[bytes] = []
    i, n = 0, len(raw)
    while i < n:
        if raw[i] == SPACE:
            i += 1
            continue
        if tokens and raw[i - 1] != SPACE:
            return tokens, MISSING_SPACE, len(tokens) > 1
        if raw[i] == QUOTE:
            body = bytearray()
            j = i + 1
            bad_escape = False
            while j < n and raw[j] != QUOTE:
                if raw[j] == BACKSLASH:
                    if j + 1 >= n:
                        j = n  # the backslash takes the (missing) next byte
                        break
                    if raw[j + 1] not in (BACKSLASH, QUOTE):
                        bad_escape = True
                    body.append(raw[j + 1])
                    j += 2
                else:
                    body.append(raw[j])
                    j += 1
            if j >= n:
                return tokens, UNTERMINATED_STRING, bool(tokens)
            if bad_escape:
                return tokens, INVALID_ESCAPE, bool(tokens)
            tokens.append(bytes(body))
            i = j + 1
        else:
            j = i
            while j < n and raw[j] not in (SPACE, QUOTE):
                j += 1
            tokens.append(raw[i:j])
            i = j
    return tokens, None, True


def identifier(tokens: list[bytes], complete: bool) -> str | None:
    if not tokens or not complete:
        return None
    try:
        return tokens[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
