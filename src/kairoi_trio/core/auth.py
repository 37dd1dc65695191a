"""Tokens and roles: the one place every front end asks who may do what.

`[auth]` lists tokens by role:

    tokens         admin   everything: jobs, rules (a shell rule runs a command
                           on the server), reads and watches
    client_tokens  client  set, get and unset jobs; read rules and server info; watch
    read_tokens    read    get and list jobs and rules, server info, watch

With no token configured at all, there is no authentication and everyone is
admin (Kairoi's behaviour). A front end maps what a client presents (KCP
`AUTH <token>`, a gRPC `authorization: Bearer <token>`) to a Role with
`TokenTable.role_of`, then asks `permitted(role, command)` for each request:
permissions are by command type (commands.py), so KCP, gRPC and every later
front end grant exactly the same things.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kairoi_trio import commands as c

if TYPE_CHECKING:
    from kairoi_trio.config import AuthConfig


class Role(enum.Enum):
    """What a token may do; each role can do everything the roles below it can."""

    READ = "read"
    CLIENT = "client"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Role.READ: 0, Role.CLIENT: 1, Role.ADMIN: 2}

# The least role each command a client may send needs, and what it is called in a
# refusal. Commands not listed (the dispatcher's and runners' TriggerDue,
# RecordOutcome, ExpireFinished) are internal: no front end may send them.
_REQUIRED: dict[type, tuple[Role, str]] = {
    c.GetJob: (Role.READ, "read jobs"),
    c.ListJobs: (Role.READ, "list jobs"),
    c.GetRule: (Role.READ, "read rules"),
    c.ListRules: (Role.READ, "list rules"),
    c.MatchRule: (Role.READ, "read rules"),
    c.GetInfo: (Role.READ, "read server info"),
    c.Subscribe: (Role.READ, "watch jobs"),
    c.Unsubscribe: (Role.READ, "watch jobs"),
    c.SetJob: (Role.CLIENT, "set jobs"),
    c.DeleteJob: (Role.CLIENT, "unset jobs"),
    c.ScheduleJob: (Role.CLIENT, "schedule jobs"),
    c.PauseJob: (Role.CLIENT, "pause jobs"),
    c.ResumeJob: (Role.CLIENT, "resume jobs"),
    c.RunJobNow: (Role.CLIENT, "run jobs now"),
    c.PreviewJob: (Role.READ, "read jobs"),
    c.SetRule: (Role.ADMIN, "set rules"),
    c.DeleteRule: (Role.ADMIN, "unset rules"),
}

# Tokens travel in gRPC metadata and HTTP headers (visible ASCII only) and as a KCP
# argument; spaces would be cut by `Bearer <token>` parsers and shell quoting alike.
_TOKEN_CHARACTERS = frozenset(chr(code) for code in range(0x21, 0x7F))


def required_role(command: c.Command | type) -> Role | None:
    """The least role that may send `command` (a command or its type); None for
    internal commands, which no role may send."""
    kind = command if isinstance(command, type) else type(command)
    entry = _REQUIRED.get(kind)
    return entry[0] if entry is not None else None


def permitted(role: Role | None, command: c.Command | type) -> bool:
    """Whether a client holding `role` (None: not authenticated) may send `command`."""
    needed = required_role(command)
    return role is not None and needed is not None and role.rank >= needed.rank


def denial(role: Role | None, command: c.Command | type) -> str:
    """The one-line reason a front end answers when `permitted` is False.

    Always starts with "permission denied"; names the role held and the one needed,
    never the token.
    """
    kind = command if isinstance(command, type) else type(command)
    entry = _REQUIRED.get(kind)
    if entry is None:
        return "permission denied: this command is internal to the server"
    needed, what = entry
    held = "no token" if role is None else f"a {role.value} token"
    return f"permission denied: {held} may not {what} (needs {_article(needed)} token)"


def _article(role: Role) -> str:
    return f"an {role.value}" if role is Role.ADMIN else f"a {role.value}"


def check_tokens(admin: Sequence[str], client: Sequence[str], read: Sequence[str]) -> None:
    """Raise ValueError with a one-line reason for a token no front end can carry
    (empty, or not visible ASCII), or one listed under two roles. The reason names
    the list and the position, never the token."""
    seen: dict[str, str] = {}
    for name, tokens in (
        ("auth.tokens", admin),
        ("auth.client_tokens", client),
        ("auth.read_tokens", read),
    ):
        for index, token in enumerate(tokens):
            where = f"{name}[{index}]"
            if not token:
                raise ValueError(f"{where} is empty")
            if not _TOKEN_CHARACTERS.issuperset(token):
                raise ValueError(
                    f"{where} must be visible ASCII characters (no spaces, no control "
                    "or non-ASCII characters): it is sent in gRPC metadata and HTTP headers"
                )
            other = seen.setdefault(token, name)
            if other != name:
                raise ValueError(f"{where} is also in {other}: a token has one role")


class TokenTable:
    """Every configured token and its role; maps a presented token to a Role."""

    def __init__(
        self, admin: Iterable[str] = (), client: Iterable[str] = (), read: Iterable[str] = ()
    ) -> None:
        self._entries: list[tuple[bytes, Role]] = [
            (token.encode(), role)
            for tokens, role in ((admin, Role.ADMIN), (client, Role.CLIENT), (read, Role.READ))
            for token in tokens
        ]

    @classmethod
    def from_config(cls, auth: AuthConfig) -> TokenTable:
        return cls(auth.tokens, auth.client_tokens, auth.read_tokens)

    @property
    def required(self) -> bool:
        """Whether clients must present a token (any token is configured)."""
        return bool(self._entries)

    @property
    def anonymous(self) -> Role | None:
        """The role of a client that presented no token: admin when no token is
        configured (no authentication), else None."""
        return None if self._entries else Role.ADMIN

    def role_of(self, token: str | bytes) -> Role | None:
        """The role of `token`, None if it is not configured.

        Compared with every configured token in constant time (hmac.compare_digest),
        without stopping at the first match, so the time taken does not tell which
        token matched or how much of one a guess got right.
        """
        given = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
        found: Role | None = None
        for secret, role in self._entries:
            match = hmac.compare_digest(given, secret)
            found = role if match else found
        return found

    def role_of_bearer(self, value: str | bytes | None) -> Role | None:
        """The role of an `authorization` header or metadata value `Bearer <token>`
        (the scheme in any case, as RFC 7235 says); None if absent or not a token."""
        if value is None:
            return None
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        scheme, _, token = raw.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        return self.role_of(token.strip(b" "))
