"""Client subcommands for people at a terminal, over gRPC:

    kairoi-trio job set ID "2026-12-01 09:00:00" [--payload TEXT]
    kairoi-trio job get ID | job unset ID | job list [--prefix P] [--status S]
    kairoi-trio rule set ID PATTERN shell CMD | amqp DSN EXCHANGE KEY | http URL
    kairoi-trio rule get ID | rule unset ID | rule list [--prefix P]
    kairoi-trio watch [--prefix P] [--snapshot]
    kairoi-trio info

The server address comes from --server or $KAIROI_SERVER (default
127.0.0.1:5679), the token from --token or $KAIROI_TOKEN. Times are UTC, in
the same form as the text protocol. Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import grpc

from kairoi.v1 import scheduler_pb2 as pb
from kairoi.v1 import scheduler_pb2_grpc as pb_grpc
from kairoi_trio.commands import CommandError
from kairoi_trio.model import AmqpRunner, HttpRunner, Rule, ShellRunner, Status
from kairoi_trio.protocols.grpc.convert import (
    micros_from_timestamp,
    rule_from_pb,
    rule_to_pb,
    timestamp_from_micros,
)
from kairoi_trio.protocols.kcp.instructions import format_time, parse_time, render

_CLIENT_COMMANDS = ("job", "rule", "watch", "info")
_STATUS_NAMES = {s.value: s for s in Status}


def add_client_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server", default=os.environ.get("KAIROI_SERVER", "127.0.0.1:5679"), help="gRPC address"
    )
    common.add_argument("--token", default=os.environ.get("KAIROI_TOKEN", ""))

    job = commands.add_parser("job", help="set, get, unset or list jobs").add_subparsers(
        dest="action", required=True
    )
    job_set = job.add_parser("set", parents=[common], help="plan a job")
    job_set.add_argument("id")
    job_set.add_argument("time", help='UTC, "Y-m-d H:i:s[.ffffff]"')
    job_set.add_argument("--payload", default="")
    for action in ("get", "unset"):
        job.add_parser(action, parents=[common]).add_argument("id")
    job_list = job.add_parser("list", parents=[common])
    job_list.add_argument("--prefix", default="")
    job_list.add_argument("--status", choices=sorted(_STATUS_NAMES))

    rule = commands.add_parser("rule", help="set, get, unset or list rules").add_subparsers(
        dest="action", required=True
    )
    rule_set = rule.add_parser("set", parents=[common], help="ID PATTERN shell|amqp|http ARGS...")
    rule_set.add_argument("id")
    rule_set.add_argument("pattern")
    rule_set.add_argument("runner", choices=("shell", "amqp", "http"))
    rule_set.add_argument("args", nargs="+")
    for action in ("get", "unset"):
        rule.add_parser(action, parents=[common]).add_argument("id")
    rule.add_parser("list", parents=[common]).add_argument("--prefix", default="")

    watch = commands.add_parser("watch", parents=[common], help="print job changes as they happen")
    watch.add_argument("--prefix", default="")
    watch.add_argument("--snapshot", action="store_true", help="start with the matching jobs")
    commands.add_parser("info", parents=[common], help="server version and counts")


def run_client_command(args: argparse.Namespace) -> int:
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    try:
        with grpc.insecure_channel(args.server) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            for line in _run(stub, args, metadata):
                print(line, flush=True)
    except grpc.RpcError as error:
        print(f"kairoi-trio: {error.code().name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except CommandError as error:
        print(f"kairoi-trio: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _run(stub: pb_grpc.SchedulerStub, args: argparse.Namespace, md: tuple) -> Iterator[str]:  # type: ignore[type-arg]
    command = (args.command, getattr(args, "action", None))
    if command == ("job", "set"):
        at = timestamp_from_micros(parse_time(args.time))
        stub.SetJob(
            pb.SetJobRequest(id=args.id, execute_at=at, payload=args.payload.encode()), metadata=md
        )
        yield "OK"
    elif command == ("job", "get"):
        yield _job_line(stub.GetJob(pb.GetJobRequest(id=args.id), metadata=md).job)
    elif command == ("job", "unset"):
        stub.DeleteJob(pb.DeleteJobRequest(id=args.id), metadata=md)
        yield "OK"
    elif command == ("job", "list"):
        wanted = f"JOB_STATUS_{args.status.upper()}" if args.status else "JOB_STATUS_UNSPECIFIED"
        token = ""
        while True:
            page = stub.ListJobs(
                pb.ListJobsRequest(prefix=args.prefix, status=wanted, page_token=token), metadata=md
            )
            yield from (_job_line(job) for job in page.jobs)
            token = page.next_page_token
            if not token:
                break
    elif command == ("rule", "set"):
        rule = Rule(args.id, args.pattern, _runner(args.runner, args.args))
        stub.SetRule(pb.SetRuleRequest(rule=rule_to_pb(rule)), metadata=md)
        yield "OK"
    elif command == ("rule", "get"):
        yield _rule_line(stub.GetRule(pb.GetRuleRequest(id=args.id), metadata=md).rule)
    elif command == ("rule", "unset"):
        stub.DeleteRule(pb.DeleteRuleRequest(id=args.id), metadata=md)
        yield "OK"
    elif command == ("rule", "list"):
        token = ""
        while True:
            page = stub.ListRules(
                pb.ListRulesRequest(prefix=args.prefix, page_token=token), metadata=md
            )
            yield from (_rule_line(rule) for rule in page.rules)
            token = page.next_page_token
            if not token:
                break
    elif args.command == "watch":
        request = pb.WatchJobsRequest(prefix=args.prefix, include_snapshot=args.snapshot)
        for response in stub.WatchJobs(request, metadata=md):
            for event in response.events:
                kind = pb.JobEventType.Name(event.type).removeprefix("JOB_EVENT_TYPE_").lower()
                yield f"{kind}\t{_job_line(event.job)}"
    elif args.command == "info":
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
        yield f"version\t{info.version}"
        yield f"started_at\t{format_time(micros_from_timestamp(info.started_at, 'started_at'))}"
        for name in _STATUS_NAMES:
            yield f"jobs.{name}\t{getattr(info.jobs, name)}"
        yield f"rules\t{info.rules}"


def _runner(kind: str, args: list[str]) -> ShellRunner | AmqpRunner | HttpRunner:
    expected = {"shell": 1, "amqp": 3, "http": 1}[kind]
    if len(args) != expected:
        raise SystemExit(f"kairoi-trio: a {kind} rule takes {expected} argument(s)")
    if kind == "shell":
        return ShellRunner(args[0])
    if kind == "amqp":
        return AmqpRunner(*args)
    return HttpRunner(args[0])


def _job_line(job: pb.Job) -> str:
    status = pb.JobStatus.Name(job.status).removeprefix("JOB_STATUS_").lower()
    at = format_time(micros_from_timestamp(job.execute_at, "execute_at"))
    fields = [job.id, status, at, f"attempts={job.attempts}"]
    if job.last_outcome:
        fields.append(f"outcome={job.last_outcome}")
    if job.payload:
        fields.append(f"payload={job.payload.decode('utf-8', 'replace')}")
    return "\t".join(fields)


def _rule_line(rule: pb.Rule) -> str:
    return "\t".join((rule.id, *render(rule_from_pb(rule))))
