"""A demo spoke: publishes realistic agent sessions to the hub, round after round.

In each round a coordinator spawns a few agent sessions on this spoke. Each session
goes spawned -> started -> heartbeats, raises a signal or two along the way (some of
them escalate), ends (mostly `completed`, sometimes `failed` or `aborted`) and is
archived. The sessions of a round advance together, one step every `--interval`
seconds, so their events interleave as they would on a busy spoke.

Every event goes to JetStream as the contract asks (docs/contract.md, section 3): to
`P.spoke.{spokeId}.session.{sessionId}.{event}`, one camelCase JSON object with a
fresh `eventId` (also sent as the `Nats-Msg-Id` header) and an RFC 3339 `occurredAt`.

It needs only nats-py, which the hub-worker image has. In the compose stack:

    docker compose --profile demo up

Beside `hub-worker run`, with the URL it printed:

    python deploy/demo_spoke.py --server nats://127.0.0.1:4222 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import nats
import nats.errors
import nats.js.errors

from worker.subjects import ID_PATTERN, inbound_subject

# Spoke and session ids as the contract allows them in a subject token.
SPOKE_ID_RE = re.compile(ID_PATTERN)

# Seconds between two retries of a publish the hub did not take (no stream yet, a
# timeout): the worker creates the inbound stream when it starts.
RETRY_SECONDS = 2.0

# What a session may report, with its anomaly-specific figures (`details`).
SEVERITIES = ("low", "medium", "high")  # in rising order
SIGNAL_KINDS = ("high_error_count", "model_degradation", "tool_failure_rate")
TASKS = (
    "Fix the flaky login test",
    "Upgrade the payment SDK",
    "Add pagination to the orders API",
    "Refactor the retry policy",
    "Write the migration for the audit log",
    "Triage the nightly build failures",
)
MODELS = ("claude-sonnet", "claude-haiku", "gpt-large")
ENDINGS = (
    ("completed", "all checks passed", 0.75),
    ("failed", "tests still failing after 3 attempts", 0.18),
    ("aborted", "cancelled by the coordinator", 0.07),
)


@dataclass(frozen=True)
class Step:
    """One event of a session: the subject's tail after `sessionId` and its own keys."""

    tail: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outgoing:
    """One message ready for JetStream."""

    subject: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Session:
    session_id: str
    steps: list[Step]


def plan_round(rng: random.Random, sessions: int) -> list[Session]:
    """The sessions of one round: ids that no earlier round used, and their steps."""
    coordinator = f"coord-{uuid4().hex[:12]}"
    workspace = rng.choice(("ws-web", "ws-payments", "ws-platform"))
    return [
        Session(f"sess-{uuid4().hex[:12]}", plan_session(rng, coordinator, workspace))
        for _ in range(sessions)
    ]


def plan_session(rng: random.Random, coordinator: str, workspace: str) -> list[Step]:
    model = rng.choice(MODELS)
    steps = [
        Step(
            "spawned",
            {
                "parentSessionId": coordinator,
                "workspaceId": workspace,
                "taskId": f"task-{rng.randrange(1000, 9999)}",
                "task": rng.choice(TASKS),
                "metadata": {"model": model, "agent": "demo-agent", "demo": True},
            },
        ),
        Step("started"),
    ]
    signals = _signals(rng)
    for beat in range(rng.randint(2, 4)):
        steps.append(Step("heartbeat", {"metadata": {"model": model, "turn": beat + 1}}))
        if signals:
            steps.append(signals.pop(0))
    steps.extend(signals)
    status, reason = _ending(rng)
    steps.append(Step(status, {"reason": reason}))
    steps.append(Step("archived"))
    return steps


def _signals(rng: random.Random) -> list[Step]:
    """Zero to three signals; a repeated kind may rise in severity (an escalation)."""
    kind = rng.choice(SIGNAL_KINDS)
    count = rng.choice((0, 1, 2, 2, 3))
    severities = sorted((rng.choice(SEVERITIES) for _ in range(count)), key=SEVERITIES.index)
    return [
        Step(f"signal.{kind}", {"severity": severity, "details": _details(rng, kind)})
        for severity in severities
    ]


