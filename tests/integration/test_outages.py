"""A server outage means waiting and resuming, not dying (contract section 6)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import worker.app
from tests.integration.test_workers import assert_tables_match, publish_all
from tests.support import READY, Hub, open_hub, wait_until
from tests.support.workload import expect, generate
from worker import db
from worker.config import Settings
from worker.embedded import EmbeddedNats, EmbeddedPostgres

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hub-worker-outage-"))
    # Enterable by the embedded PostgreSQL's system user (as root), so its data stays here.
    path.chmod(0o755)
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


async def test_a_database_gone_just_after_the_migrations_is_waited_out(
    hub: Hub, postgres_admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's start after the migrations (NATS, then the command pool, lanes and
    leaders) meets an outage: it waits it out like any other, it does not stop."""
    database = await hub.value("SELECT current_database()")
    await hub.db.close()  # a database with sessions cannot be renamed
    admin = await asyncpg.connect(postgres_admin_url)
    migrate = worker.app.migrate

    async def migrate_then_gone(*args: Any, **kwargs: Any) -> list[str]:
        applied = await migrate(*args, **kwargs)
        # Gone under its name: every connection is refused until it comes back.
        await admin.execute(f'ALTER DATABASE "{database}" RENAME TO "{database}_away"')
        return applied

    monkeypatch.setattr(worker.app, "migrate", migrate_then_gone)
    try:
        started = await hub.start_worker()
        ((running, _),) = hub.workers

        async def past_the_pool() -> bool:
            return started.pool is not None or running.done()

        await wait_until(past_the_pool, what="the worker to create its command pool")
        assert not running.done(), "the worker must keep running"
    finally:
        await admin.execute(f'ALTER DATABASE "{database}_away" RENAME TO "{database}"')
        await admin.close()
        hub.db = await db.connect(hub.database_url)
    await hub.send("sp1", "s1", "spawned")
    await hub.settle(within=60)
    assert await hub.value("SELECT status FROM sessions WHERE id = 's1'") == "active"
    assert started.liveness() == {"loops": "ok"}


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


async def test_a_read_only_database_is_waited_out_not_dead_lettered(hub: Hub) -> None:
    """What a failover looks like from a worker whose DSN still reaches the old primary,
    now a standby: it answers, but every write fails. That is the database's state, not
    the events' fault: nothing may be dead-lettered, `/readyz` must say so, and the
    events apply once the database takes writes again."""
    worker = await hub.start_worker()
    await hub.send("sp1", "s1", "spawned")
    await hub.settle()
    database = await hub.value("SELECT current_database()")
    await hub.db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    # New sessions only: the failover drops the worker's connections, as here.
    await hub.db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    await hub.send("sp1", "s1", "signal.high_error_count", severity="high")
    await hub.send("sp1", "s1", "completed")
    await hub.send("sp1", "s2", "spawned")

    async def read_only() -> bool:
        return (await worker.readiness())["postgres"].startswith("read-only")

    await wait_until(read_only, within=20)
    await asyncio.sleep(3)  # long enough for a retried event to be given up on
    assert await hub.value("SELECT count(*) FROM dead_letters") == 0
    assert await hub.value("SELECT status FROM mappings WHERE session_id = 's1'") == "active"

    await hub.db.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    await hub.settle()
    assert await hub.rows("SELECT session_id, status FROM mappings ORDER BY session_id") == [
        {"session_id": "s1", "status": "completed"},
        {"session_id": "s2", "status": "active"},
    ]
    assert await hub.value("SELECT count(*) FROM detections") == 1
    assert await hub.value("SELECT count(*) FROM dead_letters") == 0

    # A read-only answer made the pool drop its connections: the next probes ask
    # fresh ones, which now take writes.
    async def ready() -> bool:
        return await worker.readiness() == READY

    await wait_until(ready, within=10)
