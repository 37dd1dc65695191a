"""The `kairoi-trio` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from kairoi_trio import __version__
from kairoi_trio.config import Config, ConfigError, add_config_option, find_config, load_config

if TYPE_CHECKING:
    import trio


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    As Kairoi's binary: `kairoi-trio`, `kairoi-trio -c FILE` and
    `kairoi-trio --config FILE` start the server (`serve` is the explicit form),
    and `-V`/`--version` print the version. Exit status 2: a bad configuration
    or command line; 1: the server could not start.
    """
    argv = sys.argv[1:] if argv is None else argv
    open_standard_streams()
    # Serving needs none of the client, import, repair and backup commands: their
    # modules (a quarter of a second of imports) load only for the full parser.
    parser = _server_parser() if _serves(argv) else _parser(_command_of(argv))
    args = parser.parse_args(argv)
    command = args.command or "serve"  # no subcommand: Kairoi's behaviour, run the server
    if command in ("serve", "check-config"):
        path = getattr(args, "config", None)  # -c before or after the command
        try:
            config = load_config(path)
        except ConfigError as error:
            print(f"kairoi-trio: {error}", file=sys.stderr)
            return 2
        if command == "check-config":
            found = find_config(path)
            print(f"configuration is valid ({found or 'no file: the defaults'})")
            return 0
        return run_server(config)
    if command == "import-kairoi":
        from kairoi_trio.migration.kairoi_import import run_import_command

        return run_import_command(args)
    if command == "repair":
        from kairoi_trio.storage.repair import run_repair_command

        return run_repair_command(args)
    if command == "backup":
        from kairoi_trio.storage.backup import run_backup_command

        return run_backup_command(args)
    if command == "storage":
        from kairoi_trio.storage.copy import run_storage_command

        return run_storage_command(args)
    if command == "db":
        from kairoi_trio.storage.copy import run_db_command

        return run_db_command(args)
    return _run_client_command(args)


_SERVER_COMMANDS = (
    ("serve", "run the server (the default command)"),
    ("check-config", "validate the configuration and exit"),
)


