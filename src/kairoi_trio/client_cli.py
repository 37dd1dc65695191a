"""Client subcommands for people at a terminal, over gRPC (kairoi.v1.Scheduler):

    kairoi-trio job set ID TIME [--payload TEXT | --payload-file FILE]
    kairoi-trio job get ID | job unset ID | job list [--prefix P] [--status S]
    kairoi-trio job schedule ID EXPRESSION [--tz ZONE] [--start TIME] [--end TIME]
        [--max-runs N] [--jitter D] [--misfire coalesce|all|skip] [--catchup-window D]
        [--overlap skip|buffer_one] [--payload TEXT | --payload-file FILE]
    kairoi-trio job pause ID | job resume ID | job run-now ID | job next ID [-n N]
    kairoi-trio rule set ID PATTERN shell COMMAND | amqp DSN EXCHANGE ROUTING_KEY | http URL
        [--timeout D] [--max-attempts N] [--backoff-initial D] [--backoff-max D]
        [--stale-after D]
    kairoi-trio rule get ID | rule unset ID | rule list [--prefix P]
    kairoi-trio watch [--prefix P] [--snapshot]
    kairoi-trio info

Every command takes --server (default $KAIROI_SERVER, else 127.0.0.1:5679),
--token (default $KAIROI_TOKEN) and --json. Results go to stdout: tab-separated
text lines, or with --json one JSON document per result (JSON Lines for
watch). Errors are one line on stderr; exit status 1 for a failed call, 2 for
a bad command line. docs/cli.md is the reference, JSON field names included.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.commands import CommandError
from kairoi_trio.core.validation import MAX_POLICY_SECONDS
from kairoi_trio.model import DEFAULT_POLICY, MICROS, Status, format_time, from_datetime
from kairoi_trio.protocols.kcp.instructions import parse_time
from kairoi_trio.scheduling.occurrences import ScheduleError, parse_duration

DEFAULT_SERVER = "127.0.0.1:5679"

ENVIRONMENT_HELP = """\
environment:
  KAIROI_SERVER  the server's gRPC address, HOST:PORT (default 127.0.0.1:5679);
                 --server overrides it
  KAIROI_TOKEN   the token to send when the server requires one ([auth] tokens);
                 --token overrides it. Prefer the variable: a command line is
                 visible to every user of the machine (ps)"""

_EXIT_HELP = """\
exit status: 0 done; 1 the call failed (the reason is on stderr); 2 bad command line"""

_EPILOG = f"{ENVIRONMENT_HELP}\n\n{_EXIT_HELP}"

_TIME_HELP = (
    'when the job is due: "YYYY-MM-DD HH:MM:SS[.ffffff]" in UTC (the text protocol\'s '
    "form), or RFC 3339 such as 2026-12-01T09:00:00Z or 2026-12-01T10:00:00+01:00"
)
_DURATION_HELP = "seconds (30, 1.5) or a number with a unit: ms, s, m, h (500ms, 90s, 5m, 2h)"
_SPAN_HELP = (
    "seconds (30, 1.5), a number with a unit (500ms, 90s, 15m, 2h, 1d), units combined "
    "(1h30m) or ISO 8601 (PT15M)"
)
_EXPRESSION_HELP = (
    'when it runs: a cron expression in quotes ("*/15 * * * *"; 6 fields with leading '
    'seconds), a macro (@yearly @monthly @weekly @daily @hourly), "every 15m" (s, m, h, d) '
    "or an ISO 8601 duration (PT15M)"
)
_MISFIRES = ("coalesce", "all", "skip")
_OVERLAPS = ("skip", "buffer_one")
_MAX_PREVIEW = 1000

# The text that ends a snapshot in `watch --snapshot`, and its JSON Lines form.
SNAPSHOT_END_TEXT = "-- end of snapshot; live changes follow --"
SNAPSHOT_END_JSON = {"type": "snapshot_end"}

_RUNNER_ARGS = {
    "shell": ("COMMAND",),
    "amqp": ("DSN", "EXCHANGE", "ROUTING_KEY"),
    "http": ("URL",),
}
_STATUSES = [status.value for status in Status]
_MAX_DURATION_S = 315_576_000_000  # google.protobuf.Duration's range: 10,000 years
_MAX_UINT32 = 2**32 - 1

Metadata = tuple[tuple[str, str], ...]


# -- the command line ---------------------------------------------------------------------


def add_client_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `job`, `rule`, `watch` and `info` to the `kairoi-trio` subcommands.

    Each subcommand sets `command` (and `action` for job/rule) in the parsed
    namespace; run_client_command then runs it.
    """
    common = _common_options()
    text = _HelpFormatter

    def group(name: str, help_text: str) -> argparse._SubParsersAction:  # type: ignore[type-arg]
        parser = commands.add_parser(
            name, help=help_text, description=help_text, epilog=_EPILOG, formatter_class=text
        )
        return parser.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of:")

    def action(
        actions: argparse._SubParsersAction,  # type: ignore[type-arg]
        name: str,
        help_text: str,
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=text,
        )
        return parser

    jobs = group(
        "job", "set, get, unset or list jobs; schedule, pause, resume or run recurring jobs"
    )
    job_set = action(jobs, "set", "create or replace a job (planned again, attempts reset)")
    job_set.add_argument(
        "id", metavar="ID", type=_utf8_arg, help="the job's id: 1 to 65,535 bytes of UTF-8"
    )
    job_set.add_argument("time", metavar="TIME", type=_time_arg, help=_TIME_HELP)
    payload = job_set.add_mutually_exclusive_group()
    payload.add_argument(
        "--payload",
        metavar="TEXT",
        type=lambda text: _utf8_arg(text).encode(),
        help="data handed to the runner, as UTF-8 text (default: none)",
    )
    payload.add_argument(
        "--payload-file",
        metavar="FILE",
        type=argparse.FileType("rb"),
        help="data handed to the runner, read from FILE as bytes ('-': standard input)",
    )
    for name, help_text in (("get", "show one job"), ("unset", "delete a job that is not running")):
        action(jobs, name, help_text).add_argument(
            "id", metavar="ID", type=_utf8_arg, help="the job's id"
        )
    _add_recurring_commands(jobs, action)
    job_list = action(jobs, "list", "list jobs in id order")
    job_list.add_argument(
        "--prefix",
        default="",
        type=_utf8_arg,
        help="only jobs whose id starts with PREFIX (default: all)",
    )
    job_list.add_argument(
        "--status", choices=_STATUSES, help="only jobs of this status (default: all)"
    )

    rules = group("rule", "set, get, unset or list rules")
    rule_set = action(rules, "set", "create or replace a rule (it pairs jobs triggered after)")
    rule_set.add_argument(
        "id", metavar="ID", type=_utf8_arg, help="the rule's id (also breaks ties: smaller wins)"
    )
    rule_set.add_argument(
        "pattern",
        metavar="PATTERN",
        type=_utf8_arg,
        help="jobs whose id starts with PATTERN use this rule, unless a longer pattern matches",
    )
    rule_set.add_argument(
        "runner", metavar="RUNNER", choices=tuple(_RUNNER_ARGS), help="shell, amqp or http"
    )
    rule_set.add_argument(
        "runner_args",
        metavar="ARG",
        nargs="+",
        type=_utf8_arg,
        action=_RunnerArgs,
        help=(
            "shell COMMAND (run as `sh COMMAND JOB_ID`); amqp DSN EXCHANGE ROUTING_KEY "
            "(DSN: amqp://user:pass@host:port/vhost); http URL (POSTs the job as JSON)"
        ),
    )
    policy = rule_set.add_argument_group(
        "policy",
        "How the rule runs its jobs; an option left out keeps the server's default. "
        f"D is a duration: {_DURATION_HELP}.",
    )
    policy.add_argument(
        "--timeout",
        metavar="D",
        type=_duration_arg,
        help="cancel a run that lasts longer; it counts as a failure (default: no limit)",
    )
    policy.add_argument(
        "--max-attempts",
        metavar="N",
        type=_attempts_arg,
        help="tries in all, the first included; more than 1 retries failed runs (default: 1)",
    )
    policy.add_argument(
        "--backoff-initial",
        metavar="D",
        type=_duration_arg,
        help="delay before the first retry, doubled for each next one (default: 1s)",
    )
    policy.add_argument(
        "--backoff-max", metavar="D", type=_duration_arg, help="longest retry delay (default: 300s)"
    )
    policy.add_argument(
        "--stale-after",
        metavar="D",
        type=_duration_arg,
        help="fail a job without running it when it comes up more than D late (default: never)",
    )
    for name, help_text in (("get", "show one rule"), ("unset", "delete a rule")):
        action(rules, name, help_text).add_argument(
            "id", metavar="ID", type=_utf8_arg, help="the rule's id"
        )
    rule_list = action(rules, "list", "list rules in id order")
    rule_list.add_argument(
        "--prefix",
        default="",
        type=_utf8_arg,
        help="only rules whose id starts with PREFIX (default: all)",
    )

    watch_help = "print job changes as they happen"
    watch = commands.add_parser(
        "watch",
        parents=[common],
        help=watch_help,
        description=(
            f"{watch_help}, until interrupted (Ctrl-C). Each line is the change (set, "
            "triggered, executed, failed or deleted) and the job after it (before it, for "
            "deleted)."
        ),
        epilog=_EPILOG,
        formatter_class=text,
    )
    watch.add_argument(
        "--prefix",
        default="",
        type=_utf8_arg,
        help="only jobs whose id starts with PREFIX (default: all)",
    )
    watch.add_argument(
        "--snapshot",
        action="store_true",
        help=(
            "start with every matching job as it is now, then a line "
            f"{SNAPSHOT_END_TEXT!r} (with --json: {json.dumps(SNAPSHOT_END_JSON)}), "
            "then the changes; none is missed or repeated in between"
        ),
    )
    info_help = "show the server's version, start time, and job and rule counts"
    commands.add_parser(
        "info",
        parents=[common],
        help=info_help,
        description=info_help,
        epilog=_EPILOG,
        formatter_class=text,
    )


