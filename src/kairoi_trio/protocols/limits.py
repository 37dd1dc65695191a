"""Connection limits shared by the listeners: in all, and per client address.

One host must not be able to take every connection (or every descriptor) of
the server: a connection past either limit is refused at once, with a reason
the protocol can carry (KCP's `* ERROR`, gRPC's GOAWAY). The count is by IP,
not by port; behind a proxy every client has the proxy's address, so the
per-address limit can be turned off (0).
"""

from __future__ import annotations

import trio


class ConnectionLimits:
    """Open connections, counted in all and by client address, against two limits.

    `max_connections`: in all (at least 1); `max_per_address`: from one address
    (0: no limit).
    """

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def enter(self, address: str) -> str | None:
        """Count a new connection from `address`; why it must be refused, or None.
        It is counted either way, until `leave`."""
        self.open += 1
        count = self._by_address[address] = self._by_address.get(address, 0) + 1
        if self.open > self.max_connections:
            return "too many connections"
        if self.max_per_address and count > self.max_per_address:
            return "too many connections from your address"
        return None

    def leave(self, address: str) -> None:
        """A connection counted by `enter` is closed."""
        self.open -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]


def peer_host(stream: trio.abc.Stream) -> str:
    """The client's address (IP) of a socket stream, or of the one under a TLS
    stream; "?" if unknown."""
    while not isinstance(stream, trio.SocketStream):  # under TLS: the TCP stream
        inner = getattr(stream, "transport_stream", None)
        if inner is None:
            return "?"
        stream = inner
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"
