"""The shell runner: `sh -- <command> <job_id>`, as Kairoi ran it (`--` added).

argv is ["sh", "--", command, job_id]: the id is always the script's $1,
byte for byte, whatever it holds (spaces, quotes, newlines, a leading "-"),
and `--` keeps a command that starts with "-" or "+" from being read as sh
options. The environment adds KAIROI_JOB_ID (the id again),
KAIROI_SCHEDULED_AT (the run's nominal time, Job.scheduled_at, as RFC 3339
UTC with microseconds: with the id, the key for deduplicating at-least-once
deliveries), KAIROI_SCRIPT_GUARD (the process guard's mark, below) and, when
the job has a payload, KAIROI_PAYLOAD_FILE (a temporary file with its exact
bytes, removed afterwards). Linux takes an argument or variable of up to
128 KiB, so the longest id (65,535 bytes) fits in both. The only id no process
can get is one with a NUL character: that run fails with a reason instead.

Exit status 0 means executed; anything else, or a failure to start, means
failed. The process gets its own session so that a timeout or a shutdown kills
the whole process group, not just `sh`, and its stdout+stderr are captured up
to a bound for the logs.

With `[runners.shell] allowed_commands`, a rule whose command is not in the list
fails without running: the list is checked when a rule is set and again here,
since a rule stored before the list was configured is still in the log.

Scripts die with the server: a small guard process (ProcessGuard) learns the
process group of every script and kills the groups still running when the
server is gone (its pipe from the server reads end-of-file), e.g. after a
SIGKILL, so that the restarted server's runs of the same jobs do not overlap
the old ones. See docs/runners.md for why this and not PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Collection

import structlog
import trio

from kairoi_trio.commands import CommandError
from kairoi_trio.core.validation import check_allowed_command
from kairoi_trio.model import Job, Rule, ShellRunner, format_time
from kairoi_trio.runners.base import RunFailed, Runner

log = structlog.get_logger(__name__)


class ShellRunnerBackend(Runner):
    kind = "shell"

    def __init__(
        self,
        *,
        output_limit_bytes: int = 64 << 10,
        cwd: str | None = None,
        allowed_commands: Collection[str] = (),
        guard: ProcessGuard | None = None,
    ) -> None:
        """allowed_commands: when not empty, the only commands a run may start.
        guard: kills the scripts left when the server dies (default: the process's)."""
        self.output_limit = output_limit_bytes
        self.cwd = cwd
        self.allowed_commands = frozenset(allowed_commands)
        self.guard = guard or default_guard()

    async def run(self, job: Job, rule: Rule) -> str:
        assert isinstance(rule.runner, ShellRunner)
        if "\0" in job.id or "\0" in rule.runner.command:
            # execve takes C strings: a NUL would cut the id short, so refuse it.
            what = "job id" if "\0" in job.id else "rule's command"
            raise RunFailed(f"the {what} contains a NUL character, which no process can receive")
        try:
            check_allowed_command(rule.runner.command, self.allowed_commands)
        except CommandError as refused:
            raise RunFailed(refused.message) from None
        env = dict(
            os.environ, KAIROI_JOB_ID=job.id, KAIROI_SCHEDULED_AT=format_time(job.scheduled_at)
        )
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
            self._spawn,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
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
            self.guard.forget(process.pid)  # reaped: its pid may be reused from now on
            os.close(pidfd)
            process.stdout.close()
        return status, bytes(output)

    def _spawn(self, argv: list[str], **options: object) -> subprocess.Popen[bytes]:
        """Start a script in a session (process group) of its own, registered with
        the guard before anything else happens. Runs in a worker thread."""
        env = options.pop("env")
        assert isinstance(env, dict)
        mark = self.guard.expect()  # before the fork: a kill right after it is covered too
        env[ProcessGuard.ENV_NAME] = mark
        process = subprocess.Popen(argv, start_new_session=True, env=env, **options)  # type: ignore[call-overload]
        self.guard.watch(process.pid, mark)
        return process

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


# -- scripts die with the server ------------------------------------------------------------

# The guard: reads "+<pgid>" / "-<pgid>" lines from the server on stdin and, at
# end-of-file (the server closed it, or died and the kernel closed it), kills every
# process group still listed. Its own session keeps a terminal's Ctrl-C away from
# it; -I -S: no site packages, no environment, a ~10 ms start.
_GUARD_CODE = """
import os, signal, sys
name = sys.argv[1].encode()  # KAIROI_SCRIPT_GUARD
groups, expected, pending = set(), set(), b""
while chunk := os.read(0, 65536):
    *lines, pending = (pending + chunk).split(b"\\n")
    for line in lines:
        if line[:1] == b"~":  # a script is about to start with this mark
            expected.add(line[1:])
        elif line[:1] == b"+":  # "+<pgid> <mark>": it started
            pgid, _, mark = line[1:].partition(b" ")
            groups.add(int(pgid))
            expected.discard(mark)
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
wanted = {name + b"=" + mark for mark in expected}

def marked():
    # Scripts forked but never announced (the server died between "~" and "+"):
    # found by the mark their environment carries.
    found = set()
    if not wanted:
        return found
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/" + pid + "/environ", "rb") as f:
                    if wanted.intersection(f.read().split(b"\\0")):
                        found.add(os.getpgid(int(pid)))
            except OSError:
                pass
    return found

for _ in range(2):  # twice: a script may have been forking while we looked
    for pgid in groups | marked():
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    groups = set()
"""


class ProcessGuard:
    """A process outside the server that kills the scripts' process groups when the
    server is gone, however it went (SIGKILL, OOM killer, a crash).

    `watch(pgid)` right after a script starts, `forget(pgid)` once it is reaped.
    The guard is started on first use and restarted if it died (then the groups it
    knew are unguarded). Writes never block: the pipe is non-blocking, and a guard
    too slow to read costs a warning, not a stalled runner. Thread-safe.
    """

    ENV_NAME = "KAIROI_SCRIPT_GUARD"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Marks put in scripts' environments (ENV_NAME): the guard finds by them the
        # scripts whose "+<pgid>" never reached it (the server killed right after a fork).
        self._token = secrets.token_hex(8)
        self._marks = itertools.count()
        self._process: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None
        self._warned = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def expect(self) -> str:
        """A new mark for a script about to start (put it in its environment as ENV_NAME)."""
        mark = f"{self._token}.{next(self._marks)}"
        self._send(b"~%s\n" % mark.encode(), start=True)
        return mark

    def watch(self, pgid: int, mark: str = "") -> None:
        self._send(b"+%d %s\n" % (pgid, mark.encode()), start=True)

    def forget(self, pgid: int) -> None:
        self._send(b"-%d\n" % pgid, start=False)

    def close(self) -> None:
        """Let the guard go: it kills the groups still watched, then exits."""
        with self._lock:
            self._stop()

    def _send(self, line: bytes, *, start: bool) -> None:
        with self._lock:
            for _ in range(2):  # a second time after restarting a guard that died
                if self._fd is None:
                    if not start:
                        return
                    try:
                        self._start()
                    except OSError as error:  # the script runs anyway, unguarded
                        self._warn(f"cannot start the process guard: {error}")
                        return
                assert self._fd is not None
                try:
                    os.write(self._fd, line)
                    return
                except BlockingIOError:
                    self._warn("the process guard is not keeping up: a script went unguarded")
                    return
                except OSError:  # EPIPE: the guard died (killed by someone)
                    log.warning("the process guard died: starting a new one")
                    self._stop()

    def _start(self) -> None:
        read, write = os.pipe()  # close-on-exec: scripts never hold the write end
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _GUARD_CODE,
                    self.ENV_NAME,
                ],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # holds no pipe of the server's open after it
                cwd="/",
                start_new_session=True,
            )
        except OSError:
            os.close(write)
            raise
        finally:
            os.close(read)
        os.set_blocking(write, False)
        self._fd = write

    def _stop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._process is not None:
            process, self._process = self._process, None
            try:
                process.wait(5)  # it exits at once on end-of-file
            except subprocess.TimeoutExpired:
                process.kill()

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)


_default_guard: ProcessGuard | None = None
_default_guard_lock = threading.Lock()


def default_guard() -> ProcessGuard:
    """The guard shared by the process's shell runners; it lives as long as the process."""
    global _default_guard
    with _default_guard_lock:
        if _default_guard is None:
            _default_guard = ProcessGuard()
        return _default_guard
