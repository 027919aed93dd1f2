"""Outbound events (contract section 5) built from committed state, ready for the outbox."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID, uuid4

from worker.domain import DetectionChange, Severity
from worker.events import (
    DeadLetterEvent,
    DetectionEscalatedEvent,
    DetectionEvent,
    DetectionState,
    MappingEvent,
    MappingState,
    OutboundEvent,
)
from worker.subjects import deadletter_subject, detection_subject, mapping_subject


@dataclass(frozen=True)
class OutboxRow:
    """An outbound event ready for the outbox table."""

    event_id: UUID
    subject: str
    payload: bytes
    # What the event is about: events of one aggregate are published in order.
    aggregate: str


def _json(body: OutboundEvent) -> bytes:
    """`body.model_dump_json().encode()`, without the round trip through str: the
    serializer writes UTF-8 bytes, which model_dump_json decodes."""
    return body.__pydantic_serializer__.to_json(body)


def detection_changed(
    prefix: str,
    change: DetectionChange,
    detection: DetectionState,
    causation_id: UUID | None,
    previous_severity: Severity | None = None,
) -> OutboxRow:
    """`P.detection.{change}.{severity}.{kind}` carrying the detection as committed."""
    event_id = uuid4()
    common = {
        "event_id": event_id,
        "occurred_at": detection.updated_at,
        "causation_id": causation_id,
    }
    body: DetectionEvent | DetectionEscalatedEvent
    if change == "escalated":
        assert previous_severity is not None
        body = DetectionEscalatedEvent(
            **common,
            type="detection.escalated",
            previous_severity=previous_severity,
            detection=detection,
        )
    else:
        body = DetectionEvent(**common, type=f"detection.{change}", detection=detection)
    subject = detection_subject(prefix, change, detection.severity, detection.anomaly_type)
    return OutboxRow(event_id, subject, _json(body), f"detection:{detection.id}")


def mapping_changed(
    prefix: str, mapping: MappingState, previous_status: str | None, causation_id: UUID | None
) -> OutboxRow:
    """`P.mapping.{status}.{sessionId}`: a mapping was created or changed status."""
    event_id = uuid4()
    body = MappingEvent.model_validate(
        {
            "event_id": event_id,
            "occurred_at": mapping.updated_at,
            "causation_id": causation_id,
            "type": f"mapping.{mapping.status}",
            "previous_status": previous_status,
            "mapping": mapping,
        }
    )
    subject = mapping_subject(prefix, mapping.status, mapping.session_id)
    return OutboxRow(event_id, subject, _json(body), f"mapping:{mapping.session_id}")


def dead_lettered(
    prefix: str,
    *,
    dead_letter_id: int,
    occurred_at: datetime,
    causation_id: UUID | None,
    reason: str,
    error: str,
    subject: str,
    deliveries: int,
    payload: bytes,
    announced_bytes: int,
) -> OutboxRow:
    """`P.deadletter.{reason}` announcing a stored dead letter with its original bytes.

    A body longer than `announced_bytes` is cut to that length
    (`payloadTruncated`); the stored row keeps all of it.
    """
    event_id = uuid4()
    body = DeadLetterEvent(
        event_id=event_id,
        occurred_at=occurred_at,
        causation_id=causation_id,
        type="deadletter",
        dead_letter_id=dead_letter_id,
        reason=reason,
        error=error,
        subject=subject,
        deliveries=deliveries,
        payload_base64=base64.b64encode(payload[:announced_bytes]).decode("ascii"),
        payload_size=len(payload),
        payload_truncated=len(payload) > announced_bytes,
    )
    return OutboxRow(
        event_id,
        deadletter_subject(prefix, reason),
        _json(body),
        f"deadletter:{dead_letter_id}",
    )
