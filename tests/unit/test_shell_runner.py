"""The shell runner (runners/shell.py, SPEC §5) with real `sh` processes."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog.testing
import trio
from support.run_ends import Ends

from kairoi_trio.model import MIN_TIME_US, Job, Recurrence, Rule, Schedule, ShellRunner
from kairoi_trio.runners.base import RunFailed
from kairoi_trio.runners.shell import ProcessGuard, ShellRunnerBackend


def script(tmp_path: Path, body: str, name: str = "job.sh") -> Rule:
    path = tmp_path / name
    path.write_text(body)
    return Rule("r", "", ShellRunner(str(path)))


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def reaped(pid: int) -> bool:
    """Gone and reaped: not even a zombie is left."""
    return not Path(f"/proc/{pid}").exists()


def written(path: Path) -> bool:
    return path.exists() and path.read_text().endswith("\n")


def content(path: Path) -> str:
    return path.read_text().strip()


def payload_file_left(out: Path) -> bool:
    """Whether the payload file whose path the script wrote to `out` still exists."""
    return Path(content(out)).exists()


async def poll(predicate: Callable[[], bool]) -> None:
    """Wait up to 5 s for `predicate` to hold."""
    for _ in range(500):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"still not {predicate}")


async def wait_for_file(path: Path) -> str:
    await poll(lambda: written(path))
    return content(path)


_run_in_a_task = ShellRunnerBackend.run


async def _run_watched(self: ShellRunnerBackend, job: Job, rule: Rule) -> str:
    """ShellRunnerBackend.run by way of `start` and the watcher in `serve`, as the pool
    runs a job without a payload; cancelling it ends `serve`, as a shutdown does."""
    ended: list[tuple[bool, str]] = []
    finished = trio.Event()

    def done(ok: bool, message: str) -> None:
        ended.append((ok, message))
        finished.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(self.serve)
        started = self.start(job, rule, None, done)
        if started:
            await finished.wait()
        nursery.cancel_scope.cancel()
    if not started:  # a payload, a refusal: the task's way
        return await _run_in_a_task(self, job, rule)
    ((ok, message),) = ended  # exactly once
    if not ok:
        raise RunFailed(message)
    return message


@pytest.fixture(autouse=True, params=["task", "watched"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs its scripts both ways: in a task (`run`, for jobs with a payload
    and in the tests' own calls) and watched without a task (`start`, the pool's way)."""
    if request.param == "watched":
        monkeypatch.setattr(ShellRunnerBackend, "run", _run_watched)
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_inherited_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIROI_PAYLOAD_FILE", raising=False)
    monkeypatch.delenv("KAIROI_JOB_ID", raising=False)
    monkeypatch.delenv("KAIROI_SCHEDULED_AT", raising=False)


async def test_exit_status_zero_is_success(tmp_path: Path) -> None:
    rule = script(tmp_path, "exit 0\n")
    assert await ShellRunnerBackend().run(Job("j", 0), rule) == "exit status 0"


@pytest.mark.parametrize("status", [1, 3, 255])
async def test_a_non_zero_exit_status_is_a_failure(tmp_path: Path, status: int) -> None:
    rule = script(tmp_path, f"exit {status}\n")
    with pytest.raises(RunFailed) as failure:
        await ShellRunnerBackend().run(Job("j", 0), rule)
    assert failure.value.message == f"exit status {status}"


async def test_death_by_signal_is_a_failure(tmp_path: Path) -> None:
    rule = script(tmp_path, "kill -9 $$\n")
    with pytest.raises(RunFailed) as failure:
        await ShellRunnerBackend().run(Job("j", 0), rule)
    assert failure.value.message == "killed by signal 9"


async def test_a_missing_script_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    rule = Rule("r", "", ShellRunner(str(tmp_path / "no-such-script.sh")))
    with pytest.raises(RunFailed) as failure:
        await ShellRunnerBackend().run(Job("j", 0), rule)
    # sh cannot open the script: dash exits with 2, bash with 127
    assert failure.value.message in ("exit status 2", "exit status 127")


