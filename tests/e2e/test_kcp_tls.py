"""KCP inside TLS ([controller] tls_cert, tls_key) against a real server, with a real TLS
client (Python's ssl), and certificate/key pairs checked when the configuration loads."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.certificates import self_signed
from support.server import ServerProcess

from kairoi_trio.protocols.kcp.codec import KcpParser, Message, encode_message

TOKEN = "tls-token-81c2"


def tls_config(cert: Path, key: Path, table: str = "controller") -> str:
    return f'[{table}]\ntls_cert = "{cert}"\ntls_key = "{key}"\n[auth]\ntokens = ["{TOKEN}"]\n'


def exchange(sock: socket.socket, requests: list[list[str]]) -> list[list[str]]:
    """Send the requests pipelined; read one answer each, in order."""
    sock.sendall(b"".join(encode_message(str(i), args) for i, args in enumerate(requests)))
    parser = KcpParser()
    answers: list[list[str]] = []
    while len(answers) < len(requests):
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed after {len(answers)} answers")
        parser.feed(data)
        for event in parser.events():
            assert isinstance(event, Message)
            assert event.id == str(len(answers))
            answers.append(event.args)
    return answers


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path, "server")


def test_kcp_over_tls_with_a_token(
    make_server: Callable[..., ServerProcess], pair: tuple[Path, Path]
) -> None:
    cert, key = pair
    server = make_server(tls_config(cert, key))
    assert server.events("kcp listening")[0]["tls"] is True
    context = ssl.create_default_context(cafile=str(cert))  # verifies the server's certificate
    with socket.create_connection(("127.0.0.1", server.kcp_port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            sets = [["SET", f"tls.{i}", "2040-01-01 00:00:00", "x" * 100] for i in range(2000)]
            answers = exchange(tls, [["AUTH", TOKEN], ["PING"], *sets, ["GET", "tls.1999"]])
            assert answers[:2] == [["OK"], ["OK", "PONG"]]
            assert answers[2:-1] == [["OK"]] * 2000  # a pipeline larger than TLS records
            assert answers[-1] == ["OK", "planned", "2040-01-01 00:00:00", "x" * 100]
            assert exchange(tls, [["AUTH", "wrong"]]) == [["ERROR", "invalid token"]]


def test_a_plain_text_client_gets_nothing_useful(
    make_server: Callable[..., ServerProcess], pair: tuple[Path, Path]
) -> None:
    server = make_server(tls_config(*pair))
    with socket.create_connection(("127.0.0.1", server.kcp_port), timeout=20) as plain:
        plain.sendall(f"1 AUTH {TOKEN}\n2 PING\n3 GET x\n".encode())
        received = b""
        while chunk := plain.recv(65536):  # the server closes the connection
            received += chunk
    assert b"OK" not in received and b"PONG" not in received and b"ERROR" not in received
    # the server goes on serving TLS clients
    context = ssl.create_default_context(cafile=str(pair[0]))
    with socket.create_connection(("127.0.0.1", server.kcp_port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert exchange(tls, [["PING"]]) == [["OK", "PONG"]]


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "kairoi_trio", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("table", ["controller", "grpc"])
def test_a_key_that_does_not_match_its_certificate_is_refused_in_one_line(
    tmp_path: Path, make_server: Callable[..., ServerProcess], table: str
) -> None:
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    done = check_config(tmp_path, tls_config(cert, other_key, table))
    assert done.returncode != 0
    assert done.stderr == f"kairoi-trio: {table}.tls_key does not match {table}.tls_cert\n"
    with pytest.raises(RuntimeError) as refused:  # the server does not start either
        make_server(tls_config(cert, other_key, table))
    assert f"{table}.tls_key does not match {table}.tls_cert" in str(refused.value)
    assert "bind" not in str(refused.value).lower()


def test_unusable_tls_files_are_named(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "good")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {
        f'[controller]\ntls_cert = "{cert}"\n': (
            "controller.tls_cert and controller.tls_key go together"
        ),
        f'[controller]\ntls_cert = "{junk}"\ntls_key = "{key}"\n': (
            f"controller.tls_cert: {junk} holds no PEM certificate"
        ),
        f'[controller]\ntls_cert = "{cert}"\ntls_key = "{junk}"\n': (
            f"controller.tls_key: {junk} holds no usable PEM private key"
        ),
        f'[grpc]\ntls_cert = "{cert}"\ntls_key = "{tmp_path}/none.key"\n': (
            f"grpc.tls_key: cannot read {tmp_path}/none.key: No such file or directory"
        ),
    }
    for text, reason in cases.items():
        done = check_config(tmp_path, text)
        assert (done.returncode, done.stderr) == (2, f"kairoi-trio: {reason}\n"), text
    assert check_config(tmp_path, tls_config(cert, key)).returncode == 0
