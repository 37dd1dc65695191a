"""The shell runner: `sh -- <command> <job_id>`, as Kairoi ran it (`--` added).

argv is ["sh", "--", command, job_id]: the id is always the script's $1,
byte for byte, whatever it holds (spaces, quotes, newlines, a leading "-"),
and `--` keeps a command that starts with "-" or "+" from being read as sh
options. The environment adds KAIROI_JOB_ID (the id again) and, when the job
has a payload, KAIROI_PAYLOAD_FILE (a temporary file with its exact bytes,
removed afterwards). Linux takes an argument or variable of up to 128 KiB, so
the longest id (65,535 bytes) fits in both. The only id no process can get is
one with a NUL character: that run fails with a reason instead.

Exit status 0 means executed; anything else, or a failure to start, means
failed. The process gets its own session so that a timeout or a shutdown kills
the whole process group, not just `sh`, and its stdout+stderr are captured up
to a bound for the logs.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile

import structlog
import trio

from kairoi_trio.model import Job, Rule, ShellRunner
from kairoi_trio.runners.base import RunFailed, Runner

log = structlog.get_logger(__name__)


class ShellRunnerBackend(Runner):
    kind = "shell"

    def __init__(self, *, output_limit_bytes: int = 64 << 10, cwd: str | None = None) -> None:
        self.output_limit = output_limit_bytes
        self.cwd = cwd

    async def run(self, job: Job, rule: Rule) -> str:
        assert isinstance(rule.runner, ShellRunner)
        if "\0" in job.id or "\0" in rule.runner.command:
            # execve takes C strings: a NUL would cut the id short, so refuse it.
            what = "job id" if "\0" in job.id else "rule's command"
            raise RunFailed(f"the {what} contains a NUL character, which no process can receive")
        env = dict(os.environ, KAIROI_JOB_ID=job.id)
        payload_file = None
        if job.payload:
            payload_file = await trio.to_thread.run_sync(_write_temp, job.payload)
            env["KAIROI_PAYLOAD_FILE"] = payload_file
        try:
            status, output = await self._execute(["sh", "--", rule.runner.command, job.id], env)
        finally:
            if payload_file is not None:
                with trio.CancelScope(shield=True):  # also after a timeout or a shutdown
                    await trio.to_thread.run_sync(_remove, payload_file)
        text = output.decode("utf-8", "replace").strip()
        if text:
            log.info("shell output", job=job.id, rule=rule.id, exit_status=status, output=text)
        if status != 0:
            reason = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            raise RunFailed(reason)
        return "exit status 0"

    async def _execute(self, argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
        # Popen forks and then waits for the child's exec in the calling thread:
        # about a millisecond that must not be spent in the event loop. Shielded,
        # so that a cancel cannot lose the process between its start and the
        # `try` that kills it.
        spawn = functools.partial(
            subprocess.Popen,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        with trio.CancelScope(shield=True):
            try:
                process = await trio.to_thread.run_sync(spawn)
            except OSError as error:
                raise RunFailed(f"cannot start sh: {error.strerror}") from None
        assert process.stdout is not None
        output = bytearray()
        pidfd = os.pidfd_open(process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._capture, os.dup(process.stdout.fileno()), output)
                await trio.lowlevel.wait_readable(pidfd)  # readable once the process exited
                status = process.wait()
                # The script may have left children holding the pipe open: do not wait for them.
                nursery.cancel_scope.deadline = trio.current_time() + 0.1
        finally:
            if process.returncode is None:  # cancelled: a timeout or the end of the grace period
                _kill_group(process.pid)
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.wait_readable(pidfd)
                process.wait()
            os.close(pidfd)
            process.stdout.close()
        return status, bytes(output)

    async def _capture(self, fd: int, output: bytearray) -> None:
        async with trio.lowlevel.FdStream(fd) as stream:
            while chunk := await stream.receive_some(65536):
                room = self.output_limit - len(output)
                if room > 0:
                    output += chunk[:room]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _write_temp(payload: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix="kairoi-payload-")
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
