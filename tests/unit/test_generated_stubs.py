"""The committed stubs under src/kairoi/v1 are exactly what scripts/gen-protos.sh produces.

This is the "regenerate and fail on a diff" check of docs/grpc.md: edit the
.proto, run scripts/gen-protos.sh, commit both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("scheduler_pb2.py", "scheduler_pb2.pyi", "scheduler_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "proto/kairoi/v1/scheduler.proto",
        ],
        cwd=ROOT,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "kairoi" / "v1" / name).read_text()
        committed = (ROOT / "src" / "kairoi" / "v1" / name).read_text()
        assert committed == fresh, f"src/kairoi/v1/{name} is stale: run scripts/gen-protos.sh"


def test_stubs_import_from_the_installed_package() -> None:
    from kairoi.v1 import scheduler_pb2, scheduler_pb2_grpc

    assert scheduler_pb2.DESCRIPTOR.package == "kairoi.v1"
    assert hasattr(scheduler_pb2_grpc, "SchedulerStub")
