"""TOML configuration -> frozen dataclasses, with every option defaulted.

Kairoi's keys keep their meaning (`[log] level`, `[controller] listen`,
`[database] fsync_on_persist`, `[database] framerate`); new options live in
their own tables. Unknown tables or keys and values of the wrong type are
rejected with a one-line reason (ConfigError), because a typo in a scheduler's
config silently ignored is a job that silently never runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import ssl
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kairoi_trio.commands import CommandError
from kairoi_trio.core.auth import check_tokens
from kairoi_trio.core.validation import MAX_POLICY_SECONDS, check_policy
from kairoi_trio.model import RulePolicy

# Longer would keep a job `triggered` (refusing SET and UNSET) for long before its time.
MAX_FIRE_AHEAD_S = 1.0


class ConfigError(Exception):
    """A configuration problem, with a message fit for one line on stderr."""


# Kairoi's levels (its `LogLevel`, lowercase), plus the names Python users write.
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical", "off")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"  # one of LOG_LEVELS, as Kairoi: trace, debug, info, warn, error, off
    format: str = "console"  # console or json


@dataclass(frozen=True)
class ControllerConfig:
    """The KCP (Kairoi text protocol) listener."""

    listen: str = "127.0.0.1:5678"
    max_message_bytes: int = 1 << 20
    max_connections: int = 1024
    # Connections from one client address (IP); 0: no limit. Beyond it a
    # connection is refused, so one host cannot take every connection.
    max_connections_per_address: int = 64
    # Requests a connection may have in flight, and bytes of requests and answers
    # not yet written, before the server stops reading from it: bounds memory for
    # a client that sends and never reads. An answer larger than the byte bound
    # is still written, alone.
    max_pipelined: int = 4096
    max_pending_bytes: int = 4 << 20
    # Close a connection that exchanged no message for this long (0: never); also
    # one whose answers wait this long for the client to read them.
    idle_timeout_s: float = 300.0
    # A message begun must end (its LF) within this (0: no limit): a client that
    # trickles bytes cannot hold a connection for ever.
    message_timeout_s: float = 30.0
    # With [auth] tokens, a connection must AUTH within this (0: no limit).
    auth_timeout_s: float = 10.0

    # TLS for KCP: PEM files, both or neither. Clients then speak KCP inside TLS
    # (e.g. `openssl s_client`, Python's ssl), so tokens do not cross a network in clear.
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class DatabaseConfig:
    fsync_on_persist: bool = True
    # Kairoi's database cycles per second (1-65535). Validated as Kairoi does so that
    # a file Kairoi refuses is refused here too; timing does not depend on it.
    framerate: int = 512


@dataclass(frozen=True)
class PostgresConfig:
    """[storage.postgres]: the shared store of several instances (docs/postgres.md)."""

    # libpq connection string or URI: "postgresql://user:password@host:5432/dbname"
    dsn: str = ""
    # Pooled connections per instance (at least 3): the actor's writer, the lease
    # keeper and the poll. The notification listener holds one more of its own.
    pool_size: int = 4
    schema: str = "kairoi"  # every table lives in this schema, created if missing
    # An instance that has not renewed its lease for lease_s is taken for dead: any
    # live instance plans its triggered jobs again. It renews every heartbeat_s.
    lease_s: float = 15.0
    heartbeat_s: float = 3.0
    # The safety net under LISTEN/NOTIFY: look for due jobs at least this often.
    poll_interval_s: float = 1.0
    # At start-up, wait this long for the database before giving up.
    connect_timeout_s: float = 30.0


@dataclass(frozen=True)
class StorageConfig:
    # "log": the embedded log in `directory` (one instance); "postgres": a shared
    # PostgreSQL database ([storage.postgres]; several instances).
    backend: str = "log"
    directory: str = "kairoi-data"
    # Compact when the log since the last snapshot is larger than this, and than
    # compact_ratio times the snapshot: the ratio bounds the replay at a restart (at
    # ten million jobs, 0.25 makes it ~1.6x the snapshot's load, 1.0 ~3x: docs/storage.md,
    # "When the log is compacted").
    compact_after_bytes: int = 64 << 20
    compact_ratio: float = 0.25
    retention_s: float = 7 * 24 * 3600.0  # how long executed/failed jobs are kept
    postgres: PostgresConfig = field(default_factory=PostgresConfig)


@dataclass(frozen=True)
class JobsConfig:
    max_payload_bytes: int = 1 << 20
    # misfire=all: a recurring job catches up at most this many missed occurrences
    # (the latest ones); docs/recurring-jobs.md.
    max_catchup_runs: int = 100
    # Trigger a job (its `triggered` mark written and synced) up to this long before
    # it is due, and hand it to its runner at its due time: the mark's fsync is then
    # off the job's path. 0: trigger at the due time. docs/runners.md, "Fire-ahead".
    fire_ahead_s: float = 0.02


@dataclass(frozen=True)
class GrpcConfig:
    enabled: bool = True
    listen: str = "127.0.0.1:5679"
    max_message_bytes: int = 4 << 20
    # Connections at once, and from one client address (IP; 0: no limit), as
    # [controller] has them; further ones are refused with a GOAWAY.
    max_connections: int = 1024
    max_connections_per_address: int = 64
    # A connection without a call for this long gets a GOAWAY and is closed (a
    # client opens a new one at its next call); 0: never.
    idle_timeout_s: float = 300.0
    # A connection nothing came from for this long gets a PING, and is closed when
    # nothing answers within 20 s (its client vanished without closing it); 0: never.
    keepalive_s: float = 120.0
    # Changes a WatchJobs stream may have waiting for its client, in bytes;
    # beyond it the stream ends with RESOURCE_EXHAUSTED "watch fell behind".
    max_watch_buffer_bytes: int = 16 << 20
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class HttpConfig:
    """The one HTTP server: /metrics, /live, /ready, the JSON API under /api/v1
    (docs/http-api.md). `[metrics]` is its old name (enabled, listen)."""

    enabled: bool = True
    listen: str = "127.0.0.1:9678"
    # Connections at once; more get 503 "too many connections" (a flood of idle
    # clients cannot take every descriptor). A watch (/api/v1/events) holds one.
    max_connections: int = 64
    # A request body beyond this is refused with 413 (a job's payload travels in
    # base64: 4/3 of its size, so keep it above 4/3 of jobs.max_payload_bytes).
    max_body_bytes: int = 2 << 20


@dataclass(frozen=True)
class MetricsConfig:
    """The old name of [http]: its `enabled` and `listen` (not both tables' keys)."""

    enabled: bool = True
    listen: str = "127.0.0.1:9678"


@dataclass(frozen=True)
class AuthConfig:
    """Tokens by role (core/auth.py); no token at all: no authentication, all admin."""

    tokens: list[str] = field(default_factory=list)  # admin: everything, rules included
    client_tokens: list[str] = field(default_factory=list)  # jobs; read rules; watch
    read_tokens: list[str] = field(default_factory=list)  # read and watch only


@dataclass(frozen=True)
class ShellRunnerConfig:
    concurrency: int = 32
    queue_size: int = 1024
    output_limit_bytes: int = 64 << 10
    # If not empty, a shell rule's command must be one of these (exact match).
    allowed_commands: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AmqpRunnerConfig:
    # Publishes in flight. A persistent message is confirmed only once the broker
    # has synced it (~100 ms here), so throughput is about concurrency / latency.
    concurrency: int = 2048
    queue_size: int = 10_000
    max_connections: int = 16
    heartbeat_s: int = 30
    connect_timeout_s: float = 10.0
    confirm_timeout_s: float = 30.0


@dataclass(frozen=True)
class HttpRunnerConfig:
    concurrency: int = 64
    queue_size: int = 10_000
    timeout_s: float = 30.0


@dataclass(frozen=True)
class RunnersConfig:
    shell: ShellRunnerConfig = field(default_factory=ShellRunnerConfig)
    amqp: AmqpRunnerConfig = field(default_factory=AmqpRunnerConfig)
    http: HttpRunnerConfig = field(default_factory=HttpRunnerConfig)


@dataclass(frozen=True)
class PolicyConfig:
    """The policy of rules that do not bring their own (every KCP rule, and gRPC
    rules without a policy). 0 means "none" for the timeout and staleness."""

    timeout_s: float = 0.0
    max_attempts: int = 1
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    stale_after_s: float = 0.0

    def to_policy(self) -> RulePolicy:
        return RulePolicy(
            timeout_s=self.timeout_s or None,
            max_attempts=self.max_attempts,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            stale_after_s=self.stale_after_s or None,
        )


@dataclass(frozen=True)
class ShutdownConfig:
    # How long running jobs get to finish on SIGTERM before they are killed
    # (a killed run stays `triggered` and runs again at the next start).
    grace_period_s: float = 10.0


@dataclass(frozen=True)
class Config:
    log: LogConfig = field(default_factory=LogConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    runners: RunnersConfig = field(default_factory=RunnersConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)

    @property
    def data_directory(self) -> Path:
        """Relative paths are taken from the working directory, as Kairoi did."""
        return Path(self.storage.directory)


DEFAULT_CONFIG_PATH = Path("configuration.toml")


def find_config(path: Path | None) -> Path | None:
    """The file `-c PATH` names, found the way Kairoi's loader (config-rs 0.11) finds it.

    - PATH given: PATH itself when it is a file, else PATH with its extension
      replaced by `.toml` (config-rs's `set_extension`): `-c production` reads
      `production.toml`. Neither exists: ConfigError (Kairoi silently ran on
      defaults; a typo in `-c` should not start a server with other settings).
    - No PATH: `./configuration.toml` when it exists, else None (defaults), as
      Kairoi, whose file is optional.
    """
    if path is None:
        return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"cannot read {path}: it is a directory")
    with_toml = path.with_suffix(".toml") if path.name not in ("", ".", "..") else path
    if with_toml != path and with_toml.is_file():
        return with_toml
    tried = f" (nor {with_toml})" if with_toml != path else ""
    raise ConfigError(f"cannot read {path}: no such file{tried}")


def add_config_option(parser: argparse.ArgumentParser, help: str = "") -> None:
    """`-c/--config FILE` on a (sub)command, as find_config reads it.

    Its default is SUPPRESS, so that on a subcommand it does not reset a `-c`
    given before the command (`kairoi-trio -c FILE backup DEST`); read it with
    `getattr(args, "config", None)`.
    """
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=help or "TOML configuration file (default: ./configuration.toml if it exists)",
    )


