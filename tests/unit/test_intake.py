"""decode(): from subject and body bytes to a typed event or a dead-letter reason (sections 3, 6)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from worker.domain import DeadLetterError, DeadLetterReason
from worker.events import EndedEvent, LifecycleEvent, SignalEvent, SpawnedEvent
from worker.intake import decode

PREFIX = "hub"
SPOKE = "spoke-1"
SESSION = "sess_1"
EVENT_ID = "6f1c1d2e-8a4b-4c3d-9e5f-0a1b2c3d4e5f"
OCCURRED_AT = "2024-05-01T12:00:00+02:00"
LIMIT = 64 * 1024

MISSING = object()


def subject(tail: str, *, prefix: str = PREFIX, spoke: str = SPOKE, session: str = SESSION) -> str:
    return f"{prefix}.spoke.{spoke}.session.{session}.{tail}"


def document(tail: str = "started", **overrides: Any) -> dict[str, Any]:
    """A valid body for `tail`, with keys replaced (or removed with MISSING)."""
    doc: dict[str, Any] = {
        "eventId": EVENT_ID,
        "occurredAt": OCCURRED_AT,
        "spokeId": SPOKE,
        "sessionId": SESSION,
    }
    if tail.startswith("signal."):
        doc["severity"] = "high"
    for key, value in overrides.items():
        if value is MISSING:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


def rejection(subj: str, body: bytes, *, prefix: str = PREFIX) -> DeadLetterError:
    with pytest.raises(DeadLetterError) as caught:
        decode(prefix, subj, body)
    assert caught.value.error, "a dead letter needs a human-readable error"
    return caught.value


def sized_body(size: int, tail: str = "started") -> bytes:
    """A valid event body of exactly `size` bytes (padded in metadata)."""
    empty = encode(document(tail, metadata={"pad": ""}))
    body = encode(document(tail, metadata={"pad": "x" * (size - len(empty))}))
    assert len(body) == size
    return body


# --- valid events --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "model"),
    [
        ("spawned", SpawnedEvent),
        ("started", LifecycleEvent),
        ("heartbeat", LifecycleEvent),
        ("completed", EndedEvent),
        ("failed", EndedEvent),
        ("aborted", EndedEvent),
        ("archived", LifecycleEvent),
        ("signal.model_degradation", SignalEvent),
    ],
)
def test_valid_event_decodes_to_its_model(tail: str, model: type) -> None:
    intake = decode(PREFIX, subject(tail), encode(document(tail)))
    assert type(intake.event) is model
    assert intake.event.event_id == UUID(EVENT_ID)
    assert intake.event.occurred_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert intake.event.occurred_at.utcoffset() == timedelta(hours=2)
    assert intake.event.spoke_id == SPOKE
    assert intake.event.session_id == SESSION
    assert intake.route.spoke_id == SPOKE
    assert intake.route.session_id == SESSION


@pytest.mark.parametrize("lifecycle", ["spawned", "started", "heartbeat", "completed", "archived"])
def test_lifecycle_route_names_the_lifecycle(lifecycle: str) -> None:
    intake = decode(PREFIX, subject(lifecycle), encode(document(lifecycle)))
    assert intake.route.lifecycle == lifecycle
    assert intake.route.signal_kind is None


def test_spawned_carries_its_references() -> None:
    body = document(
        "spawned",
        parentSessionId="coord-1",
        workspaceId="ws-9",
        taskId="task-3",
        task="Refactor the parser",
        metadata={"model": "x", "n": 3},
    )
    event = decode(PREFIX, subject("spawned"), encode(body)).event
    assert isinstance(event, SpawnedEvent)
    assert event.parent_session_id == "coord-1"
    assert event.workspace_id == "ws-9"
    assert event.task_id == "task-3"
    assert event.task == "Refactor the parser"
    assert event.metadata == {"model": "x", "n": 3}


def test_spawned_references_may_be_null_or_absent() -> None:
    body = document("spawned", parentSessionId=None, workspaceId=None, task=None)
    event = decode(PREFIX, subject("spawned"), encode(body)).event
    assert isinstance(event, SpawnedEvent)
    assert (event.parent_session_id, event.workspace_id, event.task_id, event.task) == (
        None,
        None,
        None,
        None,
    )


def test_ended_event_carries_its_reason() -> None:
    event = decode(PREFIX, subject("failed"), encode(document("failed", reason="OOM"))).event
    assert isinstance(event, EndedEvent)
    assert event.reason == "OOM"


def test_signal_carries_kind_severity_details_and_fingerprint() -> None:
    tail = "signal.high_error_count"
    body = document(tail, severity="medium", details={"errors": 12}, fingerprint="tool:bash")
    intake = decode(PREFIX, subject(tail), encode(body))
    assert intake.route.signal_kind == "high_error_count"
    assert intake.route.lifecycle is None
    event = intake.event
    assert isinstance(event, SignalEvent)
    assert event.severity == "medium"
    assert event.details == {"errors": 12}
    assert event.fingerprint == "tool:bash"


@pytest.mark.parametrize("severity", ["high", "medium", "low"])
def test_every_contract_severity_is_accepted(severity: str) -> None:
    tail = "signal.k"
    event = decode(PREFIX, subject(tail), encode(document(tail, severity=severity))).event
    assert isinstance(event, SignalEvent)
    assert event.severity == severity


@pytest.mark.parametrize("prefix", ["t-42", "org.hub"])
def test_prefix_with_dots_and_dashes_decodes(prefix: str) -> None:
    intake = decode(prefix, subject("heartbeat", prefix=prefix), encode(document("heartbeat")))
    assert type(intake.event) is LifecycleEvent


@pytest.mark.parametrize("tail", ["started", "spawned", "completed", "signal.model_degradation"])
def test_unknown_keys_are_ignored(tail: str) -> None:
    plain = decode(PREFIX, subject(tail), encode(document(tail))).event
    extended = document(
        tail,
        futureField={"nested": [1, 2, {"deep": None}]},
        anotherNewKey=5,
        yetAnother="text",
        snake_case_key=True,
    )
    assert decode(PREFIX, subject(tail), encode(extended)).event == plain


@pytest.mark.parametrize("raw_value", ['"a\\u0000b"', '"\\ud800"'])
def test_unknown_key_with_unstorable_text_is_still_ignored(raw_value: str) -> None:
    text = json.dumps(document("started"))[:-1] + f', "futureField": {raw_value}}}'
    assert type(decode(PREFIX, subject("started"), text.encode()).event) is LifecycleEvent


@pytest.mark.parametrize(
    ("tail", "key", "value"),
    [
        ("spawned", "task", "t" * 256),
        ("completed", "reason", "r" * 1024),
        ("signal.k", "fingerprint", "f" * 256),
    ],
)
def test_strings_at_their_length_limit_are_accepted(tail: str, key: str, value: str) -> None:
    event = decode(PREFIX, subject(tail), encode(document(tail, **{key: value}))).event
    assert getattr(event, key) == value


def test_body_of_exactly_64_kib_passes_the_size_check() -> None:
    body = sized_body(LIMIT)
    assert type(decode(PREFIX, subject("started"), body).event) is LifecycleEvent


# --- unknown_subject -----------------------------------------------------------


@pytest.mark.parametrize(
    "subj",
    [
        "hub.spoke.spoke-1.session.sess_1.finished",
        "hub.spoke.spoke-1.session.sess_1.signal.Bad-Kind",
        "hub.spoke.spoke$1.session.sess_1.started",
        "hub.spoke.spoke-1.session.sess_1",
        "other.spoke.spoke-1.session.sess_1.started",
    ],
)
def test_subject_outside_the_contract_is_unknown_subject(subj: str) -> None:
    assert rejection(subj, encode(document())).reason is DeadLetterReason.UNKNOWN_SUBJECT


# --- too_large -------------------------------------------------------------------


def test_body_over_64_kib_is_too_large() -> None:
    body = sized_body(LIMIT + 1)
    assert rejection(subject("started"), body).reason is DeadLetterReason.TOO_LARGE


def test_oversize_garbage_is_too_large_not_invalid_json() -> None:
    assert rejection(subject("started"), b"\xff" * (LIMIT + 1)).reason is DeadLetterReason.TOO_LARGE


# --- invalid_json ------------------------------------------------------------------


def _nan_body(constant: str) -> bytes:
    text = json.dumps(document("signal.k"))[:-1] + f', "details": {{"ratio": {constant}}}}}'
    return text.encode()


def _invalid_utf8_body() -> bytes:
    return encode(document(metadata={"note": "PLACEHOLDER"})).replace(b"PLACEHOLDER", b"\xc3\x28")


@pytest.mark.parametrize(
    ("tail", "body"),
    [
        ("started", b"not json"),
        ("started", b""),
        ("started", b"{"),
        ("started", b'{"eventId": }'),
        ("started", _invalid_utf8_body()),
        ("started", b"\xff\xfe{}"),
        ("started", json.dumps(document()).encode("utf-16")),
        ("started", encode([document()])),
        ("started", encode("a string")),
        ("started", b"42"),
        ("started", b"null"),
        ("started", b"true"),
        ("signal.k", _nan_body("NaN")),
        ("signal.k", _nan_body("Infinity")),
        ("signal.k", _nan_body("-Infinity")),
    ],
    ids=[
        "not-json",
        "empty",
        "unterminated",
        "syntax-error",
        "invalid-utf8-in-string",
        "invalid-utf8-start",
        "utf16",
        "array",
        "string",
        "number",
        "null",
        "bool",
        "nan",
        "infinity",
        "minus-infinity",
    ],
)
def test_body_that_is_not_a_utf8_json_object_is_invalid_json(tail: str, body: bytes) -> None:
    assert rejection(subject(tail), body).reason is DeadLetterReason.INVALID_JSON


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 60_000,
        (
            json.dumps(document())[:-1] + ', "metadata": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
        ).encode(),
    ],
    ids=["unclosed-arrays", "deep-metadata"],
)
def test_deeply_nested_body_is_dead_lettered(body: bytes) -> None:
    assert len(body) <= LIMIT
    reason = rejection(subject("started"), body).reason
    assert reason in (DeadLetterReason.INVALID_JSON, DeadLetterReason.INVALID_EVENT)


# --- invalid_event -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "overrides"),
    [
        ("started", {"eventId": MISSING}),
        ("started", {"eventId": "not-a-uuid"}),
        ("started", {"eventId": "6f1c1d2e-8a4b-4c3d-9e5f-0a1b2c3d4e5"}),
        ("started", {"eventId": 12345}),
        ("started", {"eventId": None}),
        ("started", {"occurredAt": MISSING}),
        ("started", {"occurredAt": "2024-05-01T12:00:00"}),
        ("started", {"occurredAt": "2024-05-01"}),
        ("started", {"occurredAt": "yesterday"}),
        ("started", {"occurredAt": 1714564800}),
        ("started", {"spokeId": MISSING}),
        ("started", {"sessionId": MISSING}),
        ("started", {"spokeId": 5}),
        ("started", {"sessionId": 5}),
        ("started", {"metadata": []}),
        ("started", {"metadata": "text"}),
        ("signal.k", {"severity": "urgent"}),
        ("signal.k", {"severity": "HIGH"}),
        ("signal.k", {"severity": MISSING}),
        ("signal.k", {"severity": None}),
        ("signal.k", {"severity": 2}),
        ("signal.k", {"details": []}),
        ("signal.k", {"details": "text"}),
        ("signal.k", {"fingerprint": "f" * 257}),
        ("signal.k", {"fingerprint": 7}),
        ("spawned", {"task": "t" * 257}),
        ("spawned", {"task": 1}),
        ("spawned", {"parentSessionId": 1}),
        ("spawned", {"workspaceId": ["ws"]}),
        ("completed", {"reason": "r" * 1025}),
        ("aborted", {"reason": False}),
        ("completed", {"reason": "bad\u0000byte"}),
        ("spawned", {"task": "\u0000"}),
        ("started", {"metadata": {"note": "a\u0000b"}}),
        ("started", {"metadata": {"a\u0000b": 1}}),
        ("signal.k", {"details": {"list": ["ok", "n\u0000ul"]}}),
    ],
)
def test_missing_or_mistyped_field_is_invalid_event(tail: str, overrides: dict[str, Any]) -> None:
    body = encode(document(tail, **overrides))
    assert rejection(subject(tail), body).reason is DeadLetterReason.INVALID_EVENT


# --- subject_mismatch ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "overrides"),
    [
        ("started", {"spokeId": "spoke-2"}),
        ("started", {"sessionId": "sess_2"}),
        ("signal.model_degradation", {"spokeId": "spoke-2"}),
        ("spawned", {"sessionId": "SESS_1"}),
        ("completed", {"spokeId": "spoke-2", "sessionId": "sess_2"}),
    ],
)
def test_body_ids_that_differ_from_the_subject_are_subject_mismatch(
    tail: str, overrides: dict[str, Any]
) -> None:
    body = encode(document(tail, **overrides))
    assert rejection(subject(tail), body).reason is DeadLetterReason.SUBJECT_MISMATCH


@pytest.mark.parametrize(
    "event_id",
    [
        "0b4c0d3e57a44f449a570f0e0d0c0b0a",
        "{0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a}",
        "urn:uuid:0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a",
    ],
)
def test_event_id_must_be_the_canonical_uuid_spelling(event_id: str) -> None:
    """The eventId doubles as Nats-Msg-Id, which JetStream compares byte for byte."""
    err = rejection(subject("started"), encode(document(eventId=event_id)))
    assert err.reason is DeadLetterReason.INVALID_EVENT
    assert "eventId" in err.error


@pytest.mark.parametrize(
    "occurred_at",
    ["1700000000", "2026-11-27T10:15+00:00", "2026-11-27T10:15:00+0000", "2026-11-27 10:15:00Z"],
)
def test_occurred_at_must_be_rfc3339(occurred_at: str) -> None:
    err = rejection(subject("started"), encode(document(occurredAt=occurred_at)))
    assert err.reason is DeadLetterReason.INVALID_EVENT
    assert "occurredAt" in err.error


@pytest.mark.parametrize(
    "occurred_at",
    ["2026-11-27T10:15:00Z", "2026-11-27t10:15:00.123456z", "2026-11-27T10:15:00-05:30"],
)
def test_rfc3339_timestamps_are_accepted(occurred_at: str) -> None:
    intake = decode(PREFIX, subject("started"), encode(document(occurredAt=occurred_at)))
    assert intake.event.occurred_at.tzinfo is not None


# --- what cannot be stored or serialized is invalid_event; unknown keys never matter ------


def _with_raw(doc: dict[str, Any], key: str, raw_json: str) -> bytes:
    """`doc` with `key` set to the JSON text `raw_json`, which json.dumps could not write."""
    return (json.dumps(doc)[:-1] + f', "{key}": {raw_json}}}').encode()


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    ("tail", "key", "raw_json"),
    [
        ("signal.model_degradation", "details", '{"ratio": 1e400}'),
        ("signal.model_degradation", "details", '{"ratio": -1e400}'),
        ("started", "metadata", '{"x": [1e999]}'),
        ("signal.model_degradation", "details", _nested(65)),
        ("started", "metadata", _nested(300)),
        ("started", "metadata", '{"a": ' + "[" * 2000 + "]" * 2000 + "}"),
        ("started", "metadata", '{"n": ' + "9" * 5000 + "}"),
    ],
    ids=["inf", "-inf", "inf-in-list", "depth-65", "depth-300", "depth-2000", "5000-digits"],
)
def test_known_values_that_cannot_be_stored_are_invalid_event(
    tail: str, key: str, raw_json: str
) -> None:
    body = _with_raw(document(tail), key, raw_json)
    assert len(body) <= LIMIT
    assert rejection(subject(tail), body).reason is DeadLetterReason.INVALID_EVENT


def test_known_values_64_levels_deep_are_accepted() -> None:
    body = _with_raw(document("signal.model_degradation"), "details", _nested(63))
    assert isinstance(decode(PREFIX, subject("signal.model_degradation"), body).event, SignalEvent)


@pytest.mark.parametrize(
    "raw_json",
    [
        "1e400",
        '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}",
        _nested(1500),
        "9" * 5000,
        '[{"deep": ' + "[" * 3000 + "]" * 3000 + "}, " + "7" * 4400 + "]",
    ],
    ids=["inf", "arrays-20000-deep", "objects-1500-deep", "5000-digits", "both"],
)
def test_unknown_keys_are_ignored_whatever_they_hold(raw_json: str) -> None:
    body = _with_raw(document(), "futureField", raw_json)
    assert len(body) <= LIMIT
    intake = decode(PREFIX, subject("started"), body)
    assert intake.event.event_id == UUID(EVENT_ID)


@pytest.mark.parametrize(
    "body",
    [
        b'{"eventId": "x", "deep": ' + b"[" * 3000 + b"]" * 2999 + b"}",
        b'{"deep": ' + b"[" * 3000 + b"]" * 3000 + b"} trailing",
        b'{"deep": ' + b"[" * 3000 + b"]" * 3000 + b', "n": 01}',
        b'{"deep": ' + b"[" * 3000 + b"]" * 3000 + b', "n": NaN}',
        b"[" + b"[" * 3000 + b"]" * 3000 + b"]",
    ],
    ids=["unbalanced", "trailing", "leading-zero", "nan", "not-an-object"],
)
def test_deep_bodies_that_are_not_json_objects_are_invalid_json(body: bytes) -> None:
    assert rejection(subject("started"), body).reason is DeadLetterReason.INVALID_JSON


@pytest.mark.parametrize(
    "occurred_at",
    [
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
        "2026-01-01T00:00:00+00:60",
        "2026-01-01T00:00:00+24:00",
    ],
)
def test_timestamps_out_of_range_or_with_impossible_offsets_are_invalid_event(
    occurred_at: str,
) -> None:
    body = encode(document(occurredAt=occurred_at))
    assert rejection(subject("started"), body).reason is DeadLetterReason.INVALID_EVENT


@pytest.mark.parametrize("parent", ["has space", "a.b", "x" * 129, "dot.>", "", "tab\t"])
def test_a_parent_session_id_no_subject_token_can_carry_is_invalid_event(parent: str) -> None:
    body = encode(document("spawned", parentSessionId=parent))
    assert rejection(subject("spawned"), body).reason is DeadLetterReason.INVALID_EVENT
