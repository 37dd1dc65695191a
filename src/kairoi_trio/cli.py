"""The `kairoi-trio` command line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from kairoi_trio import __version__
from kairoi_trio.config import Config, ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kairoi-trio",
        description="A time-based job scheduler server (Kairoi-compatible, with a gRPC API).",
    )
    parser.add_argument("--version", action="version", version=f"kairoi-trio {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("-c", "--config", type=Path, help="TOML configuration file")
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", type=Path, required=True)
    _add_client_commands(commands)
    args = parser.parse_args(argv)

    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("serve", "check-config"):
        try:
            config = load_config(args.config)
        except ConfigError as error:
            print(f"kairoi-trio: {error}", file=sys.stderr)
            return 2
        if args.command == "check-config":
            print("configuration is valid")
            return 0
        return run_server(config)
    return _run_client_command(args)


def run_server(config: Config) -> int:
    from kairoi_trio.observability.logging import configure_logging

    configure_logging(config.log.level, config.log.format)
    # A file-size limit (ulimit -f) must fail a write with EFBIG, like a full
    # disk, instead of killing the scheduler.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        trio.run(_serve_until_signal, config)
    except BaseException as error:
        cause = _startup_cause(error)
        if cause is None:
            raise
        print(f"kairoi-trio: cannot start: {cause}", file=sys.stderr)
        return 1
    return 0


def _startup_cause(error: BaseException) -> BaseException | None:
    """The storage or socket error behind a failed start, out of any exception groups."""
    from kairoi_trio.storage.log import CorruptLogError, StorageError

    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            cause = _startup_cause(inner)
            if cause is not None:
                return cause
        return None
    return error if isinstance(error, CorruptLogError | StorageError | OSError) else None


async def _serve_until_signal(config: Config) -> None:
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
