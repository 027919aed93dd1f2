"""Turns of the batch transaction (HUB_LANE_TURNS): a lane that keeps its turn for
long, here one whose transaction waits on a row lock, holds no other lane up; and
with the turns the hub applies everything, in order, as without them."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from tests.support import Hub, wait_until

pytestmark = pytest.mark.integration

SESSIONS = 16


async def _send(hub: Hub, session: str, what: str) -> str:
    """Publish as a spoke; returns the partition the stream put the event in."""
    body = hub.event("sp1", session)
    ack = await hub.js.publish(
        hub.subject("sp1", session, what),
        json.dumps(body).encode(),
        headers={"Nats-Msg-Id": body["eventId"]},
    )
    stored = await hub.js.get_msg(hub.settings.events_stream, ack.seq)
    return stored.subject.split(".")[2]  # <prefix>.part.<n>.spoke...


async def _a_lane_waits_on_a_lock(hub: Hub) -> None:
    """Until one of the worker's connections waits on a row lock (the operator's)."""

    async def waiting() -> bool:
        return bool(
            await hub.value(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name LIKE 'hub-worker:%'"
            )
        )

    await wait_until(waiting, within=30, what="the lane to wait")


async def _the_sessions_are_applied(hub: Hub, sessions: list[str]) -> None:
    """Until every one of `sessions` has its row: their lanes applied them."""

    async def applied() -> bool:
        count = await hub.value(
            "SELECT count(*) FROM sessions WHERE id = ANY($1::text[])", sessions
        )
        return bool(count == len(sessions))

    await wait_until(applied, within=20, what="the other lanes' sessions")


async def _settled_statuses(hub: Hub) -> dict[str, str]:
    """Every session's status once the worker has applied everything sent."""
    await hub.settle()
    return {r["id"]: r["status"] for r in await hub.rows("SELECT id, status FROM sessions")}


async def test_a_lane_waiting_on_a_lock_in_its_turn_holds_up_no_other_lane(hub: Hub) -> None:
    await hub.start_worker(lane_turns=1)
    await _send(hub, "held", "spawned")
    await hub.settle()
    operator = await asyncpg.connect(hub.database_url)
    try:
        async with operator.transaction():
            await operator.execute("SELECT 1 FROM sessions WHERE id = 'held' FOR UPDATE")
            held_partition = await _send(hub, "held", "completed")
            await _a_lane_waits_on_a_lock(hub)
            partitions = {f"s{n}": await _send(hub, f"s{n}", "spawned") for n in range(SESSIONS)}
            elsewhere = sorted(s for s, p in partitions.items() if p != held_partition)
            assert elsewhere, "every session in the held lane: pick more sessions"

            # The held lane keeps the only turn until the lock goes (its statement
            # would wait up to DB_STATEMENT_TIMEOUT_SECONDS): the others go without.
            await _the_sessions_are_applied(hub, elsewhere)
            assert await hub.value("SELECT status FROM sessions WHERE id = 'held'") != "completed"
    finally:
        await operator.close()
    assert await _settled_statuses(hub) == {
        "held": "completed",
        **{f"s{n}": "active" for n in range(SESSIONS)},
    }


async def test_a_lane_receives_its_next_batch_while_it_applies_one(hub: Hub) -> None:
    """The lane's pull stands (worker.bus.StandingPull): what arrives while it is in
    a transaction is delivered to it meanwhile, and is then applied without a pull
    request of its own, neither a waiting one nor a no-wait one."""
    await hub.start_worker()
    await _send(hub, "busy", "spawned")
    await hub.settle()
    pulls: list[dict[str, object]] = []
    operator = await asyncpg.connect(hub.database_url)
    try:
        async with operator.transaction():
            await operator.execute("SELECT 1 FROM sessions WHERE id = 'busy' FOR UPDATE")
            partition = await _send(hub, "busy", "heartbeat")
            await _a_lane_waits_on_a_lock(hub)

            # Every pull request the lane sends from now on (the JetStream API subject
            # names the consumer: hub-worker-p<n>).
            async def noted(msg: Msg) -> None:
                pulls.append(json.loads(msg.data))

            sub = await hub.nc.subscribe(
                f"$JS.API.CONSUMER.MSG.NEXT.{hub.settings.events_stream}.hub-worker-p{partition}",
                cb=noted,
            )
            await hub.nc.flush()
            # While the lane is in its transaction, more of its session's events come.
            waiting = [await hub.send("sp1", "busy", "heartbeat") for _ in range(5)]

            async def delivered() -> bool:
                info = await hub.js.consumer_info(
                    hub.settings.events_stream, f"hub-worker-p{partition}"
                )
                return info.num_pending == 0 and info.num_ack_pending == 1 + len(waiting)

            # Delivered to the worker while the lock still holds its lane.
            await wait_until(delivered, within=10, what="the next batch in the worker")
    finally:
        await operator.close()

    async def applied() -> bool:
        return bool(
            await hub.value(
                "SELECT count(*) FROM processed_events WHERE event_id = ANY($1::uuid[])",
                [w["eventId"] for w in waiting],
            )
            == len(waiting)
        )

    await wait_until(applied, within=20, what="the waiting events")
    await sub.unsubscribe()
    assert pulls == [], pulls


