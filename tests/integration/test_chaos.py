"""Chaos: workers SIGKILLed, PostgreSQL and NATS restarted, duplicates published, all under a
stream of events; at the end the tables equal the contract's model (issue 7)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from tests.integration.test_workers import assert_outbound_matches_tables, assert_tables_match
from tests.support import Hub, open_hub
from tests.support.workload import Published, expect, generate
from worker import db, schema
from worker.config import Settings
from worker.embedded import EmbeddedNats, EmbeddedPostgres

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(420)]

SESSIONS = 2500
DUPLICATE_SHARE = 0.05


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hub-worker-chaos-"))
    # Enterable by the embedded PostgreSQL's system user (as root), so its data stays here.
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def publish(hub: Hub, event: Published, msg_id: str | None = None) -> None:
    await hub.publish_raw(
        hub.subject(event.spoke, event.session, event.what),
        json.dumps(event.body).encode(),
        {"Nats-Msg-Id": msg_id or event.body["eventId"]},
    )


async def test_chaos(
    summary: Callable[[str], None], settings: Settings, scratch: Path, tmp_path: Path
) -> None:
    rng = random.Random(7)
    # Durable PostgreSQL: an acked commit must survive its crash.
    postgres = EmbeddedPostgres(scratch / "postgres", options={"max_connections": "300"})
    nats_server = EmbeddedNats(scratch / "nats")
    dsn, url = postgres.start(), nats_server.start()
    conn = await db.connect(dsn)
    await schema.migrate(conn)
    await conn.close()
    stream = generate(sessions=SESSIONS, seed=99)
    faults: list[str] = []
    duplicates = 0
    try:
        async with open_hub(settings, dsn, url, tmp_path) as hub:
            workers = [hub.spawn_worker_process(), hub.spawn_worker_process()]
            await hub.wait_ready()
            fault_at = sorted(rng.sample(range(len(stream) // 10, len(stream) * 9 // 10), 4))
            plan = ["kill", "postgres", "nats", "kill"]
            for position, event in enumerate(stream):
                await publish(hub, event)
                if rng.random() < DUPLICATE_SHARE:
                    # The same event again under a new message id: only the ledger can tell.
                    await publish(hub, event, f"dup-{uuid4()}")
                    duplicates += 1
                if fault_at and position == fault_at[0]:
                    fault_at.pop(0)
                    fault = plan.pop(0)
                    if fault == "kill":
                        victim = rng.choice(workers)
                        victim.kill()
                        workers.remove(victim)
                        workers.append(hub.spawn_worker_process())
                    elif fault == "postgres":
                        await hub.db.close()
                        postgres.stop(mode="immediate")
                        await asyncio.sleep(1)
                        postgres.start()
                        hub.db = await db.connect(dsn)
                    else:
                        nats_server.stop()
                        await asyncio.sleep(1)
                        nats_server.start()
                    faults.append(f"{fault} after event {position}")
            await hub.settle(within=240)

            expected = expect(stream)
            await assert_tables_match(hub, expected, stream)
            outbound = await hub.outbound()
            await assert_outbound_matches_tables(hub, outbound)
            rewinds = sum(w.log().count('"action": "lane.rewind"') for w in hub.processes)
            takeovers = sum(w.log().count('"event": "consumer.rewound"') for w in hub.processes)
            for worker in workers:
                worker.terminate()
            summary(
                f"chaos: {len(stream)} events over {SESSIONS} sessions, {duplicates} duplicates "
                f"republished; faults: {'; '.join(faults)}; compared {len(expected.sessions)} "
                f"sessions, {len(expected.mappings)} mappings, {len(expected.detections)} "
                f"detections and {len(outbound)} outbound events; {takeovers} consumers rewound on "
                f"take-over, {rewinds} lost deliveries caught"
            )
    finally:
        nats_server.stop()
        postgres.stop(mode="immediate")
