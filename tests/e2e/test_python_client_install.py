"""`pip install clients/python` in a fresh virtualenv, then the client against a real server.

The virtualenv has no kairoi-trio: the client must bring its own stubs and
need nothing but grpcio and protobuf. pip fetches those from the package
index (or its cache: ~/.cache/pip, so later runs are fast), as a user's
install would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.kcp_client import KcpClient
from support.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]

# Run in the fresh virtualenv with -I: no PYTHONPATH, no current directory on sys.path.
SCRIPT = """
import importlib.metadata, importlib.resources, importlib.util, json, sys
from datetime import datetime, UTC
from kairoi_client import Client, NotFound

with Client(sys.argv[1]) as kairoi:
    kairoi.set_job("installed.1", datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC), b"hello")
    job = kairoi.get_job("installed.1")
    try:
        kairoi.get_job("installed.none")
        missing = None
    except NotFound as error:
        missing = error.message

package = importlib.resources.files("kairoi_client")
print(json.dumps({
    "job": [job.id, job.status.name, job.execute_at.isoformat(), job.payload.decode()],
    "missing": missing,
    "server_package": importlib.util.find_spec("kairoi_trio") is not None,
    "server_stubs": importlib.util.find_spec("kairoi") is not None,
    "typed": (package / "py.typed").is_file() and (package / "_proto/scheduler_pb2.pyi").is_file(),
    "requires": sorted(importlib.metadata.requires("kairoi-client")),
}))
"""


def test_pip_install_in_a_fresh_virtualenv(tmp_path: Path, server: ServerProcess) -> None:
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # --without-pip, then this environment's pip aimed at the new interpreter: the same
    # install as running the new venv's own pip, without seeding pip into it (seconds).
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp_path)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    run([*pip, str(ROOT / "clients" / "python")], env, tmp_path)

    script = tmp_path / "use_client.py"
    script.write_text(SCRIPT)
    out = run([str(python), "-I", str(script), f"127.0.0.1:{server.grpc_port}"], env, tmp_path)
    answer = json.loads(out)

    assert answer["job"] == ["installed.1", "PLANNED", "2099-01-02T03:04:05+00:00", "hello"]
    assert answer["missing"]  # NotFound, with the server's reason
    assert not answer["server_package"] and not answer["server_stubs"]
    assert answer["typed"]
    assert [r.split(">=")[0] for r in answer["requires"]] == ["grpcio", "protobuf"]
    with KcpClient(server.kcp_port) as kcp:  # the job really is on the server
        stored = kcp.request("GET", "installed.1")
    assert stored == ["OK", "planned", "2099-01-02 03:04:05", "hello"]


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, f"{command[:4]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