def _add_recurring_commands(
    jobs: argparse._SubParsersAction,  # type: ignore[type-arg]
    action: Callable[..., argparse.ArgumentParser],
) -> None:
    """`job schedule`, `pause`, `resume`, `run-now` and `next` (docs/recurring-jobs.md)."""
    schedule = action(
        jobs,
        "schedule",
        "create or replace a recurring job: planned at its first occurrence, then at the "
        "next one after each run (see docs/recurring-jobs.md)",
    )
    schedule.add_argument(
        "id", metavar="ID", type=_utf8_arg, help="the job's id: 1 to 65,535 bytes of UTF-8"
    )
    schedule.add_argument("expression", metavar="EXPRESSION", type=_utf8_arg, help=_EXPRESSION_HELP)
    options = schedule.add_argument_group(
        "schedule",
        "An option left out keeps the server's default. D is a duration: "
        f"{_SPAN_HELP}. TIME: {_TIME_HELP.split(': ', 1)[1]}.",
    )
    options.add_argument(
        "--tz",
        metavar="ZONE",
        dest="time_zone",
        default="UTC",
        type=_utf8_arg,
        help="the IANA zone the cron fields are read in, e.g. Europe/Paris (default: UTC); "
        "intervals ignore it",
    )
    options.add_argument(
        "--start", metavar="TIME", type=_time_arg, help="no run before TIME (inclusive)"
    )
    options.add_argument(
        "--end", metavar="TIME", type=_time_arg, help="no run after TIME (inclusive)"
    )
    options.add_argument(
        "--max-runs",
        metavar="N",
        type=_max_runs_arg,
        help="stop after N runs (default: no limit)",
    )
    options.add_argument(
        "--jitter",
        metavar="D",
        type=_span_arg,
        help="start each run up to D later, at random (default: none)",
    )
    options.add_argument(
        "--misfire",
        choices=_MISFIRES,
        help="occurrences missed while the server was down or the job paused: run one now "
        "for all (coalesce, the default), each in order (all), or none (skip)",
    )
    options.add_argument(
        "--catchup-window",
        metavar="D",
        type=_span_arg,
        help="do not catch up occurrences missed more than D ago (default: no bound)",
    )
    options.add_argument(
        "--overlap",
        choices=_OVERLAPS,
        help="an occurrence due while the previous run is in flight: skip it (the default), "
        "or run it once that run ends (buffer_one)",
    )
    payload = schedule.add_mutually_exclusive_group()
    payload.add_argument(
        "--payload",
        metavar="TEXT",
        type=lambda text: _utf8_arg(text).encode(),
        help="data handed to the runner on every run, as UTF-8 text (default: none)",
    )
    payload.add_argument(
        "--payload-file",
        metavar="FILE",
        type=argparse.FileType("rb"),
        help="data handed to the runner on every run, read from FILE as bytes ('-': stdin)",
    )
    for name, help_text in (
        ("pause", "stop a recurring job from running until it is resumed"),
        (
            "resume",
            "resume a paused recurring job (its misfire policy decides about the "
            "occurrences missed meanwhile)",
        ),
        (
            "run-now",
            "run a recurring job once now; its schedule then goes on as planned",
        ),
    ):
        action(jobs, name, help_text).add_argument(
            "id", metavar="ID", type=_utf8_arg, help="the job's id"
        )
    preview = action(
        jobs,
        "next",
        "show the coming occurrences of a recurring job (the planned one first while it has "
        "not started), in UTC and in the schedule's zone",
    )
    preview.add_argument("id", metavar="ID", type=_utf8_arg, help="the job's id")
    preview.add_argument(
        "-n",
        "--count",
        metavar="N",
        type=_preview_count_arg,
        default=5,
        help=f"how many occurrences, 1 to {_MAX_PREVIEW:,} (default: 5)",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions and help texts, but keeps the epilog's table (environment) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("environment:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    options = common.add_argument_group("connection and output")
    options.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get("KAIROI_SERVER") or DEFAULT_SERVER,
        help=f"the server's gRPC address (default: $KAIROI_SERVER, else {DEFAULT_SERVER})",
    )
    options.add_argument(
        "--token",
        default=os.environ.get("KAIROI_TOKEN", ""),
        help=(
            'sent as "authorization: Bearer TOKEN" when the server requires a token '
            "(default: $KAIROI_TOKEN)"
        ),
    )
    options.add_argument(
        "--json",
        action="store_true",
        help="print JSON: one document per result, one object per line for watch",
    )
    return common


