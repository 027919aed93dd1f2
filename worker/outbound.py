"""Outbound events (contract section 5) built from committed state, ready for the outbox."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel
from pydantic_core import SchemaSerializer, core_schema

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
from worker.ids import uuid7
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


# The keys a model field of the core schema may have: anything else (a field
# excluded, or excluded by a condition) is refused at import rather than written
# differently from the model; so is a custom serializer anywhere (`serialization`:
# a field or model serializer may read the model it is given).
_PLAIN_FIELD_KEYS = frozenset(
    {"type", "schema", "validation_alias", "serialization_alias", "metadata", "frozen"}
)


def _as_typed_dicts(schema: Any) -> Any:
    """A copy of a core schema in which every model is a typed dict of its fields,
    with the same field schemas, aliases and config."""
    if isinstance(schema, list):
        return [_as_typed_dicts(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "serialization" in schema:
        raise TypeError(f"a custom serializer: {schema['serialization']!r}")
    if schema.get("type") != "model":
        return {key: _as_typed_dicts(value) for key, value in schema.items()}
    fields = schema["schema"]
    if fields["type"] != "model-fields" or fields.get("computed_fields") or schema["root_model"]:
        raise TypeError(f"{schema['cls'].__name__}: not a plain model of fields")
    typed: dict[str, core_schema.TypedDictField] = {}
    for name, field in fields["fields"].items():
        if not field.keys() <= _PLAIN_FIELD_KEYS:
            raise TypeError(f"{schema['cls'].__name__}.{name}: not a plain field")
        typed[name] = core_schema.typed_dict_field(
            _as_typed_dicts(field["schema"]),
            required=True,
            serialization_alias=field.get("serialization_alias"),
        )
    return core_schema.typed_dict_schema(typed, config=schema.get("config"), ref=schema.get("ref"))


def _dict_serializer(model: type[BaseModel]) -> SchemaSerializer:
    """The model's own serializer, for its fields given as a dict (a nested model's as
    a dict too) instead of as a model: the same bytes as `model_dump_json`, without
    building and validating a model per event (tests/unit/test_outbound.py compares
    them byte for byte). The dicts hold every field by name, in the model's order,
    values already valid: nothing is checked here beyond the serializer's own warning
    on a value of an unexpected type. The models stay the one statement of the schema.
    """
    schema = model.__pydantic_core_schema__
    return SchemaSerializer(_as_typed_dicts(schema), schema.get("config"))


_DETECTION_EVENT = _dict_serializer(DetectionEvent)
_DETECTION_ESCALATED_EVENT = _dict_serializer(DetectionEscalatedEvent)
_MAPPING_EVENT = _dict_serializer(MappingEvent)

# What an outbox row is about (its `aggregate`): `detection:<id>`, `mapping:<sessionId>`
# or `deadletter:<id>`, as the functions below write it.
DETECTION, MAPPING, DEAD_LETTER = "detection", "mapping", "deadletter"
_STATES = {DETECTION: _dict_serializer(DetectionState), MAPPING: _dict_serializer(MappingState)}
Standing = Literal["current", "superseded", "announcement", "unreadable"]


def aggregate_of(aggregate: str) -> tuple[str, str]:
    """(kind, id) of an outbox row's `aggregate`."""
    kind, _, ident = aggregate.partition(":")
    return kind, ident


def standing(payload: bytes, aggregate: str, state: Mapping[str, Any] | None) -> Standing:
    """Whether an outbound event written earlier may be published now without showing
    subscribers an older state than they were shown since (contract section 5: the
    last event published for a detection carries its committed state).

    `state` is the detection's or mapping's committed state now (`DetectionState`'s or
    `MappingState`'s fields by name; None: it is gone). `current`: the event carries
    it, so nothing changed since (every change moves `updatedAt` or a count, and
    writes an event that carries the new state); `superseded`: it changed since;
    `announcement`: a dead letter's, which has no state; `unreadable`: not an event
    this worker wrote.
    """
    kind, _ = aggregate_of(aggregate)
    if kind == DEAD_LETTER:
        return "announcement"
    try:
        carried = json.loads(payload).get(kind) if kind in _STATES else None
    except (ValueError, AttributeError):
        carried = None
    if not isinstance(carried, dict):
        return "unreadable"
    if state is None:
        return "superseded"
    return "current" if carried == json.loads(_STATES[kind].to_json(state)) else "superseded"


def detection_changed(
    prefix: str,
    change: DetectionChange,
    detection: Mapping[str, Any],
    causation_id: UUID | None,
    previous_severity: Severity | None = None,
    event_id: UUID | None = None,
) -> OutboxRow:
    """`P.detection.{change}.{severity}.{kind}` carrying the detection as committed.

    `detection` holds `DetectionState`'s fields by name and in its order, as committed
    (a `batch.DetectionRow`'s `vars()`, or `dict()` of a `DetectionState`). The
    eventId is `event_id` when given, else a new one.
    """
    event_id = uuid7() if event_id is None else event_id
    if change == "escalated":
        assert previous_severity is not None
        payload = _DETECTION_ESCALATED_EVENT.to_json(
            {
                "event_id": event_id,
                "occurred_at": detection["updated_at"],
                "causation_id": causation_id,
                "type": "detection.escalated",
                "previous_severity": previous_severity,
                "detection": detection,
            }
        )
    else:
        payload = _DETECTION_EVENT.to_json(
            {
                "event_id": event_id,
                "occurred_at": detection["updated_at"],
                "causation_id": causation_id,
                "type": f"detection.{change}",
                "detection": detection,
            }
        )
    subject = detection_subject(prefix, change, detection["severity"], detection["anomaly_type"])
    return OutboxRow(event_id, subject, payload, f"{DETECTION}:{detection['id']}")


def mapping_changed(
    prefix: str, mapping: Mapping[str, Any], previous_status: str | None, causation_id: UUID | None
) -> OutboxRow:
    """`P.mapping.{status}.{sessionId}`: a mapping was created or changed status.

    `mapping` holds `MappingState`'s fields by name and in its order, as committed
    (a `batch.MappingRow`'s `vars()`, whose `metadata` is not written; or `dict()` of
    a `MappingState`).
    """
    event_id = uuid7()
    payload = _MAPPING_EVENT.to_json(
        {
            "event_id": event_id,
            "occurred_at": mapping["updated_at"],
            "causation_id": causation_id,
            "type": f"mapping.{mapping['status']}",
            "previous_status": previous_status,
            "mapping": mapping,
        }
    )
    subject = mapping_subject(prefix, mapping["status"], mapping["session_id"])
    return OutboxRow(event_id, subject, payload, f"{MAPPING}:{mapping['session_id']}")


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
    event_id = uuid7()
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
        f"{DEAD_LETTER}:{dead_letter_id}",
    )
