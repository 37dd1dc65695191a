"""The tests' RabbitMQ is a node of their own: a developer's broker is never touched.

Issue 7: the suite used to act on whatever answered on 127.0.0.1:5672 (stop_app,
SIGSTOP, the memory watermark), a developer's own broker included. These tests
pin down that every helper of tests/amqp_broker.py reaches the private node
only. The session fixture in tests/conftest.py also checks, after every run,
that a broker listening on 5672 still listens and is not frozen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import amqp_broker as broker
import pytest
from amqp_broker import Admin, Listener
from support.waiting import wait_for

# Stops, freezes or reconfigures the shared private node, or needs it as it should be:
# one xdist worker runs the whole group, one test at a time (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("broker")


def test_the_suite_broker_is_a_private_node_not_the_default_one() -> None:
    broker.ensure_broker()
    assert broker.PORT != broker.DEFAULT_PORT
    assert broker.NODE == f"kairoi-test-{broker.PORT}@localhost"
    assert broker.URL == f"amqp://guest:guest@127.0.0.1:{broker.PORT}/"
    # rabbitmqctl reaches that node, whose data is in the run's own directory.
    assert broker.rabbitmqctl("eval", "node().").strip() == f"'{broker.NODE}'"
    data = broker.rabbitmqctl("eval", "rabbit_mnesia:dir().").strip().strip('"')
    assert Path(data).is_relative_to(broker.directory())
    assert not broker.directory().is_relative_to("/var/lib/rabbitmq")
    if not broker.EXTERNAL:
        assert broker.directory().is_relative_to(tempfile.gettempdir())
    # SIGSTOP goes to the beam that serves the node's port (and nothing else).
    pid = broker.beam_pid()
    assert f" -home {broker.directory()} " in broker.process_cmdline(pid)
    serving = broker.listener(broker.PORT)
    assert serving is not None and serving.pid in (pid, None)
    admin = Admin()
    try:
        assert admin.server_properties["product"] == "RabbitMQ"
    finally:
        admin.close()


def test_stopping_the_suite_broker_leaves_the_default_broker_up() -> None:
    default = broker.listener(broker.DEFAULT_PORT)
    if default is None:
        pytest.skip("no broker on 127.0.0.1:5672 to watch")
    broker.ensure_broker()
    if default.pid is not None:
        assert default.pid != broker.beam_pid()
    broker.stop_app()
    try:
        wait_for(lambda: broker.listener(broker.PORT) is None, timeout=30, interval=0.2)
        assert broker.listener(broker.DEFAULT_PORT) is not None
    finally:
        broker.start_app()
    assert broker.listener(broker.PORT) is not None


def test_a_frozen_or_closed_listener_is_seen_without_connecting() -> None:
    """What the session check in tests/conftest.py reads about the broker on 5672,
    tried on a stand-in: a process listening on a free port, frozen, then gone."""
    port = broker.free_port()
    code = (
        "import socket, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"up\n"
        assert broker.listener(port) == Listener(process.pid, frozen=False)
        os.kill(process.pid, signal.SIGSTOP)
        wait_for(lambda: broker.listener(port) == Listener(process.pid, frozen=True), interval=0.1)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()
    assert broker.listener(port) is None
