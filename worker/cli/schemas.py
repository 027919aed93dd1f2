"""The message contract for other languages: JSON Schemas and an AsyncAPI 3.0 document.

Everything here is generated from the pydantic models of `worker.events`, never
written by hand: `hub-worker schemas export` (or `python -m worker.cli.schemas
export`) writes `schemas/*.schema.json` and `schemas/asyncapi.yaml`, and the
tests fail when the committed files drift from the models (`check`).

- One JSON Schema (draft 2020-12) per message shape: the inbound events of
  contract section 3 (validation mode: what the worker accepts; unknown keys
  allowed), the outbound events of section 5 (serialization mode: what the
  worker publishes) and the resolve command of section 7.
- One AsyncAPI 3.0.0 document naming every subject (with the default prefix
  `hub`), its parameters, its message and who sends it, with the same schemas
  under `components.schemas`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args
from uuid import UUID

import yaml
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from worker import __version__
from worker.domain import (
    LIFECYCLES,
    DeadLetterReason,
    Lifecycle,
    SessionStatus,
    Severity,
    anomaly_type_of,
    dedup_key,
)
from worker.events import (
    CommandError,
    DeadLetterEvent,
    DetectionEscalatedEvent,
    DetectionEvent,
    DetectionState,
    EndedEvent,
    LifecycleEvent,
    MappingEvent,
    MappingState,
    ResolveReply,
    ResolveRequest,
    SignalEvent,
    SpawnedEvent,
    lifecycle_model,
)
from worker.subjects import (
    ID_PATTERN,
    KIND_PATTERN,
    deadletter_subject,
    detection_subject,
    inbound_subject,
    mapping_subject,
    resolve_command_subject,
    signal_event,
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_SUFFIX = ".schema.json"
ASYNCAPI_FILE = "asyncapi.yaml"
ASYNCAPI_VERSION = "3.0.0"
# The documents name subjects with the default prefix; a hub with another
# HUB_SUBJECT_PREFIX replaces this first token (and `HUB_` in stream names).
PREFIX = "hub"
DEFAULT_DIRECTORY = Path(__file__).resolve().parents[2] / "schemas"
GENERATED_BY = (
    "Generated from worker/events.py by `hub-worker schemas export`; do not edit by hand."
)
MSG_ID_HEADER = "Nats-Msg-Id"

Direction = Literal["inbound", "outbound", "request", "reply"]

_INBOUND_NOTE = (
    "Unknown keys are allowed and ignored (additionalProperties is true): spokes upgrade "
    "independently. Known keys are strictly typed. The worker also checks what a schema "
    "cannot say: the body is at most 64 KiB, `spokeId` and `sessionId` equal the subject's "
    "tokens, and no string contains U+0000; a body that fails is dead-lettered."
)
_OUTBOUND_NOTE = (
    "Published by the worker through its transactional outbox (at least once, in the "
    f"order of the changes) with header `{MSG_ID_HEADER}` = `eventId`. Consumers should "
    "ignore keys they do not know: later versions may add some."
)


def _inbound_subject(event: str) -> str:
    return inbound_subject(PREFIX, "{spokeId}", "{sessionId}", event)


def _lifecycles(model: type[BaseModel]) -> tuple[Lifecycle, ...]:
    return tuple(lc for lc in LIFECYCLES if lifecycle_model(lc) is model)


@dataclass(frozen=True)
class _Shape:
    """One message shape: one JSON Schema file, one AsyncAPI message."""

    stem: str  # the file is `<stem>.schema.json`
    message: str  # its key in the AsyncAPI components.messages
    model: type[BaseModel]
    direction: Direction
    subjects: tuple[str, ...]
    summary: str

    @property
    def file_name(self) -> str:
        return self.stem + SCHEMA_SUFFIX

    @property
    def mode(self) -> JsonSchemaMode:
        return "validation" if self.direction in ("inbound", "request") else "serialization"


def _detection_subjects(*changes: str) -> tuple[str, ...]:
    return tuple(detection_subject(PREFIX, change, "{severity}", "{kind}") for change in changes)


SHAPES: tuple[_Shape, ...] = (
    _Shape(
        "spoke.spawned",
        "spawned",
        SpawnedEvent,
        "inbound",
        tuple(_inbound_subject(lc) for lc in _lifecycles(SpawnedEvent)),
        "A session was spawned (creates its coordinator mapping).",
    ),
    _Shape(
        "spoke.lifecycle",
        "lifecycle",
        LifecycleEvent,
        "inbound",
        tuple(_inbound_subject(lc) for lc in _lifecycles(LifecycleEvent)),
        "A session started, is alive (heartbeat) or was archived.",
    ),
    _Shape(
        "spoke.ended",
        "ended",
        EndedEvent,
        "inbound",
        tuple(_inbound_subject(lc) for lc in _lifecycles(EndedEvent)),
        "A session completed, failed or was aborted.",
    ),
    _Shape(
        "spoke.signal",
        "signal",
        SignalEvent,
        "inbound",
        (_inbound_subject(signal_event("{kind}")),),
        "A heuristic signal about a session; opens or counts a detection.",
    ),
    _Shape(
        "detection",
        "detection",
        DetectionEvent,
        "outbound",
        _detection_subjects("opened", "repeated", "resolved"),
        "A detection was opened, counted again (severity unchanged) or resolved.",
    ),
    _Shape(
        "detection.escalated",
        "detectionEscalated",
        DetectionEscalatedEvent,
        "outbound",
        _detection_subjects("escalated"),
        "A detection's severity rose.",
    ),
    _Shape(
        "mapping",
        "mapping",
        MappingEvent,
        "outbound",
        (mapping_subject(PREFIX, "{status}", "{sessionId}"),),
        "A coordinator mapping was created or changed status.",
    ),
    _Shape(
        "deadletter",
        "deadLetter",
        DeadLetterEvent,
        "outbound",
        (deadletter_subject(PREFIX, "{reason}"),),
        "An inbound message could never be applied and was dead-lettered.",
    ),
    _Shape(
        "cmd.detection.resolve.request",
        "resolveRequest",
        ResolveRequest,
        "request",
        (resolve_command_subject(PREFIX),),
        "Resolve a detection on behalf of an account.",
    ),
    _Shape(
        "cmd.detection.resolve.reply",
        "resolveReply",
        ResolveReply,
        "reply",
        (resolve_command_subject(PREFIX),),
        "The outcome of a resolve request.",
    ),
)


def _description(shape: _Shape) -> str:
    subjects = ", ".join(f"`{subject}`" for subject in shape.subjects)
    if shape.direction == "inbound":
        return (
            f"{shape.summary} Published by a spoke to JetStream on {subjects} "
            f"(stream HUB_EVENTS), with header `{MSG_ID_HEADER}` = `eventId`. {_INBOUND_NOTE}"
        )
    if shape.direction == "outbound":
        return f"{shape.summary} Subjects: {subjects} (stream HUB_OUT). {_OUTBOUND_NOTE}"
    if shape.direction == "request":
        return (
            f"{shape.summary} Body of a core NATS request on {subjects}; `resolvedBy` must be "
            "an existing account. Unknown keys are allowed and ignored (additionalProperties "
            "is true); known keys are strictly typed."
        )
    return (
        f"{shape.summary} Body of the reply to a request on {subjects}: "
        '`{"ok": true, "detection": {...}}` or `{"ok": false, "error": {"code", "message"}}`.'
    )


def _drop_field_titles(node: Any) -> None:
    """Remove pydantic's per-field titles ("Eventid"): noise for a reader and for codegen."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            for field_schema in properties.values():
                if isinstance(field_schema, dict):
                    field_schema.pop("title", None)
        for value in node.values():
            _drop_field_titles(value)
    elif isinstance(node, list):
        for item in node:
            _drop_field_titles(item)


