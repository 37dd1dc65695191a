"""What a writer sent, what was acknowledged, and the check of what a restarted
server holds against it (pure: no sockets, no server).

A writer is one connection (KCP) or one sequential caller (gRPC). The server
applies a writer's requests in the order they were sent, and the log is
append-only, so after a crash the server holds the effect of a *prefix* of
each writer's operations: every operation up to some position P, and none
after it. P is at least the last acknowledged position (nothing acknowledged
may be lost). An operation whose answer never arrived may or may not be in
that prefix: both are fine.

`check` finds such a P for one writer, or says precisely what is wrong:
an acknowledged write that is missing or was overwritten by an older value,
a value nobody sent, or a state that no prefix explains (writes applied out
of order, or a later write kept while an earlier one was lost).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

# A key is ("job", id) or ("rule", id); a value is whatever the check reads
# back for it (a tuple), or None when it does not exist.
Key = tuple[str, str]
Value = Hashable | None


@dataclass(slots=True)
class Op:
    seq: int  # the position in the writer's send order (0, 1, 2, ...)
    key: Key
    value: Value  # the key's value once this operation is applied
    acked: bool = False


@dataclass
class History:
    """One writer's operations in one cycle (between two restarts)."""

    name: str
    base: dict[Key, Value] = field(default_factory=dict)  # state before the cycle
    ops: list[Op] = field(default_factory=list)

    def record(self, key: Key, value: Value) -> Op:
        op = Op(len(self.ops), key, value)
        self.ops.append(op)
        return op

    def believed(self, key: Key) -> Value:
        """The key's value once everything sent so far is applied."""
        for op in reversed(self.ops):
            if op.key == key:
                return op.value
        return self.base.get(key)

    def keys(self) -> set[Key]:
        return set(self.base) | {op.key for op in self.ops}

    @property
    def last_acked(self) -> int:
        """The position of the last acknowledged operation (-1: none)."""
        for op in reversed(self.ops):
            if op.acked:
                return op.seq
        return -1

    @property
    def acked_count(self) -> int:
        return sum(op.acked for op in self.ops)

    def next_cycle(self, observed: Mapping[Key, Value]) -> None:
        """Start a new cycle from the state the server was seen to hold."""
        self.base = {key: observed[key] for key in self.keys()}
        self.ops = []


@dataclass(frozen=True)
class Verdict:
    prefix: int  # the applied prefix found: operations 0..prefix are in (-1: none)
    applied_unacked: int  # operations past the last acknowledgement that made it


class HistoryError(AssertionError):
    pass


def check(history: History, observed: Mapping[Key, Value]) -> Verdict:
    """The applied prefix that explains `observed`, or HistoryError."""
    keys = history.keys()
    missing = keys - set(observed)
    if missing:
        raise HistoryError(f"{history.name}: keys not read back: {sorted(missing)[:5]}")
    last_acked = history.last_acked
    problems = []
    # Per key first: these are the plain messages (a lost acknowledged write).
    by_key: dict[Key, list[Op]] = {}
    for op in history.ops:
        by_key.setdefault(op.key, []).append(op)
    for key in sorted(keys):
        ops = by_key.get(key, [])
        seen = observed[key]
        acked = [op for op in ops if op.acked]
        allowed_from = acked[-1].seq if acked else -1
        candidates = [op for op in ops if op.seq >= allowed_from]
        if any(op.value == seen for op in candidates):
            continue
        if not acked and history.base.get(key) == seen:
            continue
        if acked:
            older = [op for op in ops if op.seq < allowed_from and op.value == seen]
            what = (
                f"an older write (#{older[-1].seq})"
                if older
                else ("the value before the cycle" if history.base.get(key) == seen else "")
            )
            problems.append(
                f"{key}: acknowledged write #{allowed_from} ({acked[-1].value!r}) lost; "
                f"the server holds {seen!r}" + (f", {what}" if what else ", which nobody sent")
            )
        else:
            problems.append(
                f"{key}: the server holds {seen!r}, which was never sent "
                f"(before the cycle: {history.base.get(key)!r}; sent: "
                f"{[op.value for op in ops][:3]!r}...)"
            )
    if problems:
        raise HistoryError(
            f"{history.name}: {len(problems)} key(s) wrong:\n  " + "\n  ".join(problems[:10])
        )
    # Then the whole writer: one prefix must explain every key at once. Walk
    # the operations, keeping the set of keys whose value differs from what
    # was observed; every position past the last acknowledgement where it is
    # empty is an applied prefix that fits.
    state = {key: history.base.get(key) for key in keys}
    mismatched = {key for key in keys if state[key] != observed[key]}
    fits = [-1] if last_acked < 0 and not mismatched else []
    for op in history.ops:
        state[op.key] = op.value
        if op.value == observed[op.key]:
            mismatched.discard(op.key)
        else:
            mismatched.add(op.key)
        if op.seq >= last_acked and not mismatched:
            fits.append(op.seq)
    if not fits:
        raise HistoryError(
            f"{history.name}: every key holds a value that was sent, but no prefix of the "
            f"writer's {len(history.ops)} operations (acknowledged up to #{last_acked}) "
            "explains them together: writes were applied out of order, or a later write "
            "survived an earlier one that was lost"
        )
    best = fits[-1]
    return Verdict(prefix=best, applied_unacked=max(0, best - last_acked))
