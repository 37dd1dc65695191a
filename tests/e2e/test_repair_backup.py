"""`kairoi-trio backup` of a server that is writing, and `kairoi-trio repair` of a damaged store,
each followed by a real server starting on the result."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from support.kcp_client import KcpClient
from support.waiting import wait_for

from kairoi_trio.storage.records import FORMAT_VERSION, HEADER_SIZE, FrameError, decode_frame

FUTURE = "2099-01-01 00:00:00"
PAYLOAD = "p" * 60
# Small, so that the server compacts (and deletes files) again and again during the backup.
COMPACT_OFTEN = "[storage]\ncompact_after_bytes = 65536"


def kairoi_trio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def frames(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    out, pos = [], HEADER_SIZE
    while pos < len(data):
        result = decode_frame(data, pos)
        assert not isinstance(result, FrameError), result
        out.append((pos, result[1]))
        pos = result[1]
    return out


def test_backup_while_the_server_writes_has_every_job_acknowledged_before_it_began(
    make_server, tmp_path: Path
) -> None:
    server = make_server(COMPACT_OFTEN)
    acknowledged: list[str] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def write_until_stopped() -> None:
        try:
            with KcpClient(server.kcp_port) as kcp:
                n = 0
                while not stop.is_set():
                    ids = [f"w.{i:07d}" for i in range(n, n + 200)]
                    answers = kcp.pipeline([("SET", i, FUTURE, PAYLOAD) for i in ids])
                    assert answers == [["OK"]] * len(ids)
                    acknowledged.extend(ids)
                    n += len(ids)
        except BaseException as error:  # reported by the test below
            failures.append(error)

    writer = threading.Thread(target=write_until_stopped)
    writer.start()
    try:
        wait_for(lambda: len(acknowledged) >= 3000 or failures)
        before = list(acknowledged)  # acknowledged before the backup began
        dest = tmp_path / "restored" / "data"
        result = kairoi_trio("backup", str(dest), "-c", str(server.config_path))
    finally:
        stop.set()
        writer.join(30)
    assert not failures, failures
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified: " in result.stdout, result.stdout
    assert server.events("log compacted"), "the test meant to compact during the backup"

    restored = make_server(name="restored")  # its data directory is `dest`
    with KcpClient(restored.kcp_port) as kcp:
        answers = kcp.pipeline([("GET", i) for i in before])
    missing = [
        i for i, a in zip(before, answers, strict=True) if a != ["OK", "planned", FUTURE, PAYLOAD]
    ]
    assert missing == [], f"{len(missing)} acknowledged jobs missing from the backup"
    assert server.process is not None and server.process.poll() is None  # never disturbed


def test_damaged_snapshot_and_segment_repaired_into_a_directory_the_server_starts_on(
    make_server, tmp_path: Path
) -> None:
    server = make_server(COMPACT_OFTEN)
    ids = [f"r.{i:05d}" for i in range(2300)]
    with KcpClient(server.kcp_port) as kcp:
        for start in range(0, 2000, 250):
            batch = ids[start : start + 250]
            assert kcp.pipeline([("SET", i, FUTURE, PAYLOAD) for i in batch]) == [["OK"]] * 250
        assert kcp.request("RULE", "SET", "rule", "r.", "shell", "/bin/true") == ["OK"]
    assert server.stop() == 0
    assert server.events("log compacted")
    # Then without compaction, so that the newest segment surely holds records.
    server.extra_config = "[storage]\ncompact_after_bytes = 1073741824"
    server.start()
    with KcpClient(server.kcp_port) as kcp:
        batch = ids[2000:]
        assert kcp.pipeline([("SET", i, FUTURE, PAYLOAD) for i in batch]) == [["OK"]] * 300
    assert server.stop() == 0
    data = server.data_dir
    snapshot = max(data.glob("snapshot-*.snap"))
    segment = max(data.glob("segment-*.log"))
    # Damage one record of the snapshot (a payload bit) and one of the newest segment
    # (a length bit: what used to pass for a torn tail and cut everything after it).
    snap_start, snap_end = frames(snapshot)[100]
    raw = bytearray(snapshot.read_bytes())
    raw[snap_start + 40] ^= 0x08
    snapshot.write_bytes(bytes(raw))
    seg_frames = frames(segment)
    assert len(seg_frames) >= 300
    seg_start, seg_end = seg_frames[-100]  # one of the 300 jobs written last
    raw = bytearray(segment.read_bytes())
    raw[seg_start + 2] ^= 0x01
    segment.write_bytes(bytes(raw))

    refused = kairoi_trio("serve", "-c", str(server.config_path), timeout=60)
    assert refused.returncode != 0
    assert snapshot.name in refused.stderr and f"offset {snap_start}" in refused.stderr
    assert "kairoi-trio repair" in refused.stderr and "Traceback" not in refused.stderr

    damaged = {p.name: p.read_bytes() for p in data.iterdir()}
    dest = tmp_path / "repaired" / "data"
    result = kairoi_trio("repair", str(data), str(dest))
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout
    assert f"{snapshot.name}: format {FORMAT_VERSION}" in report
    assert f"DROPPED {snap_start}..{snap_end} ({snap_end - snap_start} bytes)" in report
    assert f"{segment.name}: format {FORMAT_VERSION}" in report
    assert f"DROPPED {seg_start}..{seg_end} ({seg_end - seg_start} bytes)" in report
    assert "result: 2298 jobs, 1 rules" in report

    repaired = make_server(name="repaired")
    with KcpClient(repaired.kcp_port) as kcp:
        answers = kcp.pipeline([("GET", i) for i in ids])
        assert kcp.request("RULE", "GET", "rule") == ["OK", "r.", "shell", "/bin/true"]
    present = [
        i for i, a in zip(ids, answers, strict=True) if a == ["OK", "planned", FUTURE, PAYLOAD]
    ]
    assert len(present) == 2298  # all but the two damaged records
    assert {p.name: p.read_bytes() for p in data.iterdir()} == damaged  # SRC left as it was
