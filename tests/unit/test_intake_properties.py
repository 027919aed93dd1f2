"""Property tests: whatever arrives, decoding ends in an event or a contract dead-letter reason."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.domain import LIFECYCLES, DeadLetterError, DeadLetterReason
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
