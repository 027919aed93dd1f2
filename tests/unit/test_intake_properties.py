"""Property tests: whatever arrives, decoding ends in an event or a contract dead-letter reason."""

from __future__ import annotations

import codecs
import json
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import intake
from worker.domain import LIFECYCLES, DeadLetterError, DeadLetterReason
from worker.events import EndedEvent, InboundEvent, LifecycleEvent, SignalEvent, SpawnedEvent
from worker.intake import _members, decode

PREFIX = "hub"
TOKEN = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
ANY_TOKEN = st.text(min_size=0, max_size=12)
WHAT = st.one_of(
    st.sampled_from(LIFECYCLES),
    st.builds(lambda k: f"signal.{k}", st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)),
    ANY_TOKEN,
)
SUBJECT = st.one_of(
    st.builds(
        lambda spoke, session, what: f"{PREFIX}.spoke.{spoke}.session.{session}.{what}",
        st.one_of(TOKEN, ANY_TOKEN),
        st.one_of(TOKEN, ANY_TOKEN),
        WHAT,
    ),
    st.text(max_size=40),
)
JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KNOWN_KEYS = st.sampled_from(
    [
        "eventId",
        "occurredAt",
        "spokeId",
        "sessionId",
        "severity",
        "details",
        "fingerprint",
        "metadata",
        "task",
        "reason",
        "parentSessionId",
    ]
)
PLAUSIBLE_VALUE = st.one_of(
    JSON_VALUE,
    st.just("2026-11-27T10:15:00+00:00"),
    st.just("0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a"),
    st.sampled_from(["low", "medium", "high"]),
)
OBJECT = st.dictionaries(st.one_of(KNOWN_KEYS, st.text(max_size=8)), PLAUSIBLE_VALUE, max_size=10)
BODY = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda o: json.dumps(o).encode(), OBJECT),
    st.builds(lambda v: json.dumps(v).encode(), JSON_VALUE),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SUBJECT, BODY)
def test_decoding_never_fails_outside_the_contract(subject: str, body: bytes) -> None:
    try:
        intake = decode(PREFIX, subject, body)
    except DeadLetterError as err:  # anything else fails the test
        rejected = err
    else:
        # Accepted: the event says what its subject says.
        assert intake.event.spoke_id == intake.route.spoke_id
        assert intake.event.session_id == intake.route.session_id
        return
    assert rejected.reason in DeadLetterReason
    assert rejected.error


@settings(max_examples=300, deadline=None)
@given(OBJECT)
def test_a_valid_event_stays_valid_whatever_unknown_keys_it_carries(extra: dict[str, Any]) -> None:
    base = {
        "eventId": "0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a",
        "occurredAt": "2026-11-27T10:15:00+00:00",
        "spokeId": "sp1",
        "sessionId": "s1",
    }
    unknown = {f"x-{k}": v for k, v in extra.items()}
    intake = decode(
        PREFIX, f"{PREFIX}.spoke.sp1.session.s1.heartbeat", json.dumps(base | unknown).encode()
    )
    assert str(intake.event.event_id) == base["eventId"]


# --- the recursion-free JSON check agrees with the parser ---------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), _json_values, max_size=6), st.booleans())
def test_members_of_a_json_object_are_what_the_parser_reads(
    document: dict[str, object], indent: bool
) -> None:
    text = json.dumps(document, indent=2 if indent else None)
    members = _members(text)
    assert {key: json.loads(value) for key, value in members} == json.loads(text)


