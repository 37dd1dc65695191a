"""The http runner (extension): POST the job as JSON; a 2xx answer means executed.

Body: {"id": ..., "execute_at": "2026-12-01T09:00:00.000000Z", "attempt": n,
"payload": "<UTF-8 text>" or null}; a payload that is not UTF-8 is sent as
"payload_base64" instead. Headers `X-Kairoi-Job-Id` and `X-Kairoi-Attempt`
let the receiver deduplicate (delivery is at least once). Built on httpx,
which runs on Trio through anyio and keeps connections alive per host.
"""

from __future__ import annotations

import base64
import json

import httpx
import trio

from kairoi_trio.model import HttpRunner, Job, Rule, to_datetime
from kairoi_trio.runners.base import RunFailed, Runner


class HttpRunnerBackend(Runner):
    kind = "http"

    def __init__(self, *, timeout_s: float = 30.0, max_connections: int = 100) -> None:
        self._timeout = timeout_s
        self._limits = httpx.Limits(max_connections=max_connections)
        self._client: httpx.AsyncClient | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, limits=self._limits) as client:
            self._client = client
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._client = None

    async def run(self, job: Job, rule: Rule) -> str:
        assert isinstance(rule.runner, HttpRunner)
        if self._client is None:
            raise RunFailed("the http runner is not running")
        body: dict[str, object] = {
            "id": job.id,
            "execute_at": to_datetime(job.execute_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "attempt": job.attempts,
            "payload": None,
        }
        if job.payload:
            try:
                body["payload"] = job.payload.decode()
            except UnicodeDecodeError:
                body["payload_base64"] = base64.b64encode(job.payload).decode()
        headers = {"X-Kairoi-Job-Id": job.id, "X-Kairoi-Attempt": str(job.attempts)}
        try:
            response = await self._client.post(
                rule.runner.url,
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", **headers},
            )
        except httpx.TimeoutException:
            raise RunFailed(f"no answer from {rule.runner.url} within {self._timeout}s") from None
        except httpx.HTTPError as error:
            raise RunFailed(
                f"POST {rule.runner.url} failed: {error or type(error).__name__}"
            ) from None
        if not 200 <= response.status_code < 300:
            raise RunFailed(f"HTTP {response.status_code} from {rule.runner.url}")
        return f"HTTP {response.status_code}"
