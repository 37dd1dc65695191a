"""Server reflection (grpc.reflection.v1 and v1alpha) on Trio.

grpcio-reflection answers each request with a function of the descriptor pool
alone (`ReflectionServicer.ServerReflectionInfo`, a plain generator); this
module only carries its requests and answers over the stream. It implements
v1alpha only, but current tools (grpcurl, Postman, grpc-java's and grpc-go's
clients) ask for v1 first. The two protocols are the same messages with the
same field numbers under another package, so one servicer answers both: v1
requests are decoded with the v1alpha classes (identical on the wire) under
v1's method name, and v1's descriptor is added to the pool so that a client can
describe it too.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

from kairoi_trio.protocols.grpc.transport import Call, Method

SERVICE_V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
SERVICE_V1 = "grpc.reflection.v1.ServerReflection"


def methods(services: Sequence[str]) -> dict[str, Method]:
    """The ServerReflectionInfo method of both versions, listing `services` and themselves."""
    _add_v1_descriptor()
    servicer = reflection.ReflectionServicer([*services, SERVICE_V1ALPHA, SERVICE_V1])

    async def info(call: Call, _call: Call) -> None:
        async for request in call.messages():
            for response in servicer.ServerReflectionInfo(iter([request]), None):
                await call.write(response)
                del response
            del request  # an idle stream holds none of its last request (max_message_bytes)

    method = Method(True, True, reflection_pb2.ServerReflectionRequest.FromString, info)
    return {
        f"/{SERVICE_V1ALPHA}/ServerReflectionInfo": method,
        f"/{SERVICE_V1}/ServerReflectionInfo": method,
    }


def _add_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool, derived from v1alpha's.

    Adding the same file again (a second server in the process) is a no-op.
    """
    old, new = reflection_pb2.DESCRIPTOR.package, SERVICE_V1.rsplit(".", 1)[0]
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = new
    proto.ClearField("options")  # v1alpha's: deprecated, and its Java/Go package names

    def rename(type_name: str) -> str:
        return type_name.replace(f".{old}.", f".{new}.", 1)

    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.HasField("type_name"):  # message and enum fields only
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    descriptor_pool.Default().AddSerializedFile(proto.SerializeToString())
