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
