"""Record encoding, framing and decoding (pure, no files)."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from kairoi_trio.model import AmqpRunner, HttpRunner, Job, Rule, RulePolicy, ShellRunner, Status
from kairoi_trio.storage.records import (
    FRAME,
    JobDelete,
    JobPut,
    JobStatus,
    RuleDelete,
    RulePut,
    decode_records,
    encode_record,
    encode_records,
    make_job,
    replay_into,
)

JOB = Job(
    "app.domain.job.0001", 1_700_000_000_000_000, Status.FAILED, b"\x00payload", 3, "exit 1", 5
)
RULES = [
    Rule("r1", "app.", ShellRunner("/bin/true")),
    Rule("r2", "", AmqpRunner("amqp://u:p@h:5672/v", "ex", "rk"), RulePolicy(timeout_s=2.5)),
    Rule("r3", "x", HttpRunner("http://h/x"), RulePolicy(max_attempts=3, stale_after_s=60.0)),
]
ALL = [
    JobPut(JOB),
    JobPut(Job("j", 0)),
    JobStatus("j", Status.TRIGGERED, 1, "", 7),
    JobStatus("é✓", Status.EXECUTED, 2, "HTTP 200 — ok", -1),
    JobDelete("j"),
    *(RulePut(rule) for rule in RULES),
    RuleDelete("r1"),
]


def test_every_record_type_round_trips() -> None:
    data = encode_records(ALL)
    result = decode_records(data, 0)
    assert result.error is None
    assert result.end == len(data)
    assert result.records == ALL


def test_frame_layout_is_length_crc_payload() -> None:
    data = encode_record(JobDelete("abc"))
    length, crc = FRAME.unpack_from(data, 0)
    payload = data[8:]
    assert length == len(payload) == 4
    assert crc == zlib.crc32(payload)


def test_decode_from_an_offset_and_memoryview() -> None:
    data = b"junk" + encode_records(ALL[:3])
    result = decode_records(memoryview(data), 4)
    assert result.records == ALL[:3]
    assert result.end == len(data)


def test_make_job_equals_the_dataclass_constructor() -> None:
    assert make_job(*(getattr(JOB, name) for name in JOB.__slots__)) == JOB


@given(
    id=st.text(min_size=1, max_size=300),
    execute_at=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    status=st.sampled_from(list(Status)),
    payload=st.binary(max_size=2000),
    attempts=st.integers(min_value=0, max_value=2**32 - 1),
    outcome=st.text(max_size=100),
    updated_at=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_job_put_round_trips(
    id, execute_at, status, payload, attempts, outcome, updated_at
) -> None:
    job = Job(id, execute_at, status, payload, attempts, outcome, updated_at)
    data = encode_record(JobPut(job))
    assert decode_records(data, 0).records == [JobPut(job)]
    jobs: dict = {}
    assert replay_into(data, 0, jobs, {}).error is None
    assert jobs == {id: job}


def test_incomplete_frames_are_reported_at_their_offset() -> None:
    good = encode_records(ALL[:2])
    last = encode_record(JobPut(JOB))
    for cut in range(len(last)):
        data = good + last[:cut]
        result = decode_records(data, 0)
        assert result.records == ALL[:2]
        assert result.end == len(good)
        if cut == 0:
            assert result.error is None
        else:
            assert result.error is not None
            assert result.error.offset == len(good)
            assert result.error.incomplete, (cut, result.error)
            replayed = replay_into(data, 0, {}, {})
            assert replayed.end == len(good) and replayed.error == result.error


def test_flipped_byte_is_a_checksum_error_not_incomplete() -> None:
    data = bytearray(encode_records(ALL))
    second = len(encode_record(ALL[0]))
    data[second + 12] ^= 0x40
    result = decode_records(bytes(data), 0)
    assert result.records == ALL[:1]
    assert result.error is not None
    assert result.error.offset == second
    assert not result.error.incomplete
    assert "checksum" in result.error.reason


def test_corrupted_length_pointing_past_the_end_is_not_taken_for_a_torn_write() -> None:
    data = bytearray(encode_records([JobPut(JOB), JobPut(JOB), JobPut(JOB)]))
    size = len(encode_record(JobPut(JOB)))
    data[size + 2] = 0x01  # length of the 2nd frame grows by 64 KiB: past the end of the data
    error = decode_records(bytes(data), 0).error
    assert error is not None and error.offset == size
    assert not error.incomplete
    assert "disagrees" in error.reason


def test_zero_length_frame_is_an_error() -> None:
    error = decode_records(bytes(16), 0).error
    assert error is not None and error.offset == 0 and not error.incomplete


def test_valid_checksum_but_unknown_type_is_malformed() -> None:
    payload = b"\x63hello"
    data = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    error = decode_records(data, 0).error
    assert error is not None and "unknown record type" in error.reason


def test_replay_applies_status_over_put_keeping_payload() -> None:
    jobs: dict = {}
    rules: dict = {}
    data = encode_records(
        [
            JobPut(JOB),
            JobStatus(JOB.id, Status.EXECUTED, 4, "ok", 99),
            JobStatus("ghost", Status.EXECUTED, 1, "", 1),
            *(RulePut(rule) for rule in RULES),
            RuleDelete("r2"),
        ]
    )
    result = replay_into(data, 0, jobs, rules)
    assert result.error is None and result.records == 7 and result.orphan_status == 1
    assert jobs[JOB.id] == Job(JOB.id, JOB.execute_at, Status.EXECUTED, JOB.payload, 4, "ok", 99)
    assert rules == {"r1": RULES[0], "r3": RULES[2]}
