"""Several worker processes, crashes and restarts: exact results, nothing lost (sections 2, 4, 5)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import pytest

from tests.support import Hub, Outbound, wait_until
from tests.support.workload import (
    Expected,
    Published,
    differences,
    differing_keys,
    events_of,
    expect,
    generate,
)

pytestmark = pytest.mark.integration


async def publish_all(hub: Hub, stream: list[Published]) -> None:
    # One at a time: per-session order is the publish order.
    for event in stream:
        await hub.publish_raw(
            hub.subject(event.spoke, event.session, event.what),
            json.dumps(event.body).encode(),
            {"Nats-Msg-Id": event.body["eventId"]},
        )


async def assert_tables_match(
    hub: Hub, expected: Expected, stream: list[Published] | None = None
) -> None:
    """The tables say what the model says; on a difference, only the rows that differ
    (and, given the `stream`, the events of their sessions)."""
    mappings = {r["session_id"]: r["status"] for r in await hub.rows("SELECT * FROM mappings")}
    assert_same("mappings", mappings, expected.mappings, stream)
    sessions = {r["id"]: r["status"] for r in await hub.rows("SELECT * FROM sessions")}
    assert_same("sessions", sessions, expected.sessions, stream)
    archived = {
        r["id"] for r in await hub.rows("SELECT id FROM sessions WHERE archived_at IS NOT NULL")
    }
    assert archived == expected.archived, (
        f"archived only in the table: {sorted(archived - expected.archived)[:20]}, "
        f"only in the model: {sorted(expected.archived - archived)[:20]}"
    )
    detections = {
        (r["session_id"], r["anomaly_type"]): (
            r["occurrence_count"],
            r["severity"],
            r["resolved_at"] is not None,
        )
        for r in await hub.rows("SELECT * FROM detections")
    }
    assert_same("detections", detections, expected.detections, stream)
    assert (
        await hub.value(
            "SELECT count(*) FROM (SELECT dedup_key FROM detections WHERE resolved_at IS NULL"
            " GROUP BY dedup_key HAVING count(*) > 1) d"
        )
        == 0
    )


def assert_same(
    what: str,
    actual: dict[Any, Any],
    expected: dict[Any, Any],
    stream: list[Published] | None,
) -> None:
    if actual == expected:
        return
    report = f"{what} differ from the model: {differences(actual, expected)}"
    if stream is not None:
        keys = [k for kind in differing_keys(actual, expected) for k in kind]
        sessions = {k if isinstance(k, str) else k[0] for k in keys}
        report += "\nthe events of the first of their sessions:\n" + events_of(
            stream, set(sorted(sessions)[:5])
        )
    pytest.fail(report)


async def assert_outbound_matches_tables(hub: Hub, events: list[Outbound]) -> None:
    """Every detection's and mapping's last published event carries its committed state."""
    last_detection: dict[str, dict[str, Any]] = {}
    detection_types: dict[str, list[str]] = defaultdict(list)
    last_mapping: dict[str, dict[str, Any]] = {}
    for event in events:
        if "detection" in event.body:
            d = event.body["detection"]
            last_detection[d["id"]] = d
            detection_types[d["id"]].append(event.body["type"])
        elif "mapping" in event.body:
            last_mapping[event.body["mapping"]["sessionId"]] = event.body["mapping"]
    rows = await hub.rows("SELECT * FROM detections")
    assert set(last_detection) == {r["id"] for r in rows}
    for row in rows:
        published = last_detection[row["id"]]
        assert published["occurrenceCount"] == row["occurrence_count"], row["id"]
        assert published["severity"] == row["severity"], row["id"]
        assert (published["resolvedAt"] is not None) == (row["resolved_at"] is not None), row["id"]
        assert detection_types[row["id"]][0] == "detection.opened"
        assert detection_types[row["id"]].count("detection.opened") == 1
    mappings = await hub.rows("SELECT * FROM mappings")
    assert {m["session_id"]: m["status"] for m in mappings} == {
        s: m["status"] for s, m in last_mapping.items()
    }


async def test_two_worker_processes_split_the_work_with_exact_results(hub: Hub) -> None:
    stream = generate(sessions=300, seed=11)
    first = hub.spawn_worker_process()
    await hub.wait_ready()
    await publish_all(hub, stream[: len(stream) // 3])
    second = hub.spawn_worker_process()  # joins mid-stream: lanes are handed over

    async def second_owns_lanes() -> bool:
        return '"event": "lane.owned"' in second.log()

    await wait_until(second_owns_lanes, what="the second worker to take lanes")
    await publish_all(hub, stream[len(stream) // 3 :])
    await hub.settle(within=90)

    await assert_tables_match(hub, expect(stream))
    await assert_outbound_matches_tables(hub, await hub.outbound())
    assert first.terminate() == 0
    assert second.terminate() == 0
    for worker in (first, second):
        assert '"action": "batch.handled"' in worker.log(), "both workers must have done work"


async def test_worker_killed_mid_stream_and_restarted_loses_nothing(hub: Hub) -> None:
    stream = generate(sessions=400, seed=23)
    victim = hub.spawn_worker_process()
    await hub.wait_ready()
    publisher = asyncio.create_task(publish_all(hub, stream))

    async def handled() -> int:
        return int(await hub.value("SELECT count(*) FROM processed_events"))

    async def a_quarter_handled() -> bool:
        return await handled() >= len(stream) // 4

    await wait_until(a_quarter_handled, what="a quarter of the stream handled")
    victim.kill()  # SIGKILL: no drain, no flush, unacked messages and outbox rows left behind
    killed_at = await handled()
    await publisher
    survivor = hub.spawn_worker_process()
    await hub.settle(within=120)

    assert 0 < killed_at < len(stream)
    await assert_tables_match(hub, expect(stream))
    await assert_outbound_matches_tables(hub, await hub.outbound())
    assert survivor.terminate() == 0


async def test_the_per_message_mode_gives_the_same_results(hub: Hub) -> None:
    """HUB_BATCH_MAX=1: one event, one transaction, one ack at a time, through the same code."""
    stream = generate(sessions=80, seed=17)
    await hub.start_worker(batch_max=1)
    await publish_all(hub, stream)
    await hub.settle(within=90)
    await assert_tables_match(hub, expect(stream))
    await assert_outbound_matches_tables(hub, await hub.outbound())


async def test_sigterm_drains_and_exits_zero(hub: Hub) -> None:
    stream = generate(sessions=100, seed=5)
    worker = hub.spawn_worker_process()
    await hub.wait_ready()
    await publish_all(hub, stream)
    assert worker.terminate(timeout=30) == 0
    assert '"event": "worker.stopped"' in worker.log()
    # What it did not get to stays in the stream for the next worker.
    restarted = hub.spawn_worker_process()

    async def started() -> bool:
        # Its handlers are installed before it logs anything of its own: a SIGTERM
        # before that (the stream may already be settled) would find Python's default.
        return '"event": "worker.started"' in restarted.log()

    await wait_until(started, within=60, what="the restarted worker to start")
    await hub.settle(within=60)
    await assert_tables_match(hub, expect(stream))
    assert restarted.terminate() == 0
