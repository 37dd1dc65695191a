"""A small blocking KCP client for tests, built on the project's own codec."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from kairoi_trio.protocols.kcp.codec import KcpParser, Message, encode_message


class KcpClient:
    def __init__(
        self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str = ""
    ) -> None:
        """source: the local address to connect from (e.g. "127.0.0.2"), any by default."""
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0)
        )
        self.parser = KcpParser()
        self._events: list = []
        self._next_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KcpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self) -> Message:
        while not self._events:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.parser.feed(data)
            self._events.extend(self.parser.events())
        event = self._events.pop(0)
        assert isinstance(event, Message), event
        return event

    def request(self, *args: str) -> list[str]:
        """Send one request; return the response arguments after the id (e.g. ["OK"])."""
        self._next_id += 1
        request_id = str(self._next_id)
        self.send_raw(encode_message(request_id, list(args)))
        response = self.read_message()
        assert response.id == request_id, (response, request_id)
        return response.args

    def pipeline(self, requests: Sequence[Sequence[str]]) -> list[list[str]]:
        """Send all requests at once, then read all responses (checked in order)."""
        ids = []
        out = bytearray()
        for args in requests:
            self._next_id += 1
            ids.append(str(self._next_id))
            out += encode_message(ids[-1], list(args))
        self.send_raw(bytes(out))
        responses = []
        for request_id in ids:
            response = self.read_message()
            assert response.id == request_id, (response.id, request_id)
            responses.append(response.args)
        return responses
