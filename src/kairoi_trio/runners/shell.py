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

The pool starts most runs with `start` (no task per run): the script is
spawned there and then, and one task (`serve`, the _Watcher) waits on one
epoll set holding every script's pidfd and output pipe. A job with a payload
runs in a task of its own, with `run` (docs/runners.md, "Starting runs").

Scripts die with the server: a small guard process (ProcessGuard) learns the
process group of every script and kills the groups still running when the
server is gone (its pipe from the server reads end-of-file), e.g. after a
SIGKILL, so that the restarted server's runs of the same jobs do not overlap
the old ones. See docs/runners.md for why this and not PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import heapq
import itertools
import math
import mmap
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Collection
from typing import TypeVar

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
        allowed_commands: Collection[str] = (),
        guard: ProcessGuard | None = None,
    ) -> None:
        """allowed_commands: when not empty, the only commands a run may start.
        guard: kills the scripts left when the server dies (default: the process's)."""
        self.output_limit = output_limit_bytes
        self.allowed_commands = frozenset(allowed_commands)
        self.guard = guard or default_guard()
        # The server's environment, as bytes, taken once: copying os.environ for
        # each run (decoding ~40 variables) cost more CPU than the spawn itself.
        self._environ = dict(os.environb)
        path = os.environ.get("PATH", os.defpath)
        # Not found: the spawn fails with ENOENT, "cannot start sh: No such file ...".
        self._sh = shutil.which("sh", path=path) or "/nonexistent/sh"
        _no_inherited_descriptors()
        self._watcher: _Watcher | None = None  # while serve() runs

    async def run(self, job: Job, rule: Rule) -> str:
        assert isinstance(rule.runner, ShellRunner)
        refusal = self._refusal(job, rule.runner)
        if refusal is not None:
            raise RunFailed(refusal)
        env = self._environment(job)
        payload_file = None
        if job.payload:
            try:
                payload_file = await trio.to_thread.run_sync(_write_temp, job.payload)
            except OSError as error:  # a full disk, a read-only /tmp
                raise RunFailed(f"cannot write the payload's file: {error.strerror}") from None
            env[b"KAIROI_PAYLOAD_FILE"] = os.fsencode(payload_file)
        try:
            status, output = await self._execute(["sh", "--", rule.runner.command, job.id], env)
        finally:
            if payload_file is not None:
                with trio.CancelScope(shield=True):  # also after a timeout or a shutdown
                    await trio.to_thread.run_sync(_remove, payload_file)
        ok, message = _outcome(job, rule, status, output)
        if not ok:
            raise RunFailed(message)
        return message

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        """Start the script now and leave it to `serve`'s watcher, which calls `done`
        once it has ended: no task per run. False (run() then takes it) when `serve`
        is not running, for a job with a payload (its file is written in a thread) and
        for a run that fails at once (a NUL, a command not allowed).

        A run that outlives `timeout_s` is killed (its whole process group) and ends
        with "timed out after {timeout_s}s", as the pool words a task's timeout."""
        watcher = self._watcher
        spec = rule.runner
        if (
            watcher is None
            or job.payload
            or not isinstance(spec, ShellRunner)
            or self._refusal(job, spec) is not None
        ):
            return False
        try:
            pid, output_fd = self._spawn(["sh", "--", spec.command, job.id], self._environment(job))
        except RunFailed as failure:
            done(False, failure.message)
            return True
        watcher.watch(_WatchedRun(job, rule, pid, output_fd, timeout_s, done))
        return True

    def _refusal(self, job: Job, spec: ShellRunner) -> str | None:
        """Why this run must fail without starting, or None."""
        if "\0" in job.id or "\0" in spec.command:
            # execve takes C strings: a NUL would cut the id short, so refuse it.
            what = "job id" if "\0" in job.id else "rule's command"
            return f"the {what} contains a NUL character, which no process can receive"
        for what, text in (("job id", job.id), ("rule's command", spec.command)):
            if not text.isascii():  # cheap; a lone surrogate cannot be encoded for argv
                try:
                    os.fsencode(text)
                except UnicodeEncodeError as error:
                    return (
                        f"the {what} contains {text[error.start]!r}, a lone surrogate, "
                        "which no process can receive"
                    )
        try:
            check_allowed_command(spec.command, self.allowed_commands)
        except CommandError as refused:
            return refused.message
        return None

    def _environment(self, job: Job) -> dict[bytes, bytes]:
        env = self._environ.copy()
        env[b"KAIROI_JOB_ID"] = os.fsencode(job.id)
        env[b"KAIROI_SCHEDULED_AT"] = format_time(job.scheduled_at).encode()
        return env

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the scripts `start` started, until cancelled; then kill those left."""
        watcher = _Watcher(self)
        try:
            async with trio.open_nursery() as nursery:
                watcher.nursery = nursery
                self._watcher = watcher
                task_status.started()
                await watcher.watch_forever()
        finally:
            self._watcher = None
            await watcher.kill_all()  # its wait is shielded: it runs when cancelled too
            watcher.close()

    async def aclose(self) -> None:
        """Past the grace period: kill the scripts still running (their jobs stay
        triggered, as a cancelled run's do)."""
        if self._watcher is not None:
            await self._watcher.kill_all()

    async def _execute(self, argv: list[str], env: dict[bytes, bytes]) -> tuple[int, bytes]:
        """Run argv to its end: (exit status, or -signal; its output up to the bound).

        Cancelled (a timeout, the end of the grace period): the process group is
        killed and reaped before the cancel goes on."""
        # In the event loop, not a worker thread: os.posix_spawn holds the GIL until
        # `sh` is exec'd, so a thread would not let the loop work meanwhile, and the
        # hop to it and back only adds latency (docs/runners.md, "Starting runs").
        pid, output_fd = self._spawn(argv, env)
        output = bytearray()
        try:
            pidfd = os.pidfd_open(pid)  # readable once the process has exited
            try:
                # One epoll set holds the pidfd and the output pipe, so that one task
                # waits for either (Trio waits on the set's descriptor), instead of a
                # nursery and a second task to read the output (~20% of the runner's
                # CPU per run).
                watched = select.epoll(2)
            except OSError:
                os.close(pidfd)
                raise
        except OSError as error:  # out of descriptors: do not leave the script unwatched
            _kill_group(pid)
            os.close(output_fd)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.waitpid, pid, 0)
            self.guard.forget(pid)
            raise RunFailed(f"cannot watch sh: {error.strerror}") from None
        status: int | None = None
        try:
            os.set_blocking(output_fd, False)
            watched.register(pidfd, select.EPOLLIN)
            watched.register(output_fd, select.EPOLLIN)
            status, pipe_open = await self._wait(pid, pidfd, output_fd, watched, output)
            if pipe_open:  # children of the script may hold it: what they write in 0.1 s
                with trio.move_on_after(0.1):
                    while pipe_open:
                        await trio.lowlevel.wait_readable(watched.fileno())
                        pipe_open = self._read_output(output_fd, output)
        finally:
            if status is None:  # cancelled: a timeout or the end of the grace period
                _kill_group(pid)
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.wait_readable(pidfd)
                _reap(pid)
            self.guard.forget(pid)  # reaped: its pid may be reused from now on
            for fd in (watched.fileno(), pidfd):
                trio.lowlevel.notify_closing(fd)
            watched.close()
            os.close(pidfd)
            os.close(output_fd)
        return status, bytes(output)

    async def _wait(
        self, pid: int, pidfd: int, output_fd: int, watched: select.epoll, output: bytearray
    ) -> tuple[int, bool]:
        """Read the output until the script has exited; reap it. (Its exit status or
        -signal, whether the pipe is still open.)"""
        pipe_open = True
        while True:
            await trio.lowlevel.wait_readable(watched.fileno())
            exited = False
            for fd, _ in watched.poll(0):
                if fd == pidfd:
                    exited = True
                elif not self._read_output(output_fd, output):
                    pipe_open = False
                    watched.unregister(output_fd)
            if exited:
                watched.unregister(pidfd)
                return _reap(pid), pipe_open

    def _read_output(self, fd: int, output: bytearray) -> bool:
        """Take what the pipe holds, up to the bound; False at its end."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        room = self.output_limit - len(output)
        if room > 0:
            output += chunk[:room]
        return bool(chunk)

    def _spawn(self, argv: list[str], env: dict[bytes, bytes]) -> tuple[int, int]:
        """Start a script in a session (process group) of its own, registered with
        the guard before anything else happens: (pid, read end of its stdout+stderr).

        os.posix_spawn is glibc's clone(CLONE_VM | CLONE_VFORK): no copy of the
        server's page tables; it returns once `sh` is exec'd.
        Raises RunFailed if `sh` cannot be started."""
        mark = self.guard.expect()  # before the spawn: a kill right after it is covered too
        env[ProcessGuard.ENV_NAME.encode()] = mark.encode()
        try:
            read, write = os.pipe()  # close-on-exec: only the dup2'd copies reach the script
        except OSError as error:  # out of descriptors
            self.guard.abandon(mark)
            raise RunFailed(f"cannot start sh: {error.strerror}") from None
        try:
            pid = os.posix_spawn(
                self._sh,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, write, 1),
                    (os.POSIX_SPAWN_DUP2, write, 2),
                ],
                setsid=True,
                # Python ignores these at start-up and exec keeps an ignored signal
                # ignored: reset them, as Popen(restore_signals=True) does.
                setsigdef=_RESTORED_SIGNALS,
            )
        except OSError as error:
            os.close(read)
            self.guard.abandon(mark)
            raise RunFailed(f"cannot start sh: {error.strerror}") from None
        finally:
            os.close(write)
        self.guard.watch(pid, mark)
        return pid, read


_RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def _outcome(job: Job, rule: Rule, status: int, output: bytes) -> tuple[bool, str]:
    """A finished script's result (ok, message), its output logged if it wrote any."""
    text = output.decode("utf-8", "replace").strip()
    if text:
        log.info("shell output", job=job.id, rule=rule.id, exit_status=status, output=text)
    if status == 0:
        return True, "exit status 0"
    return False, f"killed by signal {-status}" if status < 0 else f"exit status {status}"


