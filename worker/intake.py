"""From a stored message to a typed event, or to the dead-letter reason that applies.

Pure: the subject as published and the body bytes in, an event out. The checks
run in the order a reader would ask them: is this ours, is it small enough,
is it JSON, is it a valid event, does it say what its subject says.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, NoReturn, get_args

from pydantic import ValidationError

from worker.constants import (
    MAX_EVENT_BYTES,
    MAX_KNOWN_VALUE_DEPTH,
    ROUTE_CACHE_LONGEST,
    ROUTE_CACHE_SUBJECTS,
)
from worker.domain import DeadLetterError, DeadLetterReason
from worker.events import InboundEvent, SignalEvent, lifecycle_model, validation_problems
from worker.storable import UNSTORABLE_TEXT
from worker.subjects import Route, parse_inbound

# One JSON token after optional whitespace: a string, a number, a literal or
# punctuation (RFC 8259; digits are ASCII digits only, as in the C parser).
_TOKEN = re.compile(
    r'[ \t\n\r]*(?:("(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")'
    r"|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)|(true|false|null)|([{}\[\]:,]))"
)
_STRING, _NUMBER, _LITERAL, _PUNCTUATION = 1, 2, 3, 4
# What `_vouched_for` looks for, with plain substring tests (a regular
# expression over the body took longer than the parse it guards).
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


@dataclass(frozen=True)
class Intake:
    route: Route
    event: InboundEvent


def decode(prefix: str, subject: str, body: bytes) -> Intake:
    """Decode one inbound message; raises DeadLetterError with the contract's reason."""
    route = _route(prefix, subject)
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
    model = _model_for(route)
    event = _fast_event(model, body)
    if event is None:
        event = _checked_event(model, body)
    if event.spoke_id != route.spoke_id or event.session_id != route.session_id:
        _reject(
            DeadLetterReason.SUBJECT_MISMATCH,
            f"body says spoke {event.spoke_id!r} session {event.session_id!r}, "
            f"subject says spoke {route.spoke_id!r} session {route.session_id!r}",
        )
    return Intake(route, event)


def _fast_event(model: type[InboundEvent], body: bytes) -> InboundEvent | None:
    """The event, read in one pass by pydantic-core's own JSON parser, when that gives
    exactly what `_checked_event` would; None when it refuses the body, or when the
    body holds something the two read differently (`_vouched_for`, `_overflows`).

    `_checked_event` has the last word on every body this refuses: each dead letter's
    reason and text come from there.
    """
    if not _vouched_for(body):
        return None
    try:
        # by_name=False: only the camelCase keys count, as in `_known_members`
        # (a body's `session_id` is an unknown key, not the sessionId).
        event = model.model_validate_json(body, strict=True, by_name=False)
    except (ValueError, RecursionError):  # ValidationError among them
        return None
    return None if _overflows(event) else event


def _vouched_for(body: bytes) -> bool:
    """Whether pydantic-core's JSON parser (jiter), should it accept `body`, reads it
    exactly as `_checked_event` does; False where they may differ.

    They agree on duplicate keys (the last wins), whitespace, escapes and numbers
    (floats of any length, rounded alike; integers up to Python's 4,300 digits); they
    differ on (tests/unit/test_intake_properties.py shows each):
    - NaN and Infinity: jiter takes them, json.loads here refuses them (invalid_json);
    - \\u0000 and surrogate escapes: jiter takes \\u0000, which no known value may hold;
    - nesting: jiter takes 200 levels, a known value may nest 64 (counting brackets
      bounds the depth; strings and unknown keys count too, honest bodies hold few).
    Bytes that are not UTF-8 and a BOM both refuse, each in its own words: jiter's
    refusal sends the body the long way (tests/unit/test_intake_properties.py pins
    that it still refuses them).
    Anywhere in the body, strings too: a false alarm only costs the long way.
    """
    if b"NaN" in body or b"Infinity" in body:
        return False
    if b"\\u" in body and _UNSTORABLE_ESCAPE.search(body) is not None:
        return False
    return body.count(b"{") + body.count(b"[") <= MAX_KNOWN_VALUE_DEPTH


def _overflows(event: InboundEvent) -> bool:
    """Whether a known value holds a number that overflowed to infinity (1e400): both
    parsers read it so, and `_checked_event` refuses it (`_unstorable`). Looked for
    in the event rather than the body, where an exponent's digits look like those of
    a hexadecimal id; and only in the fields that may hold a float."""
    pending: list[object] = [getattr(event, name) for name in _fields_with_floats(type(event))]
    while pending:
        value = pending.pop()
        if isinstance(value, float) and math.isinf(value):
            return True
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def _checked_event(model: type[InboundEvent], body: bytes) -> InboundEvent:
    """The event the body holds, checked step by step; raises DeadLetterError with the
    contract's reason."""
    # Only the keys this model knows are checked: unknown keys are ignored
    # whatever they hold (spokes upgrade independently).
    known = _known_members(body, _aliases(model))
    try:
        if (problem := _unstorable(known)) is not None:
            # What PostgreSQL or the outbound serializer would refuse is refused
            # here, with a clear reason, instead of after five failed deliveries.
            _reject(DeadLetterReason.INVALID_EVENT, f"invalid event: {problem}")
        # Strict: nothing is coerced (the eventId and occurredAt validators
        # read their own text forms).
        event = model.model_validate(known, strict=True)
    except ValidationError as err:
        _reject(
            DeadLetterReason.INVALID_EVENT,
            "invalid event: " + validation_problems(err, 5, count_rest=True),
        )
    except (RecursionError, ValueError) as err:
        _reject(DeadLetterReason.INVALID_EVENT, f"invalid event: {err}")
    return event


