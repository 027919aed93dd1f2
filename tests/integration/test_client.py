"""The Python client (worker/client/) against a running worker: Spoke publishes, Alerts follows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from tests.support import Hub, Outbound
from worker.client import AlertEvent, Alerts, Spoke, alert_filters, subscribe
from worker.events import (
    DetectionEscalatedEvent,
    DetectionEvent,
    EndedEvent,
    LifecycleEvent,
    MappingEvent,
    SignalEvent,
    SpawnedEvent,
)

pytestmark = pytest.mark.integration


async def take(alerts: Alerts, n: int, within: float = 20.0) -> list[AlertEvent]:
    found: list[AlertEvent] = []
    async with asyncio.timeout(within):
        while len(found) < n:
            found.append(await anext(aiter(alerts)))
    return found


async def nothing_more(alerts: Alerts, wait: float = 1.0) -> None:
    """No event within `wait` (cancelling the wait ends the iteration: call it last)."""
    try:
        async with asyncio.timeout(wait):
            event = await anext(aiter(alerts))
    except TimeoutError:
        return
    raise AssertionError(f"unexpected event {event}")


async def stored_inbound(hub: Hub) -> list[tuple[dict[str, str], dict[str, object]]]:
    """Headers and body of every message in PU_EVENTS."""
    info = await hub.js.stream_info(hub.settings.events_stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await hub.js.get_msg(hub.settings.events_stream, seq)
        assert msg.data is not None
        found.append((dict(msg.headers or {}), json.loads(msg.data)))
    return found


def event_id(event: Outbound | AlertEvent) -> str:
    return event.body["eventId"] if isinstance(event, Outbound) else str(event.event_id)


async def test_spoke_publishes_every_event_kind(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    published = [
        await spoke.session_spawned("coord", task="coordinate"),
        await spoke.session_spawned(
            "s1",
            parent_session_id="coord",
            workspace_id="ws1",
            task_id="t1",
            task="build",
            metadata={"model": "m-1"},
        ),
        await spoke.session_started("s1"),
        await spoke.heartbeat("s1"),
        await spoke.signal("s1", "model_degradation", "medium", details={"score": 0.4}),
        await spoke.signal("s1", "MODEL_DEGRADATION", "high", details={"score": 0.1}),
        await spoke.signal("s1", "high_error_count", "low", fingerprint="tool-x"),
        await spoke.session_completed("s1", reason="done"),
        await spoke.session_archived("s1"),
        await spoke.session_spawned("s2"),
        await spoke.session_failed("s2", reason="OOM"),
        await spoke.session_spawned("s3"),
        await spoke.session_aborted("s3", reason="cancelled"),
    ]
    await hub.settle()

    spawned, started, signal, completed = published[1], published[2], published[5], published[7]
    assert isinstance(spawned, SpawnedEvent)
    assert spawned.parent_session_id == "coord"
    assert isinstance(started, LifecycleEvent)
    assert isinstance(signal, SignalEvent)
    assert signal.severity == "high"
    assert isinstance(completed, EndedEvent)
    assert completed.reason == "done"
    assert all(e.spoke_id == "sp1" for e in published)
    assert all(e.occurred_at.utcoffset() == timedelta(0) for e in published)
    # Time-ordered eventIds: the ledger's index takes them at its right edge.
    assert {e.event_id.version for e in published} == {7}

    # Every event went out once, with its eventId as Nats-Msg-Id, and was applied.
    stored = await stored_inbound(hub)
    assert [body["eventId"] for _, body in stored] == [str(e.event_id) for e in published]
    assert all(headers["Nats-Msg-Id"] == body["eventId"] for headers, body in stored)
    assert all(str(body["occurredAt"]).endswith("+00:00") for _, body in stored)
    applied = {r["event_id"] for r in await hub.rows("SELECT event_id FROM processed_events")}
    assert applied == {e.event_id for e in published}
    assert await hub.value("SELECT count(*) FROM dead_letters") == 0

    sessions = {
        r["id"]: r for r in await hub.rows("SELECT id, status, archived_at, metadata FROM sessions")
    }
    assert sessions["s1"]["status"] == "completed"
    assert sessions["s1"]["archived_at"] is not None
    assert sessions["s1"]["metadata"] == {"model": "m-1"}  # later events carried none
    assert sessions["s2"]["status"] == "failed"
    assert sessions["s3"]["status"] == "aborted"
    assert sessions["coord"]["status"] == "active"
    mapping = (await hub.rows("SELECT * FROM mappings WHERE session_id = 's1'"))[0]
    assert (mapping["parent_session_id"], mapping["workspace_id"]) == ("coord", "ws1")
    assert (mapping["task_id"], mapping["task"], mapping["status"]) == ("t1", "build", "completed")
    assert mapping["metadata"] == {"model": "m-1"}
    detections = await hub.rows(
        "SELECT anomaly_type, severity, occurrence_count, resolution FROM detections "
        "ORDER BY anomaly_type"
    )
    assert detections == [
        {
            "anomaly_type": "HIGH_ERROR_COUNT",
            "severity": "low",
            "occurrence_count": 1,
            "resolution": "auto_resolved",
        },
        {
            "anomaly_type": "MODEL_DEGRADATION",
            "severity": "high",
            "occurrence_count": 2,
            "resolution": "auto_resolved",
        },
    ]

    # Sessions are applied concurrently: their events interleave in any order.
    subjects = {e.subject.removeprefix(f"{hub.prefix}.") for e in await hub.outbound_in_sequence()}
    for expected in [
        "mapping.active.coord",
        "mapping.active.s1",
        "detection.opened.medium.model_degradation",
        "detection.escalated.high.model_degradation",
        "detection.opened.low.high_error_count",
        "mapping.completed.s1",
        "detection.resolved.high.model_degradation",
        "detection.resolved.low.high_error_count",
        "mapping.failed.s2",
        "mapping.aborted.s3",
    ]:
        assert expected in subjects


async def test_spoke_validates_before_publishing(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    with pytest.raises(ValidationError):
        await spoke.heartbeat("not a session id")
    with pytest.raises(ValidationError):
        await spoke.session_spawned("s1", task="t" * 257)
    with pytest.raises(ValidationError):
        await spoke.signal("s1", "model_degradation", "urgent")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await spoke.heartbeat("s1", occurred_at=datetime(2026, 1, 1))  # no offset
    with pytest.raises(ValueError, match="kind"):
        await spoke.signal("s1", "Bad-Kind", "high")
    with pytest.raises(ValueError, match="limit"):
        await spoke.heartbeat("s1", metadata={"pad": "x" * 70_000})
    with pytest.raises(ValueError, match="spoke id"):
        Spoke(hub.nc, "not a spoke", prefix=hub.prefix)
    info = await hub.js.stream_info(hub.settings.events_stream)
    assert info.state.messages == 0


async def test_connect_and_republish_the_same_event(hub: Hub) -> None:
    await hub.start_worker()
    async with await Spoke.connect(hub.nats_url, "sp1", prefix=hub.prefix) as spoke:
        first = await spoke.heartbeat("s1", metadata={"n": 1})
        again = await spoke.heartbeat(
            "s1", event_id=first.event_id, occurred_at=first.occurred_at, metadata={"n": 1}
        )
        assert again == first
    assert spoke._owned is None
    await hub.settle()
    assert await hub.value("SELECT count(*) FROM processed_events") == 1
    assert (await hub.js.stream_info(hub.settings.events_stream)).state.messages == 1


async def test_a_durable_subscriber_catches_up_after_being_offline(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)

    async with subscribe(hub.nc, hub.prefix, durable="pager", severities=["high"]) as alerts:
        first = await spoke.signal("s1", "model_degradation", "high")
        [seen] = await take(alerts, 1)
        assert isinstance(seen, DetectionEvent)
        assert seen.type == "detection.opened"
        assert seen.causation_id == first.event_id
    # The durable consumer outlives its subscriber.
    assert await hub.js.consumer_info(hub.settings.out_stream, "pager")

    # While nobody listens:
    await spoke.signal("s2", "model_degradation", "low")
    await spoke.signal("s2", "model_degradation", "high")  # escalated: high
    await spoke.signal("s3", "high_error_count", "high")
    await spoke.signal("s3", "high_error_count", "medium")  # repeated, still high
    await hub.settle()

    async with subscribe(hub.nc, hub.prefix, durable="pager", severities=["high"]) as alerts:
        caught_up = await take(alerts, 3)
        await nothing_more(alerts)
    # Two sessions: applied concurrently, so their events interleave in any order.
    changes = sorted(
        (e.detection.session_id, e.type) for e in caught_up if not isinstance(e, MappingEvent)
    )
    assert changes == [
        ("s2", "detection.escalated"),
        ("s3", "detection.opened"),
        ("s3", "detection.repeated"),
    ]
    [escalated] = [e for e in caught_up if isinstance(e, DetectionEscalatedEvent)]
    assert escalated.previous_severity == "low"

    # Nothing is delivered twice to the same durable; new filters apply from its last ack on
    # (the low signal of s2, before it, is not delivered).
    await spoke.signal("s4", "model_degradation", "low")
    await spoke.signal("s4", "high_error_count", "high")
    await hub.settle()
    async with subscribe(
        hub.nc, hub.prefix, durable="pager", severities=["low"], kinds=["model_degradation"]
    ) as alerts:
        [low] = await take(alerts, 1)
        await nothing_more(alerts)
    assert isinstance(low, DetectionEvent)
    assert (low.detection.session_id, low.detection.severity) == ("s4", "low")


def matches(
    prefix: str,
    severities: set[str] | None = None,
    kinds: set[str] | None = None,
    sessions: set[str] | None = None,
    mappings: bool = False,
) -> Callable[[Outbound], bool]:
    def check(event: Outbound) -> bool:
        tokens = event.subject.removeprefix(f"{prefix}.").split(".")
        if tokens[0] == "mapping":
            return mappings and (not sessions or tokens[2] in sessions)
        if tokens[0] != "detection":
            return False
        _, _, severity, kind = tokens
        session = event.body["detection"]["sessionId"]
        return (
            (not severities or severity in severities)
            and (not kinds or kind in kinds)
            and (not sessions or session in sessions)
        )

    return check


async def test_filters_by_severity_kind_session_and_mappings(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    for session in ("s1", "s2"):
        await spoke.session_spawned(session)
        await spoke.signal(session, "model_degradation", "low")
        await spoke.signal(session, "high_error_count", "medium")
        await spoke.signal(session, "high_error_count", "high")
        await spoke.signal(session, "tool_loop", "high", fingerprint="grep")
    await spoke.session_completed("s2")
    await hub.settle()
    everything = await hub.outbound_in_sequence()

    cases: list[tuple[dict[str, object], Callable[[Outbound], bool]]] = [
        ({}, matches(hub.prefix)),
        ({"severities": ["high"]}, matches(hub.prefix, severities={"high"})),
        ({"kinds": ["HIGH_ERROR_COUNT"]}, matches(hub.prefix, kinds={"high_error_count"})),
        (
            {"severities": ["high", "low"], "kinds": ["model_degradation", "tool_loop"]},
            matches(hub.prefix, {"high", "low"}, {"model_degradation", "tool_loop"}),
        ),
        ({"sessions": ["s2"]}, matches(hub.prefix, sessions={"s2"})),
        (
            {"sessions": ["s2"], "include_mappings": True},
            matches(hub.prefix, sessions={"s2"}, mappings=True),
        ),
        ({"include_mappings": True}, matches(hub.prefix, mappings=True)),
    ]
    for options, wanted in cases:
        expected = [e.body["eventId"] for e in everything if wanted(e)]
        assert expected, options
        async with subscribe(hub.js, hub.prefix, since="all", **options) as alerts:  # type: ignore[arg-type]
            got = await take(alerts, len(expected))
            await nothing_more(alerts, wait=0.5)
        assert [event_id(e) for e in got] == expected, options
    # Ephemeral consumers are gone once closed.
    consumers = await hub.js.consumers_info(hub.settings.out_stream)
    assert [c.name for c in consumers if c.name.startswith("alerts-")] == []


async def test_since_and_deliver_new(hub: Hub) -> None:
    await hub.start_worker()
    spoke = Spoke(hub.nc, "sp1", prefix=hub.prefix)
    await spoke.signal("old", "model_degradation", "high")
    await hub.settle()
    await asyncio.sleep(0.2)
    boundary = datetime.now(UTC)
    await asyncio.sleep(0.2)
    await spoke.signal("mid", "model_degradation", "high")
    await hub.settle()

    async with subscribe(hub.nc, hub.prefix, since=boundary) as since_boundary:
        [mid] = await take(since_boundary, 1)
        await nothing_more(since_boundary, wait=0.5)
    assert isinstance(mid, DetectionEvent)
    assert mid.detection.session_id == "mid"

    # By default only what is published after `async with` entered: not "old" nor "mid".
    async with subscribe(hub.nc, hub.prefix) as from_now:
        await spoke.signal("new", "model_degradation", "high")
        [new] = await take(from_now, 1)
        await nothing_more(from_now, wait=0.5)
    assert isinstance(new, DetectionEvent)
    assert new.detection.session_id == "new"

    # A plain `async for` with `break` works too (the loop's exit closes it).
    await spoke.signal("new2", "model_degradation", "high")
    await hub.settle()
    async for event in subscribe(hub.nc, hub.prefix, since="all", sessions=["new2"]):
        assert isinstance(event, DetectionEvent)
        assert event.detection.session_id == "new2"
        break


def test_alert_filters() -> None:
    assert alert_filters("hub") == ["hub.detection.>"]
    assert alert_filters("hub", ["high"]) == ["hub.detection.*.high.*"]
    assert alert_filters("hub", kinds=["MODEL_DEGRADATION"]) == [
        "hub.detection.*.*.model_degradation"
    ]
    assert alert_filters("hub", ["low", "high"], ["a", "b"]) == [
        "hub.detection.*.high.a",
        "hub.detection.*.high.b",
        "hub.detection.*.low.a",
        "hub.detection.*.low.b",
    ]
    assert alert_filters("hub", sessions=["s1"], include_mappings=True) == [
        "hub.detection.>",
        "hub.mapping.*.s1",
    ]
    assert alert_filters("hub", include_mappings=True)[-1] == "hub.mapping.>"
    for bad in ({"severities": ["urgent"]}, {"kinds": ["Bad-Kind"]}, {"sessions": ["a b"]}):
        with pytest.raises(ValueError, match="must"):
            alert_filters("hub", **bad)  # type: ignore[arg-type]
