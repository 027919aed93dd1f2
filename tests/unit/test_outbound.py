"""Outbound events for the outbox (contract section 5): subjects and camelCase bodies."""

from __future__ import annotations

import base64
import json
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, computed_field, field_serializer, model_serializer

from worker.batch import DetectionRow, MappingRow
from worker.domain import DetectionChange, SessionStatus, Severity
from worker.events import (
    DeadLetterEvent,
    DetectionEscalatedEvent,
    DetectionEvent,
    DetectionState,
    MappingEvent,
    MappingState,
)
from worker.outbound import (
    _dict_serializer,
    dead_lettered,
    detection_changed,
    mapping_changed,
    standing,
)
from worker.subjects import detection_subject, mapping_subject

CREATED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
UPDATED = CREATED + timedelta(minutes=3)
CAUSE = UUID("0b6a2f8e-3c1d-4e5f-8a9b-0c1d2e3f4a5b")

ENVELOPE_KEYS = {"eventId", "occurredAt", "type", "causationId"}
DETECTION_KEYS = {
    "id",
    "sessionId",
    "anomalyType",
    "severity",
    "details",
    "dedupKey",
    "occurrenceCount",
    "createdAt",
    "updatedAt",
    "resolvedAt",
    "resolvedBy",
    "resolution",
}
MAPPING_KEYS = {
    "id",
    "sessionId",
    "spokeId",
    "workspaceId",
    "parentSessionId",
    "taskId",
    "task",
    "status",
    "createdAt",
    "updatedAt",
}


def detection(**overrides: Any) -> dict[str, Any]:
    """A detection's fields, as detection_changed takes them (checked by the model)."""
    fields: dict[str, Any] = {
        "id": "det-1",
        "session_id": "sess-1",
        "anomaly_type": "MODEL_DEGRADATION",
        "severity": "high",
        "details": {"errorRate": 0.4, "window": [1, 2]},
        "dedup_key": "ab" * 32,
        "occurrence_count": 3,
        "created_at": CREATED,
        "updated_at": UPDATED,
        "resolved_at": None,
        "resolved_by": None,
        "resolution": None,
    }
    fields.update(overrides)
    return dict(DetectionState(**fields))


def mapping(**overrides: Any) -> dict[str, Any]:
    """A mapping's fields, as mapping_changed takes them (checked by the model)."""
    fields: dict[str, Any] = {
        "id": "map-1",
        "session_id": "sess-1",
        "spoke_id": "spoke-1",
        "workspace_id": "ws-1",
        "parent_session_id": "coord-1",
        "task_id": "task-1",
        "task": "Write the tests",
        "status": "active",
        "created_at": CREATED,
        "updated_at": UPDATED,
    }
    fields.update(overrides)
    return dict(MappingState(**fields))


def payload(row: Any) -> dict[str, Any]:
    body = json.loads(row.payload.decode("utf-8"))
    assert isinstance(body, dict)
    return body