def load_config(path: Path | None) -> Config:
    """Read and validate the configuration `-c PATH` names (see find_config).

    No PATH and no ./configuration.toml gives the defaults. Raises ConfigError
    with a one-line reason for a missing or unreadable file, invalid TOML, an
    unknown key or a bad value.
    """
    found = find_config(path)
    if found is None:
        return Config()
    try:
        with open(found, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {found}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{found}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{found}: not UTF-8 text") from None
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> Config:
    config = _merge_metrics(_build(Config, raw, ""), raw)
    _check(config)
    return config


def _merge_metrics(config: Config, raw: dict[str, Any]) -> Config:
    """[metrics] enabled/listen, the old names of [http] enabled/listen, carried over to
    [http]; the same key in both tables is a ConfigError (which one would win is not
    obvious to a reader of the file)."""
    http, metrics = raw.get("http", {}), raw.get("metrics", {})
    if not isinstance(http, dict) or not isinstance(metrics, dict):
        return config  # _build refused it already
    carried: dict[str, Any] = {}
    for key in ("enabled", "listen"):
        if key in metrics:
            if key in http:
                raise ConfigError(
                    f"metrics.{key} and http.{key} are both set: [metrics] is the old name "
                    f"of [http], keep http.{key}"
                )
            carried[key] = getattr(config.metrics, key)
    if not carried:
        return config
    return dataclasses.replace(config, http=dataclasses.replace(config.http, **carried))


def _build(cls: type, raw: object, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else key
        if key not in names:
            kind = "table" if isinstance(value, dict) else "key"
            section = f" in [{where}]" if where else ""
            raise ConfigError(f"unknown {kind} {key!r}{section}")
        values[key] = _convert(hints[key], value, name)
    return cls(**values)


def _convert(hint: Any, value: object, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list")
        return [_convert(item, v, name) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value!r}")
    expected = hint if not isinstance(hint, types.UnionType) else typing.get_args(hint)
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {_describe(hint)}, not {value!r}")
    return value


def _describe(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )


def _check(config: Config) -> None:
    if config.log.level.lower() not in LOG_LEVELS:
        raise ConfigError(
            f"log.level must be trace, debug, info, warn, error or off, not {config.log.level!r}"
        )
    if not 1 <= config.database.framerate <= 65535:
        raise ConfigError(
            f"database.framerate must be from 1 to 65535, not {config.database.framerate}"
        )
    if config.log.format not in ("console", "json"):
        raise ConfigError(f"log.format must be console or json, not {config.log.format!r}")
    for name, address in (
        ("controller.listen", config.controller.listen),
        ("grpc.listen", config.grpc.listen),
        ("metrics.listen", config.metrics.listen),  # named as the file has it, if there
        ("http.listen", config.http.listen),
    ):
        parse_address(address, name)
    positive = {
        "controller.max_message_bytes": config.controller.max_message_bytes,
        "controller.max_connections": config.controller.max_connections,
        "controller.max_pipelined": config.controller.max_pipelined,
        "controller.max_pending_bytes": config.controller.max_pending_bytes,
        "grpc.max_watch_buffer_bytes": config.grpc.max_watch_buffer_bytes,
        "grpc.max_connections": config.grpc.max_connections,
        "http.max_connections": config.http.max_connections,
        "http.max_body_bytes": config.http.max_body_bytes,
        "jobs.max_payload_bytes": config.jobs.max_payload_bytes,
        "jobs.max_catchup_runs": config.jobs.max_catchup_runs,
        "runners.shell.concurrency": config.runners.shell.concurrency,
        "runners.shell.queue_size": config.runners.shell.queue_size,
        "runners.amqp.concurrency": config.runners.amqp.concurrency,
        "runners.amqp.queue_size": config.runners.amqp.queue_size,
        "runners.amqp.max_connections": config.runners.amqp.max_connections,
        "runners.http.concurrency": config.runners.http.concurrency,
        "runners.http.queue_size": config.runners.http.queue_size,
        "runners.http.timeout_s": config.runners.http.timeout_s,
        "runners.amqp.connect_timeout_s": config.runners.amqp.connect_timeout_s,
        "runners.amqp.confirm_timeout_s": config.runners.amqp.confirm_timeout_s,
        "grpc.max_message_bytes": config.grpc.max_message_bytes,
        "storage.compact_after_bytes": config.storage.compact_after_bytes,
        "storage.compact_ratio": config.storage.compact_ratio,
        "runners.shell.output_limit_bytes": config.runners.shell.output_limit_bytes,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, not {value}")
    try:  # [policy]: the bounds every rule's policy has (core/validation.py)
        check_policy(config.policy.to_policy(), "policy.")
    except CommandError as error:
        raise ConfigError(error.message) from None
    non_negative = {
        "runners.amqp.heartbeat_s": config.runners.amqp.heartbeat_s,  # 0: no heartbeats
        "storage.retention_s": config.storage.retention_s,
        "controller.idle_timeout_s": config.controller.idle_timeout_s,
        "controller.message_timeout_s": config.controller.message_timeout_s,
        "controller.auth_timeout_s": config.controller.auth_timeout_s,
        "controller.max_connections_per_address": config.controller.max_connections_per_address,
        "grpc.max_connections_per_address": config.grpc.max_connections_per_address,
        "grpc.idle_timeout_s": config.grpc.idle_timeout_s,
        "grpc.keepalive_s": config.grpc.keepalive_s,
        "shutdown.grace_period_s": config.shutdown.grace_period_s,
        "jobs.fire_ahead_s": config.jobs.fire_ahead_s,
    }
    for name, number in non_negative.items():
        if number < 0:
            raise ConfigError(f"{name} must not be negative, not {number}")
    for name, seconds in _durations(config):
        if seconds > MAX_POLICY_SECONDS:  # beyond it, time arithmetic leaves the supported range
            raise ConfigError(
                f"{name} must be at most {MAX_POLICY_SECONDS} (100 years), not {seconds}"
            )
    if config.jobs.fire_ahead_s > MAX_FIRE_AHEAD_S:
        raise ConfigError(
            f"jobs.fire_ahead_s must be at most {MAX_FIRE_AHEAD_S}, not {config.jobs.fire_ahead_s}"
        )
    if config.runners.amqp.heartbeat_s > 65535:  # a short uint in AMQP's connection.tune
        raise ConfigError("runners.amqp.heartbeat_s must be at most 65535")
    if not config.storage.directory:
        raise ConfigError("storage.directory must not be empty")
    _check_postgres(config.storage)
    for table, tls in (("controller", config.controller), ("grpc", config.grpc)):
        if bool(tls.tls_cert) != bool(tls.tls_key):
            raise ConfigError(f"{table}.tls_cert and {table}.tls_key go together")
        if tls.tls_cert:  # a key that does not match its certificate is found now, not at bind
            tls_context(tls.tls_cert, tls.tls_key, table)
    try:
        check_tokens(config.auth.tokens, config.auth.client_tokens, config.auth.read_tokens)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_postgres(storage: StorageConfig) -> None:
    if storage.backend not in ("log", "postgres"):
        raise ConfigError(f"storage.backend must be log or postgres, not {storage.backend!r}")
    pg = storage.postgres
    if storage.backend == "postgres" and not pg.dsn:
        raise ConfigError('storage.backend = "postgres" needs storage.postgres.dsn')
    if pg.pool_size < 3:
        raise ConfigError(f"storage.postgres.pool_size must be at least 3, not {pg.pool_size}")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", pg.schema):
        raise ConfigError(
            "storage.postgres.schema must be a lower-case SQL name (a-z, 0-9, _),"
            f" not {pg.schema!r}"
        )
    for name in ("lease_s", "heartbeat_s", "poll_interval_s", "connect_timeout_s"):
        if getattr(pg, name) <= 0:
            raise ConfigError(f"storage.postgres.{name} must be positive")
    if pg.heartbeat_s * 2 > pg.lease_s:
        raise ConfigError(
            "storage.postgres.heartbeat_s must be at most half of lease_s"
            f" ({pg.heartbeat_s} > {pg.lease_s} / 2): one late heartbeat must not lose the lease"
        )


def tls_context(cert: str, key: str, table: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) for the PEM files `cert` and `key`.

    Raises ConfigError with one line naming the option (`table`.tls_cert or
    .tls_key): a file that cannot be read, holds no certificate or no usable key,
    an encrypted key (the server has no one to ask for its password), or a key
    that does not match the certificate.
    """
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            Path(path).read_bytes()
        except OSError as error:
            raise ConfigError(f"{table}.{name}: cannot read {path}: {error.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=cert)  # parses every certificate in the file
    except ssl.SSLError:
        raise ConfigError(f"{table}.tls_cert: {cert} holds no PEM certificate") from None

    def no_password() -> bytes:
        raise ConfigError(
            f"{table}.tls_key: {key} is encrypted; give the server an unencrypted key"
        )

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise ConfigError(f"{table}.tls_key does not match {table}.tls_cert") from None
        raise ConfigError(f"{table}.tls_key: {key} holds no usable PEM private key") from None
    return context


def _durations(node: object, prefix: str = "") -> list[tuple[str, float]]:
    """Every `*_s` option in the tree, as ("table.key", seconds)."""
    found = []
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            found += _durations(value, f"{prefix}{f.name}.")
        elif f.name.endswith("_s"):
            found.append((f"{prefix}{f.name}", value))
    return found


def parse_address(address: str, name: str = "address") -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:port') -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{name} must be host:port, not {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)
