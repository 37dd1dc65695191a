"""Tokens and roles (core/auth.py), and KCP's AUTH throttling below the socket."""

from __future__ import annotations

import hmac

import pytest
import trio
import trio.testing

from kairoi_trio import commands as c
from kairoi_trio.config import ConfigError, ControllerConfig, parse_config
from kairoi_trio.core.auth import Role, TokenTable, check_tokens, denial, permitted
from kairoi_trio.model import Rule, ShellRunner
from kairoi_trio.protocols.grpc.server import METHOD_COMMANDS, SERVICE_NAME
from kairoi_trio.protocols.kcp import codec
from kairoi_trio.protocols.kcp import server as kcp_server
from kairoi_trio.protocols.kcp.server import KcpServer

READS: list[c.Command] = [
    c.GetJob("a"),
    c.ListJobs(),
    c.GetRule("r"),
    c.ListRules(),
    c.GetInfo(),
    c.Subscribe("", False, lambda events: True),
]
JOB_WRITES: list[c.Command] = [c.SetJob("a", 0), c.DeleteJob("a")]
RULE_WRITES: list[c.Command] = [c.SetRule(Rule("r", "", ShellRunner("/x.sh"))), c.DeleteRule("r")]
INTERNAL: list[c.Command] = [
    c.TriggerDue(0, {}),
    c.RecordOutcome("a", 1, True),
    c.ExpireFinished(0),
]


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.ADMIN, READS + JOB_WRITES + RULE_WRITES),
        (Role.CLIENT, READS + JOB_WRITES),
        (Role.READ, READS),
        (None, []),
    ],
)
def test_each_role_may_send_exactly_its_commands(role: Role | None, allowed: list) -> None:
    for command in READS + JOB_WRITES + RULE_WRITES + INTERNAL:
        assert permitted(role, command) is (command in allowed), (role, command)
        assert permitted(role, type(command)) is (command in allowed)


def test_a_refusal_names_the_roles_not_the_token() -> None:
    assert denial(Role.READ, c.SetJob) == (
        "permission denied: a read token may not set jobs (needs a client token)"
    )
    assert denial(Role.CLIENT, RULE_WRITES[0]) == (
        "permission denied: a client token may not set rules (needs an admin token)"
    )
    assert denial(None, c.GetJob).startswith("permission denied: no token may not read jobs")


def test_tokens_map_to_their_role() -> None:
    table = TokenTable(admin=["adm"], client=["cli", "cli2"], read=["rd"])
    assert table.required and table.anonymous is None
    assert table.role_of("adm") is Role.ADMIN
    assert table.role_of("cli2") is Role.CLIENT
    assert table.role_of(b"rd") is Role.READ
    for wrong in ("", "ad", "admx", "ADM", "rd ", "\udcff"):
        assert table.role_of(wrong) is None


def test_no_token_configured_means_everyone_is_admin() -> None:
    table = TokenTable()
    assert not table.required
    assert table.anonymous is Role.ADMIN
    assert table.role_of("anything") is None  # AUTH itself still fails


def test_every_token_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def compare(given: bytes, secret: bytes) -> bool:
        compared.append(secret)
        return real(given, secret)

    monkeypatch.setattr("kairoi_trio.core.auth.hmac.compare_digest", compare)
    table = TokenTable(admin=["a1", "a2"], client=["c1"], read=["r1"])
    assert table.role_of("a1") is Role.ADMIN
    assert compared == [b"a1", b"a2", b"c1", b"r1"]


@pytest.mark.parametrize(
    ("value", "role"),
    [
        ("Bearer cli", Role.CLIENT),
        ("bearer cli", Role.CLIENT),
        (b"BEARER adm", Role.ADMIN),
        ("Bearer  cli", Role.CLIENT),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic cli", None),
        ("cli", None),
        (None, None),
    ],
)
def test_bearer_values(value: str | bytes | None, role: Role | None) -> None:
    assert TokenTable(admin=["adm"], client=["cli"]).role_of_bearer(value) is role


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        ('tokens = [""]', "auth.tokens[0] is empty"),
        ('read_tokens = ["ok", "Zq1 Zq2"]', "auth.read_tokens[1] must be visible ASCII"),
        ('client_tokens = ["Zq\u00e9"]', "auth.client_tokens[0] must be visible ASCII"),
        ('tokens = ["Zq\\tZq"]', "auth.tokens[0] must be visible ASCII"),
        ('tokens = ["Zq"]\nread_tokens = ["Zq"]', "auth.read_tokens[0] is also in auth.tokens"),
    ],
)
def test_config_refuses_tokens_no_front_end_can_carry(auth: str, reason: str) -> None:
    import tomllib

    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(f"[auth]\n{auth}\n"))
    assert str(caught.value).startswith(reason)
    assert "Zq" not in str(caught.value)  # the token itself is never shown


