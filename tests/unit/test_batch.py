"""worker.batch.simulate: a batch of events applied in memory, in order (section 4)."""

from __future__ import annotations

import copy
import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch
from uuid import UUID, uuid4

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batch import DetectionRow, Reach, SessionRow, Snapshot, reach, simulate
from worker.domain import LIFECYCLES, SESSION_STALL, DeadLetterError, DeadLetterReason, dedup_key
from worker.intake import Intake, decode

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
P = "hub"


def event(what: str, session: str = "s1", spoke: str = "sp1", **fields: Any) -> Intake:
    body = {
        "eventId": str(uuid4()),
        "occurredAt": (NOW - timedelta(seconds=30)).isoformat(),
        "spokeId": spoke,
        "sessionId": session,
        **fields,
    }
    return decode(P, f"{P}.spoke.{spoke}.session.{session}.{what}", json.dumps(body).encode())


def snapshot(**overrides: Any) -> Snapshot:
    base: dict[str, Any] = {
        "now": NOW,
        "applied": set(),
        "sessions": {},
        "mappings": {},
        "active": {},
        "newest_resolved": {},
    }
    return Snapshot(**(base | overrides))


def types(plan_outbound: list[Any]) -> list[tuple[str, int | str]]:
    found = []
    for row in plan_outbound:
        body = json.loads(row.payload)
        if "detection" in body:
            found.append((body["type"], body["detection"]["occurrenceCount"]))
        else:
            found.append((body["type"], body.get("mapping", {}).get("status", "")))
    return found


def test_repeated_events_coalesce_but_never_across_an_escalation() -> None:
    batch = [
        event("signal.model_degradation", severity="low"),
        event("signal.model_degradation", severity="low"),
        event("signal.model_degradation", severity="low"),
        event("signal.model_degradation", severity="high"),
        event("signal.model_degradation", severity="medium"),
        event("signal.model_degradation", severity="low"),
    ]
    plan = simulate(P, batch, snapshot())
    assert plan.outcomes == ["applied"] * 6
    assert types(plan.outbound) == [
        ("detection.opened", 1),
        ("detection.repeated", 3),
        ("detection.escalated", 4),
        ("detection.repeated", 6),
    ]
    (row,) = plan.new_detections.values()
    assert (row.severity, row.occurrence_count) == ("high", 6)


def test_the_same_event_twice_in_a_batch_applies_once() -> None:
    first = event("signal.model_degradation", severity="low")
    plan = simulate(P, [first, first], snapshot())
    assert plan.outcomes == ["applied", "duplicate"]
    assert plan.ledger == [first.event.event_id]


def test_an_event_already_in_the_ledger_is_a_duplicate() -> None:
    seen = event("heartbeat")
    plan = simulate(P, [seen], snapshot(applied={seen.event.event_id}))
    assert plan.outcomes == ["duplicate"]
    assert not plan.sessions
    assert not plan.ledger


def test_another_spokes_event_is_a_spoke_mismatch_and_not_recorded() -> None:
    sessions = {"s1": SessionRow("s1", "sp1")}
    forged = event("completed", spoke="sp2")
    plan = simulate(P, [forged], snapshot(sessions=sessions))
    (outcome,) = plan.outcomes
    assert isinstance(outcome, DeadLetterError)
    assert outcome.reason is DeadLetterReason.SPOKE_MISMATCH
    assert plan.ledger == []
    assert sessions["s1"].status == "active"
    assert "sp2" not in plan.spokes


def test_terminal_before_spawned_in_one_batch() -> None:
    plan = simulate(P, [event("failed"), event("spawned")], snapshot())
    assert plan.new_mappings["s1"].status == "failed"
    assert types(plan.outbound) == [("mapping.failed", "failed")]


def test_archived_resolves_everything_and_later_events_are_ignored() -> None:
    batch = [
        event("spawned"),
        event("signal.high_error_count", severity="high"),
        event("archived"),
        event("signal.high_error_count", severity="high"),
    ]
    plan = simulate(P, batch, snapshot())
    assert plan.outcomes == ["applied", "applied", "applied", "ignored"]
    (row,) = plan.new_detections.values()
    assert (row.resolution, row.resolved_at, row.occurrence_count) == ("auto_resolved", NOW, 1)
    assert plan.sessions["s1"].status == "aborted"
    assert plan.new_mappings["s1"].status == "aborted"


def test_late_news_counts_on_the_resolved_row() -> None:
    key = dedup_key("MODEL_DEGRADATION", "s1", None)
    resolved = DetectionRow(
        id="d1",
        session_id="s1",
        anomaly_type="MODEL_DEGRADATION",
        severity="low",
        details=None,
        dedup_key=key,
        occurrence_count=3,
        created_at=NOW - timedelta(hours=1),
        updated_at=NOW - timedelta(seconds=10),
        resolved_at=NOW - timedelta(seconds=10),
        resolution="fixed",
    )
    snap = snapshot(sessions={"s1": SessionRow("s1", "sp1")}, newest_resolved={key: resolved})
    late = event("signal.model_degradation", severity="high")  # 30 s ago: before the resolve
    fresh = event(
        "signal.model_degradation",
        severity="low",
        occurredAt=(NOW - timedelta(seconds=5)).isoformat(),
    )
    plan = simulate(P, [late, fresh], snap)
    assert plan.outcomes == ["late", "applied"]
    assert resolved.occurrence_count == 4
    assert resolved.severity == "low"
    assert plan.changed_detections == {"d1": resolved}
    (opened,) = plan.new_detections.values()
    assert opened.resolved_at is None


