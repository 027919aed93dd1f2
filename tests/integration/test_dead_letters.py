"""Bad input gets a dead letter with a reason, an announcement, and no redelivery (section 6)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.support import Hub, now_iso

pytestmark = pytest.mark.integration


def body(**fields: Any) -> bytes:
    base = {
        "eventId": "0b4c0d3e-57a4-4f44-9a57-0f0e0d0c0b0a",
        "occurredAt": now_iso(),
        "spokeId": "sp1",
        "sessionId": "s1",
    }
    return json.dumps({**base, **fields}).encode()


CASES = [
    ("invalid_json", "session.s1.heartbeat", b"{not json"),
    ("invalid_json", "session.s1.heartbeat", b"\xff\xfe{}"),
    ("invalid_json", "session.s1.heartbeat", b"[1, 2]"),
    ("too_large", "session.s1.heartbeat", body(metadata={"pad": "x" * 70_000})),
    ("invalid_event", "session.s1.heartbeat", body(eventId="not-a-uuid")),
    ("invalid_event", "session.s1.signal.model_degradation", body(severity="urgent")),
    ("invalid_event", "session.s1.signal.model_degradation", body()),
    ("invalid_event", "session.s1.spawned", body(task="t" * 257)),
    ("invalid_event", "session.s1.heartbeat", body(occurredAt="2026-01-01T00:00:00")),
    ("invalid_event", "session.s1.heartbeat", body(spokeId=7)),
    ("unknown_subject", "session.s1.exploded", body()),
    ("unknown_subject", "session.s1.signal.Bad-Kind", body(severity="low")),
    ("unknown_subject", "nonsense", body()),
    ("subject_mismatch", "session.s2.heartbeat", body()),
]


@pytest.mark.parametrize(("reason", "tail", "payload"), CASES)
async def test_bad_message_is_dead_lettered_with_its_reason(
    hub: Hub, reason: str, tail: str, payload: bytes
) -> None:
    await hub.start_worker()
    subject = f"{hub.prefix}.spoke.sp1.{tail}"
    await hub.publish_raw(subject, payload, {"X-Trace": "abc"})
    await hub.settle()

    letters = await hub.rows("SELECT * FROM dead_letters")
    assert len(letters) == 1
    letter = letters[0]
    assert letter["reason"] == reason
    assert letter["subject"] == subject  # as published, not as the stream stored it
    assert bytes(letter["payload"]) == payload
    assert letter["headers"]["X-Trace"] == "abc"
    assert letter["deliveries"] == 1
    assert letter["error"]
    # Nothing else changed.
    assert await hub.value("SELECT count(*) FROM sessions") == 0
    assert await hub.value("SELECT count(*) FROM processed_events") == 0

    events = await hub.outbound(f"{hub.prefix}.deadletter.>")
    assert [e.subject for e in events] == [f"{hub.prefix}.deadletter.{reason}"]
    announced = events[0].body
    assert announced["type"] == "deadletter"
    assert announced["reason"] == reason
    assert announced["subject"] == subject
    assert announced["error"] == letter["error"]
    assert announced["deliveries"] == 1
    assert base64.b64decode(announced["payloadBase64"]) == payload


async def test_bad_messages_do_not_stop_good_ones(hub: Hub) -> None:
    await hub.start_worker()
    for n in range(20):
        await hub.publish_raw(hub.subject("sp1", f"s{n % 3}", "heartbeat"), b"garbage")
        await hub.send("sp1", f"s{n % 3}", "signal.model_degradation", severity="low")
    await hub.settle()
    assert await hub.value("SELECT count(*) FROM dead_letters") == 20
    assert await hub.value("SELECT sum(occurrence_count) FROM detections") == 20


async def test_a_handler_that_keeps_failing_dead_letters_after_five_attempts(hub: Hub) -> None:
    # A fault only this session's rows trip over: the database refuses them.
    await hub.db.execute(
        """
        CREATE FUNCTION refuse_cursed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id = 'cursed' THEN RAISE EXCEPTION 'the cursed session is refused'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_cursed BEFORE INSERT ON sessions
            FOR EACH ROW EXECUTE FUNCTION refuse_cursed();
        """
    )
    await hub.start_worker()
    await hub.send("sp1", "cursed", "heartbeat")
    await hub.send("sp1", "fine", "heartbeat")
    await hub.settle()

    letters = await hub.rows("SELECT reason, deliveries, error FROM dead_letters")
    assert len(letters) == 1
    assert letters[0]["reason"] == "handler_error"
    assert letters[0]["deliveries"] == 5
    assert "cursed session is refused" in letters[0]["error"]
    assert await hub.value("SELECT count(*) FROM sessions WHERE id = 'fine'") == 1
    assert [e.subject for e in await hub.outbound(f"{hub.prefix}.deadletter.>")] == [
        f"{hub.prefix}.deadletter.handler_error"
    ]
