"""The messages: inbound events (contract section 3) and outbound events (section 5).

Keys are camelCase on the wire. Inbound models ignore unknown keys (spokes
upgrade independently) and type known keys strictly: a number is not a
string, a timestamp needs its offset.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic.alias_generators import to_camel

from worker.domain import Lifecycle, Resolution, SessionStatus, Severity, ended_status
from worker.storable import UNSTORABLE_TEXT
from worker.subjects import ID_PATTERN

_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# RFC 3339 date-time: seconds required, "T" (or "t"), a "Z" or a "+hh:mm" offset
# with hh 00-23 and mm 00-59 (Python would take +00:60 as an hour).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)"
)


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
    parsed = datetime.fromisoformat(value.upper())
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:00:00-01:00 is a valid text, but no instant PostgreSQL
        # and Python share: refused here rather than when it is written.
        raise ValueError("is out of range once converted to UTC") from None
    return parsed


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
Identifier = Annotated[str, StringConstraints(pattern=f"^{ID_PATTERN}$")]
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
    # A session id, as a subject token carries it (the parent's own events will).
    parent_session_id: Identifier | None = None
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


def lifecycle_model(
    lifecycle: Lifecycle,
) -> type[LifecycleEvent] | type[SpawnedEvent] | type[EndedEvent]:
    """The body of a lifecycle's subject (a signal's is `SignalEvent`)."""
    if lifecycle == "spawned":
        return SpawnedEvent
    if ended_status(lifecycle) is not None:
        return EndedEvent
    return LifecycleEvent


def validation_problems(err: ValidationError, most: int, *, count_rest: bool = False) -> str:
    """`where: what; …` for the first `most` problems (`body` for the body itself), and
    with `count_rest` how many more there were."""
    problems = [
        f"{'.'.join(str(part) for part in problem['loc']) or 'body'}: {problem['msg']}"
        for problem in err.errors(include_url=False)[:most]
    ]
    more = err.error_count() - len(problems)
    suffix = f" (and {more} more)" if count_rest and more > 0 else ""
    return "; ".join(problems) + suffix


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
    subject: str = Field(
        description="As published; bytes that are not UTF-8, NUL and backslash written as \\xNN "
        "when it held any (dead_letters.subject_bytes keeps the exact bytes)."
    )
    deliveries: int
    payload_base64: str = Field(
        description="The original bytes, or when payloadTruncated their first half of the "
        "server's max_payload (512 KiB by default): the whole body is in dead_letters.payload."
    )
    payload_size: int = Field(description="Length of the original body, bytes.")
    payload_truncated: bool


OutboundEvent = DetectionEvent | DetectionEscalatedEvent | MappingEvent | DeadLetterEvent


def _storable(value: str) -> str:
    if UNSTORABLE_TEXT.search(value):
        raise ValueError("must not contain U+0000 or an unpaired surrogate")
    return value


# An id the database can be asked about: text holds no NUL.
StoredId = Annotated[
    str, StringConstraints(min_length=1, max_length=256), AfterValidator(_storable)
]


class ResolveRequest(BaseModel):
    """Body of a request on `P.cmd.detection.resolve` (contract section 7)."""

    model_config = _STRICT_CAMEL

    detection_id: StoredId
    resolved_by: StoredId
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
