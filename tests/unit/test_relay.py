"""The relay's choice of what to publish together and what to skip (worker/relay.py)."""

from __future__ import annotations

from uuid import uuid4

import nats.errors
import nats.js.errors
import pytest
from nats.js.errors import ServiceUnavailableError

from worker.bus import api_error
from worker.constants import RELAY_WINDOW
from worker.db import PendingOutbound
from worker.relay import _superseded, _windows, classify
from worker.subjects import captured_by, outbound_captures


def row(n: int, aggregate: str, change: str = "repeated") -> PendingOutbound:
    return PendingOutbound(n, uuid4(), f"hub.detection.{change}.low.x", b"{}", aggregate)


def test_a_repeated_event_followed_by_another_of_its_detection_is_skipped() -> None:
    rows = [row(1, "d1"), row(2, "d2"), row(3, "d1"), row(4, "d1")]
    assert _superseded(rows, "hub") == {1, 3}


def test_repeated_before_any_other_change_is_kept() -> None:
    rows = [row(1, "d1"), row(2, "d1", "escalated"), row(3, "d1"), row(4, "d1", "resolved")]
    assert _superseded(rows, "hub") == set()


def test_windows_never_hold_two_events_of_one_aggregate_and_keep_its_order() -> None:
    rows = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "c"), row(5, "b"), row(6, "a")]
    windows = _windows(rows)
    assert [[r.id for r in w] for w in windows] == [[1, 2, 4], [3, 5], [6]]
    for window in windows:
        assert len({r.aggregate for r in window}) == len(window)
    at = {r.id: n for n, w in enumerate(windows) for r in w}
    for aggregate in "abc":
        ids = [r.id for r in rows if r.aggregate == aggregate]
        assert [at[i] for i in ids] == sorted({at[i] for i in ids})  # strictly later windows


def test_as_many_windows_as_the_most_events_of_one_aggregate() -> None:
    # A drain's read: a batch changes a detection twice in a row (opened, then
    # escalated). Cut into consecutive runs of distinct aggregates this was 501
    # windows of one or two rows, each a round trip for its acks.
    rows = [row(n, f"d{n // 2}") for n in range(1000)]
    assert [len(w) for w in _windows(rows)] == [RELAY_WINDOW, RELAY_WINDOW]


def test_windows_are_bounded() -> None:
    rows = [row(n, f"d{n}") for n in range(RELAY_WINDOW * 2 + 1)]
    assert [len(w) for w in _windows(rows)] == [RELAY_WINDOW, RELAY_WINDOW, 1]


# --- what a failed publish means (relay.classify) ---------------------------------


def reply(code: int, err_code: int, description: str) -> Exception:
    return api_error({"code": code, "err_code": err_code, "description": description})


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (nats.errors.MaxPayloadError(), "max_payload"),
        (nats.errors.BadSubjectError(), "rejected"),
        (nats.errors.BadHeaderError("id\r\nPUB"), "rejected"),
        (reply(400, 10054, "message size exceeds maximum allowed"), "too_large"),
        (reply(400, 10097, "header size exceeds maximum allowed"), "too_large"),
        (reply(400, 10165, "invalid per-message TTL"), "rejected"),
    ],
)
def test_a_row_refused_for_a_reason_of_its_own_is_permanent(error: Exception, reason: str) -> None:
    refusal = classify(error)
    assert (refusal.reason, refusal.permanent) == (reason, True)
    assert refusal.error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (nats.js.errors.NoStreamResponseError(), "no_stream"),
        (nats.errors.NoRespondersError(), "no_stream"),
        (TimeoutError("no ack from JetStream in time"), "timeout"),
        (nats.errors.TimeoutError(), "timeout"),
        (reply(503, 10077, "maximum messages exceeded"), "unavailable"),
        (reply(500, 10049, "insufficient resources"), "unavailable"),
        (nats.errors.ConnectionClosedError(), "disconnected"),
        (nats.errors.OutboundBufferLimitError(), "disconnected"),
    ],
)
def test_the_servers_state_is_transient(error: Exception, reason: str) -> None:
    refusal = classify(error)
    assert (refusal.reason, refusal.permanent) == (reason, False)


def test_a_jetstream_error_reply_becomes_its_error_rather_than_raising() -> None:
    error = api_error({"code": 400, "err_code": 10054, "description": "message size exceeds"})
    assert isinstance(error, nats.js.errors.BadRequestError)
    assert (error.code, error.err_code) == (400, 10054)
    assert isinstance(api_error({"code": 503, "description": "x"}), ServiceUnavailableError)
    odd = api_error({"what": "no code"})
    assert type(odd) is nats.js.errors.APIError
    assert "no code" in str(odd)


# --- which subjects a stream captures (subjects.captured_by) -----------------------


@pytest.mark.parametrize(
    ("subject", "captured"),
    [
        ("hub.mapping.active.s1", True),
        ("hub.detection.opened.low.x", True),
        ("hub.deadletter.too_large", True),
        ("hub.deadletter", False),
        ("hub.other.x", False),
        ("hubx.mapping.active.s1", False),
        ("hub.cmd.one", True),
        ("hub.cmd.one.two", False),
        ("hub.exact", True),
        ("hub.exact.more", False),
    ],
)
def test_captured_by_follows_nats_wildcards(subject: str, captured: bool) -> None:
    filters = [*outbound_captures("hub"), "hub.cmd.*", "hub.exact"]
    assert captured_by(filters, subject) is captured
