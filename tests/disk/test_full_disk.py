"""A real disk that fills up: the data directory on a 2 MiB tmpfs (issue 8, items 1 and 2).

The server's own writes fill most of it, a filler file the rest; a job comes
due meanwhile. The server must stay up, refuse writes with the reason, keep
answering reads, say "not ready", leave the due job planned, and run it once
(and be ready again, without client traffic) when space comes back.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from disk.faulty import failures, figure, http_get, metric, run_script, runs_of
from support.kcp_client import KcpClient
from support.server import ServerProcess
from support.waiting import wait_for

LATER = "2099-01-01 00:00:00"
# The due job's trigger record is longer than the small SETs that fill the last
# page of the segment: once they fail, it cannot fit either.
DUE_ID = "app.due." + "d" * 200


def soon(seconds: float) -> str:
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return f"{at:%Y-%m-%d %H:%M:%S.%f}"


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; the bytes written."""
    written = 0
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
        for size in (4096, 512, 1):  # the last scraps
            while True:
                try:
                    written += f.write(b"\0" * size)
                except OSError:
                    break
    return written


def test_a_full_disk_stops_nothing_and_the_due_job_runs_when_space_returns(
    make_server: Callable[..., ServerProcess], tmpfs: Path, tmp_path: Path
) -> None:
    data = tmpfs / "data"
    server = make_server(data_dir=data)
    script, runs = run_script(tmp_path)  # outside the full disk: it is the job's, not ours
    filler = tmpfs / "filler"
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("RULE", "SET", "r", "app.", "shell", str(script)) == ["OK"]
        assert kcp.request("SET", "kept", LATER, "a payload") == ["OK"]
        assert kcp.request("SET", DUE_ID, soon(4)) == ["OK"]

        # The server's own writes take most of the 2 MiB, the filler takes the rest...
        payload = "x" * 100_000
        for i in range(15):
            assert kcp.request("SET", f"big.{i}", LATER, payload) == ["OK"]
        filled = fill(filler)
        assert filled > 0
        # ...and small writes the last bytes of the segment's last page.
        answers = [kcp.request("SET", f"s.{i}", LATER) for i in range(200)]
        refused = next(a for a in answers if a[0] != "OK")
        assert refused[0] == "ERROR"
        assert "storage write failed" in refused[1] and "[ENOSPC]" in refused[1]
        assert kcp.request("SET", "more", LATER, "y" * 5000)[0] == "ERROR"

        # The job comes due while the disk is full.
        wait_for(lambda: failures(server, "trigger") >= 2, timeout=20)
        assert server.process is not None and server.process.poll() is None
        assert kcp.request("GET", DUE_ID)[1] == "planned"
        assert kcp.request("GET", "kept")[-1] == "a payload"  # reads go on
        code, body = http_get(server, "/ready")
        assert code == 503 and "ENOSPC" in json.loads(body)["reason"]
        assert metric(server, "kairoi_storage_writable") == 0
        assert runs_of(runs, DUE_ID) == 0

        # Space comes back: ready again with no client write, the job runs once.
        tried = failures(server, "trigger")
        os.unlink(filler)
        freed = time.monotonic()
        wait_for(lambda: http_get(server, "/ready")[0] == 200)
        ready_after = time.monotonic() - freed
        wait_for(lambda: kcp.request("GET", DUE_ID)[1] == "executed")
        figure(
            f"tmpfs 2 MiB: filler {filled / 1024:.0f} KiB, small SETs accepted before the "
            f"first refusal {answers.index(refused)}, {tried:.0f} trigger writes failed; ready "
            f"{ready_after:.2f} s and the job run {time.monotonic() - freed:.2f} s after space "
            "came back"
        )
        assert runs_of(runs, DUE_ID) == 1
        assert kcp.request("SET", "more", LATER, "y" * 5000) == ["OK"]
    assert server.stop() == 0

    server.start()  # everything acknowledged is there, nothing refused is
    with KcpClient(server.kcp_port) as kcp:
        assert kcp.request("GET", DUE_ID)[1] == "executed"
        assert kcp.request("GET", "big.14")[-1] == payload
        accepted = sum(1 for a in answers if a == ["OK"])
        for i in range(200):
            assert (kcp.request("GET", f"s.{i}")[0] == "OK") == (i < accepted)
    assert server.stop() == 0
