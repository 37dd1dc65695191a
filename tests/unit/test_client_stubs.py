"""The Python client's copy of the generated stubs is the server package's, unchanged.

clients/python carries the stubs in kairoi_client/_proto so that it installs
without kairoi-trio; scripts/gen-protos.sh writes both. A .proto change
regenerated for the server but not copied to the client fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "src" / "kairoi" / "v1"
CLIENT = ROOT / "clients" / "python" / "src" / "kairoi_client" / "_proto"
FIX = "run scripts/gen-protos.sh"


@pytest.mark.parametrize("name", ["scheduler_pb2.py", "scheduler_pb2.pyi"])
def test_message_stubs_are_identical(name: str) -> None:
    assert (CLIENT / name).read_bytes() == (SERVER / name).read_bytes(), f"{name}: {FIX}"


def test_grpc_stub_differs_only_in_where_it_imports_the_messages_from() -> None:
    server = (SERVER / "scheduler_pb2_grpc.py").read_text().splitlines()
    client = (CLIENT / "scheduler_pb2_grpc.py").read_text().splitlines()
    assert len(client) == len(server), f"scheduler_pb2_grpc.py: {FIX}"
    changed = [(s, c) for s, c in zip(server, client, strict=True) if s != c]
    assert changed == [
        (
            "from kairoi.v1 import scheduler_pb2 as kairoi_dot_v1_dot_scheduler__pb2",
            "from kairoi_client._proto import scheduler_pb2 as kairoi_dot_v1_dot_scheduler__pb2",
        )
    ], f"scheduler_pb2_grpc.py: {FIX}"


def test_client_code_uses_its_own_copy() -> None:
    """No module of the client imports the server package's kairoi.v1."""
    for path in CLIENT.parent.glob("*.py"):
        assert "kairoi.v1 import" not in path.read_text(), path.name
