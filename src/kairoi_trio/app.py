"""serve(): the whole server in one nursery tree, started and stopped in order.

    core      the command actor (single writer of state and log), housekeeping
    work      runner pools, then the dispatcher that feeds them
    front     the protocol listeners (KCP, gRPC, HTTP)

Start-up goes core -> work -> front, so nothing accepts a request before the
log is replayed. Shutdown goes the other way: stop accepting, stop
triggering, give running jobs the grace period, and let the actor answer what
is still in flight before the log is closed.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from kairoi_trio import __version__
from kairoi_trio.commands import Command, ExpireFinished, JobsChanged, Request
from kairoi_trio.config import (
    AmqpRunnerConfig,
    Config,
    HttpRunnerConfig,
    ShellRunnerConfig,
    tls_context,
)
from kairoi_trio.core.actor import ActorClient, CommandActor, StorageUnavailable
from kairoi_trio.core.auth import TokenTable
from kairoi_trio.core.state import State
from kairoi_trio.core.validation import RuleValidator
from kairoi_trio.dispatch import Dispatcher, DueTimer
from kairoi_trio.model import (
    MAX_TIME_US,
    MICROS,
    MIN_TIME_US,
    Job,
    Rule,
    RunnerSpec,
    Status,
    now_us,
)
from kairoi_trio.observability.metrics import (
    MetricsObserver,
    Readiness,
    observe_run,
    register_state,
)
from kairoi_trio.protocols.grpc.server import serve_grpc
from kairoi_trio.protocols.http.api import Api
from kairoi_trio.protocols.http.app import HttpServer, build_app
from kairoi_trio.protocols.http.dashboard import Dashboard
from kairoi_trio.protocols.kcp.server import KcpServer
from kairoi_trio.protocols.limits import ConnectionLimits
from kairoi_trio.runners.base import Runner
from kairoi_trio.runners.pool import RunnerPool, RunnerPools
from kairoi_trio.runners.shell import ShellRunnerBackend
from kairoi_trio.storage import faults
from kairoi_trio.storage.info import describe_log
from kairoi_trio.storage.log import DurableLog, StorageError

log = structlog.get_logger(__name__)

GC_THRESHOLDS = (50_000, 20, 100)  # gc.set_threshold: young, middle, old generations
SWITCH_INTERVAL_S = 0.001  # sys.setswitchinterval (Python's default: 0.005)
REQUEST_QUEUE = 1024  # requests waiting for the actor (each may carry many commands)
HOUSEKEEPING_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Ports:
    kcp: int
    grpc: int | None
    http: int | None  # /metrics, /live, /ready and the JSON API

    @property
    def metrics(self) -> int | None:
        """The HTTP port's old name."""
        return self.http


def load_state(store: DurableLog) -> State:
    """Replay the log; jobs left `triggered` by the last run are planned again
    (at-least-once: their run may or may not have happened)."""
    started = time.monotonic()
    gc.disable()
    try:
        state = _load_state(store)
    finally:
        # The loaded jobs and their indexes live as long as the server and hold
        # no cycles: move them out of the collector's sight, or every full
        # collection would walk all of them (~0.3 s per million jobs).
        gc.freeze()
        gc.enable()
    log.info(
        "log replayed",
        jobs=len(state.jobs),
        rules=len(state.rules),
        seconds=round(time.monotonic() - started, 3),
    )
    return state


async def _load_unless_stopped(durable: DurableLog, stop: trio.Event) -> State | None:
    """load_state in a worker thread; None as soon as `stop` is set (or the task is
    cancelled: a second signal) before it is done.

    A stop during the replay, which takes tens of seconds for ten million jobs, does not
    wait for it: the thread is abandoned and ends with the process, as if the process had
    been killed there, which the log is built to survive (docs/reliability.md). Its lock
    on the directory goes with the process."""
    loaded: list[State] = []
    async with trio.open_nursery() as nursery:

        async def load() -> None:
            loaded.append(
                await trio.to_thread.run_sync(load_state, durable, abandon_on_cancel=True)
            )
            nursery.cancel_scope.cancel()

        nursery.start_soon(load)
        await stop.wait()
        nursery.cancel_scope.cancel()
    return loaded[0] if loaded else None


