"""import-kairoi: the reader of Kairoi's log files and the import into a real store.

Kairoi's files are written by tests/support/kairoi_files.py, byte for byte as
Kairoi's encoder writes them (and, for the first test, Kairoi's own test
vectors), not by the code under test. The store is a real DurableLog directory.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from support import kairoi_files as k

from kairoi_trio.core.validation import RuleValidator
from kairoi_trio.migration import add_import_command, run_import_command
from kairoi_trio.migration.kairoi_import import (
    OUTCOME_IMPORTED,
    OUTCOME_RETRIGGERED,
    KairoiImportError,
    convert_job,
    ns_to_us,
    plan_import,
    read_kairoi_directory,
)
from kairoi_trio.migration.kairoi_log import (
    MAX_ENTRY,
    KairoiFormatError,
    KairoiJob,
    KairoiRule,
    KairoiState,
    LogfileParser,
    TornEntry,
)
from kairoi_trio.model import (
    AmqpRunner,
    Job,
    Rule,
    RulePolicy,
    ShellRunner,
    Status,
    to_datetime,
)
from kairoi_trio.storage.log import DurableLog, LoadedState

NOV_15 = k.seconds("2020-11-15 16:30:00")


def parse(data: bytes, source: str = "f", chunk: int | None = None):
    """Feed `data` (all at once, or in chunks of `chunk` bytes); return (entries, torn end)."""
    parser = LogfileParser(source)
    entries = []
    step = chunk or max(len(data), 1)
    for start in range(0, len(data), step):
        entries += parser.feed(data[start : start + step])
    return entries, parser.close()


def parse_error(data: bytes, chunk: int | None = None) -> KairoiFormatError:
    with pytest.raises(KairoiFormatError) as caught:
        parse(data, "logfile", chunk)
    return caught.value


# -- the format ---------------------------------------------------------------------


def test_kairois_own_test_vectors() -> None:
    """encoder.rs's test_decode vectors, framed as logfile/encoding.rs frames them."""
    vectors = [
        [0, 0, 4, 116, 111, 116, 111, 22, 71, 187, 92, 238, 225, 80, 0, 0],
        [0, 0, 5, 116, 97, 116, 97, 116, 22, 71, 187, 92, 238, 225, 80, 0, 2],
        [1, 0, 1, 116, 0, 4, 116, 111, 116, 111, 0, 0, 4, 116, 105, 116, 105],
        [1, 0, 2, 116, 97, 0, 3, 116, 111, 116, 1, 0, 5, 116, 105, 116, 105, 116, 0, 0, 0, 1, 97],
    ]
    entries, torn = parse(b"".join(k.frame(bytes(v)) for v in vectors))
    assert torn is None
    assert entries == [
        KairoiJob("toto", NOV_15, Status.PLANNED),
        KairoiJob("tatat", NOV_15, Status.EXECUTED),
        KairoiRule("t", "toto", ShellRunner("titi")),
        KairoiRule("ta", "tot", AmqpRunner("titit", "", "a")),
    ]
    assert [e.offset for e in entries] == [0, 20, 41, 62]
    assert to_datetime(ns_to_us(entries[0].execute_at_ns)) == datetime(
        2020, 11, 15, 16, 30, tzinfo=UTC
    )


def test_every_entry_kind_in_chunks_of_any_size() -> None:
    data = (
        k.job("j.planned", NOV_15, "planned")
        + k.job("j.triggered", NOV_15 + 1, "triggered")
        + k.job("j.executed", NOV_15 + 2, "executed")
        + k.job("j.failed", NOV_15 + 3, "failed")
        + k.job("j.ünïcødé ✓", NOV_15, "planned")
        + k.shell_rule("r.shell", "j.", "/usr/local/bin/run job.sh")
        + k.amqp_rule("r.amqp", "", "amqp://u:p@host:5672/vh", "jobs", "key.1")
        + k.shell_rule("r.empty", "", "")
    )
    whole, torn = parse(data)
    assert torn is None
    assert [(e.id, e.status) for e in whole[:5]] == [
        ("j.planned", Status.PLANNED),
        ("j.triggered", Status.TRIGGERED),
        ("j.executed", Status.EXECUTED),
        ("j.failed", Status.FAILED),
        ("j.ünïcødé ✓", Status.PLANNED),
    ]
    assert [e.execute_at_ns for e in whole[:4]] == [NOV_15, NOV_15 + 1, NOV_15 + 2, NOV_15 + 3]
    assert whole[5:] == [
        KairoiRule("r.shell", "j.", ShellRunner("/usr/local/bin/run job.sh")),
        KairoiRule("r.amqp", "", AmqpRunner("amqp://u:p@host:5672/vh", "jobs", "key.1")),
        KairoiRule("r.empty", "", ShellRunner("")),
    ]
    for chunk in (1, 2, 3, 5, 7, 64):
        entries, torn = parse(data, chunk=chunk)
        assert torn is None
        assert entries == whole
        assert [e.offset for e in entries] == [e.offset for e in whole]