def _route(prefix: str, subject: str) -> Route | None:
    if len(subject) > ROUTE_CACHE_LONGEST:
        return parse_inbound(prefix, subject)
    return _remembered_route(prefix, subject)


# Routes are frozen: one may be handed out any number of times.
_remembered_route = lru_cache(maxsize=ROUTE_CACHE_SUBJECTS)(parse_inbound)


def _model_for(route: Route) -> type[InboundEvent]:
    if route.lifecycle is None:
        return SignalEvent
    return lifecycle_model(route.lifecycle)


@cache
def _fields_with_floats(model: type[InboundEvent]) -> tuple[str, ...]:
    """The fields whose type lets them hold a float: free-form JSON (`metadata`,
    `details`) today. An id, a timestamp or a severity is never one."""
    return tuple(
        name for name, field in model.model_fields.items() if _may_hold_float(field.annotation)
    )


def _may_hold_float(annotation: object) -> bool:
    if annotation is Any or annotation is float:
        return True
    return any(_may_hold_float(arg) for arg in get_args(annotation))


@cache
def _aliases(model: type[InboundEvent]) -> frozenset[str]:
    return frozenset(field.alias or name for name, field in model.model_fields.items())


class _NotJson(ValueError):
    pass


def _reject_constant(name: str) -> NoReturn:
    raise _NotJson(f"{name} is not JSON")


def _known_members(body: bytes, known: frozenset[str]) -> dict[str, Any]:
    """The members of the body's JSON object whose keys are in `known`, parsed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        _reject(
            DeadLetterReason.INVALID_JSON, f"body is not UTF-8: {err.reason} at byte {err.start}"
        )
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except _NotJson as err:
        _reject(DeadLetterReason.INVALID_JSON, f"body is not JSON: {err}")
    except json.JSONDecodeError as err:
        _reject(DeadLetterReason.INVALID_JSON, f"body is not JSON: {err}")
    except (RecursionError, ValueError):
        # Nested deeper than the parser recurses, or an integer too long to
        # convert: the text is checked without recursion and only the known
        # members are parsed, so what unknown keys hold does not matter.
        return {key: _parsed_member(key, value) for key, value in _members(text) if key in known}
    if not isinstance(document, dict):
        _reject(
            DeadLetterReason.INVALID_JSON,
            f"body is JSON but a {type(document).__name__}, not an object",
        )
    return {key: value for key, value in document.items() if key in known}


def _parsed_member(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        _reject(
            DeadLetterReason.INVALID_EVENT,
            f"invalid event: {key}: nests deeper than {MAX_KNOWN_VALUE_DEPTH} levels",
        )
    except ValueError as err:
        _reject(DeadLetterReason.INVALID_EVENT, f"invalid event: {key}: {err}")


def _members(text: str) -> list[tuple[str, str]]:
    """(key, value text) of each member of the JSON object `text`, checked without recursion.

    Raises DeadLetterError (invalid_json) where `text` is not a JSON object.
    """
    stack: list[str] = []  # the open "{" and "[" around the position
    state = "value"  # what may come next: value, first_value, first_key, key, colon, after, end
    members: list[tuple[str, str]] = []
    key, value_start, position = "", 0, 0
    while (token := _TOKEN.match(text, position)) is not None:
        kind, position = token.lastindex, token.end()
        symbol = token.group(_PUNCTUATION)
        if state == "end" or (state == "value" and not stack and symbol != "{"):
            break  # a second value, or a top-level value that is not an object
        completed = False
        if state in ("value", "first_value") and kind != _PUNCTUATION:
            completed = True
        elif state in ("value", "first_value") and symbol in ("{", "["):
            stack.append(symbol)
            state = "first_key" if symbol == "{" else "first_value"
        elif state in ("first_key", "key") and kind == _STRING:
            if len(stack) == 1:
                key = json.loads(token.group(_STRING))
            state = "colon"
        elif state == "colon" and symbol == ":":
            if len(stack) == 1:
                value_start = position
            state = "value"
        elif state == "after" and symbol == ",":
            state = "key" if stack[-1] == "{" else "value"
        elif (state in ("after", "first_key") and symbol == "}" and stack[-1] == "{") or (
            state in ("after", "first_value") and symbol == "]" and stack[-1] == "["
        ):
            stack.pop()
            completed = True
        else:
            break
        if completed:
            state = "after" if stack else "end"
            if len(stack) == 1:  # a member of the top-level object is complete
                members.append((key, text[value_start:position]))
    if state != "end" or text[position:].strip(" \t\n\r"):
        _reject(DeadLetterReason.INVALID_JSON, f"body is not a JSON object (at char {position})")
    return members


def _unstorable(known: dict[str, Any]) -> str | None:
    """What in these values PostgreSQL or the outbound serializer would refuse, if anything."""
    pending: list[tuple[object, int]] = [(value, 1) for value in known.values()]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_KNOWN_VALUE_DEPTH:
            return f"a value nests deeper than {MAX_KNOWN_VALUE_DEPTH} levels"
        if isinstance(value, str) and UNSTORABLE_TEXT.search(value) is not None:
            return "a string contains U+0000 or an unpaired surrogate"
        if isinstance(value, float) and not math.isfinite(value):
            return "a number is too large to store (it overflows to infinity)"
        if isinstance(value, dict):
            pending.extend((k, depth) for k in value)
            pending.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            pending.extend((v, depth + 1) for v in value)
    return None


def _reject(reason: DeadLetterReason, error: str) -> NoReturn:
    raise DeadLetterError(reason, error)