def rfc3339(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None, f"{text!r} has no offset"
    return parsed


# --- detections ------------------------------------------------------------


@pytest.mark.parametrize("change", ["opened", "repeated", "resolved"])
def test_detection_event_has_exactly_the_contract_keys(change: DetectionChange) -> None:
    body = payload(detection_changed("hub", change, detection(), CAUSE))
    assert set(body) == ENVELOPE_KEYS | {"detection"}
    assert set(body["detection"]) == DETECTION_KEYS


def test_escalated_event_adds_previous_severity() -> None:
    row = detection_changed("hub", "escalated", detection(severity="high"), CAUSE, "low")
    body = payload(row)
    assert set(body) == ENVELOPE_KEYS | {"detection", "previousSeverity"}
    assert set(body["detection"]) == DETECTION_KEYS
    assert body["previousSeverity"] == "low"
    assert body["detection"]["severity"] == "high"


@pytest.mark.parametrize("change", ["opened", "repeated", "resolved"])
def test_only_escalated_carries_previous_severity(change: DetectionChange) -> None:
    body = payload(detection_changed("hub", change, detection(), CAUSE, "low"))
    assert "previousSeverity" not in body


@pytest.mark.parametrize(
    ("prefix", "change", "severity", "anomaly_type", "subject"),
    [
        (
            "hub",
            "opened",
            "high",
            "MODEL_DEGRADATION",
            "hub.detection.opened.high.model_degradation",
        ),
        (
            "hub",
            "repeated",
            "low",
            "HIGH_ERROR_COUNT",
            "hub.detection.repeated.low.high_error_count",
        ),
        ("t-42", "escalated", "medium", "X", "t-42.detection.escalated.medium.x"),
        (
            "org.hub",
            "resolved",
            "medium",
            "SESSION_STALL",
            "org.hub.detection.resolved.medium.session_stall",
        ),
    ],
)
def test_detection_event_subject_and_type(
    prefix: str, change: DetectionChange, severity: Severity, anomaly_type: str, subject: str
) -> None:
    state = detection(severity=severity, anomaly_type=anomaly_type)
    row = detection_changed(prefix, change, state, CAUSE, "low")
    assert row.subject == subject
    assert payload(row)["type"] == f"detection.{change}"


def test_detection_event_carries_the_committed_state() -> None:
    state = detection()
    body = payload(detection_changed("hub", "repeated", state, CAUSE))
    assert body["detection"] == {
        "id": "det-1",
        "sessionId": "sess-1",
        "anomalyType": "MODEL_DEGRADATION",
        "severity": "high",
        "details": {"errorRate": 0.4, "window": [1, 2]},
        "dedupKey": "ab" * 32,
        "occurrenceCount": 3,
        "createdAt": body["detection"]["createdAt"],
        "updatedAt": body["detection"]["updatedAt"],
        "resolvedAt": None,
        "resolvedBy": None,
        "resolution": None,
    }
    assert rfc3339(body["detection"]["createdAt"]) == CREATED
    assert rfc3339(body["detection"]["updatedAt"]) == UPDATED


def test_resolved_event_carries_the_resolution() -> None:
    resolved_at = UPDATED + timedelta(hours=1)
    state = detection(
        resolved_at=resolved_at, updated_at=resolved_at, resolved_by="acct-7", resolution="fixed"
    )
    body = payload(detection_changed("hub", "resolved", state, None))
    assert rfc3339(body["detection"]["resolvedAt"]) == resolved_at
    assert body["detection"]["resolvedBy"] == "acct-7"
    assert body["detection"]["resolution"] == "fixed"


def test_auto_resolved_event_has_no_resolver() -> None:
    state = detection(resolved_at=UPDATED, resolved_by=None, resolution="auto_resolved")
    body = payload(detection_changed("hub", "resolved", state, CAUSE))
    assert body["detection"]["resolvedBy"] is None
    assert body["detection"]["resolution"] == "auto_resolved"


def test_detection_details_may_be_empty_or_null() -> None:
    assert (
        payload(detection_changed("hub", "opened", detection(details={}), None))["detection"][
            "details"
        ]
        == {}
    )
    assert (
        payload(detection_changed("hub", "opened", detection(details=None), None))["detection"][
            "details"
        ]
        is None
    )


@pytest.mark.parametrize(("cause", "expected"), [(CAUSE, str(CAUSE)), (None, None)])
def test_causation_id_is_the_inbound_event_id_or_null(
    cause: UUID | None, expected: str | None
) -> None:
    assert (
        payload(detection_changed("hub", "opened", detection(), cause))["causationId"] == expected
    )


def test_outbound_event_id_is_the_row_event_id_and_unique() -> None:
    first = detection_changed("hub", "opened", detection(), CAUSE)
    second = detection_changed("hub", "opened", detection(), CAUSE)
    assert UUID(payload(first)["eventId"]) == first.event_id
    assert UUID(payload(second)["eventId"]) == second.event_id
    assert first.event_id != second.event_id


def test_detection_occurred_at_is_an_rfc3339_timestamp_with_offset() -> None:
    body = payload(detection_changed("hub", "opened", detection(), CAUSE))
    occurred = rfc3339(body["occurredAt"])
    assert occurred >= CREATED


# --- mappings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "previous"),
    [
        ("active", None),
        ("completed", "active"),
        ("failed", "active"),
        ("aborted", "active"),
        ("aborted", None),
    ],
)
def test_mapping_event_subject_type_and_previous_status(
    status: SessionStatus, previous: SessionStatus | None
) -> None:
    row = mapping_changed("hub", mapping(status=status), previous, CAUSE)
    assert row.subject == f"hub.mapping.{status}.sess-1"
    body = payload(row)
    assert body["type"] == f"mapping.{status}"
    assert body["previousStatus"] == previous
    assert body["mapping"]["status"] == status


def test_mapping_event_has_exactly_the_contract_keys() -> None:
    body = payload(mapping_changed("hub", mapping(), None, CAUSE))
    assert set(body) == ENVELOPE_KEYS | {"previousStatus", "mapping"}
    assert set(body["mapping"]) == MAPPING_KEYS
    assert "previousSeverity" not in body