def test_longest_strings_kairoi_can_write() -> None:
    long_id = "j" * 65_535
    data = k.job(long_id, NOV_15) + k.amqp_rule("r", "p" * 65_535, "d" * 65_535, "e", "k" * 65_535)
    entries, torn = parse(data, chunk=4096)
    assert torn is None
    assert entries[0].id == long_id
    assert entries[1].pattern == "p" * 65_535


@pytest.mark.parametrize(
    ("ns", "expected_us", "year"),
    [
        (-(2**63), -9_223_372_036_854_775, 1677),  # Kairoi's earliest time
        (2**63 - 1, 9_223_372_036_854_776, 2262),  # and its latest, rounded up
        (-1, 0, 1970),
        (1, 1, 1970),
        (999, 1, 1970),
        (1000, 1, 1970),
        (-1001, -1, 1969),
    ],
)
def test_i64_extremes_and_rounding_up_to_microseconds(ns: int, expected_us: int, year: int) -> None:
    (entry,), torn = parse(k.job("j", ns))
    assert torn is None
    assert entry.execute_at_ns == ns
    job = convert_job(entry, now=0)
    assert job.execute_at == expected_us
    assert job.execute_at * 1000 >= ns  # never earlier than Kairoi would have run it
    assert to_datetime(job.execute_at).year == year  # inside kairoi-trio's 0001..9999


def test_a_time_outside_0001_to_9999_is_refused_naming_the_job() -> None:
    """No i64 of nanoseconds is (see above); plan_import still guards its other callers."""
    state = KairoiState()
    state.add([KairoiJob("far", 10**30, Status.PLANNED, "logfile", 40)])
    plan = plan_import(
        state,
        existing_jobs={},
        existing_rules={},
        validate_rule=RuleValidator(),
        max_payload_bytes=1024,
        now=0,
    )
    assert plan.jobs == {}
    assert [str(refused) for refused in plan.refused] == [
        "job 'far' (logfile, offset 40): the execution time is outside the supported range "
        "0001-01-01 to 9999-12-31"
    ]


# -- damage before the end: an error naming file and offset ----------------------------

GOOD = k.job("a", NOV_15) + k.shell_rule("r", "a", "x")  # 17 + 17 bytes
AFTER = k.job("b", NOV_15)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (k.frame(b"\x02" + k.string("x")), "unknown entry type 2"),
        (k.frame(b"\xff"), "unknown entry type 255"),
        (k.job("x", NOV_15, 4), "unknown job status 4"),
        (k.frame(b"\x01" + k.string("r") + k.string("p") + b"\x02" + k.string("c")), "runner"),
        (k.job(b"bad\xff", NOV_15), "job id is not valid UTF-8"),
        (k.shell_rule("r", b"p\xc3", "c"), "rule pattern is not valid UTF-8"),
        (k.shell_rule("r", "p", b"\xed\xa0\x80"), "shell command is not valid UTF-8"),  # surrogate
        (k.frame(b"\x00" + k.string("x") + b"\x00" * 9 + b"!"), "does not fit a job entry"),
        (k.frame(k.shell_rule("r", "p", "c")[4:] + b"!!"), "2 bytes after the end of the rule"),
        (k.frame(b"\x01" + k.string("r") + b"\x00\x09p"), "rule pattern (9 bytes) runs past"),
        (k.frame(b"\x01" + k.string("r")), "length of the rule pattern runs past"),
        (k.frame(b""), "empty entry"),
        (struct.pack(">I", MAX_ENTRY + 1), "larger than any entry"),
    ],
)
def test_damage_before_the_end_names_file_and_offset(bad: bytes, reason: str) -> None:
    for chunk in (None, 1, 5):
        error = parse_error(GOOD + bad + AFTER, chunk)
        assert error.source == "logfile"
        assert error.offset == len(GOOD)
        assert reason in error.reason
        assert str(error).startswith(f"logfile: offset {len(GOOD)}: ")


