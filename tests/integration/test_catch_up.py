"""A worker behind a backlog says how the catch-up goes (worker/progress.py via the sampler)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog.testing

from tests.support import Hub, wait_until
from worker.client import Spoke
from worker.progress import CatchUp

pytestmark = pytest.mark.integration


async def test_a_backlog_is_reported_while_it_lasts_and_once_when_gone(hub: Hub) -> None:
    worker = await hub.start_worker()
    worker.catch_up = CatchUp(min_messages=50, every_seconds=0.5)
    assert worker.lane_manager is not None
    lane_manager = worker.lane_manager

    async def all_lanes_owned() -> bool:
        return len(lane_manager.owned) == hub.settings.partitions + 1

    await wait_until(all_lanes_owned, what="the worker to own every lane")
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    with structlog.testing.capture_logs() as logged:

        def reports(event: str) -> list[dict[str, Any]]:
            return [e for e in logged if e["event"] == event]

        # Every batch writes the ledger: while the table is locked, nothing is applied.
        async with hub.db.transaction():
            await hub.db.execute("LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE")
            for _ in range(80):
                await spoke.heartbeat("s1")

            async def reported() -> bool:
                return len(reports("lanes.catching_up")) >= 2

            await wait_until(reported, what="catch-up reports")
        await hub.settle()

        async def caught_up() -> bool:
            return bool(reports("lanes.caught_up"))

        await wait_until(caught_up, what="the caught-up report")
        await asyncio.sleep(0)
    first, second = reports("lanes.catching_up")[:2]
    assert first["backlog"] >= 50
    assert second["backlog"] == 80
    assert second["events_per_second"] == 0.0  # nothing applied while locked
    assert second["seconds_left"] is None
    [done] = reports("lanes.caught_up")
    assert done["action"] == "lanes.progress"
    assert done["applied"] >= 80