def test_mapping_event_carries_the_committed_state() -> None:
    body = payload(mapping_changed("t-42", mapping(), None, CAUSE))
    m = body["mapping"]
    assert {k: v for k, v in m.items() if k not in ("createdAt", "updatedAt")} == {
        "id": "map-1",
        "sessionId": "sess-1",
        "spokeId": "spoke-1",
        "workspaceId": "ws-1",
        "parentSessionId": "coord-1",
        "taskId": "task-1",
        "task": "Write the tests",
        "status": "active",
    }
    assert rfc3339(m["createdAt"]) == CREATED
    assert rfc3339(m["updatedAt"]) == UPDATED
    assert body["causationId"] == str(CAUSE)
    rfc3339(body["occurredAt"])


def test_mapping_event_with_null_references() -> None:
    state = mapping(workspace_id=None, parent_session_id=None, task_id=None, task=None)
    m = payload(mapping_changed("hub", state, None, None))["mapping"]
    assert (m["workspaceId"], m["parentSessionId"], m["taskId"], m["task"]) == (None,) * 4


def test_mapping_event_id_is_the_row_event_id() -> None:
    row = mapping_changed("hub", mapping(), None, None)
    assert UUID(payload(row)["eventId"]) == row.event_id


# --- dead letters ------------------------------------------------------------

DEAD_LETTER_KEYS = ENVELOPE_KEYS | {
    "reason",
    "error",
    "subject",
    "deliveries",
    "payloadBase64",
    "payloadSize",
    "payloadTruncated",
}


def _dead_letter(prefix: str = "hub", **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "dead_letter_id": 17,
        "occurred_at": UPDATED,
        "causation_id": None,
        "reason": "invalid_json",
        "error": "body is not JSON",
        "subject": "hub.spoke.sp1.session.s1.started",
        "deliveries": 1,
        "payload": b"not json",
        "announced_bytes": 512 * 1024,
    }
    fields.update(overrides)
    return dead_lettered(prefix, **fields)


@pytest.mark.parametrize(
    "reason",
    [
        "invalid_json",
        "too_large",
        "invalid_event",
        "unknown_subject",
        "subject_mismatch",
        "spoke_mismatch",
        "handler_error",
    ],
)
def test_dead_letter_subject_and_fields(reason: str) -> None:
    row = _dead_letter(reason=reason, deliveries=5, causation_id=CAUSE)
    assert row.subject == f"hub.deadletter.{reason}"
    body = payload(row)
    assert set(body) >= DEAD_LETTER_KEYS
    assert body["type"] == "deadletter"
    assert body["reason"] == reason
    assert body["error"] == "body is not JSON"
    assert body["subject"] == "hub.spoke.sp1.session.s1.started"
    assert body["deliveries"] == 5
    assert body["causationId"] == str(CAUSE)
    assert UUID(body["eventId"]) == row.event_id
    assert rfc3339(body["occurredAt"]) == UPDATED


@pytest.mark.parametrize(
    "original",
    [b"", b"not json", b"\x00\xff\xfe binary \x80", "ünïcode ✓".encode(), b"x" * (512 * 1024)],
)
def test_dead_letter_payload_base64_decodes_to_the_original_bytes(original: bytes) -> None:
    body = payload(_dead_letter(payload=original))
    assert base64.b64decode(body["payloadBase64"], validate=True) == original
    assert body["payloadSize"] == len(original)
    assert body["payloadTruncated"] is False


@pytest.mark.parametrize("size", [512 * 1024 + 1, 1024 * 1024])
def test_a_dead_letter_announcement_carries_the_start_of_a_large_body(size: int) -> None:
    original = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    row = _dead_letter(reason="too_large", payload=original)
    body = payload(row)
    assert base64.b64decode(body["payloadBase64"], validate=True) == original[: 512 * 1024]
    assert body["payloadSize"] == size
    assert body["payloadTruncated"] is True
    # Whatever arrived, the announcement fits the server's default max_payload.
    assert len(row.payload) < 1024 * 1024


def test_dead_letter_subject_uses_the_prefix() -> None:
    assert _dead_letter("t-42", reason="too_large").subject == "t-42.deadletter.too_large"


# --- the bytes: what model_dump_json writes -------------------------------------------

_DETAILS = st.dictionaries(
    st.text(max_size=6),
    st.one_of(st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False))
    | st.text(max_size=8).filter(lambda t: not any("\ud800" <= c <= "\udfff" for c in t)),
    max_size=4,
)