def test_a_frame_length_too_large_for_its_job_fails_at_once() -> None:
    """Mid-file damage to a length field is not mistaken for a torn write at the end."""
    damaged = bytearray(GOOD + AFTER)
    damaged[len(GOOD) + 3] = 200  # job "b" now claims 200 bytes: more than the file holds
    error = parse_error(bytes(damaged))
    assert error.offset == len(GOOD)
    assert "does not fit a job entry with a 1-byte id" in error.reason


# -- a torn end: skipped with a warning -----------------------------------------------


@pytest.mark.parametrize(
    "cut",
    [1, 3, 4, 5, 7, 9, 12, 15],  # inside the length field, the id length, the id, the time
)
def test_a_torn_final_job_is_reported_and_the_entries_before_kept(cut: int) -> None:
    last = k.job("job.9", NOV_15)
    for chunk in (None, 1, 4):
        entries, torn = parse(GOOD + last[:cut], "logfile", chunk)
        assert entries == [
            KairoiJob("a", NOV_15, Status.PLANNED),
            KairoiRule("r", "a", ShellRunner("x")),
        ]
        assert torn == TornEntry("logfile", len(GOOD), cut, torn.reason)


@pytest.mark.parametrize("cut", range(1, 24))
def test_a_torn_final_rule_is_reported_wherever_it_was_cut(cut: int) -> None:
    last = k.amqp_rule("rule", "é", "amqp://h", "x", "k")
    assert cut < len(last)
    entries, torn = parse(GOOD + last[:cut])
    assert len(entries) == 2
    assert torn is not None and torn.offset == len(GOOD)


def test_a_torn_write_may_cut_a_character_in_two() -> None:
    last = k.job("ü", NOV_15)  # id bytes c3 bc
    _, torn = parse(GOOD + last[: 4 + 1 + 2 + 1])
    assert torn is not None and torn.offset == len(GOOD)


def test_zero_bytes_to_the_end_are_a_torn_end() -> None:
    entries, torn = parse(GOOD + b"\x00" * 100, chunk=7)
    assert len(entries) == 2
    assert torn is not None and (torn.offset, torn.size) == (len(GOOD), 100)
    assert "zero bytes" in torn.reason


@pytest.mark.parametrize(
    "tail",
    [
        k.frame(b"\x05" + b"x" * 10)[:8],  # an unknown type in the cut entry
        k.job(b"\xffbad", NOV_15)[:9],  # bad UTF-8 before the cut
        k.frame(b"\x01" + k.string("r") + k.string("p") + b"\x07" + k.string("c"))[:-1],  # runner
        b"\x00\x00\x00\x00" + b"\x00" * 10 + b"\x01",  # a zero run that does not last
    ],
)
def test_damage_in_the_last_entry_is_not_a_torn_write(tail: bytes) -> None:
    error = parse_error(GOOD + tail)
    assert error.offset == len(GOOD)


# -- the three files: latest entry wins -----------------------------------------------


def test_latest_entry_wins_across_the_three_files_in_kairois_order(tmp_path: Path) -> None:
    k.write(
        tmp_path,
        "logfile.compressed",
        k.job("only.compressed", NOV_15, "executed"),
        k.job("moved", NOV_15, "planned"),
        k.job("same.id", NOV_15, "failed"),
        k.shell_rule("r", "a.", "/old"),
        k.shell_rule("same.id", "x.", "/rule"),  # jobs and rules have separate ids
    )
    k.write(
        tmp_path,
        "logfile.to_compress",
        k.job("moved", NOV_15 + 10**9, "triggered"),
        k.shell_rule("r", "a.", "/newer"),
    )
    k.write(
        tmp_path,
        "logfile",
        k.job("moved", NOV_15 + 2 * 10**9, "executed"),
        k.job("moved", NOV_15 + 3 * 10**9, "planned"),
        k.amqp_rule("r", "b.", "amqp://h", "e", "k"),
    )
    data = read_kairoi_directory(tmp_path)
    jobs, rules = data.state.jobs, data.state.rules
    assert jobs["moved"] == KairoiJob("moved", NOV_15 + 3 * 10**9, Status.PLANNED)
    moved = jobs["moved"]
    assert (moved.source, moved.offset) == (str(tmp_path / "logfile"), 21)  # after 4 + 12 + 5
    assert jobs["only.compressed"].status is Status.EXECUTED
    assert jobs["same.id"].status is Status.FAILED
    assert rules["r"].runner == AmqpRunner("amqp://h", "e", "k")
    assert rules["same.id"].runner == ShellRunner("/rule")
    assert [(f.name, f.entries) for f in data.files] == [
        ("logfile.compressed", 5),
        ("logfile.to_compress", 2),
        ("logfile", 3),
    ]
    assert data.state.entries == 10