# What a script's children still write to its output, once it has exited, is read
# for this long at most (they may hold the pipe open for ever).
LINGER_S = 0.1


class _WatchedRun:
    """A script started by ShellRunnerBackend.start, until its `done` is called."""

    __slots__ = (
        "job", "rule", "pid", "output_fd", "pidfd", "output", "status", "timeout_s", "timed_out",
        "done", "ended", "deadlines",
    )  # fmt: skip

    def __init__(
        self,
        job: Job,
        rule: Rule,
        pid: int,
        output_fd: int,
        timeout_s: float | None,
        done: Callable[[bool, str], None],
    ) -> None:
        self.job, self.rule, self.pid, self.output_fd = job, rule, pid, output_fd
        self.pidfd = -1  # readable once the script has exited
        self.output = bytearray()
        self.status: int | None = None  # once reaped
        self.timeout_s, self.timed_out = timeout_s, False
        self.done = done
        self.ended = False
        self.deadlines = 0  # its entries in the watcher's heap


class _Watcher:
    """The scripts started without a task, in one epoll set that one task waits on.

    Per run, the set holds the script's pidfd and the read end of its output pipe.
    The watcher reads output as it comes (up to the bound, so a chatty script never
    blocks on a full pipe), reaps a script once its pidfd is readable, reads for
    LINGER_S more if the script's children still hold the pipe, then calls the
    run's `done`. Timeouts and lingering runs wait in a heap of deadlines, which
    bounds the task's wait. One set and one waiting task for every run, instead
    of a task, a set and Trio's registration of it per run, is what makes a burst
    of short scripts cheaper (docs/runners.md, "Starting runs").
    """

    def __init__(self, backend: ShellRunnerBackend) -> None:
        self.backend = backend
        self.epoll = select.epoll()
        self.nursery: trio.Nursery | None = None
        self._runs: dict[int, _WatchedRun] = {}  # by pidfd and by output_fd
        self._deadlines: list[tuple[float, int, _WatchedRun]] = []  # a heap
        self._stale = 0  # entries in it of runs that have ended
        self._sequence = itertools.count()  # ties in the heap
        self._waiting: trio.CancelScope | None = None  # the wait, bounded by the deadlines

    def watch(self, run: _WatchedRun) -> None:
        """Take a spawned script: watched until its `done` is called."""
        try:
            run.pidfd = os.pidfd_open(run.pid)
            os.set_blocking(run.output_fd, False)
            self.epoll.register(run.pidfd, select.EPOLLIN)
            self._runs[run.pidfd] = run
            self.epoll.register(run.output_fd, select.EPOLLIN)
            self._runs[run.output_fd] = run
        except OSError as error:  # out of descriptors: do not leave the script unwatched
            _kill_group(run.pid)
            self._unwatch(run)
            assert self.nursery is not None
            self.nursery.start_soon(self._reap_in_thread, run.pid)
            self._end(run, False, f"cannot watch sh: {error.strerror}")
            return
        if run.timeout_s is not None:
            self._after(run, run.timeout_s)

    async def watch_forever(self) -> None:
        while True:
            deadline = self._deadlines[0][0] if self._deadlines else math.inf
            with trio.move_on_at(deadline) as self._waiting:
                await trio.lowlevel.wait_readable(self.epoll.fileno())
            self._waiting = None
            # Each event's run is looked up before any is handled: a `done` called in
            # this batch may start a run (a retry) whose pipe or pidfd reuses the number
            # of a descriptor closed earlier in it, and an event of the old descriptor
            # must not be taken for the new one's (a pidfd "readable" while its script
            # runs: waitpid would block the event loop until it ends).
            runs = self._runs
            events = [(fd, runs.get(fd)) for fd, _ in self.epoll.poll(0)]
            for fd, run in events:
                if run is None or run.ended:  # its run ended earlier in this batch
                    continue
                if fd == run.pidfd:
                    self._exited(run)
                elif fd == run.output_fd and not self.backend._read_output(fd, run.output):
                    self._output_closed(run)
            self._expire(trio.current_time())

    def _after(self, run: _WatchedRun, seconds: float) -> None:
        deadline = trio.current_time() + seconds
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), run))
        run.deadlines += 1
        if self._waiting is not None and deadline < self._waiting.deadline:
            self._waiting.deadline = deadline

    def _expire(self, now: float) -> None:
        # self._deadlines each time, not a local alias: a run that ends here may have
        # the heap rebuilt (_forget_deadlines), and popping the old list would count
        # the entries it shares with the new one twice.
        while self._deadlines and self._deadlines[0][0] <= now:
            run = heapq.heappop(self._deadlines)[2]
            run.deadlines -= 1
            if run.ended:
                self._stale -= 1
                continue
            if run.status is None:  # its timeout: the pidfd says when it is dead
                run.timed_out = True
                _kill_group(run.pid)
            else:  # done lingering
                self._finish(run)

    def _exited(self, run: _WatchedRun) -> None:
        run.status = _reap(run.pid)
        self.backend.guard.forget(run.pid)  # reaped: its pid may be reused from now on
        self._close(run, "pidfd")
        if run.timed_out or run.output_fd < 0:
            self._finish(run)
        else:  # children of the script may hold the pipe: what they write in LINGER_S
            self._after(run, LINGER_S)

    def _output_closed(self, run: _WatchedRun) -> None:
        self._close(run, "output_fd")
        if run.status is not None:
            self._finish(run)

    def _finish(self, run: _WatchedRun) -> None:
        self._unwatch(run)
        assert run.status is not None
        if run.timed_out:
            self._end(run, False, f"timed out after {run.timeout_s}s")
        else:
            self._end(run, *_outcome(run.job, run.rule, run.status, bytes(run.output)))

    def _end(self, run: _WatchedRun, ok: bool, message: str) -> None:
        run.ended = True
        self._forget_deadlines(run)
        run.done(ok, message)

    def _forget_deadlines(self, run: _WatchedRun) -> None:
        """An ended run's entries stay in the heap until popped; once they are most of
        it, it is rebuilt without them: runs that end long before a long timeout
        (an hour, at hundreds of runs a second) must not pile up in memory."""
        self._stale += run.deadlines
        if self._stale > 64 and self._stale * 2 > len(self._deadlines):
            live = [entry for entry in self._deadlines if not entry[2].ended]
            for entry in self._deadlines:
                entry[2].deadlines = 0
            for entry in live:
                entry[2].deadlines += 1
            heapq.heapify(live)
            self._deadlines, self._stale = live, 0

    def _close(self, run: _WatchedRun, which: str) -> None:
        fd = getattr(run, which)
        if fd >= 0:
            setattr(run, which, -1)
            if self._runs.pop(fd, None) is not None:
                self.epoll.unregister(fd)
            os.close(fd)

    def _unwatch(self, run: _WatchedRun) -> None:
        self._close(run, "pidfd")
        self._close(run, "output_fd")

    async def kill_all(self) -> None:
        """Kill the scripts still running and reap them; their runs end without `done`
        (as a cancelled task's run: the job stays triggered and runs again)."""
        runs = {id(run): run for run in self._runs.values()}.values()
        for fd in self._runs:
            self.epoll.unregister(fd)
        self._runs.clear()  # the watching task sees none of them from now on
        for run in runs:
            run.ended = True
            self._forget_deadlines(run)
            if run.status is None:
                _kill_group(run.pid)
        # Shielded: these runs are out of the watcher's hands now, so a caller already
        # cancelled (aclose in a pool whose task was cancelled) must still reap them and
        # close their descriptors. SIGKILLed: only a process stuck in the kernel is slower.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for run in runs:
                if run.status is None:
                    await trio.lowlevel.wait_readable(run.pidfd)
        for run in runs:
            if run.status is None:
                run.status = _reap_nowait(run.pid)
                if run.status is not None:
                    self.backend.guard.forget(run.pid)
                trio.lowlevel.notify_closing(run.pidfd)
            self._unwatch(run)

    async def _reap_in_thread(self, pid: int) -> None:
        # Shielded: to_thread.run_sync checks for a cancel before it starts the thread,
        # and serve cancelled right after `watch` must not leave a zombie (killed already).
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.waitpid, pid, 0)
        self.backend.guard.forget(pid)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.epoll.fileno())
        self.epoll.close()