def _load_state(store: DurableLog) -> State:
    loaded = store.load()
    # The dict is adopted, not copied; recover_replayed runs inside, when needed.
    state = State(loaded.jobs, loaded.rules.values(), replayed=True)
    retriggered, out_of_range = state.recovered
    if retriggered or out_of_range or loaded.repaired_tail_bytes:
        log.warning(
            "recovered",
            retriggered=retriggered,
            failed_out_of_range=out_of_range,
            repaired_tail_bytes=loaded.repaired_tail_bytes,
        )
    return state


class HeapFreezer:
    """Keeps long-lived jobs out of the garbage collector's full collections.

    Jobs, records and index entries hold no reference cycles (they are freed by
    reference counting), yet every full collection walks all of them: ~300 ms per
    million jobs, a pause for every client. Each time the store has grown by
    `every` jobs, collect what is young (cheap: the rest is frozen) and freeze
    the survivors, as start-up does for the loaded state.
    """

    def __init__(self, jobs: int, every: int = 100_000) -> None:
        self._mark = jobs
        self._every = every

    def after_commit(self, state: State) -> None:
        jobs = len(state.jobs)
        if jobs - self._mark >= self._every:
            gc.collect()
            gc.freeze()
            self._mark = jobs
        elif jobs < self._mark:
            self._mark = jobs


class OnFirstUse(Runner):
    """A runner kind built when a rule or a run first needs it, not at every start.

    The AMQP and HTTP runners' modules (pamqp, h11, httpx's URL parser) cost ~60 ms
    of CPU to import and their clients' TLS contexts load the CA bundle: most
    servers never use one of them. Built at the first rule checked or the first run
    of the kind (a stored rule's), in the Trio thread; its `serve` starts then.
    """

    def __init__(self, kind: str, build: Callable[[], Runner]) -> None:
        self.kind = kind
        self._build = build
        self._runner: Runner | None = None
        self._needed = trio.Event()
        self._serving = trio.Event()

    def built(self) -> Runner:
        if self._runner is None:
            self._runner = self._build()
            self._needed.set()
        return self._runner

    def check_rule(self, spec: RunnerSpec) -> None:
        self.built().check_rule(spec)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self._needed.wait()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.built().serve)
            self._serving.set()

    async def run(self, job: Job, rule: Rule) -> str:
        runner = self.built()
        if not self._serving.is_set():  # (a set Event's wait() is still a checkpoint: per run)
            await self._serving.wait()
        return await runner.run(job, rule)

    def start(
        self, job: Job, rule: Rule, timeout_s: float | None, done: Callable[[bool, str], None]
    ) -> bool:
        runner = self._runner
        if runner is None or not self._serving.is_set():
            return False  # run() builds it and waits for its serve
        return runner.start(job, rule, timeout_s, done)

    async def aclose(self) -> None:
        if self._runner is not None and self._serving.is_set():
            await self._runner.aclose()


def _amqp_runner(amqp: AmqpRunnerConfig) -> Runner:
    from kairoi_trio.runners.amqp import AmqpRunnerBackend  # at first use (OnFirstUse)

    return AmqpRunnerBackend(
        max_connections=amqp.max_connections,
        heartbeat_s=amqp.heartbeat_s,
        connect_timeout_s=amqp.connect_timeout_s,
        confirm_timeout_s=amqp.confirm_timeout_s,
    )


def _http_runner(http: HttpRunnerConfig) -> Runner:
    from kairoi_trio.runners.http import HttpRunnerBackend  # at first use (OnFirstUse)

    return HttpRunnerBackend(timeout_s=http.timeout_s, max_connections=http.concurrency)