def test_missing_files_are_fine_but_one_is_needed(tmp_path: Path) -> None:
    k.write(tmp_path, "logfile.to_compress", k.job("a", NOV_15))
    assert list(read_kairoi_directory(tmp_path).state.jobs) == ["a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(KairoiImportError, match="none of Kairoi's log files"):
        read_kairoi_directory(tmp_path / "empty")
    with pytest.raises(KairoiImportError, match="not a directory"):
        read_kairoi_directory(tmp_path / "logfile.to_compress")


def test_torn_end_of_the_newest_file_is_skipped(tmp_path: Path) -> None:
    k.write(tmp_path, "logfile.compressed", k.job("a", NOV_15))
    k.write(tmp_path, "logfile", k.job("b", NOV_15), k.job("c", NOV_15)[:10])
    data = read_kairoi_directory(tmp_path)
    assert sorted(data.state.jobs) == ["a", "b"]
    torn = data.files[-1].torn
    assert torn is not None and torn.offset == 17 and torn.source == str(tmp_path / "logfile")


def test_torn_end_of_an_older_file_is_an_error(tmp_path: Path) -> None:
    k.write(tmp_path, "logfile.compressed", k.job("a", NOV_15), k.job("b", NOV_15)[:10])
    k.write(tmp_path, "logfile", k.job("c", NOV_15))
    with pytest.raises(KairoiFormatError) as caught:
        read_kairoi_directory(tmp_path)
    assert caught.value.source == str(tmp_path / "logfile.compressed")
    assert caught.value.offset == 17
    assert "not the newest file" in str(caught.value)


def test_files_changing_while_read_are_refused(tmp_path: Path) -> None:
    """Kairoi still running (it appends to `logfile`) is noticed, not half-imported."""
    k.write(tmp_path, "logfile.compressed", k.job("a", NOV_15))
    k.write(tmp_path, "logfile", k.job("b", NOV_15))

    def kairoi_appends(_: int) -> None:
        with open(tmp_path / "logfile", "ab") as f:
            f.write(k.job("c", NOV_15))

    with pytest.raises(KairoiImportError, match="changed while they were read"):
        read_kairoi_directory(tmp_path, progress=kairoi_appends)


# -- the command, in process, on a real store -------------------------------------------


def run(argv: list[str], cwd: Path | None = None) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="kairoi-trio")
    add_import_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import-kairoi", *argv])
    out, err = io.StringIO(), io.StringIO()
    status = run_import_command(args, out, err)
    return status, out.getvalue(), err.getvalue()


def read_store(directory: Path) -> LoadedState:
    async def load() -> LoadedState:
        store = DurableLog(directory)
        loaded = await trio.to_thread.run_sync(store.load)
        await store.aclose()
        return loaded

    return trio.run(load)


@pytest.fixture
def target(tmp_path: Path) -> tuple[Path, Path]:
    """(configuration file, data directory) of the kairoi-trio to import into."""
    data = tmp_path / "store"
    config = tmp_path / "configuration.toml"
    config.write_text(f'[storage]\ndirectory = "{data}"\nretention_s = 3600.0\n')
    return config, data


@pytest.fixture
def kairoi(tmp_path: Path) -> Path:
    directory = tmp_path / "kairoi"
    k.write(
        directory,
        "logfile.compressed",
        k.job("app.1", NOV_15, "executed"),
        k.job("app.2", NOV_15, "failed"),
        k.job("app.3", k.seconds("2099-01-01 00:00:00"), "planned"),
        k.shell_rule("app", "app.", "/bin/true"),
    )
    k.write(
        directory,
        "logfile",
        k.job("app.4", NOV_15, "planned"),
        k.job("app.4", NOV_15, "triggered"),
        k.amqp_rule("queue", "app.q.", "amqp://guest:guest@localhost:5672/%2f", "jobs", "rk"),
    )
    return directory


