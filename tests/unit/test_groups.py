"""Group commit of the lanes' batches (worker/groups.py), with the lanes' Turnstile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from worker.groups import CommitGroups, GroupFailed
from worker.lanes import Turnstile

NEVER = 3600.0  # far beyond any wait below: a wait that is not bounded fails the test


class Database:
    """Stands in for the transaction: records each commit, answers per message."""

    def __init__(self) -> None:
        self.commits: list[list[str]] = []
        self.failing: Exception | None = None
        self.hang = False
        self.cancelled = 0

    async def commit(self, conn: str, messages: list[str]) -> list[str]:
        self.commits.append(list(messages))
        if self.hang:
            try:
                await asyncio.sleep(NEVER)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.failing is not None:
            raise self.failing
        return [f"{m}@{conn}" for m in messages]


OBSERVED: list[str] = []


def groups(
    turnstile: Turnstile, most: int = 10, alone_after: float = NEVER
) -> CommitGroups[str, str, str]:
    OBSERVED.clear()
    return CommitGroups(
        turnstile, Turnstile(1, wait_seconds=NEVER), most, alone_after, observe=OBSERVED.append
    )


async def arriving(
    g: CommitGroups[str, str, str],
    commit: Callable[[str, list[str]], Awaitable[list[str]]],
    **batches: list[str],
) -> list[asyncio.Task[list[str]]]:
    """Each lane's batch (keyed by its connection) handed to `g` in this order, each
    lane on its way before the next arrives; their tasks."""
    lanes = []
    for conn, messages in batches.items():
        lanes.append(asyncio.create_task(g.apply(conn, messages, commit)))
        await asyncio.sleep(0)
    return lanes


async def test_a_lone_batch_commits_alone_on_its_own_connection() -> None:
    database, g = Database(), groups(Turnstile(1, wait_seconds=NEVER))
    assert await g.apply("a", ["a1", "a2"], database.commit) == ["a1@a", "a2@a"]
    assert database.commits == [["a1", "a2"]]
    assert g.grouped == 0


async def test_batches_arriving_while_the_leader_waits_for_its_turn_commit_with_it() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile)
    assert await turnstile.acquire()  # another group's transaction is running
    leader, b, c = await arriving(g, database.commit, a=["a1"], b=["b1", "b2"], c=["c1"])
    assert database.commits == []
    turnstile.release()
    results = await asyncio.wait_for(asyncio.gather(leader, b, c), 5)
    # One transaction, on the leader's connection; each lane gets its own outcomes.
    assert database.commits == [["a1", "b1", "b2", "c1"]]
    assert list(results) == [["a1@a"], ["b1@a", "b2@a"], ["c1@a"]]
    assert g.grouped == 1
    assert OBSERVED == ["committed"]
    # The turn went back: the next batch does not wait.
    assert await asyncio.wait_for(g.apply("d", ["d1"], database.commit), 5) == ["d1@d"]


async def test_a_batch_that_would_make_the_group_too_big_leads_a_group_of_its_own() -> None:
    turnstile = Turnstile(2, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile, most=3)
    assert await turnstile.acquire()
    assert await turnstile.acquire()
    first, big = await arriving(g, database.commit, a=["a1", "a2"], b=["b1", "b2"])
    turnstile.release()
    turnstile.release()
    await asyncio.wait_for(asyncio.gather(first, big), 5)
    assert sorted(database.commits) == [["a1", "a2"], ["b1", "b2"]]


async def test_a_group_that_fails_fails_as_group_failed_for_every_member() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile)
    database.failing = RuntimeError("a poisoned event of lane b")
    assert await turnstile.acquire()
    leader, member = await arriving(g, database.commit, a=["a1"], b=["b1"])
    turnstile.release()
    outcomes = await asyncio.wait_for(asyncio.gather(leader, member, return_exceptions=True), 5)
    assert [type(o) for o in outcomes] == [GroupFailed, GroupFailed]
    assert "poisoned" in str(outcomes[1])
    assert g.split == 1
    assert OBSERVED == ["split"]
    # Alone, the same error is the batch's own, as without groups.
    with pytest.raises(RuntimeError, match="poisoned"):
        await g.apply("a", ["a1"], database.commit)


async def test_a_group_not_committed_in_time_is_cancelled_and_split() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile, alone_after=0.05)
    database.hang = True  # one member's sessions are locked by someone else
    assert await turnstile.acquire()
    leader, member = await arriving(g, database.commit, a=["a1"], b=["b1"])
    turnstile.release()
    outcomes = await asyncio.wait_for(asyncio.gather(leader, member, return_exceptions=True), 5)
    assert [type(o) for o in outcomes] == [GroupFailed, GroupFailed]
    assert database.cancelled == 1
    assert g.split == 1
    assert await asyncio.wait_for(turnstile.acquire(), 5)  # the turn was given back


async def test_a_lone_batch_is_never_cut_short() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile, alone_after=0.01)
    database.hang = True
    lone = asyncio.create_task(g.apply("a", ["a1"], database.commit))
    await asyncio.sleep(0.1)
    assert not lone.done()  # waiting out a lock alone holds nobody else up
    lone.cancel()
    await asyncio.gather(lone, return_exceptions=True)


async def test_a_leader_cancelled_before_its_turn_fails_its_members_and_leads_no_more() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile)
    assert await turnstile.acquire()
    leader, member = await arriving(g, database.commit, a=["a1"], b=["b1"])
    leader.cancel()
    outcomes = await asyncio.gather(leader, member, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert isinstance(outcomes[1], GroupFailed)
    turnstile.release()
    # The next batch leads a group of its own rather than joining the dead one.
    assert await asyncio.wait_for(g.apply("c", ["c1"], database.commit), 5) == ["c1@c"]
    assert database.commits == [["c1"]]


async def test_a_member_cancelled_while_its_group_commits_leaves_the_others_their_outcomes() -> (
    None
):
    turnstile = Turnstile(1, wait_seconds=NEVER)
    database, g = Database(), groups(turnstile)
    assert await turnstile.acquire()
    leader, gone, stays = await arriving(g, database.commit, a=["a1"], b=["b1"], c=["c1"])
    gone.cancel()
    turnstile.release()
    assert await asyncio.wait_for(leader, 5) == ["a1@a"]
    assert await asyncio.wait_for(stays, 5) == ["c1@a"]
    assert database.commits == [["a1", "b1", "c1"]]


async def test_one_group_commits_at_a_time_the_next_forms_meanwhile_and_full_batches_overlap() -> (
    None
):
    turnstile = Turnstile(2, wait_seconds=NEVER)
    g = groups(turnstile, most=2)
    gate = asyncio.Event()
    commits: list[list[str]] = []

    async def commit(conn: str, messages: list[str]) -> list[str]:
        commits.append(list(messages))
        if messages == ["a1"]:
            await gate.wait()  # the first group's transaction takes a while
        return messages

    first = asyncio.create_task(g.apply("a", ["a1"], commit))
    await asyncio.sleep(0)
    assert commits == [["a1"]]
    # A second turn is free, but partial batches wait for the group before theirs,
    # forming the next group meanwhile; a full batch goes at once.
    b = asyncio.create_task(g.apply("b", ["b1"], commit))
    await asyncio.sleep(0)
    c = asyncio.create_task(g.apply("c", ["c1"], commit))
    full = asyncio.create_task(g.apply("d", ["d1", "d2"], commit))
    await asyncio.wait_for(full, 5)
    assert commits == [["a1"], ["d1", "d2"]]
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, b, c), 5)
    assert commits == [["a1"], ["d1", "d2"], ["b1", "c1"]]


async def test_a_full_batch_goes_without_waiting_for_a_turn() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    assert await turnstile.acquire()  # the only turn, held by another lane's transaction
    g = groups(turnstile, most=2)
    database = Database()
    # Waiting would not make it larger; it overlaps with the one in its turn.
    assert await asyncio.wait_for(g.apply("a", ["a1", "a2"], database.commit), 5) == [
        "a1@a",
        "a2@a",
    ]
    partial = asyncio.create_task(g.apply("b", ["b1"], database.commit))
    await asyncio.sleep(0.05)
    assert not partial.done()  # a partial batch still waits for the turn
    turnstile.release()
    assert await asyncio.wait_for(partial, 5) == ["b1@b"]
