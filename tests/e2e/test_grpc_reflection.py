"""gRPC server reflection v1 (what grpcurl and other current tools ask first) and v1alpha.

The client is a second process using stubs generated here, with grpcio-tools,
from a v1 reflection.proto: it shares no code with the server, as a tool would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.server import ServerProcess

# The messages and service of gRPC's grpc/reflection/v1/reflection.proto, without comments
# or options. Its file name here (reflection_v1/reflection.proto) only names the generated
# Python module; what goes on the wire is the package and the method names.
REFLECTION_V1_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;

service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest {
  string containing_type = 1;
  int32 extension_number = 2;
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse {
  string base_type_name = 1;
  repeated int32 extension_number = 2;
}
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse {
  int32 error_code = 1;
  string error_message = 2;
}
"""

# Lists the services, then describes two of them, over grpc.reflection.v1 only.
CLIENT = """
import json, sys
import grpc
from google.protobuf import descriptor_pb2
from reflection_v1 import reflection_pb2 as r, reflection_pb2_grpc as r_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = r_grpc.ServerReflectionStub(channel)
    requests = [
        r.ServerReflectionRequest(list_services=""),
        r.ServerReflectionRequest(file_containing_symbol="kairoi.v1.Scheduler"),
        r.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        r.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
    ]
    listed, scheduler, itself, missing = stub.ServerReflectionInfo(iter(requests))

def services(response):
    found = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for service in file.service:
            found[f"{file.package}.{service.name}"] = [m.name for m in service.method]
    return found

print(json.dumps({
    "listed": sorted(s.name for s in listed.list_services_response.service),
    "scheduler": services(scheduler),
    "itself": services(itself),
    "missing": grpc.StatusCode.NOT_FOUND.value[0] == missing.error_response.error_code,
}))
"""


@pytest.fixture
def v1_client(tmp_path: Path) -> Path:
    """A directory holding the generated v1 reflection stubs and the client script."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (the test extra)")
    proto_dir = tmp_path / "proto" / "reflection_v1"
    proto_dir.mkdir(parents=True)
    (proto_dir / "reflection.proto").write_text(REFLECTION_V1_PROTO)
    out = tmp_path / "client"
    out.mkdir()
    status = protoc.main(
        [
            "protoc",
            f"-I{tmp_path / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "reflection_v1/reflection.proto",
        ]
    )
    assert status == 0, "protoc failed on the v1 reflection proto"
    (out / "client.py").write_text(CLIENT)
    return out


def ask_v1(client_dir: Path, port: int | None) -> dict:
    done = subprocess.run(
        [sys.executable, str(client_dir / "client.py"), f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(client_dir)),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_reflection_v1_lists_and_describes_every_service(
    make_server: Callable[..., ServerProcess], v1_client: Path
) -> None:
    # With tokens configured: reflection stays open, as grpcurl list needs no token.
    server = make_server('[auth]\ntokens = ["s3cret"]')
    answer = ask_v1(v1_client, server.grpc_port)
    assert answer["listed"] == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "kairoi.v1.Scheduler",
    ]
    methods = answer["scheduler"]["kairoi.v1.Scheduler"]
    assert {"SetJob", "GetJob", "WatchJobs", "GetServerInfo"} <= set(methods)
    assert answer["itself"] == {"grpc.reflection.v1.ServerReflection": ["ServerReflectionInfo"]}
    assert answer["missing"]


def test_reflection_v1alpha_still_answers(server: ServerProcess) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (listed,) = stub.ServerReflectionInfo(iter([request]))
    names = {s.name for s in listed.list_services_response.service}
    assert {"grpc.reflection.v1.ServerReflection", "kairoi.v1.Scheduler"} <= names
