"""A server outage means waiting and resuming, not dying (contract section 6)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_workers import assert_tables_match, publish_all
from tests.support import open_hub
from tests.workload import expect, generate
from worker import db
from worker.config import Settings
from worker.embedded import EmbeddedNats, EmbeddedPostgres

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hub-worker-outage-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_postgres_restart_is_waited_out(
    settings: Settings, nats_url: str, scratch: Path, tmp_path: Path
) -> None:
    # Durable settings: a crash (immediate stop) must not take back commits
    # the worker was told about, as it would with synchronous_commit off.
    postgres = EmbeddedPostgres(scratch / "postgres", options={"max_connections": "200"})
    dsn = postgres.start()
    try:
        stream = generate(sessions=120, seed=3)
        async with open_hub(settings, dsn, nats_url, tmp_path) as hub:
            await hub.start_worker()
            await publish_all(hub, stream[: len(stream) // 2])
            await hub.settle()

            await hub.db.close()
            postgres.stop(mode="immediate")
            await publish_all(hub, stream[len(stream) // 2 :])
            await asyncio.sleep(3)  # the worker retries meanwhile
            assert all(not task.done() for task, _ in hub.workers), "the worker must keep running"
            postgres.start()
            hub.db = await db.connect(dsn)

            await hub.settle(within=60)
            await assert_tables_match(hub, expect(stream))
    finally:
        postgres.stop(mode="immediate")


async def test_nats_restart_is_waited_out(
    settings: Settings, database_url: str, scratch: Path, tmp_path: Path
) -> None:
    nats_server = EmbeddedNats(scratch / "nats")
    url = nats_server.start()
    try:
        stream = generate(sessions=120, seed=4)
        async with open_hub(settings, database_url, url, tmp_path) as hub:
            await hub.start_worker()
            await publish_all(hub, stream[: len(stream) // 2])
            await hub.settle()

            nats_server.stop()
            await asyncio.sleep(2)
            assert all(not task.done() for task, _ in hub.workers), "the worker must keep running"
            nats_server.start()  # same port, same store: the streams survive

            await publish_all(hub, stream[len(stream) // 2 :])
            await hub.settle(within=60)
            await assert_tables_match(hub, expect(stream))
            outbound = await hub.outbound()
            assert len({e.body["eventId"] for e in outbound}) == len(outbound)
    finally:
        nats_server.stop()