@given(st.text(max_size=40))
def test_members_refuses_what_the_parser_refuses(text: str) -> None:
    def not_json(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        parsed = json.loads(text, parse_constant=not_json)
    except (ValueError, RecursionError):
        parsed = None
    try:
        members = _members(text)
    except DeadLetterError:
        assert not isinstance(parsed, dict)
        return
    assert isinstance(parsed, dict)
    assert {key: json.loads(value) for key, value in members} == parsed


# --- the fast path (pydantic-core's JSON parser) decodes as the checked path does ---------

_MODELS: dict[str, type[InboundEvent]] = {
    "heartbeat": LifecycleEvent,
    "spawned": SpawnedEvent,
    "failed": EndedEvent,
    "signal.model_degradation": SignalEvent,
}
_BASE = {
    "eventId": "0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a",
    "occurredAt": "2026-11-27T10:15:00+00:00",
    "spokeId": "sp1",
    "sessionId": "s1",
}
_ALIASES = ["eventId", "occurredAt", "spokeId", "sessionId", "parentSessionId", "workspaceId"]
_ALIASES += ["taskId", "task", "reason", "severity", "details", "fingerprint", "metadata"]
# Python's names of the camelCase fields: unknown keys on the wire.
_NAMES = ["event_id", "occurred_at", "spoke_id", "session_id", "parent_session_id"]
_NAMES += ["workspace_id", "task_id"]
KEY_TEXT = st.one_of(
    st.sampled_from(_ALIASES + _NAMES).map(json.dumps),
    # The same keys spelled with escapes: "\u0065ventId" is eventId.
    st.sampled_from(['"\\u0065ventId"', '"sessionI\\u0064"', '"m\\u0065tadata"']),
    st.text(max_size=6).map(lambda k: json.dumps(k, ensure_ascii=False)),
)


def _nested(depth: int, inner: str = "1") -> str:
    return '{"a":' * depth + inner + "}" * depth


# What json.loads (with the checks of intake) and pydantic-core's parser may read
# differently, by kind, so that each kind comes up often.
_HOSTILE_LITERALS = st.sampled_from(["NaN", "Infinity", "-Infinity", "[NaN]", '"NaN"'])
_HOSTILE_NUMBERS = st.one_of(
    st.sampled_from(
        [
            "1e400",
            "-1E+400",
            "1e-400",
            "1e308",
            "1" * 400 + ".5",  # overflows to infinity without an exponent
            "0." + "3" * 400,
            "1" * 25,
            "1" * 400,
            "9" * 4300,  # the longest integer Python converts
            "-" + "9" * 4301,
            "12345678901234567890",
            "123456789012345678901",
            "0.30000000000000004",
            "5e-324",
            "-0",
            "-0.0",
        ]
    ),
    st.floats(allow_nan=False).map(repr),
    st.integers().map(str),
)
_HOSTILE_ESCAPES = st.sampled_from(
    [
        '"\\u0000"',
        '"a\\u0000b"',
        '{"\\u0000": 1}',
        '"\\ud800"',
        '"\\uDFFF x"',
        '"\\ud83d\\ude00"',
        '"\\ud83d"',
        '"\\ud83d\\u0041"',
        '"\\\\u0000"',  # a backslash, then u0000: harmless text
        '"\x7f"',
        '"\x01"',
        '"\\x"',
    ]
)
_HOSTILE_NESTING = st.one_of(
    st.integers(55, 70).map(_nested),
    st.integers(55, 70).map(lambda n: "[" * n + "]" * n),
    st.integers(200, 1200).map(lambda n: "[" * n + "]" * n),
)
HOSTILE_TEXT = st.one_of(
    _HOSTILE_LITERALS,
    _HOSTILE_NUMBERS,
    _HOSTILE_ESCAPES,
    _HOSTILE_NESTING,
    st.sampled_from(["01", "1.", "True", "'a'"]),
)
BENIGN_TEXT = st.one_of(
    JSON_VALUE.map(json.dumps),
    JSON_VALUE.map(lambda v: json.dumps(v, ensure_ascii=False)),
    PLAUSIBLE_VALUE.map(json.dumps),
    st.sampled_from(["null", '"task"', '"high"', '"s1"', '"sp2"', "{}", '{"k": [1, 2.5]}']),
)
# One value in four hostile: most bodies are ones the fast path may accept, so
# that it is compared with the checked path, not only refused.
VALUE_TEXT = st.one_of(BENIGN_TEXT, BENIGN_TEXT, BENIGN_TEXT, HOSTILE_TEXT)
# Hostile values where the model reads them: inside metadata (every model) or
# details (signals), or as a string field, or the same under an unknown key.
HOSTILE_MEMBER = st.tuples(
    st.sampled_from(['"metadata"', '"details"', '"m\\u0065tadata"', '"x"']),
    st.one_of(
        HOSTILE_TEXT.map(lambda v: '{"k": ' + v + "}"),
        HOSTILE_TEXT.map(lambda v: '{"k": [true, ' + v + "]}"),
    ),
) | st.tuples(
    st.sampled_from(['"task"', '"reason"', '"fingerprint"', '"x"']),
    st.sampled_from(['"a\\u0000b"', '"\\ud800"', '"\\ud83d\\ude00"', '"\\u00e9"']),
)


@st.composite
def _differential_case(draw: st.DrawFn, *, hostile: bool = True) -> tuple[str, bytes]:
    """A subject and a body, mostly near a valid event; with `hostile`, also what
    the two parsers read differently and what no parser accepts."""
    tail = draw(st.sampled_from(list(_MODELS)))
    base = _BASE | ({"severity": "high"} if tail.startswith("signal.") else {})
    members = [(json.dumps(k), json.dumps(v)) for k, v in base.items()]
    if draw(st.integers(0, 5)) == 0:
        members.pop()  # a required key missing
    values = VALUE_TEXT if hostile else BENIGN_TEXT
    members += draw(st.lists(st.tuples(KEY_TEXT, values), max_size=4))
    if hostile:
        members += draw(st.lists(HOSTILE_MEMBER, max_size=1))
    members = draw(st.permutations(members))
    separator = draw(st.sampled_from([",", ", ", "\n,\t"]))
    text = "{" + separator.join(f"{key}:{value}" for key, value in members) + "}"
    if not hostile:
        return f"{PREFIX}.spoke.sp1.session.s1.{tail}", text.encode("utf-8", "surrogatepass")
    # Mostly nothing around the object; else whitespace, a BOM, trailing garbage.
    text = draw(st.sampled_from(["", "", "", " ", "\r\n", "\ufeff", "\x0c"])) + text
    text += draw(st.sampled_from(["", "", "", "", " ", "\n", "x", "{}", "\x00", "\x0c", ",", "]"]))
    if draw(st.integers(0, 19)) == 0:
        text = "[" + text + "]"
    # surrogatepass: a surrogate becomes the bytes UTF-8 forbids (ED A0 80).
    body = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:  # one stray byte: not UTF-8, a control byte, NUL
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=2)) + body[at:]
    spoke = draw(st.sampled_from(["sp1", "sp1", "sp1", "sp2"]))
    return f"{PREFIX}.spoke.{spoke}.session.s1.{tail}", body


