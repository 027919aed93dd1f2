"""A lane's standing pull (worker.bus.StandingPull) against a real nats-server.

Each test has a stream and an `all`-ack consumer of its own, as a lane has.
Pull requests are counted by listening on the consumer's JetStream API subject
(a plain subscription there sees every request the client sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

import worker.bus
from worker.bus import StandingPull
from worker.embedded import EmbeddedNats

BATCH_MAX = 20  # ahead: 40 messages


class Consumer:
    def __init__(self, nc: NATS, stream: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.stream = stream
        self.subject = f"{stream}.events"
        self.requests: list[dict[str, object]] = []

    async def setup(self) -> None:
        await self.js.add_stream(name=self.stream, subjects=[f"{self.stream}.>"])
        await self.js.add_consumer(
            self.stream,
            ConsumerConfig(durable_name="lane", ack_policy=AckPolicy.ALL, ack_wait=30),
        )

    async def count_requests(self) -> None:
        async def noted(msg: Msg) -> None:
            self.requests.append(json.loads(msg.data))

        await self.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.lane", cb=noted)
        await self.nc.flush()

    async def pull(self) -> StandingPull:
        return StandingPull(await self.js.pull_subscribe_bind("lane", self.stream), BATCH_MAX)

    async def publish(self, count: int) -> None:
        for n in range(count):
            await self.js.publish(self.subject, str(n).encode())

    async def take_all(self, pull: StandingPull, count: int, within: float = 10) -> list[Msg]:
        taken: list[Msg] = []
        deadline = time.monotonic() + within
        while len(taken) < count:
            assert time.monotonic() < deadline, f"took {len(taken)} of {count}"
            try:
                batch = await pull.take(BATCH_MAX)
            except TimeoutError:
                continue
            assert len(batch) <= BATCH_MAX
            taken += batch
            await batch[-1].ack()
        return taken


@pytest.fixture
async def consumer(nats_url: str) -> AsyncIterator[Consumer]:
    nc = await nats.connect(nats_url)
    made = Consumer(nc, f"SP{uuid4().hex[:10]}")
    await made.setup()
    try:
        yield made
    finally:
        await made.js.delete_stream(made.stream)
        await nc.close()


def _buffered_messages(pull: StandingPull) -> int:
    """Messages in the client's queue, not counting the server's statuses."""
    queue = pull._subscription._sub._pending_queue
    return sum(not JetStreamContext.is_status_msg(m) for m in queue._queue)  # type: ignore[attr-defined]


async def _first_take_times_out(pull: StandingPull) -> None:
    with pytest.raises(TimeoutError):
        await pull.take(BATCH_MAX)


async def test_a_trickle_is_taken_without_a_pull_request_per_batch(consumer: Consumer) -> None:
    await consumer.count_requests()
    pull = await consumer.pull()
    await _first_take_times_out(pull)  # the pull is standing now
    assert len(consumer.requests) == 1
    for n in range(6):
        await consumer.publish(1)
        (msg,) = await pull.take(BATCH_MAX)
        assert msg.metadata.sequence.stream == n + 1
        await msg.ack()
    assert len(consumer.requests) == 1, consumer.requests
    assert consumer.requests[0]["batch"] == 2 * BATCH_MAX


async def test_a_backlog_is_buffered_no_further_than_ahead(consumer: Consumer) -> None:
    await consumer.publish(500)
    await consumer.count_requests()
    pull = await consumer.pull()
    first = await pull.take(BATCH_MAX)
    await asyncio.sleep(0.3)  # let whatever was asked for arrive
    buffered = _buffered_messages(pull)
    # The first take takes what has come so far; it tops up only once half of
    # what is held ahead has been taken. Everything asked for has come.
    assert buffered == pull.outstanding <= 2 * BATCH_MAX
    assert len(first) + buffered >= 2 * BATCH_MAX
    await first[-1].ack()
    rest = await consumer.take_all(pull, 500 - len(first))
    sequences = [m.metadata.sequence.stream for m in first + rest]
    assert sequences == list(range(1, 501))
    # A full batch taken is one top-up: never more than one request per batch.
    assert len(consumer.requests) <= 500 // BATCH_MAX + 1, len(consumer.requests)
    assert all(r["batch"] <= 2 * BATCH_MAX for r in consumer.requests)
    # Every request was served in full (a "Batch Completed" 409 each) but for
    # what is still open: the model asked for no message twice.
    asked = sum(int(r["batch"]) for r in consumer.requests)  # type: ignore[call-overload]
    assert asked <= 500 + 2 * BATCH_MAX, asked


async def test_expired_requests_are_renewed(
    consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.bus, "PULL_EXPIRES_SECONDS", 0.3)
    await consumer.count_requests()
    pull = await consumer.pull()
    for _ in range(2):
        await _first_take_times_out(pull)  # 2 s: several requests expire meanwhile
    assert len(consumer.requests) >= 3, consumer.requests
    await consumer.publish(3)
    assert len(await consumer.take_all(pull, 3, within=2)) == 3


async def test_requests_lost_with_a_killed_server_are_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long-lived requests: only the reconnect can tell that they are gone.
    monkeypatch.setattr(worker.bus, "PULL_EXPIRES_SECONDS", 60.0)
    server = EmbeddedNats(tmp_path / "nats")
    url = server.start()
    nc = await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        consumer = Consumer(nc, "RESTART")
        await consumer.setup()
        pull = await consumer.pull()
        await _first_take_times_out(pull)
        # Killed, it cannot announce (409) that the requests are gone, as a
        # server shutting down does: the client sees only the reconnect.
        server.kill()
        await asyncio.sleep(0.5)
        server.start()  # same port and store: the consumer survives, its waiting requests do not

        async def reconnected() -> bool:
            return nc.is_connected

        deadline = time.monotonic() + 10
        while not await reconnected():
            assert time.monotonic() < deadline, "no reconnect"
            await asyncio.sleep(0.05)
        await consumer.publish(1)
        assert len(await consumer.take_all(pull, 1, within=10)) == 1
    finally:
        await nc.close()
        server.stop()


async def test_a_deleted_consumer_is_raised_for_the_lane_to_repair(consumer: Consumer) -> None:
    pull = await consumer.pull()
    await consumer.publish(1)
    assert len(await pull.take(BATCH_MAX)) == 1
    await consumer.js.delete_consumer(consumer.stream, "lane")
    started = time.monotonic()

    async def until_raised() -> None:
        while time.monotonic() - started < 5:
            with contextlib.suppress(TimeoutError):
                await pull.take(BATCH_MAX)

    with pytest.raises(nats.js.errors.ServiceUnavailableError):
        await until_raised()
    # Not after its request expired (PULL_EXPIRES_SECONDS and the grace).
    assert time.monotonic() - started < 3, "the lane learnt of it only by waiting"


async def test_closing_gives_back_what_is_buffered(consumer: Consumer) -> None:
    await consumer.publish(30)
    pull = await consumer.pull()
    first: list[Msg] = []
    while len(first) < 5:  # a take takes what has come so far
        first += await pull.take(5 - len(first))
    await first[-1].ack()
    await asyncio.sleep(0.3)
    assert _buffered_messages(pull) == 25
    await pull.close()
    info = await consumer.js.consumer_info(consumer.stream, "lane")
    # The server dropped the requests of the closed inbox at once.
    assert info.num_waiting == 0
    with pytest.raises(nats.errors.BadSubscriptionError):
        await pull.take(BATCH_MAX)

    # Given back (nak), the 25 come again now, not after the ack wait. Not in
    # stream order (nats-server 2.15 sent the first of them last here): a lane's
    # next owner restores the order by recreating the consumer at its ack floor
    # (Bus.take_over), since they are still unacked.
    info = await consumer.js.consumer_info(consumer.stream, "lane")
    assert info.num_ack_pending == 25
    successor = await consumer.pull()
    again = await consumer.take_all(successor, 25, within=3)
    assert sorted(m.metadata.sequence.stream for m in again) == list(range(6, 31))
    await successor.close()


async def test_large_messages_are_held_ahead_by_bytes_not_only_by_count(
    consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each request brings at most twice the server's max_payload (1 MiB here).
    monkeypatch.setattr(worker.bus, "PULL_MAX_BYTES", 1)
    budget = 2 * consumer.nc.max_payload
    body = b"x" * (600 * 1024)
    for _ in range(30):
        await consumer.js.publish(consumer.subject, body)
    pull = await consumer.pull()
    taken = await pull.take(BATCH_MAX)
    await asyncio.sleep(0.5)  # let whatever was asked for arrive
    # Two requests open at most: far below the 40 messages (24 MiB) asked for by count.
    assert pull._subscription.pending_bytes <= 2 * budget, pull._subscription.pending_bytes
    await taken[-1].ack()
    rest = await consumer.take_all(pull, 30 - len(taken))
    assert [m.metadata.sequence.stream for m in taken + rest] == list(range(1, 31))


async def test_a_request_ended_at_its_byte_budget_leaves_the_others_standing(
    consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker.bus, "PULL_MAX_BYTES", 1)  # 2 MiB a request
    large = b"x" * (700 * 1024)  # two fit a request, three do not
    await consumer.publish(25)
    for _ in range(2):
        await consumer.js.publish(consumer.subject, large)
    pull = await consumer.pull()
    # The first request (40) brings all 27; taking 20 tops up a second (20).
    for count in (20, 7):
        taken: list[Msg] = []
        while len(taken) < count:
            taken += await pull.take(count - len(taken))
        await taken[-1].ack()
    assert pull.outstanding == 33
    # The server serves its requests in turn: one of these two reaches the
    # first request, which has no room for it, ends, and leaves it to the second.
    for _ in range(2):
        await consumer.js.publish(consumer.subject, large)
    await consumer.take_all(pull, 2)
    await consumer.publish(100)
    await asyncio.sleep(0.3)  # let whatever was asked for arrive
    # Only the first request is gone: the lane holds no more than ahead.
    assert _buffered_messages(pull) == pull.outstanding <= 2 * BATCH_MAX
