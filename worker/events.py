"""The messages: inbound events (contract section 3) and outbound events (section 5).

Keys are camelCase on the wire. Inbound models ignore unknown keys (spokes
upgrade independently) and type known keys strictly: a number is not a
string, a timestamp needs its offset.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from worker.domain import Resolution, SessionStatus, Severity

_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# RFC 3339 date-time: seconds required, "T" (or "t"), a "Z" or a "+hh:mm" offset.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# These parse the text themselves: after a before-validator, strict mode
# would refuse a string where the type wants a UUID or a datetime.


def _canonical_uuid(value: object) -> object:
    """Only the 8-4-4-4-12 spelling: it is also the Nats-Msg-Id, compared byte for byte."""
    if not isinstance(value, str):
        return value
    if not _UUID_TEXT.fullmatch(value):
        raise ValueError("must be a UUID in its 8-4-4-4-12 hexadecimal form")
    return UUID(value)


def _rfc3339(value: object) -> object:
    if not isinstance(value, str):
        return value
    if not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 timestamp with seconds and an offset")
    return datetime.fromisoformat(value.upper())


# camelCase on the wire, snake_case in Python; unknown keys ignored.
_CAMEL = ConfigDict(
    alias_generator=to_camel,
    validate_by_alias=True,
    validate_by_name=True,
    serialize_by_alias=True,
    extra="ignore",
    frozen=True,
)
# ...and known keys strictly typed, for what arrives from outside.
_STRICT_CAMEL = ConfigDict(**_CAMEL, strict=True)

EventId = Annotated[UUID, BeforeValidator(_canonical_uuid)]
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
Reference = Annotated[str, StringConstraints(min_length=1, max_length=256)]
TaskName = Annotated[str, StringConstraints(max_length=256)]
Reason = Annotated[str, StringConstraints(max_length=1024)]
Fingerprint = Annotated[str, StringConstraints(max_length=256)]


class _Inbound(BaseModel):
    model_config = _STRICT_CAMEL

    event_id: EventId
    occurred_at: Timestamp
    spoke_id: Identifier
    session_id: Identifier
    metadata: dict[str, Any] | None = None


class LifecycleEvent(_Inbound):
    """`started`, `heartbeat` and `archived` carry nothing beyond the common keys."""


class SpawnedEvent(_Inbound):
    parent_session_id: Reference | None = None
    workspace_id: Reference | None = None
    task_id: Reference | None = None
    task: TaskName | None = None


class EndedEvent(_Inbound):
    """`completed`, `failed` and `aborted`."""

    reason: Reason | None = None


class SignalEvent(_Inbound):
    severity: Severity
    details: dict[str, Any] | None = None
    fingerprint: Fingerprint | None = None


InboundEvent = LifecycleEvent | SpawnedEvent | EndedEvent | SignalEvent


class _Outbound(BaseModel):
    model_config = _CAMEL


class DetectionState(_Outbound):
    id: str
    session_id: str
    anomaly_type: str
    severity: Severity
    details: dict[str, Any] | None
    dedup_key: str
    occurrence_count: int
    created_at: AwareDatetime
    updated_at: AwareDatetime
    resolved_at: AwareDatetime | None
    resolved_by: str | None
    resolution: Resolution | None


class MappingState(_Outbound):
    id: str
    session_id: str
    spoke_id: str | None
    workspace_id: str | None
    parent_session_id: str | None
    task_id: str | None
    task: str | None
    status: SessionStatus
    created_at: AwareDatetime
    updated_at: AwareDatetime


class _Envelope(_Outbound):
    event_id: UUID
    occurred_at: AwareDatetime
    causation_id: UUID | None


class DetectionEvent(_Envelope):
    """`detection.opened`, `detection.repeated` and `detection.resolved`."""

    type: Literal["detection.opened", "detection.repeated", "detection.resolved"]
    detection: DetectionState


class DetectionEscalatedEvent(_Envelope):
    type: Literal["detection.escalated"]
    previous_severity: Severity
    detection: DetectionState


class MappingEvent(_Envelope):
    type: Literal["mapping.active", "mapping.completed", "mapping.failed", "mapping.aborted"]
    previous_status: SessionStatus | None
    mapping: MappingState


class DeadLetterEvent(_Envelope):
    type: Literal["deadletter"]
    dead_letter_id: int | None = Field(
        description="Row id in dead_letters, for `hub-worker deadletters replay`."
    )
    reason: str
    error: str
    subject: str
    deliveries: int
    payload_base64: str


OutboundEvent = DetectionEvent | DetectionEscalatedEvent | MappingEvent | DeadLetterEvent


class ResolveRequest(BaseModel):
    """Body of a request on `P.cmd.detection.resolve` (contract section 7)."""

    model_config = _STRICT_CAMEL

    detection_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    resolved_by: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    resolution: Literal["acknowledged", "dismissed", "escalated", "fixed"]


class CommandError(_Outbound):
    code: Literal[
        "not_found", "already_resolved", "unknown_account", "invalid_request", "unavailable"
    ]
    message: str


class ResolveReply(_Outbound):
    """`{"ok": true, "detection": {...}}` or `{"ok": false, "error": {"code", "message"}}`."""

    ok: bool
    detection: DetectionState | None = None
    error: CommandError | None = None