def test_import_writes_the_latest_state_and_prints_counts(
    kairoi: Path, target: tuple[Path, Path]
) -> None:
    config, data = target
    status, out, err = run([str(kairoi), "-c", str(config)])
    assert (status, err) == (0, "")
    loaded = read_store(data)
    jobs = loaded.jobs
    assert sorted(jobs) == ["app.1", "app.2", "app.3", "app.4"]
    assert (jobs["app.1"].status, jobs["app.1"].attempts) == (Status.EXECUTED, 1)
    assert jobs["app.1"].last_outcome == OUTCOME_IMPORTED
    assert jobs["app.2"].status is Status.FAILED
    assert jobs["app.3"] == Job(
        "app.3", k.seconds("2099-01-01 00:00:00") // 1000, updated_at=jobs["app.3"].updated_at
    )
    # Triggered when Kairoi stopped: planned again, so the server runs it (at least once).
    assert (jobs["app.4"].status, jobs["app.4"].attempts) == (Status.PLANNED, 0)
    assert jobs["app.4"].last_outcome == OUTCOME_RETRIGGERED
    assert loaded.rules == {
        "app": Rule("app", "app.", ShellRunner("/bin/true")),
        "queue": Rule(
            "queue", "app.q.", AmqpRunner("amqp://guest:guest@localhost:5672/%2f", "jobs", "rk")
        ),
    }
    assert f"Imported into {data}: 4 jobs, 2 rules (the latest of 7 entries)" in out
    assert "jobs by status: planned 1, triggered 1, executed 1, failed 1" in out
    assert "rules by runner: shell 1, amqp 1" in out
    assert "logfile.to_compress: not there" in out
    assert "1 job triggered when Kairoi stopped" in out
    assert "2 executed or failed jobs: kept for storage.retention_s (3600 s)" in out


