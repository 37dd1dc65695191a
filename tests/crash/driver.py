"""The crash-point driver: write over KCP and gRPC, SIGKILL the server, restart
it on the same data directory, check, and go again.

Each cycle starts the server, starts the writers (writers.py), kills the
server at a moment chosen by the cycle's mode, restarts it and checks:

- every writer's keys (histories.check): nothing acknowledged lost, every
  value one that was sent, and the state of each writer explained by a prefix
  of what it sent;
- every run job whose SET was acknowledged (or that is present anyway) is
  still there; at the end, every one of them is `executed`, each run started
  only after a durable `triggered` (runs <= attempts), and the last run of
  each job ended while its server was alive, so a run cut off by a kill was
  always followed by another (at least once).

Kill modes, drawn per cycle from the seed:
- random: after a random delay;
- ack-burst: the moment a writer has received a whole burst of OKs, i.e.
  right after a group commit, while the next ones are in flight;
- compaction: the moment a snapshot is being written (a `*.snap.tmp` file is
  in the data directory; `[storage] compact_after_bytes` is tiny, so the server
  compacts all the time);
- runs: while a run script is running.
"""

from __future__ import annotations

import os
import random
import shlex
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from crash.history import History, HistoryError, check
from crash.writers import RUN_SCRIPT, GrpcWriter, KcpWriter, RunWriter, Writer, observe_key
from support.kcp_client import KcpClient
from support.server import ServerProcess

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc

MODES = ("random", "ack-burst", "compaction", "runs")
KCP_WRITERS = 3
GRPC_WRITERS = 2
KEYS_PER_WRITER = 40
RUN_SLEEP_S = 0.3
ORPHAN_GRACE_S = 2.0  # how long a script whose server died may live on (RUN_SCRIPT)

CONFIG = """
[storage]
compact_after_bytes = 4096
[runners.shell]
concurrency = 8
"""


@dataclass
class Figures:
    seed: int
    cycles: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    kills_during_snapshot: int = 0  # a snapshot .tmp was in the directory at the kill
    kills_with_runs_in_flight: int = 0
    runs_in_flight_at_kills: int = 0
    compactions: int = 0
    writes_sent: int = 0
    acked_writes_checked: int = 0  # each at the first restart after its OK
    rechecks: int = 0  # run jobs of earlier cycles read again after later restarts
    unacked_writes_found_applied: int = 0
    run_jobs: int = 0
    runs: int = 0
    runs_cut_by_a_kill: int = 0
    seconds: float = 0.0
    start_seconds: float = 0.0  # of which spent starting the server (imports, replay)

    def summary(self) -> str:
        modes = ", ".join(f"{mode} {self.kills[mode]}" for mode in MODES)
        return (
            f"seed {self.seed}: {self.cycles} SIGKILL cycles in {self.seconds:.0f} s "
            f"({self.start_seconds:.0f} s of them starting the server) "
            f"(kills: {modes}; {self.kills_during_snapshot} while a snapshot was being "
            f"written, {self.kills_with_runs_in_flight} with {self.runs_in_flight_at_kills} "
            f"runs in flight); {self.compactions} compactions; {self.writes_sent} writes sent, "
            f"{self.acked_writes_checked} acknowledged writes checked "
            f"(and {self.rechecks} older ones again), "
            f"{self.unacked_writes_found_applied} unacknowledged found applied; "
            f"{self.run_jobs} run jobs executed in {self.runs} runs, "
            f"{self.runs_cut_by_a_kill} runs cut by a kill and run again"
        )


def snapshot_being_written(data_dir: Path) -> bool:
    """A compaction is between its first step and its rename (docs/storage.md)."""
    return any(name.endswith(".snap.tmp") for name in os.listdir(data_dir))