class _RunnerArgs(argparse.Action):
    """Checks that the runner got the arguments it takes (the runner is parsed before)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        names = _RUNNER_ARGS[namespace.runner]
        if len(values) != len(names):
            parser.error(
                f"the {namespace.runner} runner takes {_count(len(names), 'argument')} "
                f"({' '.join(names)}), not {len(values)}"
            )
        setattr(namespace, self.dest, values)


def _utf8_arg(text: str) -> str:
    """A command-line argument that is valid UTF-8 (protobuf strings must be)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 arrive as lone surrogates
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise argparse.ArgumentTypeError(f"'{shown}' is not valid UTF-8") from None
    return text


def _time_arg(text: str) -> int:
    """TIME -> microseconds since the epoch; argparse.ArgumentTypeError with the reason."""
    if re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?", text, re.ASCII):
        try:
            return parse_time(text)  # the text protocol's form, and its messages
        except CommandError as error:
            raise argparse.ArgumentTypeError(error.message) from None
    try:
        if len(text) < 19 or text[10] not in "Tt":
            raise ValueError
        return from_datetime(datetime.fromisoformat(text))  # naive: UTC, as KCP's form
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected {_TIME_HELP.split(': ', 1)[1]}"
        ) from None


def _duration_arg(text: str) -> float:
    """A policy's D -> seconds (above 0, at most MAX_POLICY_SECONDS); argparse.ArgumentTypeError
    with the reason."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?", text.strip(), re.ASCII)
    if match is None and text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be more than 0")
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected {_DURATION_HELP}")
    seconds = float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match[2]]
    if not 0 < seconds <= MAX_POLICY_SECONDS:  # the server's bound, checked before sending
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: must be more than 0 and at most 100 years"
        )
    return seconds


def _span_arg(text: str) -> int:
    """D of a schedule option -> microseconds (0 or more); argparse.ArgumentTypeError."""
    stripped = text.strip()
    if stripped.startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?", stripped, re.ASCII)
    if match is not None:
        try:
            unit = {"ms": 1_000, "s": MICROS, "m": 60 * MICROS, "h": 3600 * MICROS, None: MICROS}
            us = int(Decimal(match[1]) * unit[match[2]])
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            us = -1
    else:
        try:
            us = parse_duration(stripped)
        except ScheduleError:
            us = -1
    if us < 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected {_SPAN_HELP}")
    if us > _MAX_DURATION_S * MICROS:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: at most 10,000 years")
    return us


def _max_runs_arg(text: str) -> int:
    return _whole_number(text, "number of runs", 1, _MAX_UINT32)


def _preview_count_arg(text: str) -> int:
    return _whole_number(text, "count", 1, _MAX_PREVIEW)


def _whole_number(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"invalid {what} {text!r}: expected a whole number from {low} to {high}"
        )
    return value


def _attempts_arg(text: str) -> int:
    try:
        attempts = int(text)
    except ValueError:
        attempts = 0
    if not 1 <= attempts <= _MAX_UINT32:
        raise argparse.ArgumentTypeError(
            f"invalid number of attempts {text!r}: expected a whole number from 1 to {_MAX_UINT32}"
        )
    return attempts


# -- running a command ----------------------------------------------------------------------


def run_client_command(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Run the client subcommand parsed into `args`; returns the exit status (0, 1 or 130)."""
    out = _Output(stdout or sys.stdout, as_json=args.json)
    metadata: Metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    handler = _HANDLERS[(args.command, getattr(args, "action", None))]
    try:
        with grpc.insecure_channel(args.server) as channel:
            handler(pb_grpc.SchedulerStub(channel), args, metadata, out)
    except grpc.RpcError as error:
        print(f"kairoi-trio: {_describe(error, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, the way to end `watch`
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other tools do, and keep
        # Python from complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _describe(error: grpc.RpcError, args: argparse.Namespace) -> str:
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    message = f"{code.name}: {details}" if details else code.name
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        message += f" (is a server listening at {args.server}? see --server, KAIROI_SERVER)"
    elif code is grpc.StatusCode.UNAUTHENTICATED:
        message += " (see --token, KAIROI_TOKEN)"
    elif code is grpc.StatusCode.PERMISSION_DENIED:
        # The token is known but its role ([auth] client_tokens, read_tokens) is too small.
        if not details.startswith("permission denied"):
            message = f"{code.name}: permission denied" + (f": {details}" if details else "")
        message += " (roles: see [auth] in docs/security.md)"
    return message


Stub = pb_grpc.SchedulerStub
Args = argparse.Namespace
Handler = Callable[[Stub, Args, Metadata, "_Output"], None]


def _job_set(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    if args.payload_file is not None:
        with args.payload_file as file:
            payload = file.read()
    else:
        payload = args.payload or b""
    request = pb.SetJobRequest(id=args.id, execute_at=_timestamp(args.time), payload=payload)
    out.result("OK", _job_document(stub.SetJob(request, metadata=md).job))


def _job_get(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    job = stub.GetJob(pb.GetJobRequest(id=args.id), metadata=md).job
    out.result(_job_line(job), _job_document(job))


def _job_unset(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    stub.DeleteJob(pb.DeleteJobRequest(id=args.id), metadata=md)
    out.result("OK", {"id": args.id, "deleted": True})


def _job_list(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    status = f"JOB_STATUS_{args.status.upper()}" if args.status else "JOB_STATUS_UNSPECIFIED"

    def jobs() -> Iterator[pb.Job]:
        token = ""
        while True:
            request = pb.ListJobsRequest(prefix=args.prefix, status=status, page_token=token)
            page = stub.ListJobs(request, metadata=md)
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    out.results((_job_line(job), _job_document(job)) for job in jobs())


def _job_schedule(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    if args.payload_file is not None:
        with args.payload_file as file:
            payload = file.read()
    else:
        payload = args.payload or b""
    schedule = pb.Schedule(
        expression=args.expression, time_zone=args.time_zone, max_runs=args.max_runs or 0
    )
    if args.start is not None:
        schedule.start.CopyFrom(_timestamp(args.start))
    if args.end is not None:
        schedule.end.CopyFrom(_timestamp(args.end))
    if args.jitter is not None:
        schedule.jitter.CopyFrom(_span(args.jitter))
    if args.catchup_window is not None:
        schedule.catchup_window.CopyFrom(_span(args.catchup_window))
    if args.misfire is not None:  # left out: unspecified, the server's default
        schedule.misfire = pb.MisfirePolicy.Value(f"MISFIRE_POLICY_{args.misfire.upper()}")
    if args.overlap is not None:
        schedule.overlap = pb.OverlapPolicy.Value(f"OVERLAP_POLICY_{args.overlap.upper()}")
    request = pb.ScheduleJobRequest(id=args.id, schedule=schedule, payload=payload)
    out.result("OK", _job_document(stub.ScheduleJob(request, metadata=md).job))


def _job_pause(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    job = stub.PauseJob(pb.PauseJobRequest(id=args.id), metadata=md).job
    out.result("OK", _job_document(job))


def _job_resume(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    job = stub.ResumeJob(pb.ResumeJobRequest(id=args.id), metadata=md).job
    out.result("OK", _job_document(job))


def _job_run_now(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    job = stub.RunJobNow(pb.RunJobNowRequest(id=args.id), metadata=md).job
    out.result("OK", _job_document(job))


def _job_next(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    """One line per occurrence: UTC, then the time in the schedule's zone in parentheses."""
    preview = stub.PreviewJob(pb.PreviewJobRequest(id=args.id, count=args.count), metadata=md)
    # The zone, for the local times (read after the preview, which names a one-shot job's
    # or a missing job's error first).
    job = stub.GetJob(pb.GetJobRequest(id=args.id), metadata=md).job
    zone_name = job.schedule.time_zone or "UTC"
    try:
        zone: ZoneInfo | None = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # not in this machine's database
        zone = None
    lines, occurrences = [], []
    for timestamp in preview.occurrences:
        us = _micros(timestamp)
        utc = format_time(us, fraction=False)
        local = _local_time(us, zone)
        lines.append(f"{utc} ({local} {_text(zone_name)})" if local else utc)
        occurrences.append({"at": format_time(us), "local": local})
    document = {"id": args.id, "time_zone": zone_name, "occurrences": occurrences}
    out.result("\n".join(lines), document)


def _local_time(us: int, zone: ZoneInfo | None) -> str | None:
    """RFC 3339 with the zone's offset (2026-12-01T10:00:00+01:00); None without a zone."""
    if zone is None:
        return None
    try:
        return (
            datetime.fromtimestamp(us // MICROS, UTC)
            .replace(microsecond=us % MICROS)
            .astimezone(zone)
            .isoformat()
        )
    except (OverflowError, ValueError):  # at the edges of years 1 and 9999
        return None


def _rule_set(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    rule = pb.Rule(id=args.id, pattern=args.pattern)
    if args.runner == "shell":
        rule.shell.command = args.runner_args[0]
    elif args.runner == "amqp":
        dsn, exchange, routing_key = args.runner_args
        rule.amqp.CopyFrom(pb.AmqpRunner(dsn=dsn, exchange=exchange, routing_key=routing_key))
    else:
        rule.http.url = args.runner_args[0]
    if args.max_attempts is not None:
        rule.policy.max_attempts = args.max_attempts
    for name in ("timeout", "backoff_initial", "backoff_max", "stale_after"):
        seconds = getattr(args, name)
        if seconds is not None:  # unset fields keep the server's defaults
            getattr(rule.policy, name).CopyFrom(_duration(seconds))
    stored = stub.SetRule(pb.SetRuleRequest(rule=rule), metadata=md).rule
    out.result("OK", _rule_document(stored))


def _rule_get(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    rule = stub.GetRule(pb.GetRuleRequest(id=args.id), metadata=md).rule
    out.result(_rule_line(rule), _rule_document(rule))


def _rule_unset(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    stub.DeleteRule(pb.DeleteRuleRequest(id=args.id), metadata=md)
    out.result("OK", {"id": args.id, "deleted": True})


def _rule_list(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    def rules() -> Iterator[pb.Rule]:
        token = ""
        while True:
            request = pb.ListRulesRequest(prefix=args.prefix, page_token=token)
            page = stub.ListRules(request, metadata=md)
            yield from page.rules
            token = page.next_page_token
            if not token:
                return

    out.results((_rule_line(rule), _rule_document(rule)) for rule in rules())


def _watch(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    request = pb.WatchJobsRequest(prefix=args.prefix, include_snapshot=args.snapshot)
    in_snapshot = args.snapshot
    for response in stub.WatchJobs(request, metadata=md):
        if in_snapshot and not response.snapshot:
            # The server follows the snapshot with a change message (empty if
            # nothing changed yet), so this prints as soon as the snapshot is whole.
            in_snapshot = False
            out.event(SNAPSHOT_END_TEXT, SNAPSHOT_END_JSON)
        for event in response.events:
            kind = _enum_name(pb.JobEventType, event.type, "JOB_EVENT_TYPE_")
            document = {
                "type": kind,
                "snapshot": response.snapshot,
                "at": format_time(_micros(event.at)) if event.HasField("at") else None,
                "job": _job_document(event.job),
            }
            out.event(f"{kind}\t{_job_line(event.job)}", document)


def _info(stub: Stub, args: Args, md: Metadata, out: _Output) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
    counts = {name: getattr(info.jobs, name) for name in _STATUSES}
    started_at = _micros(info.started_at)
    lines = [
        f"version\t{_text(info.version)}",
        f"started_at\t{format_time(started_at, sep=' ', zone='', fraction=False)}",
        *(f"jobs.{name}\t{count}" for name, count in counts.items()),
        f"rules\t{info.rules}",
    ]
    document = {
        "version": info.version,
        "started_at": format_time(started_at),
        "jobs": counts,
        "rules": info.rules,
    }
    out.result("\n".join(lines), document)


_HANDLERS: dict[tuple[str, str | None], Handler] = {
    ("job", "set"): _job_set,
    ("job", "get"): _job_get,
    ("job", "unset"): _job_unset,
    ("job", "list"): _job_list,
    ("job", "schedule"): _job_schedule,
    ("job", "pause"): _job_pause,
    ("job", "resume"): _job_resume,
    ("job", "run-now"): _job_run_now,
    ("job", "next"): _job_next,
    ("rule", "set"): _rule_set,
    ("rule", "get"): _rule_get,
    ("rule", "unset"): _rule_unset,
    ("rule", "list"): _rule_list,
    ("watch", None): _watch,
    ("info", None): _info,
}


# -- output ---------------------------------------------------------------------------------


class _Output:
    """Results as text lines or JSON documents on one stream, flushed as they come."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self._stream = stream
        self._json = as_json

    def result(self, text: str, document: object) -> None:
        """One result: its text, or one indented JSON document."""
        self._write(json.dumps(document, indent=2, ensure_ascii=False) if self._json else text)

    def results(self, items: Iterable[tuple[str, object]]) -> None:
        """A list: a text line per item, or one JSON array written as the items come."""
        if not self._json:
            for text, _ in items:
                self._write(text)
            return
        opened = False
        for _, document in items:
            self._stream.write(",\n  " if opened else "[\n  ")
            self._stream.write(json.dumps(document, ensure_ascii=False))
            opened = True
        self._write("\n]" if opened else "[]")

    def event(self, text: str, document: object) -> None:
        """One line of a stream: its text, or one compact JSON object (JSON Lines)."""
        self._write(json.dumps(document, ensure_ascii=False) if self._json else text)

    def _write(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()  # watch lines must show up while the command runs


# Control characters (a job id may hold any UTF-8, terminal escapes included) are
# written as escapes in text output, so that each result stays one line of
# tab-separated fields and nothing reaches the terminal as a command.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    ord("\\"): "\\\\",
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
}


def _text(value: str) -> str:
    return value.translate(_ESCAPES)


def _job_line(job: pb.Job) -> str:
    """id, status, execute_at (UTC, the text protocol's form), attempts=N, the schedule
    of a recurring job, then extras."""
    fields = [
        _text(job.id),
        _enum_name(pb.JobStatus, job.status, "JOB_STATUS_"),
        format_time(_micros(job.execute_at), sep=" ", zone="", fraction=False),
        f"attempts={job.attempts}",
    ]
    if job.HasField("schedule"):
        fields.extend(_schedule_fields(job.schedule))
    if job.last_outcome:
        fields.append(f"outcome={_text(job.last_outcome)}")
    if job.payload:
        ((key, value),) = _payload(job.payload).items()  # payload= or payload_base64=
        fields.append(f"{key}={_text(value)}")
    return "\t".join(fields)


def _job_document(job: pb.Job) -> dict[str, object]:
    return {
        "id": job.id,
        "status": _enum_name(pb.JobStatus, job.status, "JOB_STATUS_"),
        "execute_at": format_time(_micros(job.execute_at)),
        **_payload(job.payload),
        "attempts": job.attempts,
        "last_outcome": job.last_outcome,
        "updated_at": format_time(_micros(job.updated_at)) if job.HasField("updated_at") else None,
        "schedule": _schedule_document(job.schedule) if job.HasField("schedule") else None,
    }


def _schedule_fields(schedule: pb.Schedule) -> list[str]:
    """schedule=, tz=, runs= always; the rest where it is not the default."""
    fields = [
        f"schedule={_text(schedule.expression)}",
        f"tz={_text(schedule.time_zone or 'UTC')}",
        f"runs={schedule.runs}",
    ]
    if schedule.paused:
        fields.append("paused=true")
    if schedule.skipped:
        fields.append(f"skipped={schedule.skipped}")
    if schedule.HasField("scheduled_at"):
        at = format_time(_micros(schedule.scheduled_at), sep=" ", zone="", fraction=False)
        fields.append(f"scheduled_at={at}")
    for name in ("start", "end"):
        if schedule.HasField(name):
            at = format_time(_micros(getattr(schedule, name)), sep=" ", zone="", fraction=False)
            fields.append(f"{name}={at}")
    if schedule.max_runs:
        fields.append(f"max_runs={schedule.max_runs}")
    if schedule.HasField("jitter"):
        fields.append(f"jitter={_seconds_text(schedule.jitter)}")
    misfire = _enum_name(pb.MisfirePolicy, schedule.misfire, "MISFIRE_POLICY_")
    if misfire not in ("unspecified", "coalesce"):
        fields.append(f"misfire={misfire}")
    if schedule.HasField("catchup_window"):
        fields.append(f"catchup_window={_seconds_text(schedule.catchup_window)}")
    overlap = _enum_name(pb.OverlapPolicy, schedule.overlap, "OVERLAP_POLICY_")
    if overlap not in ("unspecified", "skip"):
        fields.append(f"overlap={overlap}")
    return fields


def _schedule_document(schedule: pb.Schedule) -> dict[str, object]:
    """Times as RFC 3339 (null: unset), durations in seconds, policies by name."""

    def time(name: str) -> str | None:
        return format_time(_micros(getattr(schedule, name))) if schedule.HasField(name) else None

    def seconds(name: str) -> float | None:
        if not schedule.HasField(name):
            return None
        value: Duration = getattr(schedule, name)
        return value.seconds + value.nanos / 1e9

    misfire = _enum_name(pb.MisfirePolicy, schedule.misfire, "MISFIRE_POLICY_")
    overlap = _enum_name(pb.OverlapPolicy, schedule.overlap, "OVERLAP_POLICY_")
    return {
        "expression": schedule.expression,
        "time_zone": schedule.time_zone or "UTC",
        "start": time("start"),
        "end": time("end"),
        "max_runs": schedule.max_runs or None,
        "jitter_s": seconds("jitter") or 0.0,
        "misfire": "coalesce" if misfire == "unspecified" else misfire,
        "catchup_window_s": seconds("catchup_window"),
        "overlap": "skip" if overlap == "unspecified" else overlap,
        "paused": schedule.paused,
        "runs": schedule.runs,
        "skipped": schedule.skipped,
        "scheduled_at": time("scheduled_at"),
    }


def _seconds_text(duration: Duration) -> str:
    """A duration as seconds, exact to the microsecond: 30s, 1.5s, 0.000001s."""
    us = duration.seconds * MICROS + duration.nanos // 1000
    whole, fraction = divmod(us, MICROS)
    return f"{whole}s" if not fraction else f"{whole}.{fraction:06d}".rstrip("0") + "s"


def _payload(payload: bytes) -> dict[str, str]:
    """{"payload": text} when the bytes are UTF-8, else {"payload_base64": base64}."""
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_base64": base64.b64encode(payload).decode("ascii")}


def _rule_line(rule: pb.Rule) -> str:
    """id, pattern, runner kind and arguments, then the policy where it is not the default."""
    runner = _runner_document(rule)
    fields = [rule.id, rule.pattern, *(str(value) for value in runner.values())]
    policy = _policy_document(rule.policy)
    if policy["timeout_s"] is not None:
        fields.append(f"timeout={policy['timeout_s']:g}s")
    if policy["max_attempts"] != 1:  # the backoff only matters with retries
        fields.append(f"max_attempts={policy['max_attempts']}")
        fields.append(f"backoff={policy['backoff_initial_s']:g}s..{policy['backoff_max_s']:g}s")
    if policy["stale_after_s"] is not None:
        fields.append(f"stale_after={policy['stale_after_s']:g}s")
    return "\t".join(map(_text, fields))


def _rule_document(rule: pb.Rule) -> dict[str, object]:
    return {
        "id": rule.id,
        "pattern": rule.pattern,
        "runner": _runner_document(rule),
        "policy": _policy_document(rule.policy),
    }


def _runner_document(rule: pb.Rule) -> dict[str, str]:
    kind = rule.WhichOneof("runner")
    if kind == "shell":
        return {"kind": kind, "command": rule.shell.command}
    if kind == "amqp":
        amqp = rule.amqp
        return {
            "kind": kind,
            "dsn": amqp.dsn,
            "exchange": amqp.exchange,
            "routing_key": amqp.routing_key,
        }
    if kind == "http":
        return {"kind": kind, "url": rule.http.url}
    return {"kind": kind or ""}  # a runner this client does not know yet


def _policy_document(policy: pb.RulePolicy) -> dict[str, Any]:
    """Seconds as floats; unset fields as the server applies them (its defaults)."""

    def seconds(name: str) -> float | None:
        if not policy.HasField(name):
            return None
        value: Duration = getattr(policy, name)
        return value.seconds + value.nanos / 1e9

    return {
        "timeout_s": seconds("timeout"),
        "max_attempts": policy.max_attempts or DEFAULT_POLICY.max_attempts,
        "backoff_initial_s": seconds("backoff_initial") or DEFAULT_POLICY.backoff_initial_s,
        "backoff_max_s": seconds("backoff_max") or DEFAULT_POLICY.backoff_max_s,
        "stale_after_s": seconds("stale_after"),
    }


# -- conversions ------------------------------------------------------------------------------


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """JOB_STATUS_PLANNED -> "planned"; a number this client does not know stays a number."""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _micros(ts: Timestamp) -> int:
    return ts.seconds * MICROS + ts.nanos // 1000


def _timestamp(us: int) -> Timestamp:
    seconds, micros = divmod(us, MICROS)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def _span(us: int) -> Duration:
    seconds, micros = divmod(us, MICROS)
    return Duration(seconds=seconds, nanos=micros * 1000)


def _duration(seconds: float) -> Duration:
    whole, nanos = divmod(round(seconds * 1e9), 10**9)
    return Duration(seconds=whole, nanos=nanos)


def _count(n: int, noun: str) -> str:
    """1 argument, 3 arguments."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