def json_schema(shape: _Shape) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one message shape, from its pydantic model."""
    schema = shape.model.model_json_schema(by_alias=True, mode=shape.mode)
    _drop_field_titles(schema)
    if shape.direction in ("inbound", "request"):
        # The models ignore unknown keys; say so explicitly rather than by omission.
        schema["additionalProperties"] = True
    schema["description"] = _description(shape)
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": f"urn:hub-worker:v1:{shape.stem}",
        "$comment": GENERATED_BY,
        **schema,
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name (`<stem>.schema.json`) -> JSON Schema, for every message of the contract."""
    return {shape.file_name: json_schema(shape) for shape in SHAPES}


# --- examples --------------------------------------------------------------------------

_AT = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)
_LATER = datetime(2026, 11, 27, 10, 20, tzinfo=UTC)
_IDS = {
    "spawned": UUID("0b0e6a3c-31c2-4c3e-9a55-0d1f6e2a7b01"),
    "heartbeat": UUID("5d8f2a1e-7b4c-4e0a-8f3d-2c6b9e1a4d02"),
    "completed": UUID("a3c1e5f7-2b4d-4f6a-8c0e-1d3f5a7b9c03"),
    "signal": UUID("6f1c1d2e-8a53-4d0e-9a3b-5f8a3a1f2b10"),
    "opened": UUID("c2d4e6f8-0a1b-4c3d-9e5f-7a9b1c3d5e04"),
    "escalated": UUID("d3e5f7a9-1b2c-4d4e-8f6a-8b0c2d4e6f05"),
    "mapping": UUID("e4f6a8b0-2c3d-4e5f-9a7b-9c1d3e5f7a06"),
    "deadletter": UUID("f5a7b9c1-3d4e-4f6a-8b8c-0d2e4f6a8b07"),
}
_DETECTION = DetectionState(
    id="det_01J9Z3K7QW",
    session_id="sess-42",
    anomaly_type=anomaly_type_of("high_error_count"),
    severity="high",
    details={"errors": 42, "window": "5m"},
    dedup_key=dedup_key(anomaly_type_of("high_error_count"), "sess-42", None),
    occurrence_count=1,
    created_at=_AT,
    updated_at=_AT,
    resolved_at=None,
    resolved_by=None,
    resolution=None,
)
_RESOLVED = _DETECTION.model_copy(
    update={
        "occurrence_count": 3,
        "updated_at": _LATER,
        "resolved_at": _LATER,
        "resolved_by": "ops-alice",
        "resolution": "fixed",
    }
)


