"""A hung worker that leads the relay loses the role to a live one (docs/decisions.md,
"A hung owner").

A worker stopped with SIGSTOP keeps its PostgreSQL connections, so its advisory locks,
the relay's leadership among them. Its leader connections carry its lane manager's tag,
so the peer that ends its lanes ends them too: the live worker takes the relay and
announces what arrives meanwhile. Resumed, the stopped one finds its leader connection
dead, and the hub settles with every change announced once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from tests.integration.test_liveness import log_events
from tests.integration.test_workers import assert_outbound_matches_tables
from tests.support import Hub, wait_until
from worker import db
from worker.config import Settings
from worker.constants import LANE_OWNER_BEAT_SECONDS, LANE_OWNER_SILENT_SECONDS
from worker.locks import RELAY_LEADER, namespace

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # No stall sweep: the silence would open stalled detections of its own.
    return dataclasses.replace(settings, sweep_interval_seconds=3600)


async def relay_leader(hub: Hub) -> int | None:
    """The pid of the worker process whose connection holds the relay's lock, if any."""
    name = await hub.value(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
        " AND l.classid::bigint = $1 AND l.objid::bigint = $2",
        namespace(hub.prefix),
        RELAY_LEADER,
    )
    process = db.process_of(name)  # host:pid, which every worker connection carries
    return None if process is None else int(process.rpartition(":")[2])


async def test_a_stopped_relay_leader_hands_the_relay_to_the_live_worker(hub: Hub) -> None:
    first = hub.spawn_worker_process()
    await hub.wait_ready()

    async def first_leads() -> bool:
        return await relay_leader(hub) is not None

    await wait_until(first_leads, within=30, what="the first worker to lead the relay")
    second = hub.spawn_worker_process()

    async def second_joined() -> bool:
        return bool(log_events(second, "lanes.joined"))

    await wait_until(second_joined, within=30, what="the second worker to join")
    assert await relay_leader(hub) == first.process.pid

    os.kill(first.process.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Whichever worker owns the session's lane, only a relay can announce it.
        await hub.send("alpha", "h1", "spawned")

        async def announced() -> bool:
            return any(o.subject.endswith(".h1") for o in await hub.outbound())

        bound = LANE_OWNER_SILENT_SECONDS + LANE_OWNER_BEAT_SECONDS + 15
        await wait_until(announced, within=bound, what="the live worker to announce h1")
        assert await relay_leader(hub) == second.process.pid
        assert log_events(second, "lanes.silent_worker_ended")
        took_over_in = time.monotonic() - stopped_at
        # Not before the silence bound, counted from its last beat, which may have come
        # up to a beat's interval before the stop.
        assert took_over_in >= LANE_OWNER_SILENT_SECONDS - LANE_OWNER_BEAT_SECONDS
    finally:
        resumed_at_line = len(first.log().splitlines())
        os.kill(first.process.pid, signal.SIGCONT)

    async def relay_lost() -> bool:
        lost = log_events(first, "leader.lost", after_line=resumed_at_line)
        return any(entry.get("role") == "relay" for entry in lost)

    await wait_until(relay_lost, within=30, what="the resumed worker to find the relay lost")
    await hub.send("alpha", "h1", "completed")
    await hub.settle(within=60)
    await assert_outbound_matches_tables(hub, await hub.outbound())
    assert second.terminate() == 0
    assert first.terminate() == 0
