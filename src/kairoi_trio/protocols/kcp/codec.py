"""Sans-io parser and encoder for KCP, Kairoi's text protocol (SPEC §2).

The wire format in one paragraph: a message is two or more arguments separated
by spaces and terminated by a line feed. An argument is either *simple* (one or
more bytes, none of them space, `"` or LF) or *universal* (`"..."`, where `\\\\`
and `\\"` are the only escapes and raw line feeds are allowed). The first
argument is the message identifier. docs/protocol-kcp.md lists every detail
and every choice made where the spec is silent.

The parser does no I/O: the server `feed()`s it whatever `recv()` returned and
takes the complete `events()`. That keeps it testable without sockets and
lets the same code serve the server, clients and tests.

It is the server's hot path, so it works on whole buffers with C-level bytes
operations (find/split/decode) and only falls back to a regex tokenizer for
messages with escapes, strings spanning lines, or errors; nothing is parsed
character by character in Python.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INVALID_ESCAPE",
    "INVALID_UTF8",
    "MISSING_INSTRUCTION",
    "MISSING_SPACE",
    "UNTERMINATED_MESSAGE",
    "UNTERMINATED_STRING",
    "BadMessage",
    "Event",
    "FatalError",
    "KcpParser",
    "Message",
    "encode_arg",
    "encode_message",
    "error",
    "ok",
]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20

# The reasons a BadMessage carries. The server sends them back verbatim.
MISSING_INSTRUCTION = "missing instruction"
MISSING_SPACE = "missing space between arguments"
INVALID_ESCAPE = "invalid escape sequence"
INVALID_UTF8 = "invalid UTF-8"
UNTERMINATED_STRING = "unterminated universal string"
UNTERMINATED_MESSAGE = "message not terminated by a line feed"


@dataclass(frozen=True, slots=True)
class Message:
    """A well-formed message: its identifier and the arguments after it (at least one)."""

    id: str
    args: list[str]


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A message that could not be parsed; the connection can go on.

    `id` is the message identifier when it could be recovered, else None
    (the server then answers with `*`).
    """

    id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class FatalError:
    """The stream cannot go on (a message over the size limit); the server closes it."""

    reason: str


Event = Message | BadMessage | FatalError

# The inside of a universal string, up to its closing quote or the end of the
# data. A backslash always takes the next byte with it (so `\"` never closes the
# string); whether that pair is a valid escape is checked later, so that framing
# and error reporting stay independent.
_STRING_BODY = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
_SIMPLE = re.compile(rb'[^ "]+')
_SPACES = re.compile(rb" +")

_SPACE, _QUOTE, _BACKSLASH = 0x20, 0x22, 0x5C