async def test_lanes_sharing_a_transaction_with_a_locked_session_go_alone_after_a_while(
    hub: Hub,
) -> None:
    """Lanes whose batches arrive together share a transaction (worker.groups). When
    one of them waits on a lock, the group is split after GROUP_ALONE_AFTER_SECONDS
    and the others apply theirs alone, while the lock is still held."""
    worker = await hub.start_worker(lane_turns=1)
    for session in ("held", "held2"):
        await _send(hub, session, "spawned")
    await hub.settle()
    operator = await asyncpg.connect(hub.database_url)
    try:
        async with operator.transaction():
            # `held` keeps the only turn (its lane waits on the lock), so the batches
            # that come next form one group while its leader waits for a turn; the
            # group holds `held2`, locked too.
            await operator.execute(
                "SELECT 1 FROM sessions WHERE id IN ('held', 'held2') FOR UPDATE"
            )
            held_partition = await _send(hub, "held", "completed")
            await _a_lane_waits_on_a_lock(hub)
            sends = [_send(hub, "held2", "completed")]
            sends += [_send(hub, f"s{n}", "spawned") for n in range(SESSIONS)]
            partitions = await asyncio.gather(*sends)
            others = {f"s{n}": p for n, p in enumerate(partitions[1:])}
            elsewhere = sorted(
                s for s, p in others.items() if p not in (held_partition, partitions[0])
            )
            assert elsewhere, "every session in a held lane: pick more sessions"

            await _the_sessions_are_applied(hub, elsewhere)
            assert (
                await hub.value(
                    "SELECT count(*) FROM sessions WHERE id IN ('held', 'held2')"
                    " AND status = 'completed'"
                )
                == 0
            )
    finally:
        await operator.close()
    assert await _settled_statuses(hub) == {
        "held": "completed",
        "held2": "completed",
        **{f"s{n}": "active" for n in range(SESSIONS)},
    }
    if hub.settings.batch_max > 1:
        groups = worker.lane_manager.groups
        assert groups.grouped >= 1, groups
        assert groups.split >= 1, groups
        split = worker.metrics.registry.get_sample_value(
            "hub_worker_batch_groups_total", {"outcome": "split"}
        )
        assert split == groups.split, groups


async def test_lanes_sharing_a_transaction_that_fails_apply_theirs_alone_at_once(
    hub: Hub,
) -> None:
    """A group whose transaction fails, here because the database refuses one member's
    session, is split at once (not after GROUP_ALONE_AFTER_SECONDS): the other members
    apply their batches alone, and the refused event goes to its dead letter as it
    would without groups."""
    await hub.db.execute(
        """
        CREATE FUNCTION refuse_cursed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id LIKE 'cursed%' THEN RAISE EXCEPTION 'cursed sessions are refused'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_cursed BEFORE INSERT ON sessions
            FOR EACH ROW EXECUTE FUNCTION refuse_cursed();
        """
    )
    worker = await hub.start_worker(lane_turns=1)
    await _send(hub, "held", "spawned")
    await hub.settle()
    cursed = [f"cursed{n}" for n in range(4)]
    operator = await asyncpg.connect(hub.database_url)
    try:
        with capture_logs() as logged:
            async with operator.transaction():
                # `held` keeps the only turn, so the batches that come next form a
                # group while its leader waits for one (TURN_WAIT_SECONDS).
                await operator.execute("SELECT 1 FROM sessions WHERE id = 'held' FOR UPDATE")
                held_partition = await _send(hub, "held", "completed")
                await _a_lane_waits_on_a_lock(hub)
                sessions = cursed + [f"s{n}" for n in range(SESSIONS)]
                partitions = await asyncio.gather(*(_send(hub, s, "spawned") for s in sessions))
                placed = dict(zip(sessions, partitions, strict=True))
                assert any(placed[c] != held_partition for c in cursed), placed
                elsewhere = sorted(
                    s for s in sessions[len(cursed) :] if placed[s] != held_partition
                )

                await _the_sessions_are_applied(hub, elsewhere)
    finally:
        await operator.close()
    assert await _settled_statuses(hub) == {
        "held": "completed",
        **{f"s{n}": "active" for n in range(SESSIONS)},
    }
    letters = await hub.rows("SELECT reason FROM dead_letters")
    assert [r["reason"] for r in letters] == ["handler_error"] * len(cursed)
    if hub.settings.batch_max > 1:
        groups = worker.lane_manager.groups
        assert groups.split >= 1, groups
        splits = [e for e in logged if e["event"] == "batch.group_split"]
        assert splits, "no group split"
        assert all("cursed sessions are refused" in e["error"] for e in splits), splits
