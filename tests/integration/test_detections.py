"""Signals become deduplicated detections (contract section 4, signal rules; section 5)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from tests.support import Hub

pytestmark = pytest.mark.integration


def expected_key(anomaly_type: str, session: str, fingerprint: str | None = None) -> str:
    material = f"v1\x1f{anomaly_type}\x1f{session}\x1f{fingerprint or ''}"
    return hashlib.sha256(material.encode()).hexdigest()


async def test_signal_opens_a_detection_and_publishes_opened(hub: Hub) -> None:
    await hub.start_worker()
    sent = await hub.send(
        "sp1", "s1", "signal.model_degradation", severity="medium", details={"p95": 9.5}
    )
    await hub.settle()

    rows = await hub.rows("SELECT * FROM detections")
    assert len(rows) == 1
    row = rows[0]
    assert row["session_id"] == "s1"
    assert row["anomaly_type"] == "MODEL_DEGRADATION"
    assert row["severity"] == "medium"
    assert row["details"] == {"p95": 9.5}
    assert row["occurrence_count"] == 1
    assert row["resolved_at"] is None
    assert row["dedup_key"] == expected_key("MODEL_DEGRADATION", "s1")

    events = await hub.outbound(f"{hub.prefix}.detection.>")
    assert [e.subject for e in events] == [
        f"{hub.prefix}.detection.opened.medium.model_degradation"
    ]
    body = events[0].body
    assert body["type"] == "detection.opened"
    assert body["causationId"] == sent["eventId"]
    assert events[0].headers["Nats-Msg-Id"] == body["eventId"]
    assert body["detection"]["id"] == row["id"]
    assert body["detection"]["occurrenceCount"] == 1
    assert body["detection"]["dedupKey"] == row["dedup_key"]
    assert "previousSeverity" not in body
    # The session and spoke exist now.
    assert await hub.value("SELECT spoke_id FROM sessions WHERE id = 's1'") == "sp1"
    assert await hub.value("SELECT count(*) FROM spokes WHERE id = 'sp1'") == 1


async def test_repeats_count_and_severity_only_rises(hub: Hub) -> None:
    await hub.start_worker()
    for severity in ["low", "low", "high", "medium", "low"]:
        await hub.send(
            "sp1", "s1", "signal.high_error_count", severity=severity, details={"s": severity}
        )
    await hub.settle()

    rows = await hub.rows("SELECT severity, occurrence_count, details FROM detections")
    assert rows == [{"severity": "high", "occurrence_count": 5, "details": {"s": "low"}}]
    events = await hub.outbound(f"{hub.prefix}.detection.>")
    changes = [e.subject.split(".", 2)[2] for e in events]
    # `repeated` events may be coalesced (contract section 5); the others never are.
    assert [c for c in changes if not c.startswith("repeated.")] == [
        "opened.low.high_error_count",
        "escalated.high.high_error_count",
    ]
    assert set(changes) <= {
        "opened.low.high_error_count",
        "repeated.low.high_error_count",
        "escalated.high.high_error_count",
        "repeated.high.high_error_count",
    }
    escalated = next(e.body for e in events if e.body["type"] == "detection.escalated")
    assert escalated["previousSeverity"] == "low"
    assert escalated["detection"]["severity"] == "high"
    assert escalated["detection"]["occurrenceCount"] == 3
    counts = [e.body["detection"]["occurrenceCount"] for e in events]
    assert counts == sorted(counts)
    assert counts[-1] == 5


async def test_fingerprint_and_kind_and_session_make_separate_detections(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low", fingerprint="gpu-0")
    await hub.send("sp1", "s1", "signal.high_error_count", severity="low")
    await hub.send("sp1", "s2", "signal.model_degradation", severity="low")
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low", fingerprint="gpu-0")
    await hub.settle()

    counts = {
        (r["session_id"], r["anomaly_type"], r["dedup_key"]): r["occurrence_count"]
        for r in await hub.rows("SELECT * FROM detections")
    }
    assert counts == {
        ("s1", "MODEL_DEGRADATION", expected_key("MODEL_DEGRADATION", "s1")): 1,
        ("s1", "MODEL_DEGRADATION", expected_key("MODEL_DEGRADATION", "s1", "gpu-0")): 2,
        ("s1", "HIGH_ERROR_COUNT", expected_key("HIGH_ERROR_COUNT", "s1")): 1,
        ("s2", "MODEL_DEGRADATION", expected_key("MODEL_DEGRADATION", "s2")): 1,
    }


async def test_same_event_id_delivered_three_times_applies_once(hub: Hub) -> None:
    await hub.start_worker()
    body = await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
    await hub.resend("sp1", "s1", "signal.model_degradation", body)
    await hub.resend("sp1", "s1", "signal.model_degradation", body)
    await hub.settle()

    assert await hub.value("SELECT count(*) FROM processed_events") == 1
    assert await hub.value("SELECT occurrence_count FROM detections") == 1
    events = await hub.outbound(f"{hub.prefix}.detection.>")
    assert len(events) == 1
    # Three messages really reached the stream: the worker, not JetStream, deduplicated.
    info = await hub.js.stream_info(hub.settings.events_stream)
    assert info.state.messages == 3


async def test_late_news_after_a_resolve_counts_without_reopening(hub: Hub) -> None:
    await hub.start_worker()
    await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
    await hub.settle()
    resolved_at = datetime.now(UTC)
    await hub.db.execute(
        "UPDATE detections SET resolved_at = $1, resolution = 'fixed'", resolved_at
    )

    before = (resolved_at - timedelta(seconds=5)).isoformat()
    await hub.send("sp1", "s1", "signal.model_degradation", severity="high", occurredAt=before)
    await hub.settle()
    rows = await hub.rows("SELECT occurrence_count, resolved_at, severity FROM detections")
    assert len(rows) == 1
    assert rows[0]["occurrence_count"] == 2
    assert rows[0]["resolved_at"] is not None
    assert rows[0]["severity"] == "low"
    last = (await hub.outbound(f"{hub.prefix}.detection.>"))[-1]
    assert last.body["detection"]["occurrenceCount"] == 2
    assert last.body["detection"]["resolvedAt"] is not None

    after = (resolved_at + timedelta(seconds=1)).isoformat()
    await hub.send("sp1", "s1", "signal.model_degradation", severity="medium", occurredAt=after)
    await hub.settle()
    rows = await hub.rows(
        "SELECT occurrence_count, resolved_at, severity FROM detections ORDER BY created_at"
    )
    assert len(rows) == 2
    assert rows[1] == {"occurrence_count": 1, "resolved_at": None, "severity": "medium"}
    opened = await hub.outbound(f"{hub.prefix}.detection.opened.>")
    assert len(opened) == 2


async def test_without_the_ledger_a_redelivered_event_is_counted_twice(hub: Hub) -> None:
    """Negative control of the once-only test above: with the ledger forgotten, the same
    eventId really is applied again, so that test would catch a missing ledger."""
    await hub.start_worker()
    body = await hub.send("sp1", "s1", "signal.model_degradation", severity="low")
    await hub.settle()
    await hub.db.execute("TRUNCATE processed_events")
    await hub.resend("sp1", "s1", "signal.model_degradation", body)
    await hub.settle()
    assert await hub.value("SELECT occurrence_count FROM detections") == 2