def _reap(pid: int) -> int:
    """Reap an exited child: its exit status, or -signal (as Popen.returncode)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _reap_nowait(pid: int) -> int | None:
    """_reap for a child that may still run: None if it does."""
    found, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if found else None


def _no_inherited_descriptors() -> None:
    """Make every descriptor above 2 close-on-exec.

    posix_spawn does not close descriptors as Popen(close_fds=True) did: scripts
    get those not marked close-on-exec. Python opens everything close-on-exec
    (PEP 446); what is left are descriptors the server inherited from whoever
    started it, dealt with here once."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _write_temp(payload: bytes) -> str:
    """A new temporary file holding `payload`: its path. Raises OSError, leaving no file."""
    fd, path = tempfile.mkstemp(prefix="kairoi-payload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    except BaseException:
        _remove(path)
        raise
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- scripts die with the server ------------------------------------------------------------

# The guard: blocks reading its stdin, a pipe whose write end only the server
# holds, until end-of-file (the server closed it, or died and the kernel closed
# it); then reads the table of scripts the server keeps in a memfd they share and
# kills every process group still listed. The server updates the table in memory,
# with no system call and no wake-up of the guard per script. A slot is two
# int64: (mark, pgid); (0, 0) is free; (mark, 0) a script about to start with
# that mark in its environment; (mark, pgid) one running. Its own session keeps a
# terminal's Ctrl-C away from it; -I -S: no site packages, no environment, a
# ~10 ms start.
_GUARD_CODE = """
import os, signal, struct, sys
name, token, table = sys.argv[1].encode(), sys.argv[2].encode(), int(sys.argv[3])
while os.read(0, 65536):
    pass
data = os.pread(table, os.fstat(table).st_size, 0)
groups, wanted = set(), set()
for mark, pgid in struct.iter_unpack("<qq", data):
    if pgid > 0:
        groups.add(pgid)
    elif mark > 0:
        wanted.add(name + b"=" + token + b".%d" % mark)

def marked():
    # Scripts spawned but not yet listed with their group (the server died
    # during the spawn): found by the mark their environment carries.
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
"""

_Key = TypeVar("_Key", str, int)  # a mark, or a process group
_SLOT = struct.Struct("<qq")  # (mark, pgid), as _GUARD_CODE reads them
_INITIAL_SLOTS = 256  # doubled when full


class ProcessGuard:
    """A process outside the server that kills the scripts' process groups when the
    server is gone, however it went (SIGKILL, OOM killer, a crash).

    `expect()` before a script starts, `watch(pgid, mark)` right after (or
    `abandon(mark)` if it did not start), `forget(pgid)` once it is reaped.
    These only write a table in memory shared with the guard (a memfd): no
    system call, nothing for the guard to wake up for. The guard is started on
    first use and restarted, with the same table, if it died. Thread-safe.
    """

    ENV_NAME = "KAIROI_SCRIPT_GUARD"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Marks put in scripts' environments (ENV_NAME): the guard finds by them the
        # scripts whose group was not listed yet (the server killed during a spawn).
        self._token = secrets.token_hex(8)
        self._marks = itertools.count(1)
        self._table: mmap.mmap | None = None
        self._table_fd: int | None = None
        self._free: list[int] = []  # free slots' offsets
        self._slot_of_mark: dict[str, int] = {}
        self._slot_of_group: dict[int, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None  # the pipe whose end-of-file the guard waits for
        self._warned = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def expect(self) -> str:
        """A new mark for a script about to start (put it in its environment as ENV_NAME)."""
        number = next(self._marks)
        mark = f"{self._token}.{number}"
        with self._lock:
            if not self._running():
                return mark  # unguarded (warned)
            if not self._free:
                self._grow()
            offset = self._free.pop()
            assert self._table is not None
            _SLOT.pack_into(self._table, offset, number, 0)
            self._slot_of_mark[mark] = offset
        return mark

    def abandon(self, mark: str) -> None:
        """The script `expect` made `mark` for did not start: free its slot."""
        self._release(self._slot_of_mark, mark)

    def watch(self, pgid: int, mark: str = "") -> None:
        with self._lock:
            offset = self._slot_of_mark.pop(mark, None)
            if offset is None or self._table is None:
                return
            _SLOT.pack_into(self._table, offset, int(mark.rpartition(".")[2]), pgid)
            self._slot_of_group[pgid] = offset

    def forget(self, pgid: int) -> None:
        self._release(self._slot_of_group, pgid)

    def _release(self, slots: dict[_Key, int], key: _Key) -> None:
        """Free the slot `slots` holds for `key`, if any."""
        with self._lock:
            offset = slots.pop(key, None)
            if offset is None or self._table is None:
                return
            _SLOT.pack_into(self._table, offset, 0, 0)
            self._free.append(offset)

    def close(self) -> None:
        """Let the guard go: it kills the groups still watched, then exits. Its table
        is freed too (a script started later gets a new guard and a new table)."""
        with self._lock:
            self._stop()
            if self._table is not None:
                self._table.close()
                self._table = None
            if self._table_fd is not None:
                os.close(self._table_fd)
                self._table_fd = None
            self._slot_of_mark.clear()
            self._slot_of_group.clear()

    def _running(self) -> bool:
        """Start the guard if there is none, or a new one if it died."""
        if self._process is not None and self._process.poll() is not None:
            log.warning("the process guard died: starting a new one")
            self._stop()
        if self._fd is None:
            try:
                self._start()
            except OSError as error:  # the script runs anyway, unguarded
                self._warn(f"cannot start the process guard: {error}")
                return False
        return True

    def _grow(self) -> None:
        assert self._table_fd is not None and self._table is not None
        old = len(self._table)
        os.ftruncate(self._table_fd, old * 2)  # zeros: free slots
        self._table.close()
        self._table = mmap.mmap(self._table_fd, old * 2)
        self._free.extend(range(old * 2 - _SLOT.size, old - 1, -_SLOT.size))

    def _start(self) -> None:
        if self._table_fd is None:
            fd = os.memfd_create("kairoi-script-guard", os.MFD_CLOEXEC)
            size = _INITIAL_SLOTS * _SLOT.size
            os.ftruncate(fd, size)
            self._table_fd, self._table = fd, mmap.mmap(fd, size)
            self._free = list(range(size - _SLOT.size, -1, -_SLOT.size))
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
                    self._token,
                    str(self._table_fd),
                ],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # holds no pipe of the server's open after it
                cwd="/",
                start_new_session=True,
                pass_fds=(self._table_fd,),
            )
        except OSError:
            os.close(write)
            raise
        finally:
            os.close(read)
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
