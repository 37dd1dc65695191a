"""The HTTP API's answers to the actor's refusals (protocols/http/api.py): the
statuses a script relies on to decide whether to retry (429, 503) or not (409),
through the real ASGI app, with a stand-in for the command actor's end of the
channel (the e2e tests cannot make the actor's queue full or its store fail on
demand)."""

from __future__ import annotations

import httpx
import pytest
import trio

from kairoi_trio import commands as c
from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.core.auth import TokenTable
from kairoi_trio.observability.metrics import Readiness
from kairoi_trio.protocols.http.api import Api
from kairoi_trio.protocols.http.app import build_app

BODY = {"execute_at": "2030-01-01T00:00:00Z"}


def client(api: Api) -> httpx.AsyncClient:
    app = build_app(api, Readiness())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def api_on(send: trio.MemorySendChannel[c.Request]) -> Api:
    return Api(send, TokenTable(), max_body_bytes=1 << 20, watch_buffer_bytes=1 << 20)


async def test_a_full_actor_queue_is_429() -> None:
    send, receive = trio.open_memory_channel[c.Request](0)  # nobody receives: full
    async with client(api_on(send)) as http:
        answer = await http.put("/api/v1/jobs/a%2Fb", json=BODY)
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "resource_exhausted"
    receive.close()


async def test_a_stopped_actor_is_503() -> None:
    send, receive = trio.open_memory_channel[c.Request](1)
    receive.close()
    async with client(api_on(send)) as http:
        answer = await http.get("/api/v1/jobs/a")
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "unavailable")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.UNAVAILABLE, 503),  # a failed storage write
        (ErrorCode.FAILED_PRECONDITION, 409),  # a triggered job
        (ErrorCode.NOT_FOUND, 404),
        (ErrorCode.INVALID_ARGUMENT, 400),
    ],
)
async def test_the_actors_errors_map_to_statuses(code: ErrorCode, status: int) -> None:
    send, receive = trio.open_memory_channel[c.Request](1)
    seen: list[c.Command] = []

    async def actor() -> None:
        async for request in receive:
            seen.extend(request.commands)
            request.reply([CommandError(code, "refused")])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor)
        async with client(api_on(send)) as http:
            answer = await http.put("/api/v1/jobs/a%2Fb", json=BODY)
        nursery.cancel_scope.cancel()
    assert answer.status_code == status
    assert answer.json() == {"error": {"code": code.value, "message": "refused"}}
    assert [type(command) for command in seen] == [c.SetJob]
    assert seen[0].id == "a/b"  # type: ignore[union-attr]  # percent-decoded, one segment