class CrashDriver:
    def __init__(
        self,
        workdir: Path,
        seed: int,
        config: str = CONFIG,
        modes: tuple[str, ...] = MODES,
        after_kill: Callable[[ServerProcess], None] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.modes = modes
        self.after_kill = after_kill  # to damage the data directory on purpose
        self.server = ServerProcess(workdir / "server", config)
        self.runs_file = workdir / "runs.txt"
        self.script = workdir / "run.sh"
        self.script.write_text(
            RUN_SCRIPT.format(
                runs=shlex.quote(str(self.runs_file)), sleep=RUN_SLEEP_S, grace=ORPHAN_GRACE_S
            )
        )
        self.histories = [History(f"k{i}") for i in range(KCP_WRITERS)] + [
            History(f"g{i}") for i in range(GRPC_WRITERS)
        ]
        self.run_ids: list[str] = []  # run jobs that must end executed
        self.last_kill = time.monotonic()
        self.figures = Figures(seed)

    # -- the loop -------------------------------------------------------------------

    def run(self, cycles: int) -> Figures:
        started = time.monotonic()
        self.start_server()
        with KcpClient(self.server.kcp_port) as kcp:
            assert kcp.request("RULE", "SET", "run", "run.", "shell", str(self.script)) == ["OK"]
        for cycle in range(cycles):
            self.cycle(cycle)
            self.figures.cycles += 1
        self.final_check()
        self.figures.seconds = time.monotonic() - started
        return self.figures

    def cycle(self, cycle: int) -> None:
        rng = random.Random(f"{self.seed}-{cycle}")
        kcp_port, grpc_port = self.server.kcp_port, self.server.grpc_port
        assert grpc_port is not None
        writers: list[Writer] = []
        for history in self.histories:
            writer_rng = random.Random(f"{self.seed}-{cycle}-{history.name}")
            kind = KcpWriter if history.name.startswith("k") else GrpcWriter
            port = kcp_port if kind is KcpWriter else grpc_port
            writers.append(kind(history.name, writer_rng, history, port, KEYS_PER_WRITER))
        run_writer = RunWriter("run", random.Random(f"{self.seed}-{cycle}-run"), kcp_port, cycle)
        writers.append(run_writer)
        for writer in writers:
            writer.start()
        mode = rng.choice(self.modes)
        self.wait_for_the_moment(mode, rng, writers)
        pid = self.server.process.pid  # type: ignore[union-attr]
        self.server.kill()
        self.last_kill = time.monotonic()
        self.figures.kills[mode] += 1
        if snapshot_being_written(self.server.data_dir):
            self.figures.kills_during_snapshot += 1
        in_flight = len(self.runs_in_flight(pid))
        self.figures.kills_with_runs_in_flight += in_flight > 0
        self.figures.runs_in_flight_at_kills += in_flight
        self.figures.compactions += len(self.server.events("log compacted"))
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(30)
            assert not writer.is_alive(), f"writer {writer.name} did not stop"
        if self.after_kill is not None:  # every answer that reached a writer is counted now
            self.after_kill(self.server)
        errors = [error for writer in writers for error in writer.errors]
        assert not errors, f"cycle {cycle}: answers no healthy server gives: {errors[:5]}"
        self.figures.writes_sent += sum(writer.sent for writer in writers)

        self.start_server()
        self.verify(cycle, run_writer)

    def start_server(self) -> None:
        started = time.monotonic()
        self.server.start()
        self.figures.start_seconds += time.monotonic() - started

    def wait_for_the_moment(self, mode: str, rng: random.Random, writers: list[Writer]) -> None:
        if mode == "random":
            time.sleep(rng.uniform(0.05, 1.0))
            return
        time.sleep(rng.uniform(0.05, 0.4))  # let writes, runs and compactions get going
        deadline = time.monotonic() + 2.0
        if mode == "ack-burst":
            for writer in writers:
                writer.acked_burst.clear()
            while not any(writer.acked_burst.is_set() for writer in writers):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.0005)
        elif mode == "compaction":
            while not snapshot_being_written(self.server.data_dir):
                if time.monotonic() > deadline:
                    return
        elif mode == "runs":
            pid = self.server.process.pid  # type: ignore[union-attr]
            while not self.runs_in_flight(pid):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, RUN_SLEEP_S / 2))

    def runs_in_flight(self, pid: int) -> set[str]:
        started: set[str] = set()
        ended: set[str] = set()
        for run in self.read_runs():
            if run[2] == str(pid):
                (started if run[1] == "start" else ended).add(run[0])
        return started - ended

    def read_runs(self) -> list[list[str]]:
        if not self.runs_file.exists():
            return []
        lines = self.runs_file.read_text().splitlines()
        # A line being appended by a script right now may be cut short.
        return [line.split(" ") for line in lines if line.count(" ") in (2, 3)]

    # -- the checks after a restart -----------------------------------------------

    def verify(self, cycle: int, run_writer: RunWriter) -> None:
        requests: list[tuple[str, ...]] = []
        keys = []
        for history in self.histories:
            for key in sorted(history.keys()):
                keys.append(key)
                kind, id = key
                requests.append(("GET", id) if kind == "job" else ("RULE", "GET", id))
        requests += [("GET", job) for job in run_writer.sent_ids]
        requests += [("GET", job) for job in self.run_ids]  # earlier cycles' run jobs
        requests.append(("RULE", "GET", "run"))
        with KcpClient(self.server.kcp_port, timeout=30) as kcp:
            answers = kcp.pipeline(requests)
        observed = {
            key: observe_key(key, answer)
            for key, answer in zip(keys, answers[: len(keys)], strict=True)
        }
        for history in self.histories:
            try:
                verdict = check(history, observed)
            except HistoryError as error:
                raise AssertionError(f"after the kill of cycle {cycle}: {error}") from None
            self.figures.acked_writes_checked += history.acked_count
            self.figures.unacked_writes_found_applied += verdict.applied_unacked
            history.next_cycle(observed)
        acked = set(run_writer.acked_ids)
        new = len(run_writer.sent_ids)
        run_answers = answers[len(keys) : len(keys) + new]
        earlier = answers[len(keys) + new : -1]
        lost = [job for job, answer in zip(self.run_ids, earlier, strict=True) if answer[0] != "OK"]
        assert not lost, f"after the kill of cycle {cycle}: run jobs lost: {lost[:5]}"
        self.figures.rechecks += len(self.run_ids)
        for job, answer in zip(run_writer.sent_ids, run_answers, strict=True):
            if answer[0] == "OK":
                self.run_ids.append(job)
            elif job in acked:
                raise AssertionError(f"after the kill of cycle {cycle}: run job {job} lost")
            self.figures.acked_writes_checked += job in acked
        assert answers[-1] == ["OK", "run.", "shell", str(self.script)], answers[-1]

    def final_check(self) -> None:
        """Every run job ends executed, each run after a durable trigger, none cut off for good."""
        deadline = time.monotonic() + 90
        while True:
            jobs = self.list_run_jobs()
            pending = [job for job in self.run_ids if jobs[job].status != pb.JOB_STATUS_EXECUTED]
            if not pending:
                break
            assert time.monotonic() < deadline, (
                f"{len(pending)} run jobs not executed, e.g. {[(j, jobs[j]) for j in pending[:3]]}"
            )
            time.sleep(0.2)
        # Scripts die with their server (the shell runner's guard kills their process
        # groups), so a run cut by a kill has a start and no end; the live server's
        # runs all end (everything is executed by now).
        current = str(self.server.process.pid if self.server.process else "")
        # A script the last kill left running would say so ("orphan") this late.
        time.sleep(max(0.0, self.last_kill + RUN_SLEEP_S + ORPHAN_GRACE_S + 0.5 - time.monotonic()))
        deadline = time.monotonic() + 10
        while True:
            runs = self.read_runs()
            starts = Counter((run[0], run[2]) for run in runs if run[1] == "start")
            ends = Counter((run[0], run[2]) for run in runs if run[1] == "end")
            cut = starts - ends
            unfinished = Counter({key: n for key, n in cut.items() if key[1] == current})
            if not unfinished:
                break
            assert time.monotonic() < deadline, f"runs of the live server never ended: {unfinished}"
            time.sleep(0.1)
        last_run: dict[str, list[str]] = {}
        start_count: Counter[str] = Counter()
        ended: dict[tuple[str, str], str] = {}
        for run in runs:
            if run[1] == "start":
                last_run[run[0]] = run
                start_count[run[0]] += 1
            else:
                ended[(run[0], run[2])] = run[3]
        problems = []
        orphans = [key for key, how in ended.items() if how == "orphan"]
        if orphans:
            problems.append(
                f"{len(orphans)} scripts outlived their killed server, e.g. {orphans[:3]}: "
                "scripts must die with the server"
            )
        for job in self.run_ids:
            attempts = jobs[job].attempts
            if job not in last_run:
                problems.append(f"{job}: executed (attempts {attempts}) but never ran")
                continue
            if start_count[job] > attempts:
                problems.append(
                    f"{job}: {start_count[job]} runs but {attempts} attempts: a run started "
                    "before its `triggered` was durable"
                )
            how = ended.get((job, last_run[job][2]), "killed with its server")
            if how != "alive":
                problems.append(
                    f"{job}: executed, but its last run (server pid {last_run[job][2]}) "
                    f"ended {how}: the run cut off was not run again"
                )
        assert not problems, f"{len(problems)} run jobs wrong:\n  " + "\n  ".join(problems[:10])
        self.figures.run_jobs = len(self.run_ids)
        self.figures.runs = sum(start_count.values())
        self.figures.runs_cut_by_a_kill = sum((starts - ends).values())
        self.figures.compactions += len(self.server.events("log compacted"))
        assert self.server.stop() == 0, self.server.log_text()[-3000:]

    def list_run_jobs(self) -> dict[str, pb.Job]:
        jobs: dict[str, pb.Job] = {}
        with grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            token = ""
            while True:
                page = stub.ListJobs(
                    pb.ListJobsRequest(prefix="run.", page_size=1000, page_token=token), timeout=30
                )
                jobs.update((job.id, job) for job in page.jobs)
                token = page.next_page_token
                if not token:
                    return jobs
