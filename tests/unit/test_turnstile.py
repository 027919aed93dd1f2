"""Turns of the batch transaction among one worker's lanes (worker/lanes.py Turnstile)."""

from __future__ import annotations

import asyncio

from worker.lanes import Turnstile

# Far beyond any wait below: a waiter that is not bounded fails the test.
NEVER = 3600.0


async def test_no_more_turns_than_configured_are_held_and_a_release_hands_one_on() -> None:
    turnstile = Turnstile(2, wait_seconds=NEVER)
    assert await turnstile.acquire()
    assert await turnstile.acquire()
    third = asyncio.create_task(turnstile.acquire())
    await asyncio.sleep(0)
    assert not third.done()
    turnstile.release()
    assert await asyncio.wait_for(third, 5)


async def test_a_turn_held_for_good_holds_nobody_up_beyond_the_wait() -> None:
    turnstile = Turnstile(1, wait_seconds=0.01)
    assert await turnstile.acquire()  # never released: a lane waiting out a locked database
    assert await asyncio.wait_for(turnstile.acquire(), 5) is False
    assert turnstile.skipped == 1


async def test_turns_go_to_the_waiters_in_arrival_order_before_a_newcomer() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    assert await turnstile.acquire()
    order: list[str] = []

    async def lane(name: str) -> None:
        assert await turnstile.acquire()
        order.append(name)
        await asyncio.sleep(0)
        turnstile.release()

    first = asyncio.create_task(lane("first"))
    second = asyncio.create_task(lane("second"))
    await asyncio.sleep(0)
    turnstile.release()
    newcomer = asyncio.create_task(lane("newcomer"))
    await asyncio.wait_for(asyncio.gather(first, second, newcomer), 5)
    assert order == ["first", "second", "newcomer"]


async def test_a_waiter_cancelled_as_its_turn_came_passes_the_turn_on() -> None:
    turnstile = Turnstile(1, wait_seconds=NEVER)
    assert await turnstile.acquire()
    waiter = asyncio.create_task(turnstile.acquire())
    await asyncio.sleep(0)
    turnstile.release()  # handed to the waiter, which has not run yet
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert await asyncio.wait_for(turnstile.acquire(), 5)


async def test_a_waiter_whose_wait_ran_out_is_skipped_by_the_next_release() -> None:
    turnstile = Turnstile(1, wait_seconds=0.01)
    assert await turnstile.acquire()
    assert not await turnstile.acquire()  # gave up and went without a turn
    turnstile.release()
    assert await turnstile.acquire()  # the released turn was not handed to the gone waiter


async def test_no_limit_never_waits() -> None:
    turnstile = Turnstile(0, wait_seconds=NEVER)
    assert [await turnstile.acquire() for _ in range(3)] == [False, False, False]
    assert turnstile.waited == 0