@given(_DETAILS, st.text(max_size=12).filter(lambda t: "\x00" not in t and t.isprintable()))
def test_each_payload_is_the_models_json_byte_for_byte(details: dict[str, Any], text: str) -> None:
    # Non-ASCII is written as it is and floats and keys keep their spelling: the
    # bytes are what the model's own model_dump_json gives.
    rows_and_models: list[tuple[Any, type[Any]]] = [
        (detection_changed("hub", "opened", detection(details=details), CAUSE), DetectionEvent),
        (
            detection_changed("hub", "escalated", detection(details=details), None, "low"),
            DetectionEscalatedEvent,
        ),
        (mapping_changed("hub", mapping(task=text), "active", CAUSE), MappingEvent),
        (
            dead_lettered(
                "hub",
                dead_letter_id=7,
                occurred_at=UPDATED,
                causation_id=None,
                reason="invalid_event",
                error=f"invalid event: {text}",
                subject=f"hub.spoke.{text}",
                deliveries=1,
                payload=text.encode(),
                announced_bytes=1024,
            ),
            DeadLetterEvent,
        ),
    ]
    for row, model in rows_and_models:
        parsed = model.model_validate_json(row.payload)
        assert row.payload == parsed.model_dump_json().encode()


# --- the bytes: the dict serializer against the models ---------------------------------
#
# detection_changed and mapping_changed serialize the committed row's fields through a
# serializer derived from the models' own core schema, without building a model; what
# they write must be what building and validating the models wrote, byte for byte.

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_OFFSETS = st.integers(min_value=-1439, max_value=1439).map(
    lambda m: timezone(timedelta(minutes=m))
)
_WHEN = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC) | _OFFSETS
)
_SEVERITY = st.sampled_from(["low", "medium", "high"])


@st.composite
def _detection_rows(draw: st.DrawFn) -> DetectionRow:
    resolved = draw(st.booleans())
    return DetectionRow(
        id=draw(_TEXT),
        session_id=draw(_TEXT),
        anomaly_type=draw(_TEXT),
        severity=draw(_SEVERITY),
        details=draw(st.none() | st.dictionaries(_TEXT, _JSON_VALUE, max_size=4)),
        dedup_key=draw(_TEXT),
        occurrence_count=draw(st.integers(min_value=1, max_value=2**62)),
        created_at=draw(_WHEN),
        updated_at=draw(_WHEN),
        resolved_at=draw(_WHEN) if resolved else None,
        resolved_by=draw(st.none() | _TEXT) if resolved else None,
        resolution=draw(
            st.sampled_from(["acknowledged", "dismissed", "escalated", "fixed", "auto_resolved"])
        )
        if resolved
        else None,
    )


@st.composite
def _mapping_rows(draw: st.DrawFn) -> MappingRow:
    return MappingRow(
        id=draw(_TEXT),
        session_id=draw(_TEXT),
        spoke_id=draw(st.none() | _TEXT),
        workspace_id=draw(st.none() | _TEXT),
        parent_session_id=draw(st.none() | _TEXT),
        task_id=draw(st.none() | _TEXT),
        task=draw(st.none() | _TEXT),
        status=draw(st.sampled_from(["active", "completed", "failed", "aborted"])),
        metadata=draw(st.none() | st.dictionaries(_TEXT, _JSON_VALUE, max_size=3)),
        created_at=draw(_WHEN),
        updated_at=draw(_WHEN),
    )


def _as_the_models_wrote_it(
    change: DetectionChange,
    state: DetectionState,
    event_id: UUID,
    cause: UUID | None,
    previous: Severity | None,
) -> bytes:
    """The payload as detection_changed built it from validated models before."""
    common: dict[str, Any] = {
        "event_id": event_id,
        "occurred_at": state.updated_at,
        "causation_id": cause,
    }
    body: DetectionEvent | DetectionEscalatedEvent
    if change == "escalated":
        body = DetectionEscalatedEvent(
            **common, type="detection.escalated", previous_severity=previous, detection=state
        )
    else:
        body = DetectionEvent(**common, type=f"detection.{change}", detection=state)
    return body.model_dump_json().encode()


@given(
    _detection_rows(),
    st.sampled_from(["opened", "repeated", "escalated", "resolved"]),
    st.none() | st.uuids(),
    _SEVERITY,
    st.sampled_from(["hub", "t-42", "org.hub"]),
)
def test_a_detection_event_is_what_the_validated_models_wrote(
    row: DetectionRow,
    change: DetectionChange,
    cause: UUID | None,
    previous: Severity,
    prefix: str,
) -> None:
    state = DetectionState.model_validate(vars(row))
    # From a batch's row, and from a DetectionState (the sweep and the resolve command).
    for given_fields in (vars(row), dict(state)):
        out = detection_changed(prefix, change, given_fields, cause, previous)
        assert out.payload == _as_the_models_wrote_it(change, state, out.event_id, cause, previous)
        assert out.subject == detection_subject(prefix, change, row.severity, row.anomaly_type)
        assert out.aggregate == f"detection:{row.id}"