def _inbound(model: type[BaseModel], event: str, **fields: Any) -> dict[str, Any]:
    instance = model(
        event_id=_IDS[event],
        occurred_at=_AT,
        spoke_id="laptop",
        session_id="sess-42",
        **fields,
    )
    return instance.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _dump(instance: BaseModel, *, exclude_unset: bool = False) -> dict[str, Any]:
    return instance.model_dump(mode="json", by_alias=True, exclude_unset=exclude_unset)


def examples() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """AsyncAPI message key -> named example payloads, built (and so checked) by the models."""
    return {
        "spawned": [
            (
                "spawned",
                _inbound(
                    SpawnedEvent,
                    "spawned",
                    parent_session_id="coord-7",
                    workspace_id="ws-hub",
                    task_id="task-311",
                    task="Fix the flaky login test",
                ),
            )
        ],
        "lifecycle": [("heartbeat", _inbound(LifecycleEvent, "heartbeat"))],
        "ended": [("completed", _inbound(EndedEvent, "completed", reason="tests pass"))],
        "signal": [
            (
                "highErrorCount",
                _inbound(
                    SignalEvent,
                    "signal",
                    severity="high",
                    details={"errors": 42, "window": "5m"},
                ),
            )
        ],
        "detection": [
            (
                "opened",
                _dump(
                    DetectionEvent(
                        event_id=_IDS["opened"],
                        occurred_at=_AT,
                        causation_id=_IDS["signal"],
                        type="detection.opened",
                        detection=_DETECTION,
                    )
                ),
            )
        ],
        "detectionEscalated": [
            (
                "mediumToHigh",
                _dump(
                    DetectionEscalatedEvent(
                        event_id=_IDS["escalated"],
                        occurred_at=_AT,
                        causation_id=_IDS["signal"],
                        type="detection.escalated",
                        previous_severity="medium",
                        detection=_DETECTION.model_copy(update={"occurrence_count": 2}),
                    )
                ),
            )
        ],
        "mapping": [
            (
                "created",
                _dump(
                    MappingEvent(
                        event_id=_IDS["mapping"],
                        occurred_at=_AT,
                        causation_id=_IDS["spawned"],
                        type="mapping.active",
                        previous_status=None,
                        mapping=MappingState(
                            id="map_01J9Z3K7QX",
                            session_id="sess-42",
                            spoke_id="laptop",
                            workspace_id="ws-hub",
                            parent_session_id="coord-7",
                            task_id="task-311",
                            task="Fix the flaky login test",
                            status="active",
                            created_at=_AT,
                            updated_at=_AT,
                        ),
                    )
                ),
            )
        ],
        "deadLetter": [
            (
                "invalidJson",
                _dump(
                    DeadLetterEvent(
                        event_id=_IDS["deadletter"],
                        occurred_at=_AT,
                        causation_id=None,
                        type="deadletter",
                        dead_letter_id=17,
                        reason=DeadLetterReason.INVALID_JSON.value,
                        error="body is not JSON: Expecting value: line 1 column 1 (char 0)",
                        subject=_inbound_subject("heartbeat")
                        .replace("{spokeId}", "laptop")
                        .replace("{sessionId}", "sess-42"),
                        deliveries=1,
                        payload_base64="bm90IGpzb24=",
                        payload_size=8,
                        payload_truncated=False,
                    )
                ),
            )
        ],
        "resolveRequest": [
            (
                "fixed",
                _dump(
                    ResolveRequest(
                        detection_id=_DETECTION.id, resolved_by="ops-alice", resolution="fixed"
                    )
                ),
            )
        ],
        "resolveReply": [
            ("resolved", _dump(ResolveReply(ok=True, detection=_RESOLVED), exclude_unset=True)),
            (
                "notFound",
                _dump(
                    ResolveReply(
                        ok=False,
                        error=CommandError(code="not_found", message="no detection det_x"),
                    ),
                    exclude_unset=True,
                ),
            ),
        ],
    }