def _details(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "high_error_count":
        return {"errors": rng.randint(5, 60), "window": "5m"}
    if kind == "model_degradation":
        return {"latencyMs": rng.randint(4000, 30000), "errorRate": round(rng.random(), 2)}
    return {"tool": rng.choice(("bash", "edit", "web_fetch")), "failures": rng.randint(3, 12)}


def _ending(rng: random.Random) -> tuple[str, str]:
    roll = rng.random()
    for status, reason, share in ENDINGS:
        if roll < share:
            return status, reason
        roll -= share
    return ENDINGS[0][0], ENDINGS[0][1]


def build_message(
    prefix: str, spoke_id: str, session_id: str, step: Step, now: datetime | None = None
) -> Outgoing:
    """The message of `step`, stamped now: a fresh eventId and the time it happened."""
    event_id = str(uuid4())
    occurred_at = (now or datetime.now(UTC)).isoformat(timespec="milliseconds")
    body = {
        "eventId": event_id,
        "occurredAt": occurred_at,
        "spokeId": spoke_id,
        "sessionId": session_id,
        **step.fields,
    }
    return Outgoing(
        subject=inbound_subject(prefix, spoke_id, session_id, step.tail),
        body=json.dumps(body, separators=(",", ":")).encode(),
        headers={"Nats-Msg-Id": event_id},
    )


def interleave(sessions: Sequence[Session]) -> list[list[tuple[str, Step]]]:
    """The round's steps in waves: wave i holds step i of every session that has one."""
    waves = max((len(session.steps) for session in sessions), default=0)
    return [
        [(session.session_id, session.steps[i]) for session in sessions if i < len(session.steps)]
        for i in range(waves)
    ]


async def publish(js: Any, message: Outgoing, stopping: asyncio.Event) -> bool:
    """Publish until JetStream stores it (same eventId on every try); False if stopped."""
    waiting = False
    while not stopping.is_set():
        try:
            await js.publish(message.subject, message.body, headers=message.headers)
            return True
        except (nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError) as err:
            if not waiting:
                print(
                    f"demo-spoke: {message.subject} not stored ({type(err).__name__}); "
                    "waiting for the hub's stream (is hub-worker running?)",
                    file=sys.stderr,
                    flush=True,
                )
                waiting = True
            await _sleep(RETRY_SECONDS, stopping)
    return False


async def run(args: argparse.Namespace) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    rng = random.Random(args.seed)
    servers = [url.strip() for url in args.server.split(",") if url.strip()]
    nc = await nats.connect(servers, name=f"demo-spoke-{args.spoke}", max_reconnect_attempts=-1)
    js = nc.jetstream()
    print(f"demo-spoke: publishing to {args.prefix}.spoke.{args.spoke}.> on {args.server}")
    try:
        round_no = 0
        while not stopping.is_set() and (args.rounds == 0 or round_no < args.rounds):
            round_no += 1
            sessions = plan_round(rng, args.sessions)
            for wave in interleave(sessions):
                for session_id, step in wave:
                    message = build_message(args.prefix, args.spoke, session_id, step)
                    if not await publish(js, message, stopping):
                        return
                    print(f"demo-spoke: {message.subject}", flush=True)
                await _sleep(args.interval, stopping)
            endings = [session.steps[-2].tail for session in sessions]
            print(
                f"demo-spoke: round {round_no} done: "
                + ", ".join(f"{endings.count(s)} {s}" for s in sorted(set(endings))),
                flush=True,
            )
            if args.rounds == 0 or round_no < args.rounds:
                await _sleep(args.pause, stopping)
    finally:
        await nc.drain()


async def _sleep(seconds: float, stopping: asyncio.Event) -> None:
    """Sleep, but wake up at once when asked to stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo_spoke.py",
        description="Publish sample agent sessions to the hub, as a spoke would.",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("HUB_NATS_URL") or "nats://127.0.0.1:4222",
        help="NATS URL(s), comma-separated (default: $HUB_NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get("HUB_SUBJECT_PREFIX") or "hub",
        help="the hub's subject prefix P (default: $HUB_SUBJECT_PREFIX or hub)",
    )
    parser.add_argument("--spoke", default="demo", help="this spoke's id (default: demo)")
    parser.add_argument("--sessions", type=int, default=3, help="sessions per round (default: 3)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between steps (default: 1)"
    )
    parser.add_argument(
        "--pause", type=float, default=5.0, help="seconds between rounds (default: 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds to publish, 0 for ever (default: 0)"
    )
    parser.add_argument("--seed", type=int, help="seed of the random choices, for a replay")
    args = parser.parse_args(argv)
    if not SPOKE_ID_RE.fullmatch(args.spoke):
        parser.error(f"--spoke must match {SPOKE_ID_RE.pattern}, got {args.spoke!r}")
    if args.sessions < 1 or args.rounds < 0 or args.interval < 0 or args.pause < 0:
        parser.error("--sessions must be at least 1; --rounds, --interval, --pause not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