def test_a_heartbeat_ends_the_stall_and_older_stall_news_reopens_nothing() -> None:
    plan = simulate(
        P,
        [
            event("signal.session_stall", severity="medium"),
            event("heartbeat"),
            event("signal.session_stall", severity="medium"),
        ],
        snapshot(),
    )
    assert plan.outcomes == ["applied", "applied", "late"]
    (stall,) = plan.new_detections.values()
    assert stall.resolution == "auto_resolved"
    assert stall.occurrence_count == 2
    assert types(plan.outbound) == [
        ("detection.opened", 1),
        ("detection.resolved", 1),
        ("detection.repeated", 2),
    ]


def test_a_spoke_clock_ahead_of_ours_counts_as_now() -> None:
    ahead = event("heartbeat", occurredAt=(NOW + timedelta(hours=3)).isoformat())
    plan = simulate(P, [ahead], snapshot())
    assert plan.sessions["s1"].last_activity_at == NOW


def test_the_ids_a_batch_makes_are_time_ordered() -> None:
    # Version 7: new detections and outbound events take the right edge of their
    # indexes (worker.ids), however large the tables are.
    plan = simulate(
        P, [event("spawned"), event("signal.model_degradation", severity="low")], snapshot()
    )
    (row,) = plan.new_detections.values()
    assert UUID(row.id).version == 7
    assert {json.loads(r.payload)["eventId"][14] for r in plan.outbound} == {"7"}
    assert {r.event_id.version for r in plan.outbound} == {7}


# What a batch loads: `reach` against every active detection of its sessions.
_KINDS = ("model_degradation", "high_error_count", "session_stall")
_FINGERPRINTS = (None, "a", "b")
_SESSIONS = ("s1", "s2", "s3")
_signals = st.builds(
    lambda kind, fingerprint, severity, session: (
        f"signal.{kind}",
        session,
        {"severity": severity} | ({"fingerprint": fingerprint} if fingerprint else {}),
    ),
    st.sampled_from(_KINDS),
    st.sampled_from(_FINGERPRINTS),
    st.sampled_from(("low", "medium", "high")),
    st.sampled_from(_SESSIONS),
)
_lifecycles = st.tuples(st.sampled_from(LIFECYCLES), st.sampled_from(_SESSIONS), st.just({}))
# Active detections before the batch: (session, kind, fingerprint) of each.
_existing = st.sets(
    st.tuples(st.sampled_from(_SESSIONS), st.sampled_from(_KINDS), st.sampled_from(_FINGERPRINTS))
)


def _active_before(existing: set[tuple[str, str, str | None]]) -> dict[str, DetectionRow]:
    rows = {}
    for n, (session, kind, fingerprint) in enumerate(sorted(existing, key=str)):
        key = dedup_key(kind.upper(), session, fingerprint)
        rows[key] = DetectionRow(
            id=f"d{n}",
            session_id=session,
            anomaly_type=kind.upper(),
            severity="medium",
            details=None,
            dedup_key=key,
            occurrence_count=2,
            created_at=NOW - timedelta(hours=1, seconds=n),
            updated_at=NOW - timedelta(hours=1),
        )
    return rows


def _within(active: dict[str, DetectionRow], reached: Reach) -> dict[str, DetectionRow]:
    """What batch_detections loads of `active`, by `reached`."""
    return {
        key: row
        for key, row in active.items()
        if key in reached.keys
        or row.session_id in reached.all_of
        or (row.session_id in reached.stalls_of and row.anomaly_type == SESSION_STALL)
    }


def _plan_of(batch: list[Intake], active: dict[str, DetectionRow]) -> list[object]:
    """The plan `simulate` makes, its made-up ids counted from 1 (the random ones
    order the new detections an archived resolves: `_auto_resolve`)."""
    counted = (UUID(int=(7 << 76) | n) for n in itertools.count(1))
    sessions = {s: SessionRow(s, "sp1") for s in _SESSIONS}
    snap = snapshot(sessions=sessions, active={k: copy.copy(r) for k, r in active.items()})
    with (
        patch("worker.batch.uuid7", lambda: next(counted)),
        patch("worker.outbound.uuid7", lambda: next(counted)),
    ):
        plan = simulate(P, batch, snap)
    return [
        plan.outcomes,
        [vars(r) for r in plan.changed_detections.values()],
        [vars(r) for r in plan.new_detections.values()],
        [vars(r) for r in plan.outbound],
    ]


@settings(max_examples=400, deadline=None)
@given(
    events=st.lists(st.one_of(_signals, _lifecycles), min_size=1, max_size=12),
    existing=_existing,
)
def test_a_batch_needs_no_active_detection_beyond_its_reach(
    events: list[tuple[str, str, dict[str, Any]]], existing: set[tuple[str, str, str | None]]
) -> None:
    """`simulate` on what `reach` loads plans what it plans on every active detection
    of the batch's sessions (batch_detections loaded all of them before)."""
    batch = [event(what, session, **fields) for what, session, fields in events]
    active = _active_before(existing)
    narrowed = _within(active, reach(batch))
    assert _plan_of(batch, narrowed) == _plan_of(batch, active)
