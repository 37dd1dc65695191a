"""What every runner kind provides to the runner pools."""

from __future__ import annotations

import abc
from collections.abc import Callable

import trio

from kairoi_trio.model import Job, Rule, RunnerSpec


class RunFailed(Exception):
    """A run ended in failure; the message becomes the job's last outcome."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Runner(abc.ABC):
    """One runner kind (shell, amqp, http).

    `run` executes one job and returns a short success message, or raises
    RunFailed. The pool applies the rule's timeout with a cancel scope around
    `run`, so a run must be cancellable and clean up after itself (a shell run
    kills its process). `serve` owns whatever lives longer than one run, such
    as kept-alive broker connections; it is started with `nursery.start`.
    """

    kind: str

    @abc.abstractmethod
    async def run(self, job: Job, rule: Rule) -> str: ...

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        """Start a run that needs no task of its own, or answer False (the default).

        A runner whose runs mostly wait on one shared connection (amqp: a publish
        and its confirm) starts the run here, without blocking, and calls
        `done(ok, message)` exactly once when it ends, from one of its own tasks,
        with what `run` would have returned or raised (RunFailed's message; after
        `timeout_s`, "timed out after {timeout_s}s"). False means nothing was
        started: the pool then runs `run` in a task. Must not raise for a job's
        own failure (that is `done(False, ...)` or False).
        """
        return False

    def check_rule(self, spec: RunnerSpec) -> None:  # noqa: B027 - most runners check nothing
        """Raise ValueError with a one-line reason if `spec` could never run.

        Called when a rule is set (RULE SET, SetRule), so that a rule every run
        of which would fail is refused at input instead. Must not block.
        """

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most runners hold nothing
        """Release long-lived resources politely once no run is left (graceful shutdown)."""
