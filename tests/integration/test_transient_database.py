"""A lock, a timeout or a cancel is the database's weather, not the message's fault.

Waited out in place (db.TRANSIENT_ERRORS): no event becomes a `handler_error`
dead letter for it and no leader duty stops the worker. The negative controls
empty TRANSIENT_ERRORS and show the same lock then costs events.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tests.support import Hub, wait_until
from worker import db
from worker.leadership import lead

pytestmark = pytest.mark.integration

SESSIONS = 20
# Long enough for the five attempts a message has (0.2 + 0.4 + 0.8 + 1.6 s of
# backoff, plus the lock timeouts) to run out while the lock is held.
LOCK_HELD_SECONDS = 8.0


async def _lock_timeout_for_new_connections(hub: Hub, lock_timeout: str) -> None:
    """`lock_timeout` on the database, as an operator may set it; connections made
    from now on have it, so the worker's are renewed."""
    database = await hub.value("SELECT current_database()")
    await hub.db.execute(f"ALTER DATABASE \"{database}\" SET lock_timeout = '{lock_timeout}'")
    await hub.db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


async def _complete_sessions_behind_a_table_lock(hub: Hub) -> None:
    """Spawn SESSIONS sessions, then send their `completed` while an operator holds
    ACCESS EXCLUSIVE on `sessions` (what ALTER TABLE or VACUUM FULL takes)."""
    await _lock_timeout_for_new_connections(hub, "200ms")
    for n in range(SESSIONS):  # applied once the lanes have their new connections
        await hub.send("sp1", f"s{n}", "spawned")
    await hub.settle()
    operator = await asyncpg.connect(hub.database_url)
    try:
        async with operator.transaction():
            await operator.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            for n in range(SESSIONS):
                await hub.send("sp1", f"s{n}", "completed")
            await asyncio.sleep(LOCK_HELD_SECONDS)
    finally:
        await operator.close()
    await hub.settle(within=60)


async def test_a_table_lock_is_waited_out_and_no_event_is_dead_lettered(hub: Hub) -> None:
    worker = await hub.start_worker()
    await _complete_sessions_behind_a_table_lock(hub)

    assert await hub.value("SELECT count(*) FROM dead_letters") == 0
    statuses = await hub.rows("SELECT status, count(*) AS n FROM mappings GROUP BY status")
    assert statuses == [{"status": "completed", "n": SESSIONS}]
    assert worker.liveness() == {"loops": "ok"}


async def test_negative_control_without_the_transient_errors_the_lock_costs_events(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "TRANSIENT_ERRORS", ())
    await hub.start_worker()
    await _complete_sessions_behind_a_table_lock(hub)

    letters = await hub.rows("SELECT reason, error FROM dead_letters")
    assert letters, "a lock timeout counted as the event's failure must dead-letter some"
    assert {letter["reason"] for letter in letters} == {"handler_error"}
    assert "LockNotAvailableError" in letters[0]["error"]


async def test_the_stall_sweep_outlives_a_lock_timeout(hub: Hub) -> None:
    worker = await hub.start_worker(sweep_interval_seconds=1, stall_after_seconds=1)
    await hub.send("sp1", "s1", "spawned")
    await hub.settle()
    await _lock_timeout_for_new_connections(hub, "100ms")
    operator = await asyncpg.connect(hub.database_url)
    try:
        async with operator.transaction():
            await operator.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(4)  # several sweeps are due meanwhile
            assert worker.liveness() == {"loops": "ok"}
    finally:
        await operator.close()

    async def stall_opened() -> bool:
        return bool(await hub.value("SELECT count(*) FROM detections WHERE resolved_at IS NULL"))

    await wait_until(stall_opened, within=30, what="the sweep to open the stall")
    assert worker.liveness() == {"loops": "ok"}


async def test_a_leader_duty_that_raises_is_run_again(hub: Hub) -> None:
    stopping = asyncio.Event()
    runs: list[str] = []

    async def duty(conn: db.Connection, stop: asyncio.Event) -> None:
        runs.append(await conn.fetchval("SELECT 'ran'"))
        if len(runs) == 1:
            raise RuntimeError("a bug in the duty")
        stopping.set()

    await asyncio.wait_for(lead("test", hub.database_url, 0x7E57, 1, duty, stopping), timeout=30)
    assert runs == ["ran", "ran"]


async def test_a_dead_letter_that_cannot_be_stored_does_not_wedge_its_lane(hub: Hub) -> None:
    """A trigger stands for whatever refuses the first form of a dead letter: the
    last-resort form (no jsonb) is stored instead, and events behind it apply."""
    await hub.db.execute(
        """
        CREATE FUNCTION refuse_headers() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.headers IS NOT NULL THEN RAISE EXCEPTION 'headers refused'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_headers BEFORE INSERT ON dead_letters
            FOR EACH ROW EXECUTE FUNCTION refuse_headers();
        """
    )
    await hub.start_worker()
    subject = hub.subject("sp1", "s1", "heartbeat")
    await hub.publish_raw(subject, b"not json", {"X-Trace": "abc"})
    await hub.send("sp1", "s1", "spawned")
    await hub.settle(within=60)

    letters = await hub.rows("SELECT * FROM dead_letters")
    assert len(letters) == 1
    assert letters[0]["reason"] == "invalid_json"
    assert letters[0]["headers"] is None
    assert letters[0]["error"].startswith("stored in its last-resort form")
    assert bytes(letters[0]["headers_bytes"]) == b"NATS/1.0\r\nX-Trace: abc\r\n\r\n"
    assert bytes(letters[0]["payload"]) == b"not json"
    assert await hub.value("SELECT status FROM mappings WHERE session_id = 's1'") == "active"
    (announced,) = await hub.outbound(f"{hub.prefix}.deadletter.>")
    assert announced.body["payloadTruncated"] is True
    assert announced.body["payloadSize"] == len(b"not json")


async def test_a_message_nothing_can_store_is_logged_and_terminated(hub: Hub) -> None:
    await hub.db.execute(
        """
        CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'nothing is stored'; END $$;
        CREATE TRIGGER refuse_all BEFORE INSERT ON dead_letters
            FOR EACH ROW EXECUTE FUNCTION refuse_all();
        """
    )
    worker = await hub.start_worker()
    await hub.publish_raw(hub.subject("sp1", "s1", "heartbeat"), json.dumps([1]).encode())
    await hub.send("sp1", "s1", "spawned")
    await hub.settle(within=60)

    assert await hub.value("SELECT count(*) FROM dead_letters") == 0
    assert await hub.value("SELECT status FROM mappings WHERE session_id = 's1'") == "active"
    assert worker.metrics.registry.get_sample_value("hub_worker_unstored_messages_total") == 1
