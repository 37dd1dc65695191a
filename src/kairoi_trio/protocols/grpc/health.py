"""grpc.health.v1.Health on Trio: Check and Watch, as grpcio-health-checking answers them.

Behaviour follows grpc/grpc doc/health-checking.md and grpcio-health-checking's
servicer: Check of an unknown service is NOT_FOUND; Watch sends the current
status (SERVICE_UNKNOWN for an unknown service) and every change after it.
At shutdown every service turns NOT_SERVING for good, and the Watch streams
end normally once they have sent it.
"""

from __future__ import annotations

from typing import Any

import trio
from grpc_health.v1 import health_pb2

from kairoi_trio.protocols.grpc import wire
from kairoi_trio.protocols.grpc.transport import Abort, Call, Method

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health:
    """The status of each service name ("" for the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = trio.Event()
        self._shutting_down = False
        self._closed = False

    def set(self, service: str, status: int) -> None:
        """Report `service` SERVING or NOT_SERVING (ignored once shutting down)."""
        if self._shutting_down:
            return
        self._update(service, status)

    def _update(self, service: str, status: int) -> None:
        self._status[service] = status
        self._changed.set()
        self._changed = trio.Event()

    def shut_down(self) -> None:
        """Every service NOT_SERVING from now on; Watch streams end once they said so."""
        self._shutting_down = True
        for service in list(self._status):
            self._update(service, NOT_SERVING)

    def close(self) -> None:
        """End the Watch streams now (after they had their chance to send NOT_SERVING)."""
        self._closed = True
        self._update("", self._status.get("", NOT_SERVING))

    async def check(self, request: Any, call: Call) -> Any:
        status = self._status.get(request.service)
        if status is None:
            raise Abort(wire.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(self, request: Any, call: Call) -> None:
        last = None
        while not self._closed:
            changed = self._changed
            status = self._status.get(request.service, _UNKNOWN)
            if status != last:
                await call.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._closed:
                return
            await changed.wait()

    def methods(self) -> dict[str, Method]:
        decode = health_pb2.HealthCheckRequest.FromString
        return {
            f"/{SERVICE_NAME}/Check": Method(False, False, decode, self.check),
            f"/{SERVICE_NAME}/Watch": Method(False, True, decode, self.watch),
        }