# --- AsyncAPI --------------------------------------------------------------------------


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in path)}


def _component_schema(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema as an AsyncAPI component: `$defs` hoisted into `schemas`, refs rewritten."""
    body = copy.deepcopy(schema)
    for key in ("$schema", "$id", "$comment"):
        body.pop(key, None)
    for name, definition in body.pop("$defs", {}).items():
        converted = _readable(_rewrite_refs(definition))
        if schemas.setdefault(name, converted) != converted:
            raise ValueError(f"two different schemas are both named {name!r}")
    return _readable(_rewrite_refs(body))


_FIRST_KEYS = ("title", "description", "type", "properties", "required", "additionalProperties")


def _readable(schema: Any) -> dict[str, Any]:
    """The same schema with its keys in reading order (YAML keeps the order given)."""
    assert isinstance(schema, dict)
    first = {key: schema[key] for key in _FIRST_KEYS if key in schema}
    return {**first, **{key: value for key, value in schema.items() if key not in first}}


def _rewrite_refs(node: Any) -> Any:
    """`#/$defs/X` -> `#/components/schemas/X`; a `$ref` with siblings goes into `allOf`
    (AsyncAPI schemas follow draft 7, where siblings of `$ref` are ignored)."""
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rewrite_refs(value) for key, value in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unexpected $ref {ref!r}")
        out["$ref"] = "#/components/schemas/" + ref.removeprefix("#/$defs/")
        if len(out) > 1:
            target = {"$ref": out.pop("$ref")}
            out["allOf"] = [target]
    return out


_PARAMETERS: dict[str, dict[str, Any]] = {
    "spokeId": {
        "description": f"The spoke's id, `{ID_PATTERN}`; equals the body's `spokeId`.",
        "examples": ["laptop"],
    },
    "sessionId": {
        "description": f"The session's id, `{ID_PATTERN}`; equals the body's `sessionId`.",
        "examples": ["sess-42"],
    },
    "signalKind": {
        "description": (
            f"The signal's kind, `{KIND_PATTERN}`; the detection's `anomalyType` is the "
            "kind upper-cased."
        ),
        "examples": ["model_degradation", "high_error_count", "session_stall"],
    },
    "severity": {
        "description": "The detection's severity after the change.",
        "enum": list(get_args(Severity)),
    },
    "anomalyKind": {
        "description": "The detection's `anomalyType` lower-cased.",
        "examples": ["model_degradation", "high_error_count", "session_stall"],
    },
    "mappingStatus": {
        "description": "The mapping's status after the change.",
        "enum": list(get_args(SessionStatus)),
    },
    "deadLetterReason": {
        "description": "Why the message was dead-lettered (contract section 6).",
        "enum": [reason.value for reason in DeadLetterReason],
    },
}

_HEADERS: dict[str, dict[str, Any]] = {
    "InboundHeaders": {
        "type": "object",
        "description": "NATS headers a spoke sends with an event.",
        "properties": {
            MSG_ID_HEADER: {
                "type": "string",
                "format": "uuid",
                "description": (
                    "The body's `eventId`, so that JetStream's duplicate window drops a "
                    "republished event (the worker applies an eventId once in any case)."
                ),
            }
        },
    },
    "OutboundHeaders": {
        "type": "object",
        "description": "NATS headers of every event the worker publishes.",
        "properties": {
            MSG_ID_HEADER: {
                "type": "string",
                "format": "uuid",
                "description": (
                    "The body's `eventId`: a republished event is dropped by the stream's "
                    "duplicate window."
                ),
            }
        },
        "required": [MSG_ID_HEADER],
    },
}


@dataclass(frozen=True)
class _Channel:
    key: str
    address: str | None
    parameters: dict[str, str]  # address parameter -> components.parameters key
    message: str  # components.messages key
    description: str


def _channels() -> list[_Channel]:
    channels: list[_Channel] = []
    session = {"spokeId": "spokeId", "sessionId": "sessionId"}
    for lifecycle in LIFECYCLES:
        shape = next(s for s in SHAPES if _inbound_subject(lifecycle) in s.subjects)
        channels.append(
            _Channel(
                lifecycle,
                _inbound_subject(lifecycle),
                session,
                shape.message,
                f"Lifecycle event `{lifecycle}` of a session, published by its spoke.",
            )
        )
    channels.append(
        _Channel(
            "signal",
            _inbound_subject(signal_event("{kind}")),
            {**session, "kind": "signalKind"},
            "signal",
            "A heuristic signal about a session, published by its spoke.",
        )
    )
    detection = {"severity": "severity", "kind": "anomalyKind"}
    for change, message, text in (
        ("opened", "detection", "A detection was created."),
        ("repeated", "detection", "Occurrences were added, severity unchanged (may coalesce)."),
        ("escalated", "detectionEscalated", "A detection's severity rose (token = new one)."),
        ("resolved", "detection", "A detection was resolved, by a person or automatically."),
    ):
        channels.append(
            _Channel(
                "detection" + change.capitalize(),
                detection_subject(PREFIX, change, "{severity}", "{kind}"),
                detection,
                message,
                text,
            )
        )
    channels.append(
        _Channel(
            "mapping",
            mapping_subject(PREFIX, "{status}", "{sessionId}"),
            {"status": "mappingStatus", "sessionId": "sessionId"},
            "mapping",
            "A coordinator mapping was created (`active` or terminal) or changed status.",
        )
    )
    channels.append(
        _Channel(
            "deadLetter",
            deadletter_subject(PREFIX, "{reason}"),
            {"reason": "deadLetterReason"},
            "deadLetter",
            "An inbound message was dead-lettered (stored in `dead_letters`, not redelivered).",
        )
    )
    channels.append(
        _Channel(
            "resolveDetection",
            resolve_command_subject(PREFIX),
            {},
            "resolveRequest",
            "Core NATS request/reply (not JetStream), answered by any running worker.",
        )
    )
    channels.append(
        _Channel(
            "resolveDetectionReply",
            None,
            {},
            "resolveReply",
            "The requester's inbox: the reply goes to the request's NATS reply subject "
            "(e.g. `_INBOX.…`), which every client's request() sets up.",
        )
    )
    return channels


def _operation_summary(shape: _Shape, channel: _Channel) -> str:
    if shape.direction == "inbound":
        return f"A spoke publishes `{channel.key}` to JetStream (and waits for the ack)."
    if shape.direction == "outbound":
        return f"Consume `{channel.key}` events from the stream HUB_OUT (or subscribe)."
    return "Request (core NATS request/reply); the reply comes from one worker."


def _message(shape: _Shape, example_payloads: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": shape.message,
        "title": shape.model.__name__,
        "summary": shape.summary,
        "contentType": "application/json",
    }
    headers: str | None = {"inbound": "InboundHeaders", "outbound": "OutboundHeaders"}.get(
        shape.direction
    )
    if headers is not None:
        message["headers"] = _ref("components", "schemas", headers)
    message["payload"] = _ref("components", "schemas", shape.model.__name__)
    rendered = []
    for name, payload in example_payloads:
        example: dict[str, Any] = {"name": name}
        if headers is not None:
            example["headers"] = {MSG_ID_HEADER: payload["eventId"]}
        example["payload"] = payload
        rendered.append(example)
    message["examples"] = rendered
    return message


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of every subject of contract sections 3, 5 and 7."""
    shapes = {shape.message: shape for shape in SHAPES}
    schemas: dict[str, Any] = {}
    payloads: dict[str, Any] = {}
    for shape in SHAPES:
        name = shape.model.__name__
        if name in payloads:
            raise ValueError(f"two message shapes use the model {name}")
        payloads[name] = _component_schema(json_schema(shape), schemas)
    component_schemas = {**payloads, **dict(sorted(schemas.items())), **copy.deepcopy(_HEADERS)}

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    all_channels = _channels()
    reply = next(c for c in all_channels if shapes[c.message].direction == "reply")
    for channel in all_channels:
        shape = shapes[channel.message]
        channels[channel.key] = {
            "address": channel.address,
            "description": channel.description,
            **(
                {
                    "parameters": {
                        name: _ref("components", "parameters", parameter)
                        for name, parameter in channel.parameters.items()
                    }
                }
                if channel.parameters
                else {}
            ),
            "messages": {channel.message: _ref("components", "messages", channel.message)},
        }
        if shape.direction == "reply":
            continue  # answered through the request's operation
        verb = "receive" if shape.direction == "outbound" else "send"
        operation: dict[str, Any] = {
            "action": verb,
            "channel": _ref("channels", channel.key),
            "summary": _operation_summary(shape, channel),
            "messages": [_ref("channels", channel.key, "messages", channel.message)],
        }
        if shape.direction == "request":
            operation["reply"] = {
                "channel": _ref("channels", reply.key),
                "messages": [_ref("channels", reply.key, "messages", reply.message)],
            }
        operations[verb + channel.key[0].upper() + channel.key[1:]] = operation

    all_examples = examples()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "hub-worker",
            "version": __version__,
            "description": (
                "The message contract of the agent hub's coordination worker over NATS. "
                "Subjects are shown with the default prefix `hub` (`HUB_SUBJECT_PREFIX`; "
                "streams `HUB_EVENTS` and `HUB_OUT`). Operations are written from the side "
                "of the worker's clients: spokes send session events, coordinators and alert "
                "consumers receive what changed, operators send resolve requests and receive "
                f"the reply. Every message body is one JSON object with camelCase keys. "
                f"{GENERATED_BY}"
            ),
        },
        "servers": {
            "local": {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": (
                    "The NATS server of a local hub (the embedded one `hub-worker run` "
                    "starts when HUB_NATS_URL is unset); JetStream on."
                ),
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": component_schemas,
            "messages": {
                shape.message: _message(shape, all_examples[shape.message]) for shape in SHAPES
            },
            "parameters": copy.deepcopy(_PARAMETERS),
        },
    }