def test_imported_rules_get_the_configured_default_policy(kairoi: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(
        f'[storage]\ndirectory = "{tmp_path / "s"}"\n[policy]\nmax_attempts = 3\ntimeout_s = 5.0\n'
    )
    assert run([str(kairoi), "-c", str(config)])[0] == 0
    policy = read_store(tmp_path / "s").rules["app"].policy
    assert policy == RulePolicy(timeout_s=5.0, max_attempts=3)


def test_a_store_with_data_is_refused_unless_merge(kairoi: Path, target: tuple[Path, Path]) -> None:
    config, data = target
    assert run([str(kairoi), "-c", str(config)])[0] == 0
    before = read_store(data)
    status, out, err = run([str(kairoi), "-c", str(config)])
    assert status == 1 and out == ""
    assert "already holds 4 jobs and 2 rules: use --merge" in err
    assert read_store(data).jobs == before.jobs


def test_merge_keeps_other_data_and_kairois_entries_win(
    kairoi: Path, target: tuple[Path, Path]
) -> None:
    config, data = target

    async def seed() -> None:
        from kairoi_trio.storage.records import JobPut, RulePut

        store = DurableLog(data)
        await trio.to_thread.run_sync(store.load)
        await store.append(
            [
                JobPut(Job("mine.1", 5)),
                JobPut(Job("app.3", 7, payload=b"will be replaced")),
                RulePut(Rule("app", "app.", ShellRunner("/bin/mine"))),
                RulePut(Rule("mine", "mine.", ShellRunner("/bin/mine"))),
            ]
        )
        await store.aclose()

    trio.run(seed)
    status, out, _ = run([str(kairoi), "-c", str(config), "--merge"])
    assert status == 0
    loaded = read_store(data)
    assert sorted(loaded.jobs) == ["app.1", "app.2", "app.3", "app.4", "mine.1"]
    assert loaded.jobs["app.3"].payload == b""
    assert loaded.jobs["mine.1"].execute_at == 5
    assert loaded.rules["app"].runner == ShellRunner("/bin/true")
    assert loaded.rules["mine"].runner == ShellRunner("/bin/mine")
    assert "replaced: 1 job and 1 rule the store already held" in out


def test_dry_run_writes_nothing(kairoi: Path, target: tuple[Path, Path]) -> None:
    config, data = target
    status, out, _ = run([str(kairoi), "-c", str(config), "--dry-run"])
    assert status == 0
    assert not data.exists()
    assert f"Would import into {data}: 4 jobs, 2 rules" in out
    assert out.endswith("Dry run: nothing was written.\n")
    # On an existing store too (it is read, to tell what would be replaced).
    assert run([str(kairoi), "-c", str(config)])[0] == 0
    (kairoi / "logfile").write_bytes(k.job("app.5", NOV_15))
    status, out, _ = run([str(kairoi), "-c", str(config), "--dry-run", "--merge"])
    assert status == 0 and "replaced: 3 jobs and 1 rule" in out
    assert "app.5" not in read_store(data).jobs


def test_entries_kairoi_trio_refuses_are_listed_and_nothing_written(
    kairoi: Path, tmp_path: Path
) -> None:
    config = tmp_path / "strict.toml"
    store = tmp_path / "strict-store"
    config.write_text(
        f'[storage]\ndirectory = "{store}"\n[runners.shell]\nallowed_commands = ["/bin/true"]\n'
    )
    k.write(
        kairoi,
        "logfile",
        k.job("", NOV_15),
        k.shell_rule("evil", "e.", "/bin/rm"),
        k.shell_rule("", "x.", "/bin/true"),
        k.amqp_rule("bad-dsn", "b.", "not a url", "e", "k"),
        k.job("app.ok", NOV_15),
    )
    status, out, err = run([str(kairoi), "-c", str(config)])
    assert status == 1 and out == ""
    logfile = kairoi / "logfile"
    assert f"refused: job '' ({logfile}, offset 0): job id must not be empty" in err
    assert f"refused: rule 'evil' ({logfile}, offset 16): " in err
    assert "'/bin/rm' is not in the allowed list" in err
    assert "refused: rule ''" in err and "refused: rule 'bad-dsn'" in err
    assert "4 entries kairoi-trio refuses (listed above); nothing was written" in err
    assert not (store / "LOCK").exists() or read_store(store).jobs == {}

    status, out, err = run([str(kairoi), "-c", str(config), "--skip-invalid"])
    assert status == 0
    assert "skipped: job ''" in err
    assert "skipped: 4 entries kairoi-trio refuses" in out
    loaded = read_store(store)
    assert sorted(loaded.jobs) == ["app.1", "app.2", "app.3", "app.ok"]
    assert sorted(loaded.rules) == ["app"]  # "queue" was in the logfile this test replaced


def test_a_torn_end_is_a_warning_and_damage_an_error(
    kairoi: Path, target: tuple[Path, Path]
) -> None:
    config, data = target
    logfile = kairoi / "logfile"
    good = logfile.read_bytes()
    logfile.write_bytes(good + k.job("app.9", NOV_15)[:7])
    status, out, err = run([str(kairoi), "-c", str(config), "--dry-run"])
    assert status == 0
    assert f"warning: {logfile}: offset {len(good)}: skipped a torn entry" in err
    assert "logfile: 3 entries (" in out and "torn end skipped" in out

    logfile.write_bytes(good[:25] + b"\x07" + good[26:])  # the type byte of the entry at 21
    status, out, err = run([str(kairoi), "-c", str(config)])
    assert status == 1 and out == ""
    assert err == (
        f"kairoi-trio import-kairoi: {logfile}: offset 21: "
        "unknown entry type 7 (0 is a job, 1 a rule)\n"
    )
    assert read_store(data).jobs == {}  # nothing written


def test_a_directory_held_by_a_server_is_refused(kairoi: Path, target: tuple[Path, Path]) -> None:
    config, data = target
    data.mkdir()
    fd = os.open(data / "LOCK", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running server holds
        status, out, err = run([str(kairoi), "-c", str(config)])
    finally:
        os.close(fd)
    assert status == 1 and out == ""
    assert f"the data directory {data} is in use by a running kairoi-trio server" in err
    assert not list(data.glob("snapshot-*"))


def test_bad_source_and_bad_config(kairoi: Path, target: tuple[Path, Path], tmp_path: Path) -> None:
    config, data = target
    status, _, err = run([str(tmp_path / "nowhere"), "-c", str(config)])
    assert status == 1 and "is not a directory" in err
    status, _, err = run([str(tmp_path), "-c", str(config)])
    assert status == 1 and "none of Kairoi's log files" in err
    assert not data.exists()  # refused before the store was touched
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nno_such_key = 1\n")
    status, _, err = run([str(kairoi), "-c", str(bad)])
    assert status == 2 and "no_such_key" in err


def test_an_unfinished_kairoi_compaction_file_is_ignored_with_a_warning(
    kairoi: Path, target: tuple[Path, Path]
) -> None:
    config, _ = target
    k.write(kairoi, "logfile.compressing", b"half-written garbage")
    status, _, err = run([str(kairoi), "-c", str(config)])
    assert status == 0
    assert "logfile.compressing ignored" in err