class KcpParser:
    """Turns a byte stream into KCP events (Message, BadMessage, FatalError).

    Bounded memory: after `events()`, the parser holds only the unfinished
    message, which is always shorter than `max_message_bytes` (a longer one is
    a FatalError as soon as it reaches the limit, before its end arrives).
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self._max = max_message_bytes
        # Between calls, the buffer starts with the first byte of the
        # unfinished message: consumed bytes are dropped at the end of _drain.
        self._buf = bytearray()
        # When the unfinished message spans lines (a universal string holds
        # LFs), _scan is the end of its lines already scanned, and _inside
        # says that a string is open there. Otherwise _scan is 0.
        self._scan = 0
        self._inside = False
        # The buffer holds no LF before _lf_from: each byte is searched once.
        self._lf_from = 0
        self._ready: deque[Event] = deque()
        self._done = False

    @property
    def buffered(self) -> int:
        """Bytes currently held (for tests of memory bounds)."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Add received bytes. Ignored once the parser is done (FatalError or close())."""
        if not self._done:
            self._buf += data

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed."""
        if not self._ready:
            self._ready.extend(self._drain())
        return self._ready.popleft() if self._ready else None

    def events(self) -> list[Event]:
        """All events that the data fed so far completes (call once per receive)."""
        if self._ready:
            out = list(self._ready)
            self._ready.clear()
            out += self._drain()
            return out
        return self._drain()

    def close(self) -> list[Event]:
        """End of input: the remaining events, the unfinished message as a BadMessage.

        An unfinished message made only of spaces is dropped, as an empty line is.
        """
        out = self.events()
        if self._done:
            return out
        self._done = True
        pending = bytes(self._buf)
        self._buf = bytearray()
        if pending.strip(b" "):
            tokens, reason = _tokenize(pending)
            out.append(BadMessage(_identifier(tokens), reason or UNTERMINATED_MESSAGE))
        return out

    def _fatal(self) -> FatalError:
        self._done = True
        self._buf = bytearray()
        return FatalError(f"message exceeds {self._max} bytes")

    def _drain(self) -> list[Event]:
        """Parse every message completed by the buffer, then drop the consumed bytes."""
        if self._done:
            return []
        buf = self._buf
        limit = self._max
        out: list[Event] = []
        last_lf = buf.rfind(b"\n", self._lf_from)
        if last_lf < 0:
            self._lf_from = len(buf)
        else:
            start = 0  # first byte of the current message
            pos = self._scan  # first byte of the current line
            inside = self._inside
            for line in buf[pos:last_lf].split(b"\n"):
                lf = pos + len(line)  # where this line's LF is in buf
                pos = lf + 1
                if inside or _QUOTE in line:
                    if inside or _BACKSLASH in line or line.count(b'"') % 2:
                        # Escapes, or a string that spans lines: the general path.
                        inside = _ends_inside_string(line, inside)
                        if inside:
                            continue  # the LF belongs to a universal string
                        parse = _parse_slow
                        line = buf[start:lf]
                    else:
                        parse = _parse_quoted_line
                else:
                    parse = _parse_plain
                if lf - start >= limit:
                    out.append(self._fatal())
                    return out
                event = parse(line)
                if event is not None:
                    out.append(event)
                start = pos
            self._inside = inside
            # Drop the consumed messages: once per receive, not per message,
            # and bytearray deletes at the front without moving the rest.
            del buf[:start]
            self._scan = self._lf_from = pos - start
        # The unfinished message needs at least one more byte (its LF).
        if len(buf) >= limit:
            out.append(self._fatal())
        return out


def _ends_inside_string(line: bytes | bytearray, inside: bool) -> bool:
    """Whether a universal string is open at the end of `line` (given the state at its start)."""
    if _BACKSLASH not in line:
        return inside != (line.count(b'"') % 2 == 1)
    i, n = 0, len(line)
    while True:
        if not inside:
            quote = line.find(b'"', i)
            if quote < 0:
                return False
            i = quote + 1
        end = _STRING_BODY.match(line, i).end()  # type: ignore[union-attr]  # always matches
        if end == n or line[end] == _BACKSLASH:
            # Still open; a final backslash pairs with the LF that follows.
            return True
        inside = False
        i = end + 1


def _parse_plain(raw: bytes | bytearray) -> Event | None:
    """Parse a one-line message without quotes: a plain split on spaces."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return _parse_slow(raw)
    if text[-1:] == "\r":
        text = text[:-1]
    args = text.split(" ")
    if "" in args:
        args = [arg for arg in args if arg]
    return _message(args)


