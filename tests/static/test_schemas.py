"""schemas/: the message contract for other languages, generated from worker/events.py.

No servers: the committed files match the models, every message the models build
validates against its JSON Schema (and one the worker refuses does not), and the
AsyncAPI document holds together (every $ref resolves inside it, every address
parameter is declared, every operation names a channel and that channel's messages).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args
from uuid import UUID

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from worker import __version__
from worker.cli.schemas import (
    ASYNCAPI_FILE,
    DEFAULT_DIRECTORY,
    SCHEMA_DIALECT,
    SCHEMA_SUFFIX,
    asyncapi,
    check,
    examples,
    export,
    files,
    json_schemas,
    render_yaml,
)
from worker.config import Settings
from worker.domain import LIFECYCLES, DeadLetterError, DeadLetterReason, SessionStatus, dedup_key
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
)
from worker.intake import decode
from worker.subjects import (
    deadletter_subject,
    detection_subject,
    mapping_subject,
    parse_inbound,
    resolve_command_subject,
)

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
PREFIX = "hub"
AT = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)
EVENT_ID = UUID("6f1c1d2e-8a53-4d0e-9a3b-5f8a3a1f2b10")
OTHER_ID = UUID("0b0e6a3c-31c2-4c3e-9a55-0d1f6e2a7b01")
SPOKE = "laptop"
SESSION = "sess-42"

# The file and the model of every message shape.
FILES = {
    SpawnedEvent: "spoke.spawned.schema.json",
    LifecycleEvent: "spoke.lifecycle.schema.json",
    EndedEvent: "spoke.ended.schema.json",
    SignalEvent: "spoke.signal.schema.json",
    DetectionEvent: "detection.schema.json",
    DetectionEscalatedEvent: "detection.escalated.schema.json",
    MappingEvent: "mapping.schema.json",
    DeadLetterEvent: "deadletter.schema.json",
    ResolveRequest: "cmd.detection.resolve.request.schema.json",
    ResolveReply: "cmd.detection.resolve.reply.schema.json",
}
INBOUND = (SpawnedEvent, LifecycleEvent, EndedEvent, SignalEvent, ResolveRequest)


def committed(name: str) -> dict[str, Any]:
    """A schema as other languages read it: from the committed file."""
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return schema


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        committed(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def errors(name: str, instance: Any) -> list[str]:
    return [error.message for error in validator(name).iter_errors(instance)]


# --- drift ------------------------------------------------------------------------------


def test_committed_files_match_the_models() -> None:
    assert check(SCHEMAS) == [], "run `hub-worker schemas export` and commit schemas/"


def test_default_directory_is_the_repositorys_schemas() -> None:
    assert DEFAULT_DIRECTORY == SCHEMAS


def test_committed_files_are_exactly_the_generated_ones() -> None:
    on_disk = {path.name for path in SCHEMAS.iterdir()} - {"README.md"}
    assert on_disk == set(files())
    assert set(json_schemas()) == set(FILES.values())


def test_check_reports_a_stale_a_missing_and_an_extra_file(tmp_path: Path) -> None:
    written = export(tmp_path)
    assert sorted(path.name for path in written) == sorted(files())
    assert check(tmp_path) == []

    signal = tmp_path / "spoke.signal.schema.json"
    schema = json.loads(signal.read_text(encoding="utf-8"))
    schema["properties"]["severity"]["enum"].append("urgent")
    signal.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    assert check(tmp_path) == ["spoke.signal.schema.json"]

    (tmp_path / "mapping.schema.json").unlink()
    (tmp_path / "retired.schema.json").write_text("{}\n", encoding="utf-8")
    with (tmp_path / ASYNCAPI_FILE).open("a", encoding="utf-8") as stream:
        stream.write("# edited by hand\n")
    assert check(tmp_path) == [
        ASYNCAPI_FILE,
        "mapping.schema.json",
        "retired.schema.json",
        "spoke.signal.schema.json",
    ]

    export(tmp_path)
    assert check(tmp_path) == []
    assert not (tmp_path / "retired.schema.json").exists()


def test_module_command_exports_and_checks(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli.schemas", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    exported = run("export", str(tmp_path))
    assert exported.returncode == 0, exported.stderr
    assert run("check", str(tmp_path)).returncode == 0
    (tmp_path / "deadletter.schema.json").write_text("{}\n", encoding="utf-8")
    drifted = run("check", str(tmp_path))
    assert drifted.returncode == 1
    assert "deadletter.schema.json" in drifted.stderr


def test_output_is_stable_and_plain() -> None:
    assert files() == files()
    for name, content in files().items():
        assert content.endswith("\n"), name
        assert not content.endswith("\n\n"), name
    text = render_yaml(asyncapi())
    assert "&id" not in text  # no YAML anchors...
    assert "*id" not in text  # ...or aliases
    assert yaml.safe_load(text) == asyncapi()


# --- JSON Schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FILES.values()))
def test_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = committed(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == SCHEMA_DIALECT
    assert schema["$id"].startswith("urn:hub-worker:")
    assert schema["title"]
    assert schema["description"]
    assert schema["type"] == "object"
    for ref in refs(schema):
        assert resolve(schema, ref) is not None, ref


@pytest.mark.parametrize("model", list(FILES), ids=lambda model: model.__name__)
def test_unknown_keys_are_allowed_inbound_and_said_so(model: type) -> None:
    schema = committed(FILES[model])
    if model in INBOUND:
        assert schema["additionalProperties"] is True
        assert "Unknown keys are allowed" in schema["description"]
    else:
        # Outbound: pydantic's serialization schema sets nothing; consumers are told
        # to ignore new keys instead.
        assert "additionalProperties" not in schema


def test_the_format_checker_checks_timestamps_and_uuids() -> None:
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    assert checker.conforms("2026-11-27T10:15:00+02:00", "date-time")
    assert not checker.conforms("2026-11-27T10:15:00", "date-time")  # rfc3339-validator
    assert not checker.conforms("not-a-uuid", "uuid")


def inbound(model: type[Any], **fields: Any) -> dict[str, Any]:
    event = model(event_id=EVENT_ID, occurred_at=AT, spoke_id=SPOKE, session_id=SESSION, **fields)
    body: dict[str, Any] = event.model_dump(mode="json", by_alias=True)
    return body


def detection(**changes: Any) -> DetectionState:
    state = DetectionState(
        id="det-1",
        session_id=SESSION,
        anomaly_type="MODEL_DEGRADATION",
        severity="medium",
        details=None,
        dedup_key=dedup_key("MODEL_DEGRADATION", SESSION, None),
        occurrence_count=1,
        created_at=AT,
        updated_at=AT,
        resolved_at=None,
        resolved_by=None,
        resolution=None,
    )
    return state.model_copy(update=changes)


def mapping(status: SessionStatus) -> MappingState:
    return MappingState(
        id="map-1",
        session_id=SESSION,
        spoke_id=SPOKE,
        workspace_id=None,
        parent_session_id="coord-7",
        task_id=None,
        task=None,
        status=status,
        created_at=AT,
        updated_at=AT,
    )


def envelope() -> dict[str, Any]:
    return {"event_id": OTHER_ID, "occurred_at": AT, "causation_id": EVENT_ID}


def valid_examples() -> Iterator[tuple[str, type[Any], dict[str, Any]]]:
    """(id, model, body) of messages built by the models, as the worker reads or writes them."""
    for lifecycle in LIFECYCLES:
        model = type(decode(PREFIX, inbound_subject(lifecycle), as_bytes(minimal())).event)
        yield f"{lifecycle}-minimal", model, minimal()
    yield (
        "spawned-full",
        SpawnedEvent,
        inbound(
            SpawnedEvent,
            parent_session_id="coord-7",
            workspace_id="ws",
            task_id="t-1",
            task="x" * 256,
            metadata={"host": "laptop", "nested": {"ok": [1, 2]}},
        ),
    )
    yield "completed-reason", EndedEvent, inbound(EndedEvent, reason="done")
    yield "failed-no-reason", EndedEvent, inbound(EndedEvent)
    for severity in ("low", "medium", "high"):
        yield (
            f"signal-{severity}",
            SignalEvent,
            inbound(SignalEvent, severity=severity, details={"p95": 1.5}, fingerprint="f"),
        )
    yield (
        "signal-with-unknown-keys",
        SignalEvent,
        {**inbound(SignalEvent, severity="low"), "schemaVersion": 2, "extra": {"a": 1}},
    )
    for change in ("opened", "repeated", "resolved"):
        state = detection(occurrence_count=2)
        if change == "resolved":
            state = detection(resolved_at=AT, resolved_by=None, resolution="auto_resolved")
        yield (
            f"detection-{change}",
            DetectionEvent,
            DetectionEvent(**envelope(), type=f"detection.{change}", detection=state).model_dump(
                mode="json"
            ),
        )
    yield (
        "detection-escalated",
        DetectionEscalatedEvent,
        DetectionEscalatedEvent(
            **envelope(),
            type="detection.escalated",
            previous_severity="low",
            detection=detection(severity="high", details={"errors": 3}),
        ).model_dump(mode="json"),
    )
    for status in get_args(SessionStatus):
        yield (
            f"mapping-{status}",
            MappingEvent,
            MappingEvent(
                **{**envelope(), "causation_id": None},
                type=f"mapping.{status}",
                previous_status=None if status == "active" else "active",
                mapping=mapping(status),
            ).model_dump(mode="json"),
        )
    for reason in DeadLetterReason:
        yield (
            f"deadletter-{reason.value}",
            DeadLetterEvent,
            DeadLetterEvent(
                **{**envelope(), "causation_id": None},
                type="deadletter",
                dead_letter_id=None if reason is DeadLetterReason.TOO_LARGE else 3,
                reason=reason.value,
                error="a sentence",
                subject=inbound_subject("started"),
                deliveries=5,
                payload_base64="e30=",
                payload_size=2,
                payload_truncated=False,
            ).model_dump(mode="json"),
        )
    for resolution in ("acknowledged", "dismissed", "escalated", "fixed"):
        yield (
            f"resolve-{resolution}",
            ResolveRequest,
            ResolveRequest(
                detection_id="det-1", resolved_by="ops-alice", resolution=resolution
            ).model_dump(mode="json"),
        )
    resolved = detection(resolved_at=AT, resolved_by="ops-alice", resolution="fixed")
    yield (
        "reply-ok",
        ResolveReply,
        ResolveReply(ok=True, detection=resolved).model_dump(mode="json", exclude_unset=True),
    )
    for code in get_args(CommandError.model_fields["code"].annotation):
        yield (
            f"reply-{code}",
            ResolveReply,
            ResolveReply(ok=False, error=CommandError(code=code, message="m")).model_dump(
                mode="json", exclude_unset=True
            ),
        )


def inbound_subject(tail: str) -> str:
    return f"{PREFIX}.spoke.{SPOKE}.session.{SESSION}.{tail}"


def minimal() -> dict[str, Any]:
    return inbound(LifecycleEvent)


def as_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


VALID = list(valid_examples())


@pytest.mark.parametrize(
    ("model", "body"), [(m, b) for _, m, b in VALID], ids=[i for i, _, _ in VALID]
)
def test_a_message_built_by_the_models_validates(model: type[Any], body: dict[str, Any]) -> None:
    assert errors(FILES[model], body) == []
    # ...and the models read it back (what the schema accepts, the worker accepts).
    model.model_validate_json(json.dumps(body))


@pytest.mark.parametrize(
    ("message", "index"), [(m, i) for m, e in examples().items() for i in range(len(e))]
)
def test_the_documents_examples_validate(message: str, index: int) -> None:
    model = {
        "spawned": SpawnedEvent,
        "lifecycle": LifecycleEvent,
        "ended": EndedEvent,
        "signal": SignalEvent,
        "detection": DetectionEvent,
        "detectionEscalated": DetectionEscalatedEvent,
        "mapping": MappingEvent,
        "deadLetter": DeadLetterEvent,
        "resolveRequest": ResolveRequest,
        "resolveReply": ResolveReply,
    }[message]
    _, payload = examples()[message][index]
    assert errors(FILES[model], payload) == []


def without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {k: v for k, v in body.items() if k != key}


def setting(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {**body, key: value}


# (id, model, subject tail of an inbound event or None, a change that makes it wrong)
WRONG: list[tuple[str, type[Any], str | None, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("severity-urgent", SignalEvent, "signal.x", setting("severity", "urgent")),
    ("severity-missing", SignalEvent, "signal.x", without("severity")),
    ("eventId-missing", LifecycleEvent, "started", without("eventId")),
    ("eventId-not-a-uuid", LifecycleEvent, "started", setting("eventId", "evt-1")),
    ("eventId-a-number", LifecycleEvent, "started", setting("eventId", 42)),
    ("occurredAt-missing", LifecycleEvent, "heartbeat", without("occurredAt")),
    (
        "occurredAt-no-offset",
        LifecycleEvent,
        "heartbeat",
        setting("occurredAt", "2026-11-27T10:15:00"),
    ),
    ("occurredAt-a-number", LifecycleEvent, "heartbeat", setting("occurredAt", 1764238500)),
    ("spokeId-a-dot", LifecycleEvent, "started", setting("spokeId", "lap.top")),
    ("sessionId-too-long", LifecycleEvent, "started", setting("sessionId", "s" * 129)),
    ("task-too-long", SpawnedEvent, "spawned", setting("task", "x" * 257)),
    ("workspaceId-empty", SpawnedEvent, "spawned", setting("workspaceId", "")),
    ("reason-too-long", EndedEvent, "failed", setting("reason", "r" * 1025)),
    ("reason-a-number", EndedEvent, "failed", setting("reason", 3)),
    ("details-a-list", SignalEvent, "signal.x", setting("details", [1, 2])),
    ("fingerprint-too-long", SignalEvent, "signal.x", setting("fingerprint", "f" * 257)),
    ("metadata-a-string", LifecycleEvent, "archived", setting("metadata", "{}")),
    ("resolution-auto", ResolveRequest, None, setting("resolution", "auto_resolved")),
    ("resolvedBy-missing", ResolveRequest, None, without("resolvedBy")),
    ("detection-type-unknown", DetectionEvent, None, setting("type", "detection.escalated")),
    ("detection-eventId-missing", DetectionEvent, None, without("eventId")),
    ("escalated-no-previous", DetectionEscalatedEvent, None, without("previousSeverity")),
    ("mapping-status-archived", MappingEvent, None, setting("type", "mapping.archived")),
    ("deadletter-deliveries-text", DeadLetterEvent, None, setting("deliveries", "5")),
    ("reply-ok-missing", ResolveReply, None, without("ok")),
]


def base_for(model: type[Any]) -> dict[str, Any]:
    return next(body for _, m, body in VALID if m is model)


@pytest.mark.parametrize(
    ("model", "tail", "spoil"), [(m, t, s) for _, m, t, s in WRONG], ids=[i for i, *_ in WRONG]
)
def test_a_wrong_message_is_refused_by_its_schema_and_by_the_worker(
    model: type[Any],
    tail: str | None,
    spoil: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    body = spoil(base_for(model))
    assert errors(FILES[model], body), f"schema accepted {body}"
    if tail is not None:
        with pytest.raises(DeadLetterError) as refused:
            decode(PREFIX, inbound_subject(tail), as_bytes(body))
        assert refused.value.reason is DeadLetterReason.INVALID_EVENT


TAILS = {
    SpawnedEvent: "spawned",
    LifecycleEvent: "heartbeat",
    EndedEvent: "failed",
    SignalEvent: "signal.model_degradation",
}
SPOKE_EVENTS = [(i, m, b) for i, m, b in VALID if m in TAILS]


@pytest.mark.parametrize(
    ("model", "body"), [(m, b) for _, m, b in SPOKE_EVENTS], ids=[i for i, _, _ in SPOKE_EVENTS]
)
def test_what_an_inbound_schema_accepts_the_worker_decodes(
    model: type[Any], body: dict[str, Any]
) -> None:
    intake = decode(PREFIX, inbound_subject(TAILS[model]), as_bytes(body))
    assert type(intake.event) is model


# --- AsyncAPI ---------------------------------------------------------------------------

# The fixed fields of AsyncAPI 3.0.0's objects ("x-" extensions aside).
ALLOWED = {
    "root": {
        "asyncapi", "id", "info", "servers", "defaultContentType", "channels", "operations",
        "components",
    },
    "info": {
        "title", "version", "description", "termsOfService", "contact", "license", "tags",
        "externalDocs",
    },
    "server": {
        "host", "protocol", "protocolVersion", "pathname", "description", "title", "summary",
        "variables", "security", "tags", "externalDocs", "bindings",
    },
    "channel": {
        "address", "messages", "title", "summary", "description", "servers", "parameters",
        "tags", "externalDocs", "bindings",
    },
    "operation": {
        "action", "channel", "title", "summary", "description", "security", "tags",
        "externalDocs", "bindings", "traits", "messages", "reply",
    },
    "reply": {"address", "channel", "messages"},
    "message": {
        "headers", "payload", "correlationId", "contentType", "name", "title", "summary",
        "description", "tags", "externalDocs", "bindings", "examples", "traits",
    },
    "example": {"headers", "payload", "name", "summary"},
    "parameter": {"enum", "default", "description", "examples", "location"},
    "components": {
        "schemas", "servers", "channels", "operations", "replies", "replyAddresses", "messages",
        "securitySchemes", "serverVariables", "parameters", "correlationIds", "operationTraits",
        "messageTraits", "serverBindings", "channelBindings", "operationBindings",
        "messageBindings", "tags", "externalDocs",
    },
}  # fmt: skip
KEY = re.compile(r"^[\w\d.\-_]+$")


def fields(node: dict[str, Any]) -> set[str]:
    return {key for key in node if not key.startswith("x-")}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(document: Any, ref: str) -> Any:
    """The node a local `#/json/pointer` names, or None."""
    if not ref.startswith("#/"):
        return None
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def deref(document: dict[str, Any], node: dict[str, Any]) -> Any:
    return resolve(document, node["$ref"]) if "$ref" in node else node


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((SCHEMAS / ASYNCAPI_FILE).read_text("utf-8"))
    return document


def test_asyncapi_header(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert fields(doc) <= ALLOWED["root"]
    assert fields(doc["info"]) <= ALLOWED["info"]
    assert doc["info"]["title"] == "hub-worker"
    assert doc["info"]["version"] == __version__
    assert doc["defaultContentType"] == "application/json"
    assert doc["servers"]
    for server in doc["servers"].values():
        assert fields(server) <= ALLOWED["server"]
    assert {s["protocol"] for s in doc["servers"].values()} == {"nats"}
    assert {s["host"] for s in doc["servers"].values()} == {"localhost:4222"}
    assert fields(doc["components"]) <= ALLOWED["components"]


def test_every_ref_resolves_inside_the_document(doc: dict[str, Any]) -> None:
    found = list(refs(doc))
    assert len(found) > 50
    for ref in found:
        assert resolve(doc, ref) is not None, f"{ref} does not resolve"
    text = json.dumps(doc)
    for keyword in ("$defs", "$id", "$schema"):
        assert f'"{keyword}"' not in text


def test_component_keys_are_valid_identifiers(doc: dict[str, Any]) -> None:
    for section in ("channels", "operations"):
        assert all(KEY.match(key) for key in doc[section]), section
    for section, entries in doc["components"].items():
        assert all(KEY.match(key) for key in entries), section


def test_every_address_parameter_is_declared(doc: dict[str, Any]) -> None:
    for key, channel in doc["channels"].items():
        assert fields(channel) <= ALLOWED["channel"], key
        address = channel["address"]
        named = set(re.findall(r"\{([^}]+)\}", address or ""))
        declared = set(channel.get("parameters", {}))
        assert named == declared, key
        for parameter in channel.get("parameters", {}).values():
            target = deref(doc, parameter)
            assert isinstance(target, dict)
            assert fields(target) <= ALLOWED["parameter"], key
            assert target.get("description"), key
        assert channel["messages"], key


def test_every_operation_names_a_channel_and_its_messages(doc: dict[str, Any]) -> None:
    assert doc["operations"]
    for key, operation in doc["operations"].items():
        assert fields(operation) <= ALLOWED["operation"], key
        assert operation["action"] in ("send", "receive"), key
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/"), key
        assert resolve(doc, channel_ref) is not None, key
        assert operation["messages"], key
        for message in operation["messages"]:
            # A 3.0 operation's messages are a subset of its channel's messages.
            assert message["$ref"].startswith(channel_ref + "/messages/"), key
            assert resolve(doc, message["$ref"]) is not None, key
        if "reply" in operation:
            reply = operation["reply"]
            assert fields(reply) <= ALLOWED["reply"]
            reply_channel = reply["channel"]["$ref"]
            assert resolve(doc, reply_channel) is not None
            for message in reply["messages"]:
                assert message["$ref"].startswith(reply_channel + "/messages/")
                assert resolve(doc, message["$ref"]) is not None


def test_every_message_has_a_payload_headers_and_valid_examples(doc: dict[str, Any]) -> None:
    registry = Registry().with_resource(
        "urn:asyncapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    for key, message in doc["components"]["messages"].items():
        assert fields(message) <= ALLOWED["message"], key
        assert message["contentType"] == "application/json"
        payload = jsonschema.Draft202012Validator(
            {"$ref": "urn:asyncapi" + message["payload"]["$ref"]},
            registry=registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        assert message["examples"], key
        for example in message["examples"]:
            assert fields(example) <= ALLOWED["example"]
            assert list(payload.iter_errors(example["payload"])) == [], (key, example["name"])
            if "headers" in message:
                assert example["headers"]["Nats-Msg-Id"] == example["payload"]["eventId"]
        if key.startswith("resolve"):
            assert "headers" not in message, key  # core NATS request/reply
        else:
            headers = deref(doc, message["headers"])
            assert "Nats-Msg-Id" in headers["properties"], key
            assert "eventId" in headers["properties"]["Nats-Msg-Id"]["description"]


def test_the_documents_schemas_are_the_json_schemas(doc: dict[str, Any]) -> None:
    """The same constraints whether read from a .schema.json or through the document."""
    registry = Registry().with_resource(
        "urn:asyncapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    for _, model, body in VALID:
        through_document = jsonschema.Draft202012Validator(
            {"$ref": f"urn:asyncapi#/components/schemas/{model.__name__}"}, registry=registry
        )
        assert list(through_document.iter_errors(body)) == []
    for _, model, _, spoil in WRONG:
        body = spoil(base_for(model))
        through_document = jsonschema.Draft202012Validator(
            {"$ref": f"urn:asyncapi#/components/schemas/{model.__name__}"},
            registry=registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        assert list(through_document.iter_errors(body)), model.__name__


def concrete(address: str, channel: dict[str, Any], doc: dict[str, Any]) -> str:
    """The address with each parameter replaced by its first enum value or example."""
    for name, parameter in channel.get("parameters", {}).items():
        target = deref(doc, parameter)
        value = (target.get("enum") or target.get("examples"))[0]
        address = address.replace("{" + name + "}", value)
    return address


def test_channels_are_the_contracts_subjects(doc: dict[str, Any]) -> None:
    addresses = {channel["address"] for channel in doc["channels"].values() if channel["address"]}
    session = f"{PREFIX}.spoke.{{spokeId}}.session.{{sessionId}}"
    assert addresses == {
        *(f"{session}.{lifecycle}" for lifecycle in LIFECYCLES),
        f"{session}.signal.{{kind}}",
        *(
            detection_subject(PREFIX, change, "{severity}", "{kind}")
            for change in ("opened", "repeated", "escalated", "resolved")
        ),
        mapping_subject(PREFIX, "{status}", "{sessionId}"),
        deadletter_subject(PREFIX, "{reason}"),
        resolve_command_subject(PREFIX),
    }
    assert Settings().subject_prefix == PREFIX


def test_inbound_channels_carry_the_model_the_worker_decodes(doc: dict[str, Any]) -> None:
    sends = {
        op["channel"]["$ref"].removeprefix("#/channels/")
        for op in doc["operations"].values()
        if op["action"] == "send"
    }
    for key, channel in doc["channels"].items():
        if not (channel["address"] or "").startswith(f"{PREFIX}.spoke."):
            continue
        assert key in sends, key
        subject = concrete(channel["address"], channel, doc)
        route = parse_inbound(PREFIX, subject)
        assert route is not None, subject
        (message,) = channel["messages"].values()
        payload_ref = deref(doc, message)["payload"]["$ref"]
        # The parameters' examples are this test's spoke and session.
        event = decode(
            PREFIX,
            subject,
            as_bytes(inbound(SignalEvent, severity="low") if route.signal_kind else minimal()),
        ).event
        assert payload_ref == f"#/components/schemas/{type(event).__name__}", key


def test_outbound_channels_are_received_and_the_command_is_a_request(
    doc: dict[str, Any],
) -> None:
    actions = {
        op["channel"]["$ref"].removeprefix("#/channels/"): op for op in doc["operations"].values()
    }
    for key, channel in doc["channels"].items():
        address = channel["address"]
        if address is None:
            assert key not in actions  # the reply inbox is reached through the request
        elif address.startswith(f"{PREFIX}.spoke."):
            assert actions[key]["action"] == "send"
        elif address == resolve_command_subject(PREFIX):
            assert actions[key]["action"] == "send"
            reply = actions[key]["reply"]
            reply_channel = resolve(doc, reply["channel"]["$ref"])
            assert reply_channel["address"] is None
            (message,) = reply_channel["messages"].values()
            assert deref(doc, message)["payload"]["$ref"].endswith("/ResolveReply")
        else:
            assert actions[key]["action"] == "receive", key
            for message in channel["messages"].values():
                assert deref(doc, message)["headers"]["$ref"].endswith("/OutboundHeaders")


def test_parameter_enums_are_the_domains(doc: dict[str, Any]) -> None:
    parameters = doc["components"]["parameters"]
    assert set(parameters["severity"]["enum"]) == {"low", "medium", "high"}
    assert parameters["mappingStatus"]["enum"] == list(get_args(SessionStatus))
    assert parameters["deadLetterReason"]["enum"] == [r.value for r in DeadLetterReason]
    for kind in parameters["signalKind"]["examples"]:
        assert parse_inbound(PREFIX, inbound_subject(f"signal.{kind}")) is not None
    assert all(name.endswith(SCHEMA_SUFFIX) for name in json_schemas())
