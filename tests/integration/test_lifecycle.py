"""Session lifecycle advances sessions and mappings (contract section 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.support import Hub

pytestmark = pytest.mark.integration


async def test_spawned_creates_the_mapping_and_what_it_references(hub: Hub) -> None:
    await hub.start_worker()
    sent = await hub.send(
        "sp1",
        "s1",
        "spawned",
        parentSessionId="coord-1",
        workspaceId="ws-1",
        taskId="task-1",
        task="fix the flaky test",
        metadata={"branch": "fix/flaky"},
    )
    await hub.send("sp1", "s1", "spawned")  # a second spawned changes nothing
    await hub.settle()

    mappings = await hub.rows("SELECT * FROM mappings")
    assert len(mappings) == 1
    mapping = mappings[0]
    assert mapping["session_id"] == "s1"
    assert mapping["spoke_id"] == "sp1"
    assert mapping["workspace_id"] == "ws-1"
    assert mapping["parent_session_id"] == "coord-1"
    assert mapping["task_id"] == "task-1"
    assert mapping["task"] == "fix the flaky test"
    assert mapping["status"] == "active"
    assert mapping["metadata"] == {"branch": "fix/flaky"}
    assert await hub.value("SELECT count(*) FROM workspaces WHERE id = 'ws-1'") == 1
    assert await hub.value("SELECT count(*) FROM tasks WHERE id = 'task-1'") == 1
    assert await hub.value("SELECT status FROM sessions WHERE id = 's1'") == "active"

    events = await hub.outbound(f"{hub.prefix}.mapping.>")
    assert [e.subject for e in events] == [f"{hub.prefix}.mapping.active.s1"]
    body = events[0].body
    assert body["type"] == "mapping.active"
    assert body["previousStatus"] is None
    assert body["causationId"] == sent["eventId"]
    assert body["mapping"]["parentSessionId"] == "coord-1"
    assert body["mapping"]["id"] == mapping["id"]


@pytest.mark.parametrize("terminal", ["completed", "failed", "aborted"])
async def test_terminal_event_ends_session_and_mapping_once(hub: Hub, terminal: str) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "spawned")
    await hub.send("sp1", "s1", terminal, reason="done")
    other = "failed" if terminal != "failed" else "completed"
    await hub.send("sp1", "s1", other)  # terminal never changes again
    await hub.settle()

    assert await hub.value("SELECT status FROM mappings") == terminal
    session = (await hub.rows("SELECT status, ended_at FROM sessions WHERE id = 's1'"))[0]
    assert session["status"] == terminal
    assert session["ended_at"] is not None
    events = await hub.outbound(f"{hub.prefix}.mapping.>")
    assert [e.subject for e in events] == [
        f"{hub.prefix}.mapping.active.s1",
        f"{hub.prefix}.mapping.{terminal}.s1",
    ]
    assert events[1].body["previousStatus"] == "active"
    assert events[1].body["mapping"]["status"] == terminal
    # The conflicting event was acked (nothing pending), not dead-lettered.
    assert await hub.value("SELECT count(*) FROM dead_letters") == 0


async def test_terminal_before_spawned_creates_the_mapping_in_that_status(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "failed", reason="crashed at start")
    await hub.send("sp1", "s1", "spawned", parentSessionId="coord")
    await hub.settle()

    assert await hub.value("SELECT status FROM mappings WHERE session_id = 's1'") == "failed"
    assert await hub.value("SELECT status FROM sessions WHERE id = 's1'") == "failed"
    events = await hub.outbound(f"{hub.prefix}.mapping.>")
    assert [(e.subject, e.body["previousStatus"]) for e in events] == [
        (f"{hub.prefix}.mapping.failed.s1", None)
    ]


async def test_archived_closes_session_aborts_mapping_and_resolves_detections(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "spawned")
    await hub.send("sp1", "s1", "signal.model_degradation", severity="high")
    await hub.send("sp1", "s1", "signal.high_error_count", severity="low")
    await hub.send("sp1", "s1", "archived")
    await hub.send("sp1", "s1", "signal.model_degradation", severity="high")  # ignored
    await hub.send("sp1", "s1", "completed")  # ignored
    await hub.settle()

    session = (await hub.rows("SELECT status, archived_at FROM sessions WHERE id = 's1'"))[0]
    assert session["status"] == "aborted"
    assert session["archived_at"] is not None
    assert await hub.value("SELECT status FROM mappings") == "aborted"
    detections = await hub.rows(
        "SELECT anomaly_type, resolved_at, resolution, resolved_by, occurrence_count FROM detections"
    )
    assert len(detections) == 2
    for detection in detections:
        assert detection["resolved_at"] is not None
        assert detection["resolution"] == "auto_resolved"
        assert detection["resolved_by"] is None
        assert detection["occurrence_count"] == 1

    subjects = [e.subject for e in await hub.outbound()]
    p = hub.prefix
    assert subjects[-3:-2] == [f"{p}.mapping.aborted.s1"]
    assert sorted(subjects[-2:]) == [
        f"{p}.detection.resolved.high.model_degradation",
        f"{p}.detection.resolved.low.high_error_count",
    ]
    assert len(subjects) == 6


async def test_completed_then_archived_keeps_completed(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "spawned")
    await hub.send("sp1", "s1", "completed")
    await hub.send("sp1", "s1", "archived")
    await hub.settle()
    assert await hub.value("SELECT status FROM mappings") == "completed"
    assert await hub.value("SELECT status FROM sessions") == "completed"


async def test_any_lifecycle_event_resolves_the_session_stall(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "signal.session_stall", severity="medium")
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
    await hub.settle()
    assert await hub.value("SELECT count(*) FROM detections WHERE resolved_at IS NULL") == 2

    await hub.send("sp1", "s1", "heartbeat")
    await hub.settle()
    rows = await hub.rows("SELECT anomaly_type, resolution FROM detections ORDER BY anomaly_type")
    assert rows == [
        {"anomaly_type": "MODEL_DEGRADATION", "resolution": None},
        {"anomaly_type": "SESSION_STALL", "resolution": "auto_resolved"},
    ]
    resolved = await hub.outbound(f"{hub.prefix}.detection.resolved.>")
    assert [e.subject for e in resolved] == [
        f"{hub.prefix}.detection.resolved.medium.session_stall"
    ]


async def test_what_a_later_batch_ends_is_found_in_the_database(hub: Hub) -> None:
    """A batch loads only the detections it can touch (worker.batch.Reach): a lifecycle
    event's stalls, a spoke's fingerprinted one too, and everything of an archive, all
    committed by earlier batches."""
    await hub.start_worker()
    await hub.send("sp1", "s1", "signal.session_stall", severity="low", fingerprint="spoke")
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
    await hub.send("sp1", "s2", "signal.high_error_count", severity="high")
    await hub.send("sp1", "s2", "signal.model_degradation", severity="low", fingerprint="x")
    await hub.settle()

    await hub.send("sp1", "s1", "heartbeat")
    await hub.send("sp1", "s2", "archived")
    await hub.settle()
    rows = await hub.rows(
        "SELECT session_id, anomaly_type, resolution FROM detections"
        " ORDER BY session_id, anomaly_type"
    )
    assert rows == [
        {"session_id": "s1", "anomaly_type": "MODEL_DEGRADATION", "resolution": None},
        {"session_id": "s1", "anomaly_type": "SESSION_STALL", "resolution": "auto_resolved"},
        {"session_id": "s2", "anomaly_type": "HIGH_ERROR_COUNT", "resolution": "auto_resolved"},
        {"session_id": "s2", "anomaly_type": "MODEL_DEGRADATION", "resolution": "auto_resolved"},
    ]


async def test_last_activity_only_moves_forward_and_never_past_now(hub: Hub) -> None:
    await hub.start_worker()
    now = datetime.now(UTC)
    await hub.send("sp1", "s1", "started", occurredAt=(now - timedelta(minutes=1)).isoformat())
    await hub.send("sp1", "s1", "heartbeat", occurredAt=(now - timedelta(minutes=5)).isoformat())
    await hub.settle()
    last = await hub.value("SELECT last_activity_at FROM sessions WHERE id = 's1'")
    assert abs((last - (now - timedelta(minutes=1))).total_seconds()) < 0.01

    await hub.send("sp1", "s1", "heartbeat", occurredAt=(now + timedelta(hours=2)).isoformat())
    await hub.settle()
    last = await hub.value("SELECT last_activity_at FROM sessions WHERE id = 's1'")
    assert last <= datetime.now(UTC)
    assert last >= now


async def test_a_session_belongs_to_the_spoke_that_reported_it_first(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "spawned")
    forged = await hub.send("sp2", "s1", "completed")
    await hub.settle()

    assert await hub.value("SELECT status FROM mappings") == "active"
    assert await hub.value("SELECT count(*) FROM spokes WHERE id = 'sp2'") == 0
    letters = await hub.rows("SELECT reason, subject, error FROM dead_letters")
    assert len(letters) == 1
    assert letters[0]["reason"] == "spoke_mismatch"
    assert letters[0]["subject"] == hub.subject("sp2", "s1", "completed")
    assert "sp1" in letters[0]["error"]
    # Not recorded as applied: once the cause is fixed it can be replayed.
    assert (
        await hub.value(
            "SELECT count(*) FROM processed_events WHERE event_id = $1::uuid", forged["eventId"]
        )
        == 0
    )


async def test_parent_session_is_claimed_by_its_own_first_event(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "child", "spawned", parentSessionId="coord")
    await hub.settle()
    assert await hub.value("SELECT spoke_id FROM sessions WHERE id = 'coord'") is None
    await hub.send("hubspoke", "coord", "heartbeat")
    await hub.settle()
    assert await hub.value("SELECT spoke_id FROM sessions WHERE id = 'coord'") == "hubspoke"
    assert await hub.value("SELECT count(*) FROM dead_letters") == 0