@given(
    _mapping_rows(),
    st.none() | st.sampled_from(["active", "completed", "failed", "aborted"]),
    st.none() | st.uuids(),
)
def test_a_mapping_event_is_what_the_validated_models_wrote(
    row: MappingRow, previous: SessionStatus | None, cause: UUID | None
) -> None:
    state = MappingState.model_validate(vars(row))
    for given_fields in (vars(row), dict(state)):
        out = mapping_changed("hub", given_fields, previous, cause)
        before = MappingEvent(
            event_id=out.event_id,
            occurred_at=state.updated_at,
            causation_id=cause,
            type=f"mapping.{state.status}",
            previous_status=previous,
            mapping=state,
        )
        assert out.payload == before.model_dump_json().encode()
        assert out.subject == mapping_subject("hub", row.status, row.session_id)
        assert out.aggregate == f"mapping:{row.session_id}"


def test_the_rows_hold_the_states_fields_in_their_order() -> None:
    # The serializer writes a dict's keys in the dict's order: a row's vars() must
    # list the model's fields in the model's order (a mapping row's metadata aside,
    # which the serializer leaves out as the model ignores it).
    assert [f.name for f in fields(DetectionRow)] == list(DetectionState.model_fields)
    assert [f.name for f in fields(MappingRow) if f.name != "metadata"] == list(
        MappingState.model_fields
    )


class _Computed(BaseModel):
    a: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def b(self) -> int:
        return self.a


class _CustomField(BaseModel):
    a: int

    @field_serializer("a")
    def _a(self, value: int) -> str:
        return str(value)


class _CustomModel(BaseModel):
    a: int

    @model_serializer
    def _all(self) -> dict[str, int]:
        return {"a": self.a}


class _Nested(BaseModel):
    inner: _CustomModel


@pytest.mark.parametrize("model", [_Computed, _CustomField, _CustomModel, _Nested])
def test_the_dict_serializer_refuses_what_a_dict_would_be_written_differently_for(
    model: type[BaseModel],
) -> None:
    with pytest.raises(TypeError):
        _dict_serializer(model)


def test_a_set_aside_event_is_current_only_while_it_carries_the_committed_state() -> None:
    """`standing`: what `hub-worker outbox republish` lets out again."""
    row = DetectionRow(
        id="d1",
        session_id="s1",
        anomaly_type="MODEL_DEGRADATION",
        severity="low",
        details={"n": 1.5, "nested": [1, None]},
        dedup_key="k",
        occurrence_count=1,
        created_at=CREATED,
        updated_at=CREATED,
    )
    opened = detection_changed("hub", "opened", vars(row), CAUSE)
    assert standing(opened.payload, opened.aggregate, vars(row)) == "current"
    # A later event of the same transaction (same updatedAt) moved the count on.
    later = vars(row) | {"occurrence_count": 2}
    assert standing(opened.payload, opened.aggregate, later) == "superseded"
    assert standing(opened.payload, opened.aggregate, vars(row) | {"updated_at": UPDATED}) == (
        "superseded"
    )
    assert standing(opened.payload, opened.aggregate, None) == "superseded"  # gone

    mapping = MappingRow("m1", "s1", "sp1", None, None, None, "t", "active", None, CREATED, CREATED)
    created = mapping_changed("hub", vars(mapping), None, CAUSE)
    assert standing(created.payload, created.aggregate, vars(mapping)) == "current"
    ended = vars(mapping) | {"status": "completed", "updated_at": UPDATED}
    assert standing(created.payload, created.aggregate, ended) == "superseded"

    announced = dead_lettered(
        "hub",
        dead_letter_id=7,
        occurred_at=CREATED,
        causation_id=None,
        reason="invalid_json",
        error="not JSON",
        subject="hub.spoke.x.session.y.heartbeat",
        deliveries=1,
        payload=b"{",
        announced_bytes=100,
    )
    assert standing(announced.payload, announced.aggregate, None) == "announcement"
    for payload in (b"x" * 10, b"\xff\xfe", b"[1]", b'{"mapping": 1}', b"{}"):
        assert standing(payload, "mapping:s1", vars(mapping)) == "unreadable"
    assert standing(opened.payload, "other:d1", vars(row)) == "unreadable"
