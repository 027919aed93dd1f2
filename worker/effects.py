"""What one inbound event does to the hub's tables (contract section 4).

`apply_event` runs inside the caller's transaction and returns the outbound
events the change causes; the caller writes them to the outbox in the same
transaction. Decisions come from `worker.domain`; rows from `worker.db`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from uuid import uuid4

from worker import db, outbound
from worker.db import Connection, OutboxRow
from worker.domain import (
    SESSION_STALL,
    DeadLetterError,
    DeadLetterReason,
    anomaly_type_of,
    dedup_key,
    ended_status,
    is_late_news,
    signal_change,
)
from worker.events import EndedEvent, SignalEvent, SpawnedEvent
from worker.intake import Intake

Outcome = Literal[
    "applied",  # the event changed what it should
    "duplicate",  # its eventId was applied before: nothing changes
    "ignored",  # the session is archived: later events change nothing
    "conflict",  # a terminal event for an already terminal session: acked, logged, counted
    "late",  # a signal about an already resolved detection: counted on that row
]


@dataclass
class Applied:
    outcome: Outcome
    outbound: list[OutboxRow] = field(default_factory=list)


async def apply_event(conn: Connection, prefix: str, intake: Intake) -> Applied:
    event, route = intake.event, intake.route
    if not await db.claim_event(conn, event.event_id):
        return Applied("duplicate")

    session = await db.lock_session(conn, event.session_id, event.spoke_id)
    if session.spoke_id is None:
        await db.claim_session(conn, event.session_id, event.spoke_id)
    elif session.spoke_id != event.spoke_id:
        # Raising rolls the whole transaction back, the ledger row included,
        # so the event can be replayed once the cause is fixed.
        raise DeadLetterError(
            DeadLetterReason.SPOKE_MISMATCH,
            f"session {event.session_id!r} belongs to spoke {session.spoke_id!r}, "
            f"not {event.spoke_id!r}",
        )
    if session.archived_at is not None:
        return Applied("ignored")

    await db.record_activity(conn, event.session_id, event.occurred_at, event.metadata)

    if isinstance(event, SignalEvent):
        assert route.signal_kind is not None
        return await _apply_signal(conn, prefix, event, route.signal_kind)

    applied = Applied("applied")
    causation = event.event_id
    # Any lifecycle event shows the session is alive: its stall is over.
    for detection in await db.auto_resolve(conn, event.session_id, SESSION_STALL):
        applied.outbound.append(
            outbound.detection_changed(prefix, "resolved", detection, causation)
        )

    if isinstance(event, SpawnedEvent):
        # A terminal event may have overtaken spawned; the mapping is then born terminal.
        mapping = await db.insert_mapping(
            conn,
            mapping_id=str(uuid4()),
            session_id=event.session_id,
            spoke_id=event.spoke_id,
            workspace_id=event.workspace_id,
            parent_session_id=event.parent_session_id,
            task_id=event.task_id,
            task=event.task,
            status=session.status,
            metadata=event.metadata,
        )
        if mapping is not None:
            applied.outbound.append(outbound.mapping_changed(prefix, mapping, None, causation))

    elif isinstance(event, EndedEvent):
        assert route.lifecycle is not None
        status = ended_status(route.lifecycle)
        assert status is not None
        if not await db.end_session(conn, event.session_id, status, event.occurred_at):
            applied.outcome = "conflict"
        elif (mapping := await db.end_mapping(conn, event.session_id, status)) is not None:
            applied.outbound.append(outbound.mapping_changed(prefix, mapping, "active", causation))

    elif route.lifecycle == "archived":
        await db.archive_session(conn, event.session_id, event.occurred_at)
        if (mapping := await db.end_mapping(conn, event.session_id, "aborted")) is not None:
            applied.outbound.append(outbound.mapping_changed(prefix, mapping, "active", causation))
        for detection in await db.auto_resolve(conn, event.session_id):
            applied.outbound.append(
                outbound.detection_changed(prefix, "resolved", detection, causation)
            )

    return applied


async def _apply_signal(conn: Connection, prefix: str, event: SignalEvent, kind: str) -> Applied:
    anomaly_type = anomaly_type_of(kind)
    key = dedup_key(anomaly_type, event.session_id, event.fingerprint)
    causation = event.event_id

    previous = await db.active_severity(conn, key)
    if previous is None:
        resolved = await db.newest_resolved(conn, key)
        if resolved is not None and is_late_news(event.occurred_at, resolved[1]):
            detection = await db.add_late_occurrence(conn, resolved[0])
            # Published so that the last event of the detection still carries
            # its committed occurrence count (it stays resolved).
            return Applied(
                "late", [outbound.detection_changed(prefix, "repeated", detection, causation)]
            )

    new_id = str(uuid4())
    detection = await db.upsert_signal(
        conn,
        detection_id=new_id,
        session_id=event.session_id,
        anomaly_type=anomaly_type,
        severity=event.severity,
        details=event.details,
        dedup_key=key,
    )
    if detection.id != new_id and previous is None:
        # Another transaction opened this key between our read and the upsert;
        # per-session lanes make that impossible in practice, but the unique
        # index still made it an increment, so report it as one.
        previous = detection.severity
    change = signal_change(previous, detection.severity)
    row = outbound.detection_changed(
        prefix, change, detection, causation, previous_severity=previous
    )
    return Applied("applied", [row])