def build_pools(config: Config, actor: ActorClient) -> RunnerPools:
    runners = config.runners

    def pool(
        runner: Runner, sizes: ShellRunnerConfig | AmqpRunnerConfig | HttpRunnerConfig
    ) -> RunnerPool:
        return RunnerPool(
            runner,
            actor.clone(),
            concurrency=sizes.concurrency,
            queue_size=sizes.queue_size,
            observe_run=observe_run,
        )

    amqp = runners.amqp
    return RunnerPools(
        {
            "shell": pool(
                ShellRunnerBackend(
                    output_limit_bytes=runners.shell.output_limit_bytes,
                    # checked again at each run: rules stored before the list still are
                    allowed_commands=runners.shell.allowed_commands,
                ),
                runners.shell,
            ),
            "amqp": pool(OnFirstUse("amqp", partial(_amqp_runner, amqp)), amqp),
            "http": pool(OnFirstUse("http", partial(_http_runner, runners.http)), runners.http),
        }
    )


async def housekeeping(actor: ActorClient, retention_s: float) -> None:
    """Drop finished jobs past their retention, a bounded number per command."""
    # Any retention beyond the whole supported time range keeps everything; the
    # cap keeps the arithmetic finite (retention_s = 1e308 crashed the server).
    retention_us = int(min(retention_s, (MAX_TIME_US - MIN_TIME_US) / MICROS) * MICROS)
    while True:
        before = max(now_us() - retention_us, MIN_TIME_US)
        try:
            while await actor.call(ExpireFinished(before)):
                pass
        except StorageUnavailable as error:  # the actor logs and counts it: next round
            log.debug("retention pass not written", error=error.message)
        except Exception as error:  # try again next round
            log.warning("retention pass failed", error=str(error))
        await trio.sleep(min(HOUSEKEEPING_INTERVAL_S, max(retention_s / 10, 0.1)))


@dataclass
class Store:
    """The store `serve` runs on, as the actor and the rest of the server see it.

    log, state: the actor's Log and its State (for PostgreSQL, a view between
    batches); begin: the per-batch loader of a shared store (None for the
    embedded log); errors: what its failures raise; counts: jobs by status;
    run: its background work, if any, started with `nursery.start` before any
    front end (task_status once it is ready); compact_after_bytes: 0 never compacts;
    describe: what the dashboard shows of it (blocking; storage/info.py).
    """

    log: Any
    state: State
    begin: Callable[[Sequence[Command]], Awaitable[State]] | None
    errors: tuple[type[BaseException], ...]
    counts: Callable[[], dict[Status, int]]
    compact_after_bytes: int
    run: Callable[..., Awaitable[None]] | None = None
    describe: Callable[[], dict[str, object]] | None = None


async def serve(
    config: Config,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[Ports] = trio.TASK_STATUS_IGNORED,
) -> None:
    # The collector's default (a young collection every 700 allocations) walks the
    # objects of every job in flight again and again: amqp_bench's server CPU per job
    # is ~213-234 us with it, ~170-176 with these (docs/benchmarks.md). Young
    # collections then walk up to 50,000 objects (~1-3 ms), 70x less often.
    gc.set_threshold(*GC_THRESHOLDS)
    # Threads that run Python beside the event loop (the snapshot writer while the log
    # is compacted, the gRPC server's asyncio loop) hand the GIL over once the holder
    # has run this long. At Python's 5 ms, a request waited ~5 ms at each hand-over
    # while a snapshot was written; at 1 ms the writer's pace is the same, and a
    # WatchJobs snapshot of 1M jobs under other clients' load takes 23 s against 16
    # (docs/benchmarks.md, "A compaction of a million jobs").
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if config.storage.backend == "postgres":
        await _serve_postgres(config, stop, task_status)
        return
    if faults.ENABLED:
        log.warning("storage fault injection is on: for tests only", plan=faults.describe())
    durable = DurableLog(config.data_directory, fsync=config.database.fsync_on_persist)
    state = await _load_unless_stopped(durable, stop)
    if state is None:
        log.info("stopped during start-up", data_directory=str(config.data_directory))
        return
    store = Store(
        durable,
        state,
        None,
        (StorageError,),
        lambda: state.counts,
        config.storage.compact_after_bytes,
        describe=partial(describe_log, durable, lambda: state.checkpoint is not None),
    )
    try:
        await _serve_state(config, stop, store, task_status)
    finally:
        with trio.CancelScope(shield=True):
            await durable.aclose()
    log.info("stopped")


