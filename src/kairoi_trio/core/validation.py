"""Checks of client input that both protocols share, done once in the core."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from urllib.parse import urlsplit

from kairoi_trio.commands import CommandError, ErrorCode
from kairoi_trio.model import (
    DEFAULT_POLICY,
    MAX_JOB_ID_BYTES,
    AmqpRunner,
    HttpRunner,
    Rule,
    RulePolicy,
    ShellRunner,
)


def invalid(message: str) -> CommandError:
    return CommandError(ErrorCode.INVALID_ARGUMENT, message)


def validate_job(job_id: str, payload: bytes, max_payload_bytes: int) -> None:
    if not job_id:
        raise invalid("job id must not be empty")
    if len(job_id) > MAX_JOB_ID_BYTES // 4 and len(job_id.encode()) > MAX_JOB_ID_BYTES:
        raise invalid(f"job id is longer than {MAX_JOB_ID_BYTES} bytes")
    if len(payload) > max_payload_bytes:
        raise invalid(f"payload is larger than {max_payload_bytes} bytes")


class RuleValidator:
    """Validates rules; `allowed_commands`, when not empty, is the only shell
    commands a rule may run (a client that can set rules can otherwise run any
    command on the server)."""

    def __init__(
        self, allowed_commands: Sequence[str] = (), default_policy: RulePolicy = DEFAULT_POLICY
    ) -> None:
        self.allowed_commands = frozenset(allowed_commands)
        self.default_policy = default_policy

    def with_default_policy(self, rule: Rule) -> Rule:
        """A rule that brings no policy of its own gets the configured default."""
        if rule.policy == DEFAULT_POLICY and self.default_policy != DEFAULT_POLICY:
            return replace(rule, policy=self.default_policy)
        return rule

    def __call__(self, rule: Rule) -> None:
        if not rule.id:
            raise invalid("rule id must not be empty")
        if (
            len(rule.id.encode()) > MAX_JOB_ID_BYTES
            or len(rule.pattern.encode()) > MAX_JOB_ID_BYTES
        ):
            raise invalid(f"rule id and pattern must be at most {MAX_JOB_ID_BYTES} bytes")
        runner = rule.runner
        if isinstance(runner, ShellRunner):
            if not runner.command:
                raise invalid("shell command must not be empty")
            if self.allowed_commands and runner.command not in self.allowed_commands:
                raise invalid(f"shell command {runner.command!r} is not in the allowed list")
        elif isinstance(runner, AmqpRunner):
            check_url(runner.dsn, ("amqp", "amqps"), "amqp dsn")
        elif isinstance(runner, HttpRunner):
            check_url(runner.url, ("http", "https"), "http url")
        else:
            raise invalid(f"unknown runner {runner!r}")
        policy = rule.policy
        if policy.max_attempts < 1:
            raise invalid("max_attempts must be at least 1")
        if policy.timeout_s is not None and policy.timeout_s <= 0:
            raise invalid("timeout must be positive")
        if policy.stale_after_s is not None and policy.stale_after_s < 0:
            raise invalid("stale_after must not be negative")
        if policy.backoff_initial_s < 0 or policy.backoff_max_s < 0:
            raise invalid("backoff must not be negative")


def check_url(url: str, schemes: tuple[str, ...], what: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise invalid(f"{what} {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise invalid(f"{what} must look like {schemes[0]}://host..., not {url!r}")
