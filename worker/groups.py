"""Group commit: the batches that several lanes of one worker fetched at about the
same time, applied in one transaction.

At a steady rate each lane fetches a few events at a time, and a transaction's
cost is mostly fixed (its round trips, its commit, the Python around them). A
lane waiting for a turn used to wait for the other lanes' transactions one after
the other (docs/performance.md). Here the first lane to arrive leads a group:
it waits for a turn (`Turns`), every lane that arrives meanwhile joins, and the
leader applies all their batches in one transaction on its own connection; each
lane then settles its own messages. The lanes' sessions are disjoint (a session
belongs to one partition), so the batches do not interact beyond sharing a
transaction.

Why this keeps the guarantees, although a member's events commit through the
leader's connection and not through the one holding the member's lane lock:
the ledger and the session row locks, not the lane lock, make a batch apply once
and in order. Should a member's lane be taken over meanwhile, its next owner
re-fetches the same unacked messages, waits on the group's session row locks,
and finds them in the ledger after the group commits (or applies them itself
and the group's ledger insert comes up short: `db.LedgerConflict`, redone one
by one); the case of an owner that resumes after a hang, which the lanes
already handle (docs/architecture.md).

What a group must not do is tie its members' fates together: a group that
fails, for whatever reason, fails as `GroupFailed` for every member, and each
applies its own batch alone, as without groups; and a group that has not
committed after `alone_after` seconds (one member's sessions locked by someone
else, a statement waiting out a lock) is cancelled and split the same way, so
that a lane waiting on a lock holds up its group mates for no longer than that.
A group holds at most `most` messages. A batch that is full by itself (a
drain; every batch with HUB_BATCH_MAX=1) goes alone and at once: a turn is
for a batch to grow while it waits, and a full one cannot. The others go in
groups one group at a time (`one_group`, a turn of its own, as bounded as the
rest): while a group commits, the next one forms, so at a steady rate a
message waits for at most the transaction before its own, while full batches
overlap with each other and with the groups, which is what keeps a drain's
cores busy (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

C = TypeVar("C")  # the leader's connection
M = TypeVar("M")  # a message of a batch
H = TypeVar("H")  # what became of it


class Turns(Protocol):
    """worker.lanes.Turnstile: a bounded wait for one of a few turns (False: none came)."""

    async def acquire(self) -> bool: ...

    def release(self) -> None: ...


class GroupFailed(Exception):
    """The group's transaction did not commit: apply your batch alone."""


@dataclass
class _Member(Generic[M, H]):
    messages: list[M]
    done: asyncio.Future[list[H]]


@dataclass
class _Group(Generic[M, H]):
    members: list[_Member[M, H]] = field(default_factory=list)
    size: int = 0


class CommitGroups(Generic[C, M, H]):
    """Forms groups of lane batches and applies each group in one transaction."""

    def __init__(
        self,
        turns: Turns,
        one_group: Turns,
        most: int,
        alone_after: float,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self.turns = turns
        self.one_group = one_group
        self.most = most
        self.alone_after = alone_after
        # Told the outcome of every group of several batches: "committed" or "split".
        self.observe = observe
        # The group whose leader waits for a turn: lanes arriving now join it.
        self._forming: _Group[M, H] | None = None
        self.grouped = 0  # groups of more than one batch, applied together
        self.split = 0  # groups that failed or ran out of time: each member alone

    def __repr__(self) -> str:
        return f"<CommitGroups grouped={self.grouped} split={self.split}>"

    async def apply(
        self,
        conn: C,
        messages: list[M],
        commit: Callable[[C, list[M]], Awaitable[list[H]]],
    ) -> list[H]:
        """`commit(conn, messages)`, alone or together with other lanes' batches.

        Raises GroupFailed when applied in a group that did not commit; otherwise
        what `commit` returns or raises for these messages alone."""
        if len(messages) >= self.most:
            # A turn is for a batch to grow while it waits; a full one cannot,
            # and the transactions of full batches in flight together are what
            # keep a drain's two cores busy (docs/performance.md).
            return await commit(conn, messages)
        forming = self._forming
        if forming is not None and forming.size + len(messages) <= self.most:
            member: _Member[M, H] = _Member(messages, asyncio.get_running_loop().create_future())
            forming.members.append(member)
            forming.size += len(messages)
            return await member.done
        group: _Group[M, H] = _Group(size=len(messages))
        self._forming = group
        grouped = held = False
        try:
            grouped = await self.one_group.acquire()
            held = await self.turns.acquire()
        except BaseException:
            self._close(group)
            _fail(group.members, "the group's leader was cancelled")
            self._release(grouped, held)
            raise
        try:
            self._close(group)
            if not group.members:
                return await commit(conn, messages)
            return await self._commit_together(conn, messages, group, commit)
        finally:
            self._release(grouped, held)

    def _release(self, grouped: bool, held: bool) -> None:
        if held:
            self.turns.release()
        if grouped:
            self.one_group.release()

    def _close(self, group: _Group[M, H]) -> None:
        if self._forming is group:
            self._forming = None

    async def _commit_together(
        self,
        conn: C,
        own: list[M],
        group: _Group[M, H],
        commit: Callable[[C, list[M]], Awaitable[list[H]]],
    ) -> list[H]:
        self.grouped += 1
        everything = own + [m for member in group.members for m in member.messages]
        try:
            async with asyncio.timeout(self.alone_after):
                outcomes = await commit(conn, everything)
        except BaseException as err:
            self.split += 1
            if self.observe is not None:
                self.observe("split")
            reason = (
                f"not committed within {self.alone_after} s"
                if isinstance(err, TimeoutError)
                else f"{type(err).__name__}: {err}"
            )
            _fail(group.members, reason)
            if isinstance(err, asyncio.CancelledError):
                raise
            raise GroupFailed(reason) from err
        if self.observe is not None:
            self.observe("committed")
        at = len(own)
        for member in group.members:
            # A member cancelled meanwhile (its worker stopping) does not settle its
            # messages: redelivered, the ledger finds them applied.
            if not member.done.done():
                member.done.set_result(outcomes[at : at + len(member.messages)])
            at += len(member.messages)
        return outcomes[: len(own)]


def _fail(members: list[_Member[M, H]], reason: str) -> None:
    for member in members:
        if not member.done.done():
            member.done.set_exception(GroupFailed(reason))