def open_standard_streams() -> None:
    """Open /dev/null on whichever of file descriptors 0, 1 and 2 is closed, as
    daemon(3) does, and give Python a stream for each that it has none for.

    A server started with its output closed (`>&- 2>&-`) otherwise stopped at its
    first log line, saying nothing; and with fd 2 closed, a data file opened later
    could take that number and receive what a C library writes to stderr (gRPC's
    core does), corrupting the log.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # EBADF: closed
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself,
            if null != fd:  # unless a lower one was closed too and took it
                os.dup2(null, fd)  # (inheritable)
                os.close(null)
            else:  # Python opens close-on-exec: a program started later would find
                os.set_inheritable(fd, True)  # it closed, as if nothing were done
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (as long as the process)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(  # noqa: SIM115
            2, "w", buffering=1, closefd=False, errors="backslashreplace"
        )


def _serves(argv: list[str]) -> bool:
    """Whether `argv` runs or checks the server: only -c/--config FILE and `serve` or
    `check-config` (help and version go through the full parser)."""
    rest = iter(argv)
    for arg in rest:
        if arg in ("-c", "--config"):
            next(rest, None)
        elif arg.startswith("--config=") or (arg.startswith("-c") and arg != "-c"):
            continue
        elif arg not in ("serve", "check-config"):
            return False
    return True


#: The client's commands (client_cli): they need none of the server's modules.
_CLIENT_COMMANDS = frozenset({"job", "rule", "watch", "info"})


def _command_of(argv: list[str]) -> str | None:
    """The subcommand `argv` names, if any (its first word that is no option)."""
    rest = iter(argv)
    for arg in rest:
        if arg in ("-c", "--config"):
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _server_parser() -> argparse.ArgumentParser:
    """The parser of `_parser()` cut to what serving uses (same options, same errors)."""
    parser = argparse.ArgumentParser(prog="kairoi-trio")
    add_config_option(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _SERVER_COMMANDS:
        add_config_option(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; for a client command (`job`, `rule`, ...) without the
    import, repair, backup and storage commands, whose modules (the log, structlog,
    Trio: ~0.1 s) a client call does not need: its own parsing is the same."""
    parser = argparse.ArgumentParser(
        prog="kairoi-trio",
        description=(
            "A time-based job scheduler server (Kairoi-compatible, with a gRPC API). "
            "Without a command, runs the server, as Kairoi does."
        ),
        epilog=(
            "configuration:\n  -c FILE, else ./configuration.toml when it exists, else the "
            "defaults.\n  A FILE that does not exist is also looked for with a .toml extension."
            f"\n\n{_client_environment_help()}"
            "\n\nexit status: 0 done; 1 the server could not start or a call failed; "
            "2 bad configuration or command line"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    version = f"kairoi-trio {__version__}"
    parser.add_argument("-V", "--version", action="version", version=version)
    add_config_option(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _SERVER_COMMANDS:
        add_config_option(commands.add_parser(name, help=help_text, description=help_text))
    if command not in _CLIENT_COMMANDS:
        _add_import_command(commands)
        from kairoi_trio.storage.backup import add_backup_command
        from kairoi_trio.storage.copy import add_storage_commands
        from kairoi_trio.storage.repair import add_repair_command

        add_repair_command(commands)
        add_backup_command(commands)
        add_storage_commands(commands)
    _add_client_commands(commands)
    return parser


def run_server(config: Config) -> int:
    from kairoi_trio.observability.logging import configure_logging

    close_log = configure_logging(config.log.level, config.log.format, batched=True)
    try:
        cause = _serve(config)
    finally:
        close_log()  # the lines still pending, before anything else is printed
    if cause is not None:
        print(f"kairoi-trio: cannot start: {cause}", file=sys.stderr)
        return 1
    return 0


def _serve(config: Config) -> BaseException | None:
    """Serve until a signal; the storage or socket error that stopped a start."""
    import trio  # here: the client's commands do not need it

    from kairoi_trio.open_files import check_open_files

    # A file-size limit (ulimit -f) must fail a write with EFBIG, like a full
    # disk, instead of killing the scheduler.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    check_open_files(config)  # soft RLIMIT_NOFILE raised to the hard limit; warns if too low
    try:
        trio.run(_serve_until_signal, config)
    except BaseException as error:
        cause = _startup_cause(error)
        if cause is None:
            raise
        return cause
    return None


def _startup_cause(error: BaseException) -> BaseException | None:
    """The storage or socket error behind a failed start, out of any exception groups."""
    from kairoi_trio.storage.log import CorruptLogError, StorageError
    from kairoi_trio.storage.postgres.schema import SchemaError
    from kairoi_trio.storage.postgres.store import PostgresUnavailable

    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            cause = _startup_cause(inner)
            if cause is not None:
                return cause
        return None
    expected = CorruptLogError | StorageError | OSError | PostgresUnavailable | SchemaError
    return error if isinstance(error, expected) else None


async def _serve_until_signal(config: Config) -> None:
    import trio

    from kairoi_trio.app import serve

    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, stop, nursery.cancel_scope)
            try:
                await serve(config, stop)  # returns once `stop` is set and shutdown is done
            finally:
                nursery.cancel_scope.cancel()


async def _watch_signals(
    signals: AsyncIterator[int], stop: trio.Event, scope: trio.CancelScope
) -> None:
    async for _ in signals:
        if stop.is_set():  # a second signal: stop now, without the grace period
            scope.cancel()
            return
        stop.set()


def _client_environment_help() -> str:
    try:
        from kairoi_trio.client_cli import ENVIRONMENT_HELP
    except ImportError:
        return ""
    return ENVIRONMENT_HELP


def _add_import_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from kairoi_trio.migration.kairoi_import import add_import_command

    add_import_command(commands)


def _add_client_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from kairoi_trio.client_cli import add_client_commands
    except ImportError:
        return
    add_client_commands(commands)


def _run_client_command(args: argparse.Namespace) -> int:
    from kairoi_trio.client_cli import run_client_command

    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
