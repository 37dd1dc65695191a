"""Tests of the KCP parser and encoder (SPEC §2, docs/protocol-kcp.md)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    KcpParser,
    Message,
    encode_arg,
    encode_message,
    error,
    ok,
)


def parse(data: bytes, max_message_bytes: int = 1 << 20) -> list[Event]:
    """Every event of `data` fed at once, end of input included."""
    parser = KcpParser(max_message_bytes)
    parser.feed(data)
    return parser.events() + parser.close()


def parse_in_chunks(chunks: list[bytes], max_message_bytes: int = 1 << 20) -> list[Event]:
    """Every event of `chunks`, fed one by one as a server would, end of input included."""
    parser = KcpParser(max_message_bytes)
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        events += parser.events()
    return events + parser.close()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- SPEC §2 examples ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "id", "args"),
    [
        (b"A VERSION", "A", ["VERSION"]),
        (
            b"    Id   VERSION toto   32t\\ata titi 111   ",
            "Id",
            ["VERSION", "toto", "32t\\ata", "titi", "111"],
        ),
        (b'"123" "UNSET"', "123", ["UNSET"]),
        (b' "\\"" "\\""   ', '"', ['"']),
        (
            b'A SET app.domain.example_job.0 "2020-05-26 22:26:18"',
            "A",
            ["SET", "app.domain.example_job.0", "2020-05-26 22:26:18"],
        ),
    ],
)
def test_spec_examples(line: bytes, id: str, args: list[str]) -> None:
    assert parse(line + b"\n") == [Message(id, args)]


def test_universal_string_spans_lines() -> None:
    # SPEC: `X UNSET "` + LF + `" y` is one message holding a line feed.
    assert parse(b'X UNSET "\n" y\n') == [Message("X", ["UNSET", "\n", "y"])]


def test_universal_string_with_several_lines_and_crlf_inside() -> None:
    data = b'X SET job "line 1\r\nline 2\n\nline 4"\r\nY PING\n'
    assert parse(data) == [
        Message("X", ["SET", "job", "line 1\r\nline 2\n\nline 4"]),
        Message("Y", ["PING"]),
    ]


# -- arguments ----------------------------------------------------------------


def test_escapes_in_universal_strings() -> None:
    assert parse(b'1 SET "a\\\\b" "say \\"hi\\"" "\\\\\\""\n') == [
        Message("1", ["SET", "a\\b", 'say "hi"', '\\"'])
    ]


def test_empty_universal_string_is_an_empty_argument() -> None:
    assert parse(b'1 SET "" ""\n') == [Message("1", ["SET", "", ""])]
    assert parse(b'"" PING\n') == [Message("", ["PING"])]


def test_tab_and_other_control_characters_are_ordinary_in_simple_strings() -> None:
    assert parse(b"1\tA B\x0bC\n") == [Message("1\tA", ["B\x0bC"])]


def test_utf8_arguments() -> None:
    assert parse('1 SET tâche.é "2026-01-01 00:00:00" "日本"\n'.encode()) == [
        Message("1", ["SET", "tâche.é", "2026-01-01 00:00:00", "日本"])
    ]


def test_arguments_are_case_sensitive() -> None:
    assert parse(b"a set Job\n") == [Message("a", ["set", "Job"])]


# -- line endings and empty lines ----------------------------------------------


def test_crlf_terminates_a_message() -> None:
    assert parse(b"A PING\r\nB VERSION\r\n") == [
        Message("A", ["PING"]),
        Message("B", ["VERSION"]),
    ]


def test_only_one_cr_before_the_lf_is_dropped() -> None:
    assert parse(b"A PING\r\r\n") == [Message("A", ["PING\r"])]
    assert parse(b'A "x"\r\n') == [Message("A", ["x"])]


def test_empty_and_blank_lines_are_ignored() -> None:
    assert parse(b"\n   \n\r\n \r\nA PING\n\n") == [Message("A", ["PING"])]


# -- errors and resynchronisation ---------------------------------------------


def test_lone_identifier_is_missing_its_instruction() -> None:
    assert parse(b"  42  \n") == [BadMessage("42", MISSING_INSTRUCTION)]
    assert parse(b'"my id"\r\n') == [BadMessage("my id", MISSING_INSTRUCTION)]


@pytest.mark.parametrize(
    ("line", "id"),
    [
        (b'A SET a"b"', "A"),
        (b'A SET "a"b', "A"),
        (b'A SET "a""b"', "A"),
        (b'A SET "a\\\\""b"', "A"),
        (b'a"b" PING', None),
        (b'"a"b PING', None),
    ],
)
def test_arguments_must_be_separated_by_spaces(line: bytes, id: str | None) -> None:
    assert parse(line + b"\n") == [BadMessage(id, MISSING_SPACE)]


@pytest.mark.parametrize("escape", [b"\\n", b"\\t", b"\\x41", b"\\ ", b"\\\n"])
def test_other_backslash_sequences_are_syntax_errors(escape: bytes) -> None:
    assert parse(b'A SET "x' + escape + b'y" z\n') == [BadMessage("A", INVALID_ESCAPE)]


def test_bad_escape_in_identifier_loses_the_identifier() -> None:
    assert parse(b'"a\\b" PING\n') == [BadMessage(None, INVALID_ESCAPE)]


def test_first_syntax_error_wins() -> None:
    assert parse(b'A "\\q" "a"b\n') == [BadMessage("A", INVALID_ESCAPE)]
    assert parse(b'A "a"b "\\q"\n') == [BadMessage("A", MISSING_SPACE)]


def test_parser_resynchronises_after_an_error() -> None:
    data = b'A\nB SET a"b" c\nC SET "bad \\q escape\n still in the string" x\nD PING\n'
    assert parse(data) == [
        BadMessage("A", MISSING_INSTRUCTION),
        BadMessage("B", MISSING_SPACE),
        BadMessage("C", INVALID_ESCAPE),
        Message("D", ["PING"]),
    ]


def test_escaped_quote_does_not_end_a_string() -> None:
    # The \" keeps the string open, so the first LF is inside it.
    data = b'A SET "x\\"\nB PING" \\q\nC PING\n'
    assert parse(data) == [
        Message("A", ["SET", 'x"\nB PING', "\\q"]),
        Message("C", ["PING"]),
    ]


def test_invalid_utf8() -> None:
    assert parse(b"A SET \xff\xfe PING\n") == [BadMessage("A", INVALID_UTF8)]
    assert parse(b'A SET "\xc3" PING\n') == [BadMessage("A", INVALID_UTF8)]
    assert parse(b"\xc3( SET x\n") == [BadMessage(None, INVALID_UTF8)]
    # The connection goes on.
    assert parse(b"A \xff\nB PING\n") == [BadMessage("A", INVALID_UTF8), Message("B", ["PING"])]


def test_syntax_errors_are_reported_before_invalid_utf8() -> None:
    assert parse(b'A \xff "a"b\n') == [BadMessage("A", MISSING_SPACE)]


# -- end of input ---------------------------------------------------------------


def test_close_reports_an_unterminated_universal_string() -> None:
    parser = KcpParser()
    parser.feed(b'A PING\nB SET "2026-01-01\n')
    assert parser.events() == [Message("A", ["PING"])]
    assert parser.close() == [BadMessage("B", UNTERMINATED_STRING)]


def test_close_with_unterminated_identifier_string() -> None:
    assert parse(b'  "abc def') == [BadMessage(None, UNTERMINATED_STRING)]


def test_close_reports_a_message_without_line_feed() -> None:
    assert parse(b"A PING\nB PING") == [
        Message("A", ["PING"]),
        BadMessage("B", UNTERMINATED_MESSAGE),
    ]


def test_close_with_nothing_pending_returns_nothing() -> None:
    parser = KcpParser()
    parser.feed(b"A PING\n   ")
    assert parser.events() == [Message("A", ["PING"])]
    assert parser.close() == []
    assert parser.close() == []
    parser.feed(b"B PING\n")
    assert parser.events() == []


def test_close_returns_events_not_yet_taken() -> None:
    parser = KcpParser()
    parser.feed(b"A PING\nB")
    assert parser.close() == [Message("A", ["PING"]), BadMessage("B", UNTERMINATED_MESSAGE)]


# -- incremental feeding ----------------------------------------------------------

PIPELINE = (
    b'1 SET app.a "2026-12-01 09:00:00"\r\n'
    b"2 GET app.a\n"
    b'3 SET "x y" "multi\nline \\"quoted\\" \\\\ text" payload\n'
    b"\n"
    b"4\n"
    b'5 SET a"b"\n'
    b'6 SET \xc3\xa9 "\xc3\xbc"\n'
    b'7 RULE SET r app. shell "/bin/true"\n'
)
PIPELINE_EVENTS = [
    Message("1", ["SET", "app.a", "2026-12-01 09:00:00"]),
    Message("2", ["GET", "app.a"]),
    Message("3", ["SET", "x y", 'multi\nline "quoted" \\ text', "payload"]),
    BadMessage("4", MISSING_INSTRUCTION),
    BadMessage("5", MISSING_SPACE),
    Message("6", ["SET", "é", "ü"]),
    Message("7", ["RULE", "SET", "r", "app.", "shell", "/bin/true"]),
]


def test_pipelined_messages_in_order() -> None:
    assert parse(PIPELINE) == PIPELINE_EVENTS


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    chunks = [PIPELINE[i : i + 1] for i in range(len(PIPELINE))]
    assert parse_in_chunks(chunks) == PIPELINE_EVENTS


def test_next_event_returns_events_one_at_a_time() -> None:
    parser = KcpParser()
    parser.feed(b"A PING\nB PI")
    assert parser.next_event() == Message("A", ["PING"])
    assert parser.next_event() is None
    parser.feed(b"NG\nC PING\n")
    assert parser.next_event() == Message("B", ["PING"])
    assert parser.events() == [Message("C", ["PING"])]
    assert parser.next_event() is None


def test_consumed_messages_are_dropped_from_the_buffer() -> None:
    parser = KcpParser()
    parser.feed(b"A PING\nB PING\nC PI")
    parser.events()
    assert parser.buffered == len(b"C PI")


# -- message size limit ---------------------------------------------------------------


def test_message_of_exactly_the_limit_is_accepted() -> None:
    line = b"A SET " + b"x" * 13 + b"\n"  # 20 bytes with its LF
    assert parse(line, max_message_bytes=20) == [Message("A", ["SET", "x" * 13])]
    assert parse(line + line, max_message_bytes=20) == [Message("A", ["SET", "x" * 13])] * 2


def test_message_over_the_limit_is_fatal() -> None:
    line = b"A SET " + b"x" * 14 + b"\n"  # 21 bytes with its LF
    assert parse(b"A PING\n" + line + b"B PING\n", max_message_bytes=20) == [
        Message("A", ["PING"]),
        FatalError("message exceeds 20 bytes"),
    ]


def test_limit_counts_the_lines_of_a_universal_string() -> None:
    data = b'A SET "' + b"0123456789\n" * 3 + b'"\n'
    assert parse(data, max_message_bytes=32) == [FatalError("message exceeds 32 bytes")]


@pytest.mark.parametrize(
    ("head", "endless"),
    [
        (b"A SET ", b"x" * 100),  # an endless line
        (b'A SET "', b"x" * 50),  # an endless string on one line
        (b'A SET "', b"line\n" * 20),  # an endless string over many lines
        (b'A SET "', b"\\\\\\\n" * 20),  # ... with escapes
    ],
)
def test_endless_message_is_fatal_with_bounded_memory(head: bytes, endless: bytes) -> None:
    limit = 1000
    parser = KcpParser(limit)
    parser.feed(b"A PING\n" + head)
    events = parser.events()
    for _ in range(10_000):
        parser.feed(endless)
        events += parser.events()
        assert parser.buffered < limit
        if events[-1:] == [FatalError("message exceeds 1000 bytes")]:
            break
    assert events == [Message("A", ["PING"]), FatalError("message exceeds 1000 bytes")]
    # The parser is done: nothing is held nor produced any more.
    parser.feed(b"B PING\n")
    assert parser.buffered == 0
    assert parser.events() == []
    assert parser.next_event() is None
    assert parser.close() == []


def test_oversize_detected_before_the_end_of_a_large_chunk() -> None:
    parser = KcpParser(100)
    parser.feed(b"A PING\n" + b"y" * 10_000)
    assert parser.events() == [Message("A", ["PING"]), FatalError("message exceeds 100 bytes")]
    assert parser.buffered == 0


def test_unterminated_message_at_the_limit_is_fatal_at_close() -> None:
    assert parse(b"A " + b"z" * 8, max_message_bytes=10) == [FatalError("message exceeds 10 bytes")]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KcpParser(0)


# -- encoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "encoded"),
    [
        ("OK", "OK"),
        ("app.job-1", "app.job-1"),
        ("32t\\ata", "32t\\ata"),  # backslash is ordinary in the simple form
        ("tab\there", "tab\there"),
        ("é", "é"),
        ("", '""'),
        ("2020-05-26 22:26:18", '"2020-05-26 22:26:18"'),
        ('"', '"\\""'),
        ('say "hi" \\o/', '"say \\"hi\\" \\\\o/"'),
        ("a\nb", '"a\nb"'),
        ("ends with cr\r", '"ends with cr\r"'),
    ],
)
def test_encode_arg(arg: str, encoded: str) -> None:
    assert encode_arg(arg) == encoded


def test_encode_message() -> None:
    assert encode_message("7", ["GET", "my job"]) == b'7 GET "my job"\n'
    assert encode_message("my id", ["PING"]) == b'"my id" PING\n'
    with pytest.raises(ValueError):
        encode_message("7", [])


def test_responses() -> None:
    assert ok("A") == b"A OK\n"
    assert ok("A", "PONG") == b"A OK PONG\n"
    assert ok("1", "planned", "2026-12-01 09:00:00") == b'1 OK planned "2026-12-01 09:00:00"\n'
    assert ok("") == b'"" OK\n'
    assert error("7", "unknown instruction FOO") == b'7 ERROR "unknown instruction FOO"\n'
    assert error(None, MISSING_SPACE) == b'* ERROR "missing space between arguments"\n'
    assert error("x y", "bad") == b'"x y" ERROR bad\n'


def test_responses_parse_back() -> None:
    assert parse(error("a b", "job is triggered")) == [
        Message("a b", ["ERROR", "job is triggered"])
    ]


# -- properties ------------------------------------------------------------------

# Any text (UTF-8 cannot encode lone surrogates), biased towards the
# characters that matter to the syntax.
syntax_text = st.text(
    st.sampled_from(' "\\\n\r\tx\u00e9') | st.characters(exclude_categories=["Cs"]),
    max_size=12,
)


@given(st.text(), st.lists(st.text(), min_size=1))
def test_encoded_messages_parse_back(id: str, args: list[str]) -> None:
    assert parse(encode_message(id, args)) == [Message(id, args)]


@given(
    st.lists(st.tuples(syntax_text, st.lists(syntax_text, min_size=1, max_size=5)), max_size=5),
    st.data(),
)
def test_encoded_pipelines_parse_back_in_any_chunks(
    messages: list[tuple[str, list[str]]], data: st.DataObject
) -> None:
    wire = b"".join(encode_message(id, args) for id, args in messages)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    assert parse_in_chunks(split_at(wire, cuts)) == [Message(id, args) for id, args in messages]


# Byte soup from the pieces that matter to the parser.
wire_soup = st.lists(
    st.sampled_from(
        [b" ", b"  ", b'"', b"\\", b"\n", b"\r", b"\r\n", b"a", b"SET", b"\xff", b"\xc3\xa9", b"\t"]
    ),
    max_size=40,
).map(b"".join)


@given(st.binary(max_size=300) | wire_soup, st.sampled_from([1, 4, 16, 1 << 20]), st.data())
def test_any_input_in_any_chunks_gives_events_only(
    wire: bytes, limit: int, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    events = parse_in_chunks(split_at(wire, cuts), limit)
    assert all(isinstance(event, Message | BadMessage | FatalError) for event in events)
    assert not any(isinstance(event, FatalError) for event in events[:-1])
    # Chunking never changes the result.
    assert events == parse(wire, limit)


@settings(max_examples=300)
@given(wire_soup, st.sampled_from([4, 16, 1 << 20]))
def test_parser_agrees_with_a_byte_by_byte_reading_of_the_rules(wire: bytes, limit: int) -> None:
    assert parse(wire, limit) == reference_parse(wire, limit)


def reference_parse(data: bytes, limit: int) -> list[Event]:
    """docs/protocol-kcp.md implemented the obvious way, one byte at a time."""
    events: list[Event] = []
    start, i, inside = 0, 0, False
    while i < len(data):
        byte = data[i : i + 1]
        if inside and byte == b"\\":
            i += 2  # a backslash takes the next byte with it, even a LF
            continue
        if byte == b'"':
            inside = not inside
        elif byte == b"\n" and not inside:
            if i + 1 - start > limit:
                return [*events, FatalError(f"message exceeds {limit} bytes")]
            message = data[start:i]
            event = reference_message(message[:-1] if message.endswith(b"\r") else message)
            if event is not None:
                events.append(event)
            start = i + 1
        i += 1
    pending = data[start:]
    if len(pending) >= limit:
        return [*events, FatalError(f"message exceeds {limit} bytes")]
    if pending.strip(b" "):
        tokens, reason = reference_tokenize(pending)
        events.append(BadMessage(reference_id(tokens), reason or UNTERMINATED_MESSAGE))
    return events


def reference_message(raw: bytes) -> Event | None:
    tokens, reason = reference_tokenize(raw)
    if reason:
        return BadMessage(reference_id(tokens), reason)
    try:
        args = [token.decode() for token in tokens]
    except UnicodeDecodeError:
        return BadMessage(reference_id(tokens), INVALID_UTF8)
    if not args:
        return None
    if len(args) == 1:
        return BadMessage(args[0], MISSING_INSTRUCTION)
    return Message(args[0], args[1:])


def reference_tokenize(raw: bytes) -> tuple[list[bytes], str | None]:
    tokens: list[bytes] = []
    i, n = 0, len(raw)
    while i < n:
        if raw[i : i + 1] == b" ":
            i += 1
            continue
        if raw[i : i + 1] == b'"':
            end = i + 1
            while end < n and raw[end : end + 1] != b'"':
                end += 2 if raw[end : end + 1] == b"\\" else 1
            if end >= n:
                return tokens, UNTERMINATED_STRING
            token, j = b"", i + 1
            while j < end:
                if raw[j : j + 1] == b"\\":
                    if raw[j + 1 : j + 2] not in (b"\\", b'"'):
                        return tokens, INVALID_ESCAPE
                    j += 1
                token += raw[j : j + 1]
                j += 1
            i = end + 1
        else:
            end = i
            while end < n and raw[end : end + 1] not in (b" ", b'"'):
                end += 1
            token, i = raw[i:end], end
        if i < n and raw[i : i + 1] != b" ":
            return tokens, MISSING_SPACE
        tokens.append(token)
    return tokens, None


def reference_id(tokens: list[bytes]) -> str | None:
    try:
        return tokens[0].decode() if tokens else None
    except UnicodeDecodeError:
        return None
