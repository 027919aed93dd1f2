"""From a stored message to a typed event, or to the dead-letter reason that applies.

Pure: the subject as published and the body bytes in, an event out. The checks
run in the order a reader would ask them: is this ours, is it small enough,
is it JSON, is it a valid event, does it say what its subject says.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, NoReturn

from pydantic import ValidationError

from worker.constants import MAX_EVENT_BYTES
from worker.domain import DeadLetterError, DeadLetterReason, ended_status
from worker.events import EndedEvent, InboundEvent, LifecycleEvent, SignalEvent, SpawnedEvent
from worker.subjects import Route, parse_inbound

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class Intake:
    route: Route
    event: InboundEvent


def decode(prefix: str, subject: str, body: bytes) -> Intake:
    """Decode one inbound message; raises DeadLetterError with the contract's reason."""
    route = parse_inbound(prefix, subject)
    if route is None:
        _reject(
            DeadLetterReason.UNKNOWN_SUBJECT,
            f"subject {subject!r} matches no inbound subject of the contract",
        )
    if len(body) > MAX_EVENT_BYTES:
        _reject(
            DeadLetterReason.TOO_LARGE,
            f"body is {len(body)} bytes, more than the {MAX_EVENT_BYTES} allowed",
        )
    document = _json_object(body)
    model = _model_for(route)
    # Only the keys this model knows are checked: unknown keys are ignored
    # whatever they hold (spokes upgrade independently).
    known = {key: value for key, value in document.items() if key in _aliases(model)}
    try:
        if _unstorable(known):
            # PostgreSQL text and jsonb cannot hold U+0000 or a lone UTF-16
            # surrogate; refusing them here gives a clear reason instead of
            # five failed deliveries.
            _reject(
                DeadLetterReason.INVALID_EVENT,
                "a string in the body contains U+0000 or an unpaired surrogate",
            )
        # Strict: nothing is coerced (the eventId and occurredAt validators
        # read their own text forms).
        event = model.model_validate(known, strict=True)
    except ValidationError as err:
        _reject(DeadLetterReason.INVALID_EVENT, _describe(err))
    except (RecursionError, ValueError) as err:
        _reject(DeadLetterReason.INVALID_EVENT, f"invalid event: {err}")
    if event.spoke_id != route.spoke_id or event.session_id != route.session_id:
        _reject(
            DeadLetterReason.SUBJECT_MISMATCH,
            f"body says spoke {event.spoke_id!r} session {event.session_id!r}, "
            f"subject says spoke {route.spoke_id!r} session {route.session_id!r}",
        )
    return Intake(route, event)


def _model_for(route: Route) -> type[InboundEvent]:
    if route.signal_kind is not None:
        return SignalEvent
    if route.lifecycle == "spawned":
        return SpawnedEvent
    if route.lifecycle is not None and ended_status(route.lifecycle) is not None:
        return EndedEvent
    return LifecycleEvent


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


@cache
def _aliases(model: type[InboundEvent]) -> frozenset[str]:
    return frozenset(field.alias or name for name, field in model.model_fields.items())


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
        document = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        _reject(
            DeadLetterReason.INVALID_JSON, f"body is not UTF-8: {err.reason} at byte {err.start}"
        )
    except ValueError as err:
        _reject(DeadLetterReason.INVALID_JSON, f"body is not JSON: {err}")
    except RecursionError:
        _reject(DeadLetterReason.INVALID_JSON, "body nests deeper than the JSON parser allows")
    if not isinstance(document, dict):
        _reject(
            DeadLetterReason.INVALID_JSON,
            f"body is JSON but a {type(document).__name__}, not an object",
        )
    return document


def _unstorable(value: object) -> bool:
    if isinstance(value, str):
        return _UNSTORABLE.search(value) is not None
    if isinstance(value, dict):
        return any(_unstorable(k) or _unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_unstorable(v) for v in value)
    return False


def _describe(err: ValidationError) -> str:
    problems = []
    for problem in err.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        problems.append(f"{where}: {problem['msg']}")
    more = err.error_count() - len(problems)
    suffix = f" (and {more} more)" if more > 0 else ""
    return "invalid event: " + "; ".join(problems) + suffix


def _reject(reason: DeadLetterReason, error: str) -> NoReturn:
    raise DeadLetterError(reason, error)