async def _serve_postgres(
    config: Config, stop: trio.Event, task_status: trio.TaskStatus[Ports]
) -> None:
    from kairoi_trio.storage.postgres.store import PostgresStore

    postgres = PostgresStore(config.storage.postgres)
    try:
        await trio.to_thread.run_sync(postgres.open)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(postgres.close)
        raise
    log.info(
        "joined the PostgreSQL store",
        instance=postgres.instance_id,
        schema=config.storage.postgres.schema,
    )

    async def run(
        client: ActorClient,
        actor: CommandActor,
        timer: DueTimer,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        postgres.has_watchers = lambda: actor.watching

        async def jobs_changed(ids: list[str]) -> None:
            await client.call_many([JobsChanged(ids)])

        async def probe() -> None:
            await client.call_many([])  # an empty batch: still one transaction

        await postgres.run(timer.update, jobs_changed, probe, task_status=task_status)

    store = Store(
        postgres,
        postgres.idle_view(),  # type: ignore[arg-type]
        postgres.begin,  # type: ignore[arg-type]
        postgres.errors,
        lambda: postgres.counts,
        0,
        run,
        postgres.describe,
    )
    try:
        await _serve_state(config, stop, store, task_status)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(postgres.close)
    log.info("stopped")


async def _serve_state(
    config: Config,
    stop: trio.Event,
    store: Store,
    task_status: trio.TaskStatus[Ports],
) -> None:
    state = store.state
    ahead_us = round(config.jobs.fire_ahead_s * MICROS)
    timer = DueTimer(ahead_us)
    freezer = HeapFreezer(len(state.jobs))

    def after_commit(state: State) -> None:
        timer.update(state.next_due())
        freezer.after_commit(state)

    send, receive = trio.open_memory_channel[Request](REQUEST_QUEUE)
    client = ActorClient(send)
    pools = build_pools(config, client)
    readiness = Readiness()  # "can accept writes": /ready and gRPC health
    observer = MetricsObserver(readiness)
    actor = CommandActor(
        state,
        store.log,
        receive,
        begin=store.begin,
        max_payload_bytes=config.jobs.max_payload_bytes,
        max_catchup_runs=config.jobs.max_catchup_runs,
        rule_validator=RuleValidator(
            config.runners.shell.allowed_commands,
            config.policy.to_policy(),
            # each runner refuses at input what it could never run (e.g. an AMQP DSN typo)
            runner_checks={kind: pool.runner.check_rule for kind, pool in pools.pools.items()},
        ),
        storage_errors=store.errors,
        on_commit=after_commit,
        compact_after_bytes=store.compact_after_bytes,
        compact_ratio=config.storage.compact_ratio,
        observer=observer,
    )
    timer.update(state.next_due())
    async with trio.open_nursery() as core:
        await core.start(actor.run)
        if store.run is not None:  # started before any front end: listening, for one
            await core.start(store.run, client.clone(), actor, timer)
        core.start_soon(housekeeping, client.clone(), config.storage.retention_s)
        async with trio.open_nursery() as work:
            for pool in pools.pools.values():
                await work.start(pool.run)
            dispatching = trio.CancelScope()
            dispatcher = Dispatcher(
                client.clone(), timer, pools, ahead_us=ahead_us, observer=observer
            )
            work.start_soon(_run_in_scope, dispatching, dispatcher.run)
            async with trio.open_nursery() as front:
                controller = config.controller
                kcp = KcpServer(
                    client.clone(),
                    controller,
                    auth=TokenTable.from_config(config.auth),
                    tls=(
                        tls_context(controller.tls_cert, controller.tls_key, "controller")
                        if controller.tls_cert
                        else None
                    ),
                )
                kcp_port = await front.start(kcp.serve)
                grpc_limits = ConnectionLimits(
                    config.grpc.max_connections, config.grpc.max_connections_per_address
                )
                grpc_port = await _start_grpc(front, config, client, readiness, grpc_limits)
                live = partial(_live_values, actor, store, pools, kcp, grpc_limits)
                register_state(live)
                http = _http_server(config, client, readiness, live, store.describe)
                http_port = await front.start(http.serve) if http is not None else None
                log.info(
                    "ready",
                    version=__version__,
                    kcp_port=kcp_port,
                    grpc_port=grpc_port,
                    http_port=http_port,
                    metrics_port=http_port,  # the HTTP port's old name, for scripts that read it
                )
                task_status.started(Ports(kcp_port, grpc_port, http_port))
                await stop.wait()
                log.info("stopping")
                readiness.stopping()
                if http is not None:  # event streams end with a last event, not a cut
                    await http.close()
                front.cancel_scope.cancel()
            dispatching.cancel()
            await pools.drain(config.shutdown.grace_period_s)
        core.cancel_scope.cancel()


def _live_values(
    actor: CommandActor,
    store: Store,
    pools: RunnerPools,
    kcp: KcpServer,
    grpc: ConnectionLimits,
) -> dict[str, object]:
    return {
        "jobs_by_status": {status.value: n for status, n in store.counts().items()},
        "rules": len(actor.state.rules),
        "commands": actor.commands,
        "batches": actor.batches,
        "pools": {kind: (p.queued, p.running) for kind, p in pools.pools.items()},
        "outcomes_unrecorded": {kind: p.unrecorded for kind, p in pools.pools.items()},
        "kcp_connections": kcp.connections,
        "grpc_connections": grpc.open,
    }


async def _run_in_scope(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()


def _http_server(
    config: Config,
    client: ActorClient,
    readiness: Readiness,
    live: Callable[[], dict[str, object]],
    storage: Callable[[], dict[str, object]] | None,
) -> HttpServer | None:
    """The HTTP server of [http] (None when disabled, or [metrics] enabled = false: the
    old name): probes, the API, and the dashboard at / (protocols/http/dashboard.py)."""
    if not config.http.enabled:
        return None
    api = Api(
        client.clone().channel,
        TokenTable.from_config(config.auth),
        max_body_bytes=config.http.max_body_bytes,
        watch_buffer_bytes=config.grpc.max_watch_buffer_bytes,
        max_payload_bytes=config.jobs.max_payload_bytes,
    )
    dashboard = Dashboard(api, TokenTable.from_config(config.auth), live=live, storage=storage)
    app = build_app(api, readiness, extra_routes=dashboard.routes())
    return HttpServer(app, api, config.http.listen, max_connections=config.http.max_connections)


async def _start_grpc(
    nursery: trio.Nursery,
    config: Config,
    client: ActorClient,
    readiness: Readiness,
    limits: ConnectionLimits,
) -> int | None:
    if not config.grpc.enabled:
        return None
    grpc = config.grpc
    port: int = await nursery.start(
        partial(
            serve_grpc,
            client.clone().channel,
            listen=grpc.listen,
            grace_s=config.shutdown.grace_period_s,
            auth=TokenTable.from_config(config.auth),
            max_message_bytes=grpc.max_message_bytes,
            max_watch_buffer_bytes=grpc.max_watch_buffer_bytes,
            limits=limits,
            idle_timeout_s=grpc.idle_timeout_s,
            keepalive_s=grpc.keepalive_s,
            tls_cert=Path(grpc.tls_cert) if grpc.tls_cert else None,
            tls_key=Path(grpc.tls_key) if grpc.tls_key else None,
            serving=readiness,
        )
    )
    return port
