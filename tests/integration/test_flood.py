"""Defence in depth: the worker's own checks hold when the server's permissions are loose.

The test servers have no NATS permissions at all: any client may publish to any
subject, so a hostile spoke `evil` can write to every inbound subject, the
other spokes' sessions included. What the worker cannot tell apart without
permissions is `evil` publishing under another spoke's subject with that
spoke's body; everything else it must catch itself. Here `evil` floods the
inbound subjects with a few thousand messages of every reason a spoke can
cause (contract section 6), spoke_mismatch being forged events for sessions
the honest spokes `a` and `b` already own (section 4), published between
their valid events so that those sit behind and between the bad ones in the
same partitions. Every bad message must be dead-lettered with its reason, and
the honest sessions must end exactly as their own events say.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from uuid import uuid4

import pytest

from tests.support import READY, Hub, now_iso
from worker.constants import MAX_EVENT_BYTES
from worker.domain import DeadLetterReason

pytestmark = pytest.mark.integration

HOSTILE_SPOKE = "evil"
HONEST_SPOKES = ("a", "b")
SESSIONS_PER_SPOKE = 50
FLOOD = {
    DeadLetterReason.INVALID_JSON: 600,
    # Each is over 64 KiB, stored and announced whole: fewer keep the run short.
    DeadLetterReason.TOO_LARGE: 100,
    DeadLetterReason.INVALID_EVENT: 600,
    DeadLetterReason.UNKNOWN_SUBJECT: 600,
    DeadLetterReason.SUBJECT_MISMATCH: 600,
    DeadLetterReason.SPOKE_MISMATCH: 500,
}
Ending = Literal["completed", "failed", "aborted"]
ENDINGS: tuple[Ending, ...] = ("completed", "failed", "aborted")
# What the honest spokes publish, one step at a time; `evil` forges only between
# the first step (the victim owns its session by then) and the ending (a forged
# terminal event would otherwise lose to the honest one, guard or no guard).
STEPS = 8
FIRST_FORGERY_STEP, ENDING_STEP = 1, 6

# Valid subjects, bodies wrong in one field each (invalid_event).
INVALID_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("heartbeat", {"eventId": "not-a-uuid"}),
    ("heartbeat", {"occurredAt": "2026-01-01T00:00:00"}),
    ("completed", {"sessionId": 7}),
    ("failed", {"reason": "nul\x00byte"}),
    ("spawned", {"task": "t" * 257}),
    ("signal.model_degradation", {"severity": "urgent"}),
    ("signal.model_degradation", {}),  # severity is required
]
# Valid events of `evil` for a victim's session (spoke_mismatch); applied, the terminal ones
# and the signals would change what the victim's own events decided.
FORGERIES: list[tuple[str, dict[str, Any]]] = [
    ("completed", {}),
    ("failed", {"reason": "forged"}),
    ("aborted", {}),
    ("archived", {}),
    ("heartbeat", {}),
    ("spawned", {"task": "forged"}),
    ("signal.model_degradation", {"severity": "high"}),
    ("signal.exfiltration", {"severity": "high"}),
]


@dataclass(frozen=True)
class HonestSession:
    spoke: str
    id: str
    ending: Ending
    archived: bool

    def script(self) -> list[tuple[str, dict[str, Any]] | None]:
        """The event of each step (None: nothing at that step)."""
        return [
            ("spawned", {"task": "build", "workspaceId": f"ws-{self.spoke}"}),
            ("started", {}),
            ("heartbeat", {}),
            ("signal.model_degradation", {"severity": "low", "details": {"p95Ms": 900}}),
            ("heartbeat", {}),
            ("signal.model_degradation", {"severity": "medium", "details": {"p95Ms": 1800}}),
            (self.ending, {"reason": "done"}),
            ("archived", {}) if self.archived else None,
        ]


@dataclass(frozen=True)
class Flooded:
    reason: DeadLetterReason
    subject: str
    body: bytes


def evil_event(session: str, **fields: Any) -> dict[str, Any]:
    return {
        "eventId": str(uuid4()),
        "occurredAt": now_iso(),
        "spokeId": HOSTILE_SPOKE,
        "sessionId": session,
        **fields,
    }


def flood(prefix: str, victims: list[HonestSession], rng: random.Random) -> list[Flooded]:
    """`evil`'s messages, each with the dead-letter reason it must get.

    Most name a victim's session in their subject, so that they land in that
    session's partition, in front of and behind its valid events.
    """
    spoke = f"{prefix}.spoke.{HOSTILE_SPOKE}"

    def on(victim: HonestSession, what: str) -> str:
        return f"{spoke}.session.{victim.id}.{what}"

    def encode(document: dict[str, Any]) -> bytes:
        return json.dumps(document).encode()

    def invalid_json(victim: HonestSession) -> tuple[str, bytes]:
        whole = encode(evil_event(victim.id))
        body = rng.choice(
            [b"{not json", b"\xff\xfe{}", b"[1, 2]", b"", b"null", b'{"eventId": NaN}', whole[:-1]]
        )
        return on(victim, rng.choice(["heartbeat", "completed", "spawned"])), body

    def too_large(victim: HonestSession) -> tuple[str, bytes]:
        return on(victim, "failed"), encode(
            evil_event(victim.id, metadata={"pad": "x" * MAX_EVENT_BYTES})
        )

    def invalid_event(victim: HonestSession) -> tuple[str, bytes]:
        what, fields = rng.choice(INVALID_FIELDS)
        return on(victim, what), encode({**evil_event(victim.id), **fields})

    def unknown_subject(victim: HonestSession) -> tuple[str, bytes]:
        subject = rng.choice(
            [
                on(victim, "exploded"),
                on(victim, "signal.Bad-Kind"),
                on(victim, "signal.model_degradation.extra"),
                f"{spoke}.session.{victim.id}",
                f"{spoke}.nonsense",
            ]
        )
        return subject, encode(evil_event(victim.id, severity="high"))

    def subject_mismatch(victim: HonestSession) -> tuple[str, bytes]:
        other = rng.choice([s for s in victims if s != victim])
        body = rng.choice(
            [
                # Posing as the owner in the body only.
                {**evil_event(victim.id), "spokeId": victim.spoke},
                # Naming another victim's session in the body only.
                evil_event(other.id),
            ]
        )
        return on(victim, "completed"), encode(body)

    def spoke_mismatch(victim: HonestSession) -> tuple[str, bytes]:
        what, fields = rng.choice(FORGERIES)
        return on(victim, what), encode(evil_event(victim.id, **fields))

    makers = {
        DeadLetterReason.INVALID_JSON: invalid_json,
        DeadLetterReason.TOO_LARGE: too_large,
        DeadLetterReason.INVALID_EVENT: invalid_event,
        DeadLetterReason.UNKNOWN_SUBJECT: unknown_subject,
        DeadLetterReason.SUBJECT_MISMATCH: subject_mismatch,
        DeadLetterReason.SPOKE_MISMATCH: spoke_mismatch,
    }
    messages = []
    for reason, count in FLOOD.items():
        for _ in range(count):
            subject, body = makers[reason](rng.choice(victims))
            messages.append(Flooded(reason, subject, body))
    return messages


def schedule(messages: list[Flooded], rng: random.Random) -> list[list[Flooded]]:
    """The flood split over the honest steps, each part published alongside one step."""
    parts: list[list[Flooded]] = [[] for _ in range(STEPS)]
    forgeries = [m for m in messages if m.reason is DeadLetterReason.SPOKE_MISMATCH]
    others = [m for m in messages if m.reason is not DeadLetterReason.SPOKE_MISMATCH]
    for n, message in enumerate(others):
        parts[n % STEPS].append(message)
    forging_steps = range(FIRST_FORGERY_STEP, ENDING_STEP)
    for n, message in enumerate(forgeries):
        parts[forging_steps[n % len(forging_steps)]].append(message)
    for part in parts:
        rng.shuffle(part)
    return parts


async def test_a_flood_from_one_spoke_is_dead_lettered_and_other_spokes_are_unharmed(
    summary: Callable[[str], None], hub: Hub
) -> None:
    worker = await hub.start_worker()
    rng = random.Random(20260301)
    sessions = [
        HonestSession(spoke, f"{spoke}-{n:03d}", ENDINGS[n % 3], archived=n % 4 == 0)
        for spoke in HONEST_SPOKES
        for n in range(SESSIONS_PER_SPOKE)
    ]
    messages = flood(hub.prefix, sessions, rng)
    parts = schedule(messages, rng)

    started = time.monotonic()
    valid = 0
    for step, part in enumerate(parts):
        # One event per honest session and step keeps each session's order; the
        # shuffle mixes them with the flood in the stream.
        honest = [
            hub.send(s.spoke, s.id, event[0], **event[1])
            for s in sessions
            if (event := s.script()[step]) is not None
        ]
        # A message id of its own: a publish retried after a lost ack is stored once.
        hostile = [hub.publish_raw(m.subject, m.body, {"Nats-Msg-Id": str(uuid4())}) for m in part]
        publishes: list[Awaitable[object]] = [*honest, *hostile]
        rng.shuffle(publishes)
        await asyncio.gather(*publishes)
        valid += len(honest)
    await hub.settle(within=90)
    elapsed = time.monotonic() - started

    # The honest sessions end exactly as their own events say.
    assert {r["id"]: r for r in await hub.rows("SELECT id, spoke_id, status FROM sessions")} == {
        s.id: {"id": s.id, "spoke_id": s.spoke, "status": s.ending} for s in sessions
    }
    archived = await hub.rows("SELECT id FROM sessions WHERE archived_at IS NOT NULL")
    assert {r["id"] for r in archived} == {s.id for s in sessions if s.archived}
    mappings = await hub.rows("SELECT session_id, spoke_id, status, task FROM mappings")
    assert {r["session_id"]: r for r in mappings} == {
        s.id: {"session_id": s.id, "spoke_id": s.spoke, "status": s.ending, "task": "build"}
        for s in sessions
    }
    detections = await hub.rows(
        "SELECT session_id, anomaly_type, severity, occurrence_count, resolution FROM detections"
    )
    assert sorted(detections, key=lambda r: r["session_id"]) == [
        {
            "session_id": s.id,
            "anomaly_type": "MODEL_DEGRADATION",
            "severity": "medium",
            "occurrence_count": 2,
            "resolution": "auto_resolved" if s.archived else None,
        }
        for s in sessions
    ]
    assert {r["id"] for r in await hub.rows("SELECT id FROM spokes")} == set(HONEST_SPOKES)
    assert await hub.value("SELECT count(*) FROM processed_events") == valid

    # Every flooded message, and nothing else, is dead-lettered with its reason and announced.
    sent = Counter(m.reason.value for m in messages)
    letters = await hub.rows("SELECT reason, subject FROM dead_letters")
    assert len(letters) == len(messages)
    assert Counter(r["reason"] for r in letters) == sent
    assert all(r["subject"].startswith(f"{hub.prefix}.spoke.{HOSTILE_SPOKE}.") for r in letters)
    announced = await hub.js.stream_info(
        hub.settings.out_stream, subjects_filter=f"{hub.prefix}.deadletter.>"
    )
    assert announced.state.subjects == {
        f"{hub.prefix}.deadletter.{reason}": count for reason, count in sent.items()
    }

    # The worker is still up and processing.
    assert worker.liveness() == {"loops": "ok"}
    assert await worker.readiness() == READY
    await hub.send("b", "b-after-flood", "spawned")
    await hub.settle()
    assert await hub.rows(
        "SELECT spoke_id, status FROM mappings WHERE session_id = 'b-after-flood'"
    ) == [{"spoke_id": "b", "status": "active"}]

    summary(
        f"flood: {len(messages)} invalid messages from spoke {HOSTILE_SPOKE} dead-lettered by "
        f"reason {dict(sorted(sent.items()))}; {valid} valid events of {len(HONEST_SPOKES)} "
        f"spokes interleaved and applied exactly; published and settled in {elapsed:.1f} s"
    )
