"""The generated kairoi.v1 stubs, carried by the client so that it installs on its own.

Copies of kairoi-trio's src/kairoi/v1/scheduler_pb2*.py(i), written by
scripts/gen-protos.sh (the _grpc module imports from here instead of
kairoi.v1); tests/unit/test_client_stubs.py fails when they differ. Both copies
register the same file in protobuf's default pool, so the client and the
server package can be imported in one process.
"""
