"""Checks of client input that both protocols share, done once in the core.

What may be in an id, a pattern, a command or a URL, and the bounds of every
rule policy value, live here as named constants. The KCP and gRPC front ends,
the configuration's `[policy]` table and the command actor all call these
functions, so a value refused by one is refused by all, with the same reason.
Each check raises CommandError(INVALID_ARGUMENT, reason).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from urllib.parse import urlsplit

from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.model import (
    DEFAULT_POLICY,
    MAX_JOB_ID_BYTES,
    MAX_TIME_US,
    MIN_TIME_US,
    AmqpRunner,
    HttpRunner,
    Rule,
    RulePolicy,
    RunnerSpec,
    ShellRunner,
)

# -- policy bounds ---------------------------------------------------------------

# Tries in all, the first included.
MAX_ATTEMPTS = 1000
# Every policy duration (timeout, backoff, staleness): 100 years of 365 days.
# A retry planned this far ahead of any real clock stays inside year 9999.
MAX_POLICY_SECONDS = 100 * 365 * 86_400
_MAX_POLICY_TEXT = f"{MAX_POLICY_SECONDS:,} s (100 years)"

# -- ids, patterns, commands, URLs -------------------------------------------------

# NUL can never reach a process (argv and the environment are C strings), so a
# shell runner could never deliver such an id: it is refused everywhere, at input.
NUL = "\x00"
# A shell command is one argv element; at most as long as an id.
MAX_COMMAND_BYTES = MAX_JOB_ID_BYTES
# AMQP 0-9-1 exchange names and routing keys are short strings.
MAX_SHORTSTR_BYTES = 255
# Control characters in a URL: no HTTP client sends them, no broker URL holds them
# (urlsplit silently drops some, which would hide them from the other checks).
_URL_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A client's value quoted in an error message is cut to this many characters: a
# 65,535-byte id echoed whole made gRPC's status trailer exceed its size limit.
MAX_SHOWN_CHARS = 200


def shown(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`value` quoted for an error message (its repr), cut after `limit` characters
    with a marker saying how many more there were: `'aaa'... (65335 more characters)`."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value) - limit} more characters)"


def invalid(message: str) -> CommandError:
    return CommandError(ErrorCode.INVALID_ARGUMENT, message)


def check_id(value: str, what: str, *, allow_empty: bool = False) -> None:
    """An id, rule id or pattern: 1..MAX_JOB_ID_BYTES bytes of UTF-8, no NUL.

    The byte count is only computed for strings that could exceed it (a str of
    n characters encodes to at most 4n bytes): this runs for every SetJob.
    """
    if not value:
        if allow_empty:
            return
        raise invalid(f"{what} must not be empty")
    if len(value) > MAX_JOB_ID_BYTES // 4 and len(value.encode()) > MAX_JOB_ID_BYTES:
        raise invalid(f"{what} is longer than {MAX_JOB_ID_BYTES} bytes")
    if NUL in value:
        raise invalid(f"{what} must not contain the NUL character (U+0000)")


def check_prefix(value: str, what: str = "prefix") -> None:
    """A prefix of ids (ListJobs, ListRules, WatchJobs): "" (all) or what an id may
    hold, at most MAX_JOB_ID_BYTES bytes of UTF-8 and no NUL. A longer one could
    match nothing, and a watch would keep it for as long as it lasts.

    Raises CommandError INVALID_ARGUMENT."""
    check_id(value, what, allow_empty=True)


def validate_job(
    job_id: str, payload: bytes, max_payload_bytes: int, execute_at: int | None = None
) -> None:
    """A job as a client sets it; execute_at (microseconds since the epoch) is
    checked against the supported time range when given.

    Runs for every SetJob, hence the checks inlined for the common case.
    """
    if not job_id or NUL in job_id or len(job_id) > MAX_JOB_ID_BYTES // 4:
        check_id(job_id, "job id")
    if len(payload) > max_payload_bytes:
        raise invalid(f"payload is larger than {max_payload_bytes} bytes")
    if execute_at is not None and not MIN_TIME_US <= execute_at <= MAX_TIME_US:
        raise invalid("execute_at is outside the supported range 0001-01-01 to 9999-12-31")


def check_shell_command(command: str, allowed: Collection[str] = ()) -> None:
    """A shell rule's command: 1..MAX_COMMAND_BYTES bytes, no NUL, not an option
    to `sh` (a leading "-" or "+"), and one of `allowed` when that is not empty.

    Checked when a rule is set, and `allowed` again by the shell runner before
    each run: a rule stored before the list was configured must not run.
    """
    if not command:
        raise invalid("shell command must not be empty")
    if len(command) > MAX_COMMAND_BYTES // 4 and len(command.encode()) > MAX_COMMAND_BYTES:
        raise invalid(f"shell command is longer than {MAX_COMMAND_BYTES} bytes")
    if NUL in command:
        raise invalid("shell command must not contain the NUL character (U+0000)")
    if command[0] in "-+":
        # Kairoi ran `sh <command> <job_id>`: `-c` made sh run the job id as shell code.
        sign = command[0]
        raise invalid(
            f"shell command {shown(command)} starts with {sign!r}: sh would take it for an "
            f"option, not a script (write ./{sign}name for a script named {sign}name)"
        )
    check_allowed_command(command, allowed)


def check_allowed_command(command: str, allowed: Collection[str]) -> None:
    """`command` is in `allowed` ([runners.shell] allowed_commands), or that is empty."""
    if allowed and command not in allowed:
        raise invalid(
            f"shell command {shown(command)} is not in the allowed list "
            "([runners.shell] allowed_commands)"
        )


def check_attempts(value: int, name: str) -> None:
    """max_attempts: 1..MAX_ATTEMPTS."""
    if isinstance(value, bool) or not 1 <= value <= MAX_ATTEMPTS:
        raise invalid(f"{name} must be from 1 to {MAX_ATTEMPTS}, not {value!r}")


def check_seconds(value: float, name: str, *, positive: bool = False) -> None:
    """A policy duration in seconds: finite, 0 (or more than 0 when `positive`)
    up to MAX_POLICY_SECONDS."""
    low_ok = value > 0 if positive else value >= 0
    if not (math.isfinite(value) and low_ok and value <= MAX_POLICY_SECONDS):
        low = "more than 0" if positive else "from 0"
        raise invalid(f"{name} must be {low} to {_MAX_POLICY_TEXT}, not {value!r}")


def check_policy(policy: RulePolicy, prefix: str = "policy.") -> None:
    """Every value of a policy within its bounds; names in errors are `prefix`
    followed by RulePolicy's field name (the configuration's key)."""
    check_attempts(policy.max_attempts, f"{prefix}max_attempts")
    if policy.timeout_s is not None:
        check_seconds(policy.timeout_s, f"{prefix}timeout_s", positive=True)
    check_seconds(policy.backoff_initial_s, f"{prefix}backoff_initial_s")
    check_seconds(policy.backoff_max_s, f"{prefix}backoff_max_s")
    if policy.stale_after_s is not None:
        check_seconds(policy.stale_after_s, f"{prefix}stale_after_s")


class RuleValidator:
    """Validates rules; `allowed_commands`, when not empty, is the only shell
    commands a rule may run (a client that can set rules can otherwise run any
    command on the server)."""

    def __init__(
        self,
        allowed_commands: Sequence[str] = (),
        default_policy: RulePolicy = DEFAULT_POLICY,
        runner_checks: Mapping[str, Callable[[RunnerSpec], None]] | None = None,
    ) -> None:
        """runner_checks: by runner kind, the runner's own check of a rule's spec
        (raises ValueError with the reason), e.g. the AMQP runner's DSN options;
        the core knows no runner, so the app passes them in."""
        self.allowed_commands = frozenset(allowed_commands)
        self.default_policy = default_policy
        self.runner_checks = dict(runner_checks or {})

    def with_default_policy(self, rule: Rule) -> Rule:
        """A rule that brings no policy of its own gets the configured default."""
        if rule.policy == DEFAULT_POLICY and self.default_policy != DEFAULT_POLICY:
            return replace(rule, policy=self.default_policy)
        return rule

    def __call__(self, rule: Rule) -> None:
        check_id(rule.id, "rule id")
        check_id(rule.pattern, "pattern", allow_empty=True)  # "": a catch-all rule
        runner = rule.runner
        if isinstance(runner, ShellRunner):
            check_shell_command(runner.command, self.allowed_commands)
        elif isinstance(runner, AmqpRunner):
            check_url(runner.dsn, ("amqp", "amqps"), "amqp dsn")
            for what, name in (("exchange", runner.exchange), ("routing key", runner.routing_key)):
                if len(name.encode()) > MAX_SHORTSTR_BYTES:
                    raise invalid(f"amqp {what} is longer than {MAX_SHORTSTR_BYTES} bytes")
        elif isinstance(runner, HttpRunner):
            check_url(runner.url, ("http", "https"), "http url")
        else:
            raise invalid(f"unknown runner {runner!r}")
        runner_check = self.runner_checks.get(runner.kind)
        if runner_check is not None:
            try:
                runner_check(runner)
            except ValueError as error:
                raise invalid(str(error)) from None
        check_policy(rule.policy)


def check_url(url: str, schemes: tuple[str, ...], what: str) -> None:
    if _URL_CONTROL.search(url):
        raise invalid(f"{what} must not contain control characters: {shown(url)}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise invalid(f"{what} {shown(url)} is not a valid URL: {e}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise invalid(f"{what} must look like {schemes[0]}://host..., not {shown(url)}")