def _parse_quoted_line(raw: bytes | bytearray) -> Event | None:
    """Parse a one-line message with balanced quotes and no backslash."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return _parse_slow(raw)
    if text[-1:] == "\r":
        text = text[:-1]
    args = _split_on_quotes(text)
    if args is None:
        return _parse_slow(raw)  # to find the error and the identifier
    return _message(args)


def _split_on_quotes(text: str) -> list[str] | None:
    """Split a message with balanced quotes and no backslash; None on a syntax error.

    Splitting on `"` alternates unquoted stretches (even indexes) and string
    contents (odd indexes). Quotes must be separated from their neighbours by
    spaces, which is a check on the ends of each unquoted stretch.
    """
    parts = text.split('"')
    if len(parts) == 3:
        # One string, as in the usual `<id> SET <job> "<time>"`: a shortcut
        # worth a quarter of the parse time of such a message.
        head, body, tail = parts
        if head[-1:] not in ("", " ") or tail[:1] not in ("", " "):
            return None
        args = head.split(" ")
        args.pop()  # the empty word after the last space (or the empty head)
        if "" in args:
            args = [arg for arg in args if arg]
        args.append(body)
        if tail:
            args += filter(None, tail.split(" "))
        return args
    last = len(parts) - 1
    args = []
    for i in range(0, last, 2):
        before = parts[i]  # the stretch before the string parts[i + 1]
        if before:
            if before[-1] != " " or (i and before[0] != " "):
                return None
            args += filter(None, before.split(" "))
        elif i:
            return None  # two strings glued together
        args.append(parts[i + 1])
    tail = parts[last]
    if tail:
        if tail[0] != " ":
            return None
        args += filter(None, tail.split(" "))
    return args


def _parse_slow(raw: bytes | bytearray) -> Event | None:
    """The general path: tokenize with regexes, report the first error, recover the id."""
    tokens, reason = _tokenize(bytes(raw.removesuffix(b"\r")))
    if reason is not None:
        return BadMessage(_identifier(tokens), reason)
    try:
        args = [token.decode() for token in tokens]
    except UnicodeDecodeError:
        return BadMessage(_identifier(tokens), INVALID_UTF8)
    return _message(args)


def _tokenize(raw: bytes) -> tuple[list[bytes], str | None]:
    """Split `raw` into unescaped arguments, stopping at the first syntax error.

    On error, the arguments returned are those complete before it (an
    argument glued to the next one is not complete), so that the first of
    them, if any, is the identifier to answer with.
    """
    tokens: list[bytes] = []
    i, n = 0, len(raw)
    glued = False  # the previous token ended right here, with no space after it
    while i < n:
        if raw[i] == _SPACE:
            i = _SPACES.match(raw, i).end()  # type: ignore[union-attr]
            glued = False
            continue
        if glued:
            tokens.pop()
            return tokens, MISSING_SPACE
        if raw[i] == _QUOTE:
            end = _STRING_BODY.match(raw, i + 1).end()  # type: ignore[union-attr]
            if end == n or raw[end] != _QUOTE:
                return tokens, UNTERMINATED_STRING
            body = raw[i + 1 : end]
            if _BACKSLASH in body:
                if any(escape[1] not in b'\\"' for escape in _ESCAPE.finditer(body)):
                    return tokens, INVALID_ESCAPE
                body = _ESCAPE.sub(rb"\1", body)
            tokens.append(body)
            i = end + 1
        else:
            end = _SIMPLE.match(raw, i).end()  # type: ignore[union-attr]
            tokens.append(raw[i:end])
            i = end
        glued = True
    return tokens, None


def _identifier(tokens: list[bytes]) -> str | None:
    if not tokens:
        return None
    try:
        return tokens[0].decode()
    except UnicodeDecodeError:
        return None


# Building a frozen dataclass through its __init__ goes through
# object.__setattr__ per field; setting the slots directly is twice as fast,
# which matters when a receive holds thousands of messages.
_new = object.__new__
_set_id = Message.__dict__["id"].__set__
_set_args = Message.__dict__["args"].__set__


def _message(args: list[str]) -> Event | None:
    """The event for a syntactically valid message (None for an empty line)."""
    if len(args) >= 2:
        message = _new(Message)
        _set_id(message, args[0])
        _set_args(message, args[1:])
        return message
    if args:
        return BadMessage(args[0], MISSING_INSTRUCTION)
    return None  # an empty line


def encode_arg(arg: str) -> str:
    """Encode one argument: simple form when possible, universal form otherwise."""
    if arg and " " not in arg and '"' not in arg and "\n" not in arg and "\r" not in arg:
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_message(id: str, args: Sequence[str]) -> bytes:
    """Encode a whole message: `<id> <arg> ...` and a line feed."""
    if not args:
        raise ValueError("a KCP message needs at least one argument after its identifier")
    return (" ".join([encode_arg(id), *map(encode_arg, args)]) + "\n").encode()


def ok(id: str, *args: str) -> bytes:
    """A success response: `<id> OK [<arg> ...]`."""
    if not args:
        return (encode_arg(id) + " OK\n").encode()
    return encode_message(id, ("OK", *args))


def error(id: str | None, reason: str) -> bytes:
    """A failure response: `<id> ERROR <reason>`, with `*` for an unknown id."""
    head = "*" if id is None else encode_arg(id)
    return (head + " ERROR " + encode_arg(reason) + "\n").encode()