async def test_no_sh_in_path_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rule = script(tmp_path, f"touch {tmp_path}/ran\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RunFailed) as failure:
        await ShellRunnerBackend().run(Job("j", 0), rule)
    assert failure.value.message == "cannot start sh: No such file or directory"
    assert not (tmp_path / "ran").exists()  # noqa: ASYNC240


async def test_the_job_id_is_the_argument_and_in_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fields = '"$1" "$KAIROI_JOB_ID" "${KAIROI_PAYLOAD_FILE-unset}"'
    rule = script(tmp_path, f'printf "%s\\n%s\\n%s\\n" {fields} > {out}\n')
    job_id = "app.mail 42 'quoted' é"
    await ShellRunnerBackend().run(Job(job_id, 0), rule)
    assert out.read_text().splitlines() == [job_id, job_id, "unset"]


# 2026-12-01T09:00:00Z; the scheduled_at tests of every runner use the same times.
NOMINAL = 1_796_115_600_000_000
HOUR = 3_600_000_000


def recurring(
    nominal: int, execute_at: int, attempts: int = 1, job_id: str = "r.hourly", payload: bytes = b""
) -> Job:
    """A run of an hourly job's occurrence `nominal`, due at `execute_at` (jitter, a retry)."""
    recurrence = Recurrence(Schedule("every 1h", start=NOMINAL), nominal)
    return Job(job_id, execute_at, payload=payload, attempts=attempts, recurrence=recurrence)


async def scheduled_at_seen(tmp_path: Path, job: Job) -> str:
    """KAIROI_SCHEDULED_AT as the script of `job`'s run saw it ("unset" if it had none)."""
    out = tmp_path / "scheduled_at"
    rule = script(tmp_path, f'printf "%s\\n" "${{KAIROI_SCHEDULED_AT-unset}}" > {out}\n')
    assert await ShellRunnerBackend().run(job, rule) == "exit status 0"
    return content(out)


async def test_a_one_shot_run_is_scheduled_at_its_execute_at(tmp_path: Path) -> None:
    """RFC 3339, UTC, microseconds: the time the job was set for, to the microsecond."""
    seen = await scheduled_at_seen(tmp_path, Job("j", NOMINAL + 123))
    assert seen == "2026-12-01T09:00:00.000123Z"
    assert await scheduled_at_seen(tmp_path, Job("old", MIN_TIME_US)) == (
        "0001-01-01T00:00:00.000000Z"
    )


async def test_a_recurring_run_is_scheduled_at_its_occurrence_not_its_execute_at(
    tmp_path: Path,
) -> None:
    """Jitter and retries move execute_at; the occurrence a script dedupes on stays."""
    jittered = await scheduled_at_seen(tmp_path, recurring(NOMINAL, NOMINAL + 37_000_123))
    retried = await scheduled_at_seen(tmp_path, recurring(NOMINAL, NOMINAL + 90_000_000, 2))
    next_one = await scheduled_at_seen(tmp_path, recurring(NOMINAL + HOUR, NOMINAL + HOUR))
    assert jittered == retried == "2026-12-01T09:00:00.000000Z"
    assert next_one == "2026-12-01T10:00:00.000000Z"


async def test_scheduled_at_replaces_one_in_the_servers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started from another scheduler's script must not pass that run's time on."""
    monkeypatch.setenv("KAIROI_SCHEDULED_AT", "1999-01-01T00:00:00.000000Z")
    assert await scheduled_at_seen(tmp_path, Job("j", NOMINAL)) == "2026-12-01T09:00:00.000000Z"


async def test_scheduled_at_comes_with_the_id_argument_and_the_other_variables(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    fields = '"$1" "$KAIROI_JOB_ID" "$KAIROI_SCHEDULED_AT" "$(cat "$KAIROI_PAYLOAD_FILE")"'
    guard = '"${KAIROI_SCRIPT_GUARD:+guarded}"'
    rule = script(tmp_path, f'printf "%s\\n" {fields} {guard} > {out}\n')
    the_job = recurring(NOMINAL, NOMINAL + 5, job_id="r.1", payload=b"the payload")
    await ShellRunnerBackend().run(the_job, rule)
    assert out.read_text().splitlines() == [
        "r.1",
        "r.1",
        "2026-12-01T09:00:00.000000Z",
        "the payload",
        "guarded",
    ]


async def test_the_payload_is_in_a_file_removed_afterwards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rule = script(
        tmp_path,
        f'echo "$KAIROI_PAYLOAD_FILE" > {out}\ncat "$KAIROI_PAYLOAD_FILE" > {out}.payload\n',
    )
    payload = b"\x00binary\xff\npayload"
    await ShellRunnerBackend().run(Job("j", 0, payload=payload), rule)
    assert (tmp_path / "out.payload").read_bytes() == payload  # noqa: ASYNC240
    assert not payload_file_left(out)


async def test_the_payload_file_is_removed_after_a_failure_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rule = script(tmp_path, f'echo "$KAIROI_PAYLOAD_FILE" > {out}\nexit 2\n')
    with pytest.raises(RunFailed):
        await ShellRunnerBackend().run(Job("j", 0, payload=b"p"), rule)
    assert not payload_file_left(out)


async def test_the_payload_file_is_removed_after_a_cancel(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rule = script(tmp_path, f'echo "$KAIROI_PAYLOAD_FILE" > {out}\nsleep 30\n')
    with trio.move_on_after(0.5):
        await ShellRunnerBackend().run(Job("j", 0, payload=b"secret"), rule)
    assert not payload_file_left(out)


async def test_stdin_is_closed(tmp_path: Path) -> None:
    # `read` gets end of input at once instead of waiting for a terminal
    rule = script(tmp_path, "if read line; then exit 1; fi\nexit 0\n")
    with trio.fail_after(10):
        assert await ShellRunnerBackend().run(Job("j", 0), rule) == "exit status 0"


async def test_output_is_captured_for_the_logs(tmp_path: Path) -> None:
    rule = script(tmp_path, "echo to stdout\necho to stderr >&2\nexit 4\n")
    with structlog.testing.capture_logs() as logs, pytest.raises(RunFailed):
        await ShellRunnerBackend().run(Job("j", 0), rule)
    (entry,) = [e for e in logs if e["event"] == "shell output"]
    assert entry["output"].splitlines() == ["to stdout", "to stderr"]
    assert entry["exit_status"] == 4
    assert entry["job"] == "j"


async def test_output_is_bounded_and_a_chatty_script_does_not_block(tmp_path: Path) -> None:
    # 2 MB is far beyond a pipe's buffer: unless the runner keeps reading, the script blocks.
    rule = script(tmp_path, "head -c 2000000 /dev/zero | tr '\\0' x\necho\necho done >&2\n")
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        assert await ShellRunnerBackend(output_limit_bytes=1000).run(Job("j", 0), rule)
    (entry,) = [e for e in logs if e["event"] == "shell output"]
    assert len(entry["output"]) <= 1000
    assert entry["output"].startswith("xxx")


async def test_a_cancel_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 60 &\necho $$ $! > {pids}\nwait\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ShellRunnerBackend().run, Job("j", 0), rule)
        shell_pid, child_pid = map(int, (await wait_for_file(pids)).split())
        assert not gone(shell_pid) and not gone(child_pid)
        nursery.cancel_scope.cancel()  # as a timeout or the end of the grace period does
    try:
        await poll(lambda: gone(shell_pid) and gone(child_pid))
    finally:
        for pid in (shell_pid, child_pid):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_timeout_with_move_on_after_returns_promptly(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 60 &\necho $$ $! > {pids}\nsleep 60\n")
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await ShellRunnerBackend().run(Job("j", 0), rule)
    assert scope.cancelled_caught
    assert trio.current_time() - start < 5
    shell_pid, child_pid = map(int, (await wait_for_file(pids)).split())
    await poll(lambda: gone(shell_pid) and gone(child_pid))


async def test_a_background_child_holding_the_output_does_not_hold_the_run(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 30 &\necho $! > {pids}\necho started\nexit 0\n")
    try:
        with trio.fail_after(5):
            assert await ShellRunnerBackend().run(Job("j", 0), rule) == "exit status 0"
    finally:
        child = int(await wait_for_file(pids))
        if not gone(child):
            os.kill(child, signal.SIGKILL)


# Ids every protocol accepts; the script must get each one byte for byte.
HOSTILE_IDS = [
    "h.é",
    "h.with  two spaces ",
    "h.\"double\" 'single' `back` $(echo no) ${HOME} \\",
    "h.cr\rlf\nend\n",
    "h.ctl\x01\x07\x1b[31m\x7f",
    "-h.leading-dash",
    "--",
    "-c",
    "h.*?[glob]",
    "h." + "x" * 65_533,  # 65,535 bytes, the longest id
    "h." + "é" * 32_766,  # 65,534 bytes of two-byte characters
]


@pytest.mark.parametrize("job_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
async def test_every_id_reaches_the_script_exactly(tmp_path: Path, job_id: str) -> None:
    rule = script(
        tmp_path,
        f"printf '%s' \"$1\" > {tmp_path}/arg\n"
        f"printf '%s' \"$KAIROI_JOB_ID\" > {tmp_path}/env\n"
        f"printf '%s' \"$#\" > {tmp_path}/count\n",
    )
    assert await ShellRunnerBackend().run(Job(job_id, 0), rule) == "exit status 0"
    assert (tmp_path / "arg").read_bytes() == job_id.encode()  # noqa: ASYNC240
    assert (tmp_path / "env").read_bytes() == job_id.encode()  # noqa: ASYNC240
    assert (tmp_path / "count").read_text() == "1"  # noqa: ASYNC240


async def test_a_nul_in_the_id_fails_the_run_with_a_reason(tmp_path: Path) -> None:
    rule = script(tmp_path, f"touch {tmp_path}/ran\n")
    with pytest.raises(RunFailed) as failure:
        await ShellRunnerBackend().run(Job("h.nul\x00inside", 0), rule)
    assert failure.value.message == (
        "the job id contains a NUL character, which no process can receive"
    )
    assert not (tmp_path / "ran").exists()  # noqa: ASYNC240


async def test_a_command_starting_with_a_dash_is_a_script_not_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "-job.sh").write_text(f"printf '%s' \"$1\" > {tmp_path}/arg\n")
    rule = Rule("r", "", ShellRunner("-job.sh"))
    monkeypatch.chdir(tmp_path)  # scripts run in the server's working directory
    runner = ShellRunnerBackend()
    assert await runner.run(Job("app.1", 0), rule) == "exit status 0"
    assert (tmp_path / "arg").read_text() == "app.1"  # noqa: ASYNC240


async def test_a_binary_payload_reaches_the_script_exactly(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096  # every byte value, 1 MiB
    rule = script(tmp_path, f'cat "$KAIROI_PAYLOAD_FILE" > {tmp_path}/payload\n')
    await ShellRunnerBackend().run(Job("j", 0, payload=payload), rule)
    assert (tmp_path / "payload").read_bytes() == payload  # noqa: ASYNC240


# -- allowed_commands at run time -----------------------------------------------------------


async def test_a_command_no_longer_allowed_fails_without_running(tmp_path: Path) -> None:
    # A rule stored before [runners.shell] allowed_commands was configured.
    rule = script(tmp_path, f"touch {tmp_path}/ran\n")
    runner = ShellRunnerBackend(allowed_commands=["/srv/allowed.sh"])
    with pytest.raises(RunFailed) as failure:
        await runner.run(Job("j", 0), rule)
    assert failure.value.message == (
        f"shell command {str(tmp_path / 'job.sh')!r} is not in the allowed list "
        "([runners.shell] allowed_commands)"
    )
    assert not (tmp_path / "ran").exists()  # noqa: ASYNC240
    allowed = ShellRunnerBackend(allowed_commands=[rule.runner.command])  # type: ignore[union-attr]
    assert await allowed.run(Job("j", 0), rule) == "exit status 0"
    assert (tmp_path / "ran").exists()  # noqa: ASYNC240


async def test_a_refusal_quotes_a_long_command_cut_short(tmp_path: Path) -> None:
    rule = Rule("r", "", ShellRunner("/x" * 30_000))
    with pytest.raises(RunFailed) as failure:
        await ShellRunnerBackend(allowed_commands=["/ok.sh"]).run(Job("j", 0), rule)
    assert "... (59800 more characters) is not in the allowed list" in failure.value.message
    assert len(failure.value.message) < 400


# -- the guard: scripts die with the server ------------------------------------------------


@pytest.fixture
def guard() -> Iterator[ProcessGuard]:
    guard = ProcessGuard()
    yield guard
    guard.close()


async def test_scripts_and_their_children_die_when_the_server_is_gone(
    tmp_path: Path, guard: ProcessGuard
) -> None:
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 60 &\necho $$ $! > {pids}\nwait\n")
    runner = ShellRunnerBackend(guard=guard)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_killed, runner, rule)
        shell_pid, child_pid = map(int, (await wait_for_file(pids)).split())
        assert not gone(shell_pid) and not gone(child_pid)
        guard_pid = guard.pid
        assert guard_pid is not None
        # What the kernel does when the server dies: the guard's pipe is closed.
        await trio.to_thread.run_sync(guard.close)
    try:
        await poll(lambda: gone(shell_pid) and gone(child_pid) and gone(guard_pid))
    finally:
        for pid in (shell_pid, child_pid):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


async def _expect_killed(runner: ShellRunnerBackend, rule: Rule) -> None:
    with pytest.raises(RunFailed, match="killed by signal 9"):
        await runner.run(Job("j", 0), rule)


async def test_what_a_finished_script_left_behind_is_not_killed(
    tmp_path: Path, guard: ProcessGuard
) -> None:
    # The guard forgets a script once it is reaped: its pid may be reused by then.
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 60 >/dev/null 2>&1 &\necho $! > {pids}\n")
    assert await ShellRunnerBackend(guard=guard).run(Job("j", 0), rule) == "exit status 0"
    child_pid = int(await wait_for_file(pids))
    guard_pid = guard.pid
    assert guard_pid is not None
    await trio.to_thread.run_sync(guard.close)
    await poll(lambda: gone(guard_pid))
    try:
        assert not gone(child_pid)
    finally:
        os.kill(child_pid, signal.SIGKILL)


async def test_a_guard_that_died_is_replaced(tmp_path: Path, guard: ProcessGuard) -> None:
    rule = script(tmp_path, "exit 0\n")
    runner = ShellRunnerBackend(guard=guard)
    assert await runner.run(Job("j", 0), rule) == "exit status 0"
    first = guard.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await poll(lambda: gone(first))
    with structlog.testing.capture_logs() as logs:
        assert await runner.run(Job("j", 0), rule) == "exit status 0"
        assert await runner.run(Job("j", 0), rule) == "exit status 0"
    assert guard.pid not in (None, first)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "the process guard died: starting a new one"
    ]


def spawn_marked(guard: ProcessGuard, mark: str) -> int:
    """A `sleep 60` in a session of its own whose environment carries the guard's mark."""
    env = dict(os.environ, **{ProcessGuard.ENV_NAME: mark})
    return os.posix_spawn("/bin/sh", ["sh", "-c", "sleep 60"], env, setsid=True)


async def test_a_script_spawned_but_not_yet_listed_dies_with_the_server(
    guard: ProcessGuard,
) -> None:
    # The server killed between the spawn and watch(): the guard finds it by its mark.
    pid = spawn_marked(guard, guard.expect())
    await close_and_see_killed(guard, pid)


async def test_the_guard_keeps_track_of_more_scripts_than_its_first_table_holds(
    guard: ProcessGuard,
) -> None:
    for _ in range(300):  # the table starts with 256 slots
        guard.expect()
    mark = guard.expect()
    pid = spawn_marked(guard, mark)
    guard.watch(pid, mark)
    await close_and_see_killed(guard, pid)


async def close_and_see_killed(guard: ProcessGuard, pid: int) -> None:
    """Let the guard go and see it kill `pid` (which is reaped here, whatever happens)."""
    try:
        await trio.to_thread.run_sync(guard.close)
        await poll(lambda: gone(pid))
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
        await trio.to_thread.run_sync(os.waitpid, pid, 0)


async def test_a_script_runs_in_a_session_and_process_group_of_its_own(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    rule = script(tmp_path, f"cat /proc/$$/stat > {stat}\n")
    assert await ShellRunnerBackend().run(Job("j", 0), rule) == "exit status 0"
    pid, _, rest = stat.read_text().partition(" (")  # noqa: ASYNC240
    fields = rest.rsplit(")", 1)[1].split()  # fields[0] is field 3, state
    assert int(fields[2]) == int(fields[3]) == int(pid)  # process group, session: its own


async def test_a_script_gets_no_descriptor_the_server_inherited(tmp_path: Path) -> None:
    """Descriptors above 2 that the server got from whoever started it stay with it."""
    out = tmp_path / "out"
    fd = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(fd, True)  # as one inherited from a parent would be
    try:
        rule = script(
            tmp_path, f"[ -e /proc/$$/fd/{fd} ] && echo open > {out} || echo closed > {out}\n"
        )
        assert await ShellRunnerBackend().run(Job("j", 0), rule) == "exit status 0"
        assert content(out) == "closed"
    finally:
        os.close(fd)


async def test_a_script_gets_the_default_signal_dispositions(tmp_path: Path) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; scripts must not inherit that (Popen's
    restore_signals and Kairoi's Rust Command both reset them): `yes | head -1`
    ends because `yes` dies of SIGPIPE, not because it checks write errors."""
    out = tmp_path / "out"
    rule = script(tmp_path, f"grep SigIgn /proc/$$/status > {out}\n")
    assert await ShellRunnerBackend().run(Job("j", 0), rule) == "exit status 0"
    ignored = int(content(out).split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the script"


# -- runs without a task of their own: `start`, watched by `serve` (the pool's way)


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_a_watched_run_past_its_timeout_is_killed_with_its_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 60 &\necho $$ $! > {pids}\nwait\n")
    runner, ends = ShellRunnerBackend(), Ends()
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        await trio.sleep(0.05)  # the watcher is waiting, with no deadline, when the run comes
        with trio.fail_after(5):
            assert runner.start(Job("j", 0), rule, 0.3, ends.done_for("j"))
            shell_pid, child_pid = map(int, (await wait_for_file(pids)).split())
            await ends.wait_for(1)
        assert ends.by_job == {"j": [(False, "timed out after 0.3s")]}
        await poll(lambda: gone(shell_pid) and gone(child_pid))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_scripts_watched_together_each_end_once_with_their_own_status(
    tmp_path: Path,
) -> None:
    rule = script(tmp_path, 'echo "out $1"\nsleep 0.0$(( ${1#j} % 7 ))\nexit $(( ${1#j} % 4 ))\n')
    slow = script(tmp_path, "sleep 60\n", name="slow.sh")
    runner, ends = ShellRunnerBackend(), Ends()
    expected = {
        f"j{i}": [(True, "exit status 0") if i % 4 == 0 else (False, f"exit status {i % 4}")]
        for i in range(60)
    }
    expected["slow"] = [(False, "timed out after 0.5s")]
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.serve)
            assert runner.start(Job("slow", 0), slow, 0.5, ends.done_for("slow"))
            for i in range(60):
                job_id = f"j{i}"
                assert runner.start(Job(job_id, 0), rule, 30.0, ends.done_for(job_id))
            with trio.fail_after(10):
                await ends.wait_for(61)
            nursery.cancel_scope.cancel()
    assert ends.by_job == expected
    outputs = {e["job"]: e["output"] for e in logs if e["event"] == "shell output"}
    assert outputs == {f"j{i}": f"out j{i}" for i in range(60)}


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_aclose_kills_the_watched_scripts_and_ends_none_of_their_runs(
    tmp_path: Path,
) -> None:
    """Past the grace period the pool calls aclose: the scripts die, and their jobs stay
    triggered (no outcome), as a cancelled task's run."""
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"sleep 60 &\necho $$ $! > {pids}\nwait\n")
    runner, ends = ShellRunnerBackend(), Ends()
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        assert runner.start(Job("j", 0), rule, None, ends.done_for("j"))
        shell_pid, child_pid = map(int, (await wait_for_file(pids)).split())
        with trio.fail_after(5):
            await runner.aclose()
        assert reaped(shell_pid)  # killed and reaped by aclose itself
        await poll(lambda: gone(child_pid))
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert ends.by_job == {}


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_without_serve_or_with_a_payload_a_run_is_left_to_a_task(tmp_path: Path) -> None:
    rule = script(tmp_path, "exit 0\n")
    runner, ends = ShellRunnerBackend(), Ends()
    assert not runner.start(Job("j", 0), rule, None, ends.done_for("j"))  # no serve
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        assert not runner.start(Job("j", 0, payload=b"p"), rule, None, ends.done_for("j"))
        assert not runner.start(Job("h.nul\x00", 0), rule, None, ends.done_for("j"))
        nursery.cancel_scope.cancel()
    assert ends.by_job == {}


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_a_script_that_cannot_be_watched_is_killed_reaped_and_fails_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = tmp_path / "pids"
    rule = script(tmp_path, f"echo $$ > {pids}\nsleep 60\n")
    runner, ends = ShellRunnerBackend(), Ends()
    spawn = runner._spawn

    def spawn_then_wait_for_the_script(argv: list[str], env: dict[bytes, bytes]) -> tuple[int, int]:
        started = spawn(argv, env)
        for _ in range(500):  # so that the kill finds it running, not still starting
            if written(pids):
                break
            time.sleep(0.01)
        return started

    def out_of_descriptors(pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(runner, "_spawn", spawn_then_wait_for_the_script)
    monkeypatch.setattr(os, "pidfd_open", out_of_descriptors)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        assert runner.start(Job("j", 0), rule, None, ends.done_for("j"))
        assert ends.by_job == {"j": [(False, "cannot watch sh: Too many open files")]}
        pid = int(content(pids))
        await poll(lambda: reaped(pid))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_runs_that_end_long_before_their_timeout_do_not_pile_up(tmp_path: Path) -> None:
    """A rule with an hour's timeout and a run every few ms: what the watcher keeps of
    the ended runs (their timeouts) stays bounded, not an hour's worth of runs."""
    rule = script(tmp_path, "exit 0\n")
    runner, ends = ShellRunnerBackend(), Ends()
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        watcher = runner._watcher
        assert watcher is not None
        most = 0
        for i in range(400):
            assert runner.start(Job(f"j{i}", 0), rule, 3600.0, ends.done_for(f"j{i}"))
            if i % 8 == 7:
                await ends.wait_for(i + 1)
            most = max(most, len(watcher._deadlines))
        await ends.wait_for(400)
        nursery.cancel_scope.cancel()
    assert all(outcome == [(True, "exit status 0")] for outcome in ends.by_job.values())
    assert most <= 2 * 64 + 8


async def test_scripts_that_cannot_start_leave_nothing_in_the_guards_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guard: ProcessGuard
) -> None:
    """A rule whose every run fails to start (no `sh`) must not grow the table of
    scripts the guard keeps, one slot per failed run, for as long as the server runs."""
    rule = script(tmp_path, "exit 0\n")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    runner = ShellRunnerBackend(guard=guard)
    for _ in range(300):
        with pytest.raises(RunFailed, match="cannot start sh"):
            await runner.run(Job("j", 0), rule)
    assert guard._slot_of_mark == {}
    assert guard._table is not None and len(guard._table) == 256 * 16  # never grown


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """Every descriptor the (lowered) limit allows is taken, for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("way", ["task"], indirect=True)
async def test_out_of_descriptors_fails_the_run_with_a_reason_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    rule = script(tmp_path, "exit 0\n")
    runner = ShellRunnerBackend()
    assert await runner.run(Job("warm-up", 0), rule) == "exit status 0"  # the guard is up
    with out_of_descriptors(), pytest.raises(RunFailed) as failure:
        await runner.run(Job("j", 0), rule)
    assert failure.value.message == "cannot start sh: Too many open files"
    assert await runner.run(Job("j", 0), rule) == "exit status 0"


@pytest.mark.parametrize("way", ["watched"], indirect=True)
async def test_out_of_descriptors_fails_a_watched_run_with_a_reason_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    rule = script(tmp_path, "exit 0\n")
    runner, ends = ShellRunnerBackend(), Ends()
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        assert runner.start(Job("warm-up", 0), rule, None, ends.done_for("warm-up"))
        await ends.wait_for(1)
        with out_of_descriptors():
            assert runner.start(Job("j", 0), rule, None, ends.done_for("j"))
        assert ends.by_job["j"] == [(False, "cannot start sh: Too many open files")]
        assert runner.start(Job("k", 0), rule, None, ends.done_for("k"))
        with trio.fail_after(5):
            await ends.wait_for(3)
        nursery.cancel_scope.cancel()
    assert ends.by_job["k"] == [(True, "exit status 0")]


async def test_a_payload_that_cannot_be_written_fails_the_run_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a full disk: the write of the payload's file fails (here: the file size
    limit), the run fails with the reason, and no half-written file is left behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    rule = script(tmp_path, f"touch {tmp_path}/ran\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(RunFailed) as failure:
            await ShellRunnerBackend().run(Job("j", 0, payload=b"x" * 100_000), rule)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failure.value.message == "cannot write the payload's file: File too large"
    assert list(temp.iterdir()) == []  # noqa: ASYNC240
    assert not (tmp_path / "ran").exists()  # noqa: ASYNC240


@pytest.mark.parametrize("way", ["task"], indirect=True)
async def test_a_closed_guard_keeps_no_descriptor_and_a_new_one_works(tmp_path: Path) -> None:
    rule = script(tmp_path, "exit 0\n")

    def guard_tables() -> int:
        return sum(
            "kairoi-script-guard" in os.readlink(f"/proc/self/fd/{fd}")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        )

    before = guard_tables()
    guard = ProcessGuard()
    for _ in range(5):
        assert await ShellRunnerBackend(guard=guard).run(Job("j", 0), rule) == "exit status 0"
        guard.close()
    assert guard_tables() == before