# --- files -----------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # no &anchors / *aliases: every node written out in full


def render_json(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_yaml(document: dict[str, Any]) -> str:
    text = yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )
    return f"# {GENERATED_BY}\n{text}"


def files() -> dict[str, str]:
    """File name -> content, of everything `export` writes."""
    rendered = {name: render_json(schema) for name, schema in json_schemas().items()}
    rendered[ASYNCAPI_FILE] = render_yaml(asyncapi())
    return rendered


def export(directory: Path) -> list[Path]:
    """Write the schemas and the AsyncAPI document; remove *.schema.json no longer generated."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = files()
    for stale in directory.glob("*" + SCHEMA_SUFFIX):
        if stale.name not in wanted:
            stale.unlink()
    written = []
    for name, content in wanted.items():
        path = directory / name
        path.write_bytes(content.encode("utf-8"))
        written.append(path)
    return written


def check(directory: Path) -> list[str]:
    """Names of files that differ from what `export` would write (missing, stale or extra)."""
    wanted = files()
    drift = []
    for name, content in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_bytes() != content.encode("utf-8"):
            drift.append(name)
    drift.extend(
        path.name for path in directory.glob("*" + SCHEMA_SUFFIX) if path.name not in wanted
    )
    return sorted(drift)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.cli.schemas",
        description="Generate (export) or verify (check) the JSON Schemas and AsyncAPI document.",
    )
    parser.add_argument("action", choices=("export", "check"))
    parser.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=DEFAULT_DIRECTORY,
        help=f"default: {DEFAULT_DIRECTORY}",
    )
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if args.action == "export":
        for path in export(directory):
            print(path)
        return 0
    drift = check(directory)
    if drift:
        print(
            f"{directory} is out of date with worker/events.py (run `hub-worker schemas export`):",
            file=sys.stderr,
        )
        for name in drift:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"{directory} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
