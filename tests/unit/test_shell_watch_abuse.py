"""The shell runner's watched path (ShellRunnerBackend.start/serve/aclose, _Watcher),
abused with real `sh` processes: hundreds of scripts at once with every kind of end,
cancels and aclose at every stage, a real RunnerPool, injected system-call failures
and descriptor exhaustion.

What a user relies on: every started run's `done` is called exactly once with the
right outcome (none after aclose or the end of serve), the output logged is the
script's and bounded, and nothing is left behind: no process of a killed group, no
zombie, no descriptor, no entry in the process guard's table.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import select
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
from support.run_ends import Ends

from kairoi_trio.commands import Dispatch
from kairoi_trio.model import Job, Rule, RulePolicy, ShellRunner
from kairoi_trio.runners import shell
from kairoi_trio.runners.pool import RunnerPool
from kairoi_trio.runners.shell import ProcessGuard, ShellRunnerBackend

# -- helpers ---------------------------------------------------------------------------------


def script(tmp_path: Path, body: str, name: str, timeout_s: float | None = None) -> Rule:
    path = tmp_path / f"{name}.sh"
    path.write_text(body)
    return Rule("r", "", ShellRunner(str(path)), RulePolicy(timeout_s=timeout_s))


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def reaped(pid: int) -> bool:
    return _stat(pid) is None


def open_fds() -> set[str]:
    """This process's descriptors, with what each is (a pipe, a pidfd, a file). Not
    the guards' tables: a guard keeps its memfd until it is closed, and the tests'
    guards are closed at their end (test_shell_runner checks that close frees it)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            what = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own
            continue
        if not what.startswith("/memfd:kairoi-script-guard"):
            found.add(f"{name} {what}")
    return found


def our_zombies() -> list[int]:
    """Children of this process that exited and were not reaped."""
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(name)
            if fields is not None and fields[1] == me and fields[0] == "Z":
                found.append(int(name))
    return found


def scripts_alive(guard: ProcessGuard, groups: AbstractSet[int] | None = None) -> list[int]:
    """Live (not zombie) processes started by this guard's scripts (their environment
    carries its mark), optionally only those in the process groups `groups`."""
    mark = f"{ProcessGuard.ENV_NAME}={guard._token}.".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(name)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if groups is not None and int(fields[2]) not in groups:
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(mark) for item in environ.split(b"\0")):
            found.append(int(name))
    return found