def test_config_roles() -> None:
    import tomllib

    config = parse_config(
        tomllib.loads('[auth]\ntokens = ["a"]\nclient_tokens = ["b"]\nread_tokens = ["c"]\n')
    )
    table = TokenTable.from_config(config.auth)
    assert [table.role_of(t) for t in "abc"] == [Role.ADMIN, Role.CLIENT, Role.READ]
    check_tokens(["a"], ["b"], ["c"])


def test_every_grpc_method_has_a_role() -> None:
    from kairoi.v1 import scheduler_pb2 as pb

    methods = pb.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name
    assert SERVICE_NAME == "kairoi.v1.Scheduler"
    assert set(methods) == set(METHOD_COMMANDS)
    assert permitted(Role.READ, METHOD_COMMANDS["WatchJobs"])
    assert not permitted(Role.CLIENT, METHOD_COMMANDS["SetRule"])


# -- KCP: failed AUTH on one connection ---------------------------------------------------


class _NoActor:
    async def submit(self, request: c.Request) -> None:
        raise AssertionError("AUTH alone never reaches the actor")


async def _answers(stream: trio.abc.ReceiveStream) -> list:
    parser = codec.KcpParser()
    events: list = []
    while True:
        data = await stream.receive_some()
        if not data:
            return events
        parser.feed(bytes(data))  # as the server does: a memory stream gives a bytearray
        events.extend(parser.events())


async def test_failed_auth_is_slowed_down_then_the_connection_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A read token's holder guessing an admin token (an unauthenticated connection is
    # also closed by the authentication deadline).
    server = KcpServer(_NoActor(), ControllerConfig(), auth=TokenTable(["s3cret"], read=["rd"]))  # type: ignore[arg-type]
    client, accepted = trio.testing.memory_stream_pair()
    guesses = kcp_server.AUTH_MAX_FAILURES + 5
    async with trio.open_nursery() as nursery:
        # A memory stream stands in for the accepted socket (peer_host gives "?").
        nursery.start_soon(server._handle, accepted)  # type: ignore[arg-type]
        # All guesses pipelined at once: a client cannot get around the delay by not waiting.
        await client.send_all(
            b"r AUTH rd\n" + b"".join(b"%d AUTH guess%d\n" % (i, i) for i in range(guesses))
        )
        started = trio.current_time()
        answers = await _answers(client)
        took = trio.current_time() - started
    assert answers[0].id == "r" and answers[0].args == ["OK"]
    ids = [int(a.id) for a in answers[1:]]
    assert ids == list(range(kcp_server.AUTH_MAX_FAILURES))  # then the connection was closed
    assert all(a.args[0] == "ERROR" for a in answers[1:])
    assert answers[-1].args[1].startswith("invalid token: 10 failed AUTH")
    assert took >= 0.5 + 1 + 2 + 4 + 8 + 16  # on the mock clock: failures 4 to 9 waited


async def test_the_first_failures_are_answered_at_once_and_a_good_token_still_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = KcpServer(_NoActor(), ControllerConfig(), auth=TokenTable(["s3cret"], read=["rd"]))  # type: ignore[arg-type]
    client, accepted = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        # A memory stream stands in for the accepted socket (peer_host gives "?").
        nursery.start_soon(server._handle, accepted)  # type: ignore[arg-type]
        free = kcp_server.AUTH_FREE_FAILURES
        await client.send_all(b"".join(b"%d AUTH nope\n" % i for i in range(free)))
        await client.send_all(b"a AUTH rd\nb PING\n")
        started = trio.current_time()
        parser = codec.KcpParser()
        answers: list = []
        while len(answers) < free + 2:
            parser.feed(bytes(await client.receive_some()))
            answers.extend(parser.events())
        assert trio.current_time() == started  # nothing was held back
        nursery.cancel_scope.cancel()
    assert [a.args for a in answers[:free]] == [["ERROR", "invalid token"]] * free
    assert answers[free].args == ["OK"] and answers[free + 1].args == ["OK", "PONG"]
