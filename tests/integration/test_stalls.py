"""The stall sweep (contract section 4, last bullet; issue 3)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from tests.support import Hub, wait_until
from worker.bus import Bus
from worker.metrics import Metrics
from worker.partitions import lanes
from worker.sweep import StallSweep

pytestmark = pytest.mark.integration

STALL_AFTER = 2
INTERVAL = 1


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    return dataclasses.replace(
        settings, stall_after_seconds=STALL_AFTER, sweep_interval_seconds=INTERVAL
    )


async def sweep_runs(hub: Hub) -> int:
    return int(await hub.value("SELECT runs FROM schedules WHERE name = 'stall_sweep'"))


async def test_three_workers_sweep_once_per_interval_and_open_one_stall(hub: Hub) -> None:
    workers = [hub.spawn_worker_process() for _ in range(3)]
    await hub.wait_ready()
    await hub.send("sp1", "quiet", "spawned")
    await hub.send("sp1", "chatty", "spawned")
    await hub.settle()
    runs_before = await sweep_runs(hub)
    started = time.monotonic()

    async def chatty_heartbeats() -> None:
        while time.monotonic() - started < STALL_AFTER + 6:
            await hub.send("sp1", "chatty", "heartbeat")
            await asyncio.sleep(0.3)

    await chatty_heartbeats()
    elapsed = time.monotonic() - started
    runs = await sweep_runs(hub) - runs_before

    # One sweep per interval across three workers, not three.
    assert elapsed / INTERVAL - 2 <= runs <= elapsed / INTERVAL + 1
    logged = sum(w.log().count('"action": "sweep.ran"') for w in workers)
    assert logged >= runs

    stalls = await hub.rows("SELECT * FROM detections WHERE anomaly_type = 'SESSION_STALL'")
    assert len(stalls) == 1, "many sweeps, one stall, and none for the chatty session"
    stall = stalls[0]
    assert stall["session_id"] == "quiet"
    assert stall["severity"] == "medium"
    assert stall["occurrence_count"] == 1
    assert stall["resolved_at"] is None
    assert set(stall["details"]) == {"lastActivityAt", "stalledSeconds"}
    assert stall["details"]["stalledSeconds"] >= STALL_AFTER
    await hub.settle()
    opened = await hub.outbound(f"{hub.prefix}.detection.opened.>")
    assert [e.subject for e in opened] == [f"{hub.prefix}.detection.opened.medium.session_stall"]
    assert opened[0].body["causationId"] is None
    assert opened[0].body["detection"]["id"] == stall["id"]

    # The session wakes up: its next lifecycle event resolves the stall.
    await hub.send("sp1", "quiet", "heartbeat")
    await hub.settle()
    row = (
        await hub.rows("SELECT resolution, resolved_at FROM detections WHERE id = $1", stall["id"])
    )[0]
    assert row["resolution"] == "auto_resolved"
    assert row["resolved_at"] is not None
    resolved = await hub.outbound(f"{hub.prefix}.detection.resolved.>")
    assert [e.body["detection"]["id"] for e in resolved] == [stall["id"]]
    for worker in workers:
        assert worker.terminate() == 0


async def test_sessions_that_ended_archived_or_never_spoke_are_not_stalled(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "done", "completed")
    await hub.send("sp1", "gone", "archived")
    await hub.send(
        "sp1", "child", "spawned", parentSessionId="coordinator"
    )  # coordinator: no activity
    await hub.send("sp1", "alive", "started")
    await hub.settle()

    async def child_stalled() -> bool:
        return bool(await hub.value("SELECT count(*) FROM detections WHERE session_id = 'child'"))

    await wait_until(child_stalled, within=STALL_AFTER + 5 * INTERVAL, what="the stall of 'child'")
    await asyncio.sleep(2 * INTERVAL)
    stalled = {r["session_id"] for r in await hub.rows("SELECT session_id FROM detections")}
    assert stalled == {"child", "alive"}


async def test_no_stall_is_opened_while_the_inbound_backlog_is_older_than_the_threshold(
    hub: Hub,
) -> None:
    # No worker runs: the stream fills up while the hub is "down".
    bus = await Bus.connect(hub.settings, [hub.nats_url])
    try:
        partitions = await bus.ensure_streams()
        hub_lanes = lanes(hub.prefix, partitions)
        for lane in hub_lanes:
            await bus.ensure_consumer(lane)
        await hub.db.execute("INSERT INTO spokes (id) VALUES ('sp1')")
        await hub.db.execute(
            "INSERT INTO sessions (id, spoke_id, last_activity_at)"
            " VALUES ('old', 'sp1', now() - interval '1 hour')"
        )
        await hub.publish_raw(
            hub.subject("sp1", "old", "heartbeat"),
            json.dumps(hub.event("sp1", "old")).encode(),
        )
        await asyncio.sleep(STALL_AFTER + 0.5)
        sweep = StallSweep(hub.prefix, bus, hub_lanes, STALL_AFTER, INTERVAL, Metrics())
        assert await bus.backlog_age(hub_lanes) > STALL_AFTER
        assert await sweep.sweep(hub.db, run=1) == []
        assert await hub.value("SELECT count(*) FROM detections") == 0

        # Caught up (the heartbeat was applied and acked): the sweep works again.
        await hub.start_worker()
        await hub.settle()
        await hub.db.execute("UPDATE sessions SET last_activity_at = now() - interval '1 hour'")
        assert await bus.backlog_age(hub_lanes) == 0
        assert len(await sweep.sweep(hub.db, run=2)) == 1
    finally:
        await bus.close()
