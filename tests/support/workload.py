"""A realistic mixed stream of spoke events, and what the hub's tables must say after it.

The expectation is computed from the contract's rules alone (no worker code), for
streams where every signal of a key arrives while its detection is active or
after an archive; the stall sweep and manual resolves are not involved (the
events are recent: see `generate`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

SEVERITIES = ("low", "medium", "high")
RANK = {s: n for n, s in enumerate(SEVERITIES)}
KINDS = ("model_degradation", "high_error_count")


@dataclass(frozen=True)
class Published:
    spoke: str
    session: str
    what: str  # "spawned", ... or "signal.<kind>"
    body: dict[str, Any]


@dataclass
class Expected:
    mappings: dict[str, str] = field(default_factory=dict)  # session -> status
    sessions: dict[str, str] = field(default_factory=dict)  # session -> status
    archived: set[str] = field(default_factory=set)
    # (session, anomaly type) -> (occurrences, severity, resolved?)
    detections: dict[tuple[str, str], tuple[int, str, bool]] = field(default_factory=dict)


def generate(sessions: int, seed: int = 7, spokes: int = 5) -> list[Published]:
    """Per session: spawned, started, signals and heartbeats, an end, often an archive,
    sometimes a signal after the archive; sessions interleaved, each in its own order.

    Each session's events are a second apart from a minute before now: the stall sweep takes a session silent for HUB_STALL_AFTER_SECONDS
    (600 in the tests) for stalled, and a worker sweeps once as it starts. With
    events from a fixed date in the past, that first sweep opened a stall for every
    session still active when it ran, if it ran after the first publishes."""
    rng = random.Random(seed)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    queues: list[list[Published]] = []
    for n in range(sessions):
        spoke, session = f"spoke-{n % spokes}", f"sess-{n}"
        steps: list[tuple[str, dict[str, Any]]] = [
            ("spawned", {"task": f"task {n}"}),
            ("started", {}),
        ]
        for _ in range(rng.randint(2, 8)):
            if rng.random() < 0.2:
                steps.append(("heartbeat", {}))
            else:
                steps.append(
                    (
                        f"signal.{rng.choice(KINDS)}",
                        {"severity": rng.choice(SEVERITIES), "details": {"n": n}},
                    )
                )
        steps.append(
            (rng.choice(["completed", "completed", "failed", "aborted"]), {"reason": "done"})
        )
        if rng.random() < 0.6:
            steps.append(("archived", {}))
            if rng.random() < 0.3:
                steps.append((f"signal.{KINDS[0]}", {"severity": "high"}))
        queue = []
        for position, (what, extra) in enumerate(steps):
            body = {
                "eventId": str(UUID(int=rng.getrandbits(128), version=4)),
                "occurredAt": (base + timedelta(seconds=position)).isoformat(),
                "spokeId": spoke,
                "sessionId": session,
                **extra,
            }
            queue.append(Published(spoke, session, what, body))
        queues.append(queue)
    stream: list[Published] = []
    while queues:
        queue = rng.choice(queues)
        stream.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return stream


def differing_keys(
    actual: Mapping[Any, Any], expected: Mapping[Any, Any]
) -> tuple[list[Any], list[Any], list[Any]]:
    """The keys only `expected` has, those only `actual` has, and those whose values
    differ; each sorted."""
    missing = sorted(expected.keys() - actual.keys(), key=repr)
    extra = sorted(actual.keys() - expected.keys(), key=repr)
    changed = sorted(
        (k for k in actual.keys() & expected.keys() if actual[k] != expected[k]), key=repr
    )
    return missing, extra, changed


def differences(actual: Mapping[Any, Any], expected: Mapping[Any, Any], most: int = 20) -> str:
    """What differs between two mappings, key by key, sorted and at most `most` of each kind.

    For CI's log, whose tail is all one gets: pytest's full diff of two large dicts
    in different orders is thousands of lines of reordering."""
    missing, extra, changed = differing_keys(actual, expected)
    lines = [
        f"{len(actual)} actual against {len(expected)} expected: {len(missing)} missing, "
        f"{len(extra)} unexpected, {len(changed)} different"
    ]
    lines += [f"  missing {k!r}: expected {expected[k]!r}" for k in missing[:most]]
    lines += [f"  unexpected {k!r}: {actual[k]!r}" for k in extra[:most]]
    lines += [f"  {k!r}: {actual[k]!r}, expected {expected[k]!r}" for k in changed[:most]]
    return "\n".join(lines)


def events_of(stream: list[Published], sessions: set[str]) -> str:
    """The stream's events of `sessions`, in order: what a failed comparison needs next."""
    return "\n".join(
        f"  {e.session} {e.what} {e.body['eventId']} {e.body.get('severity', '')}".rstrip()
        for e in stream
        if e.session in sessions
    )


def expect(stream: list[Published]) -> Expected:
    out = Expected()
    for event in stream:
        s = event.session
        if s in out.archived:
            continue
        out.sessions.setdefault(s, "active")
        if event.what == "spawned":
            out.mappings.setdefault(s, out.sessions[s])
        elif event.what in ("completed", "failed", "aborted"):
            if out.sessions[s] == "active":
                out.sessions[s] = event.what
                if s in out.mappings:
                    out.mappings[s] = event.what
        elif event.what == "archived":
            out.archived.add(s)
            if out.sessions[s] == "active":
                out.sessions[s] = "aborted"
            if out.mappings.get(s) == "active":
                out.mappings[s] = "aborted"
            for key, (count, severity, _) in list(out.detections.items()):
                if key[0] == s:
                    out.detections[key] = (count, severity, True)
        elif event.what.startswith("signal."):
            key = (s, event.what.removeprefix("signal.").upper())
            count, severity, resolved = out.detections.get(key, (0, "low", False))
            new = event.body["severity"]
            severity = new if count == 0 or RANK[new] > RANK[severity] else severity
            out.detections[key] = (count + 1, severity, resolved)
    return out
