#!/usr/bin/env bash
# Regenerate the Python stubs of proto/kairoi/v1/*.proto into src/kairoi/v1/.
# The generated files are committed; tests/unit/test_generated_stubs.py fails
# when they differ from what this script produces (see docs/grpc.md).
# Use the pinned grpcio-tools (pyproject: the "test" extra) so the output is stable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc -Iproto \
    --python_out=src --pyi_out=src --grpc_python_out=src \
    proto/kairoi/v1/scheduler.proto
# The Python client installs without kairoi-trio, so it carries a copy in its own package
# (the _grpc module imports from there); tests/unit/test_client_stubs.py checks the copy.
CLIENT=clients/python/src/kairoi_client/_proto
cp src/kairoi/v1/scheduler_pb2.py src/kairoi/v1/scheduler_pb2.pyi "$CLIENT/"
sed 's/^from kairoi\.v1 import /from kairoi_client._proto import /' \
    src/kairoi/v1/scheduler_pb2_grpc.py > "$CLIENT/scheduler_pb2_grpc.py"
