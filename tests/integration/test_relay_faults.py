"""The relay under faults of JetStream (issue 12, findings 2, 5 and 8).

A row JetStream refuses for good is set aside and nothing behind it waits; a JetStream
error reply is reported as itself at once; a deleted PU_OUT is recreated while the
worker runs; `/readyz` says when the relay stops moving or the stream is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import Any
from uuid import uuid4

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import DiscardPolicy, StreamConfig
from structlog.testing import capture_logs

from tests.support import Hub, wait_until
from worker import db
from worker.app import Worker
from worker.bus import _PLAIN_ACK, Bus
from worker.constants import PUBLISH_ACK_TIMEOUT_SECONDS, RELAY_BATCH
from worker.metrics import Metrics
from worker.relay import OutboxRelay

pytestmark = pytest.mark.integration


async def insert_outbox(hub: Hub, subject: str, payload: bytes, aggregate: str) -> int:
    """An outbox row written as a lane would (the trigger wakes the relay)."""
    row_id: int = await hub.value(
        "INSERT INTO outbox (event_id, subject, payload, aggregate)"
        " VALUES ($1, $2, $3, $4) RETURNING id",
        uuid4(),
        subject,
        payload,
        aggregate,
    )
    return row_id


async def spawn(hub: Hub, sessions: list[str]) -> None:
    for session in sessions:
        await hub.send("sp1", session, "spawned", workspaceId="ws-1", task="t")


def metric(worker: Worker, name: str, **labels: str) -> float:
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


def events(logged: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logged if entry.get("event") == name]


@pytest.mark.parametrize(
    "under",
    [
        pytest.param(-1, id="body over max_payload"),
        # The server counts the header block (`Nats-Msg-Id`) toward max_payload;
        # nats-py's publish compares the body alone and sent this one, and the
        # server closed the connection: the relay reset it on every retry.
        pytest.param(8, id="body under max_payload, with its header over"),
    ],
)
async def test_a_row_over_max_payload_is_set_aside_and_the_events_behind_it_are_published(
    hub: Hub, under: int
) -> None:
    worker = await hub.start_worker()
    size = hub.nc.max_payload - under
    with capture_logs() as logged:
        # An announcement bigger than the server takes (what finding 2 produced), and
        # a later event of the same aggregate.
        poison = await insert_outbox(
            hub,
            f"{hub.prefix}.mapping.active.poison",
            b"x" * size,
            "mapping:poison",
        )
        later = json.dumps({"type": "mapping.completed", "after": "the poison"}).encode()
        await insert_outbox(hub, f"{hub.prefix}.mapping.completed.poison", later, "mapping:poison")
        sessions = [f"s{n}" for n in range(50)]
        await spawn(hub, sessions)
        await hub.settle(within=20)

    aside = await hub.rows("SELECT id, subject, reason, error, payload FROM outbox_set_aside")
    assert [(r["id"], r["reason"]) for r in aside] == [(poison, "max_payload")]
    assert "maximum payload exceeded" in aside[0]["error"]
    assert len(aside[0]["payload"]) == size
    assert worker.bus is not None
    assert worker.bus.nc.stats["reconnects"] == 0
    published = await hub.outbound(f"{hub.prefix}.mapping.>")
    assert sorted(o.subject.rsplit(".", 1)[1] for o in published) == sorted([*sessions, "poison"])
    assert [o.body for o in published if o.subject.endswith(".poison")] == [json.loads(later)]
    assert (
        metric(
            worker, "hub_worker_outbox_set_aside_total", type="mapping.active", reason="max_payload"
        )
        == 1
    )
    errors = events(logged, "relay.set_aside")
    assert len(errors) == 1
    assert errors[0]["log_level"] == "error"
    assert errors[0]["reason"] == "max_payload"
    assert errors[0]["outbox_id"] == poison


@pytest.mark.parametrize("gap", [" ", "\r\nPUB x 1\r\n"])
async def test_a_row_whose_subject_would_break_the_protocol_line_is_set_aside(
    hub: Hub, gap: str
) -> None:
    """The worker builds its subjects from checked tokens; a row written by hand (an
    operator's SQL) may hold anything. It is refused for good, not retried in front of
    the rest (it was, as `disconnected`, when nats-py's check raised mid-window)."""
    worker = await hub.start_worker()
    bad = await insert_outbox(hub, f"{hub.prefix}.mapping.active.by{gap}hand", b"{}", "x:1")
    sessions = [f"s{n}" for n in range(20)]
    await spawn(hub, sessions)
    await hub.settle(within=20)

    aside = await hub.rows("SELECT id, reason FROM outbox_set_aside")
    assert [(r["id"], r["reason"]) for r in aside] == [(bad, "rejected")]
    published = await hub.outbound(f"{hub.prefix}.mapping.>")
    assert sorted(o.subject.rsplit(".", 1)[1] for o in published) == sorted(sessions)
    assert worker.bus is not None
    assert worker.bus.nc.stats["reconnects"] == 0


async def test_the_servers_acks_are_read_without_parsing_json(hub: Hub) -> None:
    """`_PLAIN_ACK` must match what this nats-server writes, first and duplicate alike:
    otherwise every ack takes the slower JSON path (correct, but a drain's cost)."""
    stream = f"{hub.prefix}_ACKS"
    await hub.js.add_stream(StreamConfig(name=stream, subjects=[f"{hub.prefix}acks.>"]))
    try:
        msg_id = str(uuid4())
        replies = [
            await hub.nc.request(f"{hub.prefix}acks.x", b"{}", headers={"Nats-Msg-Id": msg_id})
            for _ in range(2)
        ]
        assert [json.loads(r.data).get("duplicate", False) for r in replies] == [False, True]
        assert all(_PLAIN_ACK.fullmatch(r.data) for r in replies), [r.data for r in replies]
        assert not _PLAIN_ACK.fullmatch(b'{"error":{"code":503}}')
    finally:
        await hub.js.delete_stream(stream)


async def test_a_jetstream_error_reply_is_reported_as_itself_at_once(hub: Hub) -> None:
    """A stream with a small max_msg_size answers 400/10054: not a 5 s timeout."""
    worker = await hub.start_worker()
    assert worker.bus is not None
    small = f"{hub.prefix}_SMALL"
    subject = f"{hub.prefix}small.x"
    await hub.js.add_stream(
        StreamConfig(name=small, subjects=[f"{hub.prefix}small.>"], max_msg_size=64)
    )
    try:
        started = time.monotonic()
        [error] = await worker.bus.publish_window([(subject, b"x" * 200, str(uuid4()))])
        assert time.monotonic() - started < 1.0
        assert isinstance(error, nats.js.errors.BadRequestError)
        assert error.err_code == 10054

        with capture_logs() as logged:
            started = time.monotonic()
            poison = await insert_outbox(hub, subject, b"x" * 200, "small:1")
            await spawn(hub, ["after"])
            await hub.settle(within=10)
            took = time.monotonic() - started
        assert took < PUBLISH_ACK_TIMEOUT_SECONDS
        aside = await hub.rows("SELECT id, reason, error FROM outbox_set_aside")
        assert aside == [
            {"id": poison, "reason": "too_large", "error": "message size exceeds maximum allowed"}
        ]
        assert [o.subject for o in await hub.outbound()] == [f"{hub.prefix}.mapping.active.after"]
        assert not events(logged, "nats.error")  # nothing raised inside the ack callback
    finally:
        with contextlib.suppress(nats.errors.Error):
            await hub.js.delete_stream(small)


async def test_the_outbound_stream_deleted_while_running_is_recreated_and_the_backlog_drains(
    hub: Hub,
) -> None:
    await hub.start_worker()
    await spawn(hub, ["before"])
    await hub.settle()
    await hub.js.delete_stream(hub.settings.out_stream)

    sessions = [f"s{n}" for n in range(20)]
    await spawn(hub, sessions)
    await hub.settle(within=20)
    published = await hub.outbound()
    assert sorted(o.subject.rsplit(".", 1)[1] for o in published) == sorted(sessions)
    assert await hub.value("SELECT count(*) FROM outbox_set_aside") == 0


async def test_readiness_says_when_the_relay_is_stuck_and_when_it_moves_again(hub: Hub) -> None:
    """A full PU_OUT (discard new) refuses every publish: a transient refusal the relay
    waits out, logged once per window, and after a bounded time /readyz says so."""
    worker = await hub.start_worker()
    worker.relay_stall_seconds = 2.0
    await spawn(hub, ["first"])
    await hub.settle()
    out = hub.settings.out_stream
    config = (await hub.js.stream_info(out)).config
    await hub.js.update_stream(dataclasses.replace(config, max_msgs=1, discard=DiscardPolicy.NEW))
    assert (await hub.js.stream_info(out)).config.discard == DiscardPolicy.NEW

    with capture_logs() as logged:
        await spawn(hub, [f"s{n}" for n in range(30)])

        async def stuck() -> bool:
            return (await worker.readiness())["relay"].startswith("stuck")

        await wait_until(stuck, within=15, what="/readyz to say the relay is stuck")

        async def gauge_says_so() -> bool:
            # Set at each sample (every 2 s), while readiness reads the clock.
            return metric(worker, "hub_worker_relay_stalled_seconds") >= 2.0

        await wait_until(gauge_says_so, within=5, what="the stalled gauge")
        rows = await hub.value("SELECT count(*) FROM outbox")
        assert rows == 30

        async def one_line_for_all() -> bool:
            failures = events(logged, "relay.publish_failed")
            return any(f["reasons"] == {"unavailable": 30} for f in failures)

        # The relay tries again after a pause: one line for its window of 30 rows.
        await wait_until(one_line_for_all, within=15, what="one line for a window of 30")
        failures = events(logged, "relay.publish_failed")
        # One line per attempt, each for its whole window (not one per row: 30 rows
        # refused at every attempt); the relay backs off between attempts (full
        # jitter under a doubling bound from 1 s to 5 s), so a handful in ~20 s.
        assert len(failures) <= 8, [f["reasons"] for f in failures]
        for failure in failures:
            assert failure["failed"] == failure["window"]
            assert failure["log_level"] == "warning"
            assert failure["errors"] == {"unavailable": "maximum messages exceeded"}
        assert not events(logged, "relay.set_aside")

        await hub.js.update_stream(dataclasses.replace(config, max_msgs=-1))

        async def moving() -> bool:
            return (await worker.readiness())["relay"] == "ok"

        await hub.settle(within=20)
        await wait_until(moving, within=10, what="/readyz to say the relay moves")
    assert metric(worker, "hub_worker_relay_stalled_seconds") == 0
    assert len(await hub.outbound()) == 31


async def test_readiness_says_when_the_outbound_stream_is_missing(hub: Hub) -> None:
    worker = await hub.start_worker()
    await spawn(hub, ["first"])
    await hub.settle()
    await hub.js.delete_stream(hub.settings.out_stream)

    async def out_stream_is(expected: str) -> bool:
        return (await worker.readiness())["out_stream"].startswith(expected)

    await wait_until(lambda: out_stream_is("missing"), within=10, what="out_stream missing")
    assert metric(worker, "hub_worker_outbound_stream_missing") == 1
    # The relay's next publish recreates it.
    await spawn(hub, ["second"])
    await hub.settle(within=20)
    await wait_until(lambda: out_stream_is("ok"), within=10, what="out_stream ok")
    assert metric(worker, "hub_worker_outbound_stream_missing") == 0
    assert [o.subject for o in await hub.outbound()] == [f"{hub.prefix}.mapping.active.second"]
    await asyncio.sleep(0)


async def test_the_relay_reads_the_outbox_once_when_the_read_saw_every_row(hub: Hub) -> None:
    """A read that returned fewer than RELAY_BATCH rows saw every committed row: the
    relay does not read again to find the outbox empty (a row committed since wakes
    it). A full read is followed by another."""
    bus = Bus(hub.nc, hub.settings)
    await bus.ensure_streams()
    relay = OutboxRelay(bus, hub.prefix, Metrics())
    conn = await db.connect(hub.database_url, application_name="tests")
    reads: list[str] = []
    conn.add_query_logger(
        lambda record: (
            reads.append(record.query) if "FROM outbox ORDER BY id" in record.query else None
        )
    )
    try:
        subject = f"{hub.prefix}.mapping.completed"
        for _ in range(3):
            await insert_outbox(hub, subject, b"{}", "mapping:s1")
        assert await relay.drain(conn)
        await asyncio.sleep(0.1)  # asyncpg calls query loggers with call_soon
        assert len(reads) == 1, reads
        assert await hub.value("SELECT count(*) FROM outbox") == 0
        assert relay.published == 3

        reads.clear()
        await hub.db.execute(
            "INSERT INTO outbox (event_id, subject, payload, aggregate)"
            " SELECT gen_random_uuid(), $1, '{}', 'mapping:s' || n FROM generate_series(1, $2) n",
            subject,
            RELAY_BATCH + 1,
        )
        assert await relay.drain(conn)
        await asyncio.sleep(0.1)
        assert len(reads) == 2, len(reads)  # RELAY_BATCH rows, then the one left
        assert await hub.value("SELECT count(*) FROM outbox") == 0
    finally:
        await conn.close()


async def test_events_of_one_aggregate_reach_the_stream_in_order_when_a_window_fails(
    hub: Hub,
) -> None:
    """Contract: events about one detection or mapping are published in the order of
    the changes. Here ten mappings have four outbox rows each, interleaved, and PU_OUT
    takes 15 messages and then refuses (discard new): each mapping's first rows go
    out, the window that fails stops the rest, and no mapping has a later row in the
    stream while an earlier one is missing, neither then nor after the retry."""
    bus = Bus(hub.nc, hub.settings)
    await bus.ensure_streams()
    out = hub.settings.out_stream
    config = (await hub.js.stream_info(out)).config
    await hub.js.update_stream(dataclasses.replace(config, max_msgs=15, discard=DiscardPolicy.NEW))
    relay = OutboxRelay(bus, hub.prefix, Metrics())
    conn = await db.connect(hub.database_url, application_name="tests")
    subject = f"{hub.prefix}.mapping.completed"
    for step in range(4):
        for mapping in range(10):
            body = json.dumps({"mapping": mapping, "step": step}).encode()
            await insert_outbox(hub, subject, body, f"mapping:m{mapping}")

    async def published() -> dict[int, list[int]]:
        steps: dict[int, list[int]] = {}
        for seq in range(1, (await hub.js.stream_info(out)).state.messages + 1):
            body = json.loads((await hub.js.get_msg(out, seq)).data or b"{}")
            steps.setdefault(body["mapping"], []).append(body["step"])
        return steps

    try:
        assert not await relay.drain(conn)  # the stream refused the 16th
        so_far = await published()
        assert sum(len(s) for s in so_far.values()) == 15
        for steps in so_far.values():
            assert steps == list(range(len(steps))), so_far
        assert await hub.value("SELECT count(*) FROM outbox") == 40 - 15

        await hub.js.update_stream(dataclasses.replace(config, max_msgs=-1))
        assert await relay.drain(conn)
        assert await published() == {mapping: [0, 1, 2, 3] for mapping in range(10)}
    finally:
        await conn.close()