def kill_scripts_left(guard: ProcessGuard) -> None:
    for pid in scripts_alive(guard):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def poll(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {predicate.__name__}")
        await trio.sleep(0.01)


@pytest.fixture
def guard() -> Iterator[ProcessGuard]:
    """A guard of the test's own: its mark finds the test's scripts in /proc, and its
    table must be empty once every run has ended."""
    guard = ProcessGuard()
    assert guard._running()  # its memfd and pipe are open before descriptors are counted
    yield guard
    kill_scripts_left(guard)
    guard.close()
    for pid in our_zombies():  # a failed test's: not the next test's failure
        os.waitpid(pid, 0)


def new_fds(before: set[str]) -> set[str]:
    """The descriptors open now that were not open `before`. Only these are a leak:
    what an earlier test in this worker left to the collector (a Trio run's epoll,
    eventfd and wakeup sockets) may be closed meanwhile, and once made a strict
    comparison fail in CI."""
    return open_fds() - before


def assert_nothing_left(guard: ProcessGuard, fds_before: set[str]) -> None:
    """No zombie, no descriptor beyond those open before, nothing in the guard."""
    assert our_zombies() == []
    assert new_fds(fds_before) == set()
    assert_guard_empty(guard)


def assert_guard_empty(guard: ProcessGuard) -> None:
    assert guard._slot_of_group == {}, "reaped scripts still listed in the guard"
    assert guard._slot_of_mark == {}, "marks of spawns that never happened kept"


def record_spawns(runner: ShellRunnerBackend, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """pid of each job's script, by job id (argv[3])."""
    pids: dict[str, int] = {}
    spawn = runner._spawn

    def spawn_and_note(argv: list[str], env: dict[bytes, bytes]) -> tuple[int, int]:
        pid, fd = spawn(argv, env)
        pids[argv[3]] = pid
        return pid, fd

    monkeypatch.setattr(runner, "_spawn", spawn_and_note)
    return pids


@asynccontextmanager
async def serving(runner: ShellRunnerBackend) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.serve)
        yield nursery
        nursery.cancel_scope.cancel()


def outputs(logs: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for entry in logs:
        if entry["event"] == "shell output":
            found.setdefault(entry["job"], []).append(entry["output"])
    return found


def heap_is_exact(watcher: shell._Watcher, runs: list[shell._WatchedRun]) -> None:
    """The watcher's bookkeeping of its heap matches the heap."""
    entries = Counter(id(entry[2]) for entry in watcher._deadlines)
    for run in runs:
        assert run.deadlines == entries[id(run)], (run.job.id, run.deadlines, entries[id(run)])
    stale = sum(1 for entry in watcher._deadlines if entry[2].ended)
    assert watcher._stale == stale, (watcher._stale, stale, len(watcher._deadlines))


def keep_runs(watcher: shell._Watcher, monkeypatch: pytest.MonkeyPatch) -> list[shell._WatchedRun]:
    runs: list[shell._WatchedRun] = []
    watch = watcher.watch

    def watch_and_keep(run: shell._WatchedRun) -> None:
        runs.append(run)
        watch(run)

    monkeypatch.setattr(watcher, "watch", watch_and_keep)
    return runs


# -- 1. a random mix of scripts at once -------------------------------------------------------


def random_script(rng: random.Random, job_id: str) -> tuple[str, float | None, tuple[bool, str]]:
    """(body, timeout, expected outcome)."""
    lines = []
    size = rng.choice([None, 0, 1, 100, 5000, 70000, 300000, 2 << 20])
    if size is not None:
        lines.append(f"printf '%s:' \"$1\"\nhead -c {size} /dev/zero | tr '\\0' x\n")
    child = rng.choice(["", "", "sleep 3 &\n", "sleep 3 >/dev/null 2>&1 &\n"])
    lines.append(child)
    end = rng.random()
    timeout: float | None = rng.choice([None, 30.0])
    if end < 0.15:
        timeout = rng.choice([0.05, 0.2, 0.4])
        lines.append("sleep 30 &\nsleep 30\n")
        expected = (False, f"timed out after {timeout}s")
    elif end < 0.25:
        lines.append("kill -9 $$\n")
        expected = (False, "killed by signal 9")
    elif end < 0.35:
        lines.append("kill -TERM $$\n")
        expected = (False, "killed by signal 15")
    else:
        status = rng.choice([0, 0, 0, 1, 2, 255])
        if rng.random() < 0.3:
            lines.append(f"sleep 0.{rng.randint(0, 3)}\n")
        lines.append(f"exit {status}\n")
        expected = (status == 0, f"exit status {status}")
    return "".join(lines), timeout, expected


def expected_output(job_id: str, body: str, limit: int) -> list[str]:
    if "printf" not in body:
        return []
    size = int(body.split("head -c ", 1)[1].split()[0])
    text = (f"{job_id}:" + "x" * size).encode()[:limit].decode().strip()
    return [text] if text else []


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_random_mix_of_scripts_each_end_once_with_their_outcome_and_output(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    limit = rng.choice([1000, 64 << 10])
    runner, ends = ShellRunnerBackend(guard=guard, output_limit_bytes=limit), Ends()
    pids = record_spawns(runner, monkeypatch)
    jobs = {}
    for i in range(150):
        job_id = f"j{i}"
        body, timeout, expected = random_script(rng, job_id)
        jobs[job_id] = (script(tmp_path, body, job_id, timeout), expected, body)
    before = open_fds()
    with structlog.testing.capture_logs() as logs, trio.fail_after(20):
        async with serving(runner):
            for job_id, (rule, _, _) in jobs.items():
                assert runner.start(
                    Job(job_id, 0), rule, rule.policy.timeout_s, ends.done_for(job_id)
                )
                if rng.random() < 0.2:
                    await trio.sleep(rng.choice([0, 0.001, 0.01]))
            await ends.wait_for(len(jobs))
            await trio.sleep(0.3)  # nothing ends twice meanwhile
    assert ends.twice() == {}
    assert {job: e[0] for job, e in ends.by_job.items()} == {
        job: expected for job, (_, expected, _) in jobs.items()
    }
    logged = outputs(logs)
    for job_id, (_, expected, body) in jobs.items():
        want = [] if expected[1].startswith("timed out") else expected_output(job_id, body, limit)
        assert logged.get(job_id, []) == want, job_id
    assert all(len(text.encode()) <= limit for texts in logged.values() for text in texts)
    timed_out = {pids[j] for j, (_, e, _) in jobs.items() if e[1].startswith("timed out")}
    await poll(lambda: not scripts_alive(guard, timed_out))  # the whole group is killed
    assert all(reaped(pid) for pid in pids.values())
    assert_nothing_left(guard, before)


# -- the heap of deadlines -------------------------------------------------------------------


async def test_the_heap_bookkeeping_stays_exact_when_lingering_runs_end_together(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs with a long timeout whose scripts leave a child holding the output end by
    their linger deadline, many in one `_expire`: when the heap is rebuilt without
    the ended runs' entries during that `_expire`, its counts must stay exact, or
    ended runs pile up in the heap again (what the rebuild is for)."""
    rule = script(tmp_path, "sleep 2 &\nexit 0\n", "linger", 3600.0)
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    with trio.fail_after(20):
        async with serving(runner):
            watcher = runner._watcher
            assert watcher is not None
            runs = keep_runs(watcher, monkeypatch)
            for wave in range(3):
                for i in range(150):
                    job_id = f"w{wave}.{i}"
                    assert runner.start(Job(job_id, 0), rule, 3600.0, ends.done_for(job_id))
                await ends.wait_for(150 * (wave + 1))
                heap_is_exact(watcher, runs)
            assert watcher._stale >= 0
            # what is left of 450 ended runs is not most of the heap
            assert len(watcher._deadlines) <= 2 * 64 + 8
    assert ends.twice() == {}
    assert all(e == [(True, "exit status 0")] for e in ends.by_job.values())


# -- 2. cancel and aclose at every stage -----------------------------------------------------


async def test_aclose_at_every_stage_kills_reaps_and_ends_nothing(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shell, "LINGER_S", 30.0)  # so that a lingering run stays lingering
    running = script(tmp_path, "sleep 60 &\nwait\n", "running")
    closed = script(tmp_path, "exec >/dev/null 2>&1\nsleep 60\n", "closed")
    lingering = script(tmp_path, "sleep 60 &\necho bye\nexit 0\n", "lingering")
    timing = script(tmp_path, "sleep 60\n", "timing")
    quick = script(tmp_path, "exit 0\n", "quick")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    before = open_fds()
    with trio.fail_after(10):
        async with serving(runner) as nursery:
            watcher = runner._watcher
            assert watcher is not None
            for name, rule, timeout in [
                ("running", running, None),
                ("closed", closed, 30.0),
                ("lingering", lingering, 30.0),
                ("timing", timing, 0.2),
            ]:
                assert runner.start(Job(name, 0), rule, timeout, ends.done_for(name))
            await trio.sleep(0.1)  # `lingering` has exited, its child holds the pipe
            assert reaped(pids["lingering"])
            assert runner.start(Job("starting", 0), running, None, ends.done_for("starting"))
            await runner.aclose()  # right after a start, with no checkpoint between
            assert all(reaped(pid) for pid in pids.values())  # by aclose itself
            assert watcher._runs == {}
            await runner.aclose()  # twice: nothing more
            await trio.sleep(0.4)  # past `timing`'s timeout: no done
            assert ends.calls == 0
            # a start after aclose (serve still running) is watched as usual
            assert runner.start(Job("after", 0), quick, None, ends.done_for("after"))
            await ends.wait_for(1)
            assert ends.by_job == {"after": [(True, "exit status 0")]}
            assert runner.start(Job("last", 0), running, 0.3, ends.done_for("last"))
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert reaped(pids["last"])
    await trio.sleep(0.4)
    assert ends.by_job == {"after": [(True, "exit status 0")]}
    killed = {pids[name] for name in ("running", "closed", "timing", "starting", "last")}
    await poll(lambda: not scripts_alive(guard, killed))
    assert_nothing_left(guard, before)


async def test_aclose_in_a_cancelled_scope_still_reaps_its_scripts_and_closes_their_fds(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool calls aclose at shutdown; if the pool's own task is cancelled by then
    (the server's nursery failed), aclose runs in a cancelled scope. The scripts it
    took out of the watcher must still be reaped and their descriptors closed: serve's
    own clean-up no longer sees them."""
    rule = script(tmp_path, "sleep 60 &\nwait\n", "running")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    before = open_fds()
    with trio.fail_after(10):
        async with serving(runner):
            for i in range(5):
                assert runner.start(Job(f"j{i}", 0), rule, None, ends.done_for(f"j{i}"))
            await trio.sleep(0.05)
            with trio.CancelScope() as scope:
                scope.cancel()
                await runner.aclose()
    await trio.sleep(0.1)
    assert ends.calls == 0
    assert [pid for pid in pids.values() if not reaped(pid)] == []
    assert_nothing_left(guard, before)


@pytest.mark.parametrize("seed", range(6))
async def test_serve_cancelled_at_a_random_moment_ends_each_run_at_most_once_and_leaves_nothing(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    rules = [
        script(tmp_path, "exit 0\n", "quick"),
        script(tmp_path, "sleep 0.0$((${#1} % 5))\nexit 1\n", "short"),
        script(tmp_path, "sleep 60 &\nexit 0\n", "lingering"),
        script(tmp_path, "sleep 60 &\nwait\n", "running"),
        script(tmp_path, "head -c 1000000 /dev/zero\nexit 0\n", "chatty"),
    ]
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    before = open_fds()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.serve)

            async def cancel_later() -> None:
                await trio.sleep(rng.choice([0, 0.001, 0.02, 0.05, 0.1, 0.2]))
                nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_later)
            for i in range(60):
                rule = rng.choice(rules)
                timeout = rng.choice([None, 0.01, 0.05, 0.1, 30.0])
                if not runner.start(Job(f"j{i}", 0), rule, timeout, ends.done_for(f"j{i}")):
                    break  # serve has ended
                if rng.random() < 0.3:
                    await trio.sleep(0.005)
    calls = ends.calls
    await trio.sleep(0.3)
    assert ends.calls == calls, "done after serve ended"
    assert ends.twice() == {}
    assert [pid for pid in pids.values() if not reaped(pid)] == []
    assert_nothing_left(guard, before)


# -- 3. through a real RunnerPool ------------------------------------------------------------


class Recorder:
    """The actor's client as the pool sees it: every outcome is written."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, bool, str]] = []

    async def call_many(self, commands: list[Any]) -> list[None]:
        await trio.lowlevel.checkpoint()
        self.recorded.extend((c.job_id, c.ok, c.message) for c in commands)
        return [None] * len(commands)


def max_overlap(lines: list[str]) -> int:
    now = most = 0
    for line in lines:
        now += 1 if line.startswith("+") else -1
        most = max(most, now)
    return most


async def test_a_pool_of_watched_scripts_keeps_its_concurrency_and_records_each_job_once(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "trace"
    body = (
        f'echo "+ $1" >> {trace}\n'
        "sleep 0.0$(( ${#1} * 7 % 10 ))\n"
        f'echo "- $1" >> {trace}\n'
        'case "$1" in *3) exit 3;; *7) kill -9 $$;; esac\n'
    )
    rule = script(tmp_path, body, "job", 30.0)
    slow = script(tmp_path, "sleep 60 &\nsleep 60\n", "slow", 0.2)
    runner = ShellRunnerBackend(guard=guard)
    recorder, concurrency = Recorder(), 6
    pool = RunnerPool(runner, recorder, concurrency=concurrency, queue_size=1000)  # type: ignore[arg-type]
    start = runner.start
    most = 0

    def start_and_count(job: Job, r: Rule, timeout: float | None, done: Any) -> bool:
        nonlocal most
        most = max(most, pool.running)
        assert pool.running <= concurrency
        return start(job, r, timeout, done)

    monkeypatch.setattr(runner, "start", start_and_count)
    expected = {}
    rng = random.Random(7)
    for i in range(100):
        job_id = "x" * rng.randint(1, 12) + str(i)
        if i % 10 == 5:
            expected[job_id] = (False, "timed out after 0.2s")
        elif job_id.endswith("3"):
            expected[job_id] = (False, "exit status 3")
        elif job_id.endswith("7"):
            expected[job_id] = (False, "killed by signal 9")
        else:
            expected[job_id] = (True, "exit status 0")
    before = open_fds()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            for i, job_id in enumerate(expected):
                dispatch = Dispatch(Job(job_id, 0, attempts=1), slow if i % 10 == 5 else rule)
                if i % 2:
                    pool.submit_nowait(dispatch)
                else:
                    pool.start_nowait(dispatch)
                if i % 7 == 0:
                    await trio.sleep(0.01)
            await poll(lambda: len(recorder.recorded) == len(expected), 25)
            assert pool.running == 0
            await pool.drain(1.0)
    assert 0 < most <= concurrency
    assert sorted(j for j, _, _ in recorder.recorded) == sorted(expected)
    assert {j: (ok, m) for j, ok, m in recorder.recorded} == expected
    assert max_overlap(trace.read_text().splitlines()) <= concurrency  # noqa: ASYNC240
    assert_nothing_left(guard, before)


async def test_drain_records_the_runs_that_end_in_the_grace_period_and_not_those_killed(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = script(tmp_path, "sleep 0.3\nexit 0\n", "short")
    long = script(tmp_path, "sleep 60 &\nwait\n", "long")
    runner = ShellRunnerBackend(guard=guard)
    pids = record_spawns(runner, monkeypatch)
    recorder = Recorder()
    pool = RunnerPool(runner, recorder, concurrency=8, queue_size=100)  # type: ignore[arg-type]
    before = open_fds()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            for i in range(4):
                pool.start_nowait(Dispatch(Job(f"short{i}", 0, attempts=1), short))
                pool.start_nowait(Dispatch(Job(f"long{i}", 0, attempts=1), long))
            for i in range(5):  # queued behind the 8 running: never start
                pool.submit_nowait(Dispatch(Job(f"queued{i}", 0, attempts=1), short))
            await trio.sleep(0.05)
            started = time.monotonic()
            await pool.drain(1.0)
            assert 0.9 < time.monotonic() - started < 2
        # pool.run has returned: aclose has killed and reaped the long ones
    assert sorted(recorder.recorded) == [(f"short{i}", True, "exit status 0") for i in range(4)]
    assert not any(job.startswith("queued") for job in pids)
    assert all(reaped(pid) for pid in pids.values())
    longs = {pids[f"long{i}"] for i in range(4)}
    await poll(lambda: not scripts_alive(guard, longs))
    assert_nothing_left(guard, before)


# -- 4. descriptors and timing edges ---------------------------------------------------------


async def test_closed_output_children_holding_it_and_timeouts_shorter_than_the_linger(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = {
        # closes its output at once, then runs past its timeout
        "closed_then_long": ("exec >&- 2>&-\nsleep 60\n", 0.3, (False, "timed out after 0.3s")),
        # closes its output, then ends by itself: no linger, its status
        "closed_then_ends": ("exec >&- 2>&-\nsleep 0.2\nexit 4\n", None, (False, "exit status 4")),
        # a child holds the output for 2 s: the run ends after the linger, not the child
        "child_holds": ("sleep 2 &\necho out\nexit 0\n", None, (True, "exit status 0")),
        # timeouts shorter than the linger
        "short_timeout": ("sleep 60\n", 0.03, (False, "timed out after 0.03s")),
        "short_timeout_child": ("sleep 60 &\nsleep 60\n", 0.02, (False, "timed out after 0.02s")),
        # exits at once, a child holds the output, and the timeout comes mid-linger
        "timeout_mid_linger": ("sleep 2 &\nexit 0\n", 0.05, (True, "exit status 0")),
    }
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    before = open_fds()
    times: dict[str, float] = {}
    with trio.fail_after(10):
        async with serving(runner):
            t0 = trio.current_time()
            for name, (body, timeout, _) in cases.items():
                rule = script(tmp_path, body, name)
                done = ends.done_for(name)

                def timed(ok: bool, message: str, name: str = name, done: Any = done) -> None:
                    times[name] = trio.current_time() - t0
                    done(ok, message)

                assert runner.start(Job(name, 0), rule, timeout, timed)
            await ends.wait_for(len(cases))
            await trio.sleep(0.2)
    assert {name: ends.by_job[name] for name in cases} == {
        name: [expected] for name, (_, _, expected) in cases.items()
    }
    assert times["child_holds"] < 1.0 and times["timeout_mid_linger"] < 1.0
    assert times["closed_then_long"] < 1.5
    killed = {pids[n] for n in ("closed_then_long", "short_timeout", "short_timeout_child")}
    await poll(lambda: not scripts_alive(guard, killed))
    assert_nothing_left(guard, before)


async def test_runs_ending_and_starting_while_others_end_keep_their_own_descriptors(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waves of runs that end in the same batch of events, each replaced at once by a
    new one (the numbers of the descriptors just closed are reused), mixed with
    timeouts that kill groups whose child still holds the pipe: every run ends once
    with its own outcome, and the watcher never blocks (a stale event applied to a
    reused descriptor would reap a running script: waitpid blocks the event loop)."""
    fast = script(tmp_path, "echo $1\nexit $(( ${#1} % 3 ))\n", "fast")
    killed = script(tmp_path, "sleep 5 &\nsleep 5\n", "killed")  # a blocked loop: 5 s
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    expected: dict[str, tuple[bool, str]] = {}
    gap = 0.0
    before = open_fds()

    async def heartbeat() -> None:
        nonlocal gap
        last = time.monotonic()
        while True:
            await trio.sleep(0.005)
            now = time.monotonic()
            gap, last = max(gap, now - last), now

    with trio.fail_after(20):
        async with serving(runner) as nursery:
            nursery.start_soon(heartbeat)
            counter = 0

            def launch(rule: Rule, timeout: float | None) -> None:
                nonlocal counter
                counter += 1
                job_id = "j" + "x" * (counter % 5) + str(counter)
                if rule is killed:
                    expected[job_id] = (False, f"timed out after {timeout}s")
                    timeout = 0.05
                else:
                    status = len(job_id) % 3
                    expected[job_id] = (status == 0, f"exit status {status}")
                    timeout = 30.0
                outer = ends.done_for(job_id)

                def done(ok: bool, message: str) -> None:
                    outer(ok, message)
                    if counter < 400:  # replaced at once, as a done that starts a retry
                        launch(killed if counter % 4 == 0 else fast, 0.05)

                assert runner.start(Job(job_id, 0), rule, timeout, done)

            for i in range(40):
                launch(killed if i % 3 == 0 else fast, 0.05)
            await poll(lambda: len(ends.by_job) == len(expected) and counter >= 400, 15)
            await trio.sleep(0.2)
    assert ends.twice() == {}
    assert {job: e[0] for job, e in ends.by_job.items()} == expected
    assert gap < 0.5, f"the event loop was blocked for {gap:.2f}s"
    await poll(lambda: not scripts_alive(guard))
    assert_nothing_left(guard, before)


# -- 5. injected failures --------------------------------------------------------------------


class FlakyEpoll:
    """select.epoll whose register fails with ENOMEM on every k-th call."""

    real = select.epoll
    every = 5
    calls = 0
    failed = 0

    def __init__(self, *args: Any) -> None:
        self._epoll = self.real(*args)

    def register(self, fd: int, mask: int = select.EPOLLIN) -> None:
        FlakyEpoll.calls += 1
        if FlakyEpoll.calls % FlakyEpoll.every == 0:
            FlakyEpoll.failed += 1
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        self._epoll.register(fd, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._epoll, name)


async def test_watch_failures_in_a_mix_fail_only_those_runs_and_leak_nothing(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    FlakyEpoll.calls = FlakyEpoll.failed = 0
    monkeypatch.setattr(select, "epoll", FlakyEpoll)
    real_pidfd_open = os.pidfd_open
    failed_pids: list[int] = []
    calls = 0

    def flaky_pidfd_open(pid: int, flags: int = 0) -> int:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            failed_pids.append(pid)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_pidfd_open(pid, flags)

    monkeypatch.setattr(shell.os, "pidfd_open", flaky_pidfd_open)
    rules = {
        "ok": (script(tmp_path, "echo hi\nexit 0\n", "ok"), None, (True, "exit status 0")),
        "fail": (script(tmp_path, "exit 2\n", "fail"), None, (False, "exit status 2")),
        "slow": (
            script(tmp_path, "sleep 60 &\nsleep 60\n", "slow"),
            0.2,
            (False, "timed out after 0.2s"),
        ),
        "linger": (
            script(tmp_path, "sleep 2 &\nexit 0\n", "linger"),
            30.0,
            (True, "exit status 0"),
        ),
    }
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    kinds = {}
    before = open_fds()
    with trio.fail_after(10):
        async with serving(runner):
            for i in range(60):
                kind = list(rules)[i % 4]
                kinds[f"j{i}"] = kind
                rule, timeout, _ = rules[kind]
                assert runner.start(Job(f"j{i}", 0), rule, timeout, ends.done_for(f"j{i}"))
            await ends.wait_for(60)
            await trio.sleep(0.3)
    assert ends.twice() == {}
    cannot = {j for j, e in ends.by_job.items() if e[0][1].startswith("cannot watch sh")}
    assert len(cannot) == len(failed_pids) + FlakyEpoll.failed > 0
    assert {ends.by_job[j][0][1] for j in cannot} <= {
        "cannot watch sh: Too many open files",
        "cannot watch sh: Cannot allocate memory",
    }
    for job, kind in kinds.items():
        if job not in cannot:
            assert ends.by_job[job] == [rules[kind][2]], job
    await poll(lambda: all(reaped(pid) for pid in pids.values()))
    slow_groups = {pids[j] for j, k in kinds.items() if k == "slow"}
    await poll(lambda: not scripts_alive(guard, slow_groups))
    assert_nothing_left(guard, before)


async def test_a_run_that_cannot_be_watched_is_reaped_even_when_serve_ends_at_once(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`watch` kills such a script and reaps it in a task of serve's nursery: serve
    cancelled right after (a shutdown) must not leave it a zombie, nor in the guard."""

    def out_of_descriptors(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    rule = script(tmp_path, "sleep 60\n", "job")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    with trio.fail_after(10):
        async with serving(runner) as nursery:
            monkeypatch.setattr(shell.os, "pidfd_open", out_of_descriptors)
            assert runner.start(Job("j", 0), rule, None, ends.done_for("j"))
            nursery.cancel_scope.cancel()
        monkeypatch.undo()
    assert ends.by_job == {"j": [(False, "cannot watch sh: Too many open files")]}
    await poll(lambda: reaped(pids["j"]), 2)
    assert_guard_empty(guard)


@pytest.fixture
def restore_nofile() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


async def test_out_of_descriptors_runs_fail_with_a_reason_and_the_others_go_on(
    tmp_path: Path, guard: ProcessGuard, restore_nofile: tuple[int, int]
) -> None:
    rule = script(tmp_path, "sleep 0.3\nexit 0\n", "job")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    before = open_fds()
    raised: list[str] = []
    with trio.fail_after(10):
        async with serving(runner):
            fds = {
                int(fd)
                for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")  # noqa: ASYNC240
            }
            # room for 3 runs (a pipe's 2 descriptors, then the read end and a pidfd):
            # the holes below the highest descriptor filled, 7 numbers free above it
            fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(max(fds) + 1 - len(fds))]
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(fds) + 1 + 7, restore_nofile[1]))
            try:
                for i in range(10):
                    try:
                        assert runner.start(Job(f"j{i}", 0), rule, 5.0, ends.done_for(f"j{i}"))
                    except OSError as error:
                        raised.append(f"j{i}: {error!r}")
                await trio.sleep(0.5)  # the first three end: their descriptors are free again
                for i in range(10, 13):
                    assert runner.start(Job(f"j{i}", 0), rule, 5.0, ends.done_for(f"j{i}"))
                await ends.wait_for(13 - len(raised))
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, restore_nofile)
    assert raised == [], "start() raised instead of failing the run"
    oks = [j for j, e in ends.by_job.items() if e == [(True, "exit status 0")]]
    failed = {j: e for j, e in ends.by_job.items() if j not in oks}
    assert sorted(oks) == ["j0", "j1", "j10", "j11", "j12", "j2"], ends.by_job
    assert set(failed) == {f"j{i}" for i in range(3, 10)}
    assert all(
        e[0][1] in ("cannot start sh: Too many open files", "cannot watch sh: Too many open files")
        for e in failed.values()
    ), failed
    assert_nothing_left(guard, before)


async def test_spawns_that_fail_leave_nothing_in_the_guard(
    tmp_path: Path, guard: ProcessGuard
) -> None:
    """`sh` cannot be started (ENOENT here; EAGAIN or ENOMEM under load): each such run
    fails with a reason, and the guard's table does not keep a slot for each."""
    rule = script(tmp_path, "exit 0\n", "job")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    runner._sh = str(tmp_path / "no-such-sh")
    before = open_fds()
    with trio.fail_after(5):
        async with serving(runner):
            for i in range(300):
                assert runner.start(Job(f"j{i}", 0), rule, None, ends.done_for(f"j{i}"))
    assert all(
        e == [(False, "cannot start sh: No such file or directory")] for e in ends.by_job.values()
    )
    assert len(ends.by_job) == 300
    assert new_fds(before) == set()
    assert_guard_empty(guard)


async def test_a_command_that_cannot_be_encoded_fails_the_run_and_leaks_nothing(
    tmp_path: Path, guard: ProcessGuard
) -> None:
    """A lone surrogate (what a decoder leaves of bytes that were not UTF-8) in a
    command passes check_shell_command; argv cannot carry it."""
    rule = Rule("r", "", ShellRunner(str(tmp_path / "bad\ud800.sh")))
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    before = open_fds()
    raised: list[BaseException] = []
    with trio.fail_after(5):
        async with serving(runner):
            try:
                started = runner.start(Job("j", 0), rule, None, ends.done_for("j"))
            except Exception as error:
                raised.append(error)
                started = True
    assert raised == [], "start() raised instead of failing the run"
    assert not started or (ends.by_job["j"][0][0] is False and len(ends.by_job["j"]) == 1)
    assert new_fds(before) == set()
    assert_guard_empty(guard)


# -- 6. what a production server meets --------------------------------------------------------


async def test_a_script_with_50_children_holding_the_output_is_killed_whole_at_its_timeout(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = script(tmp_path, "for i in $(seq 50); do sleep 60 & done\necho forked\nwait\n", "fork")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    pids = record_spawns(runner, monkeypatch)
    with trio.fail_after(10):
        async with serving(runner):
            assert runner.start(Job("j", 0), rule, 0.5, ends.done_for("j"))
            await poll(lambda: len(scripts_alive(guard, {pids["j"]})) >= 51)
            await ends.wait_for(1)
    assert ends.by_job == {"j": [(False, "timed out after 0.5s")]}
    await poll(lambda: not scripts_alive(guard))
    assert our_zombies() == []
    assert_guard_empty(guard)


async def test_huge_stderr_is_bounded_and_does_not_hold_the_run(
    tmp_path: Path, guard: ProcessGuard
) -> None:
    rule = script(tmp_path, "head -c 20000000 /dev/zero | tr '\\0' e >&2\nexit 3\n", "loud")
    runner, ends = ShellRunnerBackend(guard=guard, output_limit_bytes=1000), Ends()
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        async with serving(runner):
            assert runner.start(Job("j", 0), rule, 30.0, ends.done_for("j"))
            await ends.wait_for(1)
    assert ends.by_job == {"j": [(False, "exit status 3")]}
    assert outputs(logs) == {"j": ["e" * 1000]}


async def test_a_tight_loop_of_2000_short_scripts(
    tmp_path: Path, guard: ProcessGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = script(tmp_path, "exit $(( ${#1} % 2 ))\n", "tiny")
    runner, ends = ShellRunnerBackend(guard=guard), Ends()
    before = open_fds()
    with trio.fail_after(40):
        async with serving(runner):
            watcher = runner._watcher
            assert watcher is not None
            runs = keep_runs(watcher, monkeypatch)
            most = 0
            for i in range(2000):
                while i - len(ends.by_job) >= 64:
                    await ends.changed.wait()
                job_id = f"j{i}"
                assert runner.start(Job(job_id, 0), rule, 3600.0, ends.done_for(job_id))
                most = max(most, len(watcher._deadlines))
            await ends.wait_for(2000)
            heap_is_exact(watcher, runs)
    assert ends.twice() == {}
    assert all(
        e == [(len(j) % 2 == 0, f"exit status {len(j) % 2}")] for j, e in ends.by_job.items()
    )
    assert most <= 2 * 64 + 64
    assert_nothing_left(guard, before)
