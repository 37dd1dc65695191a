"""Free loopback ports for what must be told its port before it starts (a Kairoi
configuration file, the private RabbitMQ node)."""

from __future__ import annotations

import errno
import random
import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A port free on loopback, drawn like scripts/private-node.sh does: at random from
    20000-32767, below Linux's ephemeral range (32768-60999). A port the OS handed out
    for port 0 (bind, then close) is in that range, so until the server binds it,
    any outgoing connection of this or a parallel test may take it as its local port."""
    for port in random.sample(range(20000, 32768), 12768):
        if _bindable(port):
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, HOST), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.bind((host, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno == errno.EADDRNOTAVAIL:
                continue
            return False
        finally:
            sock.close()
    return True