def _decoded(subject: str, body: bytes) -> tuple[object, ...]:
    """What decode() gives, in a form that tells apart what == would not (1 and 1.0,
    the order of keys, -0.0): the Intake, or the dead letter's reason and text."""
    try:
        intake = decode(PREFIX, subject, body)
    except DeadLetterError as err:
        return ("dead letter", err.reason, err.error)
    event = intake.event
    return ("intake", intake.route, type(event), repr(event.model_dump()), intake)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_differential_case())
def test_the_fast_path_decodes_every_body_as_the_checked_path(case: tuple[str, bytes]) -> None:
    _assert_decoded_alike(*case)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_differential_case(hostile=False))
def test_the_fast_path_reads_plausible_bodies_as_the_checked_path(case: tuple[str, bytes]) -> None:
    # Most of these take the fast path: numbers, escapes, duplicate and snake_case keys.
    _assert_decoded_alike(*case)


def _with_member(member: str) -> bytes:
    """A valid heartbeat's body with one more member, as JSON text."""
    return (json.dumps(_BASE)[:-1] + ", " + member + "}").encode("utf-8", "surrogatepass")


# Each thing the two parsers read differently, in a known value and in an unknown
# key, so that every part of the guard meets at least one body it must refuse.
_HOSTILE_EXAMPLES = [
    _with_member(f'"{key}": {{"k": {value}}}')
    for key in ("metadata", "x")
    for value in [
        "NaN",
        "-Infinity",
        "1e400",
        "1" * 400 + ".5",
        "0." + "3" * 400,
        "9" * 4300,
        "9" * 4301,
        '"a\\u0000b"',
        '"\\udc00"',
        '"\\ud83d\\ude00"',
        _nested(62),
        _nested(63),
        _nested(64),
        "[" * 300 + "]" * 300,
    ]
] + [
    _with_member('"session_id": "s2"'),
    _with_member('"sessionId": "s2", "sessionId": "s1"'),
    _with_member('"metadata": {"a": 1, "a": 2.0}, "metadata": {"b": -0.0, "b": 1}'),
    _with_member('"x": "\xff"'),
    _with_member('"x": "\ud800"'),  # encoded by surrogatepass: ED A0 80
    codecs.BOM_UTF8 + _with_member('"x": 1'),
    _with_member('"x": 1') + b" \r\n\t",
    _with_member('"x": 1') + b"\x0c",
    _with_member('"x": 1') + b" x",
]


@pytest.mark.parametrize("body", _HOSTILE_EXAMPLES)
def test_the_fast_path_decodes_each_hostile_example_as_the_checked_path(body: bytes) -> None:
    _assert_decoded_alike(f"{PREFIX}.spoke.sp1.session.s1.heartbeat", body)


def _assert_decoded_alike(subject: str, body: bytes) -> None:
    with patch.object(intake, "_fast_event", return_value=None):
        checked = _decoded(subject, body)
    assert _decoded(subject, body) == checked


_VALID_BODY = json.dumps(
    _BASE | {"severity": "low", "details": {"ratio": 0.42, "tokens": [1, 2]}, "x": "é"},
    ensure_ascii=False,
).encode()


def test_an_ordinary_event_takes_the_fast_path() -> None:
    # Else the differential test above would compare the checked path with itself.
    event = intake._fast_event(SignalEvent, _VALID_BODY)
    assert event is not None
    assert event == intake._checked_event(SignalEvent, _VALID_BODY)


@pytest.mark.parametrize(
    "hostile",
    [
        b'"x": NaN',
        b'"x": -Infinity',
        b'"metadata": {"a": 1e400}',
        b'"details": {"a": [-' + b"1" * 400 + b".5]}",
        b'"task": "a\\u0000b"',
        b'"task": "\\udc00"',
        b'"metadata": ' + _nested(64).encode(),
        b'"x": "\xff"',
    ],
)
def test_what_the_parsers_read_differently_takes_the_checked_path(hostile: bytes) -> None:
    body = _VALID_BODY[:-1] + b", " + hostile + b"}"
    assert intake._fast_event(SignalEvent, body) is None
    assert intake._fast_event(SignalEvent, codecs.BOM_UTF8 + _VALID_BODY) is None


def test_a_hexadecimal_id_is_no_false_alarm() -> None:
    # An exponent's digits look like those of a hexadecimal id: numbers are
    # checked in the parsed event instead.
    body = _VALID_BODY[:-1] + b', "fingerprint": "3e400e+123", "x": 1e400}'
    event = intake._fast_event(SignalEvent, body)
    assert event is not None
    assert event == intake._checked_event(SignalEvent, body)
