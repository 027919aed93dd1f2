"""Arbitrary subjects and bodies through the real pipeline: every message is applied or
dead-lettered with a contract reason, and the worker stays up (issue 7, fuzzing)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import pytest

from tests.support import Hub, now_iso
from worker.domain import LIFECYCLES, DeadLetterReason

pytestmark = pytest.mark.integration

MESSAGES = 400


def random_message(rng: random.Random, prefix: str) -> tuple[str, bytes]:
    def pick(good: list[str], bad: list[str]) -> str:
        return rng.choice(good) if rng.random() < 0.85 else rng.choice(bad)

    spoke = pick(["sp1", "sp2", "sp-3"], ["bad spoke", "x" * 130])
    session = pick([f"s{rng.randint(1, 12)}"], ["", "s*", "ok session"])
    what = pick(
        [*LIFECYCLES, "signal.model_degradation", "signal.high_error_count"],
        ["signal.Bad", "signal", "exploded"],
    )
    subject = (
        f"{prefix}.spoke.{spoke}.session.{session}.{what}"
        if rng.random() < 0.9
        else rng.choice(
            [f"{prefix}.spoke.{spoke}.{what}", f"{prefix}.spoke.{spoke}.session.{session}.{what}.x"]
        )
    )
    event: dict[str, Any] = {
        "eventId": str(uuid4()),
        "occurredAt": now_iso(),
        "spokeId": spoke,
        "sessionId": session,
        "severity": pick(["low", "medium", "high"], ["urgent", "3"]),
        "details": rng.choice([None, {"n": 1}, {"n": 2}, {"n": 3}, [1, 2]]),
    }
    if rng.random() < 0.15:
        event.pop(rng.choice(list(event)))  # a missing field
    if rng.random() < 0.1:
        event[rng.choice(["eventId", "occurredAt", "task", "reason"])] = rng.choice(
            [12, None, "", "2026-01-01", "t" * 300, {"nested": True}]
        )
    body = json.dumps(event).encode()
    roll = rng.random()
    if roll < 0.04:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
    elif roll < 0.07:
        body = body[: rng.randint(0, len(body))]
    elif roll < 0.08:
        body = json.dumps({**event, "pad": "x" * 70_000}).encode()
    return subject, body


async def test_every_message_is_applied_or_dead_lettered_and_the_worker_stays_up(
    summary: Callable[[str], None],
    hub: Hub,
) -> None:
    worker = await hub.start_worker()
    rng = random.Random(20261127)
    published = 0
    for _ in range(MESSAGES):
        subject, body = random_message(rng, hub.prefix)
        if (
            " " in subject
            or "*" in subject
            or ">" in subject
            or ".." in subject
            or subject.endswith(".")
        ):
            continue  # NATS itself refuses such subjects; nothing reaches the stream
        await hub.publish_raw(subject, body)
        published += 1
    await hub.settle(within=90)

    applied = await hub.value("SELECT count(*) FROM processed_events")
    letters = await hub.rows("SELECT reason FROM dead_letters")
    assert applied + len(letters) == published
    assert {r["reason"] for r in letters} <= {r.value for r in DeadLetterReason}
    assert all(not task.done() for task in worker.tasks), (
        "every loop of the worker is still running"
    )
    reasons = sorted({r["reason"] for r in letters})
    summary(f"fuzz: {published} messages, {applied} applied, {len(letters)} dead letters {reasons}")
