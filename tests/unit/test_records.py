"""Record encoding, framing and decoding (pure, no files)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kairoi_trio.model import AmqpRunner, HttpRunner, Job, Rule, RulePolicy, ShellRunner, Status
from kairoi_trio.storage.records import (
    FORMAT_VERSION,
    FRAME,
    FRAME_SIZE,
    FRAME_V1,
    HEADER_SIZE,
    FrameError,
    JobDelete,
    JobPut,
    JobStatus,
    Record,
    RuleDelete,
    RulePut,
    apply_record,
    decode_records,
    encode_job,
    encode_record,
    encode_records,
    find_frame,
    frame,
    make_job,
    replay_into,
)

FIXTURE_V1 = Path(__file__).parent.parent / "fixtures" / "data-v1"
JOB = Job(
    "app.domain.job.0001", 1_700_000_000_000_000, Status.FAILED, b"\x00payload", 3, "exit 1", 5
)
RULES = [
    Rule("r1", "app.", ShellRunner("/bin/true")),
    Rule("r2", "", AmqpRunner("amqp://u:p@h:5672/v", "ex", "rk"), RulePolicy(timeout_s=2.5)),
    Rule("r3", "x", HttpRunner("http://h/x"), RulePolicy(max_attempts=3, stale_after_s=60.0)),
]
ALL: list[Record] = [
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


def test_frame_layout_is_length_length_crc_payload_crc_payload() -> None:
    data = encode_record(JobDelete("abc"))
    length, length_crc, crc = FRAME.unpack_from(data, 0)
    payload = data[12:]
    assert length == len(payload) == 4
    assert length_crc == zlib.crc32(data[0:4])
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
    data = bytearray(encode_records([JobPut(JOB), RulePut(RULES[0]), JobDelete("x")]))
    size = len(encode_record(JobPut(JOB)))
    data[size + 2] = 0x01  # length of the 2nd frame grows by 64 KiB: past the end of the data
    error = decode_records(bytes(data), 0).error
    assert error is not None and error.offset == size
    assert not error.incomplete
    assert "header checksum" in error.reason


def test_every_bit_flip_in_a_frame_header_is_a_header_error() -> None:
    records: list[Record] = [
        JobPut(JOB),
        RulePut(RULES[1]),
        JobStatus("j", Status.TRIGGERED, 1, "", 7),
    ]
    clean = encode_records(records)
    sizes = [len(encode_record(r)) for r in records]
    starts = [sum(sizes[:i]) for i in range(len(records))]
    for index, start in enumerate(starts):
        for bit in range(8 * 8):  # the length and its check; the payload crc: below
            data = bytearray(clean)
            data[start + bit // 8] ^= 1 << (bit % 8)
            result = decode_records(bytes(data), 0)
            assert result.records == records[:index], (index, bit)
            assert result.error is not None and result.error.offset == start
            assert not result.error.incomplete, (index, bit, result.error)
            replayed = replay_into(bytes(data), 0, {}, {})
            assert replayed.error == result.error and replayed.end == start
        for bit in range(8 * 8, 12 * 8):
            data = bytearray(clean)
            data[start + bit // 8] ^= 1 << (bit % 8)
            error = decode_records(bytes(data), 0).error
            assert error == FrameError(start, "checksum mismatch", False), (index, bit)


def test_every_byte_of_a_payload_is_covered_by_its_checksum() -> None:
    records: list[Record] = [JobPut(JOB), RulePut(RULES[2]), JobDelete("some.job")]
    clean = encode_records(records)
    sizes = [len(encode_record(r)) for r in records]
    for index in range(len(records)):
        start = sum(sizes[:index])
        for pos in range(start + FRAME_SIZE, start + sizes[index]):
            data = bytearray(clean)
            data[pos] ^= 1 << (pos % 8)
            error = decode_records(bytes(data), 0).error
            assert error == FrameError(start, "checksum mismatch", False), (index, pos)
            assert replay_into(bytes(data), 0, {}, {}).error == error


def test_version_1_frames_decode_and_resynchronise() -> None:
    v1 = (FIXTURE_V1 / "segment-0000000002.log").read_bytes()
    result = decode_records(v1, HEADER_SIZE, version=1)
    assert result.error is None and len(result.records) == 8
    assert result.records[1] == RuleDelete("rule.gone")
    # A v1 file read as v2 fails at once: every frame header is 4 bytes shorter.
    assert decode_records(v1, HEADER_SIZE).error is not None
    second = HEADER_SIZE + 8 + FRAME_V1.unpack_from(v1, HEADER_SIZE)[0]
    assert find_frame(v1, HEADER_SIZE + 1, 1) == second


def test_find_frame_skips_damage_and_zeros() -> None:
    records: list[Record] = [JobPut(JOB), JobDelete("gone"), RulePut(RULES[0]), JobPut(Job("k", 1))]
    sizes = [len(encode_record(r)) for r in records]
    data = bytearray(encode_records(records))
    data[sizes[0] + 14] ^= 0x10  # damage the 2nd frame's payload
    damaged = b"garbage" + bytes(5000) + bytes(data)
    third = 7 + 5000 + sizes[0] + sizes[1]
    assert find_frame(damaged, 0, FORMAT_VERSION) == 5007
    assert find_frame(damaged, 5008, FORMAT_VERSION) == third
    assert decode_records(damaged, third).records == records[2:]
    assert find_frame(damaged, third + 1, FORMAT_VERSION) == third + sizes[2]
    assert find_frame(damaged, third + sizes[2] + 1, FORMAT_VERSION) is None
    # Lengths that are multiples of 256 start with a zero byte: still found after zeros.
    framed = encode_record(JobPut(Job("z" * (256 - 34), 1)))  # 34: the JobPut header
    assert framed[0] == 0
    assert find_frame(bytes(3000) + framed, 0, FORMAT_VERSION) == 3000


def test_zero_length_frame_is_an_error() -> None:
    error = decode_records(bytes(16), 0).error
    assert error is not None and error.offset == 0 and not error.incomplete


def test_valid_checksum_but_unknown_type_is_malformed_naming_the_version() -> None:
    payload = b"\x63hello"
    data = frame(payload)
    error = decode_records(data, 0).error
    assert error is not None and not error.incomplete
    assert f"unknown record type 99 in a format-version-{FORMAT_VERSION} file" in error.reason
    v1 = FRAME_V1.pack(len(payload), zlib.crc32(payload)) + payload
    error = decode_records(v1, 0, version=1).error
    assert error is not None and "unknown record type 99 in a format-version-1 file" in error.reason


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


_ids = st.sampled_from([f"job.{i}" for i in range(6)])
_statuses = st.sampled_from(list(Status))
_outcomes = st.sampled_from(["", "ok", "published to x/rk", "é failed: exit 1"])
_records = st.one_of(
    st.builds(
        lambda job_id, at, status, payload, attempts, outcome: JobPut(
            Job(job_id, at, status, payload, attempts, outcome, at - 7)
        ),
        _ids,
        st.integers(0, 2**62),
        _statuses,
        st.sampled_from([b"", b"{}", b"\xff"]),
        st.integers(0, 5),
        _outcomes,
    ),
    st.builds(JobStatus, _ids, _statuses, st.integers(0, 5), _outcomes, st.integers(0, 2**62)),
    st.builds(JobDelete, _ids),
)


@given(st.lists(_records, max_size=30))
def test_replay_matches_the_general_decoder_record_by_record(records: list[Record]) -> None:
    """The fast paths (JobPut, JobStatus in place) give the state, the count and the
    orphans that decoding each record and applying it give."""
    data = encode_records(records)
    fast: dict = {}
    result = replay_into(data, 0, fast, {})
    slow: dict = {}
    decoded = decode_records(data, 0)
    # Records only (a snapshot's end is never encoded here; apply_record would refuse one).
    records_decoded = cast("list[Record]", decoded.records)
    orphans = sum(not apply_record(slow, {}, record) for record in records_decoded)
    assert result.error is None and decoded.error is None
    assert (result.records, result.orphan_status) == (len(records), orphans)
    assert fast == slow


def test_a_status_record_with_a_bad_outcome_is_reported_by_the_general_path() -> None:
    good = encode_records([JobPut(JOB), JobStatus(JOB.id, Status.EXECUTED, 1, "ok", 5)])
    bad = bytearray(encode_records([JobStatus(JOB.id, Status.EXECUTED, 1, "ok", 5)]))
    bad[-2:] = b"\xff\xfe"  # not UTF-8: the frame's checksum is then made to match
    payload = bytes(bad[FRAME_SIZE:])
    data = good + frame(payload)
    result = replay_into(data, 0, {}, {})
    assert result.records == 2 and result.end == len(good)
    assert result.error is not None and "undecodable record" in result.error.reason


def test_replay_shares_one_updated_at_object_among_a_run_of_equal_values() -> None:
    """Jobs of one group commit carry the same updated_at: replay keeps one int
    object for them (32 bytes a job at 10 million jobs), values unchanged."""
    at = 1_800_000_000_000_000  # far above the small ints Python caches
    jobs_in = [Job(f"j{i}", at + i, updated_at=at if i < 3 else at + 1) for i in range(5)]
    jobs: dict = {}
    result = replay_into(encode_records([JobPut(j) for j in jobs_in]), 0, jobs, {})
    assert result.error is None and list(jobs.values()) == jobs_in
    first, second, third, fourth, fifth = jobs.values()
    assert first.updated_at is second.updated_at is third.updated_at
    assert fourth.updated_at is fifth.updated_at
    assert fourth.updated_at is not third.updated_at


def test_recurring_jobs_round_trip_and_a_bad_schedule_is_named() -> None:
    """Type 7 (format 4): every field of a recurring job comes back, by the fast path
    of replay and by the general decoder; a checksummed record whose schedule is not
    a schedule stops replay with the reason, as any malformed record does."""
    from kairoi_trio.model import Misfire, Overlap, Recurrence, Schedule

    schedule = Schedule(
        "every 90s",
        tz="Europe/Paris",
        start=5_000_000,
        end=9_000_000_000,
        max_runs=7,
        jitter_us=3,
        misfire=Misfire.ALL,
        catchup_window_us=60_000_000,
        overlap=Overlap.BUFFER_ONE,
    )
    recurrence = Recurrence(schedule, 95_000_000, 4, 2, True, True, True, 7, 8, 9, 1)
    job = Job("r.é", 95_000_003, Status.TRIGGERED, b"\x00p", 2, "exit 1", 42, recurrence)
    framed = encode_job(job)
    jobs: dict[str, Job] = {}
    assert replay_into(framed, 0, jobs, {}, FORMAT_VERSION).error is None
    assert jobs == {"r.é": job}
    assert decode_records(framed).records == [JobPut(job)]
    body = framed[FRAME_SIZE:].replace(b'"every 90s"', b'"every 90s",', 1)
    bad = frame(body)
    jobs = {}
    result = replay_into(bad, 0, jobs, {}, FORMAT_VERSION)
    assert jobs == {} and result.error is not None and not result.error.incomplete
    assert "undecodable record" in result.error.reason


# -- job chunks (type 8, format 7) ------------------------------------------------------

from kairoi_trio.model import Recurrence, Schedule  # noqa: E402
from kairoi_trio.storage.records import (  # noqa: E402
    CHUNK_JOBS,
    T_JOB_CHUNK,
    JobChunk,
    encode_job_chunk,
    encode_jobs,
)

TIME = 1_800_000_000_000_000
job_ids = st.text(min_size=1, max_size=12).filter(lambda s: "\0" not in s)
plain_jobs = st.builds(
    Job,
    job_ids,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(list(Status)),
    st.just(b""),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.just(""),
    st.sampled_from([0, TIME, TIME + 1, -5, 2**63 - 1]),
)
other_jobs = st.builds(
    Job,
    st.text(min_size=1, max_size=8),  # NUL allowed: such a job is a record of its own
    st.integers(min_value=0, max_value=2**62),
    st.sampled_from(list(Status)),
    st.binary(max_size=5),
    st.integers(min_value=0, max_value=9),
    st.sampled_from(["", "exit 0"]),
    st.integers(min_value=0, max_value=2**62),
    st.sampled_from([None, Recurrence(Schedule("every 90s"), 5)]),
)


def replayed(data: bytes) -> dict[str, Job]:
    jobs: dict[str, Job] = {}
    result = replay_into(data, 0, jobs, {})
    assert result.error is None and result.end == len(data)
    return jobs


@given(st.lists(st.one_of(plain_jobs, other_jobs), max_size=40, unique_by=lambda job: job.id))
def test_snapshot_jobs_round_trip_through_chunks_and_records(jobs_in: list[Job]) -> None:
    """encode_jobs: plain jobs in chunks, the others (payload, outcome, recurrence, an
    id with NUL) one record each; replay and the general decoder give them all back,
    with the same values (a snapshot's jobs come from a dict: ids are unique)."""
    expected = {job.id: job for job in jobs_in}
    data = b"".join(encode_jobs(jobs_in))
    jobs = replayed(data)
    assert jobs == expected
    decoded = decode_records(data)
    assert decoded.error is None
    rebuilt: dict[str, Job] = {}
    for record in decoded.records:
        if isinstance(record, JobChunk):
            rebuilt.update((job.id, job) for job in record.jobs)
        else:
            assert isinstance(record, JobPut)
            rebuilt[record.job.id] = record.job
    assert rebuilt == expected and list(rebuilt) == list(jobs)


def test_chunks_hold_plain_jobs_many_a_frame_and_share_updated_at() -> None:
    jobs_in = [
        Job(f"pre.{i}", TIME + i, updated_at=TIME + i // 1000) for i in range(CHUNK_JOBS + 5)
    ]
    jobs_in[7] = Job("pay", 5, payload=b"x")
    frames = list(encode_jobs(jobs_in))
    assert len(frames) == 3  # a full chunk, its record apart, then a chunk of 5
    assert [f[FRAME_SIZE] for f in frames] == [T_JOB_CHUNK, 1, T_JOB_CHUNK]
    jobs = replayed(b"".join(frames))
    assert jobs == {job.id: job for job in jobs_in}
    assert jobs["pre.0"].updated_at is jobs["pre.999"].updated_at  # one int for a run
    assert jobs["pre.999"].updated_at is not jobs["pre.1000"].updated_at
    for bad in ([], [Job("pay", 5, payload=b"x")], [Job("a\0b", 5)]):
        with pytest.raises(ValueError):
            encode_job_chunk(bad)


def test_long_ids_split_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from kairoi_trio.storage import records

    monkeypatch.setattr(records, "CHUNK_ID_BYTES", 100)
    jobs_in = [Job("x" * 30 + str(i), i) for i in range(10)]
    frames = list(encode_jobs(jobs_in))
    assert len(frames) > 3 and all(f[FRAME_SIZE] == T_JOB_CHUNK for f in frames)
    assert replayed(b"".join(frames)) == {job.id: job for job in jobs_in}


def test_a_torn_or_damaged_chunk_is_reported_never_half_applied() -> None:
    """A chunk is one frame: cut anywhere, it is an incomplete frame; any flipped byte
    fails its checksum; nothing of it is applied either way."""
    jobs_in = [Job(f"j{i}", TIME + i, Status.PLANNED, b"", i % 3, "", TIME) for i in range(50)]
    head = encode_job(Job("before", 1, payload=b"p"))
    chunk = encode_job_chunk(jobs_in)
    data = head + chunk
    for cut in range(len(head) + 1, len(data)):
        jobs: dict[str, Job] = {}
        result = replay_into(data[:cut], 0, jobs, {})
        assert list(jobs) == ["before"] and result.end == len(head)
        assert result.error is not None and result.error.incomplete
        assert decode_records(data[:cut]).error == result.error
    for position in range(len(head), len(data), 7):
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        jobs = {}
        result = replay_into(bytes(damaged), 0, jobs, {})
        assert list(jobs) == ["before"] and result.error is not None
        assert not (result.error.incomplete and position >= len(head) + FRAME_SIZE)


def malformed(body: bytes) -> str:
    """The reason replay gives for a chunk whose checksum is right but content is not."""
    jobs: dict[str, Job] = {}
    result = replay_into(frame(body), 0, jobs, {})
    assert jobs == {} and result.error is not None and not result.error.incomplete
    assert decode_records(frame(body)).error == result.error
    return result.error.reason


def test_a_checksummed_but_inconsistent_chunk_is_malformed() -> None:
    body = encode_job_chunk([Job("a", 1), Job("b", 2, Status.FAILED)])[FRAME_SIZE:]
    status = 14 + 3 + 16  # header, "a\0b", two execute_at: the first status code
    assert body[status : status + 2] == b"\x01\x04"

    def changed(at: int, new: bytes) -> bytes:
        return body[:at] + new + body[at + len(new) :]

    assert "3 ids" in malformed(body.replace(b"a\0b", b"a\0\0"))
    assert "status code" in malformed(changed(status, b"\x09"))
    assert "status code" in malformed(changed(status + 1, b"\x00"))
    assert "add up" in malformed(body + b"\0")
    assert "inconsistent" in malformed(changed(1, b"\x01"))  # the reserved byte
    assert "inconsistent" in malformed(changed(2, b"\x00\x00\x00\x00"))  # no job
    assert "runs" in malformed(changed(len(body) - 4, b"\x03\x00\x00\x00"))
    assert "utf-8" in malformed(body.replace(b"a\0b", b"\xff\0b"))
