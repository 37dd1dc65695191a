"""What runs started without a task (`Runner.start`) ended with: their `done` calls."""

from __future__ import annotations

from collections.abc import Callable

import trio


class Ends:
    """The `done` callbacks of runs started by `Runner.start`: every call, by job."""

    def __init__(self) -> None:
        self.by_job: dict[str, list[tuple[bool, str]]] = {}
        self.calls = 0
        self.changed = trio.Event()

    def done_for(self, job_id: str) -> Callable[[bool, str], None]:
        """The `done` to pass to `start` for the run of `job_id`."""

        def done(ok: bool, message: str) -> None:
            self.by_job.setdefault(job_id, []).append((ok, message))
            self.calls += 1
            self.changed.set()
            self.changed = trio.Event()

        return done

    async def wait_for(self, n: int) -> None:
        """Until runs of `n` different jobs have ended."""
        while len(self.by_job) < n:
            await self.changed.wait()

    def twice(self) -> dict[str, list[tuple[bool, str]]]:
        """The jobs whose run ended more than once (a fault)."""
        return {job: ends for job, ends in self.by_job.items() if len(ends) != 1}
